-- Push a job unless the queue is full, in one step so that concurrent web processes cannot overshoot.
-- KEYS[1] queue; ARGV[1] max length; ARGV[2] job JSON. Returns the new length, or -1 when full.
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  return -1
end
return redis.call('RPUSH', KEYS[1], ARGV[2])
