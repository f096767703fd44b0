-- renew.lua: extend the leases of the slots one process holds and the
-- tickets it waits with, in one call per API (the renewer pipelines the
-- APIs, so one round trip per process renews everything it holds).
--
-- KEYS: the API's keys (_common.lua). ARGV: the call's own, then the API's
-- configuration, then a tail (limiter/_contract.py binds them):
--   SLOTS                 m, the number of slot ids that lead the tail
--   ARGV[TAIL_AT ...]     m slots held by this process, each "<slot id>" or,
--                         for an API with limit sets, "<slot id>|<deployment>|
--                         <model>" (either may be ""), then the tickets it
--                         waits with (the ticket format: _common.lua)
--
-- A lease is extended to now + lease length only when it is still live (an
-- expired lease is never brought back). A ticket is extended to now + ticket
-- length only when it is still queued (its queue keys too: see keep_queued).
-- Then the queue moves, which admits past
-- a waiter that died at the head.
--
-- Returns {lost, admitted, gone}:
--   lost      slot ids whose lease was gone (the holder raises LeaseLost)
--   admitted  flat list slot id, admission time, deployment ("" when none):
--             tickets already admitted
--             (their wake-up was missed: the waiter takes its slot now). The
--             waiter is alive, so its hand-over lease (which ends with its ticket's
--             life, short when renewals were lost) becomes a full one here, as when
--             the waiter asks again: else it could run out before the next renewal
--             while the waiter runs
--   gone      tickets neither queued nor admitted (expired: queue again)

OPS.renew = function()
  contended()
  load_state()
  prune_leases()
  prune_tickets()

  local lost, admitted, gone = {}, {}, {}
  for i = TAIL_AT, TAIL_AT + SLOTS - 1 do
    local slot, dep, model = ARGS[i], nil, nil
    if SETS then
      local s, d, m = string.match(slot, '^([^|]*)|([^|]*)|(.*)$')
      if s then slot, dep, model = s, d, m end
    end
    if redis.call('ZSCORE', K_HOLDERS, slot) then
      redis.call('ZADD', K_HOLDERS, int(NOW + LEASE_US), slot)
      extend(slot, dep, model)
    else
      lost[#lost + 1] = slot
    end
  end

  local queued, seen = false, {}
  for i = TAIL_AT + SLOTS, #ARGS do
    local ticket = ARGS[i]
    if redis.call('ZSCORE', K_QEXP, ticket) then
      redis.call('ZADD', K_QEXP, int(NOW + TICKET_US), ticket)
      keep_queued(ticket, seen)
      queued = true
    else
      local slot, _, _, _, _, _, model = parse_ticket(ticket)
      if lease_of(slot) then
        redis.call('ZADD', K_HOLDERS, int(NOW + LEASE_US), slot)
        local at, dep = handed_at(slot)
        extend(slot, dep, model)
        admitted[#admitted + 1] = slot
        admitted[#admitted + 1] = int(at)
        admitted[#admitted + 1] = dep
      else
        gone[#gone + 1] = ticket
      end
    end
  end
  if queued then
    note_queued()
    redis.call('PEXPIRE', K_QUEUE, ttl_ms(TICKET_US))
    redis.call('PEXPIRE', K_QEXP, ttl_ms(TICKET_US))
  end

  move_queue()
  flush()
  return {lost, admitted, gone}
end
