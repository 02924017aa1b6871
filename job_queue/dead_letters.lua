-- Requeue or purge dead-lettered jobs, in one step (`queue_admin.py dead requeue|purge`).
-- An entry of the dead list is jobs.DeadLetter's envelope {"reason", "dead_at", "job": raw job}; an entry
-- from before the envelope is the bare raw job. An entry without a job id (jobs.DeadLetter.id) matches only when
-- no ids are given, and is never requeued.
-- KEYS[1] dead     the dead-letter list
-- KEYS[2] queue    the waiting jobs
-- ARGV[1] mode     'requeue': move the matching jobs to the tail of the queue with attempts 0 and no reply
--                  channel (their requesters were answered when the jobs died); 'purge': delete the entries
-- ARGV[2] force    'requeue' only. '0': a job whose deadline has passed stays dead (a worker would drop it
--                  unprocessed); '1': requeue it too, with a new deadline of now + ARGV[3]
-- ARGV[3] timeout  seconds from now of the new deadline (REQUEST_TIMEOUT)
-- ARGV[4 ..]       the job ids to match; none: every entry
-- Returns {ids done, ids left dead because their deadline passed, entries left because they hold no job}.
local dead, queue = KEYS[1], KEYS[2]
local mode, force, timeout = ARGV[1], ARGV[2] == '1', tonumber(ARGV[3])
local wanted = nil
if #ARGV >= 4 then
  wanted = {}
  for i = 4, #ARGV do
    wanted[ARGV[i]] = true
  end
end
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
-- Matched entries are overwritten with this marker, then all removed with one LREM (order kept, one pass).
local removed = '\0removed by dead_letters.lua\0'

local function decode(text)
  local ok, value = pcall(cjson.decode, text)
  if ok and type(value) == 'table' then
    return value
  end
  return nil
end

local done, expired, no_job = {}, {}, 0
local entries = redis.call('LRANGE', dead, 0, -1)
for index, entry in ipairs(entries) do
  local envelope = decode(entry)
  local raw = entry
  if envelope and type(envelope.job) == 'string' then
    raw = envelope.job
  end
  local job, pixels = split(raw)
  local id = job and type(job.id) == 'string' and #job.id == 32 and job.id:match('^[0-9a-f]+$') and job.id or nil
  if wanted == nil or (id and wanted[id]) then
    if mode == 'purge' then
      redis.call('LSET', dead, index - 1, removed)
      table.insert(done, id or '')
    elseif not id then
      no_job = no_job + 1
    else
      local deadline = tonumber(job.deadline)
      if deadline and deadline >= now or force then
        if not deadline or deadline < now then
          job.deadline = now + timeout
        end
        job.attempts = 0
        job.reply_to = cjson.null
        local encoded, requeued = pcall(cjson.encode, job)  -- 1e999 reads as inf and cannot be written
        if encoded then
          redis.call('RPUSH', queue, requeued .. pixels)
          redis.call('LSET', dead, index - 1, removed)
          table.insert(done, id)
        else
          no_job = no_job + 1
        end
      else
        table.insert(expired, id)
      end
    end
  end
end
if #done > 0 then
  redis.call('LREM', dead, 0, removed)
end
return {done, expired, no_job}
