-- release.lua: free a slot (or withdraw a waiting ticket), reconcile its
-- tokens, count the outcome, and hand freed room to the head of the queue.
--
-- KEYS and ARGV[1]: see _common.lua.
-- Operation ARGV:
--   ARGV[2]  slot id
--   ARGV[3]  ticket "<slot id>|<cost>|<tokens>" to withdraw from the queue
--            (a waiter that timed out or was cancelled), or ""; when that
--            waiter's slot had already been admitted, its window hits are
--            taken back (it never ran)
--   ARGV[4]  outcome: 0 none (cancelled, not counted), 1 success, 2 failure
--   ARGV[5]  admission time, microseconds (Redis TIME returned by acquire);
--            the response time counted is now - admission
--   ARGV[6]  tokens reserved at admission (integer >= 0)
--   ARGV[7]  tokens really used, or -1 when not reported; the token window
--            entry is corrected to this (over-estimates come back,
--            under-estimates are charged)
--   ARGV[8]  "1" when the slot was handed over by another call's drain (its
--            admission time may still be kept in `handed`), else "0"
--
-- Returns {held, woken}: held is 1 when the slot's lease was there and is now
-- released, 0 when it was already gone (expired or lost: the caller raises
-- LeaseLost); woken is how many waiters this release admitted. The waiter
-- left at the head of the queue is told how long it must still wait.

local SLOT = ARGV[2]
local TICKET = ARGV[3]
local OUTCOME = tonumber(ARGV[4])
local ADMITTED_AT = tonumber(ARGV[5])
local RESERVED = tonumber(ARGV[6])
local ACTUAL = tonumber(ARGV[7])
local HANDED = ARGV[8] == '1'

if TICKET ~= '' then
  redis.call('ZREM', K_QUEUE, TICKET)
  redis.call('ZREM', K_QEXP, TICKET)
end

-- A lease that expired counts as lost even when no script pruned it yet.
local lease = redis.call('ZSCORE', K_HOLDERS, SLOT)
local held = 0
if lease then
  redis.call('ZREM', K_HOLDERS, SLOT)
  if tonumber(lease) > NOW then held = 1 end
end
if HANDED or TICKET ~= '' then redis.call('HDEL', K_HANDED, SLOT) end

if TICKET ~= '' and held == 1 then
  -- Handed to a waiter that gave up before seeing it (or admitted by a call
  -- whose caller was cancelled): the request never ran, so its hits in every
  -- window, tokens included, are taken back.
  local _, cost, tokens = parse_ticket(TICKET)
  for i = 1, NW do
    local w = (W_KIND[i] == 't') and tokens or cost
    if w > 0 then
      window_sum(i)
      if redis.call('ZREM', W_KEY[i], SLOT .. '|' .. int(w)) == 1 then
        SUM[i] = SUM[i] - w
        if w > 1 then
          EXTRA[i] = math.max(0, EXTRA[i] - (w - 1))
          set_extra(i)
        end
      end
    end
  end
elseif ACTUAL >= 0 and ACTUAL ~= RESERVED then
  for i = 1, NW do
    if W_KIND[i] == 't' then
      local key = W_KEY[i]
      window_sum(i)
      local member = SLOT .. '|' .. int(RESERVED)
      local at = RESERVED > 0 and redis.call('ZSCORE', key, member)
      if at then
        SUM[i] = SUM[i] + ACTUAL - RESERVED -- the drain below sees what came back
        redis.call('ZREM', key, member)
        EXTRA[i] = EXTRA[i] - (RESERVED - 1)
        if ACTUAL > 0 then
          redis.call('ZADD', key, at, SLOT .. '|' .. int(ACTUAL))
          EXTRA[i] = EXTRA[i] + (ACTUAL - 1)
        end
      elseif ACTUAL > RESERVED then
        -- Nothing reserved, or the reservation already left the window:
        -- charge the excess now.
        SUM[i] = SUM[i] + ACTUAL - RESERVED
        redis.call('ZADD', key, int(NOW), SLOT .. '+|' .. int(ACTUAL - RESERVED))
        EXTRA[i] = EXTRA[i] + (ACTUAL - RESERVED - 1)
      end
      if EXTRA[i] < 0 then EXTRA[i] = 0 end
      set_extra(i)
      redis.call('PEXPIRE', key, ttl_ms(W_PERIOD[i]))
    end
  end
end

if OUTCOME == 1 or OUTCOME == 2 then
  redis.call('HINCRBY', K_STATS, OUTCOME == 1 and 'successful_requests' or 'failed_requests', 1)
  if ADMITTED_AT > 0 and NOW > ADMITTED_AT then
    redis.call('HINCRBY', K_STATS, 'response_time_us', int(NOW - ADMITTED_AT))
  end
  redis.call('PEXPIRE', K_STATS, STATS_TTL)
end

if redis.call('ZCARD', K_QUEUE) == 0 then return {held, 0} end
prune_leases()
prune_tickets()
local _, head, _, wait, woken = drain(nil)
hint_head(head, wait, nil)
return {held, woken}
