//! Why the gateway could not start, or a CLI command could not run.

use crate::config::ConfigErrors;

/// Start-up and CLI failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Secrets(#[from] crate::secrets::SecretsError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Accounts(#[from] crate::accounts::AccountError),
}
