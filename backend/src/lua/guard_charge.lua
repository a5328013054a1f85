-- Charges one login attempt, or refuses it.
-- KEYS: the name-and-address counter, the address counter, the name counter, the name's
-- known-address marker. ARGV: window, then the limits of the three counters in that order.
-- Returns {0, 0} when the attempt may go ahead (and is counted in all three), otherwise
-- {seconds to wait, 1-based index of the counter at its limit}: of several, the one that
-- lasts longest. The name's ceiling is not checked for a known address, but the attempt is
-- still counted in it.
local known = redis.call('EXISTS', KEYS[4]) == 1
local wait, which = 0, 0
for i = 1, 3 do
  if not (i == 3 and known) then
    local failures = tonumber(redis.call('GET', KEYS[i]) or '0')
    if failures >= tonumber(ARGV[i + 1]) then
      local ttl = math.max(redis.call('TTL', KEYS[i]), 1)
      if ttl > wait then
        wait, which = ttl, i
      end
    end
  end
end
if wait > 0 then
  return {wait, which}
end
for i = 1, 3 do
  if redis.call('INCR', KEYS[i]) == 1 then
    redis.call('EXPIRE', KEYS[i], ARGV[1])
  end
end
return {0, 0}
