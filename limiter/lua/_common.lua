-- _common.lua: shared by acquire.lua, release.lua and renew.lua (prepended to
-- each of them when they are loaded; it is not a script on its own).
--
-- Key layout (every key of one API shares the hash tag {api}, so a script
-- touches a single Redis Cluster slot):
--   KEYS[1]  holders  ZSET  slot id -> lease expiry (Redis time, microseconds)
--   KEYS[2]  queue    ZSET  ticket  -> arrival time (microseconds): FIFO order
--   KEYS[3]  qexp     ZSET  ticket  -> ticket expiry (microseconds)
--   KEYS[4]  cooldown STRING with PX: the provider asked us to wait
--   KEYS[5]  stats    HASH  cluster-wide counters for stats() (counted at release:
--                           admissions = successful + failed + in flight)
--   KEYS[6]  extra    HASH  window key -> sum of (weight - 1) over its entries
--   KEYS[7]  handed   HASH  slot id -> admission time, for slots a release
--                           handed to a waiter (read back by that waiter)
--   KEYS[7+i] window i ZSET "<slot id>|<weight>" -> admission time (microseconds)
--   KEYS[8+n] override HASH runtime limits (`limiter limits set`): a field
--                           "max_concurrent", "w:<period us>" or "tokens" replaces
--                           the configured value while the hash exists
--
-- ARGV[1] is the API's configuration as one space-separated string (built once
-- per API by the client):
--   namespace (the wake-up channel is <namespace>:wake:<process id>)
--   max_concurrent (slots in flight for the whole cluster, 0 = no limit)
--   lease length (microseconds)
--   ticket length (microseconds: a waiter that stops refreshing its ticket for
--     this long is dropped from the queue)
--   stats TTL (milliseconds)
--   n, the number of windows, then n triples: limit (weight units),
--     period (microseconds), kind ("r": weighted by the request's cost,
--     "t": by its tokens)
-- The operation's own ARGV start at ARGV[2].
--
-- A ticket is "<slot id>|<cost>|<tokens>"; a slot id is "<process id>.<n>".
-- Times are integers of microseconds of Redis TIME: no client clock is used.
-- A window's used weight is ZCARD + extra: entries of weight 1 (the common
-- case) cost no bookkeeping beyond the sorted set itself.

local unpack = unpack or table.unpack

local K_HOLDERS, K_QUEUE, K_QEXP = KEYS[1], KEYS[2], KEYS[3]
local K_COOLDOWN, K_STATS, K_EXTRA, K_HANDED = KEYS[4], KEYS[5], KEYS[6], KEYS[7]

