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
  local raw = redis.call('HGETALL', k)
  local out, longest, forever = {}, 0, false
  for i = 1, #raw, 2 do
    local w, till = string.match(raw[i + 1], '^(%S+) (%d+)$')
    till = tonumber(till)
    if till and (till == 0 or till > NOW) then
      out[#out + 1] = raw[i]
      out[#out + 1] = w
      if till == 0 then
        forever = true
        out[#out + 1] = -1
      else
        longest = math.max(longest, till - NOW)
        out[#out + 1] = math.ceil((till - NOW) / 1000)
      end
    else
      redis.call('HDEL', k, raw[i])
    end
  end
  if forever then
    redis.call('PERSIST', k)
  elseif longest > 0 then
    redis.call('PEXPIRE', k, math.ceil(longest / 1000))
  end
  return out
end
