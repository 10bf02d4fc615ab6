"""Single-key Lua scripts that apply updates atomically on the Redis server.

Two workers may update the same hot item at the same moment; applying *deltas* on the server
(never read-modify-write from Python) makes concurrent updates commute, so none is lost. Each
script touches exactly one key, so it runs unchanged on Redis Cluster.
"""

from __future__ import annotations

from redis.asyncio import Redis as AsyncRedis
from redis.client import Redis

# KEYS[1]: packed little-endian float32 vector.  ARGV[1]: packed delta, ARGV[2]: packed initial
# vector used when the key does not exist yet, ARGV[3]: ttl in seconds (0 = none).
# Every worker derives the same initial vector from the id, so "init + d1 + d2" is the result
# whichever worker creates the key.
ADD_VECTOR = """
local delta = ARGV[1]
local n = #delta / 4
local fmt = '<' .. string.rep('f', n)
local base = redis.call('GET', KEYS[1])
if not base or #base ~= #delta then base = ARGV[2] end
local a = {struct.unpack(fmt, base)}
local d = {struct.unpack(fmt, delta)}
for i = 1, n do a[i] = a[i] + d[i] end
redis.call('SET', KEYS[1], struct.pack(fmt, unpack(a, 1, n)))
local ttl = tonumber(ARGV[3])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return n
"""

# KEYS[1]: sorted set.  ARGV: trim_to (0 = no trim), ttl (0 = none), then member, increment,
# member, increment, ...  Many increments to one key cost one round of parsing, not one each;
# the trim keeps the highest-scored trim_to members so memory stays bounded.
ZINCRBY_MANY = """
local trim_to = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
for i = 3, #ARGV, 2 do
  redis.call('ZINCRBY', KEYS[1], ARGV[i + 1], ARGV[i])
end
if trim_to > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -trim_to - 1) end
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return (#ARGV - 2) / 2
"""


class ServerScripts:
    """The scripts registered on one client; works in pipelines (redis-py loads them first)."""

    def __init__(self, client: Redis | AsyncRedis) -> None:
        self.add_vector = client.register_script(ADD_VECTOR)
        self.zincrby_many = client.register_script(ZINCRBY_MANY)
