-- Seeds the users, or makes the generation marker only.
-- KEYS: generation, users set, then one user key per user.
-- ARGV: a fresh generation, now, then name, hash, role per user.
-- Returns the generation, how many users were copied in, and how many Redis had.
-- Seeds whenever Redis has no users and there are users to seed, under the fresh generation
-- (whatever was there: no token of before may outlive its user's record); otherwise only
-- makes the generation if there is none.
local generation = redis.call('GET', KEYS[1])
local had = redis.call('SCARD', KEYS[2])
if had > 0 or #KEYS == 2 then
  if generation then
    return {generation, 0, had}
  end
  redis.call('SET', KEYS[1], ARGV[1])
  return {ARGV[1], 0, had}
end
for i = 3, #KEYS do
  local a = 3 + (i - 3) * 3
  -- A record that outlived the set of names (an eviction) keeps its password and state.
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('HSET', KEYS[i], 'hash', ARGV[a + 1], 'role', ARGV[a + 2], 'active', '1',
      'created', ARGV[2])
  end
  redis.call('SADD', KEYS[2], ARGV[a])
end
redis.call('SET', KEYS[1], ARGV[1])
return {ARGV[1], #KEYS - 2, had}
