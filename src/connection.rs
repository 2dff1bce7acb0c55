//! What the gateway knows about a client connection, shared by its requests: the peer and
//! whether it came over TLS, values formatted once per connection, what its I/O has seen
//! (bytes moving, requests awaiting an answer, the head just read), and the client's address
//! once resolved.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use pin_project_lite::pin_project;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Facts about the connection a request arrived on, shared by its requests' contexts.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The peer's address as a header value, formatted once per connection (it is the
    /// `X-Forwarded-For` of nearly every request).
    pub peer_ip: http::HeaderValue,
    /// The peer as a `Forwarded` node, formatted once per connection too.
    pub peer_node: Arc<str>,
    /// What the connection's I/O has seen: bytes moving, requests awaiting their answer, and
    /// framing the HTTP/1.1 parser decided on its own.
    pub activity: Arc<Activity>,
    /// The `Forwarded` element of the last host requested on this connection (nearly always
    /// the host of every request on it), made once rather than per request.
    forwarded: std::sync::Mutex<Option<(http::HeaderValue, http::HeaderValue)>>,
    /// The last host canonicalised on this connection, by the bytes it was sent as: the
    /// requests of a connection nearly always name the same host, and checking its bytes
    /// again costs more than comparing them.
    host: std::sync::Mutex<Option<(Bytes, crate::host::Host)>>,
    /// What the connection becomes once hyper hands it over after a `101` (a WebSocket
    /// tunnel): run by the connection's own task, so that it counts against
    /// `limits.max_connections` and the drain like the connection it was.
    tunnel: HandedOver,
    /// The timer of its requests' upstream timeouts, kept between them (see
    /// [`timer`](crate::timer)).
    pub upstream_timer: crate::timer::Timer,
}

/// A tunnel to run when the connection's HTTP ends.
pub type Tunnel = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

#[derive(Default)]
struct HandedOver(std::sync::Mutex<Option<Tunnel>>);

impl std::fmt::Debug for HandedOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandedOver")
    }
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        let peer_ip = http::HeaderValue::try_from(peer.ip().to_string())
            .unwrap_or_else(|_| http::HeaderValue::from_static("unknown"));
        let peer_node = Arc::from(forwarded_node(peer.ip()));
        Self {
            peer,
            tls,
            peer_ip,
            peer_node,
            activity: Arc::new(Activity::default()),
            forwarded: std::sync::Mutex::new(None),
            host: std::sync::Mutex::new(None),
            tunnel: HandedOver::default(),
            upstream_timer: crate::timer::Timer::default(),
        }
    }

    /// Leaves the tunnel the connection becomes after its upgrade (see [`Tunnel`]).
    pub fn hand_over(&self, tunnel: Tunnel) {
        *self.tunnel.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(tunnel);
    }

    /// The tunnel left by [`hand_over`](Self::hand_over), if any.
    pub fn take_tunnel(&self) -> Option<Tunnel> {
        self.tunnel
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// `canonicalize` of `raw`, the host as this connection's request sent it, remembered for
    /// the next request that sends the same bytes.
    pub fn canonical_host(
        &self,
        raw: &[u8],
        canonicalize: impl FnOnce() -> Result<crate::host::Host, crate::host::HostError>,
    ) -> Result<crate::host::Host, crate::host::HostError> {
        let mut cached = self.host.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((bytes, host)) = cached.as_ref()
            && bytes.as_ref() == raw
        {
            return Ok(host.clone());
        }
        let host = canonicalize()?;
        *cached = Some((Bytes::copy_from_slice(raw), host.clone()));
        Ok(host)
    }

    /// This gateway's `Forwarded` element (RFC 7239) for a request with `host` on this
    /// connection: `for=<peer>;proto=<http|https>[;host="<host>"]`.
    pub fn forwarded_element(&self, host: Option<&http::HeaderValue>) -> http::HeaderValue {
        let mut cached = self.forwarded.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some((for_host, element)), Some(host)) = (cached.as_ref(), host)
            && for_host == host
        {
            return element.clone();
        }
        let proto = if self.tls { "https" } else { "http" };
        let mut text = format!("for={};proto={proto}", self.peer_node);
        if let Some(host) = host.and_then(|h| h.to_str().ok()) {
            text.push_str(";host=\"");
            text.push_str(host);
            text.push('"');
        }
        // An address, a token and a canonical host: visible ASCII.
        let element = http::HeaderValue::try_from(text)
            .unwrap_or_else(|_| http::HeaderValue::from_static("for=unknown"));
        if let Some(host) = host {
            *cached = Some((host.clone(), element.clone()));
        }
        element
    }
}

