//! The `stepgate` command line: `run` (the default), `check` and `explain`, the operator
//! commands over the admin API (`consumer`, `key`, `totp`, `recovery`, `sms`, `report`,
//! `audit`; see [`ops`]), and `store copy` ([`store_copy`]).

mod admin_client;
mod ops;
mod store_copy;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use http::Method;
use tracing_subscriber::EnvFilter;

use crate::config::{self, Policy, Requirement, RolloutMode, Scope};
use crate::routing::Miss;
use crate::server::Gateway;
use crate::snapshot::Snapshot;

const EXAMPLES: &str = "\
Examples:
  stepgate                                  run the gateway on ./gateway.yaml
  stepgate run -c /etc/stepgate/gateway.yaml --log-format json
  stepgate completions bash > /etc/bash_completion.d/stepgate
  stepgate man --out /usr/local/share/man/man1
  stepgate check -c gateway.yaml            validate; print every error as file:line:column
  stepgate explain GET /orders/7            which route, upstream and policy apply
  stepgate explain POST /orders --host api.example.com --role partner
  RUST_LOG=stepgate=debug stepgate run      more detail in the logs

Operator commands (talk to the admin API of a running gateway; address and token from the
config's `admin.listen` and `<data_dir>/admin.token`, or --admin-url / --admin-token):
  stepgate consumer add alice --role partner   prints alice's first API key (shown once)
  stepgate consumer list | show alice | disable alice | enable alice | delete alice
  stepgate key issue alice                     another key, for rotation
  stepgate key revoke alice sgk_1a2b3c4d       refused from the next request
  stepgate totp enroll alice                   otpauth:// URI, QR code and secret
  stepgate totp confirm alice 123456           prints the recovery codes (shown once)
  stepgate totp reset alice
  stepgate recovery regenerate alice
  stepgate sms reset alice                     remove alice's SMS number (and pending one)
  stepgate consumer roles alice partner,ops    set alice's roles
  stepgate consumer unlock alice               lift alice's ban for failed attempts
  stepgate step-up revoke alice                alice's next call needs a code again
  stepgate bans list                           bans in force
  stepgate approvals list                      requests waiting for a person's approval
  stepgate approvals approve apr_… --as bob --code 123456   bob approves with his own code
  stepgate approvals deny apr_… --as bob
  stepgate config show | reload                the configuration in force; read it again
  stepgate report enrollment                   who is not enrolled for which policy, and until when
  stepgate audit --consumer alice --since 2025-01-01T00:00:00Z
  stepgate --json consumer show alice          the raw JSON answer, for scripts

Store commands (with the gateways stopped):
  stepgate store copy --from sqlite:data/stepgate.db --to redis://redis:6379
  stepgate store copy --from config --to sqlite:backup.db";

#[derive(Debug, Parser)]
#[command(name = "stepgate", version, about = "An API gateway that puts a second factor in front of API calls", after_help = EXAMPLES)]
struct Cli {
    /// Path to gateway.yaml; policies are read from `policies_dir` beside it.
    #[arg(
        short,
        long,
        global = true,
        env = "STEPGATE_CONFIG",
        default_value = "gateway.yaml"
    )]
    config: PathBuf,
    #[command(flatten)]
    admin: ops::AdminOptions,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Default, Args)]
