-- Claim a run id derived from an idempotency key.
-- KEYS[1] run hash
-- ARGV[1] request fingerprint, ARGV[2] claim ttl (s), ARGV[3] a token unique to the request
-- Returns {"claimed"} | {"mismatch"} | {"pending"} | {"replay", initial_record_json}
local fingerprint = redis.call('HGET', KEYS[1], 'fingerprint')
if not fingerprint then
  -- A run written back after a store reset has lost its claim: the key still
  -- names that run (never a second one).
  local restored = redis.call('HGET', KEYS[1], 'record')
  if restored then
    return {'replay', restored}
  end
  redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'token', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {'claimed'}
end
if fingerprint ~= ARGV[1] then
  return {'mismatch'}
end
local initial = redis.call('HGET', KEYS[1], 'initial')
if initial then
  return {'replay', initial}
end
-- The same request again (a retry after a lost reply) still holds its claim.
if redis.call('HGET', KEYS[1], 'token') == ARGV[3] then
  return {'claimed'}
end
return {'pending'}
