-- Remove a run whose create reached Redis after its caller had been refused (503):
-- for the client it was never created, so it must not exist (nor hold its
-- idempotency key). Only that exact, untouched record is removed.
-- KEYS[1] run hash, KEYS[2] event stream
-- ARGV[1] the record json the create wrote
if redis.call('HGET', KEYS[1], 'record') == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
