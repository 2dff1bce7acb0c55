//! Everything one store holds, copied into another (`stepgate store copy`): to move a gateway
//! from its embedded SQLite file to a Redis shared by several nodes, or back.
//!
//! What is copied: every consumer with its keys (revoked ones too, with their last use), its
//! TOTP enrolments with their replay watermark, its recovery codes (used ones stay used), its
//! SMS numbers; the failure limiter's bans and counts still in force; the audit log. Sealed
//! values are copied as they are, so both stores must be under one master key: the copy
//! checks it against both before writing anything. Outstanding SMS codes (minutes long) are
//! not copied: whoever was waiting for a text asks for a new one.
//!
//! A copy can be run again: what the target already holds identically is left alone (a
//! consumer is rewritten only when it differs; an audit event already there is not added
//! twice), so a copy interrupted half way is finished by running it again. Afterwards the
//! target is read back and compared with the source; any difference is an error.

use std::collections::HashMap;
use std::fmt;

use super::sealed_with;
use crate::secrets::MasterKey;
use crate::store::{
    AuditEvent, BanRecord, ConsumerState, FailureCountRecord, LimiterChange, Store, StoreError,
};

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the {0} store was sealed with another master key; set STEPGATE_MASTER_KEY (or restore \
         master.key) to the key its data was sealed with"
    )]
    WrongMasterKey(&'static str),
    #[error("the source store holds no data (it was never opened by a gateway)")]
    EmptySource,
    #[error("the target already has another consumer named `{0}`; rename or delete it first")]
    NameTaken(String),
    #[error("the copy does not read back as the source: {0}")]
    Mismatch(String),
}

/// What a copy did, kind by kind: `copied` written now, `present` found in the target already.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub copied: usize,
    pub present: usize,
}

impl Tally {
    fn total(&self) -> usize {
        self.copied + self.present
    }
    fn count(&mut self, copied: bool) {
        if copied {
            self.copied += 1;
        } else {
            self.present += 1;
        }
    }
}

/// The outcome of a verified copy.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub consumers: Tally,
    /// Of the consumers copied: their keys, enrolments, recovery codes and SMS factors.
    pub keys: usize,
    pub totp: usize,
    pub recovery_codes: usize,
    pub sms: usize,
    pub bans: Tally,
    pub counts: Tally,
    pub audit: Tally,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = |f: &mut fmt::Formatter<'_>, what: &str, t: &Tally| {
            writeln!(
                f,
                "{what:<16}{:>8}  ({} copied, {} already there)",
                t.total(),
                t.copied,
                t.present
            )
        };
        line(f, "consumers", &self.consumers)?;
        writeln!(
            f,
            "  of those copied: {} API keys, {} TOTP enrolments, {} recovery codes, {} SMS factors",
            self.keys, self.totp, self.recovery_codes, self.sms
        )?;
        line(f, "bans", &self.bans)?;
        line(f, "failure counts", &self.counts)?;
        line(f, "audit events", &self.audit)?;
        write!(f, "verified: the target holds everything the source holds")
    }
}

