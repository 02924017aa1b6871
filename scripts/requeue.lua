-- Put a worker's claimed jobs back at the head of the queue, in their original order. With ARGV[1] = '1'
-- this counts as a failed attempt (the worker died or the model failed); a job that reaches ARGV[2]
-- attempts goes to the dead-letter list instead, and is returned so its requester can be told.
-- KEYS[1] processing list, KEYS[2] queue, KEYS[3] dead-letter list.
local jobs = redis.call('LRANGE', KEYS[1], 0, -1)
local dead = {}
for i = #jobs, 1, -1 do
  local raw = jobs[i]
  local ok, job = pcall(cjson.decode, raw)
  if ok and type(job) == 'table' and ARGV[1] == '1' then
    job.attempts = (tonumber(job.attempts) or 0) + 1
    raw = cjson.encode(job)
  end
  if ok and type(job) == 'table' and (tonumber(job.attempts) or 0) >= tonumber(ARGV[2]) then
    redis.call('RPUSH', KEYS[3], raw)
    table.insert(dead, raw)
  else
    -- A job we cannot even parse goes back too: the worker that takes it dead-letters it with a reason.
    redis.call('LPUSH', KEYS[2], raw)
  end
end
redis.call('DEL', KEYS[1])
return dead
