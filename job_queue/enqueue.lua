-- Queue a request's jobs together, or none of them when the queue has no room for them all, in one step:
-- pushed side by side, a request's images land in the same batch where it has room. Safe to repeat after
-- a lost reply: when the first job is already among the newest in the queue, the jobs were pushed and are
-- neither pushed again nor refused because their own first push filled the queue. (Comparing is cheap: two
-- jobs differ within their first bytes, the id.)
-- The jobs' pixels were SET just before, in the same pipeline (JobQueue.enqueue); this script never reads
-- them, and deletes them when it refuses the jobs: at a high rate of refusals, pixels left to expire would
-- hold 147 KiB each for their whole grace period.
-- KEYS[1] queue          the waiting jobs
-- KEYS[2 .. n+1]         each job's pixels' key
-- KEYS[n+2 .. 2n+1]      async jobs only: each job's status key, set to 'queued' (none for waited-for jobs)
-- ARGV[1] max_length     the cap
-- ARGV[2] status_ttl     seconds a status key is kept
-- ARGV[3 .. n+2]         the jobs' headers
-- Returns the queue's new length, or 0 when it was full.
local queue = KEYS[1]
local max_length, status_ttl = tonumber(ARGV[1]), ARGV[2]
local n = #ARGV - 2

if redis.call('LPOS', queue, ARGV[3], 'RANK', -1, 'MAXLEN', 64 + n) then
  return redis.call('LLEN', queue)
end
if redis.call('LLEN', queue) + n > max_length then
  redis.call('DEL', unpack(KEYS, 2, n + 1))
  return 0
end
for i = n + 2, #KEYS do
  redis.call('SET', KEYS[i], 'queued', 'EX', status_ttl)
end
return redis.call('RPUSH', queue, unpack(ARGV, 3))
