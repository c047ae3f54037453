-- Claim a queued run for a worker, on the run alone: queued → running with the new
-- attempt's record and its run_started event. Whoever wins this owns the run; a
-- replica that loses it skips the run.
-- KEYS[1] run hash, KEYS[2] event stream
-- ARGV[1] running record json, ARGV[2] the attempt it was queued after,
-- ARGV[3] the new worker, ARGV[4] run_started event json, ARGV[5] ttl (s),
-- ARGV[6] max events, ARGV[7] events channel, ARGV[8] the notifying command (PUBLISH, or
-- SPUBLISH on a cluster)
-- Returns 1 when this claim won (also when repeated after a lost reply), else 0.
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'running' and redis.call('HGET', KEYS[1], 'record') == ARGV[1] then
  return 1
end
if status ~= 'queued' then
  return 0
end
-- (the attempt is read from the record itself, so a run written back after a store
-- reset, or created by an older version, compares the same way)
local current = cjson.decode(redis.call('HGET', KEYS[1], 'record'))
if tostring(current['attempt'] or 1) ~= ARGV[2] then
  return 0
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'event', ARGV[4])
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'status', 'running', 'worker', ARGV[3])
redis.call('HDEL', KEYS[1], 'cancel')
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call(ARGV[8], ARGV[7], id)
return 1
