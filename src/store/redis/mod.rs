//! The shared store of several nodes, on Redis.
//!
//! Every key of one consumer carries the consumer's hash tag (`{c:<id>}`), so one consumer's
//! data lives in one slot and every write to it is one Lua script ([`scripts`]): single use,
//! the watermark's compare-and-set and the confirmations are atomic whichever node runs
//! them, and each change raises the consumer's version and is announced on the events
//! channel in the same step. [`events`] listens to that channel (the change feed, token
//! revocations, bans), and keeps the node's [`Freshness`](super::Freshness): how recently it
//! heard from Redis.
//!
//! Keys (after the configured prefix): `{c:<id>}:consumer` (hash: name, roles, disabled,
//! created_at, version), `{c:<id>}:keys` (hash: key hash → record), `{c:<id>}:totp` (hash:
//! confirmed, pending, pending_with, last_step), `{c:<id>}:recovery` (hash: code hash → 0 or
//! when used), `{c:<id>}:sms` (hash: phone, pending, updated_at, pending_at, pending_with),
//! `{c:<id>}:code:<purpose>` (hash: hash, expires_at; expires itself); `consumers` (set of
//! ids), `{n:<name>}:name` (the name's owner), `keyuse` (key hash → last use), `meta`,
//! `audit` (a stream); the step-up tokens' keys ([`Keys::token`]) and the failure limiter's
//! ([`limiter`]).

pub mod events;
pub mod limiter;
pub mod scripts;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use super::{
    AuditEvent, ChangeFeed, CodeCheck, ConsumerFilter, ConsumerRecord, ConsumerState, Freshness,
    Hash, KeyRecord, LimiterChange, LimiterState, RecoveryCodeRecord, SmsCodeRecord, SmsRecord,
    State, Store, StoreError, TotpRecord,
};
use crate::config::RedisSettings;
use crate::credentials::assurance::Assurance;
use crate::credentials::factors::Purpose;
use crate::credentials::totp::{TotpAlgorithm, TotpParams};
use crate::secrets::hex;

/// Audit events kept at most (the stream is trimmed, roughly, past this).
const AUDIT_KEPT: usize = 1_000_000;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Key names, all under the configured prefix.
#[derive(Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    fn of(&self, id: &str, what: &str) -> String {
        format!("{}{{c:{id}}}:{what}", self.prefix)
    }

    pub fn consumer(&self, id: &str) -> String {
        self.of(id, "consumer")
    }
    fn keys(&self, id: &str) -> String {
        self.of(id, "keys")
    }
    fn totp(&self, id: &str) -> String {
        self.of(id, "totp")
    }
    fn recovery(&self, id: &str) -> String {
        self.of(id, "recovery")
    }
    fn sms(&self, id: &str) -> String {
        self.of(id, "sms")
    }
    fn code(&self, id: &str, purpose: Purpose) -> String {
        self.of(id, &format!("code:{}", purpose.as_str()))
    }
    /// The seven keys of a consumer, in the order the scripts number them.
    fn all(&self, id: &str) -> [String; 7] {
        [
            self.consumer(id),
            self.keys(id),
            self.totp(id),
            self.recovery(id),
            self.sms(id),
            self.code(id, Purpose::Login),
            self.code(id, Purpose::Enrol),
        ]
    }
    fn name(&self, name: &str) -> String {
        format!("{}{{n:{name}}}:name", self.prefix)
    }
    fn consumers(&self) -> String {
        format!("{}consumers", self.prefix)
    }
    fn key_use(&self) -> String {
        format!("{}keyuse", self.prefix)
    }
    fn meta(&self) -> String {
        format!("{}meta", self.prefix)
    }
    fn audit(&self) -> String {
        format!("{}audit", self.prefix)
    }
    /// The pub/sub channel of every event (changes, revocations, bans, heartbeats).
    pub fn events(&self) -> String {
        format!("{}events", self.prefix)
    }
    /// A step-up token of a consumer, by its digest (hex): `policy scope expires_at`, expiring
    /// with the token. In the consumer's slot, so revoking them all is one script.
    pub fn token(&self, consumer_id: &str, digest_hex: &str) -> String {
        format!("{}{digest_hex}", self.tokens_prefix(consumer_id))
    }
    /// What every token key of a consumer starts with.
    pub fn tokens_prefix(&self, consumer_id: &str) -> String {
        format!("{}{{c:{consumer_id}}}:t:", self.prefix)
    }
    /// A consumer's live tokens (sorted set: digest by expiry), for revocation.
    pub fn tokens(&self, consumer_id: &str) -> String {
        self.of(consumer_id, "tokens")
    }
    /// A consumer's SMS sends of the last hour (sorted set by time).
    pub fn sends_of_consumer(&self, consumer_id: &str) -> String {
        self.of(consumer_id, "sends")
    }
    /// A destination number's SMS sends of the last hour, by the number's digest.
    pub fn sends_of_phone(&self, digest_hex: &str) -> String {
        format!("{}{{p:{digest_hex}}}:sends", self.prefix)
    }
    /// A subject's failure counters (hash: policy → theoretical arrival time, ms).
    pub fn failures(&self, subject: &str) -> String {
        format!("{}{{s:{subject}}}:failures", self.prefix)
    }
    fn subject_of_failures(&self, key: &str) -> Option<String> {
        let subject = key
            .strip_prefix(&self.prefix)?
            .strip_prefix("{s:")?
            .strip_suffix("}:failures")?;
        Some(subject.to_owned())
    }
    /// A subject's ban (`started until`), expiring a minute after it ends.
    pub fn ban(&self, subject: &str) -> String {
        format!("{}{{s:{subject}}}:ban", self.prefix)
    }
    /// Every ban in force (sorted set: subject by end).
    pub fn bans(&self) -> String {
        format!("{}bans", self.prefix)
    }
    /// A request for approval (JSON), and its state (one line), in the request's own slot.
    pub fn approval(&self, id: &str) -> String {
        format!("{}{{a:{id}}}:approval", self.prefix)
    }
    pub fn approval_state(&self, id: &str) -> String {
        format!("{}{{a:{id}}}:state", self.prefix)
    }
    /// The pending requests for approval (sorted set: id by expiry).
    pub fn approvals_pending(&self) -> String {
        format!("{}approvals:pending", self.prefix)
    }
}

