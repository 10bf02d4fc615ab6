"""Lua scripts that apply updates atomically on the Redis server.

Two workers may update the same hot item at the same moment; applying *deltas* on the server
(never read-modify-write from Python) makes concurrent updates commute, so none is lost.

Two families: single-key scripts (``ADD_VECTOR``, ``ZINCRBY_MANY``, ``STAMP_NOW``) that run
unchanged on Redis Cluster, and whole-batch scripts (``READ_BATCH``, ``APPLY_BATCH``,
``RETIRE_IDLE``) for a
single Redis, where one command per batch replaces thousands and makes the batch and its offset
watermarks atomic. The reader's scripts (``ITEM_ROWS``, ``NEIGHBOUR_LISTS``, ``NEWEST_ITEMS``,
``USER_STATE``) pack many replies into few strings.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis as AsyncRedis
from redis.client import Redis

from freshrec.store.cluster import EvalScript, is_cluster

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

# KEYS[1]: sorted set.  ARGV: members.  Adds them all scored with the Redis server's clock, the
# one clock every worker shares, so readers can ask for "changed after the last stamp I saw".
STAMP_NOW = """
local clock = redis.call('TIME')
local stamp = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
for i = 1, #ARGV do redis.call('ZADD', KEYS[1], stamp, ARGV[i]) end
return #ARGV
"""

MEMBERS_PER_COMMAND = 1000
"""Members (or fields) per variadic command the scripts build (ZADD, ZMSCORE, HMGET, HSET,
LPUSH): at most two Lua stack slots each, well under Lua's limit."""

