-- learn.lua: limits a provider reported in its own response headers, for every
-- replica (Limiter.learn_limits; LimitedTransport calls it for an API with
-- APILimits.learn_from_headers).
--
-- KEYS: the API's keys (_common.lua); only K_STATE is written: "p:<window id>",
-- one learned limit per window, and "p:until", when all of them lapse unless a
-- provider reports them again. ARGV: the call's own, then the API's configuration,
-- then a tail (limiter/_contract.py binds them):
--   TTL_MS             how long the limits reported now stand, milliseconds (> 0)
--   SCOPE              "" for the API's own limits, else the id of one of its limit
--                      sets ("d:<deployment>", "m:<model>", ...): its windows learn,
--                      in its fields of the state hash ("<id>:p:<window id>"); an id
--                      the API lacks learns nothing
--   ARGV[TAIL_AT ...]  window id, limit pairs: the provider's limit for that window
--                      ("w:<period us>" or "tokens"; an integer >= 1). A limit below
--                      the configured one is learned; one at or above it clears what
--                      was learned for that window. An id the API lacks, or a limit
--                      that is not an integer >= 1, is ignored. A pair
--                      "remaining:<window id>", n says the provider has n left: when
--                      that is less than the room the window has (limit in force -
--                      used: other clients on the same key spend it too), the
--                      difference is recorded now, as one entry of that weight in the
--                      window's log, so that the window leaves exactly n.
--
-- A learned limit only ever lowers: an admission applies the least of the limit in
-- force (configured or overridden) and the learned one. Every call that learns
-- something renews p:until for every learned limit still standing.
--
-- Returns {learned (flat window id, limit list), ms left (-2: nothing learned)}.

OPS.learn = function()
  if SCOPE ~= '' then
    local s = SETS and set_of(SCOPE)
    if not s then return {{}, -2} end
    use(s)
  end
  refresh_now() -- the state hash's TTL is set again at flush()
  local set, drop, remaining = {}, {}, {}
  for i = TAIL_AT, #ARGS - 1, 2 do
    local id, limit = ARGS[i], tonumber(ARGS[i + 1])
    local left = string.match(id, '^remaining:(.*)$')
    if left and limit and limit >= 0 and limit == math.floor(limit) then
      remaining[left] = limit
    end
    for _, spec in ipairs(SPEC) do
      if spec.id == id and limit and limit >= 1 and limit == math.floor(limit) then
        if limit < spec.limit then
          set[#set + 1] = FP .. 'p:' .. id
          set[#set + 1] = int(limit)
        else
          drop[#drop + 1] = FP .. 'p:' .. id
        end
      end
    end
  end
  if #drop > 0 then redis.call('HDEL', K_STATE, unpack_list(drop)) end
  -- (a limit that rose may let waiters in now: the queue moves below)
  if #set > 0 then
    set[#set + 1] = FP .. 'p:until'
    set[#set + 1] = int(NOW + TTL_MS * 1000)
    redis.call('HSET', K_STATE, unpack_list(set))
  end

  -- The provider has less left than a window's room: record the difference now (it
  -- counts in every window of that log and leaves them as an admission would). The
  -- room is taken with the limits in force now, those just learned included.
  if next(remaining) then
    W, LONGEST_R, LONGEST_T = windows_of(SPEC, NREQ, K_REQUESTS, K_TOKENS)
    LOADED = false
    load_state()
    REFRESH_AT = nil -- refresh_now() asked flush() for every TTL; keep it so
  end
  for _, w in ipairs(W) do
    local left = remaining[w.id]
    if left then
      measure(w.kind)
      local over = (w.limit - w.used) - left
      if over > 0 then
        local longest = (w.kind == 'r') and LONGEST_R or LONGEST_T
        local fresh = (w.kind == 'r') and FRESH_R or FRESH_T
        log_entry(longest, 'provider.' .. NOW_S, over, fresh)
        if w.kind == 'r' then FRESH_R = false else FRESH_T = false end
      end
    end
  end

  -- What stands now (a lapsed p:until stands for nothing; its fields are dropped).
  local fields = {FP .. 'p:until'}
  for _, spec in ipairs(SPEC) do fields[#fields + 1] = FP .. 'p:' .. spec.id end
  local v = redis.call('HMGET', K_STATE, unpack_list(fields))
  local untl = tonumber(v[1])
  local flat, gone = {}, {}
  for i = 2, #fields do
    if v[i] then
      if untl and untl > NOW then
        flat[#flat + 1] = string.sub(fields[i], #FP + 3)
        flat[#flat + 1] = v[i]
      else
        gone[#gone + 1] = fields[i]
      end
    end
  end
  if #flat == 0 and v[1] then gone[#gone + 1] = fields[1] end
  if #gone > 0 then redis.call('HDEL', K_STATE, unpack_list(gone)) end
  if CUR then use(API_SET) end
  if #drop > 0 then move_queue() end

  flush()
  if #flat == 0 then return {flat, -2} end
  return {flat, math.ceil((untl - NOW) / 1000)}
end
