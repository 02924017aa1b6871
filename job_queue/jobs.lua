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

-- The job's own result_ttl when it has one (jobs.py's check: a whole number from 1 to MAX_RESULT_TTL), else nil.
local function result_ttl(job)
  local keep = tonumber(job.result_ttl)
  if keep and keep >= 1 and keep <= 10000000 and keep == math.floor(keep) then
    return keep
  end
  return nil
end

-- An async job's status says `state` ('queued': handed back to the queue, after a failure or a sweep; 'running':
-- claimed); only a status key that exists is set: one left to expire stays gone. Not a job that waits for nobody.
local function mark_status(job, status_prefix, state)
  local id = job_id(job)
  if id and result_ttl(job) then
    redis.call('SET', status_prefix .. id, state, 'XX', 'KEEPTTL')
  end
end

-- The key of an async job's deadline, kept beside its status (Keys.job_deadline).
local function deadline_key(status_prefix, id)
  return status_prefix .. id .. ':deadline'
end

-- An answered async job's status, and the deadline kept beside it, go: once the answer expires the job is unknown
-- (404), not 'running' again.
local function forget_status(status_prefix, id)
  redis.call('DEL', status_prefix .. id, deadline_key(status_prefix, id))
end

-- Redis's clock, unix seconds.
local function redis_now()
  local time = redis.call('TIME')
  return tonumber(time[1]) + tonumber(time[2]) / 1000000
end

-- Dead-letter the job `raw` (its header as claimed) as jobs.DeadLetter's entry: the JSON envelope {reason,
-- dead_at, job} and, when its pixels are still there, a newline and the pixels as they are, moved out of their key
-- (the key is deleted). cjson writes no raw newline, so the first one ends the JSON; inside it, cjson would write
-- the pixels escaped, 1.2-6x their size. A dead job stays requeueable with its image for as long as its entry is
-- kept, and nothing outside the dead list holds memory for it.
local function bury(dead, raw, reason, pixels_prefix)
  local entry = cjson.encode({reason = reason, dead_at = redis_now(), job = raw})
  local id = job_id(read_job(raw))
  if id then
    local pixels = redis.call('GET', pixels_prefix .. id)
    if pixels then
      entry = entry .. '\n' .. pixels
    end
    redis.call('DEL', pixels_prefix .. id)
  end
  redis.call('RPUSH', dead, entry)
end

-- A dead-letter entry read back: its envelope (empty when it holds none) and its pixels (nil when it has none).
-- Entries written before the pixels followed the JSON hold them in the envelope's "pixels".
local function read_dead(entry)
  local newline = string.find(entry, '\n', 1, true)
  if newline then
    return read_job(string.sub(entry, 1, newline - 1)) or {}, string.sub(entry, newline + 1)
  end
  local envelope = read_job(entry) or {}
  return envelope, type(envelope.pixels) == 'string' and envelope.pixels or nil
end

-- Whether the worker's list `processing` starts with exactly the jobs ARGV[first .. first + count - 1], the batch
-- as its worker claimed it. Only then is the batch still the worker's to acknowledge or hand back: a sweep takes
-- it away, a late claim (one whose reply timed out) then appends other jobs, and a late copy of an earlier call
-- (its bytes still on the way when the worker retried it) finds a later batch there. Counting alone took those
-- other jobs for the batch and trimmed them away unanswered.
local function holds_batch(processing, first, count)
  if count == 0 then
    return true
  end
  local head = redis.call('LRANGE', processing, 0, count - 1)
  if #head ~= count then
    return false
  end
  for i = 1, count do
    if head[i] ~= ARGV[first + i - 1] then
      return false
    end
  end
  return true
end

-- Keep the newest `dead_max` entries of the dead list; returns how many older ones were dropped.
local function trim_dead(dead, dead_max)
  local dropped = math.max(0, redis.call('LLEN', dead) - dead_max)
  redis.call('LTRIM', dead, -dead_max, -1)
  return dropped
end

