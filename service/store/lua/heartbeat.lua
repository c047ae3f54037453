-- Hold or renew a worker's lease, measured on the Redis server's clock (so replicas'
-- clocks need not agree).
-- KEYS[1] the workers sorted set (score: lease expiry in ms)
-- ARGV[1] worker id, ARGV[2] ttl in ms
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
return now_ms
