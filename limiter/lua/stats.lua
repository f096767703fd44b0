-- stats.lua: read-only snapshot of one API for stats(), in Redis time.
--
-- KEYS[1]  holders ZSET, KEYS[2] qexp ZSET, KEYS[3] cooldown STRING,
-- KEYS[4]  stats HASH, KEYS[4+i] window i ZSET, KEYS[5+n] override HASH
-- ARGV[i]  period of window i, microseconds
--
-- Returns {in_flight, waiting, cooldown_ms, stats (flat HGETALL list),
--          {window i used weight, ...}, override (flat HGETALL list),
--          override ttl_ms (-1: none)}. Expired leases and tickets are not
-- counted even when no script has pruned them yet.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nowarg = string.format('(%.0f', now)
local in_flight = redis.call('ZCOUNT', KEYS[1], nowarg, '+inf')
local waiting = redis.call('ZCOUNT', KEYS[2], nowarg, '+inf')
local cd = redis.call('PTTL', KEYS[3])
if cd < 0 then cd = 0 end
local used = {}
for i = 1, #ARGV do
  local key = KEYS[4 + i]
  local cutoff = string.format('(%.0f', now - tonumber(ARGV[i]))
  local sum = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, cutoff, '+inf')) do
    sum = sum + (tonumber(string.match(m, '|(%d+)$')) or 1)
  end
  used[i] = sum
end
local ok = KEYS[5 + #ARGV]
return {in_flight, waiting, cd, redis.call('HGETALL', KEYS[4]), used,
        redis.call('HGETALL', ok), redis.call('PTTL', ok)}
