-- The terminal compare-and-set: the first terminal write wins.
-- KEYS[1] run hash, KEYS[2] event stream
-- ARGV[1] terminal record json, ARGV[2] terminal status, ARGV[3] terminal event json,
-- ARGV[4] retention ttl (s), ARGV[5] max events, ARGV[6] events channel,
-- ARGV[7] the notifying command (PUBLISH, or SPUBLISH on a cluster),
-- ARGV[8] the worker whose attempt this ends (optional): a worker whose run was
-- requeued and adopted elsewhere meanwhile (it was cut off past its lease) must not
-- end the attempt that now runs on another worker
-- Returns 1 when this finalization won (also when the same write is repeated after a
-- lost reply), 0 when another terminal state was already there, -1 when the run is
-- gone (the store may have been reset: the caller restores its runs and tries again).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return -1
end
if status ~= 'running' then
  if redis.call('HGET', KEYS[1], 'record') == ARGV[1] then
    return 1
  end
  return 0
end
if ARGV[8] and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[8] then
  return 0
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[3])
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'status', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
-- The notice carries the event, as append's does (see append.lua).
if string.len(ARGV[3]) <= 8192 then
  redis.call(ARGV[7], ARGV[6], id .. ' ' .. ARGV[3])
else
  redis.call(ARGV[7], ARGV[6], id)
end
return 1