# Lua functions the scripts' writes share, on a single Redis and on Cluster alike; each script
# takes only those it calls (Cluster sends a script's whole text with every call). Every command
# a script calls costs a call and, with persistence on, an entry in the append-only file, so they
# write many members per command (chunks of MEMBERS_PER_COMMAND, from `_CHUNK`).
_CHUNK = f"local MEMBERS_PER_COMMAND = {MEMBERS_PER_COMMAND}\n"
# zincrby_all: adds ``amounts`` (numbers or their strings) to the scores of ``members`` in the
# sorted set ``key``: the same doubles as a ZINCRBY each, in a ZMSCORE and a ZADD per chunk (one
# member: its ZINCRBY).
_ZINCRBY_ALL = """
local function zincrby_all(key, members, amounts)
  if #members == 1 then
    redis.call('ZINCRBY', key, amounts[1], members[1])
    return
  end
  for first = 1, #members, MEMBERS_PER_COMMAND do
    local last = math.min(first + MEMBERS_PER_COMMAND - 1, #members)
    local old = redis.call('ZMSCORE', key, unpack(members, first, last))
    local args = {}
    for j = first, last do
      args[#args + 1] = (tonumber(old[j - first + 1]) or 0) + tonumber(amounts[j])
      args[#args + 1] = members[j]
    end
    redis.call('ZADD', key, unpack(args))
  end
end
"""
# add_rating_pairs: adds packed '<ffff' deltas (from byte ``at`` of ``deltas``) to the hash
# ``key``'s members, an HMGET and an HSET per chunk; past twice ``cap`` members, keeps the ``cap``
# with the most co-raters (the first float; NaN as none), ties to the first members in byte order
# (Lua's ``<`` on strings follows the server's locale), so the kept set depends neither on the
# order the hash lists its fields in nor on the server. Returns the byte after what it read.
_ADD_RATING_PAIRS = """
local function add_rating_pairs(key, cap, members, deltas, at)
  for first = 1, #members, MEMBERS_PER_COMMAND do
    local last = math.min(first + MEMBERS_PER_COMMAND - 1, #members)
    local old = redis.call('HMGET', key, unpack(members, first, last))
    local args = {}
    for j = first, last do
      local c, s, a, o = struct.unpack('<ffff', deltas, at)
      at = at + 16
      local cur = old[j - first + 1]
      if cur and #cur == 16 then
        local c0, s0, a0, o0 = struct.unpack('<ffff', cur)
        c, s, a, o = c + c0, s + s0, a + a0, o + o0
      end
      args[#args + 1] = members[j]
      args[#args + 1] = struct.pack('<ffff', c, s, a, o)
    end
    redis.call('HSET', key, unpack(args))
  end
  if cap > 0 and redis.call('HLEN', key) > 2 * cap then
    local all = redis.call('HGETALL', key)
    local rows = {}
    for j = 1, #all, 2 do
      local count = struct.unpack('<f', all[j + 1])
      if count ~= count then count = -math.huge end
      rows[#rows + 1] = {all[j], count}
    end
    table.sort(rows, function(x, y)
      if x[2] ~= y[2] then return x[2] > y[2] end
      local a, b = x[1], y[1]
      for i = 1, math.min(#a, #b) do
        local p, q = string.byte(a, i), string.byte(b, i)
        if p ~= q then return p < q end
      end
      return #a < #b
    end)
    for j = cap + 1, #rows do redis.call('HDEL', key, rows[j][1]) end
  end
  return at
end
"""
# add_doubles: adds packed float64 ``delta`` to the blob ``key`` (``base`` where it is missing).
_ADD_DOUBLES = """
local function add_doubles(key, delta, base)
  local n = #delta / 8
  local fmt = '<' .. string.rep('d', n)
  local cur = redis.call('GET', key)
  if not cur or #cur ~= #delta then cur = base end
  local a = {struct.unpack(fmt, cur)}
  local d = {struct.unpack(fmt, delta)}
  for i = 1, n do a[i] = a[i] + d[i] end
  redis.call('SET', key, struct.pack(fmt, unpack(a, 1, n)))
end
"""
# push_records: pushes records cut from ``blob`` by ``lengths``, newest last, an LPUSH per
# chunk, and keeps the ``cap`` newest. Returns the byte after what it read.
_PUSH_RECORDS = """
local function push_records(key, cap, ttl, lengths, blob, at)
  local records = {}
  for _, len in ipairs(lengths) do
    records[#records + 1] = string.sub(blob, at, at + len - 1)
    at = at + len
  end
  for first = 1, #records, MEMBERS_PER_COMMAND do
    local last = math.min(first + MEMBERS_PER_COMMAND - 1, #records)
    redis.call('LPUSH', key, unpack(records, first, last))
  end
  redis.call('LTRIM', key, 0, cap - 1)
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
  return at
end
"""
WRITE_HELPERS = _CHUNK + _ZINCRBY_ALL + _ADD_RATING_PAIRS + _ADD_DOUBLES + _PUSH_RECORDS
"""Every helper, for `APPLY_BATCH`."""

# KEYS[1]: sorted set.  ARGV: trim_to (0 = no trim), ttl (0 = none), then member, increment,
# member, increment, ...  Many increments to one key cost one round of parsing, not one each;
# the trim keeps the highest-scored trim_to members so memory stays bounded.
ZINCRBY_MANY = (
    _CHUNK
    + _ZINCRBY_ALL
    + """
local trim_to = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local members, amounts = {}, {}
for i = 3, #ARGV, 2 do
  members[#members + 1] = ARGV[i]
  amounts[#amounts + 1] = ARGV[i + 1]
end
zincrby_all(KEYS[1], members, amounts)
if trim_to > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -trim_to - 1) end
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return #members
"""
)

# KEYS[1]: an item's rating pairs.  ARGV[1]: cap, ARGV[2]: packed deltas, then the members.
ADD_RATING_PAIRS = (
    _CHUNK
    + _ADD_RATING_PAIRS
    + """
local members = {}
for i = 3, #ARGV do members[#members + 1] = ARGV[i] end
add_rating_pairs(KEYS[1], tonumber(ARGV[1]), members, ARGV[2], 1)
return #members
"""
)