/// The connection to Redis every Redis-backed port shares: a connection manager
/// (reconnects with backoff; commands time out), the key names, and the events listener.
#[derive(Clone)]
pub struct Redis {
    pub conn: ConnectionManager,
    pub keys: Keys,
    pub events: Arc<events::Events>,
}

impl Redis {
    /// Connects (once; later failures reconnect on their own) and starts listening to the
    /// events channel.
    pub async fn connect(settings: &RedisSettings) -> Result<Self, StoreError> {
        let client = client(settings)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.command_timeout))
            .set_number_of_retries(2)
            .set_max_delay(std::time::Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|e| unavailable(format!("cannot connect to Redis: {e}")))?;
        let keys = Keys::new(&settings.key_prefix);
        let events = events::Events::start(client, conn.clone(), &keys, settings).await?;
        let redis = Self { conn, keys, events };
        redis.check_eviction_policy().await;
        Ok(redis)
    }

    /// Redis must never evict a key of the gateway's (a watermark or a used code evicted is a
    /// code accepted twice): warn loudly unless `maxmemory-policy` is `noeviction`.
    async fn check_eviction_policy(&self) {
        let mut conn = self.conn.clone();
        let answer: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut conn)
            .await;
        match answer.as_deref() {
            Ok([_, policy]) if policy == "noeviction" => {}
            Ok([_, policy]) => tracing::error!(
                policy = policy.as_str(),
                "Redis may evict keys under memory pressure (maxmemory-policy is not \
                 noeviction): a used code or a replay watermark could be evicted and a code \
                 accepted twice; set `maxmemory-policy noeviction`"
            ),
            _ => tracing::warn!(
                "could not read Redis's maxmemory-policy (CONFIG GET refused?); it must be \
                 noeviction"
            ),
        }
    }
}

/// The client for the configured URL, with the password from the configuration (never in the
/// URL).
fn client(settings: &RedisSettings) -> Result<redis::Client, StoreError> {
    use redis::IntoConnectionInfo;
    let mut info = settings
        .url
        .as_str()
        .into_connection_info()
        .map_err(|e| unavailable(format!("store.redis.url: {e}")))?;
    if let Some(password) = &settings.password {
        let redis = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(redis);
    }
    redis::Client::open(info).map_err(|e| unavailable(format!("store.redis.url: {e}")))
}

/// The durable store on Redis.
pub struct RedisStore {
    redis: Redis,
}

