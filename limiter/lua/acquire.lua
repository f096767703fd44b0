-- acquire.lua: admit one request, or queue it fairly and say why not.
--
-- KEYS: the API's keys (_common.lua). ARGV: the call's own, then the API's
-- configuration (limiter/_contract.py binds both to the names used here):
--   SLOT    slot id "<process id>.<n>", unique per request
--   COST    weight in the request windows (integer >= 1)
--   TOKENS  weight in the token window (integer >= 0)
--   MODE    "wait" (join the FIFO queue when refused) or "try" (never queue;
--           refuse when anyone is waiting)
--   FIRST   1 on a request's first call, 0 when a waiter asks again
--   PRIORITY  the request's priority, an integer in [-1000, 1000] as text
--   WEIGHT    its tenant's configured weight (> 0), as text
--   TENANT    its tenant ("" when none was given)
--   MODEL     the model it asks for ("" when none): with limit sets, the model's
--             set and the chosen deployment's model set apply (_common.lua)
--   IN_TOKENS, OUT_TOKENS  its input and output tokens, for the input and output
--             budgets ("#in" and "#out" sets); both equal TOKENS when the caller
--             did not give them apart
--
-- Waiting is fair (see "Fair queue" in _common.lua): the highest priority
-- first, a ticket that waited AGING_US above every priority, then within one
-- class the tenant with the least weighted service, FIFO within a tenant.
--
-- All or nothing: concurrency, every window, tokens and the cooldown are
-- checked together; a refusal records nothing but the ticket (mode "wait")
-- and one refusal count on the request's first call.
--
-- Returns:
--   admission time (microseconds, Redis TIME), a bare integer: admitted; the
--       lease runs until admission + lease (the common reply: a client reads an
--       integer faster than an array)
--   {1, admission time, 1}   admitted through the fair queue (its tenant was
--                            charged: the release may correct the charge)
--   {1, admission time, 0 or 1, deployment}   the same for an API with
--                            deployments: the one chosen (check_all in _common.lua)
--   {0, reason, wait (microseconds), at_head (0/1)}  refused, where reason is
--       "cooldown", "concurrency" or a window's id ("w:<period us>", "tokens");
--       wait is how long until that limit could pass when this ticket is at
--       the head (-1 when it is not: wait for a wake-up on the process channel)
--   {0, window id, -2, limit in force}  never: heavier than that window's limit
--       as an override set it (nothing is queued)

-- This request's ticket; made only when needed (the common case needs none).
local function own_ticket()
  local tokens = int(TOKENS)
  if IN_TOKENS ~= TOKENS or OUT_TOKENS ~= TOKENS then
    tokens = tokens .. '/' .. int(IN_TOKENS) .. '/' .. int(OUT_TOKENS)
  end
  return SLOT .. '|' .. int(COST) .. '|' .. tokens .. '|' .. PRIORITY .. '|' ..
         WEIGHT .. '|' .. MODEL .. '|' .. TENANT
end

local function enqueue(ticket)
  contended()
  note_queued()
  local new = false
  if not redis.call('ZSCORE', K_QEXP, ticket) then
    redis.call('ZADD', K_QUEUE, NOW_S, ticket)
    join(PRIORITY, -tonumber(PRIORITY), TENANT, ticket, NOW_S)
    new = true
  else
    keep_queued(ticket) -- a waiter asking again keeps its place (or gets it back)
  end
  redis.call('ZADD', K_QEXP, int(NOW + TICKET_US), ticket)
  redis.call('PEXPIRE', K_QUEUE, ttl_ms(TICKET_US))
  redis.call('PEXPIRE', K_QEXP, ttl_ms(TICKET_US))
  return new
end

local function acquire_now()
  load_state()
  local waiting = 0
  if FIRST == 0 or (QUEUED_UNTIL and QUEUED_UNTIL > NOW) then
    waiting = redis.call('ZCARD', K_QEXP) -- (else every ticket ended: nobody waits)
  end
  if waiting > 0 or FIRST == 0 then contended() end
  if waiting > 0 then prune_tickets() end

  if FIRST == 0 and lease_of(SLOT) then
    -- Admitted by someone else's release meanwhile (its wake-up may be in flight).
    -- The waiter is alive: its short hand-over lease becomes a full one.
    redis.call('ZADD', K_HOLDERS, int(NOW + LEASE_US), SLOT)
    load_state() -- flush() keeps the holders' TTL ahead of the new lease
    drop_ticket(own_ticket())
    local at, dep = handed_at(SLOT)
    extend(SLOT, dep, MODEL)
    if not DEPS then return at end
    return {1, at, 1, dep}
  end

  local heavy = too_heavy_all(COST, TOKENS, MODEL, IN_TOKENS, OUT_TOKENS)
  if heavy then
    contended()
    -- Heavier than a limit an override lowered: it can never pass (nor wait).
    drop_ticket(own_ticket())
    return {0, heavy.id, -2, int(heavy.limit)}
  end

  if waiting == 0 or redis.call('ZCARD', K_QEXP) == 0 then
    -- Nobody waits: the common, fast case.
    local reason, wait, dep = check_all(COST, TOKENS, MODEL, IN_TOKENS, OUT_TOKENS)
    if not reason then
      admit_all(SLOT, COST, TOKENS, nil, dep, MODEL, IN_TOKENS, OUT_TOKENS)
      if dep then return {1, NOW, 0, dep} end
      return NOW
    end
    if FIRST == 1 then count_refusal(reason) end
    if MODE == 'wait' then enqueue(own_ticket()) end
    return {0, reason, wait, 1}
  end

  prune_leases()
  if MODE == 'try' then
    local _, head, reason, wait, woken = drain(nil)
    if woken > 0 then hint_head(head, wait, nil) end
    if head then
      count_refusal(reason)
      return {0, reason, -1, 0}
    end
    local r, w, dep = check_all(COST, TOKENS, MODEL, IN_TOKENS, OUT_TOKENS)
    if not r then
      admit_all(SLOT, COST, TOKENS, nil, dep, MODEL, IN_TOKENS, OUT_TOKENS)
      if dep then return {1, NOW, 0, dep} end
      return NOW
    end
    count_refusal(r)
    return {0, r, w, 1}
  end

  local ticket = own_ticket()
  local new = enqueue(ticket)
  local own, head, reason, wait, woken, dep = drain(ticket)
  -- A new head (after this ticket or others were admitted) learns how long it must wait.
  if own or woken > 0 then hint_head(head, wait, ticket) end
  if own then return {1, NOW, 1, dep} end -- admitted through the fair queue
  if new and FIRST == 1 and reason then count_refusal(reason) end
  if head == ticket then return {0, reason, wait, 1} end
  -- (reason is nil only if this ticket is in no queue: it waits for its renewal)
  return {0, reason or 'concurrency', -1, 0}
end

OPS.acquire = function()
  local result = acquire_now()
  flush()
  return result
end
