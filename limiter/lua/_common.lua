-- _common.lua: the functions every per-API script shares. It is prepended to
-- each of them when they are loaded, after the bindings that limiter/_contract.py
-- generates from the one definition of the scripts' contract: KEYS as K_<NAME>,
-- the call's own ARGV and the API's configuration as named locals, WINDOWS_AT
-- (where the windows start in ARGV) and TAIL_AT (where a variadic tail starts).
--
-- Keys (every key of one API shares the hash tag {api}: one Redis Cluster slot):
--   K_HOLDERS   ZSET  slot id -> lease expiry (Redis time, microseconds); expired
--                     leases count for nothing and are pruned now and then
--   K_QUEUE     ZSET  ticket -> arrival time: the FIFO order of waiters
--   K_QEXP      ZSET  ticket -> ticket expiry
--   K_STATE     HASH  the API's small state, read with one HMGET:
--                       cooldown           until when the provider asked us to wait (us)
--                       o:until            the runtime override's end (us; 0: no end)
--                       o:<limit>          an overridden limit ("max_concurrent",
--                                          "w:<period us>", "tokens")
--                       x:<window>         sum of (weight - 1) over the window's entries
--                       c:<window>         the cutoff that sum was taken at (us)
--                       e:<key>            the expiry last given to a key (us; -1: none),
--                                          so TTLs are refreshed once in a while, not
--                                          at every admission
--                       successful_requests, failed_requests, response_time_us,
--                       refused:<reason>   totals for stats()
--   K_HANDED    HASH  slot id -> admission time, for slots a release handed to a
--                     waiter (read back by that waiter)
--   K_REQUESTS  ZSET  "<slot id>|<cost>" -> admission time: one log for every
--                     request window, trimmed to the longest; shorter windows
--                     count with ZCOUNT
--   K_TOKENS    ZSET  "<slot id>|<tokens>" -> admission time: the token window
--
-- A ticket is "<slot id>|<cost>|<tokens>"; a slot id is "<process id>.<n>".
-- Times are integers of microseconds of Redis TIME: no client clock is used.
-- A window's used weight is its entry count + x:<window>: entries of weight 1
-- (the common case) cost no bookkeeping beyond the sorted set itself.

local unpack = unpack or table.unpack

local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- Integers as strings without exponent (Lua 5.1 prints 1.7e+15 otherwise).
local function int(x) return string.format('%.0f', x) end
-- PEXPIRE argument for something that lives `us` microseconds, plus a second.
local function ttl_ms(us) return math.floor(us / 1000) + 1000 end

-- The windows, shortest first within each log: {id, limit, period, kind, log}.
-- kind "r" weighs a request by its cost, "t" by its tokens.
local MAXC = MAX_CONCURRENT
local W = {}
local LONGEST = {r = nil, t = nil}
for i = 1, REQUEST_WINDOWS + TOKEN_WINDOWS do
  local at = WINDOWS_AT + 2 * (i - 1)
  local configured = tonumber(ARGV[at + 1])
  local kind = (i <= REQUEST_WINDOWS) and 'r' or 't'
  local w = {
    id = (kind == 'r') and ('w:' .. int(configured)) or 'tokens',
    limit = tonumber(ARGV[at]),
    period = configured + MARGIN_US,
    kind = kind,
    log = (kind == 'r') and K_REQUESTS or K_TOKENS,
    extra = 0,
  }
  W[i] = w
  LONGEST[kind] = w -- the configuration lists each log's windows shortest first
end
local LIFE = math.max(LEASE_US, STATS_TTL_MS * 1000)
for _, w in ipairs(W) do LIFE = math.max(LIFE, w.period) end

local function weight(w, cost, tokens)
  if w.kind == 't' then return tokens end
  return cost
end

local function weight_of(member)
  return tonumber(string.match(member, '|(%d+)$')) or 1
end

local function parse_ticket(ticket)
  local slot, cost, tokens = string.match(ticket, '^(.-)|(%d+)|(%d+)$')
  return slot, tonumber(cost), tonumber(tokens)
end

-- State -------------------------------------------------------------------

-- The state hash as read by load_state(), and fields to write back at the end.
local ST = nil
local PENDING = {}

