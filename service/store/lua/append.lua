-- Append a progress event unless the run is terminal (or gone); idempotent by sequence.
-- KEYS[1] run hash, KEYS[2] event stream
-- ARGV[1] event json, ARGV[2] max events, ARGV[3] events channel,
-- ARGV[4] the event's sequence number within its run (1, 2, ...; 0: none),
-- ARGV[5] the notifying command (PUBLISH, or SPUBLISH on a cluster)
-- The notice is "<id> <event json>" (the event it announces, so a watcher need not
-- read it back), or "<id>" alone for an event over 8 KB.
-- A sequence number at or below the last one appended is a repeat (its first send
-- timed out on the client but landed): nothing is appended, and the id of the last
-- sequenced event is returned.
-- Returns the event id, false when the run is terminal, -1 when the run is gone (the
-- store may have been reset: the caller restores its runs and tries again).
local state = redis.call('HMGET', KEYS[1], 'status', 'seq', 'seq_id')
if not state[1] then
  return -1
end
if state[1] ~= 'running' then
  return false
end
local seq = tonumber(ARGV[4])
if seq > 0 and state[2] and seq <= tonumber(state[2]) then
  return state[3]
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'event', ARGV[1])
if seq > 0 then
  redis.call('HSET', KEYS[1], 'seq', seq, 'seq_id', id)
end
if string.len(ARGV[1]) <= 8192 then
  redis.call(ARGV[5], ARGV[3], id .. ' ' .. ARGV[1])
else
  redis.call(ARGV[5], ARGV[3], id)
end
return id
