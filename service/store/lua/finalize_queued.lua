-- The terminal compare-and-set of a run that waits in the queue (a cancel): no worker
-- runs it, so the canceller writes it. Its queue entry is dropped by whoever pops it.
-- KEYS[1] run hash, KEYS[2] event stream
-- ARGV[1] terminal record json, ARGV[2] terminal status, ARGV[3] terminal event json,
-- ARGV[4] retention ttl (s), ARGV[5] max events, ARGV[6] events channel, ARGV[7] the notifying command (PUBLISH, or
-- SPUBLISH on a cluster)
-- Returns 1 when this write won (also when repeated after a lost reply), else 0.
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' then
  if status and redis.call('HGET', KEYS[1], 'record') == ARGV[1] then
    return 1
  end
  return 0
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[3])
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'status', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call(ARGV[7], ARGV[6], id)
return 1
