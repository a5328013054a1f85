-- Takes back one attempt's charge (a success, or an attempt that reached no verdict).
-- KEYS: as for guard_charge.lua. ARGV: how long the address stays known (0: not remembered).
-- A counter that has expired since the charge is left alone rather than recreated.
for i = 1, 3 do
  if redis.call('EXISTS', KEYS[i]) == 1 and redis.call('DECR', KEYS[i]) <= 0 then
    redis.call('DEL', KEYS[i])
  end
end
if tonumber(ARGV[1]) > 0 then
  redis.call('SET', KEYS[4], '1', 'EX', ARGV[1])
end