local function set_state(field, value)
  PENDING[#PENDING + 1] = field
  PENDING[#PENDING + 1] = value
end

-- Read cooldown, override, extras and key expiries in one HMGET; apply the
-- override in force to MAXC and the windows' limits.
local function load_state()
  if ST then return end
  local fields = {'cooldown', 'o:until', 'o:max_concurrent',
                  'e:state', 'e:holders', 'e:requests', 'e:tokens'}
  for _, w in ipairs(W) do
    fields[#fields + 1] = 'o:' .. w.id
    fields[#fields + 1] = 'x:' .. w.id
    fields[#fields + 1] = 'c:' .. w.id
  end
  local v = redis.call('HMGET', K_STATE, unpack(fields))
  ST = {
    cooldown = tonumber(v[1]) or 0,
    override_until = tonumber(v[2]),
    expiry = {state = tonumber(v[4]), holders = tonumber(v[5]),
              requests = tonumber(v[6]), tokens = tonumber(v[7])},
  }
  local ends = ST.override_until
  local override = ends and (ends == 0 or ends > NOW)
  if override and v[3] then MAXC = tonumber(v[3]) end
  for i, w in ipairs(W) do
    local at = 8 + 3 * (i - 1)
    if override and v[at] then w.limit = tonumber(v[at]) end
    w.extra = tonumber(v[at + 1]) or 0
    w.cut = tonumber(v[at + 2])
  end
end

-- How long the state hash must live from now: its totals stats_ttl, its
-- extras as long as the longest window, a cooldown or override while in force.
-- nil: for ever (an override without end).
local function state_life()
  local ends = ST.override_until
  if ends == 0 then return nil end
  local life = LIFE
  if ends and ends > NOW then life = math.max(life, ends - NOW) end
  if ST.cooldown > NOW then life = math.max(life, ST.cooldown - NOW) end
  return life
end

-- Give `key` (named `name` in e:<name>) a TTL covering `life` us from now, when
-- the one it was last given falls short or the key is `fresh` (it was empty, so
-- Redis had dropped it with its TTL). Each TTL given is the life plus a slack of
-- a quarter life (at least a second), so a busy key is refreshed once per slack
-- instead of at every admission.
local REFRESH = {}

-- Whether key `name`'s TTL is due for a refresh (it may run out within `life`).
local function due(name, life)
  local e = ST.expiry[name]
  return e == nil or e == -1 or e < NOW + life
end

local function keep(name, key, life, fresh)
  if life == nil then
    if ST.expiry[name] ~= -1 then
      REFRESH[#REFRESH + 1] = {key, nil}
      set_state('e:' .. name, '-1')
    end
  elseif due(name, life) then
    local ttl = life + math.max(1000000, life / 4)
    REFRESH[#REFRESH + 1] = {key, ttl}
    set_state('e:' .. name, int(NOW + ttl))
  elseif fresh then
    -- A new key within the recorded expiry: give it that TTL (or more) again.
    REFRESH[#REFRESH + 1] = {key, life + math.max(1000000, life / 4)}
  end
end

-- Write pending state fields and TTLs (HSET first: PEXPIRE needs the key).
-- Every script that may have written calls it last.
local function flush()
  if not ST then return end
  keep('state', K_STATE, state_life())
  if #PENDING > 0 then redis.call('HSET', K_STATE, unpack(PENDING)) end
  for _, r in ipairs(REFRESH) do
    if r[2] then
      redis.call('PEXPIRE', r[1], math.ceil(r[2] / 1000))
    else
      redis.call('PERSIST', r[1])
    end
  end
  PENDING, REFRESH = {}, {}
end

-- Add n to a total. A field that did not exist may mean a new hash: flush()
-- then checks its TTL.
local function count(field, n)
  if redis.call('HINCRBY', K_STATE, field, n) == n then load_state() end
end

-- Leases ------------------------------------------------------------------

-- Leases counted, expired ones included (they are pruned when they could
-- matter: near the limit, and whenever the key's TTL is refreshed). nil: unknown.
local LEASES = nil

local function prune_leases()
  redis.call('ZREMRANGEBYSCORE', K_HOLDERS, '-inf', NOW)
  LEASES = nil
end

-- Live leases when the count matters (at or over `limit`), else an upper bound.
local function lease_count(limit)
  if LEASES == nil then LEASES = redis.call('ZCARD', K_HOLDERS) end
  if limit > 0 and LEASES >= limit then
    prune_leases()
    LEASES = redis.call('ZCARD', K_HOLDERS)
  end
  return LEASES
end

-- The lease expiry of `slot` when it is still live, else nil.
local function lease_of(slot)
  local at = tonumber(redis.call('ZSCORE', K_HOLDERS, slot))
  if at and at > NOW then return at end
  return nil
end

-- Tickets -----------------------------------------------------------------

local function drop_ticket(ticket)
  redis.call('ZREM', K_QUEUE, ticket)
  redis.call('ZREM', K_QEXP, ticket)
end

-- Drop expired tickets (only worth calling when the queue is not empty).
local function prune_tickets()
  local dead = redis.call('ZRANGEBYSCORE', K_QEXP, '-inf', NOW)
  for i = 1, #dead, 1000 do
    redis.call('ZREM', K_QUEUE, unpack(dead, i, math.min(i + 999, #dead)))
  end
  if #dead > 0 then redis.call('ZREMRANGEBYSCORE', K_QEXP, '-inf', NOW) end
end

-- Windows -----------------------------------------------------------------

-- Bring every window of log `kind` up to now: subtract the extra weight of
-- entries that left it and count each window (ZCOUNT from its cutoff). Entries
-- older than the longest window are trimmed when the log's TTL is refreshed
-- (admit), not at every call. Sets w.used for each window; once per call.
local MEASURED = {}
local FRESH = {} -- logs found empty (Redis dropped them, with their TTL)
local function measure(kind)
  if MEASURED[kind] or not LONGEST[kind] then return end
  MEASURED[kind] = true
  load_state()
  local key = LONGEST[kind].log
  for _, w in ipairs(W) do
    if w.kind == kind then
      local cutoff = NOW - w.period
      if w.extra > 0 and (w.cut == nil or cutoff > w.cut) then
        local from = w.cut and ('(' .. int(w.cut)) or '-inf'
        for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, from, cutoff)) do
          w.extra = w.extra - (weight_of(m) - 1)
        end
        if w.extra < 0 then w.extra = 0 end
        set_state('x:' .. w.id, int(w.extra))
        set_state('c:' .. w.id, int(cutoff))
      end
      w.cut = cutoff
    end
  end
  for _, w in ipairs(W) do
    if w.kind == kind then
      local n = redis.call('ZCOUNT', key, '(' .. int(w.cut), '+inf')
      -- An empty longest window may be an empty log, which Redis dropped with its TTL.
      if w == LONGEST[kind] then FRESH[kind] = n == 0 end
      if n == 0 and w.extra > 0 then
        w.extra = 0
        set_state('x:' .. w.id, '0')
      end
      w.used = n + w.extra
    end
  end
end

-- Add `n` weight units (n >= 1) admitted at `at` (default now) to the windows
-- of log `kind` that hold that time.
local function add_weight(kind, n, at)
  for _, w in ipairs(W) do
    if w.kind == kind and (at == nil or at > w.cut) then
      w.used = w.used + n
      if n > 1 then
        if w.extra == 0 then set_state('c:' .. w.id, int(w.cut)) end
        w.extra = w.extra + n - 1
        set_state('x:' .. w.id, int(w.extra))
      end
    end
  end
end

-- Take back `n` weight units of an entry admitted at `at` from the windows of
-- log `kind` that still hold it.
local function remove_weight(kind, n, at)
  for _, w in ipairs(W) do
    if w.kind == kind and at > w.cut then
      w.used = w.used - n
      if n > 1 then
        w.extra = math.max(0, w.extra - (n - 1))
        set_state('x:' .. w.id, int(w.extra))
      end
    end
  end
end

-- Microseconds until `need` weight has left window w (oldest entries first).
local function window_wait(w, need)
  local start = 0
  while true do
    local batch = redis.call('ZRANGEBYSCORE', w.log, '(' .. int(w.cut), '+inf',
                             'WITHSCORES', 'LIMIT', start, 128)
    if #batch == 0 then return w.period end
    for j = 1, #batch, 2 do
      need = need - weight_of(batch[j])
      if need <= 0 then return tonumber(batch[j + 1]) + w.period - NOW end
    end
    start = start + 128
  end
end

-- Admission ---------------------------------------------------------------

-- Can a request of this cost and tokens be admitted now?
-- Returns nil when it can, else reason, wait: reason is "cooldown",
-- "concurrency" or a window's id ("w:<period us>", "tokens"); wait is
-- microseconds until that limit could pass (for concurrency: until the oldest
-- lease ends, an upper bound).
local function check(cost, tokens)
  load_state()
  local reason, wait = nil, -1
  if ST.cooldown > NOW then reason, wait = 'cooldown', ST.cooldown - NOW end
  if cost > 0 then measure('r') end
  if tokens > 0 then measure('t') end
  for _, w in ipairs(W) do
    local n = weight(w, cost, tokens)
    if n > 0 then
      local over = w.used + n - w.limit
      if over > 0 then
        local wi = window_wait(w, over)
        if wi > wait then reason, wait = w.id, wi end
      end
    end
  end
  if reason then return reason, wait end
  if lease_count(MAXC) >= MAXC and MAXC > 0 then
    local first = redis.call('ZRANGEBYSCORE', K_HOLDERS, '(' .. int(NOW), '+inf',
                             'WITHSCORES', 'LIMIT', 0, 1)
    return 'concurrency', tonumber(first[2]) - NOW
  end
  return nil
end

-- Record one admission: a lease and one weighted entry in each log. `lease`
-- defaults to the full lease length. Call check() first (it measures).
local function admit(slot, cost, tokens, lease)
  local fresh = lease_count(0) == 0
  redis.call('ZADD', K_HOLDERS, int(NOW + (lease or LEASE_US)), slot)
  LEASES = LEASES + 1
  if not fresh and due('holders', LEASE_US) then
    prune_leases() -- now and then, or the dead leases of crashed holders pile up
  end
  keep('holders', K_HOLDERS, LEASE_US, fresh)
  for kind, n in pairs({r = cost, t = tokens}) do
    local longest = LONGEST[kind]
    if n > 0 and longest then
      local name = (kind == 'r') and 'requests' or 'tokens'
      if due(name, longest.period) then
        -- Now and then: drop what left the longest window.
        redis.call('ZREMRANGEBYSCORE', longest.log, '-inf', longest.cut)
      end
      redis.call('ZADD', longest.log, int(NOW), slot .. '|' .. int(n))
      add_weight(kind, n)
      keep(name, longest.log, longest.period, FRESH[kind])
      FRESH[kind] = false
    end
  end
end

local function count_refusal(reason)
  count('refused:' .. reason, 1)
end

-- Wake-up messages go to the waiting process's own channel only:
--   "A <slot id> <admission time>"  the ticket was admitted (it holds the slot)
--   "H <slot id> <wait>"            the ticket is at the head, refused for
--                                   <wait> microseconds: ask again then
local function tell(slot, msg)
  local proc = string.match(slot, '^(.-)%.')
  redis.call('PUBLISH', NAMESPACE .. ':wake:' .. proc, msg)
end

-- Tell the head ticket (when it is not `own`) how long it has to wait.
local function hint_head(head, wait, own)
  if head and head ~= own and wait >= 0 then
    local slot = parse_ticket(head)
    tell(slot, 'H ' .. slot .. ' ' .. int(wait))
  end
end

-- The first window whose limit in force is below this request's weight, or nil.
-- Only a runtime override can make a request too heavy (the client refuses
-- those above the configured limits); such a request can never pass.
local function too_heavy(cost, tokens)
  load_state()
  for _, w in ipairs(W) do
    if weight(w, cost, tokens) > w.limit then return w end
  end
  return nil
end

-- Admit waiting tickets from the head of the queue while they fit, FIFO.
-- Each admitted ticket other than `own` is told on its process's channel,
-- and its admission time kept in `handed` until it is read or released.
-- Returns: own_admitted, head ticket left (or nil), its reason, its wait,
-- number of others woken.
local function drain(own)
  local own_admitted, woken = false, 0
  while true do
    local head = redis.call('ZRANGE', K_QUEUE, 0, 0)
    if #head == 0 then return own_admitted, nil, nil, -1, woken end
    local ticket = head[1]
    local slot, cost, tokens = parse_ticket(ticket)
    if too_heavy(cost, tokens) then
      -- A limit was lowered under it: it would block the queue for ever. Drop it;
      -- its waiter asks again at once and is told it can never pass.
      drop_ticket(ticket)
      if ticket ~= own then tell(slot, 'H ' .. slot .. ' 0') end
    else
      local reason, wait = check(cost, tokens)
      if reason then return own_admitted, ticket, reason, wait, woken end
      -- A slot handed to another process is leased only until its ticket would
      -- have expired, until that process renews it: a process that died while
      -- waiting holds nothing past its tickets' life (ticket_ttl after its death).
      local lease = nil
      if ticket ~= own then
        local expires = tonumber(redis.call('ZSCORE', K_QEXP, ticket) or NOW)
        lease = math.max(1, math.min(LEASE_US, expires - NOW))
      end
      admit(slot, cost, tokens, lease)
      drop_ticket(ticket)
      if ticket == own then
        own_admitted = true
      else
        redis.call('HSET', K_HANDED, slot, int(NOW))
        redis.call('PEXPIRE', K_HANDED, ttl_ms(LEASE_US))
        tell(slot, 'A ' .. slot .. ' ' .. int(NOW))
        woken = woken + 1
      end
    end
  end
end

-- Move the queue: drop dead leases and tickets, admit the waiters that fit now,
-- tell the one left at the head how long it waits. Returns how many were woken.
local function move_queue()
  if redis.call('ZCARD', K_QUEUE) == 0 then return 0 end
  prune_leases()
  prune_tickets()
  local _, head, _, wait, woken = drain(nil)
  hint_head(head, wait, nil)
  return woken
end

-- Admission time of a slot handed to its waiter by someone else's drain.
local function handed_at(slot)
  local at = redis.call('HGET', K_HANDED, slot)
  if at then
    redis.call('HDEL', K_HANDED, slot)
    return tonumber(at)
  end
  return NOW
end
