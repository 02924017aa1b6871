-- Store replies with their TTL and notify each waiting web process, dead-letter jobs that can never
-- succeed and, for a finished batch, acknowledge the worker's claim. Atomic: a crash leaves all of it or none.
-- KEYS[1] processing       the worker's processing list
-- KEYS[2] dead             the dead-letter list
-- KEYS[3 .. n+2]           the result key of each reply, in the order of the replies
-- ARGV[1] ttl              seconds a result is kept
-- ARGV[2] n                number of replies
-- ARGV[3] acknowledge      '1': the batch is done, drop the processing list; '0': only store the replies
-- ARGV[4 .. 3n+3]          n replies, three values each: channel ('' for none), job id, result JSON
-- ARGV[3n+4 ..]            jobs to dead-letter, two values each: raw job, reason
--                          (each is pushed as jobs.DeadLetter's envelope {"reason", "dead_at", "job": raw job})
-- Returns n.
local processing, dead = KEYS[1], KEYS[2]
local ttl, n, acknowledge = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local first_dead = 3 * n + 4

for i = 1, n do
  local at = 3 * i + 1
  local channel, job_id, result = ARGV[at], ARGV[at + 1], ARGV[at + 2]
  local result_key = KEYS[i + 2]
  redis.call('SET', result_key, result, 'EX', ttl)
  if channel ~= '' then
    redis.call('PUBLISH', channel, job_id)
  end
end
if #ARGV >= first_dead then
  local time = redis.call('TIME')
  local dead_at = tonumber(time[1]) + tonumber(time[2]) / 1000000
  for i = first_dead, #ARGV, 2 do
    redis.call('RPUSH', dead, cjson.encode({reason = ARGV[i + 1], dead_at = dead_at, job = ARGV[i]}))
  end
end
if acknowledge then
  redis.call('DEL', processing)
end
return n
