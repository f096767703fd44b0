-- renew.lua: extend the leases of the slots one process holds and the
-- tickets it waits with, in one call per API (the renewer pipelines the
-- APIs, so one round trip per process renews everything it holds).
--
-- KEYS and ARGV[1]: see _common.lua.
-- Operation ARGV:
--   ARGV[2]            m: number of slot ids that follow
--   ARGV[3..2+m]       slot ids held by this process
--   then               tickets "<slot id>|<cost>|<tokens>" this process waits with
--
-- A lease is extended to now + lease length only when it is still there (an
-- expired lease is never brought back). A ticket is extended to now + ticket
-- length only when it is still queued. Then the queue is drained, which
-- admits past a waiter that died at the head.
--
-- Returns {lost, admitted, gone}:
--   lost      slot ids whose lease was gone (the holder raises LeaseLost)
--   admitted  flat list slot id, admission time: tickets already admitted
--             (their wake-up was missed: the waiter takes its slot now)
--   gone      tickets neither queued nor admitted (expired: queue again)

local M = tonumber(ARGV[2])
prune_leases()
prune_tickets()

local lost, admitted, gone = {}, {}, {}
for i = 3, 2 + M do
  local slot = ARGV[i]
  if redis.call('ZSCORE', K_HOLDERS, slot) then
    redis.call('ZADD', K_HOLDERS, int(NOW + LEASE), slot)
  else
    lost[#lost + 1] = slot
  end
end
if M > #lost then redis.call('PEXPIRE', K_HOLDERS, ttl_ms(LEASE)) end

local queued = false
for i = 3 + M, #ARGV do
  local ticket = ARGV[i]
  if redis.call('ZSCORE', K_QUEUE, ticket) then
    redis.call('ZADD', K_QEXP, int(NOW + TICKET_TTL), ticket)
    queued = true
  else
    local slot = parse_ticket(ticket)
    if redis.call('ZSCORE', K_HOLDERS, slot) then
      admitted[#admitted + 1] = slot
      admitted[#admitted + 1] = int(handed_at(slot))
    else
      gone[#gone + 1] = ticket
    end
  end
end
if queued then
  redis.call('PEXPIRE', K_QUEUE, ttl_ms(TICKET_TTL))
  redis.call('PEXPIRE', K_QEXP, ttl_ms(TICKET_TTL))
end

local _, head, _, wait = drain(nil)
hint_head(head, wait, nil)
return {lost, admitted, gone}