/// Copies `from` into `to` (both under `master`), then checks the target against the source.
/// `now` (seconds) and `now_ms` decide which bans and counts are still in force.
pub async fn copy(
    from: &dyn Store,
    to: &dyn Store,
    master: &MasterKey,
    now: u64,
    now_ms: u64,
) -> Result<Report, CopyError> {
    match sealed_with(from, master).await? {
        Some(true) => {}
        Some(false) => return Err(CopyError::WrongMasterKey("source")),
        None => return Err(CopyError::EmptySource),
    }
    match sealed_with(to, master).await? {
        Some(true) => {}
        Some(false) => return Err(CopyError::WrongMasterKey("target")),
        None => super::seal_check(to, master).await?,
    }
    let mut report = Report::default();

    let source = consumers(from).await?;
    let target = consumers(to).await?;
    let names: HashMap<&str, &str> = target
        .values()
        .map(|c| (c.record.name.as_str(), c.record.id.as_str()))
        .collect();
    for (id, consumer) in &source {
        if names
            .get(consumer.record.name.as_str())
            .is_some_and(|owner| owner != id)
        {
            return Err(CopyError::NameTaken(consumer.record.name.clone()));
        }
    }
    for (id, consumer) in &source {
        let same = target.get(id) == Some(consumer);
        report.consumers.count(!same);
        if same {
            continue;
        }
        report.keys += consumer.keys.len();
        report.totp += consumer.totp.len();
        report.recovery_codes += consumer.recovery_codes.len();
        report.sms += usize::from(consumer.sms.is_some());
        to.restore_consumer(consumer.clone())
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => CopyError::NameTaken(consumer.record.name.clone()),
                other => other.into(),
            })?;
    }

    let limiter = from.load_limiter(now, now_ms).await?;
    let held = to.load_limiter(now, now_ms).await?;
    let mut changes = Vec::new();
    for ban in &limiter.bans {
        let present = covers_ban(&held.bans, ban);
        report.bans.count(!present);
        if !present {
            changes.push(LimiterChange::Ban(ban.clone()));
        }
    }
    for count in &limiter.counts {
        let present = covers_count(&held.counts, count);
        report.counts.count(!present);
        if !present {
            changes.push(LimiterChange::Count(count.clone()));
        }
    }
    if !changes.is_empty() {
        to.save_limiter(changes).await?;
    }

    report.audit = copy_audit(from, to).await?;
    verify(from, to, now, now_ms).await?;
    Ok(report)
}

/// The store's consumers by id, each normalised so that two stores holding the same compare
/// equal (the version is each store's own; record order is not meaningful).
async fn consumers(
    store: &dyn Store,
) -> Result<std::collections::BTreeMap<String, ConsumerState>, StoreError> {
    Ok(store
        .load()
        .await?
        .into_consumers()
        .into_iter()
        .map(|mut c| {
            c.record.version = 0;
            c.keys.sort_by_key(|k| k.hash);
            c.totp.sort_by_key(|t| t.confirmed);
            c.recovery_codes.sort_by_key(|r| r.hash);
            (c.record.id.clone(), c)
        })
        .collect())
}

fn covers_ban(held: &[BanRecord], ban: &BanRecord) -> bool {
    held.iter()
        .any(|h| h.subject == ban.subject && h.until >= ban.until)
}

fn covers_count(held: &[FailureCountRecord], count: &FailureCountRecord) -> bool {
    held.iter()
        .any(|h| h.policy == count.policy && h.subject == count.subject && h.tat_ms >= count.tat_ms)
}

/// An audit event's identity across stores (ids are each store's own).
type Fingerprint = (
    u64,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
);

fn fingerprint(e: &AuditEvent) -> Fingerprint {
    (
        e.at,
        e.kind.clone(),
        e.consumer_id.clone(),
        e.consumer_name.clone(),
        e.key_prefix.clone(),
        e.detail.to_string(),
    )
}

/// Each fingerprint with how many times it occurs (two identical events in one second are two).
fn occurrences(events: &[AuditEvent]) -> HashMap<Fingerprint, usize> {
    let mut seen = HashMap::new();
    for event in events {
        *seen.entry(fingerprint(event)).or_insert(0) += 1;
    }
    seen
}

/// The whole log, oldest first.
async fn whole_log(store: &dyn Store) -> Result<Vec<AuditEvent>, StoreError> {
    let mut events = store.audit(None, None, usize::MAX).await?;
    events.reverse();
    Ok(events)
}

