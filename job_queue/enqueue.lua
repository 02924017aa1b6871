-- Queue a job unless `max_length` jobs are already waiting, in one step. Safe to repeat after a lost reply:
-- a job already among the newest in the queue is not pushed again, nor refused because its own first push
-- filled the queue. (Comparing is cheap: two jobs differ within their first bytes, the id.)
-- KEYS[1] queue       the waiting jobs
-- ARGV[1] job         the raw job
-- ARGV[2] max_length  the cap
-- Returns the queue's new length, or 0 when it was full.
local queue = KEYS[1]
local job, max_length = ARGV[1], tonumber(ARGV[2])

if redis.call('LPOS', queue, job, 'RANK', -1, 'MAXLEN', 64) then
  return redis.call('LLEN', queue)
end
if redis.call('LLEN', queue) >= max_length then
  return 0
end
return redis.call('RPUSH', queue, job)
