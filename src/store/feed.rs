//! How a node learns of changes made through a store, and whether it may trust what it holds.
//!
//! A [`Feed`] delivers a store's announcements in order. A store shared by several nodes
//! announces over a connection that can break, and what was announced meanwhile is gone: the
//! feed then says [`FeedEvent::Lost`] and its subscriber reloads what it holds. Until every
//! subscriber has, and while the node hears nothing from the store, the node's [`Freshness`]
//! counts the time since it was last known in sync; past the configured bound its copies
//! (the directory's keys, cached tokens) are not trusted and requests fail closed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};

/// A consumer changed: its id and its version after the change. A deleted consumer's last
/// version is the one before its deletion plus one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub consumer_id: Arc<str>,
    pub version: u64,
}

/// What a feed delivers.
#[derive(Debug, PartialEq, Eq)]
pub enum FeedEvent<T = Change> {
    Changed(T),
    /// Announcements may have been missed (the subscriber fell behind, or the store's
    /// connection was lost and is back): the subscriber must reload what it holds from the
    /// store, and drop the [`Resync`] once it has.
    Lost(Resync),
}

/// A reload owed after announcements were lost: dropping it tells the node's [`Freshness`]
/// that this subscriber is in sync again (up to the loss it was made for). Hold it until the
/// reload has succeeded.
#[derive(Debug, Default)]
pub struct Resync {
    ack: Option<(Arc<AtomicU64>, u64)>,
}

impl Drop for Resync {
    fn drop(&mut self) {
        if let Some((acked, generation)) = &self.ack {
            acked.fetch_max(*generation, Ordering::AcqRel);
        }
    }
}

impl PartialEq for Resync {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Resync {}

/// One subscriber's place in the node's sync: the last loss it has reloaded after.
#[derive(Debug)]
pub struct Follower {
    acked: Arc<AtomicU64>,
    losses: watch::Receiver<u64>,
}

/// A subscription to a store's announcements, in the order they were made.
pub struct Feed<T> {
    rx: broadcast::Receiver<T>,
    follower: Option<Follower>,
}

pub type ChangeFeed = Feed<Change>;

impl<T: Clone> Feed<T> {
    /// A feed that is never lost, but by falling behind (a store only this node writes).
    pub fn new(rx: broadcast::Receiver<T>) -> Self {
        Self { rx, follower: None }
    }

    /// A feed whose connection can be lost, followed for `freshness`.
    pub fn followed(rx: broadcast::Receiver<T>, freshness: &Freshness) -> Self {
        Self {
            rx,
            follower: Some(freshness.follower()),
        }
    }