/// Adds the source's events the target lacks. Appended when they are all as recent as the
/// target's newest; otherwise the target's log is rewritten with them in time order, so that
/// it still reads newest first.
async fn copy_audit(from: &dyn Store, to: &dyn Store) -> Result<Tally, StoreError> {
    let source = whole_log(from).await?;
    let target = whole_log(to).await?;
    let mut unmatched = occurrences(&target);
    let mut missing = Vec::new();
    for event in source {
        match unmatched.get_mut(&fingerprint(&event)) {
            Some(n) if *n > 0 => *n -= 1,
            _ => missing.push(event),
        }
    }
    let tally = Tally {
        copied: missing.len(),
        present: target.len() - unmatched.values().sum::<usize>(),
    };
    if missing.is_empty() {
        return Ok(tally);
    }
    let newest = target.last().map_or(0, |e| e.at);
    if missing.first().is_some_and(|e| e.at >= newest) {
        for batch in missing.chunks(1000) {
            to.append_audit_batch(batch.to_vec()).await?;
        }
    } else {
        let mut merged = target;
        merged.extend(missing);
        // Stable: events of one second keep their order.
        merged.sort_by_key(|e| e.at);
        to.rewrite_audit(merged).await?;
    }
    Ok(tally)
}

/// Reads the target back: every consumer of the source identical, every ban and count in
/// force, every audit event present.
async fn verify(from: &dyn Store, to: &dyn Store, now: u64, now_ms: u64) -> Result<(), CopyError> {
    let source = consumers(from).await?;
    let target = consumers(to).await?;
    for (id, consumer) in &source {
        match target.get(id) {
            None => {
                return Err(CopyError::Mismatch(format!(
                    "consumer `{}` is missing",
                    consumer.record.name
                )));
            }
            Some(copied) if copied != consumer => {
                return Err(CopyError::Mismatch(format!(
                    "consumer `{}` differs",
                    consumer.record.name
                )));
            }
            Some(_) => {}
        }
    }
    let limiter = from.load_limiter(now, now_ms).await?;
    let held = to.load_limiter(now, now_ms).await?;
    if let Some(ban) = limiter.bans.iter().find(|b| !covers_ban(&held.bans, b)) {
        return Err(CopyError::Mismatch(format!(
            "the ban of {} is missing",
            ban.subject
        )));
    }
    if let Some(c) = limiter
        .counts
        .iter()
        .find(|c| !covers_count(&held.counts, c))
    {
        return Err(CopyError::Mismatch(format!(
            "the failure count of {} on `{}` is missing",
            c.subject, c.policy
        )));
    }
    let mut present = occurrences(&whole_log(to).await?);
    for event in whole_log(from).await? {
        match present.get_mut(&fingerprint(&event)) {
            Some(n) if *n > 0 => *n -= 1,
            _ => {
                return Err(CopyError::Mismatch(format!(
                    "the audit event `{}` at {} is missing",
                    event.kind, event.at
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    fn event(at: u64, kind: &str) -> AuditEvent {
        AuditEvent {
            id: 0,
            at,
            kind: kind.to_owned(),
            consumer_id: None,
            consumer_name: None,
            key_prefix: None,
            detail: serde_json::json!({}),
        }
    }

    async fn kinds(store: &dyn Store) -> Vec<String> {
        whole_log(store)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }

    #[tokio::test]
    async fn audit_events_are_merged_in_time_order_once() {
        let dir = tempfile::tempdir().unwrap();
        let from = SqliteStore::open(&dir.path().join("from.db")).unwrap();
        let to = SqliteStore::open(&dir.path().join("to.db")).unwrap();
        from.append_audit_batch(vec![event(100, "a"), event(100, "a"), event(300, "c")])
            .await
            .unwrap();
        to.append_audit_batch(vec![event(200, "b"), event(300, "c")])
            .await
            .unwrap();
        let tally = copy_audit(&from, &to).await.unwrap();
        assert_eq!(
            tally,
            Tally {
                copied: 2,
                present: 1
            }
        );
        // Both copies of the duplicate `a` went before the target's `b`.
        assert_eq!(kinds(&to).await, ["a", "a", "b", "c"]);
        let again = copy_audit(&from, &to).await.unwrap();
        assert_eq!(
            again,
            Tally {
                copied: 0,
                present: 3
            }
        );
        assert_eq!(kinds(&to).await, ["a", "a", "b", "c"]);
        // Newer events only: appended.
        from.append_audit(event(400, "d")).await.unwrap();
        copy_audit(&from, &to).await.unwrap();
        assert_eq!(kinds(&to).await, ["a", "a", "b", "c", "d"]);
    }
}
