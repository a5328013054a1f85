-- KEYS: user, users set, sessions, generation. ARGV: user prefix, role, hash, active ('' =
-- unchanged), generation of the admin's token.
-- Any change deletes the user's live tokens: at most the cap of them, so bounded work, and
-- `UNLINK` frees a large set off Redis's main thread.
if stale() then
  return {'stale'}
end
local current = redis.call('HMGET', KEYS[1], 'role', 'active')
if not current[1] then
  return {'missing'}
end
local role = ARGV[2] ~= '' and ARGV[2] or current[1]
local active = ARGV[4] ~= '' and ARGV[4] or current[2]
local was_admin = current[1] == 'admin' and current[2] == '1'
if was_admin and not (role == 'admin' and active == '1')
    and not other_admin(KEYS[2], KEYS[1], ARGV[1]) then
  return {'last_admin'}
end
if role ~= current[1] or active ~= current[2] or ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'role', role, 'active', active)
  if ARGV[3] ~= '' then
    redis.call('HSET', KEYS[1], 'hash', ARGV[3])
  end
  redis.call('UNLINK', KEYS[3])
end
return {'ok', role, active}
