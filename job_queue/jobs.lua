-- Included at the top of the scripts that read jobs or dead-letter them (job_queue.script() puts it there
-- when a script calls one of these functions). A job in the queue is its header alone, jobs.py's JSON object;
-- its pixels are in the key pixels_prefix .. id (Keys.pixels).

-- The job decoded, or nil when `raw` holds no JSON object that cjson reads.
local function read_job(raw)
  local ok, job = pcall(cjson.decode, raw)
  if ok and type(job) == 'table' then
    return job
  end
  return nil
end

-- The job's id when it is one (jobs.py's check: 32 lowercase hex digits), else nil: only then may it name keys.
local function job_id(job)
  local id = job and job.id
  if type(id) == 'string' and #id == 32 and string.match(id, '^[0-9a-f]+$') then
    return id
  end
  return nil
end

-- Redis's clock, unix seconds.
local function redis_now()
  local time = redis.call('TIME')
  return tonumber(time[1]) + tonumber(time[2]) / 1000000
end

-- Dead-letter the job `raw` (its header as claimed) in jobs.DeadLetter's envelope, with its pixels moved out
-- of their key into the envelope (the key is deleted): a dead job stays requeueable with its image for as
-- long as its entry is kept, and nothing outside the dead list holds memory for it.
local function bury(dead, raw, reason, pixels_prefix)
  local envelope = {reason = reason, dead_at = redis_now(), job = raw}
  local id = job_id(read_job(raw))
  if id then
    envelope.pixels = redis.call('GET', pixels_prefix .. id) or nil  -- nil: gone, the entry has no 'pixels'
    redis.call('DEL', pixels_prefix .. id)
  end
  redis.call('RPUSH', dead, cjson.encode(envelope))
end

-- Keep the newest `dead_max` entries of the dead list; returns how many older ones were dropped.
local function trim_dead(dead, dead_max)
  local dropped = math.max(0, redis.call('LLEN', dead) - dead_max)
  redis.call('LTRIM', dead, -dead_max, -1)
  return dropped
end

