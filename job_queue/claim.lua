-- Take up to `count` more waiting jobs into the worker's processing list, in one step, so that a job is
-- always either in the queue or recorded as claimed by exactly one worker (never both, never neither).
-- KEYS[1] queue       the waiting jobs
-- KEYS[2] processing  the claiming worker's processing list
-- ARGV[1] count       how many jobs to take at most
-- Returns the jobs taken, oldest first.
local queue, processing = KEYS[1], KEYS[2]
local count = ARGV[1]

local jobs = redis.call('LPOP', queue, count)
if not jobs then
  return {}
end
redis.call('RPUSH', processing, unpack(jobs))
return jobs
