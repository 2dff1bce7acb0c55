//! `stepgate store copy --from STORE --to STORE`: everything one store holds copied into
//! another (see [`crate::accounts::copy`]), with the gateways stopped.
//!
//! A STORE is `config` (the store `gateway.yaml` configures, with its key prefix, password
//! and timeouts), `sqlite:PATH`, or a `redis://` / `rediss://` URL (then `--key-prefix`,
//! `--password-env` or `--password-file` say the rest). The master key is the gateway's:
//! `STEPGATE_MASTER_KEY`, else `master.key` in the configuration's `data_dir`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::accounts::copy;
use crate::clock::{Clock, SystemClock};
use crate::config::{self, RedisSettings, StoreSettings};
use crate::secrets::{MASTER_KEY_ENV, MasterKey};
use crate::store::Store;
use crate::store::redis::{Redis, RedisStore};
use crate::store::sqlite::SqliteStore;

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Where to copy from: `config`, `sqlite:PATH`, `redis://HOST[:PORT][/DB]` or `rediss://…`.
    #[arg(long)]
    from: String,
    /// Where to copy to (same forms as --from).
    #[arg(long)]
    to: String,
    /// Key prefix of a Redis given by URL.
    #[arg(long, default_value = RedisSettings::DEFAULT_PREFIX)]
    key_prefix: String,
    /// Environment variable holding the password of a Redis given by URL.
    #[arg(long, conflicts_with = "password_file")]
    password_env: Option<String>,
    /// Owner-only file holding the password of a Redis given by URL.
    #[arg(long)]
    password_file: Option<PathBuf>,
}

/// How long one command of the copy may take (a whole audit log can be one write).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

pub fn run(config_path: &Path, args: &CopyArgs) -> ExitCode {
    match copy_stores(config_path, args) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("store copy: {message}");
            ExitCode::FAILURE
        }
    }
}

fn copy_stores(config_path: &Path, args: &CopyArgs) -> Result<copy::Report, String> {
    if args.from == args.to {
        return Err("--from and --to are the same store".into());
    }
    // The configuration is needed for `config` and for the master key's file; with
    // STEPGATE_MASTER_KEY set and two explicit stores it may be absent.
    let needs_config =
        args.from == "config" || args.to == "config" || std::env::var_os(MASTER_KEY_ENV).is_none();
    let config = if needs_config {
        Some(config::load(config_path).map_err(|errors| {
            let lines: Vec<String> = errors.errors().iter().map(ToString::to_string).collect();
            format!("{}:\n{}", config_path.display(), lines.join("\n"))
        })?)
    } else {
        None
    };
    let master = match &config {
        Some(config) => MasterKey::load(&config.data_dir),
        None => MasterKey::load(Path::new(".")),
    }
    .map_err(|e| format!("cannot read the master key: {e}"))?;
    let from = settings(&args.from, args, config.as_ref(), true)?;
    let to = settings(&args.to, args, config.as_ref(), false)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let from = open(from).await?;
        let to = open(to).await?;
        let clock = SystemClock;
        copy::copy(
            from.as_ref(),
            to.as_ref(),
            &master,
            clock.now(),
            clock.now_millis(),
        )
        .await
        .map_err(|e| e.to_string())
    })
}

/// The store a STORE argument names.
fn settings(
    spec: &str,
    args: &CopyArgs,
    config: Option<&config::Config>,
    source: bool,
) -> Result<StoreSettings, String> {
    if spec == "config" {
        let config = config.ok_or("`config` needs the configuration file")?;
        return Ok(match config.store.clone() {
            StoreSettings::Redis(mut redis) => {
                redis.command_timeout = COMMAND_TIMEOUT;
                StoreSettings::Redis(redis)
            }
            sqlite => sqlite,
        });
    }
    if let Some(path) = spec.strip_prefix("sqlite:") {
        let path = PathBuf::from(path);
        if source && !path.is_file() {
            return Err(format!("{}: no such database file", path.display()));
        }
        return Ok(StoreSettings::Sqlite { path });
    }
    if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        let userinfo = spec.split_once("://").map_or("", |(_, rest)| rest);
        if userinfo
            .split_once('@')
            .is_some_and(|(user, _)| user.contains(':'))
        {
            return Err(
                "no password in a Redis URL (it would be in your shell's history); use \
                 --password-env or --password-file"
                    .into(),
            );
        }
        let mut redis = RedisSettings::new(spec);
        redis.key_prefix = args.key_prefix.clone();
        redis.command_timeout = COMMAND_TIMEOUT;
        redis.password = match (&args.password_env, &args.password_file) {
            (Some(var), _) => Some(
                std::env::var(var)
                    .map_err(|_| format!("the environment variable `{var}` is not set"))?,
            ),
            (None, Some(file)) => Some(
                crate::secrets::read_private(file).map_err(|e| format!("--password-file: {e}"))?,
            ),
            (None, None) => None,
        };
        return Ok(StoreSettings::Redis(redis));
    }
    Err(format!(
        "`{spec}` is not a store: use `config`, `sqlite:PATH`, `redis://…` or `rediss://…`"
    ))
}

async fn open(settings: StoreSettings) -> Result<Arc<dyn Store>, String> {
    match settings {
        StoreSettings::Sqlite { path } => {
            let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            Ok(Arc::new(store))
        }
        StoreSettings::Redis(settings) => {
            let redis = Redis::connect(&settings)
                .await
                .map_err(|e| format!("{}: {e}", settings.url))?;
            Ok(Arc::new(RedisStore::new(redis)))
        }
    }
}
