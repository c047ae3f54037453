-- Release an idempotency claim whose create was refused; a created run is kept, and
-- only the request that holds the claim may release it.
-- KEYS[1] run hash
-- ARGV[1] the claiming request's token
if redis.call('HEXISTS', KEYS[1], 'record') == 0
   and redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
