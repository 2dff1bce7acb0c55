//! The events channel: one pub/sub channel every node publishes to and listens on.
//!
//! Messages (all text): `c <consumer id> <version>` a consumer changed; `t <consumer id>` its
//! step-up tokens were revoked; `b <subject> <started> <until>` a ban started; `u <subject>`
//! a subject was unlocked; `h` a node's heartbeat.
//!
//! Pub/sub is fire and forget: what is published while a node's subscription is down never
//! reaches it. So the listener reconnects with backoff and, once back, tells every
//! subscriber its feed was lost ([`Freshness::lose`]): each reloads what it holds. Each node
//! publishes a heartbeat, and hearing any message (its own heartbeat included) proves the
//! subscription alive; a node that has not heard one in sync for `stale_for` is stale, and
//! its copies of shared state are no longer trusted.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::Keys;
use crate::config::RedisSettings;
use crate::store::{Change, ChangeFeed, Feed, Freshness, StoreError};

/// Messages a subscriber may fall behind by before it is told to reload.
const BACKLOG: usize = 4096;
/// Reconnection backoff bounds.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(2);

/// An announcement other than a consumer's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Every step-up token of the consumer was revoked.
    TokensRevoked(Arc<str>),
    /// A ban started (times in Unix seconds).
    Banned {
        subject: String,
        started: u64,
        until: u64,
    },
    /// An operator lifted a subject's ban and counts.
    Unlocked(String),
}

/// What one message says.
enum Message {
    Change(Change),
    Notice(Notice),
    Heartbeat,
}

fn parse(text: &str) -> Option<Message> {
    let mut words = text.split(' ');
    let message = match words.next()? {
        "c" => Message::Change(Change {
            consumer_id: Arc::from(words.next()?),
            version: words.next()?.parse().ok()?,
        }),
        "t" => Message::Notice(Notice::TokensRevoked(Arc::from(words.next()?))),
        "b" => Message::Notice(Notice::Banned {
            subject: words.next()?.to_owned(),
            started: words.next()?.parse().ok()?,
            until: words.next()?.parse().ok()?,
        }),
        "u" => Message::Notice(Notice::Unlocked(words.next()?.to_owned())),
        "h" => Message::Heartbeat,
        _ => return None,
    };
    words.next().is_none().then_some(message)
}

pub struct Events {
    changes: broadcast::Sender<Change>,
    notices: broadcast::Sender<Notice>,
    freshness: Arc<Freshness>,
    /// Stops the listener, the heartbeat and the watchdog with the store.
    _stop: DropGuard,
}

impl Events {
    /// Subscribes (waiting for the subscription, so that nothing announced after this returns
    /// is missed), then listens, beats and watches in the background.
    pub async fn start(
        client: redis::Client,
        conn: ConnectionManager,
        keys: &Keys,
        settings: &RedisSettings,
    ) -> Result<Arc<Self>, StoreError> {
        let channel = keys.events();
        let pubsub = subscribe(&client, &channel, settings.connect_timeout)
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot subscribe to Redis's events channel: {e}"))
            })?;
        let stop = CancellationToken::new();
        let events = Arc::new(Self {
            changes: broadcast::channel(BACKLOG).0,
            notices: broadcast::channel(BACKLOG).0,
            freshness: Freshness::new(settings.stale_for),
            _stop: stop.clone().drop_guard(),
        });
        let listener = Listener {
            client,
            channel: channel.clone(),
            connect_timeout: settings.connect_timeout,
            changes: events.changes.clone(),
            notices: events.notices.clone(),
            freshness: events.freshness.clone(),
        };
        tokio::spawn(listener.run(pubsub, stop.clone()));
        tokio::spawn(heartbeat(conn, channel, settings.stale_for, stop.clone()));
        tokio::spawn(watchdog(events.freshness.clone(), stop));
        Ok(events)
    }

    pub fn changes(&self) -> ChangeFeed {
        Feed::followed(self.changes.subscribe(), &self.freshness)
    }

    pub fn notices(&self) -> Feed<Notice> {
        Feed::followed(self.notices.subscribe(), &self.freshness)
    }

    pub fn freshness(&self) -> Arc<Freshness> {
        self.freshness.clone()
    }
}