impl RedisStore {
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }

    fn conn(&self) -> ConnectionManager {
        self.redis.conn.clone()
    }

    fn keys(&self) -> &Keys {
        &self.redis.keys
    }

    fn channel(&self) -> String {
        self.redis.keys.events()
    }

    /// Runs `script` on the keys of consumer `id` numbered `which` (1-based, as the scripts
    /// number them), with `args` after the consumer id and before the channel.
    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        id: &str,
        which: &[usize],
        args: &[String],
    ) -> Result<T, StoreError> {
        let all = self.keys().all(id);
        let mut invocation = script.prepare_invoke();
        for i in which {
            invocation.key(&all[i - 1]);
        }
        invocation.arg(id);
        for arg in args {
            invocation.arg(arg);
        }
        invocation.arg(self.channel());
        invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)
    }

    /// Reserves `name` for consumer `id` (the name's own slot) and lists the id among the
    /// consumers, before the consumer's record is written: a name held by another existing
    /// consumer is a conflict. A creation that fails half way leaves a reserved name without
    /// a consumer, which the next attempt with that name takes over (its owner does not
    /// exist).
    async fn reserve(&self, name: &str, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let name_key = self.keys().name(name);
        let reserved: bool = conn.set_nx(&name_key, id).await.map_err(unavailable)?;
        if !reserved {
            let owner: Option<String> = conn.get(&name_key).await.map_err(unavailable)?;
            let alive = match owner.as_deref() {
                Some(owner) if owner == id => false,
                Some(owner) => conn
                    .exists(self.keys().consumer(owner))
                    .await
                    .map_err(unavailable)?,
                None => false,
            };
            if alive {
                return Err(StoreError::Conflict(format!("consumer `{name}`")));
            }
            let _: () = conn.set(&name_key, id).await.map_err(unavailable)?;
        }
        let _: () = conn
            .sadd(self.keys().consumers(), id)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Adds `events` to the audit stream, in `pipe`.
    fn add_audit(
        &self,
        pipe: &mut redis::Pipeline,
        events: &[AuditEvent],
    ) -> Result<(), StoreError> {
        for event in events {
            let detail = serde_json::to_string(&event.detail).map_err(unavailable)?;
            let mut fields: Vec<(&str, String)> = vec![
                ("at", event.at.to_string()),
                ("kind", event.kind.clone()),
                ("detail", detail),
            ];
            if let Some(id) = &event.consumer_id {
                fields.push(("consumer_id", id.clone()));
            }
            if let Some(name) = &event.consumer_name {
                fields.push(("consumer_name", name.clone()));
            }
            if let Some(prefix) = &event.key_prefix {
                fields.push(("key_prefix", prefix.clone()));
            }
            pipe.xadd_maxlen(
                self.keys().audit(),
                redis::streams::StreamMaxlen::Approx(AUDIT_KEPT),
                "*",
                &fields,
            )
            .ignore();
        }
        Ok(())
    }

    /// Frees `name` once consumer `id` no longer has it (unless someone took it meanwhile).
    async fn release(&self, name: &str, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let name_key = self.keys().name(name);
        let owner: Option<String> = conn.get(&name_key).await.map_err(unavailable)?;
        if owner.as_deref() == Some(id) {
            let _: () = conn.del(&name_key).await.map_err(unavailable)?;
        }
        Ok(())
    }

    async fn read_consumer(&self, id: &str) -> Result<Option<ConsumerState>, StoreError> {
        let all = self.keys().all(id);
        // One transaction (one slot): a consistent picture of the consumer.
        let mut pipe = redis::pipe();
        pipe.atomic();
        for key in &all[..5] {
            pipe.hgetall(key);
        }
        let read: Vec<HashMap<String, String>> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let [consumer, keys, totp, recovery, sms]: [HashMap<String, String>; 5] =
            read.try_into()
                .map_err(|_| unavailable("a consumer read in parts"))?;
        if consumer.is_empty() {
            return Ok(None);
        }
        let mut state = ConsumerState {
            record: consumer_record(&consumer)?,
            keys: Vec::new(),
            totp: Vec::new(),
            recovery_codes: Vec::new(),
            sms: sms_record(id, &sms)?,
        };
        let uses: HashMap<String, u64> = if keys.is_empty() {
            HashMap::new()
        } else {
            let fields: Vec<&String> = keys.keys().collect();
            let values: Vec<Option<u64>> = redis::cmd("HMGET")
                .arg(self.keys().key_use())
                .arg(&fields)
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            fields
                .into_iter()
                .zip(values)
                .filter_map(|(f, v)| Some((f.clone(), v?)))
                .collect()
        };
        for (field, value) in &keys {
            let stored: StoredKey = serde_json::from_str(value).map_err(unavailable)?;
            state.keys.push(KeyRecord {
                consumer_id: id.to_owned(),
                hash: unhex(field)?,
                prefix: stored.prefix,
                created_at: stored.created_at,
                last_used_at: uses.get(field).copied(),
                revoked_at: stored.revoked_at,
            });
        }
        let last_step = totp.get("last_step").and_then(|s| s.parse().ok());
        if let Some(confirmed) = totp.get("confirmed") {
            state
                .totp
                .push(totp_record(id, confirmed, true, last_step, None)?);
        }
        if let Some(pending) = totp.get("pending") {
            let with = totp.get("pending_with").and_then(|s| s.parse().ok());
            state
                .totp
                .push(totp_record(id, pending, false, None, with)?);
        }
        for (field, used) in &recovery {
            state.recovery_codes.push(RecoveryCodeRecord {
                consumer_id: id.to_owned(),
                hash: unhex(field)?,
                used_at: used.parse::<u64>().ok().filter(|at| *at != 0),
            });
        }
        state.keys.sort_by_key(|k| k.created_at);
        Ok(Some(state))
    }
}