# KEYS[1]: a packed float64 blob.  ARGV[1]: packed delta, ARGV[2]: the value where it is missing.
ADD_DOUBLES = (
    _ADD_DOUBLES
    + """
add_doubles(KEYS[1], ARGV[1], ARGV[2])
return 1
"""
)

# KEYS[1]: a user's rating records.  ARGV[1]: cap, ARGV[2]: ttl, ARGV[3..]: records, oldest
# first.
PUSH_RECORDS = (
    _CHUNK
    + _PUSH_RECORDS
    + """
local lengths, blob = {}, {}
for i = 3, #ARGV do lengths[#lengths + 1] = #ARGV[i]; blob[#blob + 1] = ARGV[i] end
push_records(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), lengths, table.concat(blob), 1)
return #lengths
"""
)

# One batch read on a single Redis (not Cluster: it reads many keys). ARGV[1] is JSON:
# {"landmark": key, "first_ts": str?, "rate": [key, str], "mean": key, "vectors": [key..],
#  "histories": [key..], "window": n, "marks": [key..],
#  "ratings": [[records key, [pair keys..], [items..]]..], "rating_history": n,
#  "item_ratings": key, "blend": key, "ids": [[key, [id..]]..]}: each history's n most recent
# items; per rating user, their n newest rating records, then for each item they rate in the
# batch its pair statistics with the items of those records and of the batch's items (in that
# order), and those items' rating counts. Missing values come back as nil. The landmark is set
# to first_ts and the decay rate to rate's value only where none exists, and both are returned
# as they were (nil where this call set them); a batch with nothing decayed (impressions only)
# has no first_ts and only reads them. Last, each ids entry's ZMSCORE: which of the event ids
# its user's set holds.
READ_BATCH = """#!lua flags=no-cluster
local q = cjson.decode(ARGV[1])
local vectors, histories, marks = {}, {}, {}
for i, key in ipairs(q.vectors) do vectors[i] = redis.call('GET', key) end
for i, key in ipairs(q.histories) do
  histories[i] = redis.call('ZREVRANGE', key, 0, q.window - 1)
end
for i, key in ipairs(q.marks) do marks[i] = redis.call('GET', key) end
local rated = {}
for n, r in ipairs(q.ratings) do
  local records = redis.call('LRANGE', r[1], 0, q.rating_history - 1)
  local partners = {}
  for _, record in ipairs(records) do partners[#partners + 1] = string.sub(record, 21) end
  for _, item in ipairs(r[3]) do partners[#partners + 1] = item end
  local stats = {}
  for m, key in ipairs(r[2]) do stats[m] = redis.call('HMGET', key, unpack(partners)) end
  rated[n] = {records, stats, redis.call('ZMSCORE', q.item_ratings, unpack(partners))}
end
local landmark, rate
if q.first_ts then
  landmark = redis.call('SET', q.landmark, q.first_ts, 'NX', 'GET')
  rate = redis.call('SET', q.rate[1], q.rate[2], 'NX', 'GET')
else
  landmark = redis.call('GET', q.landmark)
  rate = redis.call('GET', q.rate[1])
end
local known = {}
for n, s in ipairs(q.ids) do known[n] = redis.call('ZMSCORE', s[1], unpack(s[2])) end
return {landmark, redis.call('HMGET', q.mean, 'sum', 'n'), vectors, histories, marks, rated,
  redis.call('GET', q.blend), rate, known}
"""

