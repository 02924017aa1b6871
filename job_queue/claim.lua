-- Fill the worker's processing list up to `batch` jobs from the queue, in one step, so that a job is
-- always either in the queue or recorded as claimed by exactly one worker (never both, never neither).
-- Returns the whole processing list, not just the jobs taken now: if the reply to an earlier command was
-- lost (a BLMOVE that moved a job and was then retried, say), the worker still learns of every job it holds.
-- A retried job (one handed back after its batch failed, hung or lost its worker: an attempt counted) is claimed
-- alone: the batch it was handed back with went back whole, and a job that kills or hangs its worker would
-- otherwise take its batch-mates' attempts with it on every try, until they were given up beside it (found by
-- review: one image that crashed the worker had 5 of its 7 batch-mates answered 500). Alone, it uses up its own
-- attempts; the others, each alone too, are answered.
-- KEYS[1] queue          the waiting jobs
-- KEYS[2] processing     the claiming worker's processing list
-- KEYS[3] workers        the set of registered workers
-- ARGV[1] batch          how many jobs the worker takes at most
-- ARGV[2] worker         the claiming worker's name
-- ARGV[3] status_prefix  the status keys' prefix (Keys.status_prefix): each async job held says 'running' from
--                        this step on, so that no status read finds it waiting while a worker holds it
local queue, processing, workers = KEYS[1], KEYS[2], KEYS[3]
local batch, worker, status_prefix = tonumber(ARGV[1]), ARGV[2], ARGV[3]

local function attempted(job)
  return job ~= nil and (tonumber(job.attempts) or 0) > 0
end

-- Never more than a batch, however often a claim whose reply was lost is retried.
local held = {}
local alone = false
for _, raw in ipairs(redis.call('LRANGE', processing, 0, -1)) do
  local job = read_job(raw)
  alone = alone or attempted(job)
  table.insert(held, job or false)
end
local count = alone and 0 or batch - #held
if count > 0 then
  local take = 0
  for _, raw in ipairs(redis.call('LRANGE', queue, 0, count - 1)) do
    local job = read_job(raw)
    if attempted(job) then
      if #held == 0 then  -- it goes alone
        take = 1
        table.insert(held, job)
      end
      break
    end
    take = take + 1
    table.insert(held, job or false)
  end
  if take > 0 then
    redis.call('RPUSH', processing, unpack(redis.call('LPOP', queue, take)))
  end
end
for _, job in ipairs(held) do
  if job then
    mark_status(job, status_prefix, 'running')
  end
end
if #held > 0 then
  -- Whoever holds jobs is registered, so the sweep finds them even if this worker was swept while it
  -- stalled and dies before it beats again.
  redis.call('SADD', workers, worker)
end
return redis.call('LRANGE', processing, 0, -1)
