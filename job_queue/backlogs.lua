-- The images each web process has admitted and not yet prepared (its backlog), shared among the web processes: they
-- will be queued before a request admitted now by any of them, so each one's admission counts the others' as jobs
-- ahead. Records this process's count with Redis's time (one clock for every host), and returns what admission
-- also needs of the queue, in the same round trip.
-- KEYS[1] queue          the waiting jobs
-- KEYS[2] backlogs       HASH web process -> "count:ms" (Redis time of its last record)
-- ARGV[1] process        this web process's name
-- ARGV[2] count          its backlog now
-- ARGV[3] max_age        ms a record stands for: a process that stopped recording (idle, or gone) counts nothing
-- ARGV[4] forget_after   ms after which a record is deleted, and the whole hash when no process records any more
-- Returns {the queue's length, the other processes' backlogs together}.
local queue, backlogs = KEYS[1], KEYS[2]
local process, count = ARGV[1], tonumber(ARGV[2])
local max_age, forget_after = tonumber(ARGV[3]), tonumber(ARGV[4])

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('HSET', backlogs, process, count .. ':' .. now)
redis.call('PEXPIRE', backlogs, forget_after)
local others = 0
local records = redis.call('HGETALL', backlogs)
for i = 1, #records, 2 do
  if records[i] ~= process then
    local other, at = string.match(records[i + 1], '^(%d+):(%d+)$')
    local age = at and now - tonumber(at)
    -- A record from the future (Redis's clock stepped back, or a failover to a replica whose clock lags) would be
    -- counted until the clock caught up, and never deleted: it goes, and a live process records anew.
    if not age or age < 0 or age > forget_after then
      redis.call('HDEL', backlogs, records[i])
    elseif age <= max_age then
      others = others + tonumber(other)
    end
  end
end
return {redis.call('LLEN', queue), others}
