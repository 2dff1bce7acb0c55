//! The operator CLI end to end: the `stepgate` binary against a running in-process gateway,
//! finding the admin API from `-c gateway.yaml` (address from `admin.listen`, token from the
//! data dir). Consumers, keys, TOTP with oathtool's codes, recovery codes, `--json`, and the
//! messages when no gateway answers or the config cannot say where the admin API is.
use stepgate_testkit::*;

use serde_json::Value;

struct Cli {
    config: String,
    token: String,
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(self) -> String {
        assert_eq!(
            self.code, 0,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self.stdout
    }
    fn json(self) -> Value {
        let stdout = self.ok();
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("--json output is not JSON ({e}):\n{stdout}"))
    }
    /// Exit 1 and stderr mentioning every word (case-insensitive).
    fn fails_with(&self, words: &[&str]) {
        assert_eq!(
            self.code, 1,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        let lower = self.stderr.to_lowercase();
        for w in words {
            assert!(
                lower.contains(&w.to_lowercase()),
                "stderr lacks {w:?}:\n{}",
                self.stderr
            );
        }
    }
}

impl Cli {
    fn of(gw: &AdminGw) -> Cli {
        Cli {
            config: path_str(&gw.config_path()),
            token: gw.token.clone(),
        }
    }

    async fn run(&self, args: &[&str]) -> Out {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-c", &self.config]);
        let (code, stdout, stderr) = run_cli_async(&all, &[]).await;
        assert!(
            !stdout.contains(&self.token) && !stderr.contains(&self.token),
            "the admin token was printed by {args:?}"
        );
        Out {
            code,
            stdout,
            stderr,
        }
    }
}

/// The API key (`sgk_` + 72 hex) in human output.
fn key_in(text: &str) -> String {
    text.split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .find(|w| is_api_key(w))
        .unwrap_or_else(|| panic!("no API key in:\n{text}"))
        .to_string()
}

/// Recovery codes (groups of base32 separated by dashes, 24+ characters without them).
fn codes_in(text: &str) -> Vec<String> {
    text.split_whitespace()
        .filter(|w| {
            let n: String = w.chars().filter(|c| *c != '-').collect();
            w.contains('-')
                && n.len() >= 24
                && n.bytes()
                    .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
        })
        .map(str::to_string)
        .collect()
}

async fn setup() -> (AdminGw, Upstream, Cli) {
    let up = Upstream::named("app").await;
    let gw = keyed_gateway(&up.url(), "data")
        .fixed_admin_port()
        .start_admin()
        .await;
    let cli = Cli::of(&gw);
    (gw, up, cli)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_and_keys_through_the_cli() {
    let (gw, up, cli) = setup().await;

    // add: id, name, roles and the key, said to be shown once.
    let out = cli
        .run(&[
            "consumer", "add", "alice", "--role", "partner", "--role", "reader",
        ])
        .await
        .ok();
    let key = key_in(&out);
    assert!(out.contains("alice"), "{out}");
    assert!(out.contains("partner") && out.contains("reader"), "{out}");
    assert!(out.to_lowercase().contains("only once"), "{out}");
    let view = gw.view("alice").await;
    assert!(
        out.contains(view["id"].as_str().unwrap()),
        "the id is printed: {out}"
    );
    let prefix1 = key[..12].to_string();
    assert!(out.contains(&prefix1));
    assert_eq!(get_keyed(gw.addr(), "/keyed/x", &key).await.status, 200);
    assert_eq!(
        up.requests().pop().unwrap().header("x-consumer-name"),
        Some("alice")
    );

    // A duplicate is refused with the API's reason.
    cli.run(&["consumer", "add", "alice"])
        .await
        .fails_with(&["409", "alice"]);
    cli.run(&["consumer", "add", "bob"]).await.ok();

    // list: a row per consumer with roles, disabled flag, factors and key prefixes.
    let out = cli.run(&["consumer", "list"]).await.ok();
    let alice_row = out
        .lines()
        .find(|l| l.starts_with("alice"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        alice_row.contains("partner,reader") && alice_row.contains(&prefix1),
        "{out}"
    );
    assert!(
        alice_row.split_whitespace().any(|w| w == "no"),
        "not disabled: {out}"
    );
    assert!(out.lines().any(|l| l.starts_with("bob")), "{out}");
    let header = out.lines().next().unwrap().to_lowercase();
    for col in ["name", "roles", "disabled", "factors", "keys"] {
        assert!(header.contains(col), "column {col}: {out}");
    }

    // show: keys with created / last used / revoked, totp status, codes remaining.
    let out = cli.run(&["consumer", "show", "alice"]).await.ok();
    assert!(
        out.contains(&prefix1) && out.contains(view["created_at"].as_str().unwrap()),
        "{out}"
    );
    assert!(out.contains("not enrolled"), "{out}");
    assert!(out.contains("recovery codes remaining: 0"), "{out}");
    assert!(!out.contains(&key[12..]), "show never prints a key: {out}");

    // disable / enable.
    cli.run(&["consumer", "disable", "alice"]).await.ok();
    assert_eq!(gw.view("alice").await["disabled"], true);
    let out = cli.run(&["consumer", "show", "alice"]).await.ok();
    assert!(
        out.lines()
            .any(|l| l.starts_with("disabled:") && l.contains("yes")),
        "{out}"
    );
    assert_eq!(get_keyed(gw.addr(), "/keyed/x", &key).await.status, 401);
    cli.run(&["consumer", "enable", "alice"]).await.ok();
    assert_eq!(gw.view("alice").await["disabled"], false);
    assert_eq!(get_keyed(gw.addr(), "/keyed/x", &key).await.status, 200);

    // key issue (text, then --json) and revoke.
    let out = cli.run(&["key", "issue", "alice"]).await.ok();
    let key2 = key_in(&out);
    assert!(out.to_lowercase().contains("only once"), "{out}");
    assert!(out.contains(&key2[..12]), "the prefix is printed: {out}");
    let issued = cli.run(&["--json", "key", "issue", "alice"]).await.json();
    let key3 = issued["api_key"].as_str().unwrap().to_string();
    assert_eq!(issued["prefix"].as_str().unwrap(), &key3[..12]);
    for k in [&key, &key2, &key3] {
        assert_eq!(get_keyed(gw.addr(), "/keyed/x", k).await.status, 200);
    }
    cli.run(&["key", "revoke", "alice", &prefix1]).await.ok();
    assert_eq!(get_keyed(gw.addr(), "/keyed/x", &key).await.status, 401);
    assert_eq!(get_keyed(gw.addr(), "/keyed/x", &key2).await.status, 200);
    let out = cli.run(&["consumer", "show", "alice"]).await.ok();
    let revoked_line = out.lines().find(|l| l.contains(&prefix1)).unwrap();
    let revoked_at = gw.view("alice").await["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["prefix"] == prefix1.as_str())
        .unwrap()["revoked_at"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        revoked_line.contains(&revoked_at),
        "revocation time shown: {out}"
    );
    cli.run(&["key", "revoke", "alice", &prefix1])
        .await
        .fails_with(&["404"]);
    let out = cli.run(&["consumer", "list"]).await.ok();
    let alice_row = out.lines().find(|l| l.starts_with("alice")).unwrap();
    assert!(
        alice_row.contains(&key2[..12]) && alice_row.contains(&key3[..12]),
        "{out}"
    );

    // delete.
    cli.run(&["consumer", "delete", "alice"]).await.ok();
    assert_admin_problem(
        &gw.call("GET", "/consumers/alice", None).await,
        404,
        "not_found",
    );
    let out = cli.run(&["consumer", "list"]).await.ok();
    assert!(!out.lines().any(|l| l.starts_with("alice")), "{out}");
    assert_eq!(get_keyed(gw.addr(), "/keyed/x", &key2).await.status, 401);
    cli.run(&["consumer", "show", "alice"])
        .await
        .fails_with(&["404", "alice"]);
    cli.run(&["consumer", "delete", "alice"])
        .await
        .fails_with(&["404"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totp_and_recovery_codes_through_the_cli() {
    let (gw, _up, cli) = setup().await;
    cli.run(&["consumer", "add", "bob"]).await.ok();

    // Text: URI, a terminal QR code, the secret and the next step.
    let out = cli.run(&["totp", "enroll", "bob"]).await.ok();
    let uri_line = out
        .lines()
        .find(|l| l.contains("otpauth://totp/"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        uri_line.contains("issuer=stepgate") && uri_line.contains("bob"),
        "{out}"
    );
    assert!(
        out.contains('█') || out.contains('▀') || out.contains('▄'),
        "QR code: {out}"
    );
    assert!(
        out.contains("stepgate totp confirm bob"),
        "next step: {out}"
    );
    let view = gw.view("bob").await;
    assert_eq!(view["totp"]["status"], "pending");
    let out2 = cli.run(&["consumer", "show", "bob"]).await.ok();
    assert!(out2.contains("pending"), "{out2}");

    // Enrolling again while pending starts over; --json gives the raw answer.
    let e = cli
        .run(&[
            "--json",
            "totp",
            "enroll",
            "bob",
            "--digits",
            "6",
            "--algorithm",
            "sha1",
        ])
        .await
        .json();
    let secret = e["secret"].as_str().unwrap().to_string();
    assert!(e["otpauth_uri"].as_str().unwrap().contains(&secret));
    assert!(e["qr_svg"].as_str().unwrap().contains("<svg"));
    assert!(!out.contains(&secret), "the first secret was replaced");

    // A wrong code: exit 1 with the API's reason; the right one prints 10 codes, once.
    let wrong = wrong_totp(&secret, "SHA1", 6, 30);
    cli.run(&["totp", "confirm", "bob", &wrong])
        .await
        .fails_with(&["400"]);
    let out = cli
        .run(&["totp", "confirm", "bob", &totp_now(&secret)])
        .await
        .ok();
    let codes = codes_in(&out);
    assert_eq!(codes.len(), 10, "{out}");
    // The confirming code spent its step: the output says when the first usable one comes.
    assert!(
        out.contains("the first code that works is the next one, in"),
        "{out}"
    );
    assert!(out.to_lowercase().contains("only once"), "{out}");
    let out = cli.run(&["consumer", "show", "bob"]).await.ok();
    assert!(out.contains("confirmed"), "{out}");
    assert!(out.contains("recovery codes remaining: 10"), "{out}");
    let out = cli.run(&["consumer", "list"]).await.ok();
    let row = out.lines().find(|l| l.starts_with("bob")).unwrap();
    assert!(row.contains("totp"), "factors column: {out}");
    cli.run(&["totp", "confirm", "bob", &totp_now(&secret)])
        .await
        .fails_with(&["409"]);

    // Regenerate: 10 new codes.
    let out = cli.run(&["recovery", "regenerate", "bob"]).await.ok();
    let new_codes = codes_in(&out);
    assert_eq!(new_codes.len(), 10, "{out}");
    assert!(new_codes.iter().all(|c| !codes.contains(c)), "{out}");
    let j = cli
        .run(&["--json", "recovery", "regenerate", "bob"])
        .await
        .json();
    assert_eq!(j["recovery_codes"].as_array().unwrap().len(), 10);

    // Reset.
    cli.run(&["totp", "reset", "bob"]).await.ok();
    assert_eq!(gw.view("bob").await["totp"], Value::Null);
    let out = cli.run(&["consumer", "show", "bob"]).await.ok();
    assert!(out.contains("not enrolled"), "{out}");
    cli.run(&["recovery", "regenerate", "bob"])
        .await
        .fails_with(&["409"]);

    // Custom parameters reach the API.
    cli.run(&[
        "totp",
        "enroll",
        "bob",
        "--digits",
        "8",
        "--period",
        "60",
        "--algorithm",
        "SHA512",
    ])
    .await
    .ok();
    let totp = &gw.view("bob").await["totp"];
    assert_eq!(totp["digits"], 8);
    assert_eq!(totp["period"], 60);
    assert_eq!(totp["algorithm"], "SHA512");
    cli.run(&["totp", "enroll", "nobody"])
        .await
        .fails_with(&["404", "nobody"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_is_the_api_answer() {
    let (gw, _up, cli) = setup().await;
    let created = cli
        .run(&["--json", "consumer", "add", "carol", "--role", "ops"])
        .await
        .json();
    assert_eq!(created["name"], "carol");
    assert!(is_api_key(created["api_key"].as_str().unwrap()));
    let list = cli.run(&["consumer", "list", "--json"]).await.json();
    assert_eq!(list["consumers"][0]["name"], "carol");
    let shown = cli
        .run(&["consumer", "show", "carol", "--json"])
        .await
        .json();
    assert_eq!(shown, gw.view("carol").await);
    // An error with --json: the problem on stdout, the message on stderr, exit 1.
    let out = cli.run(&["--json", "consumer", "show", "nobody"]).await;
    out.fails_with(&["404"]);
    let problem: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(problem["code"], "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_and_token_can_be_given_explicitly() {
    let (gw, _up, _cli) = setup().await;
    let url = format!("http://{}", gw.admin);
    // No config at all: flags.
    let (code, stdout, stderr) = run_cli_async(
        &[
            "consumer",
            "add",
            "dora",
            "-c",
            "/nonexistent/gateway.yaml",
            "--admin-url",
            &url,
            "--admin-token",
            &gw.token,
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(is_api_key(&key_in(&stdout)));
    // Environment.
    let (code, stdout, stderr) = run_cli_async(
        &["consumer", "list", "-c", "/nonexistent/gateway.yaml"],
        &[
            ("STEPGATE_ADMIN_URL", &url),
            ("STEPGATE_ADMIN_TOKEN", &gw.token),
        ],
    )
    .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.lines().any(|l| l.starts_with("dora")), "{stdout}");
    assert!(!stdout.contains(&gw.token) && !stderr.contains(&gw.token));
    // A wrong token: 401, reported without printing either token.
    let wrong = "sga_wrong-token-for-this-test-0123456789";
    let (code, stdout, stderr) = run_cli_async(
        &[
            "consumer",
            "list",
            "-c",
            &path_str(&gw.config_path()),
            "--admin-token",
            wrong,
        ],
        &[],
    )
    .await;
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    assert!(
        !stderr.contains(wrong) && !stdout.contains(wrong),
        "{stderr}"
    );
    assert!(!stderr.contains(&gw.token) && !stdout.contains(&gw.token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clear_message_when_no_gateway_answers() {
    // A config whose admin port is closed, with a token in its data dir.
    let port = closed_port_addr().await.port();
    let dir = write_keyed_config("http://127.0.0.1:9", &format!("127.0.0.1:{port}"), "data");
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(
        dir.path().join("data/admin.token"),
        "sga_0123456789abcdef0123456789\n",
    )
    .unwrap();
    let config = path_str(&config_path(&dir));
    let (code, stdout, stderr) = run_cli_async(&["consumer", "list", "-c", &config], &[]).await;
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    let expected =
        format!("cannot reach the admin API at http://127.0.0.1:{port} (connection refused)");
    assert!(
        stderr.contains(&expected),
        "expected {expected:?} in:\n{stderr}"
    );
    assert!(
        stderr.contains("stepgate run") && stderr.contains("admin:"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("sga_0123456789abcdef"),
        "token printed: {stderr}"
    );

    // The same through --admin-url, with no usable config.
    let url = format!("http://127.0.0.1:{port}");
    let (code, _, stderr) = run_cli_async(
        &[
            "key",
            "issue",
            "x",
            "-c",
            "/nonexistent.yaml",
            "--admin-url",
            &url,
            "--admin-token",
            "t0123456789abcdef",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&expected), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clear_message_when_the_config_cannot_say_where_the_admin_api_is() {
    // Unloadable config and no --admin-url.
    let (code, stdout, stderr) = run_cli_async(
        &["consumer", "list", "-c", "/nonexistent/gateway.yaml"],
        &[],
    )
    .await;
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stderr.contains("/nonexistent/gateway.yaml"), "{stderr}");
    assert!(stderr.contains("--admin-url"), "{stderr}");

    // A config without an admin section.
    let dir = write_config(
        "listen: 127.0.0.1:0\nupstreams: { demo: { echo: {} } }\nroutes:\n  - { name: demo, match: { path: /demo }, upstream: demo, policy: public }\n",
    );
    let (code, stdout, stderr) = run_cli_async(
        &["consumer", "list", "-c", &path_str(&config_path(&dir))],
        &[],
    )
    .await;
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stderr.contains("admin"), "{stderr}");
    assert!(stderr.contains("--admin-url"), "{stderr}");

    // An admin section but no token yet (the gateway never started on this data dir).
    let port = free_port();
    let dir = write_keyed_config("http://127.0.0.1:9", &format!("127.0.0.1:{port}"), "data");
    let (code, stdout, stderr) = run_cli_async(
        &["consumer", "list", "-c", &path_str(&config_path(&dir))],
        &[],
    )
    .await;
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("admin.token") && stderr.contains("--admin-token"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_names_the_key_requirement() {
    let dir = write_keyed_config("http://127.0.0.1:9", "127.0.0.1:0", "data");
    let config = path_str(&config_path(&dir));
    let (code, stdout, stderr) =
        run_cli_async(&["explain", "GET", "/keyed/x", "-c", &config], &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("api_key: required"), "{stdout}");
    assert!(
        stdout.contains("caller must present: an API key (X-Api-Key)"),
        "{stdout}"
    );
    let (code, stdout, _) = run_cli_async(&["explain", "GET", "/open/x", "-c", &config], &[]).await;
    assert_eq!(code, 0);
    assert!(
        stdout.contains("caller must present: nothing (public route)"),
        "{stdout}"
    );
}

/// Everything the admin API does has a command: roles, unlock, step-up revoke, bans, the
/// configuration in force and reloads (an invalid file refused with every error printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_is_level_with_the_admin_api() {
    let (gw, _up, cli) = setup().await;
    let out = cli.run(&["consumer", "add", "carol"]).await.ok();
    let key = key_in(&out);

    let out = cli
        .run(&["consumer", "roles", "carol", "partner,ops"])
        .await
        .ok();
    assert!(
        out.contains("Roles of carol: ops, partner") || out.contains("partner"),
        "{out}"
    );
    assert_eq!(
        gw.view("carol").await["roles"],
        serde_json::json!(["ops", "partner"])
    );
    cli.run(&["consumer", "roles", "carol"]).await.ok();
    assert_eq!(gw.view("carol").await["roles"], serde_json::json!([]));

    // Unknown keys from one address until it is banned (50 per address in 15 minutes).
    let addr = gw.addr();
    for i in 0..60 {
        let bogus = format!("sgk_{i:0>72}");
        get_with(addr, "/keyed/x", &[("x-api-key", &bogus)]).await;
    }
    assert_eq!(
        get_with(addr, "/keyed/x", &[("x-api-key", &key)])
            .await
            .status,
        429
    );
    let out = cli.run(&["bans", "list"]).await.ok();
    assert!(out.contains("ip") && out.contains("127.0.0.1"), "{out}");
    let bans = cli.run(&["--json", "bans", "list"]).await.json();
    assert_eq!(bans["bans"][0]["kind"], "ip", "{bans}");

    let out = cli.run(&["consumer", "unlock", "carol"]).await.ok();
    assert!(out.contains("Unlocked carol"), "{out}");
    let out = cli.run(&["step-up", "revoke", "carol"]).await.ok();
    assert!(out.contains("Revoked the step-up tokens of carol"), "{out}");
    cli.run(&["consumer", "unlock", "nobody"])
        .await
        .fails_with(&["404"]);

    let out = cli.run(&["config", "show"]).await.ok();
    assert!(
        out.contains("version:") && out.contains("gateway.yaml"),
        "{out}"
    );
    assert!(out.contains("last reload: no error"), "{out}");
    let out = cli.run(&["reload"]).await.ok();
    assert!(out.contains("Nothing changed"), "{out}");
    let config = gw.config_path();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!(
            "{text}  - {{ name: more, match: {{ path: /more }}, upstream: app, policy: public }}\n"
        ),
    )
    .unwrap();
    let out = cli.run(&["reload"]).await.ok();
    assert!(out.contains("Reloaded"), "{out}");
    std::fs::write(
        &config,
        format!("{text}  - {{ name: bad, match: {{ path: /bad }}, upstream: nowhere, policy: public }}\n"),
    )
    .unwrap();
    let refused = cli.run(&["reload"]).await;
    refused.fails_with(&["previous one keeps serving", "nowhere"]);
    let out = cli.run(&["config", "show"]).await.ok();
    assert!(
        out.contains("the last reload was refused") && out.contains("nowhere"),
        "{out}"
    );
}

#[test]
fn completions_and_the_manual_page_come_from_the_same_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = run_cli(&["completions", shell]);
        assert_eq!(code, 0, "{err}");
        for command in ["consumer", "step-up", "bans", "reload", "store"] {
            assert!(out.contains(command), "{shell} completion lacks {command}");
        }
    }
    let (code, out, _) = run_cli(&["man"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(".TH stepgate 1") && out.contains("step\\-up"),
        "{}",
        &out[..200]
    );
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run_cli(&["man", "--out", &path_str(dir.path())]);
    assert_eq!(code, 0, "{err}");
    for page in [
        "stepgate.1",
        "stepgate-consumer.1",
        "stepgate-consumer-unlock.1",
    ] {
        assert!(dir.path().join(page).is_file(), "{page}");
    }
    // `run`'s own flag is under `run` only.
    let (_, top, _) = run_cli(&["--help"]);
    assert!(
        !top.lines()
            .any(|l| l.trim_start().starts_with("--log-format")),
        "{top}"
    );
    let (_, run, _) = run_cli(&["run", "--help"]);
    assert!(run.contains("--log-format"), "{run}");
}
