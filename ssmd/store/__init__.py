"""Redis adapter: connections, the versioned Lua scripts and the cache's meta hash."""
