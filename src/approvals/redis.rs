//! Requests for approval shared by every node on Redis: the request (JSON, immutable) and its
//! state (one line) in the request's own slot, each expiring a while after the request does,
//! and an index of the pending ones. A state change is one script on the state key, so two
//! nodes never both approve, or both use, one request.

use std::sync::LazyLock;

use async_trait::async_trait;
use redis::Script;

use super::{Approval, ApprovalStore, Stage, State, keep_for};
use crate::store::StoreError;
use crate::store::redis::Redis;

/// KEYS: state. ARGV: the prefix the current state must have, the new state. Returns
/// `{1, old}` when it moved, `{0, found}` when not, nil when there is no such request.
static TRANSITION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local state = redis.call('GET', KEYS[1])
if not state then return nil end
if string.sub(state, 1, #ARGV[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return {1, state}
end
return {0, state}
"#,
    )
});

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

pub struct RedisApprovals {
    redis: Redis,
}

impl RedisApprovals {
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }
}

#[async_trait]
impl ApprovalStore for RedisApprovals {
    async fn put(&self, approval: &Approval) -> Result<(), StoreError> {
        let keys = &self.redis.keys;
        let record = serde_json::to_string(approval).map_err(unavailable)?;
        let ttl = keep_for(approval);
        let mut conn = self.redis.conn.clone();
        let _: () = redis::pipe()
            .cmd("SET")
            .arg(keys.approval(&approval.id))
            .arg(record)
            .arg("EX")
            .arg(ttl)
            .ignore()
            .cmd("SET")
            .arg(keys.approval_state(&approval.id))
            .arg(State::Pending.encode())
            .arg("EX")
            .arg(ttl)
            .ignore()
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        // The index is for listing only; a request it misses is still found by its id.
        let _: () = redis::cmd("ZADD")
            .arg(keys.approvals_pending())
            .arg(approval.expires_at)
            .arg(&approval.id)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<(Approval, State)>, StoreError> {
        let keys = &self.redis.keys;
        let mut conn = self.redis.conn.clone();
        let record: Option<String> = redis::cmd("GET")
            .arg(keys.approval(id))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Some(record) = record else {
            return Ok(None);
        };
        let state: Option<String> = redis::cmd("GET")
            .arg(keys.approval_state(id))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let approval: Approval = serde_json::from_str(&record).map_err(unavailable)?;
        let state = state
            .as_deref()
            .and_then(State::decode)
            .ok_or_else(|| unavailable("a request for approval without its state"))?;
        Ok(Some((approval, state)))
    }

    async fn transition(
        &self,
        id: &str,
        from: Stage,
        to: &State,
    ) -> Result<Result<(), Option<State>>, StoreError> {
        let keys = &self.redis.keys;
        let mut conn = self.redis.conn.clone();
        let moved: Option<(i64, String)> = TRANSITION
            .key(keys.approval_state(id))
            .arg(from.prefix())
            .arg(to.encode())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(match moved {
            None => Err(None),
            Some((1, _)) => {
                if from == Stage::Pending {
                    let _: Result<(), _> = redis::cmd("ZREM")
                        .arg(keys.approvals_pending())
                        .arg(id)
                        .query_async(&mut conn)
                        .await;
                }
                Ok(())
            }
            Some((_, found)) => Err(State::decode(&found)),
        })
    }

    async fn pending(&self) -> Result<Vec<Approval>, StoreError> {
        let keys = &self.redis.keys;
        let mut conn = self.redis.conn.clone();
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(keys.approvals_pending())
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut pending = Vec::with_capacity(ids.len());
        for id in ids {
            match self.get(&id).await? {
                Some((approval, State::Pending)) => pending.push(approval),
                // Gone or decided: the index forgets it.
                _ => {
                    let _: Result<(), _> = redis::cmd("ZREM")
                        .arg(keys.approvals_pending())
                        .arg(&id)
                        .query_async(&mut conn)
                        .await;
                }
            }
        }
        Ok(pending)
    }
}
