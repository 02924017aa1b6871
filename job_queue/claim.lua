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

-- Whether `raw` was handed back after its batch failed, hung or lost its worker (an attempt counted).
local function retried(raw)
  local job = read_job(raw)
  return job ~= nil and (tonumber(job.attempts) or 0) > 0
end

-- A retried job is claimed alone: the batch it was handed back with went back whole, and a job that kills or hangs
-- its worker would otherwise take its batch-mates' attempts with it on every try, until they were given up beside
-- it (found by review: one image that crashed the worker had 5 of its 7 batch-mates answered 500). Alone, it uses up
-- its own attempts; the others, each alone too, are answered.
-- Never more than a batch, however often a claim whose reply was lost is retried.
local held = redis.call('LRANGE', processing, 0, -1)
local count = batch - #held
for _, raw in ipairs(held) do
  if retried(raw) then
    count = 0
  end
end
if count > 0 then
  local take = 0
  for _, raw in ipairs(redis.call('LRANGE', queue, 0, count - 1)) do
    if retried(raw) then
      if #held + take == 0 then
        take = 1
      end
      break
    end
    take = take + 1
  end
  if take > 0 then
    redis.call('RPUSH', processing, unpack(redis.call('LPOP', queue, take)))
  end
end
held = redis.call('LRANGE', processing, 0, -1)
if #held > 0 then
  -- Whoever holds jobs is registered, so the sweep finds them even if this worker was swept while it
  -- stalled and dies before it beats again.
  redis.call('SADD', workers, worker)
end
return held
