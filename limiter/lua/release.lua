-- release.lua: free a held slot, reconcile its tokens, count the outcome, and
-- hand freed room to the head of the queue.
--
-- KEYS: the API's keys (_common.lua). ARGV: the call's own, then the API's
-- configuration (limiter/_contract.py binds both to the names used here):
--   SLOT         slot id
--   OUTCOME      0 none (a slot that never ran: not counted), 1 success,
--                2 failure (counted in the totals)
--   ADMITTED_AT  admission time, microseconds (Redis TIME returned by acquire);
--                the response time counted is now - admission
--   RESERVED     tokens reserved at admission (integer >= 0)
--   ACTUAL       tokens really used, or -1 when not reported; the token window
--                entry is corrected to this (over-estimates come back,
--                under-estimates are charged)
--   HANDED       1 when the slot was handed over by another call's drain (its
--                admission time may still be kept in `handed`), else 0
--   FAIR         "1" for a slot admitted through the fair queue, else "": with
--                a token budget, the service charged to its tenant (kept in
--                `charged`) is corrected from the reserved tokens to the tokens
--                used (correct_charge in _common.lua)
--   DEPLOYMENT   the deployment the slot was admitted to ("" when none)
--   MODEL        the model it asked for ("" when none): the slot is released
--                and its tokens reconciled in those limit sets too
--   RESERVED_IN, ACTUAL_IN, RESERVED_OUT, ACTUAL_OUT  the same as RESERVED and
--                ACTUAL for the input and output budgets ("#in", "#out" sets)
--
-- Returns {held, woken}: held is 1 when the slot's lease was there and is now
-- released, 0 when it was already gone (expired or lost: the caller raises
-- LeaseLost); woken is how many waiters this release admitted. When it woke
-- nobody, held alone (a bare integer: the common reply). The waiter left at
-- the head of the queue is told how long it must still wait.

-- A lease that expired counts as lost even when no script pruned it yet.

-- Correct the token window entry of the current set (the API's, or one of its
-- limit sets) from the tokens reserved to those used.
local function reconcile(reserved, actual)
  if actual >= 0 and actual ~= reserved and LONGEST_T then
    measure('t')
    local member = SLOT .. '|' .. int(reserved)
    local at = reserved > 0 and tonumber(redis.call('ZSCORE', K_TOKENS, member))
    if at and at <= LONGEST_T.cut then at = nil end -- left the window, not trimmed yet
    if at then
      -- The reservation is still in the window: replace it by what was used.
      redis.call('ZREM', K_TOKENS, member)
      contended()
      remove_weight('t', reserved, at)
      if actual > 0 then
        redis.call('ZADD', K_TOKENS, int(at), SLOT .. '|' .. int(actual))
        add_weight('t', actual, at)
      end
    elseif actual > reserved then
      -- Nothing reserved, or the reservation already left the window: charge
      -- the excess now.
      redis.call('ZADD', K_TOKENS, int(NOW), SLOT .. '+|' .. int(actual - reserved))
      add_weight('t', actual - reserved)
    end
    redis.call('PEXPIRE', K_TOKENS, ttl_arg(LONGEST_T.period))
    -- The correction may have emptied the log (Redis then drops the key): an
    -- admission made by this call must give it a TTL again.
    if actual == 0 then FRESH_T = redis.call('EXISTS', K_TOKENS) == 0 end
  end
end

OPS.release = function()
  local lease = redis.call('ZSCORE', K_HOLDERS, SLOT)
  local held = 0
  if lease then
    redis.call('ZREM', K_HOLDERS, SLOT)
    if tonumber(lease) > NOW then held = 1 end
  end
  if HANDED == 1 then redis.call('HDEL', K_HANDED, SLOT) end
  reconcile(RESERVED, ACTUAL)
  if SETS then
    for _, s in ipairs(sets_of(DEPLOYMENT, MODEL)) do
      use(s)
      if HOLD then redis.call('ZREM', K_HOLDERS, SLOT) end
      if s[21] == 'in' then
        reconcile(RESERVED_IN, ACTUAL_IN)
      elseif s[21] == 'out' then
        reconcile(RESERVED_OUT, ACTUAL_OUT)
      else
        reconcile(RESERVED, ACTUAL)
      end
    end
    use(API_SET)
  end

  if FAIR ~= '' and LONGEST_T then
    contended()
    if ACTUAL >= 0 and ACTUAL ~= RESERVED then
      correct_charge(SLOT, RESERVED, ACTUAL)
    else
      redis.call('HDEL', fair_key('charged'), SLOT)
    end
  end

  if OUTCOME == 1 or OUTCOME == 2 then
    count(OUTCOME == 1 and 'successful_requests' or 'failed_requests', 1)
    if ADMITTED_AT > 0 and NOW > ADMITTED_AT then
      count('response_time_us', NOW - ADMITTED_AT)
    end
  end

  local woken = move_queue()
  flush()
  if woken == 0 then return held end
  return {held, woken}
end