/// A key's record as kept under its hash.
#[derive(Serialize, Deserialize)]
struct StoredKey {
    prefix: String,
    created_at: u64,
    revoked_at: Option<u64>,
}

/// A TOTP enrolment as kept (confirmed or pending: the field says which).
#[derive(Serialize, Deserialize)]
struct StoredTotp {
    secret: String,
    algorithm: String,
    digits: u8,
    period: u64,
    created_at: u64,
}

fn totp_json(totp: &TotpRecord) -> Result<String, StoreError> {
    serde_json::to_string(&StoredTotp {
        secret: hex(&totp.secret_sealed),
        algorithm: totp.params.algorithm.as_str().to_owned(),
        digits: totp.params.digits,
        period: totp.params.period,
        created_at: totp.created_at,
    })
    .map_err(unavailable)
}

/// The hashes (keys, totp, recovery, sms) that hold `state`, as the scripts write them.
fn consumer_hashes(state: &ConsumerState) -> Result<[HashMap<String, String>; 4], StoreError> {
    let mut keys = HashMap::new();
    for key in &state.keys {
        keys.insert(hex(&key.hash), key_json(key)?);
    }
    let mut totp = HashMap::new();
    for t in &state.totp {
        if t.confirmed {
            totp.insert("confirmed".to_owned(), totp_json(t)?);
            if let Some(step) = t.last_step {
                totp.insert("last_step".to_owned(), step.to_string());
            }
        } else {
            totp.insert("pending".to_owned(), totp_json(t)?);
            totp.insert(
                "pending_with".to_owned(),
                t.started_with.to_db().to_string(),
            );
        }
    }
    let recovery = state
        .recovery_codes
        .iter()
        .map(|c| (hex(&c.hash), c.used_at.unwrap_or(0).to_string()))
        .collect();
    let mut sms = HashMap::new();
    if let Some(s) = &state.sms {
        if let Some(phone) = &s.phone_sealed {
            sms.insert("phone".to_owned(), hex(phone));
        }
        if let Some(pending) = &s.pending_sealed {
            sms.insert("pending".to_owned(), hex(pending));
        }
        if let Some(at) = s.pending_at {
            sms.insert("pending_at".to_owned(), at.to_string());
        }
        sms.insert("updated_at".to_owned(), s.updated_at.to_string());
        sms.insert(
            "pending_with".to_owned(),
            s.pending_with.to_db().to_string(),
        );
    }
    Ok([keys, totp, recovery, sms])
}

fn key_json(key: &KeyRecord) -> Result<String, StoreError> {
    serde_json::to_string(&StoredKey {
        prefix: key.prefix.clone(),
        created_at: key.created_at,
        revoked_at: key.revoked_at,
    })
    .map_err(unavailable)
}

fn unhex(text: &str) -> Result<Hash, StoreError> {
    let bytes = unhex_vec(text)?;
    bytes
        .try_into()
        .map_err(|_| unavailable("a stored hash is not 32 bytes"))
}

fn unhex_vec(text: &str) -> Result<Vec<u8>, StoreError> {
    if !text.len().is_multiple_of(2) {
        return Err(unavailable("a stored value is not hex"));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&text[i..i + 2], 16)
                .map_err(|_| unavailable("a stored value is not hex"))
        })
        .collect()
}

fn field<'a>(map: &'a HashMap<String, String>, name: &str) -> Result<&'a str, StoreError> {
    map.get(name)
        .map(String::as_str)
        .ok_or_else(|| unavailable(format!("a stored consumer has no `{name}`")))
}

