-- What the update and delete scripts share, prepended to each. KEYS: user, users set,
-- sessions, generation. ARGV: first the user prefix, last the admin's token's generation.
--
-- `stale`: Redis lost its data since the admin's token was issued, so the change is refused
-- as the token would be. `other_admin`: whether an active admin other than `self_key`'s user
-- exists: a change may never leave nobody able to manage users.
local function stale()
  return redis.call('GET', KEYS[4]) ~= ARGV[#ARGV]
end
local function other_admin(users, self_key, prefix)
  for _, name in ipairs(redis.call('SMEMBERS', users)) do
    local key = prefix .. name
    if key ~= self_key then
      local user = redis.call('HMGET', key, 'role', 'active')
      if user[1] == 'admin' and user[2] == '1' then
        return true
      end
    end
  end
  return false
end
