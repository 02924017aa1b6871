-- Take up to ARGV[1] more waiting jobs into the worker's processing list, in one step, so that a job is
-- always either in the queue or recorded as claimed by exactly one worker (never both, never neither).
-- KEYS[1] queue, KEYS[2] processing list; ARGV[1] how many. Returns the jobs taken.
local jobs = redis.call('LPOP', KEYS[1], ARGV[1])
if not jobs then
  return {}
end
redis.call('RPUSH', KEYS[2], unpack(jobs))
return jobs
