"""The Lua scripts behind serving/limits_redis.py, one Redis call per decision.

Each tenant has two keys sharing a hash tag (one Redis Cluster slot): a hash with its
token buckets (`rpm:level`, `rpm:at`, `tpm:level`, `tpm:at`, in tokens and Redis-clock
milliseconds) and the mean duration of its requests (`mean_ms`), and a sorted set of
concurrency leases scored by when they expire. Time is Redis's own (TIME), so the
gateways' clocks never matter. A bucket that is absent is full: keys expire once their
buckets would have refilled, so idle tenants cost no memory.

Same rules as the in-process TenantLimiter: capacity is one minute's allowance, tokens
are charged after the request and may overdraw the bucket, and a refusal says how long
until the bucket holds enough again (or, for concurrency, about when one of the
tenant's requests in flight should end).
"""

from __future__ import annotations

# Shared by every script: the Redis clock in ms, a bucket's level now, and keeping a
# key for as long as its state matters (never shortening what another call needed).
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local function level(name, per_minute)
  local fields = redis.call('HMGET', KEYS[1], name .. ':level', name .. ':at')
  local lvl = tonumber(fields[1])
  if lvl == nil then return per_minute end
  local elapsed = math.max(0, now - tonumber(fields[2]))
  return math.min(per_minute, lvl + elapsed * per_minute / 60000)
end
local function store(name, lvl)
  redis.call('HSET', KEYS[1], name .. ':level', string.format('%.17g', lvl), name .. ':at', string.format('%.17g', now))
end
local function keep(key, ms)
  ms = math.ceil(ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"""

# A full bucket is never older than a minute: a minute and a second of idleness, and
# the key may go.
_IDLE_MS = 61000

# KEYS: state hash, leases zset. ARGV: requests/min, tokens/min, concurrency (0: no
# limit), lease id, lease ms. Returns {0} when admitted, else {reason, wait ms} with
# reason 1 concurrency, 2 tokens, 3 requests (the order the in-process limiter checks).
ADMIT = (
    _PRELUDE
    + """
local rpm, tpm, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lease_ms = tonumber(ARGV[5])
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  local held = redis.call('ZCARD', KEYS[2])
  if held >= limit then
    local mean = tonumber(redis.call('HGET', KEYS[1], 'mean_ms')) or 1000
    return {1, math.ceil(mean / math.max(1, held))}
  end
end
if tpm > 0 then
  local lvl = level('tpm', tpm)
  if lvl <= 0 then return {2, math.ceil((1 - lvl) * 60000 / tpm)} end
end
if rpm > 0 then
  local lvl = level('rpm', rpm)
  if lvl < 1 then return {3, math.ceil((1 - lvl) * 60000 / rpm)} end
  store('rpm', lvl - 1)
  keep(KEYS[1], """
    + str(_IDLE_MS)
    + """)
end
if limit > 0 then
  redis.call('ZADD', KEYS[2], now + lease_ms, ARGV[4])
  keep(KEYS[2], lease_ms + 1000)
end
return {0}
"""
)

# KEYS: state hash, leases zset. ARGV: tokens/min (0: no limit), tokens used, lease id
# ('' when none), request duration ms (negative: not tracked).
RELEASE = (
    _PRELUDE
    + """
local tpm, used, duration = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
if duration >= 0 then
  local mean = tonumber(redis.call('HGET', KEYS[1], 'mean_ms'))
  if mean == nil then mean = duration else mean = mean + 0.2 * (duration - mean) end
  redis.call('HSET', KEYS[1], 'mean_ms', string.format('%.17g', mean))
  keep(KEYS[1], """
    + str(_IDLE_MS)
    + """)
end
if tpm > 0 and used > 0 then
  local lvl = level('tpm', tpm) - used
  store('tpm', lvl)
  -- A debt outlives the minute: the key stays until the bucket is full again.
  keep(KEYS[1], (tpm - lvl) * 60000 / tpm + 1000)
end
return 0
"""
)

# KEYS: leases zset. ARGV: lease ms, then the lease ids this gateway holds. A lease that
# expired meanwhile (Redis unreachable longer than a lease) is not brought back: its
# place may have gone to another request. Returns how many were renewed.
RENEW = (
    _PRELUDE
    + """
local lease_ms = tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + lease_ms, ARGV[i])
end
if renewed > 0 then keep(KEYS[1], lease_ms + 1000) end
return renewed
"""
)
