-- acquire.lua: admit one request, or queue it fairly and say why not.
--
-- KEYS and common ARGV: see _common.lua (holders, queue, qexp, cooldown,
-- stats, sums, then one key per window).
-- Operation ARGV (from index OP = 7 + 3 * n):
--   ARGV[OP]     slot id "<process id>.<n>", unique per request
--   ARGV[OP+1]   cost: weight in request windows (integer >= 1)
--   ARGV[OP+2]   tokens: weight in the token window (integer >= 0)
--   ARGV[OP+3]   mode: "wait" (join the FIFO queue when refused) or
--                "try" (never queue; refuse when anyone is waiting)
--
-- All or nothing: concurrency, every window, tokens and the cooldown are
-- checked together; a refusal records nothing but the ticket (mode "wait")
-- and one refusal count the first time the request is refused.
--
-- Returns:
--   {1, admission time (microseconds, Redis TIME)}   admitted; the lease runs
--                                                    until admission + lease
--   {0, reason, wait (microseconds), at_head (0/1)}  refused, where reason is
--       "cooldown", "concurrency" or "w<i>" (the i-th window of ARGV); wait is
--       how long until that limit could pass when this ticket is at the head
--       (-1 when it is not: wait for a wake-up on the process channel).

local SLOT = ARGV[OP]
local COST = tonumber(ARGV[OP + 1])
local TOKENS = tonumber(ARGV[OP + 2])
local MODE = ARGV[OP + 3]
local TICKET = SLOT .. '|' .. int(COST) .. '|' .. int(TOKENS)

prune()

-- Already admitted by someone else's release (the wake-up may be in flight).
if redis.call('ZSCORE', K_HOLDERS, SLOT) then
  redis.call('ZREM', K_QUEUE, TICKET)
  redis.call('ZREM', K_QEXP, TICKET)
  return {1, NOW}
end

if MODE == 'try' then
  local _, head, reason, wait, woken = drain(nil)
  if woken > 0 then hint_head(head, wait, nil) end
  if head then
    count_refusal(reason)
    return {0, reason, -1, 0}
  end
  local r, wait = check(COST, TOKENS)
  if not r then
    admit(SLOT, COST, TOKENS)
    return {1, NOW}
  end
  count_refusal(r)
  return {0, r, wait, 1}
end

local new = false
if not redis.call('ZSCORE', K_QUEUE, TICKET) then
  redis.call('ZADD', K_QUEUE, int(NOW), TICKET)
  new = true
end
redis.call('ZADD', K_QEXP, int(NOW + TICKET_TTL), TICKET)
redis.call('PEXPIRE', K_QUEUE, ttl_ms(TICKET_TTL))
redis.call('PEXPIRE', K_QEXP, ttl_ms(TICKET_TTL))

local own, head, reason, wait, woken = drain(TICKET)
-- A new head (after others were admitted) learns how long it must wait.
if woken > 0 then hint_head(head, wait, TICKET) end
if own then return {1, NOW} end
if new then count_refusal(reason) end
if head == TICKET then return {0, reason, wait, 1} end
return {0, reason, -1, 0}