struct RunArgs {
    /// Log format: human-readable lines, or JSON lines for a log collector.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve traffic (the default). SIGINT or SIGTERM drain in-flight requests and exit 0;
    /// SIGHUP reloads the configuration.
    Run(RunArgs),
    /// Validate the configuration and policies; exit 0 when valid, 1 with every error.
    Check,
    /// Show the route, upstream and policy a request would get, or why none matches.
    Explain {
        /// HTTP method, e.g. GET.
        method: String,
        /// Request path (and optional query), e.g. /orders/7.
        path: String,
        /// Host the request is sent to (routes may match on it).
        #[arg(long)]
        host: Option<String>,
        /// Explain for a consumer with this role (repeat for several roles).
        #[arg(long = "role")]
        roles: Vec<String>,
    },
    /// Exit 0 when the running gateway is ready (admin `GET /readyz`); for health checks.
    Health,
    /// Manage consumers (admin API).
    #[command(subcommand)]
    Consumer(ops::ConsumerCommand),
    /// Issue and revoke API keys (admin API).
    #[command(subcommand)]
    Key(ops::KeyCommand),
    /// Enrol, confirm and reset TOTP (admin API).
    #[command(subcommand)]
    Totp(ops::TotpCommand),
    /// Recovery codes (admin API).
    #[command(subcommand)]
    Recovery(ops::RecoveryCommand),
    /// The SMS factor of a consumer (admin API).
    #[command(subcommand)]
    Sms(ops::SmsCommand),
    /// Reports (admin API).
    #[command(subcommand)]
    Report(ops::ReportCommand),
    /// Show audit events, newest first (admin API).
    Audit(ops::AuditArgs),
    /// Revoke step-up tokens (admin API).
    #[command(subcommand, name = "step-up")]
    StepUp(ops::StepUpCommand),
    /// The failure limiter's bans (admin API).
    #[command(subcommand)]
    Bans(ops::BansCommand),
    /// Requests waiting for a person's approval, and their decisions (admin API).
    #[command(subcommand)]
    Approvals(ops::ApprovalsCommand),
    /// The configuration the running gateway serves (admin API).
    #[command(subcommand)]
    Config(ops::ConfigCommand),
    /// Make the running gateway read its configuration again (admin API; as SIGHUP). A file
    /// with an error is refused as a whole: every error is printed, the previous
    /// configuration keeps serving.
    Reload,
    /// Print a shell completion script: `stepgate completions bash > /etc/bash_completion.d/stepgate`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or with --out write one page per command into a directory.
    Man {
        /// Directory for stepgate.1, stepgate-consumer.1, …
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Work on the store itself, with the gateways stopped.
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Copy everything one store holds into another (e.g. SQLite to Redis): consumers, keys,
    /// factors, used codes, bans, failure counts and the audit log. Safe to run again;
    /// verified by reading the target back.
    Copy(store_copy::CopyArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run(RunArgs::default())) {
        Command::Run(args) => run(&cli.config, args.log_format),
        Command::Check => check(&cli.config),
        Command::Explain {
            method,
            path,
            host,
            roles,
        } => explain(&cli.config, &method, &path, host.as_deref(), &roles),
        Command::Consumer(c) => ops::run(&cli.config, &cli.admin, ops::Operation::Consumer(c)),
        Command::Key(c) => ops::run(&cli.config, &cli.admin, ops::Operation::Key(c)),
        Command::Totp(c) => ops::run(&cli.config, &cli.admin, ops::Operation::Totp(c)),
        Command::Recovery(c) => ops::run(&cli.config, &cli.admin, ops::Operation::Recovery(c)),
        Command::Sms(c) => ops::run(&cli.config, &cli.admin, ops::Operation::Sms(c)),
        Command::Report(c) => ops::run(&cli.config, &cli.admin, ops::Operation::Report(c)),
        Command::Audit(a) => ops::run(&cli.config, &cli.admin, ops::Operation::Audit(a)),
        Command::Health => ops::run(&cli.config, &cli.admin, ops::Operation::Health),
        Command::StepUp(c) => ops::run(&cli.config, &cli.admin, ops::Operation::StepUp(c)),
        Command::Bans(c) => ops::run(&cli.config, &cli.admin, ops::Operation::Bans(c)),
        Command::Approvals(c) => ops::run(&cli.config, &cli.admin, ops::Operation::Approvals(c)),
        Command::Config(c) => ops::run(&cli.config, &cli.admin, ops::Operation::Config(c)),
        Command::Reload => ops::run(&cli.config, &cli.admin, ops::Operation::Reload),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "stepgate",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man { out } => man(out.as_deref()),
        Command::Store(StoreCommand::Copy(args)) => store_copy::run(&cli.config, &args),
    }
}

/// The manual page of the whole command line, from the same definitions as `--help`.
fn man(out: Option<&Path>) -> ExitCode {
    let result = match out {
        Some(dir) => std::fs::create_dir_all(dir)
            .and_then(|()| clap_mangen::generate_to(Cli::command(), dir))
            .map(|()| println!("manual pages written to {}", dir.display())),
        None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `stepgate man | head`: the reader had enough.
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("man: {error}");
            ExitCode::FAILURE
        }
    }
}

