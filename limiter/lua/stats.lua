-- stats.lua: read-only snapshot of one API for stats(), in Redis time.
--
-- KEYS: the API's keys (_common.lua), then K_CONFIG, the API's registry entry
-- (<ns>:{api}:config). ARGV: the API's configuration only.
--
-- Returns {in_flight, waiting, cooldown_ms, totals (flat field, value list),
--          {window i used weight, ...} in configuration order, override (flat
--          field, value list, names without "o:"), override ms left (-1: no
--          end, -2: none), 1 when the registry entry K_CONFIG exists else 0}.
--          Expired leases and tickets are not counted even when no script has
--          pruned them yet.

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
  local cooldown = math.max(0, (tonumber(by['cooldown']) or 0) - NOW)
  local used = {}
  for i, w in ipairs(W) do
    local sum = 0
    local cutoff = '(' .. int(NOW - w.period)
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', w.log, cutoff, '+inf')) do
      sum = sum + weight_of(m)
    end
    used[i] = sum
  end
  local ttl = -2
  if active then ttl = (u == 0) and -1 or math.ceil((u - NOW) / 1000) end
  return {in_flight, waiting, math.ceil(cooldown / 1000), totals, used, override, ttl,
          redis.call('EXISTS', K_CONFIG)}
end
