-- stats.lua: read-only snapshot of one API for stats(), in Redis time.
--
-- KEYS: the API's keys (_common.lua), then K_CONFIG, the API's registry entry
-- (<ns>:{api}:config). ARGV: the API's configuration only.
--
-- Returns {in_flight, waiting, cooldown_ms, totals (flat field, value list),
--          {window i used weight, ...} in configuration order, override (flat
--          field, value list, names without "o:"), override ms left (-1: no
--          end, -2: none), 1 when the registry entry K_CONFIG exists else 0,
--          waiting by priority (flat priority, count list), tenants (flat
--          tenant, waiting, admitted, service list: every tenant waiting, from
--          the first 10,000 tickets), weights set at run time (flat tenant,
--          weight, ms left (-1: no end) list), limits learned from the
--          provider (flat window id, limit list, names without "p:"; empty when
--          they lapsed), their ms left (-2: none), the limit sets (flat list,
--          per set: its id, in_flight, cooldown_ms, {window i used weight, ...},
--          learned limits (flat window id, limit list) and their ms left (-2:
--          none); empty when the API has no sets)}.
--          Expired leases and tickets are not counted even when no script has
--          pruned them yet.

-- The current set's (the API's own, or a limit set's) use of each window, its
-- learned limits (flat window id, limit list) and their ms left (-2: none), and
-- its cooldown's ms left, from its state hash fields as read (`by`).
local function read_set(by)
  local used, learned, learned_ms = {}, {}, -2
  for i, w in ipairs(W) do
    local sum = 0
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', w.log, '(' .. int(NOW - w.period), '+inf')) do
      sum = sum + weight_of(m)
    end
    used[i] = sum
  end
  local till = tonumber(by[FP .. 'p:until'])
  if till and till > NOW then
    learned_ms = math.ceil((till - NOW) / 1000)
    for _, spec in ipairs(SPEC) do
      local limit = by[FP .. 'p:' .. spec.id]
      if limit then
        learned[#learned + 1] = spec.id
        learned[#learned + 1] = limit
      end
    end
  end
  local pause = math.max(0, (tonumber(by[FP .. 'cooldown']) or 0) - NOW)
  return used, learned, learned_ms, math.ceil(pause / 1000)
end

OPS.stats = function()
  local after_now = '(' .. int(NOW)
  local in_flight = redis.call('ZCOUNT', K_HOLDERS, after_now, '+inf')
  local waiting = redis.call('ZCOUNT', K_QEXP, after_now, '+inf')
  local raw = redis.call('HGETALL', K_STATE)
  local by, totals, override = {}, {}, {}
  for i = 1, #raw, 2 do by[raw[i]] = raw[i + 1] end
  local u = tonumber(by['o:until'])
  local active = u and (u == 0 or u > NOW)
  for i = 1, #raw, 2 do
    local field = raw[i]
    local name = string.match(field, '^o:(.*)$')
    if name then
      if active and name ~= 'until' then
        override[#override + 1] = name
        override[#override + 1] = raw[i + 1]
      end
    elseif field == 'successful_requests' or field == 'failed_requests'
        or field == 'response_time_us' or string.match(field, '^refused:') then
      totals[#totals + 1] = field
      totals[#totals + 1] = raw[i + 1]
    end
  end
  local used, learned, learned_ms, cooldown_ms = read_set(by)
  local ttl = -2
  if active then ttl = (u == 0) and -1 or math.ceil((u - NOW) / 1000) end
  local by_prio, prios, tenants, names = {}, {}, {}, {}
  local function tenant(name)
    local t = tenants[name]
    if not t then
      t = {0, 0, 0}
      tenants[name] = t
      names[#names + 1] = name
    end
    return t
  end
  if waiting > 0 then
    contended()
    local tickets = redis.call('ZRANGEBYSCORE', K_QEXP, after_now, '+inf', 'LIMIT', 0, 10000)
    for _, ticket in ipairs(tickets) do
      local _, _, _, prio, _, name = parse_ticket(ticket)
      if name then
        if not by_prio[prio] then
          by_prio[prio] = 0
          prios[#prios + 1] = prio
        end
        by_prio[prio] = by_prio[prio] + 1
        local t = tenant(name)
        t[1] = t[1] + 1
      end
    end
    for _, class in ipairs(redis.call('ZRANGE', fair_key('classes'), 0, -1)) do
      local served = redis.call('ZRANGE', fair_key('t', class), 0, 9999, 'WITHSCORES')
      for i = 1, #served, 2 do
        local t = tenant(string.match(served[i], '^%d+|(.*)$') or served[i])
        t[3] = t[3] + tonumber(served[i + 1])
      end
      local admitted = redis.call('ZRANGE', fair_key('a', class), 0, 9999, 'WITHSCORES')
      for i = 1, #admitted, 2 do
        local t = tenant(admitted[i])
        t[2] = t[2] + tonumber(admitted[i + 1])
      end
    end
  end
  local prio_list, tenant_list = {}, {}
  for _, prio in ipairs(prios) do
    prio_list[#prio_list + 1] = prio
    prio_list[#prio_list + 1] = by_prio[prio]
  end
  for _, name in ipairs(names) do
    local t = tenants[name]
    tenant_list[#tenant_list + 1] = name
    tenant_list[#tenant_list + 1] = t[1]
    tenant_list[#tenant_list + 1] = t[2]
    tenant_list[#tenant_list + 1] = string.format('%.17g', t[3])
  end
  contended()
  local weights = weights_in_force(false)

  -- The limit sets: the same reading, each in its own keys and fields.
  local sets = {}
  for id in pairs(SETS or {}) do
    use(set_of(id))
    local busy = HOLD and redis.call('ZCOUNT', K_HOLDERS, after_now, '+inf') or 0
    local set_used, set_learned, set_ms, pause_ms = read_set(by)
    for _, v in ipairs({id, busy, pause_ms, set_used, set_learned, set_ms}) do
      sets[#sets + 1] = v
    end
  end
  if CUR then use(API_SET) end
  return {in_flight, waiting, cooldown_ms, totals, used, override, ttl,
          redis.call('EXISTS', K_CONFIG), prio_list, tenant_list, weights, learned,
          learned_ms, sets}
end