/// What a caller must present on a route with `policy` for a request of `method`, for a
/// consumer with `roles` (or for anyone when no role is given).
fn requirements(policy: &Policy, method: &http::Method, roles: &[String]) -> Vec<String> {
    let mut lines = Vec::new();
    if policy.api_key == Requirement::Off {
        lines.push("caller must present: nothing (public route)".to_owned());
        return lines;
    }
    let rules = &policy.roles;
    if !rules.only.is_empty() || !rules.except.is_empty() {
        lines.push(format!(
            "roles:     only [{}], except [{}]",
            rules.only.join(", "),
            rules.except.join(", ")
        ));
    }
    if !roles.is_empty() && !rules.allows(roles) {
        let outcome = match policy.rollout.mode {
            RolloutMode::ReportOnly => "would be 403 forbidden (report_only: forwarded, audited)",
            RolloutMode::Enforce => "403 forbidden",
        };
        lines.push(format!("for roles [{}]: {outcome}", roles.join(", ")));
        return lines;
    }
    if !policy.second_factor_for(method) {
        lines.push("caller must present: an API key (X-Api-Key)".to_owned());
        if policy.second_factor == Requirement::Writes {
            lines.push(format!(
                "  (second_factor: writes: {method} is safe; POST, PUT, PATCH and DELETE need a code too)"
            ));
        }
        return lines;
    }
    let mut factors = Vec::new();
    if policy.factors.totp {
        factors.push("a TOTP code");
    }
    if policy.factors.recovery_code {
        factors.push("a recovery code");
    }
    if policy.factors.sms {
        factors.push("an SMS code");
    }
    lines.push(format!(
        "caller must present: an API key (X-Api-Key) and {} in X-OTP",
        factors.join(" or ")
    ));
    if !policy.step_up.ttl.is_zero() {
        let scope = match policy.step_up.scope {
            Scope::Policy => format!("routes with policy `{}`", policy.name),
            Scope::Global => "every route".to_owned(),
        };
        lines.push(format!(
            "  or a step-up token (X-Step-Up-Token); a code earns one valid {} on {scope}",
            config::format_duration(policy.step_up.ttl)
        ));
    }
    if let Some(until) = policy.rollout.grace_until {
        lines.push(format!(
            "  consumers without a second factor pass with a warning until {}",
            crate::clock::rfc3339(until)
        ));
    }
    if policy.rollout.mode == RolloutMode::ReportOnly {
        lines.push("  report_only: refusals are forwarded and audited, not enforced".to_owned());
    }
    let f = &policy.failures;
    lines.push(format!(
        "failures:  {} per consumer in {} / {} per IP in {}, then a {} ban",
        f.per_consumer.max,
        config::format_duration(f.per_consumer.window),
        f.per_ip.max,
        config::format_duration(f.per_ip.window),
        config::format_duration(f.ban)
    ));
    lines
}

fn load_or_report(path: &Path) -> Option<config::Config> {
    match config::load(path) {
        Ok(config) => Some(config),
        Err(errors) => {
            for error in errors.errors() {
                eprintln!("{error}");
            }
            eprintln!("{}: {} error(s)", path.display(), errors.errors().len());
            None
        }
    }
}

/// `1 upstream`, `2 upstreams`.
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn check(path: &Path) -> ExitCode {
    match load_or_report(path) {
        Some(snapshot) => {
            println!(
                "{}: ok ({}, {}, {})",
                path.display(),
                count(snapshot.routes.len(), "route", "routes"),
                count(snapshot.upstreams.len(), "upstream", "upstreams"),
                count(snapshot.policies.len(), "policy", "policies")
            );
            ExitCode::SUCCESS
        }
        None => ExitCode::FAILURE,
    }
}

