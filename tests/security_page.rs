//! The security page (`GET /_stepgate/`) in a real headless Chromium, driven over WebDriver
//! (chromedriver + fantoccini) against an in-process gateway with an injected clock. Codes are
//! computed independently with oathtool from the secret the page shows.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/test` installs them); without them
//! these tests fail, saying so.

use serde_json::{Value, json};
use stepgate_testkit::browser::Browser;
use stepgate_testkit::*;

const PAGE: &str = "/_stepgate/";

/// The exact policy of the contract (`.notes/selfservice-contract.md`, DESIGN.md §6).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `abcdef-ghijkl-mnopqr-stuvwx`: four groups of six base32 letters.
fn is_recovery_code(code: &str) -> bool {
    let groups: Vec<&str> = code.split('-').collect();
    groups.len() == 4
        && groups.iter().all(|g| {
            g.len() == 6
                && g.bytes()
                    .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
        })
}

fn page_url(gw: &TwoFactor, page: &str) -> String {
    format!("http://{}{page}", gw.addr())
}

/// `GET {prefix}/2fa` as the consumer, straight to the gateway (not through the page).
async fn api_status(tf: &TwoFactor, prefix: &str, key: &str) -> Value {
    let r = get_keyed(tf.addr(), &format!("{prefix}2fa"), key).await;
    assert_eq!(r.status, 200, "GET 2fa: {}", r.text());
    r.json()
}

/// Records Content-Security-Policy violations from now on (`window.__cspViolations`).
async fn watch_csp(b: &Browser) {
    b.js(
        "window.__cspViolations = [];
         document.addEventListener('securitypolicyviolation',
           (e) => window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));",
        vec![],
    )
    .await;
}

async fn assert_no_csp_violations(b: &Browser) {
    let v = b.js("return window.__cspViolations;", vec![]).await;
    assert_eq!(v, json!([]), "the page broke its own CSP");
}

/// The page loaded under the CSP: app.js ran (it hides the "needs JavaScript" note and shows
/// the key form), app.css applied, and the markup has no inline script, style or handler.
async fn assert_page_loaded_cleanly(b: &Browser) {
    b.until(
        "app.js to run",
        "return document.getElementById('needs-js').hidden
                && !document.getElementById('key-section').hidden;",
    )
    .await;
    watch_csp(b).await;
    let checks = b
        .js(
            "return {
               inlineScripts: document.querySelectorAll('script:not([src])').length,
               styleAttrs: document.querySelectorAll('[style]').length,
               styleElements: document.querySelectorAll('style').length,
               handlers: [...document.querySelectorAll('*')]
                 .flatMap((e) => [...e.attributes].map((a) => a.name))
                 .filter((n) => n.startsWith('on')),
               stylesheetApplied: getComputedStyle(document.body).maxWidth !== 'none',
               external: [...document.querySelectorAll('[src],[href]')]
                 .map((e) => e.src || e.href)
                 .filter((u) => !u.startsWith(location.origin)),
             };",
            vec![],
        )
        .await;
    assert_eq!(checks["inlineScripts"], 0, "inline <script>: {checks}");
    assert_eq!(checks["styleAttrs"], 0, "style= attributes: {checks}");
    assert_eq!(checks["styleElements"], 0, "<style> elements: {checks}");
    assert_eq!(checks["handlers"], json!([]), "on*= handlers: {checks}");
    assert_eq!(checks["stylesheetApplied"], true, "app.css not applied");
    assert_eq!(checks["external"], json!([]), "non-same-origin resources");
}

/// Pastes `key` and loads the settings; waits for the overview of `consumer`.
async fn sign_in(b: &Browser, key: &str, consumer: &str) {
    b.type_into("#api-key", key).await;
    b.click("#load").await;
    b.until(
        "the settings to load",
        "return !document.getElementById('account').hidden",
    )
    .await;
    assert_eq!(b.text("#consumer-name").await.as_deref(), Some(consumer));
    // The key left the DOM as soon as it was read.
    let value = b
        .js("return document.getElementById('api-key').value;", vec![])
        .await;
    assert_eq!(value, json!(""));
}

/// Empties the message region, so that the next message can be waited for.
async fn clear_message(b: &Browser) {
    b.js(
        "const m = document.getElementById('message'); m.textContent = ''; m.dataset.kind = '';",
        vec![],
    )
    .await;
}

