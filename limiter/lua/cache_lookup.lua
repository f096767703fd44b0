-- cache_lookup.lua: look a response cache entry up and count the lookup, in one
-- round trip (limiter.http.ResponseCache; not an operation of one API's keys).
--
-- KEYS[1]  the entry: a hash {s = status, t = content type, b = body}
-- KEYS[2]  the API's counters: a hash {hits, misses}
-- ARGV[1]  the counters' lifetime, milliseconds
--
-- An entry missing any of its three fields is a miss (it is stored again).
-- Returns {status, content type, body} on a hit, false (nil) on a miss.

local entry = redis.call('HMGET', KEYS[1], 's', 't', 'b')
local hit = entry[1] ~= false and entry[2] ~= false and entry[3] ~= false
redis.call('HINCRBY', KEYS[2], hit and 'hits' or 'misses', 1)
redis.call('PEXPIRE', KEYS[2], ARGV[1])
if hit then return entry end
return false
