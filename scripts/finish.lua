-- Acknowledge a batch: store every result with its TTL, notify the waiting web process, dead-letter the
-- malformed jobs, then drop the processing list. Atomic, so a crash leaves either all of it or none.
-- KEYS[1] processing list, KEYS[2] dead-letter list, KEYS[3..n+2] result keys
-- ARGV[1] result TTL (s), ARGV[2] n, then n triples (channel or '', job id, result JSON), then raw jobs
-- to dead-letter.
local ttl, n = ARGV[1], tonumber(ARGV[2])
for i = 1, n do
  local channel, id, payload = ARGV[3 * i], ARGV[3 * i + 1], ARGV[3 * i + 2]
  redis.call('SET', KEYS[i + 2], payload, 'EX', ttl)
  if channel ~= '' then
    redis.call('PUBLISH', channel, id)
  end
end
for i = 3 * n + 3, #ARGV do
  redis.call('RPUSH', KEYS[2], ARGV[i])
end
redis.call('DEL', KEYS[1])
return n
