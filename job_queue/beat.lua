-- Register a worker and refresh its heartbeat, unless it has left: a beat sent before the worker unregistered
-- and delivered after it (its reply timed out, the bytes were still on the way) must not bring back a stopped
-- worker, ready and counted by admission until its heartbeat expired.
-- KEYS[1] workers    the set of registered workers
-- KEYS[2] heartbeat  the worker's heartbeat hash
-- KEYS[3] left       the worker's mark, set when it unregistered (Keys.left), holding the run that left
-- ARGV[1] worker     the worker's name in the workers set
-- ARGV[2] ttl        seconds the heartbeat lives
-- ARGV[3] run        this process's run under the name: a mark another run left (a restart under the same
--                    name) is no bar, and goes, so that a sweep of this run counts attempts again
-- ARGV[4..]          the heartbeat hash's field, value pairs
-- Returns 1 when the worker is registered and its heartbeat refreshed, 0 when this run had left.
local workers, heartbeat, left = KEYS[1], KEYS[2], KEYS[3]
local worker, ttl, run = ARGV[1], ARGV[2], ARGV[3]
local mark = redis.call('GET', left)
if mark == run then
  return 0
elseif mark then
  redis.call('DEL', left)
end
redis.call('SADD', workers, worker)
redis.call('HSET', heartbeat, unpack(ARGV, 4))
redis.call('EXPIRE', heartbeat, ttl)
return 1
