//! A real headless Chromium for browser tests, driven through chromedriver with fantoccini.
//!
//! [`Browser::start`] starts chromedriver on a free loopback port, waits for its `/status` to say
//! ready, and opens a session in Debian's Chromium with a fresh profile; dropping the
//! [`Browser`] kills chromedriver (and with it Chromium). Missing binaries are a test failure
//! that says to run `scripts/test`, never a skip.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// How long any wait for the page may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(15);

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A binary from `$var`, or the Debian path; panics with how to install it when absent.
fn binary(var: &str, default: &str, package: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    assert!(
        path.is_file(),
        "{} not found: this browser test needs Debian's `{package}` package. Run `scripts/test` \
         (it installs chromium and chromium-driver when missing), or \
         `apt-get install chromium chromium-driver`, or point {var} at the binary.",
        path.display()
    );
    path
}

/// chromedriver as a child process. On drop (also when a test panics) it ends the session, so
/// that chromedriver closes Chromium, then kills chromedriver and whatever is left of this
/// Chromium: killing chromedriver alone leaves Chromium running, orphaned.
struct Driver {
    child: Child,
    port: u16,
    log: PathBuf,
    /// The WebDriver session, once one is open.
    session: Option<String>,
    /// This browser's own `--user-data-dir`, which tells its processes from any other.
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(id) = &self.session {
            let _ = http_request(self.port, "DELETE", &format!("/session/{id}"));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_processes_with_arg(&format!("--user-data-dir={}", self.profile.display()));
    }
}

/// Kills (by PID) every process whose command line has exactly `arg`.
fn kill_processes_with_arg(arg: &str) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.split(|&b| b == 0).any(|a| a == arg.as_bytes()) {
            let _ = Command::new("kill")
                .args(["-KILL", pid])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Driver {
    fn start(dir: &Path, profile: &Path) -> Driver {
        let exe = binary(
            "STEPGATE_TEST_CHROMEDRIVER",
            CHROMEDRIVER,
            "chromium-driver",
        );
        // The port is picked free and handed to chromedriver; if another process takes it in
        // between, chromedriver exits and we try another.
        let mut last_error = String::new();
        for attempt in 0..5 {
            let port = free_port();
            let log = dir.join(format!("chromedriver-{attempt}.log"));
            let child = Command::new(&exe)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
            let mut driver = Driver {
                child,
                port,
                log,
                session: None,
                profile: profile.to_path_buf(),
            };
            match driver.wait_ready() {
                Ok(()) => return driver,
                Err(e) => last_error = e,
            }
        }
        panic!("chromedriver never became ready: {last_error}");
    }

    /// Polls `GET /status` until `value.ready` is true.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(code)) = self.child.try_wait() {
                return Err(format!(
                    "chromedriver exited ({code}); log:\n{}",
                    self.log_tail()
                ));
            }
            if let Some(body) = http_request(self.port, "GET", "/status")
                && let Ok(v) = serde_json::from_str::<Value>(&body)
                && v["value"]["ready"] == json!(true)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no ready /status on port {}; log:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// A minimal blocking HTTP/1.1 request without a body (chromedriver refuses HTTP/1.0); returns
/// the body. Reads by Content-Length: chromedriver does not close the connection after answering.
fn http_request(port: u16, method: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).ok()?;
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            });
            if len.is_some_and(|len| body.len() >= len) || (len.is_none() && n == 0) {
                return Some(body.to_string());
            }
        }
        if n == 0 {
            return None;
        }
    }
}

