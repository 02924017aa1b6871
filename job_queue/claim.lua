-- Fill the worker's processing list up to `batch` jobs from the queue, in one step, so that a job is
-- always either in the queue or recorded as claimed by exactly one worker (never both, never neither).
-- Returns the whole processing list, not just the jobs taken now: if the reply to an earlier command was
-- lost (a BLMOVE that moved a job and was then retried, say), the worker still learns of every job it holds.
-- KEYS[1] queue       the waiting jobs
-- KEYS[2] processing  the claiming worker's processing list
-- KEYS[3] workers     the set of registered workers
-- ARGV[1] batch       how many jobs the worker takes at most
-- ARGV[2] worker      the claiming worker's name
local queue, processing, workers = KEYS[1], KEYS[2], KEYS[3]
local batch, worker = tonumber(ARGV[1]), ARGV[2]

-- Never more than a batch, however often a claim whose reply was lost is retried.
local count = batch - redis.call('LLEN', processing)
if count > 0 then
  local jobs = redis.call('LPOP', queue, count)
  if jobs then
    redis.call('RPUSH', processing, unpack(jobs))
  end
end
local held = redis.call('LRANGE', processing, 0, -1)
if #held > 0 then
  -- Whoever holds jobs is registered, so the sweep finds them even if this worker was swept while it
  -- stalled and dies before it beats again.
  redis.call('SADD', workers, worker)
end
return held
