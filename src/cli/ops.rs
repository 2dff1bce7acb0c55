//! Operator commands: consumers, API keys, factors, step-up tokens, bans, the configuration
//! in force and reloads, the audit log; each one admin API call, printed for people or, with
//! `--json`, as the raw answer.
//!
//! Where the admin API is: `--admin-url` / `STEPGATE_ADMIN_URL`, else `http://` + the
//! `admin.listen` address of the configuration. The token: `--admin-token` /
//! `STEPGATE_ADMIN_TOKEN`, else `<data_dir>/admin.token` of the configuration. The token is never
//! printed.

use std::cell::RefCell;
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use http::Method;
use serde_json::{Value, json};

use super::admin_client::{AdminClient, Answer, CallError, query_value, segment};
use crate::config;

/// `println!` into an [`Output`].
macro_rules! say {
    ($out:expr) => {
        $out.line(String::new())
    };
    ($out:expr, $($arg:tt)*) => {
        $out.line(format!($($arg)*))
    };
}

/// Options shared by every operator command.
#[derive(Debug, Args)]
pub struct AdminOptions {
    /// Admin API base URL [default: http://<admin.listen of the config>].
    #[arg(
        long,
        global = true,
        env = "STEPGATE_ADMIN_URL",
        value_name = "URL",
        help_heading = "Admin API (operator commands)"
    )]
    pub admin_url: Option<String>,
    /// Admin API bearer token [default: read from <data_dir>/admin.token]. Prefer the
    /// environment variable: a command-line argument is visible to other local users.
    #[arg(
        long,
        global = true,
        env = "STEPGATE_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        help_heading = "Admin API (operator commands)"
    )]
    pub admin_token: Option<String>,
    /// Print the admin API's JSON answer as received instead of text (for scripts).
    #[arg(long, global = true, help_heading = "Admin API (operator commands)")]
    pub json: bool,
}

/// The operator commands, each one call of the admin API.
#[derive(Debug)]
pub enum Operation {
    Consumer(ConsumerCommand),
    Key(KeyCommand),
    Totp(TotpCommand),
    Recovery(RecoveryCommand),
    Sms(SmsCommand),
    Report(ReportCommand),
    Audit(AuditArgs),
    StepUp(StepUpCommand),
    Bans(BansCommand),
    Approvals(ApprovalsCommand),
    Config(ConfigCommand),
    /// `POST /reload`: read the configuration again.
    Reload,
    /// `GET /readyz`: exit 0 when the gateway is ready (for container health checks).
    Health,
}

