-- move.lua: let the waiters already queued meet the limits in force now (after
-- `limiter limits set|clear`): admit those that fit (their processes are woken),
-- drop those a lowered limit makes too heavy, tell the new head its wait.
--
-- KEYS: the API's keys (_common.lua). ARGV: the API's configuration only.
--
-- Returns how many waiters were admitted.

OPS.move = function()
  local woken = move_queue()
  flush()
  return woken
end
