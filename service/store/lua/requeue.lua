-- Step one of a requeue, on the run alone: running → queued, with its run_requeued
-- event. (Step two, adding the run to a queue shard, is another slot: see
-- service/store/redis_queue.py.)
-- KEYS[1] run hash, KEYS[2] event stream
-- ARGV[1] queued record json, ARGV[2] the attempt that ended, ARGV[3] its worker,
-- ARGV[4] run_requeued event json, ARGV[5] ttl (s), ARGV[6] max events,
-- ARGV[7] events channel, ARGV[8] the notifying command (PUBLISH, or
-- SPUBLISH on a cluster)
-- Returns 1 when this requeue won (also when the same write is repeated after a lost
-- reply), 0 when the run is no longer that attempt running on that worker.
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' and redis.call('HGET', KEYS[1], 'record') == ARGV[1] then
  return 1
end
if status ~= 'running' then
  return 0
end
-- (the attempt is read from the record itself, so a run written back after a store
-- reset, or created by an older version, compares the same way)
local current = cjson.decode(redis.call('HGET', KEYS[1], 'record'))
if tostring(current['attempt'] or 1) ~= ARGV[2] then
  return 0
end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[3] then
  return 0
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'event', ARGV[4])
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'status', 'queued')
redis.call('HDEL', KEYS[1], 'cancel')
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call(ARGV[8], ARGV[7], id)
return 1
