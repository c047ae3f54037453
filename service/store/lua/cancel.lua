-- Flag a running run for cancellation and tell its owner.
-- KEYS[1] run hash
-- ARGV[1] run id, ARGV[2] prefix of the owners' cancel channels; empty on a cluster,
-- where the owner's channel lives in another slot: then nothing is published and
-- "requested:<owner>" is returned for the caller to notify the owner
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
local owner = redis.call('HGET', KEYS[1], 'worker')
if ARGV[2] == '' then
  return 'requested:' .. owner
end
redis.call('PUBLISH', ARGV[2] .. owner, ARGV[1])
return 'requested'
