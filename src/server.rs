//! The listener: accepts TCP connections (at most `limits.max_connections` at once), terminates
//! TLS when configured, and serves HTTP/1.1, HTTP/2 over TLS (ALPN) and h2c with prior
//! knowledge on each through hyper-util's auto builder. Shutdown stops accepting, lets in-flight
//! requests finish up to `limits.drain_timeout`, then cuts what is left.

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use arc_swap::ArcSwap;
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::accounts::Accounts;
use crate::admin::{self, Admin};
use crate::approvals::{ApprovalStore, Approvals, LocalApprovals, RedisApprovals, SqliteApprovals};
use crate::audit::{Audit, AuditLog};
use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, Limits, StoreSettings};
use crate::connection::{Activity, Awaiting, ConnInfo, Tracked};
use crate::context::Context as RequestContext;
use crate::limiter::{AttemptLimiter, LimiterWriter, LocalLimiter, RedisLimiter};
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::secrets::{AdminToken, MasterKey};
use crate::sms::{LocalSendBudget, RedisSendBudget, SendBudget};
use crate::snapshot::{ConfigHandle, Snapshot};
use crate::startup::Error;
use crate::store::ChangeFeed;
use crate::store::Store;
use crate::store::redis::{Redis, RedisStore};
use crate::store::sqlite::SqliteStore;
use crate::tokens::{LocalTokens, RedisTokens, TokenStore};

/// How often key "last used" times are written and expired step-up tokens swept.
const HOUSEKEEPING: Duration = Duration::from_secs(30);

/// A bound, not yet serving, gateway.
pub struct Gateway {
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    config: ConfigHandle,
    accounts: Arc<Accounts>,
    /// The store's changes, subscribed to before the directory loaded.
    changes: ChangeFeed,
    limiter: Arc<dyn AttemptLimiter>,
    limiter_writer: LimiterWriter,
    sends: Arc<dyn SendBudget>,
    approvals: Arc<Approvals>,
    metrics: Arc<Metrics>,
    reloader: Arc<Reloader>,
    watcher: Option<crate::reload::Watcher>,
    admin_token: AdminToken,
    shutdown: CancellationToken,
}

impl Gateway {
    /// Opens the data directory and store, loads consumers, and binds the listeners.
    pub async fn bind(config: Config) -> Result<Self, Error> {
        Self::bind_with_clock(config, Arc::new(SystemClock)).await
    }

