//! The Lua scripts behind every write that must be atomic: a compare-and-set of the replay
//! watermark, the single use of a code, the multi-step confirmations, and every change to a
//! consumer, which raises its version and announces it on the events channel in the same
//! step (so a change is never applied without being announced, nor announced unapplied).
//!
//! Every script touches only the keys it is given, and all of them belong to one consumer
//! (one hash tag, so one slot: Redis Cluster-ready). The events channel is not a key: it is
//! the last argument.
//!
//! Keys of a consumer (see `Keys`): 1 consumer, 2 keys, 3 totp, 4 recovery, 5 sms,
//! 6 login code, 7 enrolment code. Scripts take the ones they use, in that order.

use std::sync::LazyLock;

use redis::Script;

/// Raises the consumer's version and announces it: `changed(id, channel)` at the end of a
/// script that changed something. KEYS[1] is always the consumer's hash.
const PRELUDE: &str = r#"
local function changed(id, channel)
  local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
  redis.call('PUBLISH', channel, 'c ' .. id .. ' ' .. v)
  return v
end
-- An outstanding code's key is kept an hour, longer than any code lives (its expiry is
-- checked against the gateway's clock, not Redis's).
local CODE_KEPT = 3600
local function exists()
  return redis.call('EXISTS', KEYS[1]) == 1
end
local function replace_recovery(key, first)
  redis.call('DEL', key)
  for i = first, #ARGV - 1 do
    redis.call('HSET', key, ARGV[i], '0')
  end
end
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

/// KEYS: consumer, keys. ARGV: id, name, roles, disabled, created_at, key field, key value,
/// channel. Creates the consumer at version 1 with its first key; 0 if it exists.
pub static INSERT_CONSUMER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'name', ARGV[2], 'roles', ARGV[3],
  'disabled', ARGV[4], 'created_at', ARGV[5], 'version', 1)
redis.call('HSET', KEYS[2], ARGV[6], ARGV[7])
redis.call('PUBLISH', ARGV[8], 'c ' .. ARGV[1] .. ' 1')
return 1
"#,
    )
});

/// KEYS: consumer, keys, totp, recovery, sms, login code, enrolment code. ARGV: id, name,
/// roles, disabled, created_at, the contents of keys, totp, recovery and sms (a JSON array of
/// four objects of strings), channel. Replaces everything of the consumer (outstanding codes
/// go); returns the name it had, or false.
pub static RESTORE_CONSUMER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local old = redis.call('HGET', KEYS[1], 'name')
local v = tonumber(redis.call('HGET', KEYS[1], 'version') or '0') + 1
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'name', ARGV[2], 'roles', ARGV[3],
  'disabled', ARGV[4], 'created_at', ARGV[5], 'version', v)
local maps = cjson.decode(ARGV[6])
for i = 1, 4 do
  for field, value in pairs(maps[i]) do redis.call('HSET', KEYS[i + 1], field, value) end
end
redis.call('PUBLISH', ARGV[7], 'c ' .. ARGV[1] .. ' ' .. v)
return old or false
"#,
    )
});

/// KEYS: consumer. ARGV: id, roles, disabled, channel.
pub static UPDATE_CONSUMER: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if not exists() then return 0 end
redis.call('HSET', KEYS[1], 'roles', ARGV[2], 'disabled', ARGV[3])
changed(ARGV[1], ARGV[4])
return 1
"#,
    )
});

/// KEYS: consumer, keys, totp, recovery, sms, login code, enrolment code. ARGV: id, channel.
/// Returns the consumer's name (for its name reservation), or false.
pub static DELETE_CONSUMER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local name = redis.call('HGET', KEYS[1], 'name')
if not name then return false end
local v = tonumber(redis.call('HGET', KEYS[1], 'version')) + 1
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
redis.call('PUBLISH', ARGV[2], 'c ' .. ARGV[1] .. ' ' .. v)
return name
"#,
    )
});

/// KEYS: consumer, keys. ARGV: id, field, value, channel. Sets one key's record.
pub static PUT_KEY: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if not exists() then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
changed(ARGV[1], ARGV[4])
return 1
"#,
    )
});

