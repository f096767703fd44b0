-- reset.lua: forget an API's state (`limiter reset API`): leases, waiters,
-- windows (of any configuration: one log holds every request window), the
-- cooldown and the totals, the fair queue's tenants and counters. The runtime
-- override and the weights set at run time are kept.
--
-- KEYS: the API's keys (_common.lua). ARGV: the API's configuration only.
-- Returns the number of keys and state fields removed.

OPS.reset = function()
  local n = redis.call('DEL', K_HOLDERS, K_QUEUE, K_QEXP, K_HANDED, K_REQUESTS, K_TOKENS)
  contended()
  local classes = fair_key('classes')
  for _, class in ipairs(redis.call('ZRANGE', classes, 0, -1)) do
    local tk = fair_key('t', class)
    local tenants = redis.call('HKEYS', fair_key('m', class))
    for _, tenant in ipairs(tenants) do
      n = n + redis.call('DEL', fair_key('q', class, tenant))
    end
    n = n + redis.call('DEL', tk, fair_key('m', class), fair_key('a', class))
  end
  n = n + redis.call('DEL', classes)
  local raw = redis.call('HGETALL', K_STATE)
  local drop = {}
  for i = 1, #raw, 2 do
    if not string.match(raw[i], '^o:') then drop[#drop + 1] = raw[i] end
  end
  if #drop > 0 then n = n + redis.call('HDEL', K_STATE, unpack_list(drop)) end
  if #drop < #raw / 2 then
    load_state() -- an override is left: give the hash its lifetime again
    flush()
  end
  return n
end