    /// [`bind`](Self::bind) with an injected clock (tests move time instead of sleeping).
    pub async fn bind_with_clock(config: Config, clock: SharedClock) -> Result<Self, Error> {
        crate::tls::install_default_provider();
        let snapshot = Snapshot::build(config);
        let data_dir = snapshot.data_dir.clone();
        let master = MasterKey::load_or_create(&data_dir)?;
        let admin_token = AdminToken::load_or_create(&data_dir)?;
        let sqlite_path = match &snapshot.store {
            StoreSettings::Sqlite { path } => Some(path.clone()),
            StoreSettings::Redis(_) => None,
        };
        let (store, redis): (Arc<dyn Store>, Option<Redis>) = match snapshot.store.clone() {
            StoreSettings::Sqlite { path } => (
                Arc::new(
                    tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                        .await
                        .map_err(|e| Error::Io(std::io::Error::other(e)))??,
                ),
                None,
            ),
            StoreSettings::Redis(settings) => {
                let redis = Redis::connect(&settings).await?;
                tracing::info!(url = settings.url.as_str(), "store: Redis");
                (Arc::new(RedisStore::new(redis.clone())), Some(redis))
            }
        };
        // Subscribed before the directory loads, so that no change made meanwhile is missed.
        let changes = store.changes();
        let audit = Audit::new(
            AuditLog::start(store.clone(), snapshot.audit_sink.clone()),
            clock.clone(),
        );
        let (tokens, sends, approval_store): (
            Arc<dyn TokenStore>,
            Arc<dyn SendBudget>,
            Arc<dyn ApprovalStore>,
        ) = match &redis {
            Some(redis) => (
                Arc::new(RedisTokens::start(redis.clone())),
                Arc::new(RedisSendBudget::new(redis.clone())),
                Arc::new(RedisApprovals::new(redis.clone())),
            ),
            None => (
                Arc::new(LocalTokens::new()),
                Arc::new(LocalSendBudget::new()),
                match sqlite_path {
                    Some(path) => Arc::new(
                        tokio::task::spawn_blocking(move || SqliteApprovals::open(&path))
                            .await
                            .map_err(|e| Error::Io(std::io::Error::other(e)))??,
                    ),
                    None => Arc::new(LocalApprovals::new()),
                },
            ),
        };
        let approval_audit = audit.clone();
        let accounts = Arc::new(
            Accounts::open(
                store.clone(),
                Arc::new(master),
                clock.clone(),
                audit,
                tokens,
            )
            .await?,
        );
        // Bans (and counts) from before a restart are in force again before the first request.
        let (limiter, limiter_writer): (Arc<dyn AttemptLimiter>, LimiterWriter) = match redis {
            Some(redis) => {
                let (limiter, writer) = RedisLimiter::start(redis, clock.clone(), store).await?;
                (Arc::new(limiter), writer)
            }
            None => {
                let (limiter, writer) = LocalLimiter::persistent(clock.clone(), store).await?;
                (Arc::new(limiter), writer)
            }
        };
        let metrics = Metrics::new();
        let approvals = Arc::new(Approvals::new(
            approval_store,
            approval_audit,
            clock.clone(),
            metrics.clone(),
        ));

        let addr = snapshot.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let admin_listener = match snapshot.admin {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Bind { addr, source })?,
            ),
            None => None,
        };
        tracing::info!(consumers = accounts.directory().count(), "consumers loaded");
        let config: ConfigHandle = Arc::new(ArcSwap::from_pointee(snapshot));
        let reloader = Arc::new(Reloader::new(config.clone(), metrics.clone(), clock));
        let watcher = crate::reload::Watcher::new(reloader.clone());
        Ok(Self {
            listener,
            admin_listener,
            config,
            accounts,
            changes,
            limiter,
            limiter_writer,
            sends,
            approvals,
            metrics,
            reloader,
            watcher,
            admin_token,
            shutdown: CancellationToken::new(),
        })
    }

    /// Where the master key, admin token and (by default) the database are.
    pub fn data_dir(&self) -> std::path::PathBuf {
        self.config.load().data_dir.clone()
    }

    /// The admin API's address, when the config has an `admin` section.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn accounts(&self) -> Arc<Accounts> {
        self.accounts.clone()
    }

    pub fn limiter(&self) -> Arc<dyn AttemptLimiter> {
        self.limiter.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The reload path shared by file watching, SIGHUP and `POST /reload`.
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.config.load().listen)
    }

    /// Cancel it to shut down gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The configuration in force; storing a new snapshot applies it from the next request.
    pub fn config(&self) -> ConfigHandle {
        self.config.clone()
    }

    /// Serves until the shutdown token is cancelled, then drains.
    ///
    /// The public listener is served by `limits.workers` threads, each running its own
    /// single-threaded event loop over a handle to the same listening socket: a connection
    /// and everything it causes (its requests, their upstream connections from the worker's
    /// own pool, its timers) stay on one thread, so the request path never wakes another
    /// thread and never contends for a lock with one. Background work (admin API, reloads,
    /// housekeeping, audit writes) stays on the caller's runtime.
    pub async fn run(self) -> Result<(), Error> {
        let Gateway {
            listener,
            admin_listener,
            config,
            accounts,
            changes,
            limiter,
            limiter_writer,
            sends,
            approvals,
            metrics,
            reloader,
            watcher,
            admin_token,
            shutdown,
        } = self;
        let background = TaskTracker::new();
        // Stopped only once no request can fail any more (after the drain), so that the
        // failures of the last requests are written too.
        let writer_stop = CancellationToken::new();
        background.spawn(limiter_writer.run(writer_stop.clone()));
        if let Some(admin_listener) = admin_listener {
            let admin = Arc::new(Admin {
                accounts: accounts.clone(),
                approvals: approvals.clone(),
                limiter: limiter.clone(),
                metrics: metrics.clone(),
                reloader: reloader.clone(),
                token: admin_token,
                config: config.clone(),
            });
            background.spawn(admin::serve(admin_listener, admin, shutdown.clone()));
        }
        background.spawn(housekeeping(
            accounts.clone(),
            approvals.clone(),
            shutdown.clone(),
        ));
        // Changes made by other nodes sharing the store (and this node's own, already applied).
        background.spawn(
            accounts
                .directory()
                .clone()
                .follow(changes, shutdown.clone()),
        );
        if let Some(watcher) = watcher {
            background.spawn(watcher.run(shutdown.clone()));
        }
        let limits = config.load().limits.clone();
        let service = crate::stack::build(crate::stack::Shared {
            accounts: accounts.clone(),
            limiter: limiter.clone(),
            metrics: metrics.clone(),
            sends,
            approvals: approvals.clone(),
        });
        let shared = Arc::new(WorkerShared {
            config: config.clone(),
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            connections: TaskTracker::new(),
            graceful: shutdown.clone(),
            hard_stop: CancellationToken::new(),
        });
        let listener = listener.into_std()?;
        let mut workers = Vec::with_capacity(limits.workers);
        let (accepting_tx, mut accepting) = tokio::sync::mpsc::channel(limits.workers);
        for index in 0..limits.workers {
            let started = listener.try_clone().map_err(Error::from).and_then(|l| {
                Worker::start(
                    index,
                    l,
                    shared.clone(),
                    service.clone(),
                    accepting_tx.clone(),
                )
            });
            match started {
                Ok(worker) => workers.push(worker),
                Err(error) => {
                    shutdown.cancel();
                    shared.connections.close();
                    for worker in workers {
                        worker.stopped.await.ok();
                    }
                    return Err(error);
                }
            }
        }
        drop(listener);
        drop(accepting_tx);

        // Every worker stops accepting once shutdown is asked for. One that stops on its own
        // (short of a bug it cannot) shuts the whole gateway down rather than leaving it
        // serving on with fewer threads unnoticed.
        let mut stopped_accepting = 0;
        tokio::select! {
            () = shutdown.cancelled() => {}
            _ = accepting.recv() => {
                stopped_accepting += 1;
                if !shutdown.is_cancelled() {
                    tracing::error!("a worker stopped unexpectedly; shutting down");
                    shutdown.cancel();
                }
            }
        }
        while stopped_accepting < workers.len() && accepting.recv().await.is_some() {
            stopped_accepting += 1;
        }
        let tracker = &shared.connections;
        tracker.close();
        tracing::info!(
            connections = tracker.len(),
            drain = ?limits.drain_timeout,
            "shutting down: draining"
        );
        if tokio::time::timeout(limits.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = tracker.len(),
                "drain deadline passed; closing the rest"
            );
            shared.hard_stop.cancel();
            tracker.wait().await;
        }
        for worker in workers {
            worker.stopped.await.ok();
        }
        writer_stop.cancel();
        background.close();
        background.wait().await;
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// What the workers share.
struct WorkerShared {
    config: ConfigHandle,
    /// `limits.max_connections`, over all workers.
    slots: Arc<Semaphore>,
    connections: TaskTracker,
    graceful: CancellationToken,
    /// Cancelled when the drain deadline passes: connections still open are then dropped.
    hard_stop: CancellationToken,
}