/// A headless Chromium session.
pub struct Browser {
    pub client: Client,
    /// Where Chromium saves downloads.
    pub downloads: PathBuf,
    driver: Driver,
    // Last: removed after chromedriver (and Chromium) are gone.
    dir: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a `width`×`height` viewport. Headless
    /// Chromium will not make a window narrower than 500 px, so a narrower viewport (a 320 px
    /// phone) is made with chromedriver's mobile emulation (fixed size: screenshots show
    /// `height` pixels).
    pub async fn start(width: u32, height: u32) -> Browser {
        let chromium = binary("STEPGATE_TEST_CHROMIUM", CHROMIUM, "chromium");
        let dir = tempfile::tempdir().expect("tempdir");
        let profile = dir.path().join("profile");
        let downloads = dir.path().join("downloads");
        std::fs::create_dir_all(&downloads).expect("mkdir downloads");
        let mut driver = Driver::start(dir.path(), &profile);

        // As root Chromium needs --no-sandbox; the rest stop it reaching for Google's servers,
        // which this machine's closed network refuses (it would hang or spam connections).
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-crash-reporter", "--disable-breakpad",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--disable-extensions", "--no-default-browser-check",
                    "--hide-scrollbars", "--force-device-scale-factor=1", "--lang=en-GB",
                    format!("--user-data-dir={}", profile.display()),
                    format!("--window-size={},{height}", width.max(500)),
                ],
                "prefs": {
                    "download.default_directory": downloads,
                    "download.prompt_for_download": false,
                    // Let tests read back what the page copied (clipboard-read is asked for
                    // otherwise, and headless has no one to answer).
                    "profile.default_content_setting_values.clipboard": 1,
                },
            },
        });
        let mut caps = caps;
        if width < 500 {
            caps["goog:chromeOptions"]["mobileEmulation"] = json!({
                "deviceMetrics": { "width": width, "height": height, "pixelRatio": 1.0 },
            });
        }
        let caps = match caps {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = tokio::time::timeout(
            WAIT * 2,
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&format!("http://127.0.0.1:{}", driver.port)),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no Chromium session in time; chromedriver log:\n{}",
                driver.log_tail()
            )
        })
        .unwrap_or_else(|e| {
            panic!(
                "cannot start Chromium: {e}; chromedriver log:\n{}",
                driver.log_tail()
            )
        });
        driver.session = client.session_id().await.ok().flatten();
        Browser {
            client,
            downloads,
            driver,
            dir,
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("navigate to {url}: {e}"));
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) and returns its value.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Waits until `script` returns a truthy value; returns it. Panics with `what` and the
    /// page's message region when it never does.
    pub async fn until(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.js(script, vec![]).await;
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!("") && v != json!(0);
            if truthy {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; page message: {:?}",
                    self.text("#message").await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The rendered text of the first element matching `css` (`None` if there is none).
    pub async fn text(&self, css: &str) -> Option<String> {
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => Some(e.text().await.unwrap_or_default()),
            Err(_) => None,
        }
    }

    /// Is the element matching `css` rendered (present, not `hidden`, has a box)?
    pub async fn visible(&self, css: &str) -> bool {
        self.js(
            "const e = document.querySelector(arguments[0]);
             return !!e && e.getClientRects().length > 0;",
            vec![json!(css)],
        )
        .await
            == json!(true)
    }

    /// Types `text` into the element matching `css`, as keystrokes.
    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"));
        e.send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    pub async fn click(&self, css: &str) {
        let e = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"));
        e.click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Saves a screenshot of the whole page to `target/test-artifacts/<name>` and returns the
    /// path. The window is made as tall as the page (plus the window's own chrome) and scrolled
    /// to the top first, so nothing is cut off.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let (width, _) = self.client.get_window_size().await.expect("window size");
        let height = self
            .js(
                "window.scrollTo(0, 0);
                 return Math.ceil(document.documentElement.scrollHeight
                                  + window.outerHeight - window.innerHeight);",
                vec![],
            )
            .await
            .as_u64()
            .unwrap_or(900);
        let _ = self
            .client
            .set_window_size(width as u32, (height as u32).clamp(200, 8000))
            .await;
        self.js("window.scrollTo(0, 0);", vec![]).await;
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = artifacts_dir();
        std::fs::create_dir_all(&dir).expect("mkdir target/test-artifacts");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    /// Waits (bounded) for a finished download named `name` and returns its content.
    pub async fn downloaded(&self, name: &str) -> String {
        let path = self.downloads.join(name);
        let deadline = Instant::now() + WAIT;
        loop {
            // Chromium writes `<name>.crdownload` and renames it when complete.
            if let Ok(text) = std::fs::read_to_string(&path) {
                return text;
            }
            if Instant::now() > deadline {
                let seen: Vec<_> = std::fs::read_dir(&self.downloads)
                    .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
                    .unwrap_or_default();
                panic!(
                    "no download {name} in {}; found {seen:?}",
                    self.downloads.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ends the session (closes Chromium) before chromedriver is killed.
    pub async fn close(self) {
        let Browser {
            client,
            driver,
            dir,
            ..
        } = self;
        let _ = tokio::time::timeout(WAIT, client.close()).await;
        drop(driver);
        drop(dir);
    }
}

/// `target/test-artifacts` of this crate (CARGO_TARGET_DIR is honoured).
pub fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(crate::target_dir);
    target.join("test-artifacts")
}
