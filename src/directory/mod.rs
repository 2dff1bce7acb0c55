//! The directory: the request path's read model of consumers. Consumers by API-key hash,
//! name and id, in an `ArcSwap`, so that a lookup takes no lock and touches no disk.
//!
//! It is fed by the store, never written by hand: an operation writes to the store and then
//! [`refresh`](Directory::refresh)es the consumer it changed, and [`follow`](Directory::follow)
//! applies the changes the store's feed announces (another node's writes, on a shared store;
//! this node's own, which it has already applied, are skipped by version). A feed that may
//! have missed changes makes the directory [`resync`](Directory::resync) from the store.

mod consumer;

pub use consumer::{Consumer, IdentityHeaders, PENDING_TTL_SECS, PendingEnd, SmsState, sms_state};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::credentials::api_key;
use crate::error::Attempt;
use crate::secrets::{DigestMap, MasterKey};
use crate::store::{
    ChangeFeed, ConsumerState, FeedEvent, Freshness, Hash, Resync, Store, StoreError,
};

/// A live API key in the index.
#[derive(Debug)]
pub struct KeyEntry {
    pub consumer: Arc<Consumer>,
    pub prefix: String,
    /// Who a failed attempt with this key is counted against (shared strings, made once).
    pub attempt: Attempt,
    hash: Hash,
    /// Last use (Unix seconds), flushed to the store in batches, off the request path.
    last_used: Arc<AtomicU64>,
    flushed: Arc<AtomicU64>,
}

#[derive(Default, Clone)]
struct Index {
    by_hash: DigestMap<Arc<KeyEntry>>,
    by_name: HashMap<String, Arc<Consumer>>,
    by_id: HashMap<Arc<str>, Arc<Consumer>>,
}

/// A key's use times: the last use seen, and the last written to the store.
type Uses = (Arc<AtomicU64>, Arc<AtomicU64>);

impl Index {
    /// Puts `consumer` in place of any earlier state of it. Its keys' use times carry over
    /// (the store lags behind them by up to a flush).
    fn put(&mut self, consumer: Consumer) {
        let old = self.remove(&consumer.id).unwrap_or_default();
        self.insert(consumer, |hash| old.get(hash).cloned());
    }

    /// Adds `consumer` (not held yet), its keys' use times from `uses` where known.
    fn insert(&mut self, consumer: Consumer, uses: impl Fn(&Hash) -> Option<Uses>) {
        let consumer = Arc::new(consumer);
        for key in consumer.keys.iter().filter(|k| k.revoked_at.is_none()) {
            let stored = key.last_used_at.unwrap_or(0);
            let (last_used, flushed) = uses(&key.hash).unwrap_or_else(|| {
                (
                    Arc::new(AtomicU64::new(stored)),
                    Arc::new(AtomicU64::new(stored)),
                )
            });
            last_used.fetch_max(stored, Ordering::Relaxed);
            self.by_hash.insert(
                key.hash,
                Arc::new(KeyEntry {
                    consumer: consumer.clone(),
                    prefix: key.prefix.clone(),
                    attempt: Attempt {
                        consumer_id: consumer.shared_id.clone(),
                        consumer_name: Arc::from(consumer.name.as_str()),
                        key_prefix: Arc::from(key.prefix.as_str()),
                    },
                    hash: key.hash,
                    last_used,
                    flushed,
                }),
            );
        }
        self.by_name.insert(consumer.name.clone(), consumer.clone());
        self.by_id.insert(consumer.shared_id.clone(), consumer);
    }

    /// Takes a consumer out; returns its keys' use times.
    fn remove(&mut self, id: &str) -> Option<HashMap<Hash, Uses>> {
        let old = self.by_id.remove(id)?;
        // A namesake created since is someone else.
        if self.by_name.get(&old.name).is_some_and(|c| c.id == old.id) {
            self.by_name.remove(&old.name);
        }
        let mut uses = HashMap::new();
        for key in &old.keys {
            if let Some(entry) = self.by_hash.remove(&key.hash) {
                uses.insert(key.hash, (entry.last_used.clone(), entry.flushed.clone()));
            }
        }
        Some(uses)
    }

    fn uses(&self, hash: &Hash) -> Option<Uses> {
        self.by_hash
            .get(hash)
            .map(|e| (e.last_used.clone(), e.flushed.clone()))
    }
}

pub struct Directory {
    index: ArcSwap<Index>,
    store: Arc<dyn Store>,
    master: Arc<MasterKey>,
    clock: SharedClock,
    /// Whether the index may be trusted: on a shared store, a node that stopped hearing the
    /// store's announcements could be holding a revoked key.
    freshness: Arc<Freshness>,
    /// One refresh or resync at a time: each loads the store's state after the one before
    /// published, so an older load can never overwrite a newer one.
    applying: tokio::sync::Mutex<()>,
}

