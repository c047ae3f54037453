-- Flag a running run for cancellation and tell its owner.
-- KEYS[1] run hash
-- ARGV[1] run id, ARGV[2] prefix of the owners' cancel channels
-- Returns "missing" | "already_cancelled" | "finished" | "queued" (no owner to tell:
-- the caller writes the cancel) | "requested"
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return 'missing'
end
if status == 'cancelled' then
  return 'already_cancelled'
end
if status == 'queued' then
  return 'queued'
end
if status ~= 'running' then
  return 'finished'
end
redis.call('HSET', KEYS[1], 'cancel', '1')
redis.call('PUBLISH', ARGV[2] .. redis.call('HGET', KEYS[1], 'worker'), ARGV[1])
return 'requested'
