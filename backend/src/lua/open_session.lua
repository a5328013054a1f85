-- Records a new token, unless its user changed since the password was checked.
-- KEYS: user, sessions, generation. ARGV: verified hash, role, jti, now (ms), lifetime (ms:
-- the token's time to live plus the margin kept after `exp`), cap.
-- Drops expired entries, records the token scored by when it was issued, and past the cap
-- drops the oldest. Returns the generation ('' when refused) and how many were dropped.
local user = redis.call('HMGET', KEYS[1], 'hash', 'role', 'active')
if user[1] ~= ARGV[1] or user[2] ~= ARGV[2] or user[3] ~= '1' then
  return {'', 0}
end
local generation = redis.call('GET', KEYS[3])
if not generation then
  return {'', 0}
end
local now, lifetime, cap = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - lifetime))
redis.call('ZADD', KEYS[2], now, ARGV[3])
local over = redis.call('ZCARD', KEYS[2]) - cap
if over > 0 then
  redis.call('ZPOPMIN', KEYS[2], over)
else
  over = 0
end
redis.call('PEXPIRE', KEYS[2], lifetime)
return {generation, over}
