-- override.lua: set or clear an API's runtime limits (`limiter limits set|clear`).
--
-- KEYS[1]  override HASH (limiter:{api}:override), read by every admission script
-- ARGV[1]  lifetime, milliseconds (0: until cleared)
-- ARGV[2..] field, value pairs to set ("max_concurrent", "w:<period us>",
--           "tokens"); none: clear the whole hash
--
-- Returns the hash as it now is (flat HGETALL list) and its PTTL.

local key = KEYS[1]
local ms = tonumber(ARGV[1])
if #ARGV == 1 then
  redis.call('DEL', key)
  return {{}, -2}
end
redis.call('HSET', key, unpack(ARGV, 2))
if ms > 0 then
  redis.call('PEXPIRE', key, ms)
else
  redis.call('PERSIST', key)
end
return {redis.call('HGETALL', key), redis.call('PTTL', key)}
