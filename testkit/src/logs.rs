//! Captures everything the in-process gateway logs (every target, at trace level) into memory,
//! so a test can assert what reached the logs and, above all, what did not. The subscriber is
//! global and installed once per test process (nextest runs each test in its own process; under
//! `cargo test` the tests of one binary share the buffer, which only adds other tests' lines).

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

static BUFFER: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The captured log lines.
#[derive(Clone)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Starts capturing (once per process) and returns the capture.
pub fn capture() -> Logs {
    let buffer = BUFFER
        .get_or_init(|| {
            let buffer = Arc::new(Mutex::new(Vec::new()));
            let sink = Sink(buffer.clone());
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
                .with_ansi(false)
                .with_writer(move || sink.clone())
                .try_init()
                .expect("no other global tracing subscriber in a test process");
            buffer
        })
        .clone();
    Logs(buffer)
}
