-- The check of an X-API-Key, charged to the login guard like a password, and a visit counted
-- if it passes and one was asked for.
-- KEYS: the key's record, the guard's key-and-address counter, its address counter, the
-- generation, the visit count. ARGV: the SHA-256 of the key presented, now (Unix seconds),
-- `1` to count a visit, the guard's window, then its limits for the two counters, then every
-- role there is.
-- Returns {'throttled', seconds to wait, 1-based counter}, {'refused'} (the failure counted in
-- both counters), or {'ok', name, role, generation, visits or false}. `last_used` is kept to
-- the minute.
-- The limits are checked before the key, in the same script: parallel guesses cannot slip
-- past a count, and a client past its limit learns nothing of a key.
local wait, which = 0, 0
for i = 2, 3 do
  local failures = tonumber(redis.call('GET', KEYS[i]) or '0')
  if failures >= tonumber(ARGV[i + 3]) then
    local ttl = math.max(redis.call('TTL', KEYS[i]), 1)
    if ttl > wait then
      wait, which = ttl, i - 1
    end
  end
end
if wait > 0 then
  return {'throttled', wait, which}
end
local key = redis.call('HMGET', KEYS[1], 'hash', 'name', 'role', 'last_used')
-- A record without its name or a known role (damaged, or written by hand) is no key.
local known_role = false
for i = 7, #ARGV do
  known_role = known_role or key[3] == ARGV[i]
end
if key[1] ~= ARGV[1] or not key[2] or not known_role then
  for i = 2, 3 do
    if redis.call('INCR', KEYS[i]) == 1 then
      redis.call('EXPIRE', KEYS[i], ARGV[4])
    end
  end
  return {'refused'}
end
-- Written at most once a minute: a busy key would otherwise cost a write per request.
if not key[4] or tonumber(ARGV[2]) - (tonumber(key[4]) or 0) >= 60 then
  redis.call('HSET', KEYS[1], 'last_used', ARGV[2])
end
local visits = false
if ARGV[3] == '1' then
  visits = redis.call('INCR', KEYS[5])
end
return {'ok', key[2], key[3], redis.call('GET', KEYS[4]) or '', visits}