/// A thread with its own event loop, accepting from the shared listening socket.
struct Worker {
    /// Fires when the worker's thread is done (its connections all closed).
    stopped: tokio::sync::oneshot::Receiver<()>,
}

impl Worker {
    fn start<S>(
        index: usize,
        listener: std::net::TcpListener,
        shared: Arc<WorkerShared>,
        service: S,
        stopped_accepting: tokio::sync::mpsc::Sender<()>,
    ) -> Result<Worker, Error>
    where
        S: GatewayService,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stopped_tx, stopped) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("stepgate-worker-{index}"))
            .spawn(move || {
                // Reports the end of accepting however it comes, a panic included.
                let stopped_accepting = SendOnDrop(stopped_accepting);
                runtime.block_on(async move {
                    tokio::spawn(sweep_idle_connections(shared.clone()));
                    match TcpListener::from_std(listener) {
                        Ok(listener) => accept_loop(listener, &shared, service).await,
                        Err(error) => tracing::error!(%error, "worker cannot use the listener"),
                    }
                    drop(stopped_accepting);
                    // A single-threaded runtime only runs its tasks inside `block_on`: keep
                    // driving this worker's connections until they have all drained.
                    shared.connections.wait().await;
                });
                let _ = stopped_tx.send(());
            })?;
        Ok(Worker { stopped })
    }
}

