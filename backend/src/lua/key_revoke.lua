-- Revokes an API key: its record goes, so the next request that presents it is refused.
-- KEYS: the key's record, the set of key ids, the names in use. ARGV: the id.
-- Returns the key's name, or false when there is no such key.
local name = redis.call('HGET', KEYS[1], 'name')
if not name then
  return false
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], name)
return name
