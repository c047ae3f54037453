-- Release an idempotency claim whose create was refused; a created run is kept.
-- KEYS[1] run hash
if redis.call('HEXISTS', KEYS[1], 'record') == 0 then
  redis.call('DEL', KEYS[1])
end
return 1
