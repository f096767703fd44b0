-- release.lua: free a slot (or withdraw a waiting ticket), reconcile its
-- tokens, count the outcome, and hand freed room to the head of the queue.
--
-- KEYS and common ARGV: see _common.lua.
-- Operation ARGV (from index OP = 7 + 3 * n):
--   ARGV[OP]     slot id
--   ARGV[OP+1]   ticket "<slot id>|<cost>|<tokens>" to withdraw from the queue
--                (a waiter that timed out or was cancelled), or ""
--   ARGV[OP+2]   outcome: 0 none (cancelled, not counted), 1 success, 2 failure
--   ARGV[OP+3]   admission time, microseconds (Redis TIME returned by acquire);
--                the response time counted is now - admission
--   ARGV[OP+4]   tokens reserved at admission (integer >= 0)
--   ARGV[OP+5]   tokens really used, or -1 when not reported; the token window
--                entry is corrected to this (over-estimates come back,
--                under-estimates are charged)
--
-- Returns {held, woken}: held is 1 when the slot's lease was there and is now
-- released, 0 when it was already gone (expired or lost: the caller raises
-- LeaseLost); woken is how many waiters this release admitted. The waiter
-- left at the head of the queue is told how long it must still wait.

local SLOT = ARGV[OP]
local TICKET = ARGV[OP + 1]
local OUTCOME = tonumber(ARGV[OP + 2])
local ADMITTED_AT = tonumber(ARGV[OP + 3])
local RESERVED = tonumber(ARGV[OP + 4])
local ACTUAL = tonumber(ARGV[OP + 5])

prune()

if TICKET ~= '' then
  redis.call('ZREM', K_QUEUE, TICKET)
  redis.call('ZREM', K_QEXP, TICKET)
end

local held = 0
if redis.call('ZREM', K_HOLDERS, SLOT) == 1 then held = 1 end

if ACTUAL >= 0 and ACTUAL ~= RESERVED then
  for i = 1, NW do
    if W_KIND[i] == 't' then
      local key = W_KEY[i]
      local sum = window_sum(i)
      local member = SLOT .. '|' .. int(RESERVED)
      local at = redis.call('ZSCORE', key, member)
      if at then
        redis.call('ZREM', key, member)
        if ACTUAL > 0 then redis.call('ZADD', key, at, SLOT .. '|' .. int(ACTUAL)) end
        sum = sum + ACTUAL - RESERVED
      elseif ACTUAL > RESERVED then
        -- The reservation already left the window: charge the excess now.
        redis.call('ZADD', key, int(NOW), SLOT .. '+|' .. int(ACTUAL - RESERVED))
        sum = sum + ACTUAL - RESERVED
      end
      if sum < 0 then sum = 0 end
      SUM[i] = sum
      redis.call('HSET', K_SUMS, key, int(sum))
      redis.call('PEXPIRE', key, ttl_ms(W_PERIOD[i]))
      redis.call('PEXPIRE', K_SUMS, ttl_ms(LONGEST))
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

local _, head, _, wait, woken = drain(nil)
hint_head(head, wait, nil)
return {held, woken}