fn number(map: &HashMap<String, String>, name: &str) -> Result<u64, StoreError> {
    field(map, name)?
        .parse()
        .map_err(|_| unavailable(format!("a stored `{name}` is not a number")))
}

fn consumer_record(map: &HashMap<String, String>) -> Result<ConsumerRecord, StoreError> {
    Ok(ConsumerRecord {
        id: field(map, "id")?.to_owned(),
        name: field(map, "name")?.to_owned(),
        roles: serde_json::from_str(field(map, "roles")?).map_err(unavailable)?,
        disabled: field(map, "disabled")? == "1",
        created_at: number(map, "created_at")?,
        version: number(map, "version")?,
    })
}

fn totp_record(
    id: &str,
    json: &str,
    confirmed: bool,
    last_step: Option<u64>,
    started_with: Option<i64>,
) -> Result<TotpRecord, StoreError> {
    let stored: StoredTotp = serde_json::from_str(json).map_err(unavailable)?;
    Ok(TotpRecord {
        consumer_id: id.to_owned(),
        secret_sealed: unhex_vec(&stored.secret)?,
        params: TotpParams {
            algorithm: TotpAlgorithm::parse(&stored.algorithm).unwrap_or(TotpAlgorithm::Sha1),
            digits: stored.digits,
            period: stored.period,
        },
        confirmed,
        last_step,
        created_at: stored.created_at,
        started_with: Assurance::from_db(started_with.unwrap_or(0)),
    })
}

fn sms_record(id: &str, map: &HashMap<String, String>) -> Result<Option<SmsRecord>, StoreError> {
    if map.is_empty() {
        return Ok(None);
    }
    let sealed = |name: &str| map.get(name).map(|v| unhex_vec(v)).transpose();
    Ok(Some(SmsRecord {
        consumer_id: id.to_owned(),
        phone_sealed: sealed("phone")?,
        pending_sealed: sealed("pending")?,
        updated_at: map
            .get("updated_at")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        pending_at: map.get("pending_at").and_then(|v| v.parse().ok()),
        pending_with: Assurance::from_db(
            map.get("pending_with")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        ),
    }))
}

fn code_check(answer: &str) -> CodeCheck {
    match answer {
        "accepted" => CodeCheck::Accepted,
        "wrong" => CodeCheck::Wrong,
        "expired" => CodeCheck::Expired,
        _ => CodeCheck::Missing,
    }
}

fn hashes(hashes: &[Hash]) -> impl Iterator<Item = String> + '_ {
    hashes.iter().map(|h| hex(h))
}

#[async_trait]
impl Store for RedisStore {
    async fn load(&self) -> Result<State, StoreError> {
        let ids: Vec<String> = self
            .conn()
            .smembers(self.keys().consumers())
            .await
            .map_err(unavailable)?;
        let mut state = State::default();
        for id in ids {
            // A consumer whose creation did not finish (its id reserved, its record never
            // written) is not one.
            let Some(c) = self.read_consumer(&id).await? else {
                continue;
            };
            state.consumers.push(c.record);
            state.keys.extend(c.keys);
            state.totp.extend(c.totp);
            state.recovery_codes.extend(c.recovery_codes);
            state.sms.extend(c.sms);
        }
        Ok(state)
    }

    async fn load_consumer(&self, id: &str) -> Result<Option<ConsumerState>, StoreError> {
        self.read_consumer(id).await
    }

    fn changes(&self) -> ChangeFeed {
        self.redis.events.changes()
    }

    fn freshness(&self) -> Arc<Freshness> {
        self.redis.events.freshness()
    }

    async fn insert_consumer(
        &self,
        consumer: ConsumerRecord,
        key: KeyRecord,
    ) -> Result<(), StoreError> {
        self.reserve(&consumer.name, &consumer.id).await?;
        let roles = serde_json::to_string(&consumer.roles).map_err(unavailable)?;
        let created: i64 = self
            .run(
                &scripts::INSERT_CONSUMER,
                &consumer.id,
                &[1, 2],
                &[
                    consumer.name.clone(),
                    roles,
                    if consumer.disabled { "1" } else { "0" }.into(),
                    consumer.created_at.to_string(),
                    hex(&key.hash),
                    key_json(&key)?,
                ],
            )
            .await?;
        if created == 0 {
            return Err(StoreError::Conflict(format!("consumer `{}`", consumer.id)));
        }
        Ok(())
    }