/// Waits for the next message; returns its text and kind (`ok`, `info` or `error`).
async fn next_message(b: &Browser) -> (String, String) {
    let text = b
        .until(
            "a message",
            "return document.getElementById('message').textContent;",
        )
        .await;
    let kind = b
        .js(
            "return document.getElementById('message').dataset.kind;",
            vec![],
        )
        .await;
    (
        text.as_str().unwrap().to_string(),
        kind.as_str().unwrap_or_default().to_string(),
    )
}

/// Clicks `css` and returns the message that follows.
async fn message_after_click(b: &Browser, css: &str) -> (String, String) {
    clear_message(b).await;
    b.click(css).await;
    next_message(b).await
}

/// The TOTP secret the page shows once set-up has started.
async fn secret_on_page(b: &Browser) -> String {
    b.until(
        "the secret",
        "return document.getElementById('totp-secret').textContent;",
    )
    .await
    .as_str()
    .unwrap()
    .to_string()
}

async fn recovery_codes_on_page(b: &Browser) -> Vec<String> {
    let v = b
        .until(
            "10 recovery codes",
            "const li = document.querySelectorAll('#recovery-codes li');
             return li.length === 10 && [...li].map((e) => e.textContent.trim());",
        )
        .await;
    serde_json::from_value(v).unwrap()
}

