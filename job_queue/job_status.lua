-- An async job's state for GET /jobs/<id>, in one step: its answer when it has one; else its status, unless it
-- still waits in the queue past its deadline (no worker has claimed it: claim.lua sets 'running' in the step that
-- claims it, so a job a worker holds is never taken for one), which gets the 504 a worker claiming it would give,
-- stored as that worker would store it, its status going with it. Found by review: such a job said 'queued' past
-- its deadline, then 404 once its status expired, then 504 once a worker came.
-- KEYS[1] result     the job's result key
-- KEYS[2] status     its status key
-- KEYS[3] deadline   its deadline key (Keys.job_deadline), absent for a job queued by an earlier version
-- ARGV[1] late       the 504 answer's JSON (jobs.error_result with jobs.LATE)
-- ARGV[2] ttl        seconds the 504 is kept (JOB_RESULT_TTL)
-- Returns {the answer or false, the status or false}.
local result, status, deadline = KEYS[1], KEYS[2], KEYS[3]
local late, ttl = ARGV[1], ARGV[2]

local answer = redis.call('GET', result)
if answer then
  return {answer, false}
end
local state = redis.call('GET', status)
local due = tonumber(redis.call('GET', deadline))
if state == 'queued' and due and due < redis_now() then
  redis.call('SET', result, late, 'EX', ttl)
  redis.call('DEL', status, deadline)
  return {late, false}
end
return {false, state}
