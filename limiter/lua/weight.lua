-- weight.lua: set or clear one tenant's weight at run time, for every replica
-- (Limiter.set_tenant_weight, `limiter tenants set`).
--
-- KEYS: the API's keys (_common.lua). ARGV: the call's own, then the API's
-- configuration (limiter/_contract.py binds both to the names used here):
--   TENANT  the tenant ("" is the tenant of requests that name none)
--   WEIGHT  its weight (a positive finite number, as text), or "" to clear it
--           (the configured weight applies again)
--   TTL_MS  how long it lasts, milliseconds (0: until cleared)
--
-- The weights live in the hash "<prefix>weights": tenant -> "<weight> <until
-- us>" (0: no end). The hash lives as long as its longest weight; expired ones
-- are dropped here. A new weight counts from the next admission the queue makes.
--
-- Returns the weights in force: a flat tenant, weight, ms left (-1: no end) list.

OPS.weight = function()
  local k = pfx() .. 'weights'
  if WEIGHT == '' then
    redis.call('HDEL', k, TENANT)
  else
    local till = 0
    if TTL_MS > 0 then till = NOW + TTL_MS * 1000 end
    redis.call('HSET', k, TENANT, WEIGHT .. ' ' .. int(till))
  end
  contended()
  local out, longest = weights_in_force(true)
  if longest == -1 then
    redis.call('PERSIST', k)
  elseif longest > 0 then
    redis.call('PEXPIRE', k, math.ceil(longest / 1000))
  end
  return out
end