impl Directory {
    /// Loads every consumer.
    pub async fn load(
        store: Arc<dyn Store>,
        master: Arc<MasterKey>,
        clock: SharedClock,
    ) -> Result<Self, StoreError> {
        let directory = Self {
            index: ArcSwap::from_pointee(Index::default()),
            freshness: store.freshness(),
            store,
            master,
            clock,
            applying: tokio::sync::Mutex::new(()),
        };
        directory.resync().await?;
        Ok(directory)
    }

    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// False while the index may have missed a change (a shared store's announcements have not
    /// been heard for too long): keys must not be trusted then, and requests fail closed.
    pub fn is_current(&self) -> bool {
        !self.freshness.is_stale()
    }

    /// The live key entry for a presented API key. No lock, no I/O: the request path.
    /// Unknown, revoked and disabled all answer `None`, indistinguishably.
    pub fn authenticate(&self, presented: &str) -> Option<Arc<KeyEntry>> {
        if !api_key::has_shape(presented) {
            return None;
        }
        let hash = self.master.hash_api_key(presented);
        let index = self.index.load();
        let entry = index.by_hash.get(&hash)?;
        // The map lookup already matched; this keeps the final comparison constant-time.
        if !bool::from(entry.hash.ct_eq(&hash)) || entry.consumer.disabled {
            return None;
        }
        entry.last_used.store(self.clock.now(), Ordering::Relaxed);
        Some(entry.clone())
    }

    /// The consumer of that name, as it is now.
    pub fn get(&self, name: &str) -> Option<Arc<Consumer>> {
        self.index.load().by_name.get(name).cloned()
    }

    /// The name of the consumer of that id, if there is one.
    pub fn name_of(&self, id: &str) -> Option<String> {
        self.index.load().by_id.get(id).map(|c| c.name.clone())
    }

