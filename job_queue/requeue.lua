-- Put a worker's claimed jobs back at the head of the queue, in their original order. A job that has now
-- used up its attempts goes to the dead-letter list instead, and its requester is answered in the same
-- step (so that a retry after a lost reply, which finds nothing left to do, cannot leave it unanswered), and
-- its pixels move into its dead-letter entry (jobs.lua's bury()). Only the small JSON headers are read and
-- rewritten: a requeued job's pixels stay in their key.
-- KEYS[1] processing    the worker's processing list
-- KEYS[2] queue         the waiting jobs
-- KEYS[3] dead          the dead-letter list
-- KEYS[4] heartbeat     the worker's heartbeat hash
-- KEYS[5] workers       the set of registered workers
-- KEYS[6] left          the worker's left mark (Keys.left): set by a leave, with the worker's unregistering, in
--                       the same step; a sweep that finds it set finds jobs a claim put in the list after the
--                       worker left (the claim's reply had timed out): nothing of them ran, so no attempt counts
-- ARGV[1] mode          'leave': a graceful exit, no attempt counted, and the worker unregistered (out of
--                       the workers set, its heartbeat deleted, its left mark set for ARGV[11] seconds);
--                       'fail': the model failed on the batch ARGV[12 ..], one attempt counted; only if that
--                       batch is still at the head of the list (jobs.lua's holds_batch): a late copy of the call
--                       must not hand back the batch held by then, nor jobs a late claim appended;
--                       'sweep': the worker died: one attempt counted (none when it had left, see KEYS[6]), and
--                       only if its heartbeat is gone, checked in the same step so that a worker that beats
--                       again is never swept
-- ARGV[2] max_attempts  attempts after which a job is dead-lettered
-- ARGV[3] worker        the worker's name in the workers set
-- ARGV[4] dead_max      the dead-letter list keeps this many jobs, dropping the oldest
-- ARGV[5] reason        why a job out of attempts was given up (jobs.DeadLetter's envelope carries it)
-- ARGV[6] answer        the answer for a given-up job, as jobs.error_result's JSON with an empty id
-- ARGV[7] result_prefix the result keys' prefix (Keys.result_prefix): the answer goes to prefix .. job id
-- ARGV[8] ttl           seconds an answer is kept, unless the job's header names its own result_ttl
-- ARGV[9] pixels_prefix the pixels' keys' prefix (Keys.pixels_prefix): a job's are prefix .. its id
-- ARGV[10] status_prefix the status keys' prefix (Keys.status_prefix): a given-up async job's is deleted with
--                       its answer stored, as finish.lua does; one handed back says queued again
-- ARGV[11] left_ttl     'leave' only: seconds the left mark is kept
-- ARGV[12 ..]           'fail' only: the batch's jobs as claimed, in the list's order
-- Returns {dead-lettered jobs, how many old ones the cap dropped}, or false when a worker to sweep turned
-- out to be alive. Safe to repeat: a second call finds the processing list empty ('fail': without its batch).
local processing, queue, dead, heartbeat, workers, left = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local mode, max_attempts, worker, dead_max, reason = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), ARGV[5]
local answer, result_prefix, ttl, pixels_prefix = cjson.decode(ARGV[6]), ARGV[7], ARGV[8], ARGV[9]
local status_prefix, left_ttl = ARGV[10], ARGV[11]

-- The checks of jobs.py: a valid id (job_id); a reply channel of 1-200 safe characters; a result_ttl in range.
local function answer_requester(job)
  local id, reply_to = job_id(job), job.reply_to
  if not id then
    return
  end
  local keep = result_ttl(job) or ttl
  answer.id = id
  -- Only a job without an answer is answered (the first answer stands, as in finish.lua): a job handed back by
  -- an earlier sweep may have been answered since by the late finish of the worker swept.
  if not redis.call('SET', result_prefix .. id, cjson.encode(answer), 'EX', keep, 'NX') then
    return
  end
  forget_status(status_prefix, id)
  if type(reply_to) == 'string' and #reply_to <= 200 and string.match(reply_to, '^[%w%._:%-]+$') then
    redis.call('PUBLISH', reply_to, id)
  end
end

if mode == 'sweep' and redis.call('EXISTS', heartbeat) == 1 then
  return false
end
local count_attempt = mode ~= 'leave' and not (mode == 'sweep' and redis.call('EXISTS', left) == 1)
local jobs
if mode == 'fail' then
  if not holds_batch(processing, 12, #ARGV - 11) then
    return {{}, 0}
  end
  jobs = {unpack(ARGV, 12)}
else
  jobs = redis.call('LRANGE', processing, 0, -1)
end
local given_up = {}
for i = #jobs, 1, -1 do
  local raw = jobs[i]
  local job = read_job(raw)
  local parsed = job ~= nil
  local why = reason
  if parsed and count_attempt then
    job.attempts = (tonumber(job.attempts) or 0) + 1
    -- A job cjson reads but cannot write back (a number like 1e999 becomes inf) must not fail the script
    -- halfway, nor go back uncounted again and again: it is given up as it was.
    local encoded, again = pcall(cjson.encode, job)
    if encoded then
      raw = again
    else
      job.attempts = max_attempts
      why = 'the job cannot be written back with an attempt counted (a number out of range?)'
    end
  end
  if parsed and (tonumber(job.attempts) or 0) >= max_attempts then
    bury(dead, raw, why, pixels_prefix)
    answer_requester(job)
    table.insert(given_up, raw)
  else
    -- A job we cannot even parse goes back too: the worker that takes it dead-letters it with a reason.
    redis.call('LPUSH', queue, raw)
    if parsed then
      mark_status(job, status_prefix, 'queued')
    end
  end
end
if mode == 'fail' then
  redis.call('LTRIM', processing, #jobs, -1)
else
  redis.call('DEL', processing)
end
if mode == 'sweep' then
  redis.call('SREM', workers, worker)
elseif mode == 'leave' then
  redis.call('SET', left, '1', 'EX', left_ttl)
  redis.call('SREM', workers, worker)
  redis.call('DEL', heartbeat)
end
local dropped = 0
if #given_up > 0 then
  dropped = trim_dead(dead, dead_max)
end
return {given_up, dropped}