    async fn update_consumer(&self, consumer: ConsumerRecord) -> Result<(), StoreError> {
        let roles = serde_json::to_string(&consumer.roles).map_err(unavailable)?;
        let _: i64 = self
            .run(
                &scripts::UPDATE_CONSUMER,
                &consumer.id,
                &[1],
                &[roles, if consumer.disabled { "1" } else { "0" }.into()],
            )
            .await?;
        Ok(())
    }

    async fn delete_consumer(&self, id: String) -> Result<(), StoreError> {
        let name: Option<String> = self
            .run(&scripts::DELETE_CONSUMER, &id, &[1, 2, 3, 4, 5, 6, 7], &[])
            .await?;
        let mut conn = self.conn();
        let _: () = conn
            .srem(self.keys().consumers(), &id)
            .await
            .map_err(unavailable)?;
        if let Some(name) = name {
            self.release(&name, &id).await?;
        }
        Ok(())
    }

    async fn insert_key(&self, key: KeyRecord) -> Result<(), StoreError> {
        let _: i64 = self
            .run(
                &scripts::PUT_KEY,
                &key.consumer_id,
                &[1, 2],
                &[hex(&key.hash), key_json(&key)?],
            )
            .await?;
        Ok(())
    }

    async fn revoke_key(
        &self,
        consumer_id: String,
        prefix: String,
        at: u64,
    ) -> Result<bool, StoreError> {
        let stored: HashMap<String, String> = self
            .conn()
            .hgetall(self.keys().keys(&consumer_id))
            .await
            .map_err(unavailable)?;
        for (field, value) in stored {
            let mut key: StoredKey = serde_json::from_str(&value).map_err(unavailable)?;
            if key.prefix != prefix || key.revoked_at.is_some() {
                continue;
            }
            key.revoked_at = Some(at);
            let revoked = serde_json::to_string(&key).map_err(unavailable)?;
            let swapped: i64 = self
                .run(
                    &scripts::SWAP_KEY,
                    &consumer_id,
                    &[1, 2],
                    &[field, value, revoked],
                )
                .await?;
            return Ok(swapped == 1);
        }
        Ok(false)
    }

