-- Finish a batch in one atomic step: store each reply with its TTL and notify its web process, put jobs
-- to retry back at the head of the queue, dead-letter jobs that can never succeed, delete the pixels of the
-- jobs that are done for good, and acknowledge the batch by removing exactly its jobs from the head of the
-- worker's processing list. Safe to repeat: a call retried after its reply was lost, or a late copy of an
-- earlier batch's call (its bytes still on the way when the worker retried it and went on), is told by its batch
-- number and changes nothing.
-- A job gets one answer: a reply is stored only when the job has none (SET NX), and announced only then. A sweep
-- may have given the job up and answered it, or handed it back and another worker answered it first.
-- KEYS[1] processing       the worker's processing list
-- KEYS[2] queue            the waiting jobs
-- KEYS[3] dead             the dead-letter list
-- KEYS[4] finished         the id of the worker's last acknowledged batch
-- KEYS[5 .. n+4]           the result key of each reply, in the order of the replies
-- KEYS[n+5 ..]             the pixels' keys of the batch's jobs that are done for good (answered, skipped as
--                          cancelled or late, dead-lettered: deleted after the dead-lettering moved these
--                          jobs' pixels into their entries); not those retried, which still need theirs
-- ARGV[1] ttl              seconds a result without its own ttl is kept
-- ARGV[2] batch_id         '<token>:<n>': the n-th batch of the Worker whose token (unique per instance) it is
-- ARGV[3] c                how many jobs the batch took from the head of the processing list (0: none)
-- ARGV[4] dead_max         the dead-letter list keeps this many jobs, dropping the oldest
-- ARGV[5] n                number of replies
-- ARGV[6] n_retry          number of jobs to retry
-- ARGV[7] pixels_prefix    the pixels' keys' prefix (Keys.pixels_prefix): a dead job's are prefix .. its id
-- ARGV[8] status_prefix    the status keys' prefix (Keys.status_prefix): an answered async job's status key,
--                          prefix .. its id, is deleted with the answer stored, so that once the answer expires
--                          the job is unknown (404) rather than 'running' again; a retried one's says queued
-- ARGV[9] finished_ttl     seconds the last acknowledged batch's id is kept: as long as a late copy may arrive
-- ARGV[10 .. c+9]          the batch's jobs as claimed, in the list's order (holds_batch compares them)
-- ARGV[c+10 .. c+5n+9]     n replies, five values each: channel ('' for none), job id, result JSON,
--                          seconds the result is kept ('0': ttl), with_result ('1': the job's notify_result)
-- The message published to a reply's channel is its job id, then for with_result a newline and the result
-- JSON as stored (jobs.parse_notification): the waiting request needs no read of the result key, which stays
-- for a request whose notification was lost (it polls). Without with_result (a web process of an earlier
-- version waits, and reads only a bare id), the job id alone.
-- then n_retry jobs to retry, then the jobs to dead-letter, two values each: the job as claimed, reason
-- (jobs.lua's bury() moves its pixels into its jobs.DeadLetter entry).
-- Returns {outcome, dead-lettered jobs dropped from the list}; outcome is 'done', 'duplicate' (this batch or a
-- later one of the worker's was acknowledged) or 'swept' (the batch is no longer at the head of the list: a sweep
-- handed it back meanwhile; replies of jobs with no answer yet are stored, nothing else changes: its jobs are back
-- in the queue, or answered).
local processing, queue, dead, finished = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ttl, batch_id, claimed = ARGV[1], ARGV[2], tonumber(ARGV[3])
local dead_max, n, n_retry, pixels_prefix = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local status_prefix, finished_ttl = ARGV[8], ARGV[9]
local first_reply = 10 + claimed
local first_retry = first_reply + 5 * n
local first_dead = first_retry + n_retry

-- Whether batch `id` is `last` or came before it, from the same Worker.
local function not_after(id, last)
  if not last then
    return false
  end
  if last == id then
    return true
  end
  local token, number = string.match(id, '^(.+):(%d+)$')
  local last_token, last_number = string.match(last, '^(.+):(%d+)$')
  return token ~= nil and token == last_token and tonumber(number) <= tonumber(last_number)
end

if not_after(batch_id, redis.call('GET', finished)) then
  return {'duplicate', 0}
end
local outcome = 'swept'
if holds_batch(processing, 10, claimed) then
  outcome = 'done'
  redis.call('LTRIM', processing, claimed, -1)
  redis.call('SET', finished, batch_id, 'EX', finished_ttl)
end
for i = 1, n do
  local at = first_reply + 5 * (i - 1)
  local channel, job_id, result, keep = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local with_result = ARGV[at + 4] == '1'
  if redis.call('SET', KEYS[i + 4], result, 'EX', keep ~= '0' and keep or ttl, 'NX') then
    forget_status(status_prefix, job_id)
    if channel ~= '' then
      redis.call('PUBLISH', channel, with_result and (job_id .. '\n' .. result) or job_id)
    end
  end
end
local dropped = 0
if outcome == 'done' then
  -- A swept batch is back in the queue already: its jobs must not be queued or dead-lettered twice, and they
  -- will be run again with their pixels.
  for i = first_dead - 1, first_retry, -1 do
    redis.call('LPUSH', queue, ARGV[i])
    mark_status(read_job(ARGV[i]), status_prefix, 'queued')
  end
  if first_dead <= #ARGV then
    for i = first_dead, #ARGV, 2 do
      bury(dead, ARGV[i], ARGV[i + 1], pixels_prefix)
    end
    dropped = trim_dead(dead, dead_max)
  end
  if #KEYS > n + 4 then
    redis.call('DEL', unpack(KEYS, n + 5))
  end
end
return {outcome, dropped}
