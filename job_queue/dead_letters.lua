-- Requeue or purge dead-lettered jobs, in one step (`queue_admin.py dead requeue|purge`).
-- An entry of the dead list is jobs.DeadLetter's: the JSON envelope {"reason", "dead_at", "job": the job's header},
-- then a newline and its raw pixels unless they were gone (jobs.lua's read_dead). An entry without a job id matches
-- only when no ids are given, and is never requeued; nor is one without pixels (the worker could only answer
-- it 410 again).
-- KEYS[1] dead           the dead-letter list
-- KEYS[2] queue          the waiting jobs
-- KEYS[3] operation      Keys.dead_operation(a token of this call): its outcome is kept there, and a repeat of the
--                        call (redis-py sends it again after a lost reply) returns it instead of acting again: the
--                        jobs are gone from the list by then, and it said none was found (found by review)
-- ARGV[1] mode           'requeue': move the matching jobs to the tail of the queue with attempts 0 and no
--                        reply channel (their requesters were answered when the jobs died), their pixels back
--                        in their key, and the answer they died with deleted: a job's first answer stands
--                        (finish.lua), and this one is to be replaced; an async job says queued again;
--                        'purge': delete the entries (their pixels go with them)
-- ARGV[2] force          'requeue' only. '0': a job whose deadline has passed stays dead (a worker would drop
--                        it unprocessed); '1': requeue it too, with a new deadline of now + ARGV[3] (an async
--                        job's: now + its result_ttl, as when it was submitted)
-- ARGV[3] timeout        seconds from now of the new deadline (REQUEST_TIMEOUT)
-- ARGV[4] grace          seconds the pixels' key outlives the job's deadline (JobQueue.pixels_grace)
-- ARGV[5] pixels_prefix  the pixels' keys' prefix (Keys.pixels_prefix): a job's are prefix .. its id
-- ARGV[6] result_prefix  the result keys' prefix (Keys.result_prefix)
-- ARGV[7] status_prefix  the status keys' prefix (Keys.status_prefix): an async job (one with a result_ttl)'s
--                        says 'queued', its deadline beside it (Keys.job_deadline), for twice its result_ttl, as
--                        when it was submitted
-- ARGV[8] cancelled_prefix the cancellation marks' prefix (Keys.cancelled_prefix): a requeued job's mark (its
--                        request's client went away, or its deadline passed) is deleted, or the worker would skip it
--                        (found by review: requeued, reported done, and never run)
-- ARGV[9] operation_ttl  seconds KEYS[3] is kept
-- ARGV[10 ..]            the job ids to match; none: every entry
-- Returns {ids done, ids left dead because their deadline passed, ids left dead because their pixels were
-- gone, entries left because they hold no job with an id}.
local dead, queue, operation = KEYS[1], KEYS[2], KEYS[3]
local mode, force, timeout = ARGV[1], ARGV[2] == '1', tonumber(ARGV[3])
local grace, pixels_prefix, result_prefix, status_prefix = tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7]
local cancelled_prefix, operation_ttl = ARGV[8], ARGV[9]
local done_before = redis.call('GET', operation)
if done_before then
  return cjson.decode(done_before)
end
local wanted = nil
if #ARGV >= 10 then
  wanted = {}
  for i = 10, #ARGV do
    wanted[ARGV[i]] = true
  end
end
local now = redis_now()
-- Matched entries are overwritten with this marker, then all removed with one LREM (order kept, one pass).
local removed = '\0removed by dead_letters.lua\0'

local done, expired, no_pixels, no_job = {}, {}, {}, 0
local entries = redis.call('LRANGE', dead, 0, -1)
for index, entry in ipairs(entries) do
  local envelope, pixels = read_dead(entry)
  local job = type(envelope.job) == 'string' and read_job(envelope.job) or nil
  local id = job_id(job)
  if wanted == nil or (id and wanted[id]) then
    if mode == 'purge' then
      redis.call('LSET', dead, index - 1, removed)
      table.insert(done, id or '')
    elseif not id then
      no_job = no_job + 1
    elseif not pixels then
      table.insert(no_pixels, id)
    else
      local deadline = tonumber(job.deadline)
      if deadline and deadline >= now or force then
        if not deadline or deadline < now then
          job.deadline = now + (result_ttl(job) or timeout)  -- an async job's time is its result_ttl (/jobs)
        end
        job.attempts = 0
        job.reply_to = cjson.null
        local encoded, requeued = pcall(cjson.encode, job)  -- 1e999 reads as inf and cannot be written
        local expires_ms = math.floor((job.deadline + grace) * 1000)
        -- A deadline Redis cannot take as an expiry (1e300, NaN) would fail the SET after earlier entries were
        -- already requeued, and a script is not rolled back: such an entry is left dead, before any write.
        if encoded and expires_ms == expires_ms and expires_ms > 0 and expires_ms < 2 ^ 53 then
          redis.call('SET', pixels_prefix .. id, pixels, 'PXAT', expires_ms)
          redis.call('DEL', result_prefix .. id, cancelled_prefix .. id)
          local keep = result_ttl(job)
          if keep then
            redis.call('SET', status_prefix .. id, 'queued', 'EX', 2 * keep)
            redis.call('SET', deadline_key(status_prefix, id), string.format('%.6f', job.deadline), 'EX', 2 * keep)
          end
          redis.call('RPUSH', queue, requeued)
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
local outcome = {done, expired, no_pixels, no_job}
redis.call('SET', operation, cjson.encode(outcome), 'EX', operation_ttl)
return outcome
