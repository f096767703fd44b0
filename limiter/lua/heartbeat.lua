-- heartbeat.lua: one limiter (one replica) says it is alive; count the live ones.
--
-- KEYS and ARGV (limiter/_contract.py binds them):
--   K_REPLICAS  <namespace>:replicas  ZSET  process id -> expiry (ms of Redis TIME)
--   PROCESS     this limiter's process id
--   TTL_MS      a limiter that stops beating leaves the count after this long
--
-- Returns the number of live limiters, this one included.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', K_REPLICAS, '-inf', now)
redis.call('ZADD', K_REPLICAS, now + TTL_MS, PROCESS)
redis.call('PEXPIRE', K_REPLICAS, TTL_MS)
return redis.call('ZCARD', K_REPLICAS)
