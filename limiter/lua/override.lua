-- override.lua: set or clear an API's runtime limits (`limiter limits set|clear`).
--
-- KEYS[1]  override HASH (limiter:{api}:override), read by every admission script
-- ARGV[1]  lifetime, milliseconds (0: until cleared)
-- ARGV[2..] field, value pairs to set ("max_concurrent", "w:<period us>",
--           "tokens"); none: clear the whole hash
--
-- One lifetime covers the whole hash, so a set may not change what the fields
-- already in force were given: without a lifetime onto an override that ends
-- (they would stay for ever), or with one onto an override that does not (they
-- would end). Such a set changes nothing and returns {"ttl", PTTL in force}.
--
-- Returns the hash as it now is (flat HGETALL list) and its PTTL.

local key = KEYS[1]
local ms = tonumber(ARGV[1])
if #ARGV == 1 then
  redis.call('DEL', key)
  return {{}, -2}
end
local left = redis.call('PTTL', key)
if (ms == 0 and left > 0) or (ms > 0 and left == -1) then
  return {'ttl', left}
end
redis.call('HSET', key, unpack(ARGV, 2))
if ms > 0 then
  redis.call('PEXPIRE', key, ms)
else
  redis.call('PERSIST', key)
end
return {redis.call('HGETALL', key), redis.call('PTTL', key)}