fn explain(
    path: &Path,
    method: &str,
    target: &str,
    host: Option<&str>,
    roles: &[String],
) -> ExitCode {
    let Some(config) = load_or_report(path) else {
        return ExitCode::FAILURE;
    };
    // The route table as the gateway would build it (no connection is made).
    let snapshot = Snapshot::build(config);
    let Ok(method) = Method::from_bytes(method.to_ascii_uppercase().as_bytes()) else {
        eprintln!("`{method}` is not an HTTP method");
        return ExitCode::FAILURE;
    };
    let (raw_path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let canonical = match crate::path::normalize(raw_path) {
        Ok(p) => p,
        Err(error) => {
            println!("400 bad_request: {error}; refused before routing");
            return ExitCode::FAILURE;
        }
    };
    if let Some(rest) = snapshot.self_service.strip(&canonical) {
        return explain_builtin(&snapshot, &method, rest);
    }
    // The same canonical host as the gateway routes by (`API.example.com.:443` and
    // `api.example.com` are one host; a malformed one is refused before routing).
    let host = match host.map(|h| crate::host::canonicalize(h.as_bytes(), false, None)) {
        None => None,
        Some(Ok(host)) => Some(host.name().to_owned()),
        Some(Err(error)) => {
            println!(
                "400 bad_request: the request's host is ambiguous: {error}; refused before routing"
            );
            return ExitCode::FAILURE;
        }
    };
    match snapshot
        .routes
        .explain(host.as_deref().map(str::as_bytes), &method, &canonical)
    {
        Ok(route) => {
            let forwarded = route.forward_path(&canonical);
            println!(
                "route:     {} ({}:{})",
                route.name,
                snapshot.source.display(),
                route.line
            );
            println!("upstream:  {:?}", route.upstream);
            println!(
                "policy:    {} (api_key: {}, second_factor: {})",
                route.policy.name, route.policy.api_key, route.policy.second_factor
            );
            for line in requirements(&route.policy, &method, roles) {
                println!("{line}");
            }
            match query {
                Some(q) => println!("forwards:  {method} {forwarded}?{q}"),
                None => println!("forwards:  {method} {forwarded}"),
            }
            println!("body limit: {}", config::format_size(route.body_bytes));
            if let Some(on_expiry) = route.websocket {
                let on_expiry = match on_expiry {
                    config::OnTokenExpiry::Close => "closed when its step-up token expires",
                    config::OnTokenExpiry::Keep => "kept open when its step-up token expires",
                };
                println!(
                    "websocket: upgrades tunnelled after the checks above; a tunnel is {on_expiry}"
                );
            }
            ExitCode::SUCCESS
        }
        Err(Miss::NoPath) => {
            println!("404 no_route: no route's path is a prefix of {canonical}");
            ExitCode::FAILURE
        }
        Err(Miss::Near(near)) => {
            println!("404 no_route: these routes match the path but not the request:");
            for route in near {
                let mut why = Vec::new();
                if let Some(want) = &route.host
                    && host.as_deref() != Some(want.as_str())
                {
                    why.push(format!("needs host {want}"));
                }
                if let Some(methods) = &route.methods
                    && !methods.contains(&method)
                {
                    let list: Vec<&str> = methods.iter().map(Method::as_str).collect();
                    why.push(format!("accepts only {}", list.join(", ")));
                }
                println!("  {} (line {}): {}", route.name, route.line, why.join("; "));
            }
            ExitCode::FAILURE
        }
    }
}

/// `explain` for a path under the self-service prefix: the gateway answers these itself.
fn explain_builtin(snapshot: &Snapshot, method: &Method, rest: &str) -> ExitCode {
    let prefix = &snapshot.self_service.prefix;
    let (what, present) = match rest {
        "/step-up" => (
            "the step-up endpoint (POST; ?policy=NAME when several policies issue tokens)",
            "an API key (X-Api-Key) and a code in X-OTP; answers a step-up token",
        ),
        _ if !snapshot.self_service.enabled => {
            println!("404 no_route: self-service is disabled (self_service.enabled: false)");
            return ExitCode::FAILURE;
        }
        "" | "/" | "/app.js" | "/app.css" => ("the security page", "nothing (public)"),
        _ => (
            "the self-service enrolment API",
            "an API key (X-Api-Key); X-OTP with a code of an existing factor to change one",
        ),
    };
    println!("route:     built-in: {what}, under {prefix} (self_service.prefix)");
    println!("upstream:  none; the gateway answers itself, nothing is forwarded");
    println!("caller must present: {present}");
    println!("request:   {method} {prefix}{rest}");
    ExitCode::SUCCESS
}

/// The file watcher's crates log every file event at trace level: with `RUST_LOG=trace` and
/// the log written into a watched directory, each line written would log another. They are
/// held at `info` unless `RUST_LOG` names them itself.
fn quiet_watcher(filter: EnvFilter, rust_log: Option<&str>) -> EnvFilter {
    if rust_log.is_some_and(|v| v.contains("notify")) {
        return filter;
    }
    ["notify=info", "notify_debouncer_full=info"]
        .into_iter()
        .filter_map(|d| d.parse().ok())
        .fold(filter, EnvFilter::add_directive)
}

fn init_logging(format: LogFormat) {
    let filter = quiet_watcher(
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        std::env::var("RUST_LOG").ok().as_deref(),
    );
    // Colours only on a terminal, and never with NO_COLOR set (https://no-color.org).
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn run(path: &Path, format: LogFormat) -> ExitCode {
    init_logging(format);
    let Some(snapshot) = load_or_report(path) else {
        return ExitCode::FAILURE;
    };
    // The public listener has worker threads of its own (`limits.workers`, see `server`);
    // this runtime only carries the admin API and background work.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let scheme = if snapshot.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let page = snapshot.self_service.page_path();
        let token_file = crate::secrets::admin_token_path(&snapshot.data_dir);
        let gateway = match Gateway::bind(snapshot).await {
            Ok(gateway) => gateway,
            Err(error) => {
                eprintln!("{error}");
                return ExitCode::FAILURE;
            }
        };
        let address = gateway.local_addr();
        tracing::info!(%address, "stepgate listening on {scheme}://{address}");
        match gateway.admin_addr() {
            Some(admin) => tracing::info!(
                %admin,
                "admin API on http://{admin} (bearer token: {} or STEPGATE_ADMIN_TOKEN)",
                token_file.display()
            ),
            None => tracing::info!("no admin API (the configuration has no `admin:` section)"),
        }
        if let Some(page) = page {
            tracing::info!("security page for consumers: {scheme}://{address}{page}");
        }
        let token = gateway.shutdown_token();
        let reloader = gateway.reloader();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::hangup()) {
                Ok(mut hangups) => {
                    while hangups.recv().await.is_some() {
                        reloader.reload("SIGHUP").await;
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot listen for SIGHUP"),
            }
        });
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received; shutting down");
            token.cancel();
        });
        match gateway.run().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("{error}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut sigterm) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = sigterm.recv() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT will stop the gateway");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
