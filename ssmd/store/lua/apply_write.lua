-- Write a row if its version is newer than the stored version and the namespace floor.
-- KEYS[1] value key, KEYS[2] version key (same cluster slot: the hash tag is the value key).
-- ARGV[1] packed version, ARGV[2] row JSON, ARGV[3] packed floor or "".
-- Packed versions are fixed-width upper-case hex, so string order is version order; Lua
-- numbers are doubles and cannot hold a 64-bit LSN.
-- Returns 1 applied, 0 stale (stored version is the same or newer), -1 at or below the floor.
local version = ARGV[1]
local floor = ARGV[3]
if floor ~= "" and version <= floor then
  return -1
end
local stored = redis.call("GET", KEYS[2])
if stored and version <= stored then
  return 0
end
redis.call("SET", KEYS[1], ARGV[2])
redis.call("SET", KEYS[2], version)
return 1
