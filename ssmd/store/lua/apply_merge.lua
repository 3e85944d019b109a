-- Write a row whose TOAST-unchanged columns were filled from the cached value that the caller
-- read at version ARGV[4] ("" when it read no version). The write applies only when that
-- version is still stored, so a concurrent write between the read and this script is not lost.
-- KEYS[1] value key, KEYS[2] version key.
-- ARGV[1] packed version, ARGV[2] row JSON, ARGV[3] packed floor or "", ARGV[4] packed base.
-- Returns 1 applied, 0 stale, -1 at or below the floor, -2 changed since read (read again).
local version = ARGV[1]
local floor = ARGV[3]
if floor ~= "" and version <= floor then
  return -1
end
local stored = redis.call("GET", KEYS[2])
if stored and version <= stored then
  return 0
end
if (stored or "") ~= ARGV[4] then
  return -2
end
redis.call("SET", KEYS[1], ARGV[2])
redis.call("SET", KEYS[2], version)
return 1
