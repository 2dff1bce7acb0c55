//! `stepgate check`: every config error is reported as `FILE:LINE:COLUMN: message`.
use stepgate_testkit::*;

const GOOD: &str = r#"listen: 127.0.0.1:0
limits:
  header_bytes: 32KiB
  body_bytes: 10MiB
  header_read_timeout: 10s
  drain_timeout: 1500ms
upstreams:
  orders:
    url: "http://127.0.0.1:9001"
    connect_timeout: 2s
    timeout: 30s
  demo: { echo: {} }
routes:
  - name: orders-read
    match: { host: api.example.com, path: /orders, methods: [GET] }
    upstream: orders
    policy: public
    strip_prefix: true
    body_bytes: 100MiB
  - name: demo
    match:
      path: /demo
    upstream: demo
    policy: public
"#;

/// 1-based line number of the `nth` (0-based) line containing `needle`.
fn line_of(yaml: &str, needle: &str, nth: usize) -> usize {
    yaml.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .nth(nth)
        .map(|(i, _)| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in config"))
}

fn check(dir: &tempfile::TempDir) -> (i32, String, String) {
    run_cli(&["check", "-c", &path_str(&config_path(dir))])
}

/// Finds the stderr line for `file:line:` and checks the `FILE:LINE:COLUMN: message` shape
/// and that the message mentions every word in `words`.
fn assert_error_line(stderr: &str, file: &str, line: usize, words: &[&str]) {
    let marker = format!("{file}:{line}:");
    let found = stderr.lines().find(|l| {
        l.contains(&marker)
            && words
                .iter()
                .all(|w| l.to_lowercase().contains(&w.to_lowercase()))
    });
    let Some(found) = found else {
        panic!("no error line with {marker:?} mentioning {words:?} in stderr:\n{stderr}");
    };
    let after = &found[found.find(&marker).unwrap() + marker.len()..];
    let col_len = after.chars().take_while(|c| c.is_ascii_digit()).count();
    assert!(col_len > 0, "missing column in {found:?}");
    assert!(
        after[col_len..].starts_with(": "),
        "expected FILE:LINE:COLUMN: message, got {found:?}"
    );
    assert!(
        after[col_len + 2..].trim().len() > 3,
        "empty message in {found:?}"
    );
    assert!(
        after[..col_len].parse::<usize>().unwrap() >= 1,
        "columns are 1-based: {found:?}"
    );
}

/// True for a `...FILE:LINE:COLUMN: message` line.
fn is_error_line(l: &str, file: &str) -> bool {
    let Some(i) = l.find(&format!("{file}:")) else {
        return false;
    };
    let rest = &l[i + file.len() + 1..];
    let mut parts = rest.splitn(3, ':');
    let (Some(line), Some(col), Some(msg)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    !line.is_empty()
        && line.chars().all(|c| c.is_ascii_digit())
        && !col.is_empty()
        && col.chars().all(|c| c.is_ascii_digit())
        && msg.starts_with(' ')
}

fn assert_fails_with(yaml: &str, needle: &str, nth: usize, words: &[&str]) {
    let dir = write_config(yaml);
    let (code, out, err) = check(&dir);
    assert_eq!(code, 1, "check must exit 1\nstdout: {out}\nstderr: {err}");
    assert_error_line(&err, "gateway.yaml", line_of(yaml, needle, nth), words);
}

#[test]
fn good_config_passes() {
    let dir = write_config(GOOD);
    let (code, out, err) = check(&dir);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(
        out.to_lowercase().contains("ok"),
        "expected an ok message, got {out:?}"
    );
    assert!(err.trim().is_empty(), "no errors expected on stderr: {err}");
}

#[test]
fn good_tls_config_passes() {
    let cert = self_signed_localhost();
    let yaml = format!("tls:\n  cert: tls/cert.pem\n  key: tls/key.pem\n{GOOD}");
    let dir = write_config_with(
        &yaml,
        &[
            ("policies/public.yaml", DEFAULT_POLICY),
            ("tls/cert.pem", &cert.cert_pem),
            ("tls/key.pem", &cert.key_pem),
        ],
    );
    let (code, out, err) = check(&dir);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
}

#[test]
fn unknown_upstream() {
    let yaml = GOOD.replace("    upstream: orders\n", "    upstream: nope\n");
    assert_fails_with(&yaml, "upstream: nope", 0, &["upstream", "nope"]);
}

#[test]
fn unknown_policy() {
    let yaml = GOOD.replace(
        "    upstream: demo\n    policy: public",
        "    upstream: demo\n    policy: secret",
    );
    assert_fails_with(&yaml, "policy: secret", 0, &["policy", "secret"]);
}

#[test]
fn duplicate_route_names() {
    let yaml = GOOD.replace("  - name: demo\n", "  - name: orders-read\n");
    assert_fails_with(&yaml, "- name: orders-read", 1, &["orders-read"]);
    let dir = write_config(&yaml);
    let (_, _, err) = check(&dir);
    assert!(err.to_lowercase().contains("duplicate"), "{err}");
}

#[test]
fn bad_duration() {
    let yaml = GOOD.replace("    timeout: 30s\n", "    timeout: 5x\n");
    assert_fails_with(&yaml, "timeout: 5x", 0, &["timeout"]);
    let yaml = GOOD.replace("header_read_timeout: 10s", "header_read_timeout: ten");
    assert_fails_with(
        &yaml,
        "header_read_timeout: ten",
        0,
        &["header_read_timeout"],
    );
}

#[test]
fn bad_size() {
    let yaml = GOOD.replace("    body_bytes: 100MiB\n", "    body_bytes: 100XB\n");
    assert_fails_with(&yaml, "body_bytes: 100XB", 0, &["body_bytes"]);
}

#[test]
fn worker_threads_are_bounded() {
    let yaml = GOOD.replace(
        "  drain_timeout: 1500ms\n",
        "  drain_timeout: 1500ms\n  workers: 0\n",
    );
    assert_fails_with(
        &yaml,
        "workers: 0",
        0,
        &["limits.workers", "greater than 0"],
    );
    let yaml = GOOD.replace(
        "  drain_timeout: 1500ms\n",
        "  drain_timeout: 1500ms\n  workers: 5000\n",
    );
    assert_fails_with(&yaml, "workers: 5000", 0, &["limits.workers", "1024"]);
    let yaml = GOOD.replace(
        "  drain_timeout: 1500ms\n",
        "  drain_timeout: 1500ms\n  workers: 3\n",
    );
    let dir = write_config(&yaml);
    let (code, _, stderr) = check(&dir);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn unknown_keys() {
    let yaml = format!("{GOOD}colour: blue\n");
    assert_fails_with(&yaml, "colour: blue", 0, &["colour"]);
    let yaml = GOOD.replace("    strip_prefix: true\n", "    strip_prefx: true\n");
    assert_fails_with(&yaml, "strip_prefx", 0, &["strip_prefx"]);
    let yaml = GOOD.replace(
        "    connect_timeout: 2s\n",
        "    connect_timeout: 2s\n    retry_count: 3\n",
    );
    assert_fails_with(&yaml, "retry_count: 3", 0, &["retry_count"]);
    let yaml = GOOD.replace(
        "  drain_timeout: 1500ms\n",
        "  drain_timeout: 1500ms\n  max_conns: 5\n",
    );
    assert_fails_with(&yaml, "max_conns", 0, &["max_conns"]);
}

#[test]
fn unreadable_tls_file() {
    let yaml = format!("tls:\n  cert: tls/missing-cert.pem\n  key: tls/key.pem\n{GOOD}");
    let cert = self_signed_localhost();
    let dir = write_config_with(
        &yaml,
        &[
            ("policies/public.yaml", DEFAULT_POLICY),
            ("tls/key.pem", &cert.key_pem),
        ],
    );
    let (code, out, err) = check(&dir);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert_error_line(
        &err,
        "gateway.yaml",
        line_of(&yaml, "missing-cert.pem", 0),
        &["cert"],
    );

    // A key file that is not a PEM key.
    let yaml = format!("tls:\n  cert: tls/cert.pem\n  key: tls/garbage.pem\n{GOOD}");
    let dir = write_config_with(
        &yaml,
        &[
            ("policies/public.yaml", DEFAULT_POLICY),
            ("tls/cert.pem", &cert.cert_pem),
            ("tls/garbage.pem", "not a key\n"),
        ],
    );
    let (code, out, err) = check(&dir);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert_error_line(
        &err,
        "gateway.yaml",
        line_of(&yaml, "garbage.pem", 0),
        &["key"],
    );
}

#[test]
fn yaml_syntax_error() {
    let yaml = GOOD.replace("  body_bytes: 10MiB\n", "  body_bytes: 10MiB: oops\n");
    let dir = write_config(&yaml);
    let (code, out, err) = check(&dir);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert_error_line(&err, "gateway.yaml", line_of(&yaml, "oops", 0), &[]);
}

#[test]
fn multiple_errors_all_printed() {
    let yaml = GOOD
        .replace("    upstream: orders\n", "    upstream: nope\n")
        .replace(
            "    upstream: demo\n    policy: public",
            "    upstream: demo\n    policy: secret",
        )
        .replace("    timeout: 30s\n", "    timeout: 5x\n");
    let dir = write_config(&yaml);
    let (code, out, err) = check(&dir);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert_error_line(
        &err,
        "gateway.yaml",
        line_of(&yaml, "timeout: 5x", 0),
        &["timeout"],
    );
    assert_error_line(
        &err,
        "gateway.yaml",
        line_of(&yaml, "upstream: nope", 0),
        &["upstream"],
    );
    assert_error_line(
        &err,
        "gateway.yaml",
        line_of(&yaml, "policy: secret", 0),
        &["policy"],
    );
    let error_lines = err
        .lines()
        .filter(|l| is_error_line(l, "gateway.yaml"))
        .count();
    assert_eq!(error_lines, 3, "exactly three errors expected:\n{err}");
}

#[test]
fn policy_required_is_rejected_fail_closed() {
    let dir = write_config_with(
        GOOD,
        &[(
            "policies/public.yaml",
            "api_key: off\nsecond_factor: required\n",
        )],
    );
    let (code, out, err) = check(&dir);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert_error_line(&err, "public.yaml", 2, &["second_factor"]);

    // The first factor is enforced (src/auth/api_key.rs), so a key-only policy is valid.
    let dir = write_config_with(
        GOOD,
        &[(
            "policies/public.yaml",
            "api_key: required\nsecond_factor: off\n",
        )],
    );
    let (code, out, err) = check(&dir);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
}

#[test]
fn policy_unknown_and_missing_fields() {
    let dir = write_config_with(
        GOOD,
        &[(
            "policies/public.yaml",
            "api_key: off\nsecond_factor: off\nmfa: yes\n",
        )],
    );
    let (code, _, err) = check(&dir);
    assert_eq!(code, 1, "{err}");
    assert_error_line(&err, "public.yaml", 3, &["mfa"]);

    let dir = write_config_with(GOOD, &[("policies/public.yaml", "api_key: off\n")]);
    let (code, _, err) = check(&dir);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains("public.yaml:") && l.contains("second_factor")),
        "missing field must be named: {err}"
    );
}

#[test]
fn library_load_reports_all_errors() {
    let yaml = GOOD
        .replace("    upstream: orders\n", "    upstream: nope\n")
        .replace("    timeout: 30s\n", "    timeout: 5x\n");
    let dir = write_config(&yaml);
    let errs = match stepgate::config::load(&config_path(&dir)) {
        Ok(_) => panic!("broken config loaded"),
        Err(e) => e,
    };
    assert_eq!(errs.errors().len(), 2, "{errs}");
    let text = errs.to_string();
    assert_eq!(text.trim_end().lines().count(), 2, "{text}");
    assert_error_line(
        &text,
        "gateway.yaml",
        line_of(&yaml, "upstream: nope", 0),
        &["upstream"],
    );
    assert_error_line(
        &text,
        "gateway.yaml",
        line_of(&yaml, "timeout: 5x", 0),
        &["timeout"],
    );

    assert!(stepgate::config::load(&config_path(&write_config(GOOD))).is_ok());
}

#[test]
fn descriptions_and_titles_are_one_short_line() {
    let dir = write_config_with(
        GOOD,
        &[(
            "policies/public.yaml",
            "description: \"Orders\\nand refunds\"\napi_key: off\nsecond_factor: off\n",
        )],
    );
    let (code, _, err) = check(&dir);
    assert_eq!(code, 1, "{err}");
    assert_error_line(&err, "public.yaml", 1, &["description", "one line"]);

    let long = "x".repeat(81);
    let dir = write_config_with(
        &format!("{GOOD}self_service: {{ title: {long} }}\n"),
        &[("policies/public.yaml", DEFAULT_POLICY)],
    );
    let (code, _, err) = check(&dir);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("self_service.title: at most 80 characters"),
        "{err}"
    );

    let dir = write_config_with(
        &format!("{GOOD}self_service: {{ title: Acme API }}\n"),
        &[(
            "policies/public.yaml",
            "description: Everything public\napi_key: off\nsecond_factor: off\n",
        )],
    );
    let (code, out, err) = check(&dir);
    assert_eq!(code, 0, "{out}{err}");
}