    /// The next event; `None` once the store is gone.
    pub async fn next(&mut self) -> Option<FeedEvent<T>> {
        use broadcast::error::RecvError;
        let lost = async {
            match &mut self.follower {
                Some(follower) => {
                    if follower.losses.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                    let generation = *follower.losses.borrow_and_update();
                    Resync {
                        ack: Some((follower.acked.clone(), generation)),
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            resync = lost => Some(FeedEvent::Lost(resync)),
            received = self.rx.recv() => match received {
                Ok(event) => Some(FeedEvent::Changed(event)),
                Err(RecvError::Lagged(_)) => Some(FeedEvent::Lost(Resync::default())),
                Err(RecvError::Closed) => None,
            },
        }
    }
}

/// Whether this node's copies of shared state (the directory, cached tokens) are known to be
/// recent: fresh while the node hears from its store and every subscriber has reloaded after
/// the last loss; stale once that has not been so for the configured time (a revocation made
/// meanwhile may not have reached it). A store only this node writes is always fresh. The
/// request path reads one atomic flag; the store's listener keeps it.
#[derive(Debug)]
pub struct Freshness {
    stale: AtomicBool,
    base: Instant,
    /// Milliseconds after `base` when the node last knew itself in sync.
    synced_ms: AtomicU64,
    stale_for: Duration,
    /// Losses so far; each subscriber acknowledges the last it reloaded after.
    losses: watch::Sender<u64>,
    followers: Mutex<Vec<Weak<AtomicU64>>>,
}

impl Freshness {
    /// For a store only this node writes: never stale.
    pub fn always() -> Arc<Self> {
        Self::new(Duration::MAX)
    }

    /// Fresh now; stale once the store has not been heard in sync for `stale_for`.
    pub fn new(stale_for: Duration) -> Arc<Self> {
        Arc::new(Self {
            stale: AtomicBool::new(false),
            base: Instant::now(),
            synced_ms: AtomicU64::new(0),
            stale_for,
            losses: watch::Sender::new(0),
            followers: Mutex::new(Vec::new()),
        })
    }

    /// True when shared state held here may be out of date: it must not be trusted.
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    pub fn stale_for(&self) -> Duration {
        self.stale_for
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn follower(&self) -> Follower {
        let acked = Arc::new(AtomicU64::new(*self.losses.borrow()));
        let mut followers = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        followers.retain(|f| f.strong_count() > 0);
        followers.push(Arc::downgrade(&acked));
        Follower {
            acked,
            losses: self.losses.subscribe(),
        }
    }

    /// Announcements may have been missed: every subscriber is told to reload, and the node
    /// is not in sync again until all have.
    pub fn lose(&self) {
        self.losses.send_modify(|n| *n += 1);
    }

    fn in_sync(&self) -> bool {
        let losses = *self.losses.borrow();
        let followers = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        followers
            .iter()
            .filter_map(Weak::upgrade)
            .all(|acked| acked.load(Ordering::Acquire) >= losses)
    }

    /// The store was heard from: what the node holds is current, unless a reload is owed.
    pub fn heard(&self) {
        if self.in_sync() {
            self.synced_ms.store(self.elapsed_ms(), Ordering::Release);
            self.stale.store(false, Ordering::Relaxed);
        }
    }

    /// Re-evaluates the flag (periodically, by the store's listener); true when stale.
    pub fn check(&self) -> bool {
        let since = self
            .elapsed_ms()
            .saturating_sub(self.synced_ms.load(Ordering::Acquire));
        let stale = u128::from(since) > self.stale_for.as_millis();
        self.stale.store(stale, Ordering::Relaxed);
        stale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_loss_is_owed_a_reload_by_every_follower_before_the_node_is_in_sync() {
        let freshness = Freshness::new(Duration::from_secs(5));
        let (tx, _) = broadcast::channel::<u32>(4);
        let mut a = Feed::followed(tx.subscribe(), &freshness);
        let mut b = Feed::followed(tx.subscribe(), &freshness);
        assert!(freshness.in_sync());
        freshness.lose();
        assert!(!freshness.in_sync());
        let Some(FeedEvent::Lost(resync_a)) = a.next().await else {
            panic!("a loss")
        };
        let Some(FeedEvent::Lost(resync_b)) = b.next().await else {
            panic!("a loss")
        };
        drop(resync_a);
        assert!(!freshness.in_sync(), "b has not reloaded yet");
        drop(resync_b);
        assert!(freshness.in_sync());
        // A follower that is gone owes nothing.
        let c = Feed::followed(tx.subscribe(), &freshness);
        freshness.lose();
        drop(c);
        let (Some(FeedEvent::Lost(ra)), Some(FeedEvent::Lost(rb))) =
            (a.next().await, b.next().await)
        else {
            panic!("losses")
        };
        drop((ra, rb));
        assert!(freshness.in_sync());
        tx.send(7).unwrap();
        assert_eq!(a.next().await, Some(FeedEvent::Changed(7)));
    }

    #[test]
    fn a_node_is_stale_once_not_heard_in_sync_for_the_bound() {
        let freshness = Freshness::new(Duration::from_millis(0));
        std::thread::sleep(Duration::from_millis(5));
        assert!(freshness.check());
        assert!(freshness.is_stale());
        freshness.heard();
        assert!(!freshness.is_stale());
        assert!(!Freshness::always().check());
    }
}