/// How often a worker closes the upstream connections it holds idle past their time.
const POOL_SWEEP: Duration = Duration::from_secs(5);

/// Runs on each worker (its pools are its own) until the worker's runtime goes.
async fn sweep_idle_connections(shared: Arc<WorkerShared>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(POOL_SWEEP) => {}
            () = shared.hard_stop.cancelled() => return,
        }
        let snapshot = shared.config.load_full();
        for upstream in snapshot.upstreams.values() {
            if let crate::upstream::Target::Http(http) = &upstream.target {
                http.sweep_idle();
            }
        }
    }
}

/// Sends `()` when dropped (the channel has room for one message per worker).
struct SendOnDrop(tokio::sync::mpsc::Sender<()>);

impl Drop for SendOnDrop {
    fn drop(&mut self) {
        let _ = self.0.try_send(());
    }
}

/// The service every connection serves.
trait GatewayService:
    tower::Service<
        Request<Incoming>,
        Response = http::Response<crate::error::Body>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send
    + 'static
{
}

impl<S> GatewayService for S where
    S: tower::Service<
            Request<Incoming>,
            Response = http::Response<crate::error::Body>,
            Error = std::convert::Infallible,
            Future: Send,
        > + Clone
        + Send
        + 'static
{
}

async fn accept_loop<S: GatewayService>(listener: TcpListener, shared: &WorkerShared, service: S) {
    let shutdown = &shared.graceful;
    loop {
        let slot = tokio::select! {
            slot = shared.slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            () = shutdown.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let snapshot = shared.config.load_full();
        let connection = Connection {
            peer,
            config: shared.config.clone(),
            limits: snapshot.limits.clone(),
            tls: snapshot.tls.clone().map(TlsAcceptor::from),
            // Tokens of its own: a connection's task polls them on every wake-up, and polling a
            // token locks its waiter list; shared tokens would make that one lock for all
            // connections on every request. A child is told when its parent is cancelled.
            graceful: shutdown.child_token(),
            hard_stop: shared.hard_stop.child_token(),
        };
        let service = service.clone();
        shared.connections.spawn(async move {
            connection.serve(stream, service).await;
            drop(slot);
        });
    }
}

/// Housekeeping off the request path: writes API-key "last used" times in batches (and once
/// more at shutdown) and sweeps expired step-up tokens.
async fn housekeeping(
    accounts: Arc<Accounts>,
    approvals: Arc<Approvals>,
    shutdown: CancellationToken,
) {
    loop {
        let stop = tokio::select! {
            () = tokio::time::sleep(HOUSEKEEPING) => false,
            () = shutdown.cancelled() => true,
        };
        if let Err(error) = accounts.directory().flush_key_use().await {
            tracing::warn!(%error, "could not record API key use");
        }
        accounts.tokens().sweep(accounts.now());
        if let Err(error) = approvals.expire().await {
            tracing::warn!(%error, "could not expire requests for approval");
        }
        if stop {
            return;
        }
    }
}

struct Connection {
    peer: SocketAddr,
    config: ConfigHandle,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    graceful: CancellationToken,
    hard_stop: CancellationToken,
}

impl Connection {
    async fn serve<S: GatewayService>(self, stream: TcpStream, service: S) {
        let _ = stream.set_nodelay(true);
        let info = Arc::new(ConnInfo::new(self.peer, self.tls.is_some()));
        let conn = info.clone();
        let activity = info.activity.clone();
        let config = self.config.clone();
        // Each request starts with its context: the configuration read once (the request
        // keeps this snapshot to its end, whatever a reload does meanwhile) and the
        // connection's facts. Without it (never, from the listener) the layers refuse it.
        let awaiting = activity.clone();
        let service = service
            .map_request(move |mut request: Request<Incoming>| {
                let context = RequestContext::new(config.load_full(), info.clone());
                request.extensions_mut().insert(context);
                request
            })
            // A request waiting for its answer's head is not idle, however long its upstream
            // takes: the upstream's own `timeout` bounds that.
            .map_future(move |future| {
                let waiting = Awaiting::start(awaiting.clone());
                async move {
                    let response = future.await;
                    drop(waiting);
                    response
                }
            });
        match &self.tls {
            None => self.drive(stream, service, activity).await,
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(self.limits.header_read_timeout, acceptor.accept(stream));
                match handshake.await {
                    Ok(Ok(tls)) => self.drive(tls, service, activity).await,
                    Ok(Err(error)) => {
                        tracing::debug!(peer = %self.peer, %error, "TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(peer = %self.peer, "TLS handshake timed out"),
                }
            }
        }
        // A WebSocket upgrade handed the connection over: it lives on as the tunnel, in this
        // task, until the tunnel ends or the drain deadline passes.
        if let Some(tunnel) = conn.take_tunnel() {
            tokio::select! {
                () = tunnel => {}
                () = self.hard_stop.cancelled() => {
                    tracing::debug!(peer = %self.peer, "tunnel cut at the drain deadline");
                }
            }
        }
    }

    async fn drive<I, S>(&self, io: I, service: S, activity: Arc<Activity>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: GatewayService,
    {
        let io = TokioIo::new(Tracked::connection(io, activity.clone()));
        let builder = builder(&self.limits);
        // With upgrades: a WebSocket route's `101` hands the connection to its tunnel (see
        // `proxy::tunnel`); hyper upgrades nothing else (other CONNECTs are refused before
        // routing).
        let connection =
            builder.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
        tokio::pin!(connection);

        // The idle timeout is checked IDLE_TICKS times per period, against a flag the I/O sets:
        // reading the clock on every read and write instead cost a clock read per I/O call.
        let tick = (self.limits.idle_timeout / IDLE_TICKS).max(Duration::from_millis(1));
        let mut quiet_ticks = 0;
        let mut closing = false;
        loop {
            tokio::select! {
                // In order, not in random order: a random start costs a thread-local RNG draw
                // per wake-up, and no branch can starve another (the connection's branch ends
                // the loop; the others are polled whenever it is pending).
                biased;
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(peer = %self.peer, %error, "connection ended with an error");
                    }
                    return;
                }
                () = self.graceful.cancelled(), if !closing => {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
                () = tokio::time::sleep(tick) => {
                    quiet_ticks = if activity.take() || activity.awaiting() {
                        0
                    } else {
                        quiet_ticks + 1
                    };
                    if quiet_ticks >= IDLE_TICKS {
                        // Asked to close and still moving nothing: a response stalled mid-body
                        // (an upstream that stopped sending) would keep an HTTP/1.1 connection
                        // waiting for its end forever, so it is cut.
                        if closing {
                            tracing::debug!(peer = %self.peer, "idle connection cut");
                            return;
                        }
                        // A graceful close first: an idle keep-alive connection just closes,
                        // HTTP/2 gets its GOAWAY. One more quiet tick and it is cut.
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                        quiet_ticks = IDLE_TICKS - 1;
                    }
                }
                // The hard stop comes only after the graceful one (drain timeout).
                () = self.hard_stop.cancelled(), if closing => return,
            }
        }
    }
}

/// The longest request target hyper parses before answering 414 itself (hyper's own limit).
const HYPER_MAX_URI: usize = 65_534;

/// hyper's own limits are a backstop a little above ours, so that our guard, not hyper, answers
/// with the documented problem+json in all but pathological cases. The read buffer holds a
/// head whose request target is as long as hyper parses at all, so that a long target is a
/// 414 (ours up to a little past `uri_bytes`, hyper's beyond), not a 431 because the buffer
/// filled before the request line ended; only a head longer than all of that is a 431.
fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let head_bytes =
        limits.uri_bytes.max(HYPER_MAX_URI) + limits.header_bytes + 4 * limits.header_count + 1024;
    builder
        .http1()
        // The connection's own: it keeps one timer for the header-read timeout of every
        // request head, instead of hyper arming and dropping one per head.
        .timer(crate::timer::HeaderReadTimer::default())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.header_count + 16)
        .max_buf_size(head_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(
            u32::try_from(head_bytes + 32 * limits.header_count).unwrap_or(u32::MAX),
        )
        .max_concurrent_streams(256)
        // WebSocket over HTTP/2 (RFC 8441): refused before routing on any other route.
        .enable_connect_protocol();
    builder
}

/// Checks of the idle timeout per period: a connection is asked to close between
/// `idle_timeout` and `idle_timeout * (1 + 1 / IDLE_TICKS)` after its last byte, and cut one
/// quiet tick later if it has not closed by then.
const IDLE_TICKS: u32 = 4;
