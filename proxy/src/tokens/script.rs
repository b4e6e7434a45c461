//! The token limiter's Lua scripts (SPEC §11). Every key of one request is
//! hash-tagged `{<org_id>}`, so each script runs on one Redis Cluster shard,
//! atomically, in one round trip.
//!
//! Keys, in this order in both scripts (`<m>` = unix minute, `<M>` = YYYYMM):
//!
//! 1. `ibex:tl:{<org>}:m:<m>` the org's minute,
//! 2. `ibex:tl:{<org>}:am:<agent>:<m>` the agent's minute,
//! 3. `ibex:tl:{<org>}:M:<M>` the org's month,
//! 4. `ibex:tl:{<org>}:aM:<agent>:<M>` the agent's month,
//! 5. `ibex:tl:{<org>}:U:<M>` the org's month in micro-USD,
//! 6. `ibex:tl:{<org>}:r:<id>` the reservation itself, alive from its
//!    reserve to its settle.
//!
//! **Settles ride along** ([`super::settle`]): both scripts take, after their
//! own keys and arguments, any number of settles of the same org — 6 keys
//! (the reservation's keys 1–6 above) and 3 arguments each (tokens used minus
//! reserved, the same in micro-USD, the mask of the keys the reservation
//! counted in) — applied first, each idempotent by its reservation key.

/// The settle of one reservation, shared by both scripts: its keys start
/// after `KEYS[kb]`, its arguments after `ARGV[ab]`. Idempotent: the
/// reservation key is deleted by the first settle, so a retried one (its
/// reply lost) is a no-op, and so is the settle of a reservation Redis lost
/// (restarted: its month is re-seeded from the ledger, which will hold this
/// record). A key that expired (the minute went by) or vanished is not
/// re-created; a count never goes below zero.
macro_rules! settle_fn {
    () => {
        "\
local function settle(kb, ab)
  if redis.call('DEL', KEYS[kb + 6]) == 0 then return 0 end
  local mask = tonumber(ARGV[ab + 3])
  for i = 1, 5 do
    local d = tonumber(ARGV[ab + 1])
    if i == 5 then d = tonumber(ARGV[ab + 2]) end
    if d ~= 0 and math.floor(mask / 2 ^ (i - 1)) % 2 == 1 and redis.call('EXISTS', KEYS[kb + i]) == 1 then
      local c = redis.call('INCRBY', KEYS[kb + i], d)
      if c < 0 then redis.call('INCRBY', KEYS[kb + i], -c) end
    end
  end
  return 1
end
"
    };
}

/// Check and reserve. `ARGV`: 1 prompt bound, 2 output asked (0 = not
/// given: reserve ARGV 3, the default, or what remains, whichever is
/// smaller), 4 minute TTL ms, 5 month TTL ms, 6–10 the limits of keys 1–5
/// (0 = none), 11–12 input/output prices in micro-USD per million tokens
/// (0 = unpriced), 13 the reservation key's TTL ms (key 6, created on admission).
/// Then the settles that ride along (keys from 7, arguments from 14), applied
/// before the decision, whatever it is.
///
/// A level with a limit is checked; a level is counted when it has a limit
/// or its key exists (a month keeps counting while its budget is off, so
/// turning it on again finds it true). A month key missing while its budget
/// applies is not guessed: `{-1, level}` asks the proxy to seed it from the
/// ledger first. Refused: `{0, level, count, limit, pttl}`, nothing counted.
/// Admitted: `{1, output reserved, usd reserved, level, remaining, limit,
/// pttl, mask}`: the level with the least left (0 = none with a limit), and
/// the bit mask of the keys counted in (what the settle adjusts).
pub const RESERVE: &str = concat!(
    settle_fn!(),
    "\
for j = 0, (#KEYS - 6) / 6 - 1 do settle(6 + 6 * j, 13 + 3 * j) end
local prompt = tonumber(ARGV[1])
local out = tonumber(ARGV[2])
local ttl = {ARGV[4], ARGV[4], ARGV[5], ARGV[5], ARGV[5]}
local lim, cur = {}, {}
for i = 1, 5 do
  lim[i] = tonumber(ARGV[5 + i])
  local v = redis.call('GET', KEYS[i])
  if v then cur[i] = tonumber(v)
  elseif lim[i] > 0 and i >= 3 then return {-1, i}
  else cur[i] = false end
end
if out == 0 then
  out = tonumber(ARGV[3])
  for i = 1, 4 do
    if lim[i] > 0 then
      local room = lim[i] - (cur[i] or 0) - prompt
      if room < out then out = room end
    end
  end
  if out < 1 then out = 1 end
end
local n = prompt + out
local pin, pout = tonumber(ARGV[11]), tonumber(ARGV[12])
local usd = math.ceil((prompt * pin + out * pout) / 1000000)
local amt = {n, n, n, n, usd}
for i = 1, 5 do
  local c = cur[i] or 0
  if lim[i] > 0 and (c + amt[i] > lim[i] or (i == 5 and c >= lim[i])) then
    return {0, i, c, lim[i], redis.call('PTTL', KEYS[i])}
  end
end
local best, left, mask = 0, -1, 0
for i = 1, 5 do
  if (lim[i] > 0 or cur[i]) and amt[i] > 0 then
    mask = mask + 2 ^ (i - 1)
    local c = redis.call('INCRBY', KEYS[i], amt[i])
    if c == amt[i] or redis.call('PTTL', KEYS[i]) < 0 then
      redis.call('PEXPIRE', KEYS[i], ttl[i])
    end
  end
  if i <= 4 and lim[i] > 0 then
    local r = lim[i] - (cur[i] or 0) - amt[i]
    if left < 0 or r < left then best, left = i, r end
  end
end
redis.call('SET', KEYS[6], mask, 'PX', ARGV[13])
if best == 0 then return {1, out, usd, 0, 0, 0, 0, mask} end
return {1, out, usd, best, left, lim[best], redis.call('PTTL', KEYS[best]), mask}
"
);

/// Seed missing month keys from the ledger. `KEYS` 1–3: the org's month,
/// the agent's month, the org's USD month; `ARGV` 1–3 their values (-1 =
/// leave), 4 the TTL ms. `SET NX`: a key another proxy seeded (or counted
/// into) meanwhile is kept.
pub const SEED: &str = "\
for i = 1, 3 do
  local v = tonumber(ARGV[i])
  if v >= 0 then redis.call('SET', KEYS[i], v, 'NX', 'PX', ARGV[4]) end
end
return 1
";

/// Settle reservations to what was recorded, any number of one org: 6
/// `KEYS` and 3 `ARGV` each (see the module doc and `settle_fn!`). Returns
/// how many were applied (a retried one counts 0).
pub const SETTLE: &str = concat!(
    settle_fn!(),
    "\
local n = 0
for j = 0, #KEYS / 6 - 1 do n = n + settle(6 * j, 3 * j) end
return n
"
);
