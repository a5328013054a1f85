-- KEYS: users set. ARGV: user key prefix. Returns name, role, active for each user.
local names = redis.call('SMEMBERS', KEYS[1])
table.sort(names)
local out = {}
for _, name in ipairs(names) do
  local user = redis.call('HMGET', ARGV[1] .. name, 'role', 'active')
  if user[1] then
    out[#out + 1] = {name, user[1], user[2] or '0'}
  end
end
return out
