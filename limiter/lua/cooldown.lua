-- cooldown.lua: pause an API for every replica (what a provider's 429 asks).
--
-- KEYS: the API's keys (_common.lua); only K_STATE is touched. ARGV: the
-- call's own, then the API's configuration (limiter/_contract.py binds them):
--   MS  duration, milliseconds (integer >= 1)
--
-- A cooldown only ever grows: a shorter one does not cut a longer one short.
-- Returns the milliseconds of cooldown now in force.

OPS.cooldown = function()
  refresh_now()
  local ends = NOW + MS * 1000
  if ends > COOLDOWN then
    COOLDOWN = ends
    set_state('cooldown', int(ends))
  end
  flush()
  return math.ceil((COOLDOWN - NOW) / 1000)
end
