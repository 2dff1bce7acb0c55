//! The one way the tests start a gateway: [`GatewayBuilder`]. A configuration (YAML, or a
//! directory already written), optionally a manual clock and a fixed admin port;
//! then [`start`](GatewayBuilder::start) (the public listener), [`start_admin`]
//! (with its admin API and token) or [`start_ops`] (with the handles `run` would keep).
//!
//! [`start_admin`]: GatewayBuilder::start_admin
//! [`start_ops`]: GatewayBuilder::start_ops

use std::path::PathBuf;
use std::sync::Arc;

use stepgate::clock::ManualClock;
use stepgate::server::Gateway;

use crate::ops::OpsGw;
use crate::{AdminGw, Gw, free_port, install_crypto, write_config};

pub struct GatewayBuilder {
    dir: tempfile::TempDir,
    clock: Option<Arc<ManualClock>>,
    fixed_admin: bool,
}

impl GatewayBuilder {
    /// `gateway.yaml` from `yaml`, with the public policy (`policies/public.yaml`).
    pub fn new(yaml: &str) -> Self {
        Self::in_dir(write_config(yaml))
    }

    /// A configuration written already (`gateway.yaml` in `dir`).
    pub fn in_dir(dir: tempfile::TempDir) -> Self {
        Self {
            dir,
            clock: None,
            fixed_admin: false,
        }
    }

    /// Time from `clock` instead of the system's.
    pub fn clock(mut self, clock: Arc<ManualClock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The admin API on a fixed free port written into `gateway.yaml` (for the CLI, which
    /// finds the admin API through the configuration); the configuration's admin line must
    /// say `listen: "127.0.0.1:0"`.
    pub fn fixed_admin_port(mut self) -> Self {
        self.fixed_admin = true;
        self
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("gateway.yaml")
    }

    /// Binds the gateway (not yet serving).
    async fn bind(&self) -> Gateway {
        install_crypto();
        let template = std::fs::read_to_string(self.path()).expect("read gateway.yaml");
        let mut last = String::new();
        // A fixed port may be taken between choosing and binding it: then another.
        for _ in 0..5 {
            if self.fixed_admin {
                let port = free_port();
                let fixed = template.replacen(
                    "listen: \"127.0.0.1:0\" }",
                    &format!("listen: \"127.0.0.1:{port}\" }}"),
                    1,
                );
                assert_ne!(
                    fixed, template,
                    "no `admin: {{ listen: \"127.0.0.1:0\" }}` to fix"
                );
                std::fs::write(self.path(), fixed).expect("write gateway.yaml");
            }
            let config = stepgate::config::load(&self.path()).unwrap_or_else(|e| {
                panic!(
                    "config failed to load:\n{e}\n--- gateway.yaml ---\n{}",
                    std::fs::read_to_string(self.path()).unwrap_or_default()
                )
            });
            let bound = match &self.clock {
                Some(clock) => Gateway::bind_with_clock(config, clock.clone()).await,
                None => Gateway::bind(config).await,
            };
            match bound {
                Ok(gateway) => {
                    let addr = gateway.local_addr();
                    assert_eq!(addr.ip().to_string(), "127.0.0.1");
                    assert_ne!(addr.port(), 0, "local_addr must report the real port");
                    return gateway;
                }
                Err(e @ stepgate::Error::Bind { .. }) if self.fixed_admin => last = e.to_string(),
                Err(e) => panic!("Gateway::bind failed: {e}"),
            }
        }
        panic!("could not bind a fixed admin port: {last}");
    }

    /// Binds and runs the gateway.
    pub async fn start(self) -> Gw {
        let gateway = self.bind().await;
        Gw::run(gateway, self.dir)
    }

    /// Binds and runs the gateway of a configuration with an `admin` section; the admin
    /// token is read from the data directory.
    pub async fn start_admin(self) -> AdminGw {
        let gateway = self.bind().await;
        AdminGw::run(gateway, self.dir)
    }

    /// [`start_admin`](Self::start_admin), keeping the reloader, metrics and accounts.
    pub async fn start_ops(self) -> OpsGw {
        let gateway = self.bind().await;
        OpsGw {
            reloader: gateway.reloader(),
            metrics: gateway.metrics(),
            accounts: gateway.accounts(),
            gw: AdminGw::run(gateway, self.dir),
        }
    }
}
