-- The store's generation marker: written once (no TTL) into an empty store, read
-- ever after. A marker that vanished or changed means the data went with it (an
-- empty restart, FLUSHALL, eviction).
-- KEYS[1] the marker
-- ARGV[1] a new generation id, used only when there is no marker
-- Returns the generation now in the store.
local current = redis.call('GET', KEYS[1])
if current then
  return current
end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
