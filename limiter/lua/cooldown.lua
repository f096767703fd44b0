-- cooldown.lua: pause an API for every replica (what a provider's 429 asks).
--
-- KEYS[1]  cooldown STRING (limiter:{api}:cooldown)
-- ARGV[1]  duration, milliseconds (integer >= 1)
--
-- A cooldown only ever grows: a shorter one does not cut a longer one short.
-- Returns the milliseconds of cooldown now in force.

local ms = tonumber(ARGV[1])
local left = redis.call('PTTL', KEYS[1])
if left < ms then
  redis.call('SET', KEYS[1], '1', 'PX', ms)
  return ms
end
return left
