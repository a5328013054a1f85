-- Every API key, never its hash.
-- KEYS: the set of key ids. ARGV: the prefix of a key's record.
-- Returns {id, name, role, created, last_used or false, created_by or false} for each key
-- whose record has its name and role (a damaged record is left out of the list, and still
-- counted and revocable by id).
local rows = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = redis.call('HMGET', ARGV[1] .. id, 'name', 'role', 'created', 'last_used', 'created_by')
  if key[1] and key[2] then
    -- Numbers as numbers, or false: a damaged field must not fail the whole list.
    table.insert(rows, {id, key[1], key[2], tonumber(key[3]) or 0, tonumber(key[4]) or false,
      key[5] or false})
  end
end
return rows
