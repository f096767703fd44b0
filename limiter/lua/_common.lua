-- _common.lua: the functions every per-API operation shares. limiter/_contract.py
-- puts before it the names it binds from the one definition of the scripts'
-- contract (KEYS as K_<NAME>, the call's own ARGV and the API's configuration as
-- named variables, WINDOWS, ARGS and TAIL_AT for a variadic tail), and after it
-- the operations (each lua/<op>.lua defines OPS.<op>). Loaded as a Redis
-- Functions library (7.0+) it runs once; as an EVAL script, at every call.
--
-- Keys (every key of one API shares the hash tag {api}: one Redis Cluster slot):
--   K_HOLDERS   ZSET  slot id -> lease expiry (Redis time, microseconds); expired
--                     leases count for nothing and are pruned now and then
--   K_QUEUE     ZSET  ticket -> arrival time, for tickets not yet aged (see
--                     "Fair queue" below)
--   K_QEXP      ZSET  ticket -> ticket expiry: every waiter of the API
--   K_STATE     HASH  the API's small state, read with one HMGET (two when an
--                     override or learned limits are in force):
--                       cooldown           until when the provider asked us to wait (us)
--                       o:until            the runtime override's end (us; 0: no end)
--                       o:<limit>          an overridden limit ("max_concurrent",
--                                          "w:<period us>", "tokens")
--                       p:until            when the limits learned from the
--                                          provider's headers lapse (us)
--                       p:<window>         a learned limit ("w:<period us>",
--                                          "tokens"), always below the configured
--                                          one; in force it lowers the limit
--                       x:<window>         sum of (weight - 1) over the window's entries
--                       c:<window>         the cutoff that sum was taken at (us)
--                       e                  when the keys' TTLs are next refreshed (us):
--                                          at most once a second, not at every admission
--                       q                  until when the API's tickets wait at least
--                                          (us): the last queued or renewed ticket's
--                                          expiry; past it, nobody waits
--                       successful_requests, failed_requests, response_time_us,
--                       refused:<reason>   totals for stats()
--   K_HANDED    HASH  slot id -> admission time, for slots a release handed to a
--                     waiter (read back by that waiter)
--   K_REQUESTS  ZSET  "<slot id>|<cost>" -> admission time: one log for every
--                     request window, trimmed to the longest; shorter windows
--                     count with ZCOUNT
--   K_TOKENS    ZSET  "<slot id>|<tokens>" -> admission time: the token window
--
-- The fair queue: keys named after the API's prefix (pfx(): "<ns>:{api}:"),
-- in the same hash tag, made and dropped as tenants come and go:
--   classes        ZSET  class -> -priority: the classes with waiters, highest
--                        first. A class is a priority ("10", "-5") or "aged"
--                        (score -1001), where waiters go after waiting AGING_US
--   t:<class>      ZSET  "<joined at us, 16 digits>|<tenant>" -> weighted service
--                        received (the VTC counter): the class's backlogged
--                        tenants, least served first; among equal counters, the
--                        one backlogged first (FIFO, not by name)
--   m:<class>      HASH  tenant -> its member in t:<class>
--   q:<class>:<t>  ZSET  ticket -> arrival: one tenant's waiters, FIFO
--   a:<class>      ZSET  tenant -> admissions from the queue since its backlog
--                        began (for stats())
--   weights        HASH  tenant -> "<weight> <until us>" (0: no end): weights set
--                        at run time, above the configured one of the ticket
-- A tenant's entries go with its last waiter in the class: state grows with the
-- tenants waiting now, not with every tenant ever seen.
--
-- A ticket is "<slot id>|<cost>|<tokens>|<priority>|<weight>|<tenant>"; a slot
-- id is "<process id>.<n>" (no "|"); the tenant is last and may hold anything.
-- Times are integers of microseconds of Redis TIME: no client clock is used.
-- A window's used weight is its entry count + x:<window>: entries of weight 1
-- (the common case) cost no bookkeeping beyond the sorted set itself.

-- What a script costs in Redis is mostly Lua work, not Redis calls: measured
-- with callgrind on Redis 7.0, a redis.call costs about 3k instructions, a
-- string.format('%.0f') 5k, a tonumber of a long numeral 2k, a table or a
-- closure 1-2k. Hence: '%d' for integers, numbers converted once, few tables,
-- and the functions of the contended paths made only when needed.


-- Made by contended() (at the end), on first use.
local contended, ttl_ms, parse_ticket, lease_of, drop_ticket, prune_tickets
local remove_weight, window_wait, tell, hint_head, drain, handed_at
local join, keep_queued, fair_key, correct_charge, weights_in_force

-- The API's key prefix "<ns>:{api}:", for the fair queue's and the limit sets' keys.
local function pfx()
  return KEYSET.prefix -- (bind_keys() names every key of the API from it)
end

-- Integers (below 2^53) as strings without exponent.
local function int(x) return string.format('%d', math.floor(x)) end

