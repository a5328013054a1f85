-- KEYS: user, users set, sessions, generation. ARGV: user prefix, name, generation of the
-- admin's token.
if stale() then
  return 'stale'
end
local current = redis.call('HMGET', KEYS[1], 'role', 'active')
if not current[1] then
  return 'missing'
end
if current[1] == 'admin' and current[2] == '1'
    and not other_admin(KEYS[2], KEYS[1], ARGV[1]) then
  return 'last_admin'
end
redis.call('UNLINK', KEYS[3])
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 'deleted'