/// KEYS: consumer, keys. ARGV: id, field, expected value, new value, channel. Replaces a key's
/// record only if it is still the one read (a revocation racing another).
pub static SWAP_KEY: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('HGET', KEYS[2], ARGV[2]) ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
changed(ARGV[1], ARGV[5])
return 1
"#,
    )
});

/// KEYS: consumer, totp. ARGV: id, pending record, started_with, channel.
pub static PUT_PENDING_TOTP: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if not exists() then return 0 end
redis.call('HSET', KEYS[2], 'pending', ARGV[2], 'pending_with', ARGV[3])
changed(ARGV[1], ARGV[4])
return 1
"#,
    )
});

/// KEYS: consumer, totp, recovery, sms, enrolment code. ARGV: id, step, drop_below,
/// recovery hashes..., channel. The pending enrolment becomes the confirmed one (moved, so a
/// second confirmation finds none), with its watermark; the recovery set is replaced; a
/// pending number started below `drop_below` goes with its code. 0 if nothing was pending.
pub static CONFIRM_TOTP: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local pending = redis.call('HGET', KEYS[2], 'pending')
if not pending then return 0 end
redis.call('HSET', KEYS[2], 'confirmed', pending, 'last_step', ARGV[2])
redis.call('HDEL', KEYS[2], 'pending', 'pending_with')
replace_recovery(KEYS[3], 4)
if redis.call('HEXISTS', KEYS[4], 'pending') == 1
   and tonumber(redis.call('HGET', KEYS[4], 'pending_with') or '0') < tonumber(ARGV[3]) then
  redis.call('HDEL', KEYS[4], 'pending', 'pending_at')
  redis.call('HSET', KEYS[4], 'pending_with', '0')
  redis.call('DEL', KEYS[5])
  if redis.call('HEXISTS', KEYS[4], 'phone') == 0 then redis.call('DEL', KEYS[4]) end
end
changed(ARGV[1], ARGV[#ARGV])
return 1
"#,
    )
});

/// KEYS: consumer, totp. ARGV: id, channel. Drops the pending enrolment only.
pub static DELETE_PENDING_TOTP: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('HDEL', KEYS[2], 'pending', 'pending_with') == 0 then return 0 end
changed(ARGV[1], ARGV[2])
return 1
"#,
    )
});

/// KEYS: consumer, totp, recovery. ARGV: id, drop_recovery (1/0), channel.
pub static DELETE_TOTP: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if not exists() then return 0 end
redis.call('DEL', KEYS[2])
if ARGV[2] == '1' then redis.call('DEL', KEYS[3]) end
changed(ARGV[1], ARGV[3])
return 1
"#,
    )
});

/// KEYS: consumer, sms, enrolment code. ARGV: id, sealed number, at, started_with, code
/// hash, code expiry, channel. The pending number and its verification code, together.
pub static PUT_PENDING_SMS: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if not exists() then return 0 end
redis.call('HSET', KEYS[2], 'pending', ARGV[2], 'updated_at', ARGV[3], 'pending_at', ARGV[3],
  'pending_with', ARGV[4])
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'hash', ARGV[5], 'expires_at', ARGV[6])
redis.call('EXPIRE', KEYS[3], CODE_KEPT)
changed(ARGV[1], ARGV[7])
return 1
"#,
    )
});

/// Checks and spends the code in KEYS[n] (`hash`, `expires_at`) against ARGV hash and now:
/// 'accepted' (spent), 'wrong', 'expired' (deleted), 'missing'.
const CHECK_CODE: &str = r#"
local function check_code(key, hash, now)
  local stored = redis.call('HMGET', key, 'hash', 'expires_at')
  if not stored[1] then return 'missing' end
  if tonumber(now) >= tonumber(stored[2]) then
    redis.call('DEL', key)
    return 'expired'
  end
  if stored[1] ~= hash then return 'wrong' end
  redis.call('DEL', key)
  return 'accepted'
end
"#;

