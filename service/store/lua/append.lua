-- Append a progress event unless the run is terminal (or gone).
-- KEYS[1] run hash, KEYS[2] event stream
-- ARGV[1] event json, ARGV[2] max events, ARGV[3] events channel
-- Returns the event id, false when the run is terminal, -1 when the run is gone (the
-- store may have been reset: the caller restores its runs and tries again).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return -1
end
if status ~= 'running' then
  return false
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'event', ARGV[1])
redis.call('PUBLISH', ARGV[3], id)
return id