#[derive(Debug, Subcommand)]
pub enum StepUpCommand {
    /// Revoke every step-up token of a consumer: its next call needs a code again.
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
pub enum BansCommand {
    /// The bans in force (consumers and client addresses), newest first.
    List,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// The requests waiting for a decision: who asked, what, and the fields shown.
    List,
    /// Approve a request as an approver, with the approver's own code.
    Approve {
        id: String,
        /// The approving consumer (needs one of the policy's approver roles).
        #[arg(long = "as")]
        approver: String,
        /// The approver's current code (TOTP, or what their strongest factor sends).
        #[arg(long)]
        code: String,
    },
    /// Deny a request as an approver.
    Deny {
        id: String,
        #[arg(long = "as")]
        approver: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// The configuration in force: its version, file, when it was loaded, the last reload error.
    Show,
}

#[derive(Debug, Subcommand)]
pub enum ConsumerCommand {
    /// Create a consumer and its first API key (the key is shown only once).
    Add {
        name: String,
        /// A role (repeat the flag, or separate with commas).
        #[arg(long = "role", value_name = "ROLE", value_delimiter = ',')]
        roles: Vec<String>,
    },
    /// List consumers: roles, disabled flag, enrolled factors, key prefixes.
    List,
    /// One consumer in detail: keys, TOTP status, recovery codes remaining.
    Show { name: String },
    /// Set the consumer's roles (replacing them; none given: no roles).
    Roles {
        name: String,
        /// The roles (separate arguments, or separated with commas).
        #[arg(value_delimiter = ',')]
        roles: Vec<String>,
    },
    /// Lift the consumer's ban for failed attempts, and forget its failure count.
    Unlock { name: String },
    /// Refuse the consumer's API keys from the next request on.
    Disable { name: String },
    /// Accept the consumer's live API keys again.
    Enable { name: String },
    /// Delete the consumer with its keys and factors.
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Issue another API key for a consumer (for rotation; shown only once).
    Issue { name: String },
    /// Revoke a key by its prefix (`sgk_` + 8 hex digits, see `consumer show`).
    Revoke { name: String, prefix: String },
}

#[derive(Debug, Subcommand)]
pub enum TotpCommand {
    /// Start a TOTP enrolment: prints the otpauth:// URI, a QR code and the secret.
    Enroll {
        name: String,
        /// Code length: 6, 7 or 8 [default: 6].
        #[arg(long)]
        digits: Option<u8>,
        /// Seconds per code, 15 to 120 [default: 30].
        #[arg(long)]
        period: Option<u64>,
        /// HMAC algorithm [default: SHA1, which every authenticator app supports].
        #[arg(long, value_enum, ignore_case = true)]
        algorithm: Option<Algorithm>,
    },
    /// Confirm a pending enrolment with a current code; prints the recovery codes (once).
    Confirm { name: String, code: String },
    /// Remove the consumer's TOTP enrolment and recovery codes.
    Reset { name: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Algorithm {
    #[value(name = "SHA1")]
    Sha1,
    #[value(name = "SHA256")]
    Sha256,
    #[value(name = "SHA512")]
    Sha512,
}

impl Algorithm {
    fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha1 => "SHA1",
            Algorithm::Sha256 => "SHA256",
            Algorithm::Sha512 => "SHA512",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum RecoveryCommand {
    /// Replace the consumer's recovery codes with a new set (the old ones stop working).
    Regenerate { name: String },
}

#[derive(Debug, Subcommand)]
pub enum SmsCommand {
    /// Remove the consumer's SMS number (confirmed and pending) and outstanding codes; its
    /// step-up tokens are revoked.
    Reset { name: String },
}

#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// Consumers not enrolled for a policy that needs a second factor and applies to their
    /// roles, with the policy's grace deadline and whether it has passed.
    Enrollment,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only events of this consumer.
    #[arg(long)]
    pub consumer: Option<String>,
    /// Only events at or after this time (RFC 3339 or Unix seconds).
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many events.
    #[arg(long)]
    pub limit: Option<u32>,
}

/// Runs one operator command; exit 1 on any failure, with the reason on stderr.
pub fn run(config_path: &Path, options: &AdminOptions, operation: Operation) -> ExitCode {
    let client = match connect(config_path, options) {
        Ok(client) => client,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let out = Output::new(options.json);
    match runtime.block_on(execute(&client, &out, operation)) {
        Ok(()) if out.flush() => ExitCode::SUCCESS,
        Ok(()) => ExitCode::FAILURE,
        Err(error) => {
            if let (true, CallError::Problem { body, .. }) = (out.json, &error)
                && !body.is_empty()
            {
                say!(out, "{}", String::from_utf8_lossy(body).trim_end());
            }
            out.flush();
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Where the admin API is and which token to present.
fn connect(config_path: &Path, options: &AdminOptions) -> Result<AdminClient, String> {
    let url = options
        .admin_url
        .as_deref()
        .filter(|u| !u.trim().is_empty());
    let token = options
        .admin_token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let found = if url.is_none() || token.is_none() {
        Some(find_admin(config_path, url, token)?)
    } else {
        None
    };
    let url = match url {
        Some(url) => url.to_owned(),
        None => {
            let found = found.as_ref().unwrap_or_else(|| unreachable!());
            let Some(admin) = found.admin else {
                return Err(format!(
                    "{} has no `admin:` section, so the gateway serves no admin API; add \
                     `admin: {{ listen: 127.0.0.1:9901 }}` and restart it, or pass --admin-url",
                    config_path.display()
                ));
            };
            if admin.port() == 0 {
                return Err(format!(
                    "{}: admin.listen has port 0 (any free port), so the admin API's address \
                     cannot be known from the configuration; pass --admin-url",
                    config_path.display()
                ));
            }
            format!("http://{}", reachable(admin))
        }
    };
    let token = match token {
        Some(token) => token.to_owned(),
        None => {
            let found = found.as_ref().unwrap_or_else(|| unreachable!());
            let path = crate::secrets::admin_token_path(&found.data_dir);
            match std::fs::read_to_string(&path) {
                Ok(text) if !text.trim().is_empty() => text.trim().to_owned(),
                Ok(_) => return Err(format!("{} is empty", path.display())),
                Err(error) if error.kind() == ErrorKind::NotFound => {
                    return Err(format!(
                        "no admin token at {}: the gateway creates it on its first start \
                         (unless STEPGATE_ADMIN_TOKEN is set for it); pass --admin-token or set \
                         STEPGATE_ADMIN_TOKEN",
                        path.display()
                    ));
                }
                Err(error) => {
                    return Err(format!(
                        "cannot read the admin token {}: {error}; run as the gateway's user, or \
                         pass --admin-token or set STEPGATE_ADMIN_TOKEN",
                        path.display()
                    ));
                }
            }
        }
    };
    AdminClient::new(&url, &token)
}

/// Where the configuration says the admin API and its token are.
struct AdminLocation {
    admin: Option<SocketAddr>,
    data_dir: std::path::PathBuf,
}

/// The admin API's address and data directory from the configuration. A configuration
/// with errors elsewhere still says where its admin API is (that is when `stepgate reload`
/// and `config show` are wanted): its `admin` and `data_dir` are then read on their own,
/// with a warning.
fn find_admin(
    config_path: &Path,
    url: Option<&str>,
    token: Option<&str>,
) -> Result<AdminLocation, String> {
    let errors = match config::load(config_path) {
        Ok(config) => {
            return Ok(AdminLocation {
                admin: config.admin,
                data_dir: config.data_dir,
            });
        }
        Err(errors) => errors,
    };
    if let Some(found) = admin_section(config_path) {
        eprintln!(
            "warning: {} has {} error(s) (see `stepgate check`); using its admin section",
            config_path.display(),
            errors.errors().len()
        );
        return Ok(found);
    }
    let mut message = format!(
        "cannot load {} ({} error(s)) to find the admin API:",
        config_path.display(),
        errors.errors().len()
    );
    for error in errors.errors().iter().take(5) {
        message.push_str(&format!("\n  {error}"));
    }
    message.push_str(&format!(
        "\nfix it (see `stepgate check -c {}`), point -c at the gateway's configuration, or \
         pass {}",
        config_path.display(),
        match (url, token) {
            (None, None) =>
                "--admin-url and --admin-token (or STEPGATE_ADMIN_URL and STEPGATE_ADMIN_TOKEN)",
            (None, Some(_)) => "--admin-url URL (or set STEPGATE_ADMIN_URL)",
            _ => "--admin-token (or set STEPGATE_ADMIN_TOKEN)",
        }
    ));
    Err(message)
}

/// Only `admin.listen` and `data_dir` of a configuration file, whatever else it holds;
/// `None` when even those cannot be read.
fn admin_section(config_path: &Path) -> Option<AdminLocation> {
    #[derive(serde::Deserialize)]
    struct Admin {
        listen: String,
    }
    #[derive(serde::Deserialize)]
    struct Partial {
        admin: Option<Admin>,
        data_dir: Option<String>,
    }
    let text = std::fs::read_to_string(config_path).ok()?;
    let partial: Partial = serde_saphyr::from_str(&text).ok()?;
    let admin = match partial.admin {
        Some(admin) => Some(admin.listen.trim().parse().ok()?),
        None => None,
    };
    let base = config_path.parent().unwrap_or(Path::new("."));
    Some(AdminLocation {
        admin,
        data_dir: base.join(partial.data_dir.as_deref().unwrap_or("data")),
    })
}

/// A wildcard listen address (0.0.0.0, ::) is reached over loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// What a command prints on stdout, collected and written at the end (so that a closed pipe,
/// as in `stepgate consumer list | head -1`, is not a crash).
struct Output {
    json: bool,
    text: RefCell<String>,
}

impl Output {
    fn new(json: bool) -> Self {
        Self {
            json,
            text: RefCell::new(String::new()),
        }
    }

    fn line(&self, line: String) {
        let mut text = self.text.borrow_mut();
        text.push_str(&line);
        text.push('\n');
    }

    /// Writes what was collected; a reader that went away early is not an error.
    fn flush(&self) -> bool {
        let text = self.text.take();
        let mut stdout = std::io::stdout().lock();
        match stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
        {
            Ok(()) => true,
            Err(error) if error.kind() == ErrorKind::BrokenPipe => true,
            Err(error) => {
                eprintln!("error: cannot write the output: {error}");
                false
            }
        }
    }

    /// With `--json`, prints the answer as received and returns `None`; else its JSON value
    /// (`Null` for an empty 204 answer).
    fn take(&self, answer: &Answer) -> Result<Option<Value>, CallError> {
        if self.json {
            if !answer.body.is_empty() {
                say!(self, "{}", String::from_utf8_lossy(&answer.body).trim_end());
            }
            return Ok(None);
        }
        answer.json().map(Some)
    }
}

fn consumer_path(name: &str) -> String {
    format!("/consumers/{}", segment(name))
}

async fn execute(
    client: &AdminClient,
    out: &Output,
    operation: Operation,
) -> Result<(), CallError> {
    match operation {
        Operation::Consumer(command) => consumer(client, out, command).await,
        Operation::Key(command) => key(client, out, command).await,
        Operation::Totp(command) => totp(client, out, command).await,
        Operation::Recovery(RecoveryCommand::Regenerate { name }) => {
            let path = format!("{}/recovery-codes", consumer_path(&name));
            let answer = client.call(Method::POST, &path, None).await?;
            if let Some(body) = out.take(&answer)? {
                say!(
                    out,
                    "New recovery codes for {name} (the previous ones no longer work):"
                );
                print_recovery_codes(out, &body);
            }
            Ok(())
        }
        Operation::Sms(SmsCommand::Reset { name }) => {
            let path = format!("{}/sms", consumer_path(&name));
            let answer = client.call(Method::DELETE, &path, None).await?;
            if out.take(&answer)?.is_some() {
                say!(
                    out,
                    "Removed the SMS number of {name}; its step-up tokens are revoked."
                );
            }
            Ok(())
        }
        Operation::Report(ReportCommand::Enrollment) => enrollment_report(client, out).await,
        Operation::Audit(args) => audit(client, out, args).await,
        Operation::StepUp(StepUpCommand::Revoke { name }) => {
            let path = format!("{}/step-up-tokens", consumer_path(&name));
            let answer = client.call(Method::DELETE, &path, None).await?;
            if out.take(&answer)?.is_some() {
                say!(
                    out,
                    "Revoked the step-up tokens of {name}: its next call to a second-factor \
                     route needs a code."
                );
            }
            Ok(())
        }
        Operation::Bans(BansCommand::List) => bans(client, out).await,
        Operation::Approvals(ApprovalsCommand::List) => approvals(client, out).await,
        Operation::Approvals(ApprovalsCommand::Approve { id, approver, code }) => {
            let body = json!({"approver": approver, "code": code});
            let answer = client
                .call(
                    Method::POST,
                    &format!("/approvals/{id}/approve"),
                    Some(&body),
                )
                .await?;
            if out.take(&answer)?.is_some() {
                say!(
                    out,
                    "Approved {id} as {approver}: its requester may now repeat it, once."
                );
            }
            Ok(())
        }
        Operation::Approvals(ApprovalsCommand::Deny { id, approver }) => {
            let body = json!({"approver": approver});
            let answer = client
                .call(Method::POST, &format!("/approvals/{id}/deny"), Some(&body))
                .await?;
            if out.take(&answer)?.is_some() {
                say!(out, "Denied {id} as {approver}.");
            }
            Ok(())
        }
        Operation::Config(ConfigCommand::Show) => {
            let answer = client.call(Method::GET, "/config", None).await?;
            if let Some(body) = out.take(&answer)? {
                print_config_status(out, &body);
            }
            Ok(())
        }
        Operation::Reload => reload(client, out).await,
        Operation::Health => {
            let answer = client.call(Method::GET, "/readyz", None).await?;
            if out.take(&answer)?.is_some() {
                say!(out, "ready");
            }
            Ok(())
        }
    }
}

async fn consumer(
    client: &AdminClient,
    out: &Output,
    command: ConsumerCommand,
) -> Result<(), CallError> {
    match command {
        ConsumerCommand::Add { name, roles } => {
            let answer = client
                .call(
                    Method::POST,
                    "/consumers",
                    Some(&json!({"name": name, "roles": roles})),
                )
                .await?;
            if let Some(body) = out.take(&answer)? {
                say!(out, "Created consumer {}.", text(&body["name"]));
                say!(out, "id:      {}", text(&body["id"]));
                say!(out, "roles:   {}", roles_or_none(&body["roles"]));
                say!(out, "API key: {}", text(&body["api_key"]));
                say!(out, "prefix:  {}", text(&body["prefix"]));
                say!(out);
                say!(
                    out,
                    "The API key is shown only once: give it to the consumer now (it is sent \
                     as X-Api-Key). stepgate keeps only a hash of it."
                );
            }
        }
        ConsumerCommand::List => {
            let answer = client.call(Method::GET, "/consumers", None).await?;
            if let Some(body) = out.take(&answer)? {
                let consumers = body["consumers"].as_array().cloned().unwrap_or_default();
                if consumers.is_empty() {
                    say!(
                        out,
                        "No consumers yet (add one with `stepgate consumer add NAME`)."
                    );
                    return Ok(());
                }
                let mut rows = vec![vec![
                    "NAME".to_owned(),
                    "ROLES".to_owned(),
                    "DISABLED".to_owned(),
                    "FACTORS".to_owned(),
                    "KEYS".to_owned(),
                ]];
                for c in &consumers {
                    rows.push(vec![
                        text(&c["name"]),
                        list(&c["roles"]),
                        yes_no(&c["disabled"]),
                        factors(c),
                        live_keys(&c["keys"]),
                    ]);
                }
                print_table(out, &rows);
            }
        }
        ConsumerCommand::Show { name } => {
            let answer = client
                .call(Method::GET, &consumer_path(&name), None)
                .await?;
            if let Some(c) = out.take(&answer)? {
                say!(out, "name:      {}", text(&c["name"]));
                say!(out, "id:        {}", text(&c["id"]));
                say!(out, "roles:     {}", roles_or_none(&c["roles"]));
                say!(out, "disabled:  {}", yes_no(&c["disabled"]));
                say!(out, "created:   {}", text(&c["created_at"]));
                say!(out, "factors:   {}", factors(&c));
                say!(out, "totp:      {}", totp_status(&c["totp"]));
                say!(out, "sms:       {}", sms_status(&c["sms"]));
                say!(
                    out,
                    "recovery codes remaining: {}",
                    c["recovery_codes_remaining"]
                );
                let keys = c["keys"].as_array().cloned().unwrap_or_default();
                if keys.is_empty() {
                    say!(out, "keys:      none");
                } else {
                    say!(out, "keys:");
                    let mut rows = vec![vec![
                        "  PREFIX".to_owned(),
                        "CREATED".to_owned(),
                        "LAST USED".to_owned(),
                        "REVOKED".to_owned(),
                    ]];
                    for k in &keys {
                        rows.push(vec![
                            format!("  {}", text(&k["prefix"])),
                            text(&k["created_at"]),
                            k["last_used_at"].as_str().unwrap_or("never").to_owned(),
                            k["revoked_at"].as_str().unwrap_or("-").to_owned(),
                        ]);
                    }
                    print_table(out, &rows);
                }
            }
        }
        ConsumerCommand::Roles { name, roles } => {
            let roles: Vec<String> = roles
                .into_iter()
                .map(|r| r.trim().to_owned())
                .filter(|r| !r.is_empty())
                .collect();
            let answer = client
                .call(
                    Method::PATCH,
                    &consumer_path(&name),
                    Some(&json!({"roles": roles})),
                )
                .await?;
            if let Some(body) = out.take(&answer)? {
                say!(
                    out,
                    "Roles of {name}: {} (in force from the next request).",
                    roles_or_none(&body["roles"])
                );
            }
        }
        ConsumerCommand::Unlock { name } => {
            let path = format!("{}/unlock", consumer_path(&name));
            let answer = client.call(Method::POST, &path, None).await?;
            if out.take(&answer)?.is_some() {
                say!(
                    out,
                    "Unlocked {name}: any ban is lifted and its failure count starts afresh."
                );
            }
        }
        ConsumerCommand::Disable { name } => {
            set_disabled(client, out, &name, true).await?;
        }
        ConsumerCommand::Enable { name } => {
            set_disabled(client, out, &name, false).await?;
        }
        ConsumerCommand::Delete { name } => {
            let answer = client
                .call(Method::DELETE, &consumer_path(&name), None)
                .await?;
            if out.take(&answer)?.is_some() {
                say!(out, "Deleted consumer {name}, with its keys and factors.");
            }
        }
    }
    Ok(())
}

async fn approvals(client: &AdminClient, out: &Output) -> Result<(), CallError> {
    let answer = client.call(Method::GET, "/approvals", None).await?;
    let Some(body) = out.take(&answer)? else {
        return Ok(());
    };
    let pending = body["approvals"].as_array().cloned().unwrap_or_default();
    if pending.is_empty() {
        say!(out, "No request is waiting for approval.");
        return Ok(());
    }
    let mut rows = vec![vec![
        "ID".to_owned(),
        "REQUESTER".to_owned(),
        "REQUEST".to_owned(),
        "FIELDS".to_owned(),
        "EXPIRES".to_owned(),
    ]];
    for a in &pending {
        let fields = a["fields"]
            .as_object()
            .map(|f| {
                f.iter()
                    .map(|(k, v)| format!("{}={v}", k.trim_start_matches("$.")))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        rows.push(vec![
            text(&a["id"]),
            text(&a["requester"]),
            format!("{} {}", text(&a["method"]), text(&a["path"])),
            fields,
            text(&a["expires_at"]),
        ]);
    }
    print_table(out, &rows);
    Ok(())
}

async fn bans(client: &AdminClient, out: &Output) -> Result<(), CallError> {
    let answer = client.call(Method::GET, "/bans", None).await?;
    let Some(body) = out.take(&answer)? else {
        return Ok(());
    };
    let bans = body["bans"].as_array().cloned().unwrap_or_default();
    if bans.is_empty() {
        say!(out, "No bans in force.");
        return Ok(());
    }
    let mut rows = vec![vec![
        "KIND".to_owned(),
        "WHO".to_owned(),
        "SINCE".to_owned(),
        "UNTIL".to_owned(),
    ]];
    for ban in &bans {
        let who = match ban["consumer"].as_str() {
            Some(name) => name.to_owned(),
            None => text(&ban["subject"]),
        };
        rows.push(vec![
            text(&ban["kind"]),
            who,
            text(&ban["started"]),
            text(&ban["until"]),
        ]);
    }
    print_table(out, &rows);
    say!(out);
    say!(
        out,
        "Lift a consumer's ban with `stepgate consumer unlock NAME`; a client address's ban \
         ends by itself."
    );
    Ok(())
}

fn print_config_status(out: &Output, body: &Value) {
    say!(out, "version:   {}", text(&body["version"]));
    say!(out, "file:      {}", text(&body["source"]));
    say!(out, "loaded at: {}", text(&body["loaded_at"]));
    match body["last_error"].as_array() {
        Some(errors) => {
            say!(
                out,
                "the last reload was refused (the configuration above keeps serving):"
            );
            for error in errors {
                say!(out, "  {}", text(error));
            }
        }
        None => say!(out, "last reload: no error"),
    }
}

async fn reload(client: &AdminClient, out: &Output) -> Result<(), CallError> {
    match client.call(Method::POST, "/reload", None).await {
        Ok(answer) => {
            if let Some(body) = out.take(&answer)? {
                if body["changed"] == json!(true) {
                    say!(out, "Reloaded: the new configuration serves from now on.");
                } else {
                    say!(
                        out,
                        "Nothing changed: the configuration in force is the file's."
                    );
                }
                print_config_status(out, &body);
            }
            Ok(())
        }
        Err(CallError::Problem { body, .. }) if !out.json && !body.is_empty() => {
            // Every error of the refused file, one per line, as `stepgate check` prints them.
            let problem: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            eprintln!("the new configuration is invalid; the previous one keeps serving:");
            for error in problem["errors"].as_array().into_iter().flatten() {
                eprintln!("  {}", text(error));
            }
            Err(CallError::Other("reload refused".into()))
        }
        Err(error) => Err(error),
    }
}

async fn set_disabled(
    client: &AdminClient,
    out: &Output,
    name: &str,
    disabled: bool,
) -> Result<(), CallError> {
    let answer = client
        .call(
            Method::PATCH,
            &consumer_path(name),
            Some(&json!({"disabled": disabled})),
        )
        .await?;
    if out.take(&answer)?.is_some() {
        if disabled {
            say!(
                out,
                "Disabled consumer {name}: its API keys are refused from the next request."
            );
        } else {
            say!(
                out,
                "Enabled consumer {name}: its live API keys are accepted again."
            );
        }
    }
    Ok(())
}

async fn key(client: &AdminClient, out: &Output, command: KeyCommand) -> Result<(), CallError> {
    match command {
        KeyCommand::Issue { name } => {
            let path = format!("{}/keys", consumer_path(&name));
            let answer = client.call(Method::POST, &path, None).await?;
            if let Some(body) = out.take(&answer)? {
                say!(out, "New API key for {name}: {}", text(&body["api_key"]));
                say!(out, "prefix: {}", text(&body["prefix"]));
                say!(out);
                say!(
                    out,
                    "The key is shown only once. The consumer's other keys keep working until \
                     you revoke them: `stepgate key revoke {name} PREFIX`."
                );
            }
        }
        KeyCommand::Revoke { name, prefix } => {
            let path = format!("{}/keys/{}", consumer_path(&name), segment(&prefix));
            let answer = client.call(Method::DELETE, &path, None).await?;
            if out.take(&answer)?.is_some() {
                say!(
                    out,
                    "Revoked key {prefix} of {name}: it is refused from the next request."
                );
            }
        }
    }
    Ok(())
}

async fn totp(client: &AdminClient, out: &Output, command: TotpCommand) -> Result<(), CallError> {
    match command {
        TotpCommand::Enroll {
            name,
            digits,
            period,
            algorithm,
        } => {
            let mut params = serde_json::Map::new();
            if let Some(digits) = digits {
                params.insert("digits".into(), json!(digits));
            }
            if let Some(period) = period {
                params.insert("period".into(), json!(period));
            }
            if let Some(algorithm) = algorithm {
                params.insert("algorithm".into(), json!(algorithm.as_str()));
            }
            let path = format!("{}/totp", consumer_path(&name));
            let answer = client
                .call(Method::POST, &path, Some(&Value::Object(params)))
                .await?;
            if let Some(body) = out.take(&answer)? {
                let uri = text(&body["otpauth_uri"]);
                say!(
                    out,
                    "TOTP enrolment started for {name}; it stays pending until confirmed, 15 minutes at most."
                );
                say!(out);
                match crate::credentials::totp::qr_terminal(&uri) {
                    Ok(qr) => {
                        say!(out, "Scan this QR code with an authenticator app:");
                        say!(out, "{qr}");
                    }
                    Err(error) => say!(out, "(cannot draw the QR code here: {error})"),
                }
                say!(out, "otpauth URI: {uri}");
                say!(
                    out,
                    "secret:      {}  (to type in by hand)",
                    text(&body["secret"])
                );
                say!(out);
                say!(out, "Next: confirm with the code the app shows now:");
                say!(out, "  stepgate totp confirm {name} CODE");
            }
        }
        TotpCommand::Confirm { name, code } => {
            let path = format!("{}/totp/confirm", consumer_path(&name));
            let answer = client
                .call(Method::POST, &path, Some(&json!({"code": code})))
                .await?;
            if let Some(body) = out.take(&answer)? {
                say!(out, "TOTP confirmed for {name}. Recovery codes:");
                print_recovery_codes(out, &body);
                say!(out);
                say!(
                    out,
                    "The code just used is spent: the first code that works is the next one, \
                     in {} s (from {}).",
                    body["next_code_in"].as_u64().unwrap_or(0),
                    text(&body["next_code_at"])
                );
            }
        }
        TotpCommand::Reset { name } => {
            let path = format!("{}/totp", consumer_path(&name));
            let answer = client.call(Method::DELETE, &path, None).await?;
            if out.take(&answer)?.is_some() {
                say!(
                    out,
                    "Removed the TOTP enrolment of {name} and its recovery codes; enrol again \
                     with `stepgate totp enroll {name}`."
                );
            }
        }
    }
    Ok(())
}

async fn audit(client: &AdminClient, out: &Output, args: AuditArgs) -> Result<(), CallError> {
    let mut query = Vec::new();
    if let Some(consumer) = &args.consumer {
        query.push(format!("consumer={}", query_value(consumer)));
    }
    if let Some(since) = &args.since {
        query.push(format!("since={}", query_value(since)));
    }
    if let Some(limit) = args.limit {
        query.push(format!("limit={limit}"));
    }
    let path = if query.is_empty() {
        "/audit".to_owned()
    } else {
        format!("/audit?{}", query.join("&"))
    };
    let answer = client.call(Method::GET, &path, None).await?;
    if let Some(body) = out.take(&answer)? {
        let events = body["events"].as_array().cloned().unwrap_or_default();
        if events.is_empty() {
            say!(out, "No audit events.");
            return Ok(());
        }
        let mut rows = vec![vec![
            "AT".to_owned(),
            "KIND".to_owned(),
            "CONSUMER".to_owned(),
            "KEY".to_owned(),
            "DETAIL".to_owned(),
        ]];
        for e in &events {
            let detail = match &e["detail"] {
                Value::Null => String::new(),
                Value::Object(m) if m.is_empty() => String::new(),
                other => other.to_string(),
            };
            rows.push(vec![
                text(&e["at"]),
                text(&e["kind"]),
                e["consumer"].as_str().unwrap_or("-").to_owned(),
                e["key_prefix"].as_str().unwrap_or("-").to_owned(),
                detail,
            ]);
        }
        print_table(out, &rows);
    }
    Ok(())
}

async fn enrollment_report(client: &AdminClient, out: &Output) -> Result<(), CallError> {
    let answer = client
        .call(Method::GET, "/reports/enrollment", None)
        .await?;
    let Some(body) = out.take(&answer)? else {
        return Ok(());
    };
    let entries = body["entries"].as_array().cloned().unwrap_or_default();
    if entries.is_empty() {
        say!(
            out,
            "Every consumer is enrolled for every policy that needs a second factor and applies \
             to it (as of {}).",
            text(&body["generated_at"])
        );
        return Ok(());
    }
    say!(
        out,
        "Not enrolled for a policy that needs a second factor (as of {}):",
        text(&body["generated_at"])
    );
    let mut rows = vec![vec![
        "CONSUMER".to_owned(),
        "POLICY".to_owned(),
        "ACCEPTS".to_owned(),
        "DEADLINE".to_owned(),
        "STATUS".to_owned(),
        "PENDING".to_owned(),
    ]];
    for e in &entries {
        let mut status = text(&e["status"]);
        if e["mode"] == "report_only" {
            status.push_str(" (report_only)");
        }
        rows.push(vec![
            text(&e["consumer"]),
            text(&e["policy"]),
            list(&e["factors"]),
            e["grace_until"].as_str().unwrap_or("none").to_owned(),
            status,
            list(&e["pending"]),
        ]);
    }
    print_table(out, &rows);
    say!(out);
    say!(out, "{}", report_summary(&entries));
    Ok(())
}

/// The closing line of the enrolment report. An overdue entry under a `report_only` policy is
/// not refused: its calls are forwarded and audited as `would_refuse`, so it is counted apart.
fn report_summary(entries: &[Value]) -> String {
    let overdue = |mode: &str| {
        entries
            .iter()
            .filter(|e| e["status"] == "overdue" && e["mode"] == mode)
            .count()
    };
    let (refused, reported) = (overdue("enforce"), overdue("report_only"));
    let grace = entries.iter().filter(|e| e["status"] == "grace").count();
    let mut consumers: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["consumer"].as_str())
        .collect();
    consumers.sort_unstable();
    consumers.dedup();
    let entries_word = |n: usize| if n == 1 { "entry" } else { "entries" };
    let mut parts = vec![format!(
        "{refused} {} overdue (refused with 403 enrollment_required)",
        entries_word(refused)
    )];
    if reported > 0 {
        parts.push(format!(
            "{reported} overdue under report_only (forwarded, audited as would_refuse)"
        ));
    }
    parts.push(format!(
        "{grace} in grace (passing with a warning until the deadline)"
    ));
    format!(
        "{} consumer(s) to enrol; {}. Consumers enrol themselves on the security page, or an \
         operator runs `stepgate totp enroll NAME`.",
        consumers.len(),
        parts.join(", ")
    )
}

fn print_recovery_codes(out: &Output, body: &Value) {
    let codes = body["recovery_codes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for code in &codes {
        say!(out, "  {}", text(code));
    }
    say!(out);
    say!(
        out,
        "These {} codes are shown only once: store them somewhere safe. Each works once, in \
         place of a TOTP code.",
        codes.len()
    );
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn list(value: &Value) -> String {
    let items: Vec<String> = value
        .as_array()
        .map(|a| a.iter().map(text).collect())
        .unwrap_or_default();
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

fn roles_or_none(value: &Value) -> String {
    match list(value).as_str() {
        "-" => "none".to_owned(),
        roles => roles.to_owned(),
    }
}

fn yes_no(value: &Value) -> String {
    match value.as_bool() {
        Some(true) => "yes".to_owned(),
        Some(false) => "no".to_owned(),
        None => text(value),
    }
}

fn factors(consumer: &Value) -> String {
    let confirmed = list(&consumer["factors"]);
    let mut pending = Vec::new();
    if consumer["totp"]["status"].as_str() == Some("pending") {
        pending.push("totp (pending)");
    }
    if consumer["sms"]["status"].as_str() == Some("pending") {
        pending.push("sms (pending)");
    }
    match (confirmed.as_str(), pending.is_empty()) {
        ("-", false) => pending.join(","),
        ("-", true) => "none".to_owned(),
        (_, _) => confirmed,
    }
}

fn sms_status(sms: &Value) -> String {
    if sms.is_null() {
        return "not enrolled".to_owned();
    }
    let phone = sms["phone"].as_str().unwrap_or("-");
    let mut line = match sms["status"].as_str() {
        Some("pending") => format!("pending confirmation ({phone})"),
        Some(status) => format!("{status} ({phone})"),
        None => "-".to_owned(),
    };
    if let Some(next) = sms["pending_phone"].as_str() {
        line.push_str(&format!("; {next} pending confirmation"));
    }
    line
}

fn totp_status(totp: &Value) -> String {
    if totp.is_null() {
        return "not enrolled".to_owned();
    }
    let status = match totp["status"].as_str() {
        Some("pending") => "pending confirmation",
        Some(other) => other,
        None => "-",
    };
    let mut line = format!(
        "{status} ({}, {} digits, {} s)",
        text(&totp["algorithm"]),
        text(&totp["digits"]),
        text(&totp["period"])
    );
    if totp["reenrolment_pending"] == true {
        line.push_str("; a re-enrolment is pending confirmation");
    }
    line
}

/// Prefixes of live keys, plus how many are revoked.
fn live_keys(keys: &Value) -> String {
    let keys = keys.as_array().cloned().unwrap_or_default();
    let live: Vec<String> = keys
        .iter()
        .filter(|k| k["revoked_at"].is_null())
        .map(|k| text(&k["prefix"]))
        .collect();
    let revoked = keys.len() - live.len();
    let mut out = if live.is_empty() {
        "none live".to_owned()
    } else {
        live.join(",")
    };
    if revoked > 0 {
        out.push_str(&format!(" (+{revoked} revoked)"));
    }
    out
}

fn print_table(out: &Output, rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
            }
        }
        say!(out, "{}", line.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_summary_does_not_call_report_only_entries_refused() {
        let entry = |consumer: &str, status: &str, mode: &str| serde_json::json!({"consumer": consumer, "status": status, "mode": mode});
        let line = report_summary(&[
            entry("alice", "overdue", "enforce"),
            entry("alice", "overdue", "report_only"),
            entry("bob", "overdue", "report_only"),
            entry("bob", "grace", "enforce"),
        ]);
        assert!(line.starts_with("2 consumer(s) to enrol; "), "{line}");
        assert!(
            line.contains("1 entry overdue (refused with 403 enrollment_required)"),
            "{line}"
        );
        assert!(
            line.contains("2 overdue under report_only (forwarded, audited as would_refuse)"),
            "{line}"
        );
        assert!(line.contains("1 in grace"), "{line}");
        let line = report_summary(&[entry("carol", "grace", "enforce")]);
        assert!(
            line.contains("0 entries overdue") && !line.contains("report_only"),
            "{line}"
        );
    }

    #[test]
    fn wildcard_admin_addresses_are_reached_over_loopback() {
        assert_eq!(
            reachable("0.0.0.0:9901".parse().unwrap()).to_string(),
            "127.0.0.1:9901"
        );
        assert_eq!(
            reachable("[::]:9901".parse().unwrap()).to_string(),
            "[::1]:9901"
        );
        assert_eq!(
            reachable("10.0.0.5:9901".parse().unwrap()).to_string(),
            "10.0.0.5:9901"
        );
    }

    #[test]
    fn consumer_summaries() {
        let c = json!({
            "factors": [], "totp": {"status": "pending"},
            "keys": [{"prefix": "sgk_aaaaaaaa", "revoked_at": null},
                     {"prefix": "sgk_bbbbbbbb", "revoked_at": "2025-01-01T00:00:00Z"}]
        });
        assert_eq!(factors(&c), "totp (pending)");
        assert_eq!(live_keys(&c["keys"]), "sgk_aaaaaaaa (+1 revoked)");
        let c = json!({"factors": ["totp", "recovery_code"], "totp": {"status": "confirmed"}});
        assert_eq!(factors(&c), "totp,recovery_code");
        assert_eq!(totp_status(&Value::Null), "not enrolled");
    }
}
