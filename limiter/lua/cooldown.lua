-- cooldown.lua: pause an API for every replica (what a provider's 429 asks).
--
-- KEYS: the API's keys (_common.lua); only K_STATE is touched. ARGV: the
-- call's own, then the API's configuration (limiter/_contract.py binds them):
--   MS     duration, milliseconds (integer >= 1)
--   SCOPE  "" for the API as a whole, else the id of one of its limit sets
--          ("d:<deployment>", "m:<model>", "d:<deployment>:m:<model>"): only
--          admissions through that set wait (see "Limit sets" in _common.lua).
--          An id the API lacks pauses nothing and returns 0.
--
-- A cooldown only ever grows: a shorter one does not cut a longer one short.
-- Returns the milliseconds of cooldown now in force.

OPS.cooldown = function()
  if SCOPE ~= '' then
    local s = SETS and set_of(SCOPE)
    if not s then return 0 end
    use(s)
  end
  refresh_now()
  local ends = NOW + MS * 1000
  if ends > COOLDOWN then
    COOLDOWN = ends
    set_state(FP .. 'cooldown', int(ends))
  end
  local left = math.ceil((COOLDOWN - NOW) / 1000)
  flush()
  return left
end
