-- Heartbeat of one limiter (one replica): count the live ones.
-- KEYS[1]  <namespace>:replicas   ZSET  process id -> expiry (ms of Redis TIME)
-- ARGV[1]  this limiter's process id
-- ARGV[2]  ttl in ms: a limiter that stops beating leaves the count after this long
-- Returns the number of live limiters, this one included.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return redis.call('ZCARD', KEYS[1])