/// The client address the failure limiter and `X-Forwarded-For` use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp {
    pub ip: IpAddr,
    /// The peer is a trusted proxy: its `X-Forwarded-For` is extended, not replaced.
    pub via_trusted_proxy: bool,
}

/// What a connection's I/O and its requests have seen, shared by the I/O wrapper, the idle
/// check and the request path.
#[derive(Debug, Default)]
pub struct Activity {
    /// A byte moved since the idle check last looked.
    moved: AtomicBool,
    /// Requests of the connection waiting for their answer's head.
    awaiting: AtomicUsize,
    /// The bytes read since the request path last looked, while no request was in flight (so:
    /// request heads, not bodies), up to [`HEAD_KEPT`]. hyper's HTTP/1.1 parser, handed
    /// `Content-Length` and `Transfer-Encoding` together, drops the length and reads the body
    /// as chunked: the request it hands on no longer shows that its framing was ambiguous, but
    /// these bytes do.
    head: std::sync::Mutex<Vec<u8>>,
}

/// Head bytes kept per connection at most (a request head hyper accepts is smaller).
const HEAD_KEPT: usize = 128 * 1024;

impl Activity {
    pub fn touch(&self) {
        // Only the first I/O call after a check writes: the flag's cache line stays quiet.
        if !self.moved.load(Ordering::Relaxed) {
            self.moved.store(true, Ordering::Relaxed);
        }
    }

    /// Whether a byte moved since the last call.
    pub fn take(&self) -> bool {
        self.moved.swap(false, Ordering::Relaxed)
    }

    pub fn awaiting(&self) -> bool {
        self.awaiting.load(Ordering::Relaxed) > 0
    }

    /// Keeps bytes read while no request is in flight (a request head being read).
    pub fn keep_head(&self, bytes: &[u8]) {
        if bytes.is_empty() || self.awaiting() {
            return;
        }
        let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        if head.len() + bytes.len() <= HEAD_KEPT {
            head.extend_from_slice(bytes);
        }
    }

    /// Whether the request head just read had a `Content-Length` line (asked only of requests
    /// hyper read as chunked); forgets the head either way, for the next request.
    pub fn head_had_content_length(&self, asked: bool) -> bool {
        let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        let found = asked
            && head
                .split(|b| *b == b'\n')
                .skip(1)
                .take_while(|line| !line.is_empty() && *line != b"\r")
                .any(|line| {
                    line.get(..15)
                        .is_some_and(|name| name.eq_ignore_ascii_case(b"content-length:"))
                });
        head.clear();
        found
    }
}

/// Counts a request as awaiting its answer for as long as it lives.
pub struct Awaiting(Arc<Activity>);

impl Awaiting {
    pub fn start(activity: Arc<Activity>) -> Self {
        activity.awaiting.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for Awaiting {
    fn drop(&mut self) {
        self.0.awaiting.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project! {
    /// An IO stream that records activity on every successful read or write: a client
    /// connection's (which also keeps its request heads, see [`Activity::keep_head`]), or a
    /// tunnel's own (on HTTP/2 the connection's is shared by its other streams).
    pub struct Tracked<I> {
        #[pin]
        inner: I,
        activity: Arc<Activity>,
        keep_heads: bool,
    }
}

impl<I> Tracked<I> {
    /// A client connection's I/O.
    pub fn connection(inner: I, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            keep_heads: true,
        }
    }

    /// Any other stream whose bytes moving is all that is watched.
    pub fn watching(inner: I, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            keep_heads: false,
        }
    }
}

impl<I: AsyncRead> AsyncRead for Tracked<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = this.inner.poll_read(cx, buf);
        if result.is_ready() {
            this.activity.touch();
            if *this.keep_heads {
                this.activity.keep_head(&buf.filled()[before..]);
            }
        }
        result
    }
}

impl<I: AsyncWrite> AsyncWrite for Tracked<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let result = this.inner.poll_write(cx, buf);
        if result.is_ready() {
            this.activity.touch();
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let result = this.inner.poll_write_vectored(cx, bufs);
        if result.is_ready() {
            this.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The `Forwarded` node of an address: IPv6 in brackets, quoted (RFC 7239 §6).
pub fn forwarded_node(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_forwarded_nodes_are_bracketed_and_quoted() {
        assert_eq!(forwarded_node("::1".parse().unwrap()), r#""[::1]""#);
        assert_eq!(forwarded_node("192.0.2.1".parse().unwrap()), "192.0.2.1");
    }
}