/// The page and its two files, as the gateway serves them: the exact CSP, nosniff and the
/// other security headers on each, the right content types (nosniff makes them binding), and
/// HTML that references only relative, same-origin files with no inline code.
#[tokio::test]
async fn page_and_assets_carry_the_security_headers() {
    let tf = TwoFactor::start().await;
    for (path, content_type) in [
        (PAGE, "text/html"),
        ("/_stepgate/app.js", "text/javascript"),
        ("/_stepgate/app.css", "text/css"),
    ] {
        let r = get(tf.addr(), path, "api.example.com").await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let ct = r.header("content-type").unwrap_or_default();
        assert!(ct.starts_with(content_type), "{path}: content-type {ct}");
        assert_eq!(r.header("content-security-policy"), Some(CSP), "{path}");
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{path}");
        assert_eq!(r.header("x-frame-options"), Some("DENY"), "{path}");
    }
    let html = get(tf.addr(), PAGE, "api.example.com").await.text();
    assert!(
        html.contains("<title>Security · stepgate</title>"),
        "the default title"
    );
    assert!(!html.contains("{{"), "no placeholder left");
    assert!(html.contains(r#"<script src="app.js" defer></script>"#));
    assert!(html.contains(r#"<link rel="stylesheet" href="app.css">"#));
    assert_eq!(html.matches("<script").count(), 1, "one script, app.js");
    for banned in [
        " style=",
        "<style",
        " onclick=",
        " onload=",
        " onsubmit=",
        "http://",
        "https://",
    ] {
        assert!(!html.contains(banned), "the page contains {banned:?}");
    }
}

/// The whole enrolment in the browser: paste the key, start authenticator set-up, read the
/// secret off the page, compute the code with oathtool at the gateway's clock, confirm it
/// (after a wrong one is refused in words), and get 10 recovery codes that really work; copy,
/// download and regenerate them with a current code; nothing is stored in the browser, and
/// "Forget key" leaves nothing behind.
#[tokio::test]
async fn enrol_an_authenticator_app_in_chromium() {
    let started = std::time::Instant::now();
    let tf = TwoFactor::start().await;
    let alice = tf.consumer("alice", &["partner"]).await;
    let b = Browser::start(1024, 900).await;
    b.goto(&page_url(&tf, PAGE)).await;
    assert_page_loaded_cleanly(&b).await;
    // The key field is no password field (a password manager would offer to save the key),
    // but masked, and kept out of autofill and spell checking.
    let field = b
        .js(
            "const i = document.getElementById('api-key');
             return [i.type, i.autocomplete, i.spellcheck,
                     getComputedStyle(i).webkitTextSecurity];",
            vec![],
        )
        .await;
    assert_eq!(field, json!(["text", "off", false, "disc"]), "{field}");

    sign_in(&b, &alice.key, "alice").await;
    assert_eq!(b.text("#st-totp").await.as_deref(), Some("Not set up"));
    // A report_only policy is worded as letting calls through; an enforced one as refusing.
    let policy_text = |name: &'static str| {
        let b = &b;
        async move {
            b.until(
                "the policy list",
                &format!(
                    "const li = [...document.querySelectorAll('#policies li')]
                       .find((e) => e.textContent.startsWith('{name}:'));
                     return li && li.textContent;"
                ),
            )
            .await
            .as_str()
            .unwrap()
            .to_string()
        }
    };
    // A policy with a description is shown by it, not by its file name.
    let report = policy_text("Monthly reports").await;
    assert!(
        report.contains("calls are let through for now") && !report.contains("refused"),
        "{report}"
    );
    let enforced = policy_text("two-factor").await;
    assert!(enforced.contains("calls are refused until"), "{enforced}");
    assert_eq!(
        b.text("#st-recovery").await.as_deref(),
        Some("None yet (they come with your first factor)")
    );
    // The grace policy applies to alice; its deadline is shown as a date.
    let grace = b
        .until(
            "the grace policy",
            "const li = [...document.querySelectorAll('#policies li')]
               .find((e) => e.textContent.startsWith('grace:'));
             return li && li.textContent;",
        )
        .await;
    let grace = grace.as_str().unwrap();
    assert!(
        grace.contains("January") && grace.contains("31") && grace.contains("2027"),
        "grace deadline not shown as a date: {grace}"
    );
    // No factor yet, so nothing asks for a current code.
    assert!(!b.visible("#totp-start-otp").await);
    assert!(!b.visible("#recovery-regen").await);

    // Start set-up; read the secret the page shows.
    b.click("#totp-start").await;
    let secret = secret_on_page(&b).await;
    assert!(
        secret.len() >= 26
            && secret
                .bytes()
                .all(|c| c.is_ascii_uppercase() || (b'2'..=b'7').contains(&c)),
        "not a base32 secret: {secret:?}"
    );
    let qr = b
        .until(
            "the QR code to render",
            "const img = document.getElementById('totp-qr');
             return img.complete && img.naturalWidth > 0 && img.getAttribute('src');",
        )
        .await;
    assert!(
        qr.as_str()
            .unwrap()
            .starts_with("data:image/svg+xml;base64,"),
        "{qr}"
    );
    let uri = b
        .js(
            "return document.getElementById('totp-uri').textContent;",
            vec![],
        )
        .await;
    let uri = uri.as_str().unwrap();
    assert!(
        uri.starts_with("otpauth://totp/") && uri.contains(&format!("secret={secret}")),
        "{uri}"
    );
    assert_eq!(
        api_status(&tf, PAGE, &alice.key).await["factors"]["totp"]["status"],
        "pending"
    );

    // A wrong code is refused, in words.
    b.type_into("#totp-code", &wrong_at(&secret, tf.now()))
        .await;
    let (text, kind) = message_after_click(&b, "#totp-confirm").await;
    assert_eq!(kind, "error", "{text}");
    assert!(text.contains("code was not accepted"), "{text}");
    assert_eq!(
        api_status(&tf, PAGE, &alice.key).await["factors"]["totp"]["status"],
        "pending"
    );

    // The right code, from oathtool at the gateway's time.
    b.type_into("#totp-code", &totp_at(&secret, tf.now())).await;
    let (text, kind) = message_after_click(&b, "#totp-confirm").await;
    assert_eq!(kind, "ok", "{text}");
    // The code typed is spent: the page says which one works next.
    assert!(
        text.contains("your next code, in") && text.contains("is the first that works"),
        "{text}"
    );
    let codes = recovery_codes_on_page(&b).await;
    assert!(codes.iter().all(|c| is_recovery_code(c)), "{codes:?}");
    let mut distinct = codes.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 10, "{codes:?}");
    let recovery = b.text("#recovery").await.unwrap();
    assert!(
        recovery.contains("Store these now; they will not be shown again."),
        "{recovery}"
    );
    // The secret is gone from the page once confirmed.
    assert!(!b.visible("#totp-setup").await);
    assert_eq!(
        b.js(
            "return document.getElementById('totp-secret').textContent;",
            vec![]
        )
        .await,
        ""
    );
    b.until(
        "the overview to show the app",
        "return document.getElementById('st-totp').textContent.startsWith('Set up');",
    )
    .await;
    let shot = b.screenshot("security-page.png").await;
    println!("screenshot: {}", shot.display());

    // The API agrees.
    let status = api_status(&tf, PAGE, &alice.key).await;
    assert_eq!(status["factors"]["totp"]["status"], "confirmed", "{status}");
    assert_eq!(
        status["factors"]["recovery_codes"]["remaining"], 10,
        "{status}"
    );
    assert_eq!(status["enrolled"], true, "{status}");

    // The codes on the page are the real ones: one opens a protected route.
    let r = tf
        .send(
            "POST",
            "/secure",
            &[("x-api-key", &alice.key), ("x-otp", &codes[0])],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        tf.last_upstream().header("x-stepgate-auth"),
        Some("key+recovery_code")
    );

    // Download: a text file with every code.
    let (text, _) = message_after_click(&b, "#recovery-download").await;
    assert!(text.contains("downloaded"), "{text}");
    let file = b.downloaded("stepgate-recovery-codes.txt").await;
    for c in &codes {
        assert!(
            file.contains(c.as_str()),
            "{c} missing from the download:\n{file}"
        );
    }
    // Copy: the clipboard where the browser allows it, otherwise the codes are selected.
    let (text, _) = message_after_click(&b, "#recovery-copy").await;
    if text.contains("copied to the clipboard") {
        let pasted = b
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 navigator.clipboard.readText().then(done, (e) => done('refused: ' + e));",
                vec![],
            )
            .await
            .expect("read the clipboard");
        assert_eq!(pasted, json!(codes.join("\n")), "clipboard");
    } else {
        assert!(text.contains("selected"), "{text}");
        let selection = b.js("return String(window.getSelection());", vec![]).await;
        for c in &codes {
            assert!(
                selection.as_str().unwrap().contains(c.as_str()),
                "{selection}"
            );
        }
    }

    // New codes need a current code: without one the gateway asks for it, in words...
    assert!(b.visible("#regen-otp").await);
    assert_eq!(
        b.text("#regen-hint").await.as_deref(),
        Some("A code from your authenticator app or a recovery code."),
        "with an app, a texted code proves no change, so the page does not offer one"
    );
    let (text, kind) = message_after_click(&b, "#regen").await;
    assert_eq!(kind, "error", "{text}");
    assert!(text.contains("needs a current code"), "{text}");
    // ...with one (the next time step: the confirmed step is used up) a new set replaces the old.
    tf.advance(30);
    b.type_into("#regen-otp", &totp_at(&secret, tf.now())).await;
    b.click("#regen").await;
    let fresh = b
        .until(
            "a new set of codes",
            &format!(
                "const li = [...document.querySelectorAll('#recovery-codes li')]
                   .map((e) => e.textContent.trim());
                 return li.length === 10 && !li.includes({}) && li;",
                json!(codes[0])
            ),
        )
        .await;
    let fresh: Vec<String> = serde_json::from_value(fresh).unwrap();
    assert!(fresh.iter().all(|c| is_recovery_code(c)), "{fresh:?}");
    assert!(
        fresh.iter().all(|c| !codes.contains(c)),
        "{fresh:?} vs {codes:?}"
    );
    // The old set stopped working (codes[1] was never used); the new one works.
    let old = tf
        .send(
            "POST",
            "/secure",
            &[("x-api-key", &alice.key), ("x-otp", &codes[1])],
        )
        .await;
    assert_otp_refused(&old, "otp_invalid", "totp recovery_code");
    let new = tf
        .send(
            "POST",
            "/secure",
            &[("x-api-key", &alice.key), ("x-otp", &fresh[0])],
        )
        .await;
    assert_eq!(new.status, 200, "{}", new.text());

    // Nothing was stored in the browser, and the key is nowhere in the page.
    let stored = b
        .js(
            "return {
               local: localStorage.length, session: sessionStorage.length,
               cookie: document.cookie, url: location.href,
               keyInDom: document.documentElement.outerHTML.includes(arguments[0])
                 || [...document.querySelectorAll('input')].some((i) => i.value.includes(arguments[0])),
             };",
            vec![json!(alice.key)],
        )
        .await;
    assert_eq!(stored["local"], 0, "{stored}");
    assert_eq!(stored["session"], 0, "{stored}");
    assert_eq!(stored["cookie"], "", "{stored}");
    assert_eq!(stored["keyInDom"], false, "{stored}");
    assert_eq!(stored["url"], json!(page_url(&tf, PAGE)), "{stored}");
    let cookies = b.client.get_all_cookies().await.expect("cookies");
    assert!(cookies.is_empty(), "{cookies:?}");

    // Forget key: codes, names and secrets leave the DOM, and the page can no longer call.
    b.click("#forget").await;
    b.until(
        "the page to forget",
        "return document.getElementById('account').hidden
                && !document.getElementById('key-form').hidden;",
    )
    .await;
    let left = b
        .js(
            "return {
               html: document.documentElement.outerHTML,
               inputs: [...document.querySelectorAll('input')].map((i) => i.value).join(''),
             };",
            vec![],
        )
        .await;
    let html = left["html"].as_str().unwrap();
    for gone in fresh
        .iter()
        .chain([&secret, &alice.key, &"alice".to_string()])
    {
        assert!(
            !html.contains(gone.as_str()),
            "{gone} still in the page after forget"
        );
    }
    assert_eq!(left["inputs"], "", "inputs not cleared");
    b.js(
        "document.getElementById('totp-start-form').requestSubmit();",
        vec![],
    )
    .await;
    let text = b
        .until(
            "a refusal",
            "const m = document.getElementById('message');
             return m.dataset.kind === 'error' && m.textContent;",
        )
        .await;
    assert!(
        text.as_str().unwrap().contains("Paste your API key"),
        "{text}"
    );

    assert_no_csp_violations(&b).await;
    b.close().await;
    println!("browser test took {:.1?}", started.elapsed());
}

