//! rustls configuration for the listener (termination) and for https upstreams.
//!
//! One crypto provider, `ring`, for the whole binary: it builds in about half the time of
//! aws-lc-rs on this project's build machines and needs no cmake; see README.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The provider every rustls config here is built with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes `ring` the process default too, for code that asks rustls for the default provider.
pub fn install_default_provider() {
    // Err only means a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Which of the two files was at fault, with a message for the operator.
#[derive(Debug)]
pub enum TlsFileError {
    Cert(String),
    Key(String),
}

/// TLS 1.2 and 1.3 (rustls has nothing older), ALPN `h2` then `http/1.1`, no 0-RTT (early
/// data is replayable, and replays are exactly what a second factor must not allow).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsFileError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsFileError::Cert(format!("cannot read {}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsFileError::Cert(format!("bad PEM in {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(TlsFileError::Cert(format!(
            "no certificate found in {}",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        TlsFileError::Key(format!(
            "cannot read a private key from {}: {e}",
            key.display()
        ))
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFileError::Cert(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            rustls::Error::InvalidCertificate(_) => {
                TlsFileError::Cert(format!("not a usable certificate: {e}"))
            }
            e => TlsFileError::Key(format!("key does not fit the certificate: {e}")),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// The connector of outgoing http(s) connections (upstreams, the SMS provider, the approval
/// webhook): TCP with `TCP_NODELAY` and a connect timeout, then TLS with `tls` for https
/// URLs, offering HTTP/1.1 by ALPN, and HTTP/2 too when `offer_http2` (not for a WebSocket
/// upgrade, which HTTP/2 cannot carry as HTTP/1.1 does).
pub fn https_connector(
    tls: rustls::ClientConfig,
    connect_timeout: std::time::Duration,
    offer_http2: bool,
) -> hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector> {
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1();
    let tcp = tcp_connector(connect_timeout);
    if offer_http2 {
        builder.enable_http2().wrap_connector(tcp)
    } else {
        builder.wrap_connector(tcp)
    }
}

fn tcp_connector(
    connect_timeout: std::time::Duration,
) -> hyper_util::client::legacy::connect::HttpConnector {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http
}

/// Client config for https upstreams: the Mozilla roots from `webpki-roots`, or only the
/// certificates in `ca_file` when one is configured.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(file) => {
            let certs = CertificateDer::pem_file_iter(file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("bad PEM in {}: {e}", file.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("bad certificate in {}: {e}", file.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("no certificate found in {}", file.display()));
            }
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
