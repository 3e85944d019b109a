-- Remove one cached entry older than a threshold: after a warm at S the threshold is the warm
-- version (just below (S, 0)),
-- after a TRUNCATE it is the truncate's position.
-- KEYS[1] value key, KEYS[2] version key. ARGV[1] packed threshold.
-- A value key without a version key was never written by ssmd's scripts, so it goes too.
-- Returns 1 when something was removed, else 0.
local stored = redis.call("GET", KEYS[2])
if not stored then
  return redis.call("DEL", KEYS[1])
end
if stored < ARGV[1] then
  redis.call("DEL", KEYS[1], KEYS[2])
  return 1
end
return 0
