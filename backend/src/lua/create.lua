-- KEYS: user, users set, generation. ARGV: name, hash, role, active, now, the admin's
-- token's generation. Returns 1 (created), 0 (exists) or -1 (Redis lost its data since the
-- token was issued: a user created now would keep the users file from being seeded).
if redis.call('GET', KEYS[3]) ~= ARGV[6] then
  return -1
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'hash', ARGV[2], 'role', ARGV[3], 'active', ARGV[4],
  'created', ARGV[5])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