    async fn record_key_use(&self, uses: Vec<(Hash, u64)>) -> Result<(), StoreError> {
        let mut invocation = scripts::RECORD_KEY_USE.prepare_invoke();
        invocation.key(self.keys().key_use());
        for (hash, at) in &uses {
            invocation.arg(hex(hash)).arg(at);
        }
        let _: i64 = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn put_pending_totp(&self, totp: TotpRecord) -> Result<(), StoreError> {
        let stored = totp_json(&totp)?;
        let _: i64 = self
            .run(
                &scripts::PUT_PENDING_TOTP,
                &totp.consumer_id,
                &[1, 3],
                &[stored, totp.started_with.to_db().to_string()],
            )
            .await?;
        Ok(())
    }

    async fn confirm_totp(
        &self,
        consumer_id: String,
        step: u64,
        recovery: Vec<Hash>,
        drop_pending_below: Assurance,
    ) -> Result<bool, StoreError> {
        let mut args = vec![step.to_string(), drop_pending_below.to_db().to_string()];
        args.extend(hashes(&recovery));
        let confirmed: i64 = self
            .run(
                &scripts::CONFIRM_TOTP,
                &consumer_id,
                &[1, 3, 4, 5, 7],
                &args,
            )
            .await?;
        Ok(confirmed == 1)
    }

    async fn delete_pending_totp(&self, consumer_id: String) -> Result<(), StoreError> {
        let _: i64 = self
            .run(&scripts::DELETE_PENDING_TOTP, &consumer_id, &[1, 3], &[])
            .await?;
        Ok(())
    }

    async fn delete_totp(
        &self,
        consumer_id: String,
        drop_recovery: bool,
    ) -> Result<(), StoreError> {
        let _: i64 = self
            .run(
                &scripts::DELETE_TOTP,
                &consumer_id,
                &[1, 3, 4],
                &[if drop_recovery { "1" } else { "0" }.into()],
            )
            .await?;
        Ok(())
    }

    async fn put_pending_sms(
        &self,
        consumer_id: String,
        phone_sealed: Vec<u8>,
        at: u64,
        started_with: Assurance,
        code: SmsCodeRecord,
    ) -> Result<(), StoreError> {
        let _: i64 = self
            .run(
                &scripts::PUT_PENDING_SMS,
                &consumer_id,
                &[1, 5, 7],
                &[
                    hex(&phone_sealed),
                    at.to_string(),
                    started_with.to_db().to_string(),
                    hex(&code.hash),
                    code.expires_at.to_string(),
                ],
            )
            .await?;
        Ok(())
    }

    async fn confirm_sms(
        &self,
        consumer_id: String,
        hash: Hash,
        now: u64,
        recovery: Option<Vec<Hash>>,
        drop_pending_below: Assurance,
    ) -> Result<CodeCheck, StoreError> {
        let mut args = vec![
            hex(&hash),
            now.to_string(),
            if recovery.is_some() { "1" } else { "0" }.into(),
            drop_pending_below.to_db().to_string(),
        ];
        args.extend(hashes(recovery.as_deref().unwrap_or_default()));
        let answer: String = self
            .run(
                &scripts::CONFIRM_SMS,
                &consumer_id,
                &[1, 3, 4, 5, 6, 7],
                &args,
            )
            .await?;
        Ok(code_check(&answer))
    }

    async fn drop_pending_sms(
        &self,
        consumer_id: String,
        code: Option<Hash>,
    ) -> Result<bool, StoreError> {
        let dropped: i64 = self
            .run(
                &scripts::DROP_PENDING_SMS,
                &consumer_id,
                &[1, 5, 7],
                &[code.as_ref().map(|h| hex(h)).unwrap_or_default()],
            )
            .await?;
        Ok(dropped == 1)
    }

    async fn delete_sms(&self, consumer_id: String, drop_recovery: bool) -> Result<(), StoreError> {
        let _: i64 = self
            .run(
                &scripts::DELETE_SMS,
                &consumer_id,
                &[1, 4, 5, 6, 7],
                &[if drop_recovery { "1" } else { "0" }.into()],
            )
            .await?;
        Ok(())
    }

    async fn put_sms_code(&self, code: SmsCodeRecord) -> Result<(), StoreError> {
        let _: i64 = scripts::PUT_CODE
            .key(self.keys().code(&code.consumer_id, code.purpose))
            .arg(hex(&code.hash))
            .arg(code.expires_at)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn use_sms_code(
        &self,
        consumer_id: String,
        purpose: Purpose,
        hash: Hash,
        now: u64,
    ) -> Result<CodeCheck, StoreError> {
        let answer: String = scripts::USE_CODE
            .key(self.keys().code(&consumer_id, purpose))
            .arg(hex(&hash))
            .arg(now)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(code_check(&answer))
    }

    async fn delete_sms_code(
        &self,
        consumer_id: String,
        purpose: Purpose,
        hash: Hash,
    ) -> Result<(), StoreError> {
        let _: i64 = scripts::DELETE_CODE
            .key(self.keys().code(&consumer_id, purpose))
            .arg(hex(&hash))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn replace_recovery_codes(
        &self,
        consumer_id: String,
        hashes_: Vec<Hash>,
    ) -> Result<(), StoreError> {
        let args: Vec<String> = hashes(&hashes_).collect();
        let _: i64 = self
            .run(&scripts::REPLACE_RECOVERY, &consumer_id, &[1, 4], &args)
            .await?;
        Ok(())
    }

    async fn advance_totp_step(&self, consumer_id: String, step: u64) -> Result<bool, StoreError> {
        let advanced: i64 = scripts::ADVANCE_STEP
            .key(self.keys().totp(&consumer_id))
            .arg(step)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(advanced == 1)
    }

    async fn use_recovery_code(
        &self,
        consumer_id: String,
        hash: Hash,
        at: u64,
    ) -> Result<bool, StoreError> {
        let used: i64 = self
            .run(
                &scripts::USE_RECOVERY,
                &consumer_id,
                &[1, 4],
                &[hex(&hash), at.max(1).to_string()],
            )
            .await?;
        Ok(used == 1)
    }

    async fn restore_consumer(&self, state: ConsumerState) -> Result<(), StoreError> {
        let c = &state.record;
        self.reserve(&c.name, &c.id).await?;
        let roles = serde_json::to_string(&c.roles).map_err(unavailable)?;
        let hashes = serde_json::to_string(&consumer_hashes(&state)?).map_err(unavailable)?;
        let had: Option<String> = self
            .run(
                &scripts::RESTORE_CONSUMER,
                &c.id,
                &[1, 2, 3, 4, 5, 6, 7],
                &[
                    c.name.clone(),
                    roles,
                    if c.disabled { "1" } else { "0" }.into(),
                    c.created_at.to_string(),
                    hashes,
                ],
            )
            .await?;
        if let Some(had) = had.filter(|had| *had != c.name) {
            self.release(&had, &c.id).await?;
        }
        // Last uses live apart from the keys (they change on every request, not the version).
        let mut pipe = redis::pipe();
        for key in &state.keys {
            match key.last_used_at {
                Some(at) => pipe.hset(self.keys().key_use(), hex(&key.hash), at),
                None => pipe.hdel(self.keys().key_use(), hex(&key.hash)),
            }
            .ignore();
        }
        let _: () = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn rewrite_audit(&self, events: Vec<AuditEvent>) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic().del(self.keys().audit()).ignore();
        self.add_audit(&mut pipe, &events)?;
        let _: () = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.append_audit_batch(vec![event]).await
    }

    async fn append_audit_batch(&self, events: Vec<AuditEvent>) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        self.add_audit(&mut pipe, &events)?;
        let _: () = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn audit(
        &self,
        consumer: Option<ConsumerFilter>,
        since: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        use redis::streams::StreamRangeReply;
        let mut found = Vec::new();
        let mut end = "+".to_owned();
        const PAGE: usize = 1000;
        loop {
            let reply: StreamRangeReply = self
                .conn()
                .xrevrange_count(self.keys().audit(), &end, "-", PAGE)
                .await
                .map_err(unavailable)?;
            let page = reply.ids.len();
            for entry in reply.ids {
                let text = |name: &str| -> Option<String> {
                    entry
                        .map
                        .get(name)
                        .and_then(|v| redis::from_redis_value_ref(v).ok())
                };
                let at: u64 = text("at").and_then(|v| v.parse().ok()).unwrap_or(0);
                if since.is_some_and(|since| at < since) {
                    return Ok(found);
                }
                let event = AuditEvent {
                    id: stream_id_number(&entry.id),
                    at,
                    kind: text("kind").unwrap_or_default(),
                    consumer_id: text("consumer_id"),
                    consumer_name: text("consumer_name"),
                    key_prefix: text("key_prefix"),
                    detail: text("detail")
                        .and_then(|d| serde_json::from_str(&d).ok())
                        .unwrap_or(serde_json::Value::Null),
                };
                let wanted = match &consumer {
                    None => true,
                    Some(ConsumerFilter::Id(id)) => event.consumer_id.as_ref() == Some(id),
                    Some(ConsumerFilter::Name(name)) => event.consumer_name.as_ref() == Some(name),
                };
                if wanted {
                    found.push(event);
                    if found.len() >= limit {
                        return Ok(found);
                    }
                }
                end = format!("({}", entry.id);
            }
            if page < PAGE {
                return Ok(found);
            }
        }
    }

    async fn get_meta(&self, key: &'static str) -> Result<Option<Vec<u8>>, StoreError> {
        self.conn()
            .hget(self.keys().meta(), key)
            .await
            .map_err(unavailable)
    }

    async fn put_meta(&self, key: &'static str, value: Vec<u8>) -> Result<(), StoreError> {
        self.conn()
            .hset(self.keys().meta(), key, value)
            .await
            .map_err(unavailable)
    }

    async fn load_limiter(&self, now: u64, now_ms: u64) -> Result<LimiterState, StoreError> {
        let mut state = LimiterState {
            bans: self.redis.bans(now).await?,
            counts: self.redis.counts(now_ms).await?,
        };
        state.bans.sort_by(|a, b| a.subject.cmp(&b.subject));
        state
            .counts
            .sort_by(|a, b| (&a.policy, &a.subject).cmp(&(&b.policy, &b.subject)));
        Ok(state)
    }

    /// In order, one subject at a time (each subject's keys are one slot).
    async fn save_limiter(&self, changes: Vec<LimiterChange>) -> Result<(), StoreError> {
        for change in &changes {
            match change {
                LimiterChange::Ban(ban) => self.redis.put_ban(ban).await?,
                LimiterChange::Unban { subject, until } => {
                    self.redis.unban(subject, *until).await?
                }
                LimiterChange::Count(count) => self.redis.put_count(count).await?,
                LimiterChange::Uncount { policy, subject } => {
                    self.redis.uncount(subject, policy).await?
                }
                LimiterChange::Unlock { subject } => {
                    self.redis.unlock(subject, 0).await?;
                }
            }
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

/// A stream id (`<ms>-<seq>`) as the event's number: ordered like the stream.
fn stream_id_number(id: &str) -> i64 {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    let ms: i64 = ms.parse().unwrap_or(0);
    let seq: i64 = seq.parse().unwrap_or(0);
    ms.saturating_mul(1000).saturating_add(seq.min(999))
}
