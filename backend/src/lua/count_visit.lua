-- The token check of every protected route, and a visit counted if it passes.
-- KEYS: the user's live tokens, the user, the visit count, the generation. ARGV: the
-- token's jti and generation, then every role there is.
-- Returns what the pipelined check reads (generation, live, role, active) and the count
-- after this visit, counted only when the verdict (`admit` in accounts.rs) will let the token
-- through (generation current, token live, user active, role known): a refused token must
-- not count. Otherwise the count is nil.
local generation = redis.call('GET', KEYS[4])
local live = redis.call('ZSCORE', KEYS[1], ARGV[1]) and 1 or 0
local user = redis.call('HMGET', KEYS[2], 'role', 'active')
local known_role = false
for i = 3, #ARGV do
  known_role = known_role or user[1] == ARGV[i]
end
local visits = false
if generation == ARGV[2] and live == 1 and user[2] == '1' and known_role then
  visits = redis.call('INCR', KEYS[3])
end
return {generation, live, user[1], user[2], visits}
