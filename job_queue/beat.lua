-- Register a worker and refresh its heartbeat, unless it has left: a beat sent before the worker unregistered
-- and delivered after it (its reply timed out, the bytes were still on the way) must not bring back a stopped
-- worker, ready and counted by admission until its heartbeat expired.
-- KEYS[1] workers    the set of registered workers
-- KEYS[2] heartbeat  the worker's heartbeat hash
-- KEYS[3] left       the worker's mark, set when it left (requeue.lua, mode 'leave')
-- ARGV[1] worker     the worker's name in the workers set
-- ARGV[2] ttl        seconds the heartbeat lives
-- ARGV[3..]          the heartbeat hash's field, value pairs
-- Returns 1 when the worker is registered and its heartbeat refreshed, 0 when it had left.
local workers, heartbeat, left = KEYS[1], KEYS[2], KEYS[3]
local worker, ttl = ARGV[1], ARGV[2]
if redis.call('EXISTS', left) == 1 then
  return 0
end
redis.call('SADD', workers, worker)
redis.call('HSET', heartbeat, unpack(ARGV, 3))
redis.call('EXPIRE', heartbeat, ttl)
return 1
