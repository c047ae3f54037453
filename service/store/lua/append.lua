-- Append progress events, in order, unless the run is terminal (or gone); idempotent
-- by sequence number. One call carries every event of a run that is waiting (a batch).
-- KEYS[1] run hash, KEYS[2] event stream
-- ARGV[1] max events, ARGV[2] events channel,
-- ARGV[3] the first event's sequence number within its run (1, 2, ...; the next
-- events have the numbers after it; 0: none),
-- ARGV[4] the notifying command (PUBLISH, or SPUBLISH on a cluster),
-- ARGV[5], ARGV[6], ... the events' json
-- An event whose sequence number is at or below the last one appended is a repeat (a
-- send that timed out on the client but landed): it is not appended again. When every
-- event is a repeat, the id of the last sequenced event is returned.
-- Returns the id of the last event appended, false when the run is terminal, -1 when
-- the run is gone (the store may have been reset: the caller restores its runs and
-- tries again).
-- One notification for the whole batch: "<id> <event json>" when the batch appended
-- one event of at most 8 KB (the event it announces, so a watcher need not read it
-- back), else "<id>" alone, the last id appended (a watcher reads up to it).
local state = redis.call('HMGET', KEYS[1], 'status', 'seq', 'seq_id')
if not state[1] then
  return -1
end
if state[1] ~= 'running' then
  return false
end
local first = tonumber(ARGV[3])
local last = tonumber(state[2] or '0')
local seq = first
local id = false
local appended = 0
local only = nil
for i = 5, #ARGV do
  if first == 0 or seq > last then
    local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'event', ARGV[i])
    if type(added) == 'table' and added.err then
      -- Refused midway: what was appended stays recorded (a retry does not repeat
      -- it), and the caller gets the error.
      if id then
        if first > 0 then
          redis.call('HSET', KEYS[1], 'seq', seq - 1, 'seq_id', id)
        end
        redis.call(ARGV[4], ARGV[2], id)
      end
      return added
    end
    id = added
    appended = appended + 1
    only = ARGV[i]
  end
  seq = seq + 1
end
if not id then
  return state[3]
end
if first > 0 then
  redis.call('HSET', KEYS[1], 'seq', seq - 1, 'seq_id', id)
end
if appended == 1 and string.len(only) <= 8192 then
  redis.call(ARGV[4], ARGV[2], id .. ' ' .. only)
else
  redis.call(ARGV[4], ARGV[2], id)
end
return id