-- Per call: the clock. Per call and limit set (see "Limit sets" below): the
-- limits in force, the windows (W), their configuration (SPEC: WINDOWS, or a
-- set's; NREQ of them are request windows), the prefix of the set's fields in
-- the state hash (FP: "" for the API's own) and whether it keeps leases (HOLD).
-- begin() sets them (and resets every other per-call variable below) before
-- each operation runs.
local NOW, NOW_S, MAXC, W, LONGEST_R, LONGEST_T, SPEC, NREQ, FP, HOLD

-- The windows of one configuration list, shortest first within each log. kind
-- "r" weighs a request by its cost, "t" by its tokens. The tables are made once
-- per configuration (a table costs more Redis time than resetting five fields)
-- and every per-call field is reset here, at the start of each call. Returns
-- the list and each log's longest window.
local function windows_of(specs, nreq, log_r, log_t)
  local list = specs.w
  if not list then
    list = {}
    for i, spec in ipairs(specs) do
      list[i] = {id = spec.id, period = spec.period, kind = (i <= nreq) and 'r' or 't'}
    end
    specs.w = list
  end
  local longest_r, longest_t
  for i = 1, #list do
    local w = list[i]
    w.limit, w.extra, w.cut, w.used = specs[i].limit, 0, 0, 0
    if w.kind == 'r' then
      w.log = log_r
      longest_r = w -- the configuration lists each log's windows shortest first
    else
      w.log = log_t
      longest_t = w
    end
  end
  return list, longest_r, longest_t
end

local function weight_of(member)
  return tonumber(string.match(member, '|(%d+)$')) or 1
end

-- State -------------------------------------------------------------------

-- The state hash as load_state() read it; fields to write back at the end.
local LOADED, COOLDOWN, OVERRIDE_UNTIL, REFRESH_AT, PENDING
-- When the API's tickets last waited until (see note_queued()); nil: never.
local QUEUED_UNTIL
-- Limit sets (see "Limit sets" below): the set whose variables are current (nil:
-- the API has no sets), the API's own, those this call used, by id.
local CUR, API_SET, RUNTIME, use, each_set
-- The sets this call used, TOUCHED[1 .. TOUCHED_N]; CALL counts the calls (a set's
-- per-call variables are reset when a call first uses it: see set_of()).
local TOUCHED, TOUCHED_N, CALL = {}, 0, 0

local function set_state(field, value)
  if not PENDING then PENDING = {} end
  PENDING[#PENDING + 1] = field
  PENDING[#PENDING + 1] = value
end

-- Read the cooldown, the extras, when TTLs are next due, whether an override or
-- learned limits exist (and for the API's own set when tickets last waited) in one
-- HMGET; only when an override or learned limits are in force, read those in a
-- second one. Apply the override in force to MAXC and the windows' limits, then a
-- learned limit in force where it is lower.
local function load_state()
  if LOADED then return end
  LOADED = true
  local fields = SPEC.fields -- made once per configuration (see bind_config)
  if not fields then
    local f = FP
    fields = {f .. 'cooldown', f .. 'o:until', f .. 'e', f .. 'p:until'}
    for _, spec in ipairs(SPEC) do
      fields[#fields + 1] = f .. 'x:' .. spec.id
      fields[#fields + 1] = f .. 'c:' .. spec.id
    end
    if f == '' then fields[#fields + 1] = 'q' end
    local limits = {f .. 'o:max_concurrent'}
    for _, spec in ipairs(SPEC) do
      limits[#limits + 1] = f .. 'o:' .. spec.id
      limits[#limits + 1] = f .. 'p:' .. spec.id
    end
    SPEC.fields, SPEC.limit_fields = fields, limits
  end
  local v = redis.call('HMGET', K_STATE, unpack_list(fields))
  if v[1] then COOLDOWN = tonumber(v[1]) end
  if v[2] then OVERRIDE_UNTIL = tonumber(v[2]) end
  if v[3] then REFRESH_AT = tonumber(v[3]) end
  for i = 1, #W do
    local w = W[i]
    local at = 3 + 2 * i
    if v[at] then
      w.extra = tonumber(v[at])
      w.cut = tonumber(v[at + 1])
    end
  end
  if FP == '' and v[#fields] then QUEUED_UNTIL = tonumber(v[#fields]) end
  local ends = OVERRIDE_UNTIL
  local override = ends and (ends == 0 or ends > NOW)
  local learned = v[4] and tonumber(v[4]) > NOW
  if not (override or learned) then return end
  v = redis.call('HMGET', K_STATE, unpack_list(SPEC.limit_fields))
  if override and v[1] then MAXC = tonumber(v[1]) end
  for i = 1, #W do
    local w = W[i]
    if override and v[2 * i] then w.limit = tonumber(v[2 * i]) end
    if learned and v[2 * i + 1] then w.limit = math.min(w.limit, tonumber(v[2 * i + 1])) end
  end
end

-- Tickets wait until at least now + TICKET_US (a ticket was queued or renewed): an
-- admission that finds that time past knows nobody waits without asking K_QEXP.
-- (The API's own set must be current.)
local function note_queued()
  load_state()
  QUEUED_UNTIL = NOW + TICKET_US
  set_state('q', int(QUEUED_UNTIL))
end

-- A TTL in milliseconds for something that lives `life` us: the life plus a
-- slack of a quarter of it, at least a second (TTLs are refreshed every second).
local function ttl(life)
  return math.ceil((life + math.max(1000000, life / 4)) / 1000)
end

-- ttl(life) as PEXPIRE's argument, for the lives of a configuration (the lease,
-- a window's period): made once each (a number argument costs Redis a float-to-text
-- conversion at every call).
local TTL_TEXT = {}
local function ttl_arg(life)
  local t = TTL_TEXT[life]
  if not t then
    t = string.format('%d', ttl(life))
    TTL_TEXT[life] = t
  end
  return t
end

-- Give every key of the API a TTL covering its life from now, at most once a
-- second: a busy API pays for it once a second, not at every admission. Entries
-- added until the next refresh are covered by the slack. Expired leases and
-- what left the longest windows are dropped at the same time.
local STATE_TTL -- the state hash's TTL to set in flush(): ms, -1 (none), false
local LEASES -- see lease_count()
local measure -- see below
local function refresh()
  if REFRESH_AT and REFRESH_AT > NOW then return end
  REFRESH_AT = NOW + 1000000
  set_state(FP .. 'e', int(REFRESH_AT))
  if HOLD then
    redis.call('ZREMRANGEBYSCORE', K_HOLDERS, '-inf', NOW)
    redis.call('PEXPIRE', K_HOLDERS, ttl_arg(LEASE_US))
  end
  LEASES = nil
  -- Each log is measured before it is trimmed: the extra weight of what leaves a
  -- window is only subtracted by measure(), which must still see those entries.
  if LONGEST_R then
    measure('r')
    redis.call('ZREMRANGEBYSCORE', K_REQUESTS, '-inf', NOW - LONGEST_R.period)
    redis.call('PEXPIRE', K_REQUESTS, ttl_arg(LONGEST_R.period))
  end
  if LONGEST_T then
    measure('t')
    redis.call('ZREMRANGEBYSCORE', K_TOKENS, '-inf', NOW - LONGEST_T.period)
    redis.call('PEXPIRE', K_TOKENS, ttl_arg(LONGEST_T.period))
  end
  -- The state hash: its totals stats_ttl, its extras as long as the longest
  -- window, a cooldown or an override while in force; an override without end
  -- keeps it for ever.
  -- (With limit sets, the longest any set asks for.)
  if OVERRIDE_UNTIL == 0 or STATE_TTL == -1 then
    STATE_TTL = -1
  else
    local life = LIFE_US
    if OVERRIDE_UNTIL and OVERRIDE_UNTIL > NOW then life = math.max(life, OVERRIDE_UNTIL - NOW) end
    if COOLDOWN > NOW then life = math.max(life, COOLDOWN - NOW) end
    STATE_TTL = math.max(STATE_TTL or 0, ttl(life))
  end
end

-- After a change of the cooldown or the override: refresh every TTL now.
local function refresh_now()
  load_state()
  REFRESH_AT = nil
end

-- Write pending state fields, then the state's TTL (PEXPIRE needs the key).
-- Every script that may have written calls it last.
local function flush()
  if CUR then
    if not each_set(refresh) then return end
  else
    if not LOADED then return end
    refresh()
  end
  if PENDING then redis.call('HSET', K_STATE, unpack_list(PENDING)) end
  if STATE_TTL == -1 then
    redis.call('PERSIST', K_STATE)
  elseif STATE_TTL then
    redis.call('PEXPIRE', K_STATE, int(STATE_TTL))
  end
end

-- Add n to a total. A field that did not exist may mean a new hash: flush()
-- then gives it its TTL.
local function count(field, n)
  -- ('1' as text: a number argument costs Redis a float-to-text conversion)
  if redis.call('HINCRBY', K_STATE, field, n == 1 and '1' or int(n)) == n then load_state() end
end

-- Leases ------------------------------------------------------------------

-- LEASES: leases counted, expired ones included (they are pruned when they
-- could matter: near the limit, and at every refresh). nil: unknown.

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

-- Windows -----------------------------------------------------------------

-- Bring every window of one log up to now: subtract the extra weight of
-- entries that left it and count each window (ZCOUNT from its cutoff). What left
-- the longest window is trimmed at refresh(), not at every call. Sets w.used;
-- once per call and log. A log whose longest window is empty may have been
-- dropped by Redis with its TTL: it is marked fresh.
local MEASURED_R, MEASURED_T, FRESH_R, FRESH_T
measure = function(kind)
  local longest
  if kind == 'r' then
    if MEASURED_R or not LONGEST_R then return end
    MEASURED_R, longest = true, LONGEST_R
  else
    if MEASURED_T or not LONGEST_T then return end
    MEASURED_T, longest = true, LONGEST_T
  end
  load_state()
  for i = 1, #W do
    local w = W[i]
    if w.kind == kind then
      local cutoff = NOW - w.period
      if w.extra > 0 and cutoff > w.cut then
        local before = w.extra
        local left = redis.call('ZRANGEBYSCORE', w.log, '(' .. int(w.cut), int(cutoff))
        for j = 1, #left do
          w.extra = w.extra - (weight_of(left[j]) - 1)
        end
        if w.extra < 0 then w.extra = 0 end
        if w.extra ~= before then
          -- (Unchanged, the stored sum still holds from the stored cutoff: nothing
          -- of weight above 1 left between the two.)
          set_state(FP .. 'x:' .. w.id, int(w.extra))
          set_state(FP .. 'c:' .. w.id, int(cutoff))
        end
      end
      w.cut = cutoff
      local n = redis.call('ZCOUNT', w.log, '(' .. int(cutoff), '+inf')
      if n == 0 then
        if w == longest then
          if kind == 'r' then FRESH_R = true else FRESH_T = true end
        end
        if w.extra > 0 then
          w.extra = 0
          set_state(FP .. 'x:' .. w.id, '0')
        end
      end
      w.used = n + w.extra
    end
  end
end

-- Add `n` weight units (n >= 1) admitted at `at` (default now) to the windows
-- of log `kind` that hold that time.
local function add_weight(kind, n, at)
  for i = 1, #W do
    local w = W[i]
    if w.kind == kind and (at == nil or at > w.cut) then
      w.used = w.used + n
      if n > 1 then
        if w.extra == 0 then set_state(FP .. 'c:' .. w.id, int(w.cut)) end
        w.extra = w.extra + n - 1
        set_state(FP .. 'x:' .. w.id, int(w.extra))
      end
    end
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
  if COOLDOWN > NOW then reason, wait = 'cooldown', COOLDOWN - NOW end
  if cost > 0 then measure('r') end
  if tokens > 0 then measure('t') end
  for i = 1, #W do
    local w = W[i]
    local n = (w.kind == 't') and tokens or cost
    if n > 0 and w.used + n > w.limit then
      contended()
      local wi = window_wait(w, w.used + n - w.limit)
      if wi > wait then reason, wait = w.id, wi end
    end
  end
  if reason then return reason, wait end
  if MAXC > 0 and lease_count(MAXC) >= MAXC then
    local first = redis.call('ZRANGEBYSCORE', K_HOLDERS, '(' .. NOW_S, '+inf',
                             'WITHSCORES', 'LIMIT', 0, 1)
    return 'concurrency', tonumber(first[2]) - NOW
  end
  return nil
end

-- One entry of weight n in the log whose longest window is `longest`; a log
-- that was empty (a new key) gets its TTL now.
local function log_entry(longest, slot, n, fresh)
  redis.call('ZADD', longest.log, NOW_S, slot .. (n == 1 and '|1' or '|' .. int(n)))
  add_weight(longest.kind, n)
  if fresh then redis.call('PEXPIRE', longest.log, ttl_arg(longest.period)) end
end

-- Record one admission: a lease and one weighted entry in each log. `lease`
-- defaults to the full lease length. Call check() first (it measures).
local function admit(slot, cost, tokens, lease)
  if HOLD then
    local fresh = lease_count(0) == 0 -- an empty holders set is a new key
    redis.call('ZADD', K_HOLDERS, int(NOW + (lease or LEASE_US)), slot)
    if fresh then redis.call('PEXPIRE', K_HOLDERS, ttl_arg(LEASE_US)) end
    LEASES = LEASES + 1
  end
  if cost > 0 and LONGEST_R then
    log_entry(LONGEST_R, slot, cost, FRESH_R)
    FRESH_R = false
  end
  if tokens > 0 and LONGEST_T then
    log_entry(LONGEST_T, slot, tokens, FRESH_T)
    FRESH_T = false
  end
end

local function count_refusal(reason)
  count('refused:' .. reason, 1)
end

-- The first window whose limit in force is below this request's weight, or nil.
-- Only a runtime override can make a request too heavy (the client refuses
-- those above the configured limits); such a request can never pass.
local function too_heavy(cost, tokens)
  load_state()
  for i = 1, #W do
    local w = W[i]
    if ((w.kind == 't') and tokens or cost) > w.limit then return w end
  end
  return nil
end

-- Limit sets --------------------------------------------------------------

-- An API may have limit sets besides its own (SETS, by id, from the
-- configuration; false when none): one per deployment "d:<name>" (DEPS lists
-- their names in order), per model "m:<model>", and per model within a
-- deployment "d:<name>:m:<model>". A request passes the API's limits, its
-- model's and those of one deployment with that deployment's model set: all of
-- them, or none records anything. Each set has its own keys (pfx() .. id ..
-- ":holders", ":requests", ":tokens": the API's hash tag) and its fields in the
-- API's state hash (id .. ":cooldown", id .. ":x:<window>", ...). The functions
-- above work on the set whose variables are current: use(set) swaps them, and
-- every function below leaves the API's set current.

-- The functions of this section are made on first use (begin() calls
-- limit_sets() for an API that has sets): a script makes its closures at every
-- call, and an API without limit sets needs none of them.
local save_all, save, set_of, base_ids, group_ids, append_sets, sets_in, weight_in, fullness, check_list, check_sets, admit_sets, extend_sets, heavy_in, too_heavy_sets
local function limit_sets()
  if set_of then return end

  -- Every variable of the current set into table t (begin(): the API's own set).
  save_all = function(t)
    t[1], t[2], t[3], t[4], t[5], t[6], t[7] =
      W, MAXC, LONGEST_R, LONGEST_T, K_HOLDERS, K_REQUESTS, K_TOKENS
    t[8], t[9], t[10], t[11], t[12], t[13], t[14], t[15] =
      SPEC, NREQ, FP, HOLD, LOADED, COOLDOWN, OVERRIDE_UNTIL, REFRESH_AT
    t[16], t[17], t[18], t[19], t[20] = LEASES, MEASURED_R, MEASURED_T, FRESH_R, FRESH_T
  end

  -- Those that change during a call (the others, keys and window tables, do not).
  save = function(t)
    t[2], t[12], t[13], t[14], t[15] = MAXC, LOADED, COOLDOWN, OVERRIDE_UNTIL, REFRESH_AT
    t[16], t[17], t[18], t[19], t[20] = LEASES, MEASURED_R, MEASURED_T, FRESH_R, FRESH_T
  end

  use = function(s)
    if s == CUR then return end
    save(CUR)
    W, MAXC, LONGEST_R, LONGEST_T, K_HOLDERS, K_REQUESTS, K_TOKENS =
      s[1], s[2], s[3], s[4], s[5], s[6], s[7]
    SPEC, NREQ, FP, HOLD, LOADED, COOLDOWN, OVERRIDE_UNTIL, REFRESH_AT =
      s[8], s[9], s[10], s[11], s[12], s[13], s[14], s[15]
    LEASES, MEASURED_R, MEASURED_T, FRESH_R, FRESH_T = s[16], s[17], s[18], s[19], s[20]
    CUR = s
  end

  -- Call refresh() in every set this call loaded whose refresh is due (the API's
  -- first); true when any set was loaded. (A set not due is not swapped in.)
  each_set = function(refresh_set)
    local any = false
    for i = 1, TOUCHED_N do
      local s = TOUCHED[i]
      local loaded, at = s[12], s[15]
      if s == CUR then loaded, at = LOADED, REFRESH_AT end
      if loaded then
        any = true
        if not at or at <= NOW then
          use(s)
          refresh_set()
        end
      end
    end
    use(API_SET)
    return any
  end

  -- The set named `id` as this call sees it, or false when the API has none such.
  -- s[21] says what its token windows weigh: "in" a request's input tokens, "out"
  -- its output tokens (the sets "<base>#in" and "<base>#out" of input and output
  -- token budgets), nil its tokens. The table is made once per API (or key) and
  -- configuration (RUNTIME: see begin()); its per-call variables are reset when a
  -- call first uses it.
  set_of = function(id)
    local s = RUNTIME[id]
    if s == nil then
      local spec = SETS[id]
      if not spec then
        RUNTIME[id] = false
        return false
      end
      local p = pfx() .. id .. ':'
      s = {false, spec.maxc, false, false, p .. 'holders', p .. 'requests', p .. 'tokens',
           spec.windows, spec.nreq, id .. ':', spec.maxc > 0, false, 0, nil, nil, nil,
           false, false, false, false, string.match(id, '#(%a+)$'), spec = spec}
      RUNTIME[id] = s
    elseif not s then
      return false
    end
    if s.call ~= CALL then
      s.call = CALL
      local spec = s.spec
      s[1], s[3], s[4] = windows_of(spec.windows, spec.nreq, s[6], s[7])
      s[2], s[12], s[13], s[14], s[15], s[16] = spec.maxc, false, 0, nil, nil, nil
      s[17], s[18], s[19], s[20] = false, false, false, false
      TOUCHED_N = TOUCHED_N + 1
      TOUCHED[TOUCHED_N] = s
    end
    return s
  end

  -- The ids of the sets of `base` ("" the API, whose own set is API_SET and is not
  -- listed; "m:<model>", "d:<name>", "d:<name>:m:<model>"): the set itself and its
  -- input and output budgets, those that exist.
  base_ids = function(base)
    local ids = {}
    if base ~= '' and SETS[base] then ids[#ids + 1] = base end
    if SETS[base .. '#in'] then ids[#ids + 1] = base .. '#in' end
    if SETS[base .. '#out'] then ids[#ids + 1] = base .. '#out' end
    return ids
  end

  -- base_ids() of the API (dep and model nil), of a model, of a deployment, or of a
  -- model within a deployment: made once per configuration (GROUPS, at most 1,000
  -- kept), not rebuilt from strings at every call. The list is shared: never change it.
  group_ids = function(dep, model)
    local g
    if not dep then
      if not model then
        g = GROUPS.api
        if not g then
          g = base_ids('')
          GROUPS.api = g
        end
        return g
      end
      g = GROUPS.m[model]
      if g then return g end
      g = base_ids('m:' .. model)
      GROUPS.m[model] = g
    elseif not model then
      g = GROUPS.d[dep]
      if g then return g end
      g = base_ids('d:' .. dep)
      GROUPS.d[dep] = g
    else
      local t = GROUPS.dm[dep]
      if not t then
        t = {}
        GROUPS.dm[dep] = t
      end
      g = t[model]
      if g then return g end
      g = base_ids('d:' .. dep .. ':m:' .. model)
      t[model] = g
    end
    GROUPS.n = GROUPS.n + 1
    if GROUPS.n > 1000 then GROUPS.m, GROUPS.d, GROUPS.dm, GROUPS.n = {}, {}, {}, 0 end
    return g
  end

  -- Append to `list` the sets named in `ids`.
  append_sets = function(list, ids)
    for i = 1, #ids do list[#list + 1] = set_of(ids[i]) end
    return list
  end

  -- The sets besides the API's own that a slot of deployment `dep` (nil or "":
  -- none) and `model` ("" or nil: none) counts in.
  sets_in = function(dep, model)
    local out = {}
    if model == '' then model = nil end
    if dep == '' then dep = nil end
    append_sets(out, group_ids(nil, nil))
    if model then append_sets(out, group_ids(nil, model)) end
    if dep then
      append_sets(out, group_ids(dep, nil))
      if model then append_sets(out, group_ids(dep, model)) end
    end
    return out
  end

  -- What a request weighs in set s's token windows.
  weight_in = function(s, tokens, inp, outp)
    local w = s[21]
    if w == 'in' then return inp end
    if w == 'out' then return outp end
    return tokens
  end

  -- How full the current set would be with this request: the largest used
  -- fraction of its limits (leases of max_concurrent, each window's weight).
  fullness = function(cost, tokens)
    local f = 0
    if MAXC > 0 then f = (lease_count(MAXC) + 1) / MAXC end
    for i = 1, #W do
      local w = W[i]
      local n = (w.kind == 't') and tokens or cost
      if n > 0 then f = math.max(f, (w.used + n) / w.limit) end
    end
    return f
  end

  -- check() in every set named in `ids`: reason, wait of the first that refuses,
  -- else nil and the largest fullness().
  check_list = function(ids, cost, tokens, inp, outp)
    local full = 0
    for i = 1, #ids do
      local s = set_of(ids[i])
      use(s)
      local t = weight_in(s, tokens, inp, outp)
      local r, wt = check(cost, t)
      if r then return r, wt end
      full = math.max(full, fullness(cost, t))
    end
    return nil, full
  end

  -- check() across every set a request of `model` passes (with `inp` input and
  -- `outp` output tokens for the input and output budgets). Returns nil, nil,
  -- deployment when it can be admitted now (deployment nil when the API has none):
  -- of the deployments that admit it, the least full (the largest fullness() of the
  -- deployment's sets), ties to the first in DEPS from a start that rotates with the
  -- clock. Else reason, wait, nil, by_model: the API's or the model's refusal, or,
  -- when every deployment refuses, the refusal that ends first; by_model is true when
  -- limits of its model refused it where others had room (the model's own, or a
  -- deployment's model set on a deployment that has room), so that requests for other
  -- models may pass it (see drain).
  check_sets = function(cost, tokens, model, inp, outp)
    local reason, wait
    local m = model ~= '' and model or nil
    reason, wait = check_list(group_ids(nil, nil), cost, tokens, inp, outp)
    if not reason and m then
      reason, wait = check_list(group_ids(nil, m), cost, tokens, inp, outp)
      if reason then
        use(API_SET)
        return reason, wait, nil, true
      end
    end
    use(API_SET)
    if reason then return reason, wait end
    if not DEPS then return nil end
    local n = #DEPS
    local start = NOW % n
    local best, least, by_model = nil, nil, false
    for i = 1, n do
      local dep = DEPS[(start + i - 1) % n + 1]
      local r, x = check_list(group_ids(dep, nil), cost, tokens, inp, outp)
      local full, of_model = x, false
      if not r and m then
        local r2, x2 = check_list(group_ids(dep, m), cost, tokens, inp, outp)
        if r2 then
          r, x, of_model = r2, x2, true
        else
          full = math.max(full, x2)
        end
      end
      if r then
        if of_model then by_model = true end -- (other models may fit this deployment)
        if not reason or x < wait then reason, wait = r, x end
      elseif not best or full < least then
        best, least = dep, full
      end
    end
    use(API_SET)
    if best then return nil, nil, best end
    return reason, wait, nil, by_model
  end

  -- admit() in every set of the request (check_sets() first: it measures).
  admit_sets = function(slot, cost, tokens, lease, dep, model, inp, outp)
    for _, s in ipairs(sets_in(dep, model)) do
      use(s)
      admit(slot, cost, weight_in(s, tokens, inp, outp), lease)
    end
    use(API_SET)
  end

  -- A held slot's full lease again in the sets besides the API's (never made anew).
  extend_sets = function(slot, dep, model)
    for _, s in ipairs(sets_in(dep, model)) do
      use(s)
      if HOLD then
        load_state() -- flush() then keeps the holders' TTL ahead of the lease
        redis.call('ZADD', K_HOLDERS, 'XX', int(NOW + LEASE_US), slot)
      end
    end
    use(API_SET)
  end

  -- too_heavy() in every set named in `ids`: the first window found, or nil.
  heavy_in = function(ids, cost, tokens, inp, outp)
    for i = 1, #ids do
      local s = set_of(ids[i])
      use(s)
      local h = too_heavy(cost, weight_in(s, tokens, inp, outp))
      if h then return h end
    end
    return nil
  end

  -- too_heavy() across the sets: the API's, the model's, and every deployment (a
  -- request that one deployment can take is not too heavy).
  too_heavy_sets = function(cost, tokens, model, inp, outp)
    local heavy
    local m = model ~= '' and model or nil
    heavy = heavy_in(group_ids(nil, nil), cost, tokens, inp, outp)
    if not heavy and m then heavy = heavy_in(group_ids(nil, m), cost, tokens, inp, outp) end
    use(API_SET)
    if heavy or not DEPS then return heavy end
    local first
    for _, dep in ipairs(DEPS) do
      local h = heavy_in(group_ids(dep, nil), cost, tokens, inp, outp)
      if not h and m then h = heavy_in(group_ids(dep, m), cost, tokens, inp, outp) end
      if not h then
        use(API_SET)
        return nil
      end
      first = first or h
    end
    use(API_SET)
    return first
  end
end

-- The entry points of the admission path, with the case of an API without
-- limit sets done here (see the functions of the same meaning above).
local function check_all(cost, tokens, model, inp, outp)
  local reason, wait = check(cost, tokens)
  if reason or not SETS then return reason, wait end
  return check_sets(cost, tokens, model, inp, outp)
end

local function admit_all(slot, cost, tokens, lease, dep, model, inp, outp)
  admit(slot, cost, tokens, lease)
  if SETS then admit_sets(slot, cost, tokens, lease, dep, model, inp, outp) end
end

local function extend(slot, dep, model)
  if SETS then extend_sets(slot, dep, model) end
end

local function too_heavy_all(cost, tokens, model, inp, outp)
  local heavy = too_heavy(cost, tokens)
  if heavy or not SETS then return heavy end
  return too_heavy_sets(cost, tokens, model, inp, outp)
end

-- The sets besides the API's own that a slot of deployment `dep` and `model`
-- counts in (none for an API without limit sets).
local function sets_of(dep, model)
  if not SETS then return {} end
  return sets_in(dep, model)
end

-- Move the queue: drop dead leases and tickets, admit the waiters that fit now,
-- tell the one left at the head how long it waits. Returns how many were woken.
local function move_queue()
  if redis.call('ZCARD', K_QEXP) == 0 then return 0 end
  contended()
  prune_leases()
  prune_tickets()
  local _, head, _, wait, woken = drain(nil)
  hint_head(head, wait, nil)
  return woken
end

-- Start an operation: read the clock, reset every per-call variable. (Under
-- Redis Functions this file is loaded once and its variables outlive a call.)
local function begin()
  local t = redis.call('TIME')
  NOW = t[1] * 1000000 + t[2]
  NOW_S = t[1] .. string.sub('00000' .. t[2], -6) -- = int(NOW), without a format
  MAXC, SPEC, NREQ, FP, HOLD = MAX_CONCURRENT, WINDOWS, REQUEST_WINDOWS, '', true
  W, LONGEST_R, LONGEST_T = windows_of(WINDOWS, REQUEST_WINDOWS, K_REQUESTS, K_TOKENS)
  LOADED, COOLDOWN, OVERRIDE_UNTIL, REFRESH_AT, PENDING = false, 0, nil, nil, nil
  QUEUED_UNTIL = nil
  STATE_TTL, LEASES = false, nil
  MEASURED_R, MEASURED_T, FRESH_R, FRESH_T = false, false, false, false
  if SETS then
    limit_sets()
    -- The sets' tables of this API (or key) and configuration, kept between calls.
    CALL = CALL + 1
    local k = KEYSET
    if k.sets_for ~= SETS then k.sets, k.sets_for, k.api_set = {}, SETS, {} end
    RUNTIME, API_SET = k.sets, k.api_set
    save_all(API_SET)
    CUR, TOUCHED_N = API_SET, 1
    TOUCHED[1] = API_SET
  else
    CUR = nil
  end
end

-- Contended and rare paths -------------------------------------------------

-- The functions below are made on first use: a Lua closure costs Redis time at
-- every call, and an uncontended admission or release needs none of them.

contended = function()
  if drain then return end
  -- PEXPIRE argument for something that lives `us` microseconds, plus a second.
  ttl_ms = function(us) return math.floor(us / 1000) + 1000 end

  -- slot id, cost, tokens, priority (the class name), weight, tenant, model,
  -- input tokens, output tokens; priority and tenant are nil for a ticket of
  -- another format, model "". The tokens field is "<tokens>", or
  -- "<tokens>/<input>/<output>" for a request that gave them apart (else both
  -- are its tokens).
  parse_ticket = function(ticket)
    local slot, cost, tokens, prio, weight, model, tenant =
      string.match(ticket, '^(.-)|(%d+)|([%d/]+)|(-?%d+)|([^|]*)|([^|]*)|(.*)$')
    local inp, outp
    if slot then
      local t, i, o = string.match(tokens, '^(%d+)/(%d+)/(%d+)$')
      if t then tokens, inp, outp = t, tonumber(i), tonumber(o) end
    end
    if not slot then -- (a ticket of a version before models)
      slot, cost, tokens, prio, weight, tenant =
        string.match(ticket, '^(.-)|(%d+)|(%d+)|(-?%d+)|([^|]*)|(.*)$')
    end
    if not slot then
      slot, cost, tokens = string.match(ticket, '^(.-)|(%d+)|(%d+)$')
    end
    tokens = tonumber(tokens)
    return slot, tonumber(cost), tokens, prio, tonumber(weight) or 1, tenant, model or '',
           inp or tokens, outp or tokens
  end

  -- The lease expiry of `slot` when it is still live, else nil.
  lease_of = function(slot)
    local at = tonumber(redis.call('ZSCORE', K_HOLDERS, slot))
    if at and at > NOW then return at end
    return nil
  end

  -- Fair queue ------------------------------------------------------------

  -- `kind` "q" (with the tenant), "t", "m", "v" or "a" of a class; "classes",
  -- "weights", "charged".
  fair_key = function(kind, class, tenant)
    if tenant then return pfx() .. 'q:' .. class .. ':' .. tenant end
    if class then return pfx() .. kind .. ':' .. class end
    return pfx() .. kind
  end

  -- Put `tenant` in the backlogged tenants of `class` (whose order in the classes
  -- is `score`) unless it is there. Its counter starts at the larger of the least
  -- counter of those backlogged (as VTC does: an idle tenant banks no credit, a
  -- new one is served at once, not after the others' history) and what it had
  -- when it last left while others waited (v:<class>: leaving does not wipe a
  -- debt). Returns its member in t:<class>.
  local function backlog(class, score, tenant)
    local tk, mk, vk = fair_key('t', class), fair_key('m', class), fair_key('v', class)
    local member = redis.call('HGET', mk, tenant)
    if member and redis.call('ZSCORE', tk, member) then return member end
    local classes = fair_key('classes')
    local least = redis.call('ZRANGE', tk, 0, 0, 'WITHSCORES')
    local start = 0
    if #least == 0 then
      redis.call('DEL', vk) -- nobody waits in the class: nobody owes anything
    else
      start = tonumber(least[2])
      local owed = tonumber(redis.call('ZSCORE', vk, tenant))
      if owed and owed > start then start = owed end
      redis.call('ZREM', vk, tenant)
      redis.call('ZREMRANGEBYSCORE', vk, '-inf', least[2]) -- debts nobody can owe now
    end
    redis.call('ZADD', classes, 'NX', score, class)
    member = string.format('%016d|', NOW) .. tenant
    redis.call('ZADD', tk, start, member)
    redis.call('HSET', mk, tenant, member)
    return member
  end

  -- Put `ticket` (arrived at `at`) in the queue of `tenant` in `class`.
  join = function(class, score, tenant, ticket, at)
    backlog(class, score, tenant)
    local q = fair_key('q', class, tenant)
    redis.call('ZADD', q, at, ticket)
    local life = ttl_ms(TICKET_US)
    for _, k in ipairs({q, fair_key('t', class), fair_key('m', class), fair_key('a', class),
                        fair_key('v', class), fair_key('classes')}) do
      redis.call('PEXPIRE', k, life)
    end
  end

  -- After a ticket left the queue of `tenant` in `class`: a tenant with none left
  -- leaves the class. Its counter (plus `charge`, the service just given) is kept
  -- in v:<class> while others wait there; a class with no tenant left goes.
  -- Returns true when the tenant left.
  local function left(class, tenant, charge)
    if redis.call('EXISTS', fair_key('q', class, tenant)) == 1 then return false end
    local tk, mk = fair_key('t', class), fair_key('m', class)
    local member = redis.call('HGET', mk, tenant)
    if member then
      local counter = tonumber(redis.call('ZSCORE', tk, member))
      redis.call('ZREM', tk, member)
      redis.call('HDEL', mk, tenant)
      if counter and redis.call('EXISTS', tk) == 1 then
        local vk = fair_key('v', class)
        redis.call('ZADD', vk, counter + (charge or 0), tenant)
        redis.call('PEXPIRE', vk, ttl_ms(TICKET_US))
      end
    end
    redis.call('ZREM', fair_key('a', class), tenant)
    if redis.call('EXISTS', tk) == 0 then
      redis.call('ZREM', fair_key('classes'), class)
      redis.call('DEL', fair_key('v', class), fair_key('a', class))
    end
    return true
  end

  -- Take `ticket` out of the queue, wherever it is.
  drop_ticket = function(ticket)
    redis.call('ZREM', K_QEXP, ticket)
    redis.call('ZREM', K_QUEUE, ticket)
    local _, _, _, prio, _, tenant = parse_ticket(ticket)
    if not tenant then return end
    if redis.call('ZREM', fair_key('q', prio, tenant), ticket) == 1 then
      left(prio, tenant)
    elseif redis.call('ZREM', fair_key('q', 'aged', tenant), ticket) == 1 then
      left('aged', tenant)
    end
  end

  -- A queued ticket of a live waiter (renewed, or asking again): put it back in its
  -- tenant's queue if the queue's keys were lost under it (expired, evicted,
  -- deleted). With `seen` (a renewal) also repair its tenant's entries in the
  -- class and give every key its life again, each key once per call (`seen` holds
  -- those done).
  keep_queued = function(ticket, seen)
    local _, _, _, prio, _, tenant = parse_ticket(ticket)
    if not tenant then return end
    for _, class in ipairs({prio, 'aged'}) do
      local q = fair_key('q', class, tenant)
      if redis.call('ZSCORE', q, ticket) then
        if not seen or seen[q] then return end
        seen[q] = true
        local score = (class == 'aged') and -1001 or -tonumber(prio)
        backlog(class, score, tenant)
        redis.call('ZADD', fair_key('classes'), 'NX', score, class)
        local life = ttl_ms(TICKET_US)
        for _, k in ipairs({q, fair_key('t', class), fair_key('m', class),
                            fair_key('a', class), fair_key('v', class),
                            fair_key('classes')}) do
          if k == q or not seen[k] then
            seen[k] = true
            redis.call('PEXPIRE', k, life)
          end
        end
        return
      end
    end
    -- In no queue: back in place. A ticket that aged (no longer in K_QUEUE) goes
    -- back to the aged class, not to the end of its priority.
    local at = redis.call('ZSCORE', K_QUEUE, ticket)
    if AGING_US > 0 and not at then
      join('aged', -1001, tenant, ticket, int(NOW))
    else
      join(prio, -tonumber(prio), tenant, ticket, at or int(NOW))
    end
  end

  -- Drop expired tickets (only worth calling when the queue is not empty): out of
  -- K_QEXP and K_QUEUE in batches, out of each tenant's queue in one call per
  -- tenant and class.
  prune_tickets = function()
    local dead = redis.call('ZRANGEBYSCORE', K_QEXP, '-inf', NOW)
    if #dead == 0 then return end
    for i = 1, #dead, 1000 do
      local j = math.min(i + 999, #dead)
      redis.call('ZREM', K_QEXP, unpack_list(dead, i, j))
      redis.call('ZREM', K_QUEUE, unpack_list(dead, i, j))
    end
    local by, order = {}, {}
    for _, ticket in ipairs(dead) do
      local _, _, _, prio, _, tenant = parse_ticket(ticket)
      if tenant then
        local key = prio .. ':' .. tenant
        if not by[key] then
          by[key] = {prio, tenant}
          order[#order + 1] = key
        end
        local list = by[key]
        list[#list + 1] = ticket
      end
    end
    for _, key in ipairs(order) do
      local list = by[key]
      local prio, tenant = list[1], list[2]
      for _, class in ipairs((AGING_US > 0) and {prio, 'aged'} or {prio}) do
        local q = fair_key('q', class, tenant)
        local gone = 0
        for i = 3, #list, 1000 do
          gone = gone + redis.call('ZREM', q, unpack_list(list, i, math.min(i + 999, #list)))
        end
        if gone > 0 then left(class, tenant) end
      end
    end
  end

  -- Move the tickets that have waited AGING_US into the class "aged", above
  -- every priority (FIFO by arrival; at most 100 per call).
  local function promote()
    if AGING_US <= 0 then return end
    local old = redis.call('ZRANGEBYSCORE', K_QUEUE, '-inf', NOW - AGING_US,
                           'WITHSCORES', 'LIMIT', 0, 100)
    for i = 1, #old, 2 do
      local ticket = old[i]
      local _, _, _, prio, _, tenant = parse_ticket(ticket)
      if tenant then
        local moved = redis.call('ZREM', fair_key('q', prio, tenant), ticket) == 1
        if moved then left(prio, tenant) end
        if moved or (redis.call('ZSCORE', K_QEXP, ticket)
                     and not redis.call('ZSCORE', fair_key('q', 'aged', tenant), ticket)) then
          join('aged', -1001, tenant, ticket, old[i + 1])
        end
      end
      redis.call('ZREM', K_QUEUE, ticket)
    end
  end

  -- The ticket to serve next, its class, tenant and member in t:<class>, or nil:
  -- the highest class, in it the tenant with the least weighted service (ties:
  -- the one backlogged first), that tenant's oldest ticket.
  local function next_ticket()
    promote()
    local classes = fair_key('classes')
    for _ = 1, 1000 do -- each turn that finds nothing repairs one stale entry
      local c = redis.call('ZRANGE', classes, 0, 0)
      if #c == 0 then return nil end
      local class = c[1]
      local t = redis.call('ZRANGE', fair_key('t', class), 0, 0)
      if #t == 0 then
        redis.call('ZREM', classes, class)
      else
        local tenant = string.match(t[1], '^%d+|(.*)$') or t[1]
        local q = redis.call('ZRANGE', fair_key('q', class, tenant), 0, 0)
        if #q > 0 then return q[1], class, tenant, t[1] end
        if not left(class, tenant) or redis.call('ZSCORE', fair_key('t', class), t[1]) then
          redis.call('ZREM', fair_key('t', class), t[1]) -- a stale member
        end
      end
    end
    return nil
  end

  -- A weight set at run time, "<weight> <until us>" (0: no end): its weight text
  -- and end when it is still in force, else nil.
  local function weight_entry(v)
    local w, till = string.match(v or '', '^(%S+) (%d+)$')
    till = tonumber(till)
    if till and (till == 0 or till > NOW) then return w, till end
    return nil
  end

  -- The weights set at run time still in force: a flat tenant, weight, ms left (-1:
  -- no end) list, and how long the longest lasts (us; -1: one has no end). With
  -- `drop`, those that ended are deleted.
  weights_in_force = function(drop)
    local k = fair_key('weights')
    local raw = redis.call('HGETALL', k)
    local out, longest = {}, 0
    for i = 1, #raw, 2 do
      local w, till = weight_entry(raw[i + 1])
      if w then
        out[#out + 1] = raw[i]
        out[#out + 1] = w
        if till == 0 then
          longest = -1
          out[#out + 1] = -1
        else
          if longest >= 0 then longest = math.max(longest, till - NOW) end
          out[#out + 1] = math.ceil((till - NOW) / 1000)
        end
      elseif drop then
        redis.call('HDEL', k, raw[i])
      end
    end
    return out, longest
  end

  -- The tenant's weight in force: one set at run time, else the ticket's.
  local function weight_now(tenant, configured)
    local w = weight_entry(redis.call('HGET', fair_key('weights'), tenant))
    return tonumber(w) or configured
  end

  -- Count an admitted ticket as service to its tenant (tokens when the API has a
  -- token budget, else the cost, divided by the weight in force) and take it out.
  -- With a token budget, what was charged is kept in `charged` (slot -> "<class>
  -- <weight> <member>") for the release to correct by the tokens really used.
  local function served(ticket, slot, class, tenant, member, cost, tokens, weight)
    redis.call('ZREM', K_QEXP, ticket)
    redis.call('ZREM', K_QUEUE, ticket)
    redis.call('ZREM', fair_key('q', class, tenant), ticket)
    local service = cost
    if LONGEST_T then service = math.max(tokens, 1) end
    local w = weight_now(tenant, weight)
    if LONGEST_T then
      local ck = fair_key('charged')
      redis.call('HSET', ck, slot, class .. ' ' .. string.format('%.17g', w) .. ' ' .. member)
      redis.call('PEXPIRE', ck, ttl_ms(LEASE_US))
    end
    if left(class, tenant, service / w) then return end
    redis.call('ZINCRBY', fair_key('t', class), service / w, member)
    if tonumber(redis.call('ZINCRBY', fair_key('a', class), 1, tenant)) == 1 then
      redis.call('PEXPIRE', fair_key('a', class), ttl_ms(TICKET_US))
    end
  end

  -- Correct the service charged to a slot's tenant when it used `actual` tokens,
  -- not the `reserved` ones charged (release): in the same backlog of the tenant
  -- (its member in t:<class>), or in the counter it left with (v:<class>) if it
  -- has not come back since; a tenant that came back started afresh at the
  -- others' level and is not corrected (no credit below it). Never makes a key.
  correct_charge = function(slot, reserved, actual)
    local ck = fair_key('charged')
    local info = redis.call('HGET', ck, slot)
    if not info then return end
    redis.call('HDEL', ck, slot)
    local class, w, member = string.match(info, '^(%S+) (%S+) (.*)$')
    w = tonumber(w)
    if not member or not w or w <= 0 then return end
    local delta = (math.max(actual, 1) - math.max(reserved, 1)) / w
    if delta == 0 then return end
    local tk = fair_key('t', class)
    if redis.call('ZSCORE', tk, member) then
      redis.call('ZADD', tk, 'XX', 'INCR', delta, member)
      return
    end
    local tenant = string.match(member, '^%d+|(.*)$')
    if tenant and not redis.call('HGET', fair_key('m', class), tenant) then
      redis.call('ZADD', fair_key('v', class), 'XX', 'INCR', delta, tenant)
    end
  end

  -- Take back `n` weight units of an entry admitted at `at` from the windows of
  -- log `kind` that still hold it.
  remove_weight = function(kind, n, at)
    for i = 1, #W do
      local w = W[i]
      if w.kind == kind and at > w.cut then
        w.used = w.used - n
        if n > 1 then
          w.extra = math.max(0, w.extra - (n - 1))
          set_state(FP .. 'x:' .. w.id, int(w.extra))
        end
      end
    end
  end

  -- Microseconds until `need` weight has left window w (oldest entries first).
  window_wait = function(w, need)
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

  -- Wake-up messages go to the waiting process's own channel only:
  --   "A <slot id> <admission time>"  the ticket was admitted (it holds the slot)
  --   "H <slot id> <wait>"            the ticket is at the head, refused for
  --                                   <wait> microseconds: ask again then
  tell = function(slot, msg)
    local proc = string.match(slot, '^(.-)%.')
    redis.call('PUBLISH', NAMESPACE .. ':wake:' .. proc, msg)
  end

  -- Tell the head ticket (when it is not `own`) how long it has to wait.
  hint_head = function(head, wait, own)
    if head and head ~= own and wait >= 0 then
      local slot = parse_ticket(head)
      tell(slot, 'H ' .. slot .. ' ' .. int(wait))
    end
  end

  -- Admit `ticket` (checked: it fits, in deployment `dep`), made by `slot`. A slot
  -- handed to another process is leased only until its ticket would have expired,
  -- until that process renews it: a process that died while waiting holds nothing
  -- past its tickets' life (ticket_ttl after its death). Each admitted ticket other
  -- than `own` is told on its process's channel, and its admission time (and
  -- deployment) kept in `handed` until it is read or released. True when it was own.
  local function hand(ticket, own, slot, cost, tokens, dep, model, inp, outp)
    local lease = nil
    if ticket ~= own then
      local expires = tonumber(redis.call('ZSCORE', K_QEXP, ticket) or NOW)
      lease = math.max(1, math.min(LEASE_US, expires - NOW))
    end
    admit_all(slot, cost, tokens, lease, dep, model, inp, outp)
    if ticket == own then return true end
    local at = dep and (NOW_S .. ' ' .. dep) or NOW_S
    redis.call('HSET', K_HANDED, slot, at)
    redis.call('PEXPIRE', K_HANDED, ttl_ms(LEASE_US))
    tell(slot, 'A ' .. slot .. ' ' .. at)
    return false
  end

  -- A head held back only by its model's limits does not hold back other models:
  -- waiters for other models that fit now are admitted past it, the highest
  -- priority first, then in the order of their tickets' expiry (at most 100 looked
  -- at), until one is refused by a limit that is not its model's. Returns
  -- own_admitted, its deployment, others woken.
  local function pass_by(own, model)
    local blocked, own_admitted, own_dep, woken = {[model] = true}, false, nil, 0
    local tickets = redis.call('ZRANGEBYSCORE', K_QEXP, '(' .. NOW_S, '+inf', 'LIMIT', 0, 100)
    local order = {}
    for i, ticket in ipairs(tickets) do
      local _, _, _, prio = parse_ticket(ticket)
      order[i] = {-(tonumber(prio) or 0), i, ticket}
    end
    table.sort(order, function(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end)
    for _, entry in ipairs(order) do
      local ticket = entry[3]
      local slot, cost, tokens, _, _, _, m, inp, outp = parse_ticket(ticket)
      if slot and not blocked[m] and not too_heavy_all(cost, tokens, m, inp, outp) then
        local reason, _, dep, by_model = check_all(cost, tokens, m, inp, outp)
        if reason and not by_model then break end
        if reason then
          blocked[m] = true
        else
          local mine = hand(ticket, own, slot, cost, tokens, dep, m, inp, outp)
          drop_ticket(ticket) -- (after hand(): its lease is read from the ticket's expiry)
          if mine then
            own_admitted, own_dep = true, dep
          else
            woken = woken + 1
          end
        end
      end
    end
    return own_admitted, own_dep, woken
  end

  -- Admit waiting tickets in serving order (next_ticket) while they fit; the
  -- ticket to serve next blocks those after it, so a heavy request is not
  -- starved by light ones (but not those for other models when only its model's
  -- limits hold it: pass_by). Returns: own_admitted, head ticket left (or nil), its
  -- reason, its wait, number of others woken, own's deployment.
  drain = function(own)
    local own_admitted, woken, own_dep = false, 0, nil
    while true do
      local ticket, class, tenant, member = next_ticket()
      if not ticket then return own_admitted, nil, nil, -1, woken, own_dep end
      local slot, cost, tokens, _, weight, _, model, inp, outp = parse_ticket(ticket)
      if too_heavy_all(cost, tokens, model, inp, outp) then
        -- A limit was lowered under it: it would block the queue for ever. Drop it;
        -- its waiter asks again at once and is told it can never pass.
        drop_ticket(ticket)
        if ticket ~= own then tell(slot, 'H ' .. slot .. ' 0') end
      else
        local reason, wait, dep, by_model = check_all(cost, tokens, model, inp, outp)
        if reason then
          if by_model then
            local mine, mine_dep, others = pass_by(own, model)
            if mine then own_admitted, own_dep = true, mine_dep end
            woken = woken + others
          end
          return own_admitted, ticket, reason, wait, woken, own_dep
        end
        if hand(ticket, own, slot, cost, tokens, dep, model, inp, outp) then
          own_admitted, own_dep = true, dep
        else
          woken = woken + 1
        end
        served(ticket, slot, class, tenant, member, cost, tokens, weight)
      end
    end
  end

  -- Admission time of a slot handed to its waiter by someone else's drain, and
  -- its deployment ("" when the API has none).
  -- It stays there until the slot's release or withdrawal: a renewal and the waiter's
  -- own next call may both read it (the one that came second was told NOW, a later
  -- time than the admission's, when the first deleted it).
  handed_at = function(slot)
    local v = redis.call('HGET', K_HANDED, slot)
    local at, dep = string.match(v or '', '^(%d+) ?(.*)$')
    if (not dep or dep == '') and DEPS then
      -- (not recorded: the deployment that holds its lease, if it keeps leases)
      for _, d in ipairs(DEPS) do
        local s = set_of('d:' .. d)
        if s[11] and redis.call('ZSCORE', s[5], slot) then dep = d end
      end
    end
    return tonumber(at) or NOW, dep or ''
  end
end
