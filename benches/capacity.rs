//! Capacity: start-up time with 100,000 consumers in the store, and resident memory for them
//! plus 1,000,000 live step-up tokens. Prints its numbers and their targets.
//!
//! `cargo bench --bench capacity` (set CAPACITY_CONSUMERS / CAPACITY_TOKENS to change sizes)

use std::sync::Arc;
use std::time::{Duration, Instant};

use stepgate::accounts::Accounts;
use stepgate::audit::{Audit, AuditLog};
use stepgate::clock::{ManualClock, SharedClock};
use stepgate::config::Scope;
use stepgate::credentials::api_key;
use stepgate::secrets::MasterKey;
use stepgate::store::sqlite::SqliteStore;
use stepgate::store::{ConsumerRecord, KeyRecord, Store};
use stepgate::tokens::{LocalTokens, NewToken, TokenStore};

/// The binary's allocator (src/main.rs), so that these numbers are the gateway's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NOW: u64 = 1_800_000_000;

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // Test runners list benchmarks with `--list`: there is nothing to list, and no work to do.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let consumers = env("CAPACITY_CONSUMERS", 100_000);
    let tokens = env("CAPACITY_TOKENS", 1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("capacity.db");
    let master = [9u8; 32];
    let clock: SharedClock = Arc::new(ManualClock::new(NOW));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    runtime.block_on(async {
        let store = SqliteStore::open(&db).unwrap();
        let hasher = MasterKey::from_bytes(master);
        let started = Instant::now();
        for i in 0..consumers {
            let id = format!("c_{i:08}");
            let key = api_key::generate();
            let record = ConsumerRecord {
                id: id.clone(),
                name: format!("consumer-{i:06}"),
                roles: vec!["partner".into()],
                disabled: false,
                created_at: NOW,
                version: 1,
            };
            let key = KeyRecord {
                consumer_id: id,
                hash: hasher.hash_api_key(&key),
                prefix: api_key::display_prefix(&key).to_owned(),
                created_at: NOW,
                last_used_at: None,
                revoked_at: None,
            };
            store.insert_consumer(record, key).await.unwrap();
        }
        println!("seeded {consumers} consumers in {:.1?}", started.elapsed());
    });

    let before = rss_mib();
    let started = Instant::now();
    let tokens_held = Arc::new(LocalTokens::new());
    let accounts = runtime.block_on(async {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).unwrap());
        let audit = Audit::new(AuditLog::start(store.clone(), None), clock.clone());
        let tokens: Arc<dyn TokenStore> = tokens_held.clone();
        Accounts::open(
            store,
            Arc::new(MasterKey::from_bytes(master)),
            clock,
            audit,
            tokens,
        )
        .await
        .unwrap()
    });
    let startup = started.elapsed();
    let after_consumers = rss_mib();
    println!(
        "accounts open with {} consumers: {:.0} ms (target <= 2000 ms); RSS +{:.1} MiB",
        accounts.directory().count(),
        startup.as_secs_f64() * 1000.0,
        after_consumers - before
    );

    // As in the gateway, a token shares its consumer's id and its policy's name.
    let ids: Vec<Arc<str>> = (0..consumers.max(1))
        .map(|i| Arc::from(format!("c_{i:08}").as_str()))
        .collect();
    let policy: Arc<str> = Arc::from("step-up");
    let started = Instant::now();
    for i in 0..tokens {
        tokens_held.issue(
            NewToken {
                consumer_id: &ids[i % ids.len()],
                policy: &policy,
                scope: Scope::Policy,
                ttl: Duration::from_secs(3600),
                uses: None,
                earned_from: std::net::Ipv4Addr::LOCALHOST.into(),
            },
            NOW,
        );
    }
    let after_tokens = rss_mib();
    println!(
        "{tokens} step-up tokens issued in {:.1?}: RSS +{:.1} MiB",
        started.elapsed(),
        after_tokens - after_consumers
    );
    println!(
        "total RSS {after_tokens:.1} MiB for {consumers} consumers + {tokens} tokens (target <= 400 MiB)"
    );
}