/// An upstream or a policy with an error is reported once, where it is; the routes naming it
/// are not told it is unknown.
#[test]
fn a_broken_upstream_or_policy_is_reported_once_not_by_every_route() {
    let yaml = "listen: 127.0.0.1:0\nupstreams:\n  app: { url: \"ftp://x\" }\nroutes:\n  - { name: a, match: { path: /a }, upstream: app, policy: strict }\n  - { name: b, match: { path: /b }, upstream: app, policy: strict }\n";
    let dir = write_config_with(
        yaml,
        &[(
            "policies/strict.yaml",
            "api_key: required\nsecond_factor: requird\n",
        )],
    );
    let (code, _, err) = check(&dir);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("gateway.yaml: 2 error(s)"), "{err}");
    assert_error_line(&err, "strict.yaml", 2, &["requird"]);
    assert_error_line(&err, "gateway.yaml", 3, &["ftp://x"]);
    assert!(
        !err.contains("unknown upstream") && !err.contains("unknown policy"),
        "{err}"
    );
    // A name that is not defined at all still is.
    let dir = write_config_with(
        &yaml.replace(
            "upstream: app, policy: strict }\n  - { name: b",
            "upstream: nope, policy: strict }\n  - { name: b",
        ),
        &[(
            "policies/strict.yaml",
            "api_key: required\nsecond_factor: requird\n",
        )],
    );
    let (_, _, err) = check(&dir);
    assert!(err.contains("unknown upstream `nope`"), "{err}");
}

