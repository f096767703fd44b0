-- cache_store.lua: store a response cache entry with its lifetime, atomically
-- (never an entry without an end). limiter.http.ResponseCache.
--
-- KEYS[1]  the entry: a hash {s = status, t = content type, b = body}
-- ARGV[1]  its lifetime, milliseconds
-- ARGV[2]  the status, ARGV[3] the content type, ARGV[4] the body
--
-- Returns 1.

redis.call('HSET', KEYS[1], 's', ARGV[2], 't', ARGV[3], 'b', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
