"""The Lua scripts behind `router.budget_store` (kept apart so each file stays readable).

Keys, all under one hash tag per tenant `{tg:<tenant>}` (one Redis Cluster slot):
  :b          HASH  budget counters, integer cost units (1e-10 USD):
                    sd:<YYYYMMDD> / rd:<YYYYMMDD>  spent / reserved in a UTC day
                    sm:<YYYYMM>   / rm:<YYYYMM>    spent / reserved in a UTC month
  :w          HASH  rate windows: r:<minute> requests, t:<minute> tokens
  :q:<id>     HASH  one request: st (open|settled|expired), res, tok, d, m, min, cost
  :open       ZSET  open reservations by expiry (ms), for the sweeper
  :usage      STREAM  the usage ledger, one record per settled request
  :agg:<YYYYMMDD>  HASH  <YYYYMMDDHH>|<tier>|<field> -> integer sums, fed with the ledger (requests, cost,
                    budget_store.AGG_FIELDS, gpu_src_<engine|sim|throughput>, slo_met@<class>, slo_n@<class>); one key
                    per UTC day, expiring `usage_retention_days` after its last write
  :alerts:<daily|monthly>:<period id>  HASH  budget alert thresholds claimed in the period -> spend
                    at the claim (router/alerts.py), expiring two days after the period ends

Every script takes ARGV[1] = now in ms, or '' for Redis TIME (tests inject a clock).
"""

from __future__ import annotations

_COMMON = """
local function now_ms(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function civil(days)  -- days since 1970-01-01 -> y, m, d (proleptic Gregorian)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local function periods(ms)  -- day id, month id, hour id, seconds to day end, seconds to month end
  local sec = math.floor(ms / 1000)
  local days = math.floor(sec / 86400)
  local y, m, d = civil(days)
  local day = string.format('%04d%02d%02d', y, m, d)
  local mon = string.format('%04d%02d', y, m)
  local hour = day .. string.format('%02d', math.floor((sec % 86400) / 3600))
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return day, mon, hour, 86400 - sec % 86400, days_from_civil(ny, nm, 1) * 86400 - sec
end
local function num(v) return tonumber(v) or 0 end
local function fmt(x) if x == 0 then return '0' end return string.format('%.0f', x) end
-- release reservations whose TTL has passed (a crashed router's); q keys share the tenant's slot
local function release_expired(b, open, prefix, now, limit)
  local ids = redis.call('ZRANGEBYSCORE', open, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    local q = prefix .. id
    if redis.call('HGET', q, 'st') == 'open' then
      local res = num(redis.call('HGET', q, 'res'))
      redis.call('HINCRBY', b, 'rd:' .. redis.call('HGET', q, 'd'), fmt(-res))
      redis.call('HINCRBY', b, 'rm:' .. redis.call('HGET', q, 'm'), fmt(-res))
      redis.call('HSET', q, 'st', 'expired')
    end
    redis.call('ZREM', open, id)
  end
  return #ids
end
"""

