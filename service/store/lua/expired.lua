-- Workers whose lease has expired, on the Redis server's clock; a bounded batch.
-- KEYS[1] the workers sorted set
-- ARGV[1] the most to return
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
