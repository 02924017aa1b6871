-- Queue a request's jobs together, or none of them when the queue has no room for them all, in one step:
-- pushed side by side, a request's images land in the same batch where it has room. Safe to repeat after
-- a lost reply (redis-py sends the whole pipeline again): pushing records a token under the first job's id,
-- and a repeat that finds it changes nothing and answers as the push did, whether the jobs still wait, are
-- being computed or were answered long ago. (Looking for the job in the queue instead missed a job already
-- claimed: it was pushed twice, or refused, and then its pixels deleted under the worker holding it.)
-- The jobs' pixels were SET just before, in the same pipeline (JobQueue.enqueue); this script never reads
-- them, and deletes them when it refuses the jobs: at a high rate of refusals, pixels left to expire would
-- hold 147 KiB each for their whole grace period. (A refusal is never a repeat of a push: that finds the token.)
-- A repeat that finds a job answered already deletes the pixels the repeated pipeline has just SET again: no
-- worker will read them, and they would otherwise be kept for their whole grace period.
-- KEYS[1] queue            the waiting jobs
-- KEYS[2] token            Keys.enqueued(first job's id), set when the jobs are pushed
-- KEYS[3 .. n+2]           each job's pixels' key
-- KEYS[n+3 .. 2n+2]        each job's result key (read by a repeat only)
-- KEYS[2n+3 .. 3n+2]       async jobs only (none for waited-for jobs): each job's status key, set to 'queued'
-- KEYS[3n+3 .. 4n+2]       async jobs only: each job's deadline key (Keys.job_deadline), set to its deadline
-- ARGV[1] max_length       the cap
-- ARGV[2] status_ttl       seconds a status key is kept
-- ARGV[3] token_expires    unix ms (PXAT) when the token may go: when the pixels do, after any repeat
-- ARGV[4 .. n+3]           the jobs' headers
-- Returns {1, the queue's length} when the jobs are queued (now or by the push this repeats), {0, the queue's
-- length} when the queue was full: the web server's admission counts on that length instead of asking
-- (JobQueue.enqueue returns it, or raises QueueFull carrying it).
local queue, token = KEYS[1], KEYS[2]
local max_length, status_ttl, token_expires = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local n = #ARGV - 3

local length = redis.call('LLEN', queue)
if redis.call('EXISTS', token) == 1 then
  for i = 1, n do
    local pixels, result = KEYS[2 + i], KEYS[n + 2 + i]
    if redis.call('EXISTS', result) == 1 then
      redis.call('DEL', pixels)
    end
  end
  return {1, length}
end
if length + n > max_length then
  redis.call('DEL', unpack(KEYS, 3, n + 2))
  return {0, length}
end
if #KEYS > 2 * n + 2 then
  for i = 1, n do
    redis.call('SET', KEYS[2 * n + 2 + i], 'queued', 'EX', status_ttl)
    local deadline = string.format('%.6f', cjson.decode(ARGV[3 + i]).deadline)
    redis.call('SET', KEYS[3 * n + 2 + i], deadline, 'EX', status_ttl)
  end
end
redis.call('SET', token, '1', 'PXAT', token_expires)
return {1, redis.call('RPUSH', queue, unpack(ARGV, 4))}
