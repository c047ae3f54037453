-- Persist a new run and its run_started event.
-- KEYS[1] run hash, KEYS[2] event stream
-- ARGV[1] record json, ARGV[2] worker id, ARGV[3] run_started event json,
-- ARGV[4] ttl (s), ARGV[5] max events, ARGV[6] events channel,
-- ARGV[7] the notifying command (PUBLISH, or SPUBLISH on a cluster)
-- Returns the event id; a repeated call (a retry after a lost reply) changes nothing.
if redis.call('HEXISTS', KEYS[1], 'record') == 1 then
  return redis.call('HGET', KEYS[1], 'started_id')
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[3])
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'status', 'running', 'worker', ARGV[2],
  'started_id', id)
if redis.call('HEXISTS', KEYS[1], 'fingerprint') == 1 then
  redis.call('HSET', KEYS[1], 'initial', ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call(ARGV[7], ARGV[6], id)
return id