async fn subscribe(
    client: &redis::Client,
    channel: &str,
    timeout: Duration,
) -> Result<redis::aio::PubSub, String> {
    let connect = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(pubsub)) => Ok(pubsub),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

struct Listener {
    client: redis::Client,
    channel: String,
    connect_timeout: Duration,
    changes: broadcast::Sender<Change>,
    notices: broadcast::Sender<Notice>,
    freshness: Arc<Freshness>,
}

impl Listener {
    async fn run(self, mut pubsub: redis::aio::PubSub, stop: CancellationToken) {
        // Silence this long means the subscription is dead even if its socket is not closed
        // (heartbeats come several times within it).
        let silence = self.freshness.stale_for().max(Duration::from_secs(1));
        loop {
            let mut messages = pubsub.into_on_message();
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    next = tokio::time::timeout(silence, messages.next()) => match next {
                        Ok(Some(message)) => self.deliver(message.get_payload_bytes()),
                        Ok(None) => break,
                        Err(_) => {
                            tracing::warn!(?silence, "nothing heard on Redis's events channel");
                            break;
                        }
                    },
                }
            }
            tracing::warn!("lost Redis's events channel; reconnecting");
            let mut retry = FIRST_RETRY;
            pubsub = loop {
                match subscribe(&self.client, &self.channel, self.connect_timeout).await {
                    Ok(pubsub) => break pubsub,
                    Err(error) => {
                        tracing::warn!(%error, ?retry, "cannot subscribe to Redis's events channel");
                    }
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(LAST_RETRY);
            };
            tracing::info!("back on Redis's events channel; reloading what may have been missed");
            self.freshness.lose();
        }
    }

    fn deliver(&self, payload: &[u8]) {
        self.freshness.heard();
        let message = std::str::from_utf8(payload).ok().and_then(parse);
        // No subscriber is fine: nothing holds a copy then.
        match message {
            Some(Message::Change(change)) => {
                let _ = self.changes.send(change);
            }
            Some(Message::Notice(notice)) => {
                let _ = self.notices.send(notice);
            }
            Some(Message::Heartbeat) => {}
            None => tracing::warn!("an unreadable message on Redis's events channel"),
        }
    }
}

/// Publishes this node's heartbeat a few times per staleness bound.
async fn heartbeat(
    mut conn: ConnectionManager,
    channel: String,
    stale_for: Duration,
    stop: CancellationToken,
) {
    let every = (stale_for / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg("h")
            .query_async(&mut conn)
            .await;
        if let Err(error) = sent {
            tracing::debug!(%error, "heartbeat not published");
        }
    }
}

/// Keeps the freshness flag current, and says when it turns.
async fn watchdog(freshness: Arc<Freshness>, stop: CancellationToken) {
    let every =
        (freshness.stale_for() / 10).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut ticks = tokio::time::interval(every);
    let mut was_stale = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let stale = freshness.check();
        if stale && !was_stale {
            tracing::error!(
                stale_for = ?freshness.stale_for(),
                "out of touch with Redis: requests with an API key are refused (503) until it is back"
            );
        } else if was_stale && !stale {
            tracing::info!("in touch with Redis again");
        }
        was_stale = stale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_read_exactly() {
        assert!(
            matches!(parse("c abc 7"), Some(Message::Change(c)) if &*c.consumer_id == "abc" && c.version == 7)
        );
        assert!(matches!(
            parse("b ip:1.2.3.4 10 20"),
            Some(Message::Notice(Notice::Banned { until: 20, .. }))
        ));
        assert!(matches!(parse("h"), Some(Message::Heartbeat)));
        for bad in ["", "c abc", "c abc x", "c abc 7 8", "x", "b s 1"] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
    }
}
