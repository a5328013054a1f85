-- Revokes an API key: its record goes, so the next request that presents it is refused.
-- KEYS: the key's record, the set of key ids, the names in use. ARGV: the id.
-- Returns the key's name ('' for a record that had none), or false when there is no such key.
-- By id, whatever the record holds: a damaged one must still be removable.
local name = redis.call('HGET', KEYS[1], 'name')
local listed = redis.call('SREM', KEYS[2], ARGV[1]) == 1
if not name and not listed and redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
redis.call('DEL', KEYS[1])
if name and redis.call('HGET', KEYS[3], name) == ARGV[1] then
  redis.call('HDEL', KEYS[3], name)
end
return name or ''