#[test]
fn check_counts_in_words() {
    let dir = write_config_with(
        "listen: 127.0.0.1:0\nupstreams:\n  app: { echo: {} }\nroutes:\n  - { name: a, match: { path: /a }, upstream: app, policy: public }\n",
        &[("policies/public.yaml", DEFAULT_POLICY)],
    );
    let (code, out, err) = check(&dir);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok (1 route, 1 upstream, 1 policy)"), "{out}");
}

#[test]
fn websocket_routes_and_h2c_upstreams_are_checked() {
    // A tunnel needs an upstream that can answer the upgrade.
    let yaml = GOOD.replace(
        "    upstream: demo\n    policy: public",
        "    upstream: demo\n    policy: public\n    websocket: true",
    );
    assert_fails_with(&yaml, "websocket: true", 0, &["websocket", "echo"]);
    // `on_token_expiry` means nothing without `websocket: true`, and has two values.
    let yaml = GOOD.replace(
        "    body_bytes: 100MiB\n",
        "    body_bytes: 100MiB\n    on_token_expiry: close\n",
    );
    assert_fails_with(
        &yaml,
        "on_token_expiry",
        0,
        &["on_token_expiry", "websocket"],
    );
    let yaml = GOOD.replace(
        "    body_bytes: 100MiB\n",
        "    body_bytes: 100MiB\n    websocket: true\n    on_token_expiry: later\n",
    );
    assert_fails_with(&yaml, "on_token_expiry", 0, &["later", "close", "keep"]);
    let ok = GOOD.replace(
        "    body_bytes: 100MiB\n",
        "    body_bytes: 100MiB\n    websocket: true\n    on_token_expiry: keep\n",
    );
    let (code, out, err) = check(&write_config(&ok));
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");

    // HTTP/2 by prior knowledge: one mode, and only without TLS (over TLS, ALPN decides).
    let yaml = GOOD.replace("    connect_timeout: 2s\n", "    http2: always\n");
    assert_fails_with(&yaml, "http2: always", 0, &["http2", "prior_knowledge"]);
    let yaml = GOOD
        .replace("http://127.0.0.1:9001", "https://127.0.0.1:9001")
        .replace("    connect_timeout: 2s\n", "    http2: prior_knowledge\n");
    assert_fails_with(&yaml, "http2: prior_knowledge", 0, &["https", "ALPN"]);
    let yaml = GOOD.replace("http://127.0.0.1:9001", "ftp://127.0.0.1:9001");
    assert_fails_with(&yaml, "ftp://", 0, &["h2c://"]);
    for ok in [
        GOOD.replace("http://127.0.0.1:9001", "h2c://127.0.0.1:9001"),
        GOOD.replace("    connect_timeout: 2s\n", "    http2: prior_knowledge\n"),
    ] {
        let (code, out, err) = check(&write_config(&ok));
        assert_eq!(code, 0, "{ok}\nstdout: {out}\nstderr: {err}");
    }
    // The echo upstream has no HTTP/2 to speak.
    let yaml = GOOD.replace(
        "  demo: { echo: {} }",
        "  demo: { echo: {}, http2: prior_knowledge }",
    );
    assert_fails_with(&yaml, "demo: { echo", 0, &["http2", "url"]);
}