# KEYS: q, w, b, open. ARGV: now, id, rpm, tpm, tokens, reserve, day_limit, month_limit, ttl_ms, keep_ms,
#   tenant prefix ('{tg:<tenant>}:q:'): expired reservations are released first, so none causes a false 429,
#   then the flexible completion budget: prompt_units, units_per_output_token, wanted_tokens, least_tokens.
#   least_tokens > 0 (the request named no max_tokens): when `reserve` does not fit the budget left, the
#   completion budget shrinks to what is left, reserve = prompt_units + granted * units_per_output_token,
#   as long as at least least_tokens fit; the router then forwards `granted` as max_tokens.
# -> {'ok', day_left, month_left, day_spent_or_reserved, month_spent_or_reserved, granted (-1: as asked),
#     requests_in_window, tokens_in_window}
#  | {'dup', state, granted (-1: as asked)}: the id was admitted before (a retry after a timeout)
#  | {'rate', 'rpm'|'tpm', retry_ms}
#  | {'budget', 'daily'|'monthly', left, retry_s}
ADMIT = _COMMON + """
local now = now_ms(ARGV[1])
local st = redis.call('HGET', KEYS[1], 'st')
if st then return {'dup', st, redis.call('HGET', KEYS[1], 'g') or '-1'} end
local rpm, tpm, tokens = num(ARGV[3]), num(ARGV[4]), num(ARGV[5])
local reserve, dlim, mlim = num(ARGV[6]), num(ARGV[7]), num(ARGV[8])
local minute = math.floor(now / 60000)
local weight = 1 - (now % 60000) / 60000
local function window(kind)
  local cur = num(redis.call('HGET', KEYS[2], kind .. ':' .. minute))
  local prev = num(redis.call('HGET', KEYS[2], kind .. ':' .. (minute - 1)))
  return cur + prev * weight
end
local retry = 60000 - now % 60000
if rpm > 0 and window('r') + 1 > rpm then return {'rate', 'rpm', retry} end
if tpm > 0 and window('t') + tokens > tpm then return {'rate', 'tpm', retry} end
release_expired(KEYS[3], KEYS[4], ARGV[11], now, 100)
local day, mon, _, day_left_s, mon_left_s = periods(now)
local dused = num(redis.call('HGET', KEYS[3], 'sd:' .. day)) + num(redis.call('HGET', KEYS[3], 'rd:' .. day))
local mused = num(redis.call('HGET', KEYS[3], 'sm:' .. mon)) + num(redis.call('HGET', KEYS[3], 'rm:' .. mon))
local granted = -1
local least = num(ARGV[15])
if least > 0 then
  local avail = reserve
  if dlim >= 0 then avail = math.min(avail, dlim - dused) end
  if mlim >= 0 then avail = math.min(avail, mlim - mused) end
  if avail < reserve then
    local pu, ou, want = num(ARGV[12]), num(ARGV[13]), num(ARGV[14])
    local g = want
    if ou > 0 then g = math.min(want, math.floor((avail - pu) / ou)) end
    if g >= least and pu + g * ou <= avail then
      granted = g
      reserve = pu + g * ou
      tokens = math.max(tokens - (want - g), 0)
    end
  end
end
if dlim >= 0 and dused + reserve > dlim then return {'budget', 'daily', fmt(dlim - dused), day_left_s} end
if mlim >= 0 and mused + reserve > mlim then return {'budget', 'monthly', fmt(mlim - mused), mon_left_s} end
redis.call('HINCRBY', KEYS[2], 'r:' .. minute, 1)
redis.call('HINCRBY', KEYS[2], 't:' .. minute, fmt(tokens))
redis.call('HDEL', KEYS[2], 'r:' .. (minute - 2), 't:' .. (minute - 2))
redis.call('PEXPIRE', KEYS[2], 180000)
redis.call('HINCRBY', KEYS[3], 'rd:' .. day, fmt(reserve))
redis.call('HINCRBY', KEYS[3], 'rm:' .. mon, fmt(reserve))
redis.call('HSET', KEYS[1], 'st', 'open', 'res', fmt(reserve), 'tok', fmt(tokens), 'd', day, 'm', mon,
           'min', fmt(minute), 'g', granted)
redis.call('PEXPIRE', KEYS[1], num(ARGV[10]))
redis.call('ZADD', KEYS[4], now + num(ARGV[9]), ARGV[2])
return {'ok', fmt(dlim - dused - reserve), fmt(mlim - mused - reserve), fmt(dused + reserve),
        fmt(mused + reserve), fmt(granted), fmt(math.ceil(window('r'))), fmt(math.ceil(window('t')))}
"""