/// The page at 320 px under a custom prefix (its references are relative): nothing overflows
/// sideways, a bad key and a ban are explained in words, and the ban's Retry-After is the
/// gateway's.
#[tokio::test]
async fn narrow_page_under_a_custom_prefix_explains_refusals() {
    let tf = TwoFactor::start_with("self_service: { prefix: /account/security }").await;
    let prefix = "/account/security/";
    let bob = tf.consumer("bob", &["partner"]).await;
    let b = Browser::start(320, 3400).await;
    b.goto(&page_url(&tf, prefix)).await;
    assert_page_loaded_cleanly(&b).await;
    let width = b.js("return window.innerWidth;", vec![]).await;
    assert_eq!(width, 320);

    // A key the gateway does not know, sent from the keyboard (Enter submits the form).
    clear_message(&b).await;
    b.type_into("#api-key", &format!("{}\u{E007}", unknown_key(7)))
        .await;
    let (text, kind) = next_message(&b).await;
    assert_eq!(kind, "error", "{text}");
    assert!(text.contains("API key was not accepted"), "{text}");
    assert!(!b.visible("#account").await);

    sign_in(&b, &bob.key, "bob").await;
    b.click("#totp-start").await;
    let secret = secret_on_page(&b).await;
    let overflow = b
        .js(
            "return document.documentElement.scrollWidth - window.innerWidth;",
            vec![],
        )
        .await;
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "the page scrolls sideways at 320 px by {overflow} px"
    );
    let shot = b.screenshot("security-page-320.png").await;
    println!("screenshot: {}", shot.display());

    // Wrong codes until the failure limiter bans bob; the page says for how long.
    let wrong = wrong_at(&secret, tf.now());
    let mut banned = None;
    for _ in 0..20 {
        b.type_into("#totp-code", &wrong).await;
        let (text, kind) = message_after_click(&b, "#totp-confirm").await;
        assert_eq!(kind, "error", "{text}");
        if text.contains("Too many failed attempts") {
            banned = Some(text);
            break;
        }
        assert!(text.contains("code was not accepted"), "{text}");
    }
    let banned = banned.expect("no ban after 20 wrong codes");
    let r = get_keyed(tf.addr(), &format!("{prefix}2fa"), &bob.key).await;
    r.assert_problem(429, "too_many_attempts");
    let seconds: u64 = r.header("retry-after").unwrap().parse().unwrap();
    let expected = if seconds < 120 {
        format!("Try again in {seconds} seconds.")
    } else {
        format!("Try again in {} minutes.", seconds.div_ceil(60))
    };
    assert!(
        banned.contains(&expected),
        "{banned:?} should say {expected:?}"
    );

    assert_no_csp_violations(&b).await;
    b.close().await;
}

