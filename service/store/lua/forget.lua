-- Drop a lost worker's lease, unless it has been renewed meanwhile.
-- KEYS[1] the workers sorted set
-- ARGV[1] worker id
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if expiry and tonumber(expiry) <= now_ms then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