    /// Every consumer, in name order.
    pub fn all(&self) -> Vec<Arc<Consumer>> {
        let mut all: Vec<Arc<Consumer>> = self.index.load().by_name.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn count(&self) -> usize {
        self.index.load().by_name.len()
    }

    /// When the key with this hash was last used, as this node saw it (ahead of the store's
    /// record by up to a flush).
    pub fn last_used(&self, hash: &Hash) -> Option<u64> {
        self.index
            .load()
            .by_hash
            .get(hash)
            .map(|e| e.last_used.load(Ordering::Relaxed))
    }

    /// Loads consumer `id` from the store and publishes what it is now (or its removal).
    pub async fn refresh(&self, id: &str) -> Result<(), StoreError> {
        let _one = self.applying.lock().await;
        let state = self.store.load_consumer(id).await?;
        self.publish(|index| match state {
            Some(state) => index.put(Consumer::from_state(state, &self.master)),
            None => {
                index.remove(id);
            }
        });
        Ok(())
    }

    /// Applies a change the feed announced, unless this version is here already.
    async fn apply(&self, id: &str, version: u64) -> Result<(), StoreError> {
        let known = self.index.load().by_id.get(id).map(|c| c.version);
        if known.is_some_and(|known| known >= version) {
            return Ok(());
        }
        self.refresh(id).await
    }

    /// Loads every consumer anew (at start, and whenever the feed may have missed changes).
    pub async fn resync(&self) -> Result<(), StoreError> {
        let _one = self.applying.lock().await;
        let states: Vec<ConsumerState> = self.store.load().await?.into_consumers();
        let old = self.index.load_full();
        let mut index = Index::default();
        for state in states {
            // The keys' use times of consumers already held carry over.
            index.insert(Consumer::from_state(state, &self.master), |hash| {
                old.uses(hash)
            });
        }
        self.index.store(Arc::new(index));
        Ok(())
    }

    fn publish(&self, change: impl FnOnce(&mut Index)) {
        let mut index = Index::clone(&self.index.load());
        change(&mut index);
        self.index.store(Arc::new(index));
    }

    /// Applies the store's changes as they come, until `shutdown`: the way another node's
    /// write reaches this one. A lost feed (a gap, a reconnect) means a full resync; a change
    /// that cannot be applied (the store unavailable) is retried by resyncing later.
    pub async fn follow(self: Arc<Self>, mut feed: ChangeFeed, shutdown: CancellationToken) {
        let mut behind = false;
        // The resync owed since the feed was lost, held until one succeeds (the node's
        // freshness waits for it).
        let mut owed: Option<Resync> = None;
        loop {
            let event = tokio::select! {
                event = feed.next() => event,
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(std::time::Duration::from_secs(1)), if behind => {
                    Some(FeedEvent::Lost(Resync::default()))
                }
            };
            match event {
                None => return,
                Some(FeedEvent::Changed(change)) => {
                    if let Err(error) = self.apply(&change.consumer_id, change.version).await {
                        tracing::warn!(%error, "could not apply a consumer change; resyncing");
                        behind = true;
                    }
                }
                Some(FeedEvent::Lost(resync)) => {
                    owed.get_or_insert(resync);
                    tracing::info!("consumer changes may have been missed; reloading them all");
                    match self.resync().await {
                        Ok(()) => {
                            behind = false;
                            owed = None;
                        }
                        Err(error) => {
                            tracing::warn!(%error, "could not reload the consumers; retrying");
                            behind = true;
                        }
                    }
                }
            }
        }
    }

    /// Writes key uses recorded since the last flush; called periodically.
    pub async fn flush_key_use(&self) -> Result<usize, StoreError> {
        let index = self.index.load_full();
        let uses: Vec<(Hash, u64)> = index
            .by_hash
            .values()
            .filter_map(|e| {
                let used = e.last_used.load(Ordering::Relaxed);
                (used > e.flushed.swap(used, Ordering::Relaxed)).then_some((e.hash, used))
            })
            .collect();
        let n = uses.len();
        if n > 0 {
            self.store.record_key_use(uses).await?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{ConsumerRecord, KeyRecord};

    const NOW: u64 = 1_800_000_000;

    fn record(id: &str, name: &str) -> ConsumerRecord {
        ConsumerRecord {
            id: id.into(),
            name: name.into(),
            roles: vec![],
            disabled: false,
            created_at: NOW,
            version: 1,
        }
    }

    fn key(master: &MasterKey, id: &str, presented: &str) -> KeyRecord {
        KeyRecord {
            consumer_id: id.into(),
            hash: master.hash_api_key(presented),
            prefix: api_key::display_prefix(presented).to_owned(),
            created_at: NOW,
            last_used_at: None,
            revoked_at: None,
        }
    }

    /// Two directories on one store: what one node writes, the other applies from the feed,
    /// and a feed that lost changes makes it reload everything.
    #[tokio::test]
    async fn a_directory_follows_the_stores_changes_and_resyncs_when_it_lost_some() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("d.db")).unwrap());
        let master = Arc::new(MasterKey::from_bytes([3; 32]));
        let clock: SharedClock = Arc::new(ManualClock::new(NOW));
        let feed = store.changes();
        let other = Arc::new(
            Directory::load(store.clone(), master.clone(), clock.clone())
                .await
                .unwrap(),
        );
        let shutdown = CancellationToken::new();
        let following = tokio::spawn(other.clone().follow(feed, shutdown.clone()));

        let alice_key = api_key::generate();
        store
            .insert_consumer(record("c1", "alice"), key(&master, "c1", &alice_key))
            .await
            .unwrap();
        let seen = || async {
            for _ in 0..200 {
                if other.authenticate(&alice_key).is_some() {
                    return true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            false
        };
        assert!(seen().await, "the other directory never saw alice");
        let mut disabled = record("c1", "alice");
        disabled.disabled = true;
        store.update_consumer(disabled).await.unwrap();
        for _ in 0..200 {
            if other.authenticate(&alice_key).is_none() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(other.authenticate(&alice_key).is_none(), "still enabled");
        assert!(other.get("alice").unwrap().disabled);

        // Resync: a state written behind the feed's back is loaded.
        store.delete_consumer("c1".into()).await.unwrap();
        other.resync().await.unwrap();
        assert!(other.get("alice").is_none());
        assert_eq!(other.count(), 0);
        shutdown.cancel();
        following.await.unwrap();
    }

    /// A newer state is applied once; an announced version already held is skipped.
    #[tokio::test]
    async fn a_change_already_applied_is_not_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("d.db")).unwrap());
        let master = Arc::new(MasterKey::from_bytes([3; 32]));
        let clock: SharedClock = Arc::new(ManualClock::new(NOW));
        let key = key(&master, "c1", &api_key::generate());
        store
            .insert_consumer(record("c1", "alice"), key)
            .await
            .unwrap();
        let directory = Directory::load(store.clone(), master, clock).await.unwrap();
        let version = directory.get("alice").unwrap().version;
        // Behind the directory's back (as a stale announcement would leave it).
        let mut renamed = record("c1", "alice");
        renamed.roles = vec!["ops".into()];
        store.update_consumer(renamed).await.unwrap();
        directory.apply("c1", version).await.unwrap();
        assert!(directory.get("alice").unwrap().roles.is_empty(), "skipped");
        directory.apply("c1", version + 1).await.unwrap();
        assert_eq!(directory.get("alice").unwrap().roles, ["ops"]);
    }
}