# One batch write on a single Redis, atomic: every change of a batch and its offset watermarks
# land together or not at all. ARGV[1] is JSON (see BatchUpdater._write_script), ARGV[2] the
# packed float32 deltas of all vectors back to back, ARGV[3] their bases (the vectors as read,
# or the initial vectors where a key was missing), ARGV[4] the rating pairs' packed deltas,
# ARGV[5] the rating records back to back, ARGV[6] the blend's packed delta, ARGV[7] its prior
# and ARGV[8] each vector's base plus its delta, as this script would compute it. A vector
# still equal to its base (no other worker wrote it since the read) or missing is set to
# ARGV[8]'s value, without unpacking; only one written meanwhile gets the delta added. Sorted
# sets that take one score per member take them in one ZADD of at most ``MEMBERS_PER_COMMAND``
# members; so do a batch's own hash fields (`HashWrites`), set and deleted in HSETs and HDELs
# of at most as many. Returns 0 without writing anything when a watermark is not what the batch
# was read against (another worker applied these partitions meanwhile), -1 when the decay
# landmark is no longer the one its forward-decayed amounts were computed at, and -2 while a
# rebase is under way (its scan of the sums to rescale must see every write before its new
# landmark).
APPLY_BATCH = (
    """#!lua flags=no-cluster
"""
    + WRITE_HELPERS
    + """
-- ZADD key [flag] of members, each with its own score (a list) or one score for all, in
-- commands of at most MEMBERS_PER_COMMAND members (Lua's unpack has a stack limit).
local function zadd_all(key, flag, members, scores)
  local one = type(scores) ~= 'table'
  for first = 1, #members, MEMBERS_PER_COMMAND do
    local args = {}
    if flag then args[1] = flag end
    for j = first, math.min(first + MEMBERS_PER_COMMAND - 1, #members) do
      args[#args + 1] = one and scores or scores[j]
      args[#args + 1] = members[j]
    end
    redis.call('ZADD', key, unpack(args))
  end
end
local b = cjson.decode(ARGV[1])
for _, m in ipairs(b.marks) do
  local cur = redis.call('GET', m[1])
  if (cur and tonumber(cur) or -1) ~= m[2] then return 0 end
end
if b.landmark then
  if redis.call('EXISTS', b.landmark[2]) == 1 then return -2 end
  local cur = redis.call('GET', b.landmark[1])
  if cur and tonumber(cur) ~= tonumber(b.landmark[3]) then return -1 end
end
for _, m in ipairs(b.marks) do redis.call('SET', m[1], m[3]) end
local width = b.width
local size = 4 * width
local fmt = '<' .. string.rep('f', width)
for i, key in ipairs(b.vectors) do
  local at = (i - 1) * size + 1
  local cur = redis.call('GET', key)
  if not cur or #cur ~= size or cur == string.sub(ARGV[3], at, at + size - 1) then
    redis.call('SET', key, string.sub(ARGV[8], at, at + size - 1))
  else
    local d = {struct.unpack(fmt, ARGV[2], at)}
    local a = {struct.unpack(fmt, cur)}
    for j = 1, width do a[j] = a[j] + d[j] end
    redis.call('SET', key, struct.pack(fmt, unpack(a, 1, width)))
  end
  if b.ttls[i] > 0 then redis.call('EXPIRE', key, b.ttls[i]) end
end
for _, z in ipairs(b.increments) do
  local key, trim, ttl, members, amounts = z[1], z[2], z[3], z[4], z[5]
  zincrby_all(key, members, amounts)
  if trim > 0 then redis.call('ZREMRANGEBYRANK', key, 0, -trim - 1) end
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
end
local at = 1
for _, p in ipairs(b.rating_pairs) do
  local members = {}
  for member in string.gmatch(p[3], '[^\\n]+') do members[#members + 1] = member end
  at = add_rating_pairs(p[1], p[2], members, ARGV[4], at)
end
at = 1
for _, r in ipairs(b.rating_records) do at = push_records(r[1], r[2], r[3], r[4], ARGV[5], at) end
if b.blend then add_doubles(b.blend, ARGV[6], ARGV[7]) end
for _, h in ipairs(b.histories) do
  local key, cap, ttl = h[1], h[2], h[3]
  zadd_all(key, 'GT', h[4], h[5])
  redis.call('ZREMRANGEBYRANK', key, 0, -cap - 1)
  redis.call('EXPIRE', key, ttl)
end
local f = b.first_seen
zadd_all(f[1], 'LT', f[2], f[3])
for _, h in ipairs(b.hset) do
  local key, ttl, fields, values = h[1], h[2], h[3], h[4]
  for first = 1, #fields, MEMBERS_PER_COMMAND do
    local args = {}
    for j = first, math.min(first + MEMBERS_PER_COMMAND - 1, #fields) do
      args[#args + 1] = fields[j]
      args[#args + 1] = values[j]
    end
    redis.call('HSET', key, unpack(args))
  end
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
end
for _, h in ipairs(b.hdel) do
  local key, fields = h[1], h[2]
  for first = 1, #fields, MEMBERS_PER_COMMAND do
    local last = math.min(first + MEMBERS_PER_COMMAND - 1, #fields)
    redis.call('HDEL', key, unpack(fields, first, last))
  end
end
if #b.mean > 0 then
  redis.call('HINCRBYFLOAT', b.mean[1], 'sum', b.mean[2])
  redis.call('HINCRBY', b.mean[1], 'n', b.mean[3])
end
for _, c in ipairs(b.counters) do redis.call('INCRBYFLOAT', c[1], c[2]) end
if b.clock then
  local cur = tonumber(redis.call('GET', b.clock[1]))
  if not cur or b.clock[2] > cur then redis.call('SET', b.clock[1], b.clock[3]) end
end
zadd_all(b.dirty[1], 'NX', b.dirty[2], b.dirty[3])
local clock = redis.call('TIME')  -- one clock for every worker's stamps: the server's
local stamp = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
zadd_all(b.updated[1], nil, b.updated[2], stamp)
zadd_all(b.relisted[1], nil, b.relisted[2], stamp)
zadd_all(b.active[1], nil, b.active[2], stamp)
redis.call('HINCRBY', b.stats[1], 'events', b.stats[2])
redis.call('HSET', b.stats[1], 'applied_at', b.stats[3])
return 1
"""
)