/// KEYS: consumer, totp, recovery, sms, login code, enrolment code. ARGV: id, code hash, now,
/// with_recovery (1/0), drop_below, recovery hashes..., channel. The verification code
/// checked and spent; when accepted, the pending number becomes the confirmed one, the old
/// number's login code dies, recovery codes are replaced (when given) and a pending TOTP
/// enrolment started below `drop_below` goes, all at once.
pub static CONFIRM_SMS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{PRELUDE}\n{CHECK_CODE}\n{}",
        r#"
local check = check_code(KEYS[6], ARGV[2], ARGV[3])
if check ~= 'accepted' then return check end
local pending = redis.call('HGET', KEYS[4], 'pending')
if not pending then return 'missing' end
redis.call('HSET', KEYS[4], 'phone', pending, 'updated_at', ARGV[3], 'pending_with', '0')
redis.call('HDEL', KEYS[4], 'pending', 'pending_at')
redis.call('DEL', KEYS[5])
if ARGV[4] == '1' then replace_recovery(KEYS[3], 6) end
if tonumber(redis.call('HGET', KEYS[2], 'pending_with') or '0') < tonumber(ARGV[5]) then
  redis.call('HDEL', KEYS[2], 'pending', 'pending_with')
end
changed(ARGV[1], ARGV[#ARGV])
return 'accepted'
"#
    ))
});

/// KEYS: consumer, sms, enrolment code. ARGV: id, code hash or '', channel. Drops the pending
/// number and its code; with a hash, only if that code is still the outstanding one.
pub static DROP_PENDING_SMS: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if ARGV[2] ~= '' and redis.call('HGET', KEYS[3], 'hash') ~= ARGV[2] then return 0 end
if redis.call('HEXISTS', KEYS[2], 'pending') == 0 then return 0 end
redis.call('HDEL', KEYS[2], 'pending', 'pending_at')
redis.call('HSET', KEYS[2], 'pending_with', '0')
redis.call('DEL', KEYS[3])
if redis.call('HEXISTS', KEYS[2], 'phone') == 0 then redis.call('DEL', KEYS[2]) end
changed(ARGV[1], ARGV[3])
return 1
"#,
    )
});

/// KEYS: consumer, recovery, sms, login code, enrolment code. ARGV: id, drop_recovery,
/// channel.
pub static DELETE_SMS: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if not exists() then return 0 end
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
if ARGV[2] == '1' then redis.call('DEL', KEYS[2]) end
changed(ARGV[1], ARGV[3])
return 1
"#,
    )
});

/// KEYS: code. ARGV: code hash, expires_at. Replaces the outstanding code of its purpose.
pub static PUT_CODE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'hash', ARGV[1], 'expires_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], CODE_KEPT)
return 1
"#,
    )
});

/// KEYS: code. ARGV: code hash, now.
pub static USE_CODE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{CHECK_CODE}\nreturn check_code(KEYS[1], ARGV[1], ARGV[2])"
    ))
});

/// KEYS: code. ARGV: code hash. Withdraws the code only if it is still that one.
pub static DELETE_CODE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HGET', KEYS[1], 'hash') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#,
    )
});

/// KEYS: consumer, recovery. ARGV: id, hashes..., channel.
pub static REPLACE_RECOVERY: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if not exists() then return 0 end
replace_recovery(KEYS[2], 2)
changed(ARGV[1], ARGV[#ARGV])
return 1
"#,
    )
});

/// KEYS: totp. ARGV: step. The replay watermark's compare-and-set: 1 (and stored) only when
/// `step` is later than the stored one, on a confirmed enrolment.
pub static ADVANCE_STEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HEXISTS', KEYS[1], 'confirmed') == 0 then return 0 end
local last = redis.call('HGET', KEYS[1], 'last_step')
if last and tonumber(last) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'last_step', ARGV[1])
return 1
"#,
    )
});

/// KEYS: consumer, recovery. ARGV: id, hash, at, channel. Spends an unused recovery code.
pub static USE_RECOVERY: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('HGET', KEYS[2], ARGV[2]) ~= '0' then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
changed(ARGV[1], ARGV[4])
return 1
"#,
    )
});

/// KEYS: key uses. ARGV: pairs of (hash, at). Keeps the latest use of each key.
pub static RECORD_KEY_USE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
for i = 1, #ARGV, 2 do
  local at = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > at then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"#,
    )
});
