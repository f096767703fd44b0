-- cooldown.lua: pause an API for every replica (what a provider's 429 asks).
--
-- KEYS: the API's keys (_common.lua); only K_STATE is touched. ARGV: the
-- call's own, then the API's configuration (limiter/_contract.py binds them):
--   MS  duration, milliseconds (integer >= 1)
--
-- A cooldown only ever grows: a shorter one does not cut a longer one short.
-- Returns the milliseconds of cooldown now in force.

load_state()
local ends = NOW + MS * 1000
if ends > ST.cooldown then
  ST.cooldown = ends
  set_state('cooldown', int(ends))
end
flush()
return math.ceil((ST.cooldown - NOW) / 1000)