# KEYS[1]: the event clock or an offset watermark.  ARGV[1]: an event time or an offset.  It
# only moves forward.
RAISE_CLOCK = """
local cur = tonumber(redis.call('GET', KEYS[1]))
if not cur or tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""


# KEYS[1]: a lock.  ARGV[1]: the token its holder set it to, ARGV[2]: milliseconds to hold it
# for from now, or 0 to release it.  Only the holder extends or releases it: 1 if the caller
# held it, else 0 (it expired, and maybe another process holds it now).
HELD_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2])
else redis.call('DEL', KEYS[1]) end
return 1
"""


# KEYS[1]: the dirty-users sorted set.  ARGV: cutoff time, most users to take.  Pops the users
# first touched at or before the cutoff (user, score, user, score, ...); atomic, so reader
# replicas never publish one twice.
POP_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
for i = 1, #due, 2 do redis.call('ZREM', KEYS[1], due[i]) end
return due
"""


# KEYS: the items' activity, retirement records, retirement horizon, then the row- and list-stamp,
# occurrence, popularity, impression, click, first-seen and rating-count sorted sets.  ARGV: the TTL
# in seconds, the most items to retire, then the (head, tail) of item vectors', neighbour lists' and
# rating pairs' keys (an item's key is head .. id .. tail). Retires (atomically, on the server's
# clock) up to that many items not written for the TTL: their vector, neighbour list and rating
# pairs, their entries in every per-item sorted set and in the lists and pairs of the items they
# name (pairs are kept both ways), each recorded as retired for readers; records older than the TTL
# are forgotten, the newest of them kept as the horizon. Returns how many it retired. The limit
# bounds the time one call holds Redis.
RETIRE_IDLE = """#!lua flags=no-cluster
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local cutoff = now - tonumber(ARGV[1])
local idle = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff, 'LIMIT', 0, tonumber(ARGV[2]))
local function vector(id) return ARGV[3] .. id .. ARGV[4] end
local function neighbours(id) return ARGV[5] .. id .. ARGV[6] end
local function pairs_of(id) return ARGV[7] .. id .. ARGV[8] end
for _, item in ipairs(idle) do
  local list = neighbours(item)
  for _, other in ipairs(redis.call('ZRANGE', list, 0, -1)) do
    redis.call('ZREM', neighbours(other), item)
  end
  local rated = pairs_of(item)
  for _, other in ipairs(redis.call('HKEYS', rated)) do
    redis.call('HDEL', pairs_of(other), item)
  end
  redis.call('DEL', vector(item), list, rated)
  redis.call('ZADD', KEYS[2], now, item)
