"""Lua run atomically inside Redis: key check and every per-key limit in one round trip.

Time comes from Redis (``TIME``), so several gateway processes on different
hosts share one clock and one budget exactly.

Limits, all per key (0 = unlimited):
- requests/minute: a sliding log (sorted set of admission times), exact;
- tokens/minute and tokens/day: token buckets refilled continuously; a request
  is admitted while the bucket is above zero and its real usage is debited
  after the response (so one request may overdraw, the next waits);
- concurrency, in slots: a request takes one per sequence it will run
  (prompts x ``n``, :class:`appliance.core.wire.RequestCost`), as members
  ``<request id>#1..k`` of a sorted set scored by start time; settle removes all
  k; entries older than the safety TTL are dropped, so a crashed gateway cannot
  leak slots for ever. A request of more slots than the limit is refused
  (``slots``): waiting would never admit it.

Besides the request-limit figures, the reply carries the token bucket that
would refuse first (tokens/minute or tokens/day): its size, the whole tokens
left in it and the seconds until it is full again, for the
``x-ratelimit-*-tokens`` headers.
"""

from __future__ import annotations

__all__ = ["ADMIT", "SETTLE"]

# KEYS: record, req log, tpm bucket, tpd bucket, inflight set
# ARGV: scope, model, member, inflight ttl, apply limits ("1"/"0"), slots (the request's cost, >= 1)
# Returns {status, retry_after, limit, remaining, reset, token limit, tokens left, tokens reset, field, value, ...}
# (limit/remaining/reset: requests per minute, or the concurrency limit with 'slots'; token figures 0 when the key
# has no token limit or the script stopped before the buckets)
ADMIT = r"""
local flat = redis.call('HGETALL', KEYS[1])
if #flat == 0 then return {'unknown', '0', 0, 0, '0'} end
local r = {}
for i = 1, #flat, 2 do r[flat[i]] = flat[i + 1] end
local FIELDS = {'id', 'name', 'scopes', 'models', 'rpm', 'tpm', 'tpd', 'max_concurrent', 'expires_at', 'priority',
                'weight'}
local tok = {0, 0, 0}
local function reply(status, retry, limit, remaining, reset)
  local out = {status, tostring(retry), limit, remaining, tostring(reset), tok[1], tok[2], tostring(tok[3])}
  for _, f in ipairs(FIELDS) do
    out[#out + 1] = f
    out[#out + 1] = r[f] or ''
  end
  return out
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if r.revoked == '1' then return reply('revoked', 0, 0, 0, 0) end
local exp = tonumber(r.expires_at or '0') or 0
if exp > 0 and now >= exp then return reply('expired', 0, 0, 0, 0) end
if ARGV[1] ~= '' and not string.find(',' .. (r.scopes or '') .. ',', ',' .. ARGV[1] .. ',', 1, true) then
  return reply('scope', 0, 0, 0, 0)
end
local models = r.models or ''
if models ~= '' and ARGV[2] ~= '' and not string.find(',' .. models .. ',', ',' .. ARGV[2] .. ',', 1, true) then
  return reply('model', 0, 0, 0, 0)
end
if ARGV[5] ~= '1' then return reply('ok', 0, 0, 0, 0) end

local rpm = tonumber(r.rpm or '0') or 0
local used, reset = 0, 60
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60)
  used = redis.call('ZCARD', KEYS[2])
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if #oldest > 0 then reset = tonumber(oldest[2]) + 60 - now end
  if used >= rpm then return reply('rpm', reset, rpm, 0, reset) end
end
local function bucket(key, cap, per)
  if cap <= 0 then return 1 end
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(b[1]) or cap
  local ts = tonumber(b[2]) or now
  return math.min(cap, tokens + (now - ts) * cap / per), cap / per
end
local tpm = tonumber(r.tpm or '0') or 0
local tpd = tonumber(r.tpd or '0') or 0
local left_m, rate_m = bucket(KEYS[3], tpm, 60)
local left_d, rate_d = bucket(KEYS[4], tpd, 86400)
if tpm > 0 and (tpd <= 0 or left_m <= left_d) then
  tok = {tpm, math.max(0, math.floor(left_m)), (tpm - left_m) / rate_m}
elseif tpd > 0 then
  tok = {tpd, math.max(0, math.floor(left_d)), (tpd - left_d) / rate_d}
end
if left_m <= 0 then return reply('tpm', (1 - left_m) / rate_m, rpm, math.max(rpm - used, 0), reset) end
if left_d <= 0 then return reply('tpd', (1 - left_d) / rate_d, rpm, math.max(rpm - used, 0), reset) end
local conc = tonumber(r.max_concurrent or '0') or 0
if conc > 0 then
  local ttl = tonumber(ARGV[4])
  local want = math.max(1, math.floor(tonumber(ARGV[6]) or 1))
  if want > conc then return reply('slots', 0, conc, 0, 0) end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - ttl)
  if redis.call('ZCARD', KEYS[5]) + want > conc then
    return reply('concurrency', 1, rpm, math.max(rpm - used, 0), reset)
  end
  for first = 1, want, 1000 do  -- in batches: unpack has a bounded stack
    local add = {}
    for i = first, math.min(want, first + 999) do
      add[#add + 1] = now
      add[#add + 1] = ARGV[3] .. '#' .. i
    end
    redis.call('ZADD', KEYS[5], unpack(add))
  end
  redis.call('EXPIRE', KEYS[5], ttl)
end
if rpm > 0 then
  redis.call('ZADD', KEYS[2], now, ARGV[3])
  redis.call('EXPIRE', KEYS[2], 61)
end
return reply('ok', 0, rpm, math.max(rpm - used - 1, 0), reset)
"""

# KEYS: tpm bucket, tpd bucket, inflight set, usage hash (per day), stats hash
# ARGV: member, tokens, tpm, tpd, key id, prompt, completion, cache result ('' = none), count request ('1'/'0'),
#       slots (as admitted)
SETTLE = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
-- A request's members were added together (same score, same expiry) and only under a concurrency limit, so
-- the set holds at least as many members as this request still has: never loop past its size (a key without a
-- limit holds none, whatever the request's cost).
local count = math.min(math.max(1, math.floor(tonumber(ARGV[10]) or 1)), redis.call('ZCARD', KEYS[3]))
for first = 1, count, 1000 do  -- in batches: unpack has a bounded stack
  local held = {}
  for i = first, math.min(count, first + 999) do held[#held + 1] = ARGV[1] .. '#' .. i end
  redis.call('ZREM', KEYS[3], unpack(held))
end
local spent = tonumber(ARGV[2])
local function debit(key, cap, per)
  if cap <= 0 or spent <= 0 then return end
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(b[1]) or cap
  local ts = tonumber(b[2]) or now
  tokens = math.min(cap, tokens + (now - ts) * cap / per) - spent
  redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('EXPIRE', key, per * 2)
end
debit(KEYS[1], tonumber(ARGV[3]), 60)
debit(KEYS[2], tonumber(ARGV[4]), 86400)
if ARGV[9] == '1' then
  local id = ARGV[5]
  redis.call('HINCRBY', KEYS[4], id .. ':requests', 1)
  redis.call('HINCRBY', KEYS[4], id .. ':prompt_tokens', tonumber(ARGV[6]))
  redis.call('HINCRBY', KEYS[4], id .. ':completion_tokens', tonumber(ARGV[7]))
  redis.call('EXPIRE', KEYS[4], 86400 * 400)
end
if ARGV[8] ~= '' then redis.call('HINCRBY', KEYS[5], 'cache_' .. ARGV[8], 1) end
return 1
"""