/// Text messages in the browser, against a local server speaking Twilio's API: register a
/// phone with the texted code (the first factor, so recovery codes follow), ask for a login
/// code and use it as the proof for new recovery codes, and see a Twilio refusal in words.
#[tokio::test]
async fn sms_in_chromium() {
    let twilio = stepgate_testkit::twilio::FakeTwilio::start().await;
    let secrets = tempfile::tempdir().expect("tempdir");
    let token_file = secrets.path().join("twilio-token");
    std::fs::write(&token_file, &twilio.auth_token).unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let tf = TwoFactor::start_with(&format!(
        r#"sms: {{ twilio: {{ account_sid: "{}", auth_token_file: "{}", from: "+15005550006", base_url: "{}" }} }}"#,
        twilio.account_sid,
        path_str(&token_file),
        twilio.base_url()
    ))
    .await;
    let carol = tf.consumer("carol", &["partner"]).await;
    let b = Browser::start(1024, 900).await;
    b.goto(&page_url(&tf, PAGE)).await;
    assert_page_loaded_cleanly(&b).await;
    sign_in(&b, &carol.key, "carol").await;
    assert!(b.visible("#sms").await, "SMS is configured, so offered");
    assert_eq!(b.text("#st-sms").await.as_deref(), Some("Not set up"));
    assert!(
        !b.visible("#sms-otp").await,
        "no factor yet, so no proof asked"
    );

    // Register the phone: a code is texted to it.
    b.type_into("#sms-phone", "+447700900987").await;
    let (text, kind) = message_after_click(&b, "#sms-start").await;
    assert_eq!(kind, "ok", "{text}");
    assert!(text.contains("+44•••••••987"), "{text}");
    assert_eq!(twilio.last().to, "+447700900987");
    assert!(b.visible("#sms-confirm-form").await);
    b.type_into("#sms-code", &twilio.last_code()).await;
    b.click("#sms-confirm").await;
    // The phone was carol's first factor: recovery codes come with it.
    let codes = recovery_codes_on_page(&b).await;
    assert!(codes.iter().all(|c| is_recovery_code(c)), "{codes:?}");
    b.until(
        "the overview to show the phone",
        "return document.getElementById('st-sms').textContent === 'Set up for +44•••••••987';",
    )
    .await;
    let status = api_status(&tf, PAGE, &carol.key).await;
    assert_eq!(status["factors"]["sms"]["status"], "confirmed", "{status}");
    // The full number is not left in the page.
    let page = b
        .js(
            "return document.documentElement.outerHTML
               + [...document.querySelectorAll('input')].map((i) => i.value).join('');",
            vec![],
        )
        .await;
    assert!(!page.as_str().unwrap().contains("7700900987"));

    // A login code by text, then used as the proof for new recovery codes.
    assert!(b.visible("#sms-login").await);
    tf.advance(31); // past the per-consumer send interval
    let (text, kind) = message_after_click(&b, "#sms-send").await;
    assert_eq!(kind, "ok", "{text}");
    assert!(text.contains("login code is on its way"), "{text}");
    assert_eq!(twilio.messages().len(), 2);
    let hint = b.text("#regen-hint").await.unwrap_or_default();
    assert!(hint.starts_with("A texted login code"), "{hint}");
    b.type_into("#regen-otp", &twilio.last_code()).await;
    b.click("#regen").await;
    b.until(
        "new recovery codes",
        &format!(
            "const li = [...document.querySelectorAll('#recovery-codes li')]
               .map((e) => e.textContent.trim());
             return li.length === 10 && !li.includes({});",
            json!(codes[0])
        ),
    )
    .await;

    // Twilio refuses: the page says the text could not be sent.
    twilio.fail_with(
        400,
        json!({"code": 21211, "message": "The 'To' number is not a valid phone number.",
               "more_info": "https://www.twilio.com/docs/errors/21211", "status": 400}),
    );
    tf.advance(31);
    let (text, kind) = message_after_click(&b, "#sms-send").await;
    assert_eq!(kind, "error", "{text}");
    assert!(text.contains("could not be sent"), "{text}");
    assert_eq!(twilio.rejections(), Vec::<String>::new());

    assert_no_csp_violations(&b).await;
    b.close().await;
}

/// The operator names the gateway (`self_service.title`): the page shows it, as text.
#[tokio::test]
async fn the_page_carries_the_operators_title_as_text() {
    let tf = TwoFactor::start_with("self_service: { title: \"Acme <Payments> & Co\" }").await;
    let html = get(tf.addr(), PAGE, "api.example.com").await.text();
    assert!(
        html.contains("<title>Security · Acme &lt;Payments&gt; &amp; Co</title>"),
        "{html}"
    );
    assert!(
        html.contains(
            r#"<p class="gateway" id="gateway-title">Acme &lt;Payments&gt; &amp; Co</p>"#
        )
    );
}
