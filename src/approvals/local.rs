//! Requests for approval in memory: for tests and benchmarks (a gateway on one node keeps
//! them in its SQLite database).

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Approval, ApprovalStore, Stage, State};
use crate::store::StoreError;

/// Requests kept at most; the oldest expired ones go first when full.
const CAPACITY: usize = 100_000;

#[derive(Default)]
pub struct LocalApprovals {
    held: Mutex<HashMap<String, (Approval, State)>>,
}

impl LocalApprovals {
    pub fn new() -> Self {
        Self::default()
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Approval, State)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl ApprovalStore for LocalApprovals {
    async fn put(&self, approval: &Approval) -> Result<(), StoreError> {
        let mut held = self.held();
        if held.len() >= CAPACITY {
            let now = approval.created_at;
            held.retain(|_, (a, _)| a.expires_at.saturating_add(super::KEPT_AFTER_EXPIRY) > now);
            if held.len() >= CAPACITY {
                return Err(StoreError::Unavailable(
                    "too many requests for approval held".into(),
                ));
            }
        }
        held.insert(approval.id.clone(), (approval.clone(), State::Pending));
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<(Approval, State)>, StoreError> {
        Ok(self.held().get(id).cloned())
    }

    async fn transition(
        &self,
        id: &str,
        from: Stage,
        to: &State,
    ) -> Result<Result<(), Option<State>>, StoreError> {
        let mut held = self.held();
        Ok(match held.get_mut(id) {
            None => Err(None),
            Some((_, state)) if state.starts_from(from) => {
                *state = to.clone();
                Ok(())
            }
            Some((_, state)) => Err(Some(state.clone())),
        })
    }

    async fn pending(&self) -> Result<Vec<Approval>, StoreError> {
        Ok(self
            .held()
            .values()
            .filter(|(_, state)| *state == State::Pending)
            .map(|(approval, _)| approval.clone())
            .collect())
    }
}
