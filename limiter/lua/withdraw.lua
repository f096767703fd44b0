-- withdraw.lua: take a waiter's ticket out of the queue (it timed out or was
-- cancelled), and give back a slot that was handed to it meanwhile.
--
-- KEYS: the API's keys (_common.lua). ARGV: the call's own, then the API's
-- configuration (limiter/_contract.py binds both to the names used here):
--   SLOT    the waiter's slot id
--   TICKET  its ticket (the format: _common.lua)
--
-- A slot handed to the waiter (or admitted by a call whose caller gave up on
-- its answer) never ran: its lease goes, and its hits in every window, tokens
-- included, are taken back, in the API's limit sets too (its model's, and every
-- deployment's: which one took it is not known here). Nothing is counted in the
-- totals.
--
-- Returns {held, woken}: held is 1 when such a slot was found and freed;
-- woken is how many waiters the freed room admitted.

OPS.withdraw = function()
  contended()
  drop_ticket(TICKET)
  local held = 0
  if lease_of(SLOT) then
    held = 1
    local _, cost, all, _, _, _, model, inp, outp = parse_ticket(TICKET)
    -- Take the slot's lease and entries out of the current set's keys.
    local function take_back(tokens)
      if HOLD then redis.call('ZREM', K_HOLDERS, SLOT) end
      for kind, n in pairs({r = cost, t = tokens}) do
        local longest = (kind == 'r') and LONGEST_R or LONGEST_T
        local log = longest and longest.log
        if log and n > 0 then
          measure(kind)
          local member = SLOT .. '|' .. int(n)
          local at = tonumber(redis.call('ZSCORE', log, member))
          if at then
            redis.call('ZREM', log, member)
            remove_weight(kind, n, at)
          end
        end
      end
    end
    take_back(all)
    if SETS then
      local sets = sets_of(nil, model)
      for _, dep in ipairs(DEPS or {}) do
        append_sets(sets, group_ids(dep, nil))
        if model ~= '' then append_sets(sets, group_ids(dep, model)) end
      end
      for _, s in ipairs(sets) do
        use(s)
        take_back(weight_in(s, all, inp, outp))
      end
      use(API_SET)
    end
  end
  redis.call('HDEL', K_HANDED, SLOT)
  if LONGEST_T then redis.call('HDEL', fair_key('charged'), SLOT) end

  local woken = move_queue()
  flush()
  return {held, woken}
end