# KEYS: q, w, b, open, usage, agg prefix. ARGV: now, id, cost, tokens, keep_ms, maxlen, at_ms, agg_keep_ms,
# then the ledger record as field/value pairs (budget_store.Usage.fields: tier, instance, prompt, cached, completion,
# base, nocache, slo, base_n, base_na, base_cost, gpu_us, gpu_src, slo_met@<class>, slo_n@<class>, ...). The hourly
# aggregates sum the numeric ones (budget_store.AGG_FIELDS and the per-class SLO counts) and count gpu_src_<source>.
# -> {'settled', how} where how = open | expired | orphan;  {'dup', 'settled'}
SETTLE = _COMMON + """
local now = now_ms(ARGV[1])
local st = redis.call('HGET', KEYS[1], 'st')
if st == 'settled' then return {'dup', 'settled'} end
local cost, tokens = num(ARGV[3]), num(ARGV[4])
local how = st or 'orphan'
local day, mon, hour
if st then
  day = redis.call('HGET', KEYS[1], 'd'); mon = redis.call('HGET', KEYS[1], 'm')
  local _, _, h = periods(now)
  hour = h
else
  day, mon, hour = periods(num(ARGV[7]))  -- admitted without a reservation: bill at the request's own time
end
if st == 'open' then
  local res = num(redis.call('HGET', KEYS[1], 'res'))
  redis.call('HINCRBY', KEYS[3], 'rd:' .. day, fmt(-res))
  redis.call('HINCRBY', KEYS[3], 'rm:' .. mon, fmt(-res))
  local minute = redis.call('HGET', KEYS[1], 'min')
  local delta = tokens - num(redis.call('HGET', KEYS[1], 'tok'))
  if redis.call('HEXISTS', KEYS[2], 't:' .. minute) == 1 then
    redis.call('HINCRBY', KEYS[2], 't:' .. minute, fmt(delta))
  end
  redis.call('ZREM', KEYS[4], ARGV[2])
end
redis.call('HINCRBY', KEYS[3], 'sd:' .. day, fmt(cost))
redis.call('HINCRBY', KEYS[3], 'sm:' .. mon, fmt(cost))
redis.call('HSET', KEYS[1], 'st', 'settled', 'cost', fmt(cost))
redis.call('PEXPIRE', KEYS[1], num(ARGV[5]))
local rec = {'id', ARGV[2], 'cost', ARGV[3], 'at', ARGV[7], 'how', how}
for i = 9, #ARGV do rec[#rec + 1] = ARGV[i] end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', unpack(rec))
local tier = 'none'
for i = 9, #ARGV - 1, 2 do if ARGV[i] == 'tier' then tier = ARGV[i + 1] end end
local base = hour .. '|' .. tier .. '|'
local agg = KEYS[6] .. ':' .. string.sub(hour, 1, 8)  -- the day's key, in the tenant's slot
redis.call('HINCRBY', agg, base .. 'requests', 1)
redis.call('HINCRBY', agg, base .. 'cost', fmt(cost))
local sums = {prompt = true, cached = true, completion = true, base = true, nocache = true, slo_met = true,
              slo_n = true, base_n = true, base_na = true, base_cost = true, gpu_us = true}
local srcs = {engine = true, sim = true, throughput = true}
for i = 9, #ARGV - 1, 2 do
  local f, v = ARGV[i], ARGV[i + 1]
  if sums[f] or string.sub(f, 1, 8) == 'slo_met@' or string.sub(f, 1, 6) == 'slo_n@' then
    redis.call('HINCRBY', agg, base .. f, fmt(num(v)))
  elseif f == 'gpu_src' and srcs[v] then
    redis.call('HINCRBY', agg, base .. 'gpu_src_' .. v, 1)
  end
end
redis.call('PEXPIRE', agg, num(ARGV[8]))
return {'settled', how}
"""

# KEYS: q, b, open. ARGV: now, id, keep_ms. An admission whose outcome the router never learned (it timed
# out, and the request was refused): release its reservation if the script ran, or block the id if it has
# not run yet, so a late admission is a 'dup' and reserves nothing. -> released | blocked | <state>
RELEASE = _COMMON + """
local st = redis.call('HGET', KEYS[1], 'st')
if st == 'open' then
  local res = num(redis.call('HGET', KEYS[1], 'res'))
  redis.call('HINCRBY', KEYS[2], 'rd:' .. redis.call('HGET', KEYS[1], 'd'), fmt(-res))
  redis.call('HINCRBY', KEYS[2], 'rm:' .. redis.call('HGET', KEYS[1], 'm'), fmt(-res))
  redis.call('HSET', KEYS[1], 'st', 'released')
  redis.call('PEXPIRE', KEYS[1], num(ARGV[3]))
  redis.call('ZREM', KEYS[3], ARGV[2])
  return 'released'
end
if not st then
  redis.call('HSET', KEYS[1], 'st', 'released')
  redis.call('PEXPIRE', KEYS[1], num(ARGV[3]))
  return 'blocked'
end
return st
"""

# KEYS: b, open; ARGV: now, tenant prefix ('{tg:<tenant>}:q:'), limit -> number released
SWEEP = _COMMON + """
return release_expired(KEYS[1], KEYS[2], ARGV[2], now_ms(ARGV[1]), num(ARGV[3]))
"""

# KEYS: b, open; ARGV: now, tenant prefix -> {day, month, spent_day, reserved_day, spent_month, reserved_month}
# (expired reservations are released first, so what it reports is what admission would see)
STATUS = _COMMON + """
local now = now_ms(ARGV[1])
release_expired(KEYS[1], KEYS[2], ARGV[2], now, 100)
local day, mon = periods(now)
return {day, mon, fmt(num(redis.call('HGET', KEYS[1], 'sd:' .. day))),
        fmt(num(redis.call('HGET', KEYS[1], 'rd:' .. day))),
        fmt(num(redis.call('HGET', KEYS[1], 'sm:' .. mon))),
        fmt(num(redis.call('HGET', KEYS[1], 'rm:' .. mon)))}
"""
