-- override.lua: set or clear an API's runtime limits (`limiter limits set|clear`).
--
-- KEYS: the API's keys (_common.lua); only K_STATE is touched (its o:* fields,
-- which every admission script applies in place of the configured limits).
-- ARGV: the call's own, then the API's configuration, then a tail
-- (limiter/_contract.py binds them):
--   TTL_MS             lifetime, milliseconds (0: until cleared)
--   ARGV[TAIL_AT ...]  field, value pairs to set ("max_concurrent",
--                      "w:<period us>", "tokens"); none: clear the override
--
-- One lifetime (o:until) covers the whole override, so a set may not change
-- what the fields already in force were given: without a lifetime onto an
-- override that ends (they would stay for ever), or with one onto an override
-- that does not (they would end). Such a set changes nothing and returns
-- {"ttl", milliseconds left}. An override whose lifetime ended is gone.
--
-- Returns the override as it now is (flat field, value list, names without
-- "o:") and its milliseconds left (-1: no end, -2: none).

OPS.override = function()
  refresh_now()

  -- The override's fields as stored, those of an ended one deleted.
  local function stored()
    local raw = redis.call('HGETALL', K_STATE)
    local names, flat = {}, {}
    for i = 1, #raw, 2 do
      local name = string.match(raw[i], '^o:(.*)$')
      if name then
        names[#names + 1] = raw[i]
        if name ~= 'until' then
          flat[#flat + 1] = name
          flat[#flat + 1] = raw[i + 1]
        end
      end
    end
    return names, flat
  end

  local function left()
    local u = OVERRIDE_UNTIL
    if u == nil then return -2 end
    if u == 0 then return -1 end
    return math.ceil((u - NOW) / 1000)
  end

  local names = stored()
  local ended = OVERRIDE_UNTIL and OVERRIDE_UNTIL > 0 and OVERRIDE_UNTIL <= NOW
  if #names > 0 and (ended or #ARGS < TAIL_AT) then
    redis.call('HDEL', K_STATE, unpack_list(names))
  end
  if ended or #ARGS < TAIL_AT then OVERRIDE_UNTIL = nil end
  if #ARGS < TAIL_AT then
    flush()
    return {{}, -2}
  end

  local l = left()
  if (TTL_MS == 0 and l > 0) or (TTL_MS > 0 and l == -1) then
    return {'ttl', l}
  end
  local set = {}
  for i = TAIL_AT, #ARGS, 2 do
    set[#set + 1] = 'o:' .. ARGS[i]
    set[#set + 1] = ARGS[i + 1]
  end
  OVERRIDE_UNTIL = (TTL_MS > 0) and (NOW + TTL_MS * 1000) or 0
  set[#set + 1] = 'o:until'
  set[#set + 1] = int(OVERRIDE_UNTIL)
  redis.call('HSET', K_STATE, unpack_list(set))
  flush()
  local _, flat = stored()
  return {flat, left()}
end
