-- Every API key, never its hash.
-- KEYS: the set of key ids. ARGV: the prefix of a key's record.
-- Returns {id, name, role, created, last_used or false} for each key that still has a record.
local rows = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = redis.call('HMGET', ARGV[1] .. id, 'name', 'role', 'created', 'last_used')
  if key[1] then
    table.insert(rows, {id, key[1], key[2], key[3], key[4]})
  end
end
return rows