end
if #idle > 0 then
  redis.call('ZREM', KEYS[1], unpack(idle))
  for k = 4, #KEYS do redis.call('ZREM', KEYS[k], unpack(idle)) end
end
local old = redis.call('ZREVRANGEBYSCORE', KEYS[2], cutoff, '-inf', 'WITHSCORES', 'LIMIT', 0, 1)
if #old > 0 then
  redis.call('SET', KEYS[3], old[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
end
return #idle
"""


# KEYS: neighbour sorted sets.  ARGV[1]: how many of each, strongest first.  Returns, per key,
# the members joined by newlines (ids are printable, so never contain one) and their weights as
# packed little-endian doubles: two strings to parse per item instead of two per neighbour.
NEIGHBOUR_LISTS = """
local n = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local pairs = redis.call('ZREVRANGE', key, 0, n - 1, 'WITHSCORES')
  local names, weights = {}, {}
  for j = 1, #pairs, 2 do
    names[#names + 1] = pairs[j]
    weights[#weights + 1] = tonumber(pairs[j + 1])
  end
  local packed = struct.pack('<' .. string.rep('d', #weights), unpack(weights))
  out[i] = {table.concat(names, '\\n'), packed}
end
return out
"""

# KEYS: the occurrences, popularity and first-seen sorted sets.  ARGV[1], ARGV[2]: the head and tail
# of item vectors' keys, ARGV[3]: item ids joined by newlines.  Returns every item's vector
# concatenated, their byte lengths (packed little-endian int32, 0 for none) and the three statistics
# (packed doubles, 0 where absent, three per item): a chunk of the reader's item snapshot in one
# command, whose arguments and reply are a handful of strings however many items it holds.
ITEM_ROWS = """
local items, keys, vectors, lengths, stats = {}, {}, {}, {}, {}
for item in string.gmatch(ARGV[3], '[^\\n]+') do
  items[#items + 1] = item
  keys[#items] = ARGV[1] .. item .. ARGV[2]
end
if #items == 0 then return {'', '', ''} end
local blobs = redis.call('MGET', unpack(keys))
local scores = {}
for k = 1, 3 do scores[k] = redis.call('ZMSCORE', KEYS[k], unpack(items)) end
for n = 1, #items do
  vectors[n] = blobs[n] or ''
  lengths[n] = struct.pack('<i', blobs[n] and #blobs[n] or 0)
  stats[n] = struct.pack('<ddd', tonumber(scores[1][n] or 0), tonumber(scores[2][n] or 0),
    tonumber(scores[3][n] or 0))
end
return {table.concat(vectors), table.concat(lengths), table.concat(stats)}
"""

# KEYS[1]: a hash of summed terms.  ARGV: field, amount, field, amount, ...  Adds each amount to
# its field (HINCRBYFLOAT) and returns the hash after them (field, value, ...) and the positions
# (1-based) and errors of the terms whose increment failed (a field holding no number, a sum that
# overflows): a reader's merge of its learned terms in one command and one reply, each term
# applied or refused on its own, as when each had a command of its own.
MERGE_TERMS = """
local failed, errors = {}, {}
for i = 1, #ARGV, 2 do
  local reply = redis.pcall('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
  if type(reply) == 'table' and reply.err then
    failed[#failed + 1] = (i + 1) / 2
    errors[#errors + 1] = reply.err
  end
end
return {redis.call('HGETALL', KEYS[1]), failed, errors}
"""

# KEYS[1]: items by first-seen time, KEYS[2]: impressions, KEYS[3]: clicks.  ARGV[1]: how many
# of the newest items.  Returns them newest first joined by newlines, and their impressions and
# clicks as packed doubles (0 where absent): the cold pool in three strings.
NEWEST_ITEMS = """
local names = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #names == 0 then return {'', '', ''} end
local shown = redis.call('ZMSCORE', KEYS[2], unpack(names))
local clicked = redis.call('ZMSCORE', KEYS[3], unpack(names))
local packed_shown, packed_clicked = {}, {}
for i = 1, #names do
  packed_shown[i] = struct.pack('<d', tonumber(shown[i] or 0))
  packed_clicked[i] = struct.pack('<d', tonumber(clicked[i] or 0))
end
return {table.concat(names, '\\n'), table.concat(packed_shown), table.concat(packed_clicked)}
"""

# KEYS[1]: a user's history, KEYS[2]: their vector.  ARGV[1]: most items to return.  Returns the
# history's items newest first joined by newlines, the newest one's time, and the vector (or
# nil): the reader's whole per-request read, in one command and three strings.
USER_STATE = """
local items = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local latest = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
return {table.concat(items, '\\n'), latest or '', redis.call('GET', KEYS[2])}
"""

# KEYS[1]: a user's rating records, KEYS[2]: the items' rating counts, KEYS[3..]: the rating pairs
# of the items to predict for the user.  Returns the records (newest first), their items' rating
# counts (packed doubles, 0 where none) and, per item to predict, its statistics with each
# record's item (16 bytes each, zeros where none): what the rating blend's features read, in
# one command and a few strings.
RATING_STATE = """
local records = redis.call('LRANGE', KEYS[1], 0, -1)
if #records == 0 then return {records, '', {}} end
local partners = {}
for n, record in ipairs(records) do partners[n] = string.sub(record, 21) end
local counts = redis.call('ZMSCORE', KEYS[2], unpack(partners))
for n = 1, #partners do counts[n] = struct.pack('<d', tonumber(counts[n] or 0)) end
local none = string.rep(string.char(0), 16)
local stats = {}
for k = 3, #KEYS do
  local values = redis.call('HMGET', KEYS[k], unpack(partners))
  for n = 1, #partners do
    if not values[n] or #values[n] ~= 16 then values[n] = none end
  end
  stats[k - 2] = table.concat(values)
end
return {records, table.concat(counts), stats}
"""


class ServerScripts:
    """The scripts registered on one client; works in pipelines (redis-py loads them first).
    On Redis Cluster each is sent whole (`freshrec.store.cluster.EvalScript`)."""

    def __init__(self, client: Redis | AsyncRedis) -> None:
        self.cluster = is_cluster(client)
        register: Callable[[str], Any] = (
            functools.partial(EvalScript, client) if self.cluster else client.register_script
        )
        self.add_vector = register(ADD_VECTOR)
        self.zincrby_many = register(ZINCRBY_MANY)
        self.stamp_now = register(STAMP_NOW)
        self.raise_clock = register(RAISE_CLOCK)
        self.held_lock = register(HELD_LOCK)
        self.read_batch = register(READ_BATCH)
        self.apply_batch = register(APPLY_BATCH)
        self.add_rating_pairs = register(ADD_RATING_PAIRS)
        self.add_doubles = register(ADD_DOUBLES)
        self.push_records = register(PUSH_RECORDS)
        self.pop_due = register(POP_DUE)
        self.retire_idle = register(RETIRE_IDLE)
        self.neighbour_lists = register(NEIGHBOUR_LISTS)
        self.item_rows = register(ITEM_ROWS)
        self.newest_items = register(NEWEST_ITEMS)
        self.merge_terms = register(MERGE_TERMS)
        self.rating_state = register(RATING_STATE)