local CONF = {}
for word in string.gmatch(ARGV[1], '%S+') do CONF[#CONF + 1] = word end
local NS = CONF[1]
local MAXC = tonumber(CONF[2])
local LEASE = tonumber(CONF[3])
local TICKET_TTL = tonumber(CONF[4])
local STATS_TTL = tonumber(CONF[5])
local NW = tonumber(CONF[6])
local W_KEY, W_LIMIT, W_PERIOD, W_KIND = {}, {}, {}, {}
local LONGEST = LEASE
for i = 1, NW do
  W_KEY[i] = KEYS[7 + i]
  W_LIMIT[i] = tonumber(CONF[4 + 3 * i])
  W_PERIOD[i] = tonumber(CONF[5 + 3 * i])
  W_KIND[i] = CONF[6 + 3 * i]
  if W_PERIOD[i] > LONGEST then LONGEST = W_PERIOD[i] end
end

-- Runtime limits replace the configured ones (an absent hash costs one lookup).
local K_OVERRIDE = KEYS[8 + NW]
if K_OVERRIDE then
  local ov = redis.call('HGETALL', K_OVERRIDE)
  if #ov > 0 then
    local by = {}
    for j = 1, #ov, 2 do by[ov[j]] = tonumber(ov[j + 1]) end
    if by.max_concurrent then MAXC = by.max_concurrent end
    for i = 1, NW do
      local name = string.match(W_KEY[i], '}:([^}]*)$')
      if name and by[name] then W_LIMIT[i] = by[name] end
    end
  end
end

local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- Integers as strings without exponent (Lua 5.1 prints 1.7e+15 otherwise).
local function int(x) return string.format('%.0f', x) end
-- PEXPIRE argument for something that lives `us` microseconds, plus a second.
local function ttl_ms(us) return math.floor(us / 1000) + 1000 end

local function weight_of(member)
  return tonumber(string.match(member, '|(%d+)$')) or 1
end

local function parse_ticket(ticket)
  local slot, cost, tokens = string.match(ticket, '^(.-)|(%d+)|(%d+)$')
  return slot, tonumber(cost), tonumber(tokens)
end

-- Drop expired leases.
local function prune_leases()
  redis.call('ZREMRANGEBYSCORE', K_HOLDERS, '-inf', NOW)
end

-- Drop expired tickets (only worth calling when the queue is not empty).
local function prune_tickets()
  local dead = redis.call('ZRANGEBYSCORE', K_QEXP, '-inf', NOW)
  for i = 1, #dead, 1000 do
    redis.call('ZREM', K_QUEUE, unpack(dead, i, math.min(i + 999, #dead)))
  end
  if #dead > 0 then redis.call('ZREMRANGEBYSCORE', K_QEXP, '-inf', NOW) end
end

-- Used weight of window i after dropping what left it, cached per call.
local SUM, EXTRA = {}, {}

local function set_extra(i)
  redis.call('HSET', K_EXTRA, W_KEY[i], int(EXTRA[i]))
  redis.call('PEXPIRE', K_EXTRA, ttl_ms(LONGEST))
end

local STORED = nil -- extra weights as stored, read once for all windows

local function window_sum(i)
  if SUM[i] then return SUM[i] end
  if not STORED then STORED = NW > 0 and redis.call('HMGET', K_EXTRA, unpack(W_KEY)) or {} end
  local key = W_KEY[i]
  local cutoff = NOW - W_PERIOD[i]
  local stored = tonumber(STORED[i] or '0')
  local extra = stored
  if extra > 0 then
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', cutoff)) do
      extra = extra - (weight_of(m) - 1)
    end
  end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', cutoff)
  local n = redis.call('ZCARD', key)
  if n == 0 or extra < 0 then extra = 0 end
  EXTRA[i] = extra
  if extra ~= stored then set_extra(i) end
  SUM[i] = n + extra
  return SUM[i]
end

-- Microseconds until `need` weight has left window i (oldest entries first).
local function window_wait(i, need)
  local key, start = W_KEY[i], 0
  while true do
    local batch = redis.call('ZRANGE', key, start, start + 127, 'WITHSCORES')
    if #batch == 0 then return W_PERIOD[i] end
    for j = 1, #batch, 2 do
      need = need - weight_of(batch[j])
      if need <= 0 then return tonumber(batch[j + 1]) + W_PERIOD[i] - NOW end
    end
    start = start + 128
  end
end

-- Can a request of this cost and tokens be admitted now?
-- Returns nil when it can, else reason, wait: reason is "cooldown",
-- "concurrency" or "w<i>" (window i); wait is microseconds until that limit
-- could pass (for concurrency: until the oldest lease ends, an upper bound).
local function check(cost, tokens)
  local reason, wait = nil, -1
  local cd = redis.call('PTTL', K_COOLDOWN)
  if cd > 0 then reason, wait = 'cooldown', cd * 1000 end
  for i = 1, NW do
    local w = (W_KIND[i] == 't') and tokens or cost
    if w > 0 then
      local over = window_sum(i) + w - W_LIMIT[i]
      if over > 0 then
        local wi = window_wait(i, over)
        if wi > wait then reason, wait = 'w' .. i, wi end
      end
    end
  end
  if reason then return reason, wait end
  if MAXC > 0 and redis.call('ZCARD', K_HOLDERS) >= MAXC then
    local first = redis.call('ZRANGE', K_HOLDERS, 0, 0, 'WITHSCORES')
    return 'concurrency', tonumber(first[2]) - NOW
  end
  return nil
end

-- Record one admission: a lease and one weighted entry in every window.
-- `lease` defaults to the full lease length.
local function admit(slot, cost, tokens, lease)
  redis.call('ZADD', K_HOLDERS, int(NOW + (lease or LEASE)), slot)
  redis.call('PEXPIRE', K_HOLDERS, ttl_ms(LEASE))
  for i = 1, NW do
    local w = (W_KIND[i] == 't') and tokens or cost
    if w > 0 then
      local key = W_KEY[i]
      SUM[i] = window_sum(i) + w
      redis.call('ZADD', key, int(NOW), slot .. '|' .. int(w))
      redis.call('PEXPIRE', key, ttl_ms(W_PERIOD[i]))
      if w > 1 then
        EXTRA[i] = EXTRA[i] + w - 1
        set_extra(i)
      end
    end
  end
end

local function count_refusal(reason)
  redis.call('HINCRBY', K_STATS, 'refused:' .. reason, 1)
  redis.call('PEXPIRE', K_STATS, STATS_TTL)
end

-- Wake-up messages go to the waiting process's own channel only:
--   "A <slot id> <admission time>"  the ticket was admitted (it holds the slot)
--   "H <slot id> <wait>"            the ticket is at the head, refused for
--                                   <wait> microseconds: ask again then
local function tell(slot, msg)
  local proc = string.match(slot, '^(.-)%.')
  redis.call('PUBLISH', NS .. ':wake:' .. proc, msg)
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
  for i = 1, NW do
    local w = (W_KIND[i] == 't') and tokens or cost
    if w > W_LIMIT[i] then return i end
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
      redis.call('ZREM', K_QUEUE, ticket)
      redis.call('ZREM', K_QEXP, ticket)
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
        lease = math.max(1, math.min(LEASE, expires - NOW))
      end
      admit(slot, cost, tokens, lease)
      redis.call('ZREM', K_QUEUE, ticket)
      redis.call('ZREM', K_QEXP, ticket)
      if ticket == own then
        own_admitted = true
      else
        redis.call('HSET', K_HANDED, slot, int(NOW))
        redis.call('PEXPIRE', K_HANDED, ttl_ms(LEASE))
        tell(slot, 'A ' .. slot .. ' ' .. int(NOW))
        woken = woken + 1
      end
    end
  end
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
