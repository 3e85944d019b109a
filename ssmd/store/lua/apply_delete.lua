-- Delete a row and leave a tombstone (the version key without its value key), if the delete's
-- version is newer than the stored version and the namespace floor. The tombstone stops a warm
-- writer that read the row before the delete from bringing it back.
-- KEYS[1] value key, KEYS[2] version key. ARGV[1] packed version, ARGV[2] packed floor or "".
-- Returns 1 applied, 0 stale, -1 at or below the floor.
local version = ARGV[1]
local floor = ARGV[2]
if floor ~= "" and version <= floor then
  return -1
end
local stored = redis.call("GET", KEYS[2])
if stored and version <= stored then
  return 0
end
redis.call("DEL", KEYS[1])
redis.call("SET", KEYS[2], version)
return 1
