-- Creates an API key, on behalf of a session of a generation.
-- KEYS: the key's record, the set of key ids, the names in use (name -> id), the generation.
-- ARGV: id, name, role, the key's SHA-256, created (Unix seconds), the session's generation,
-- the most keys there may be, who made it.
-- Returns 'ok', 'stale' (Redis lost its data since the session was checked), 'exists' (the
-- name is taken), 'full', or 'taken' (the id is, so the caller draws another).
if redis.call('GET', KEYS[4]) ~= ARGV[6] then
  return 'stale'
end
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then
  return 'exists'
end
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[7]) then
  return 'full'
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 'taken'
end
redis.call('HSET', KEYS[1], 'name', ARGV[2], 'role', ARGV[3], 'hash', ARGV[4], 'created', ARGV[5],
  'created_by', ARGV[8])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[1])
return 'ok'
