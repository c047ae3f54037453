-- Take or renew the lease of the one replica that exports the queue's length.
-- KEYS[1] the lease key
-- ARGV[1] worker id, ARGV[2] ttl (ms)
-- Returns 1 when the caller holds the lease now, else 0.
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
