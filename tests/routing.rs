//! Routing: host matching, whole-segment prefixes, methods, precedence, strip_prefix,
//! 404 problem+json, and the `explain` CLI.
use stepgate_testkit::*;

const NAMES: [&str; 8] = [
    "generic", "host", "long", "post", "first", "second", "strip", "delete",
];

const ROUTES: &str = r#"
listen: 127.0.0.1:0
upstreams:
  up_generic: { url: "${generic}" }
  up_host:    { url: "${host}" }
  up_long:    { url: "${long}" }
  up_post:    { url: "${post}" }
  up_first:   { url: "${first}" }
  up_second:  { url: "${second}" }
  up_strip:   { url: "${strip}" }
  up_delete:  { url: "${delete}" }
routes:
  - name: r-generic
    match: { path: /orders }
    upstream: up_generic
    policy: public
  - name: r-host
    match: { host: api.example.com, path: / }
    upstream: up_host
    policy: public
  - name: r-long
    match: { path: /orders/special }
    upstream: up_long
    policy: internal
  - name: r-post
    match: { path: /orders, methods: [POST, PUT] }
    upstream: up_post
    policy: public
  - name: r-first
    match: { path: /dup, methods: [GET, POST] }
    upstream: up_first
    policy: public
  - name: r-second
    match: { path: /dup, methods: [GET, PUT] }
    upstream: up_second
    policy: public
  - name: r-strip
    match: { path: /svc }
    upstream: up_strip
    policy: public
    strip_prefix: true
  - name: r-delete
    match: { path: /only-delete, methods: [DELETE] }
    upstream: up_delete
    policy: public
"#;

struct Setup {
    gw: Gw,
    ups: Vec<(&'static str, Upstream)>,
}

impl Setup {
    fn up(&self, name: &str) -> &Upstream {
        &self.ups.iter().find(|(n, _)| *n == name).unwrap().1
    }
    fn total_upstream_requests(&self) -> usize {
        self.ups.iter().map(|(_, u)| u.requests().len()).sum()
    }
}

async fn setup() -> Setup {
    let mut ups = Vec::new();
    for n in NAMES {
        ups.push((n, Upstream::named(n).await));
    }
    let urls: Vec<(String, String)> = ups.iter().map(|(n, u)| (n.to_string(), u.url())).collect();
    let vars: Vec<(&str, &str)> = urls.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let yaml = render(ROUTES, &vars);
    let dir = write_config_with(
        &yaml,
        &[
            ("policies/public.yaml", DEFAULT_POLICY),
            ("policies/internal.yaml", DEFAULT_POLICY),
        ],
    );
    let gw = GatewayBuilder::in_dir(dir).start().await;
    Setup { gw, ups }
}

async fn routed(s: &Setup, method: &str, path: &str, host: &str) -> String {
    let r = send_http1(s.gw.addr, req(method, path, host).body(empty()).unwrap()).await;
    assert_eq!(
        r.status,
        200,
        "{method} {path} (Host: {host}) expected 200, got {} {}",
        r.status,
        r.text()
    );
    assert_eq!(r.header("x-upstream"), Some(r.text().as_str()));
    r.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_segment_prefix_matching() {
    let s = setup().await;
    let h = "other.example";
    assert_eq!(routed(&s, "GET", "/orders", h).await, "generic");
    assert_eq!(routed(&s, "GET", "/orders/", h).await, "generic");
    assert_eq!(routed(&s, "GET", "/orders/7", h).await, "generic");
    assert_eq!(routed(&s, "GET", "/orders/7/items?x=1", h).await, "generic");
    // Not on a segment boundary: must not match /orders.
    let r = get(s.gw.addr, "/ordersX", h).await;
    r.assert_problem(404, "no_route");
    let r = get(s.gw.addr, "/orders-archive/1", h).await;
    r.assert_problem(404, "no_route");
    // /orders/specialX is under /orders but not under /orders/special.
    assert_eq!(routed(&s, "GET", "/orders/specialX", h).await, "generic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_match_is_case_insensitive_and_ignores_port() {
    let s = setup().await;
    assert_eq!(
        routed(&s, "GET", "/anything", "api.example.com").await,
        "host"
    );
    assert_eq!(
        routed(&s, "GET", "/anything", "API.Example.COM").await,
        "host"
    );
    assert_eq!(
        routed(&s, "GET", "/anything", "api.example.com:8443").await,
        "host"
    );
    assert_eq!(
        routed(&s, "GET", "/anything", "Api.Example.Com:80").await,
        "host"
    );
    // A different host does not match the host route; nothing else matches /anything.
    get(s.gw.addr, "/anything", "api.example.org")
        .await
        .assert_problem(404, "no_route");
    get(s.gw.addr, "/anything", "xapi.example.com")
        .await
        .assert_problem(404, "no_route");
    get(s.gw.addr, "/anything", "api.example.com.evil")
        .await
        .assert_problem(404, "no_route");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_restrict_matching() {
    let s = setup().await;
    let h = "other.example";
    assert_eq!(routed(&s, "POST", "/orders", h).await, "post");
    assert_eq!(routed(&s, "PUT", "/orders/9", h).await, "post");
    assert_eq!(routed(&s, "GET", "/orders", h).await, "generic");
    assert_eq!(routed(&s, "DELETE", "/orders", h).await, "generic");
    assert_eq!(routed(&s, "DELETE", "/only-delete", h).await, "delete");
    // Only route for /only-delete requires DELETE: GET has no route at all.
    get(s.gw.addr, "/only-delete", h)
        .await
        .assert_problem(404, "no_route");
    let r = send_http1(
        s.gw.addr,
        req("POST", "/only-delete/x", h).body(empty()).unwrap(),
    )
    .await;
    r.assert_problem(404, "no_route");
    assert_eq!(s.up("delete").requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precedence_host_then_length_then_methods_then_order() {
    let s = setup().await;
    let other = "other.example";
    // Longer path wins over shorter.
    assert_eq!(routed(&s, "GET", "/orders/special", other).await, "long");
    assert_eq!(routed(&s, "GET", "/orders/special/1", other).await, "long");
    // Longer path (no methods) beats shorter path with matching methods.
    assert_eq!(routed(&s, "POST", "/orders/special", other).await, "long");
    // A route with host beats a longer route without host.
    assert_eq!(
        routed(&s, "GET", "/orders/special/1", "api.example.com").await,
        "host"
    );
    assert_eq!(
        routed(&s, "POST", "/orders", "api.example.com").await,
        "host"
    );
    assert_eq!(routed(&s, "GET", "/dup", "api.example.com").await, "host");
    // Equally specific matches (same path, both with methods): the earlier route wins.
    assert_eq!(routed(&s, "GET", "/dup", other).await, "first");
    assert_eq!(routed(&s, "GET", "/dup/x", other).await, "first");
    assert_eq!(routed(&s, "POST", "/dup", other).await, "first");
    assert!(s.up("second").requests().is_empty());
    // Where only the later route matches, it is chosen.
    assert_eq!(routed(&s, "PUT", "/dup", other).await, "second");
    get(s.gw.addr, "/dup", other).await; // still first
    let r = send_http1(
        s.gw.addr,
        req("DELETE", "/dup", other).body(empty()).unwrap(),
    )
    .await;
    r.assert_problem(404, "no_route");
    assert_eq!(s.up("first").requests().len(), 4);
    assert_eq!(s.up("second").requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_prefix_removes_matched_prefix() {
    let s = setup().await;
    let h = "other.example";
    for (path, expect) in [
        ("/svc/7?x=1", "/7?x=1"),
        ("/svc", "/"),
        ("/svc/", "/"),
        ("/svc/a/b", "/a/b"),
        ("/svc?q=1", "/?q=1"),
    ] {
        assert_eq!(routed(&s, "GET", path, h).await, "strip");
        let last = s.up("strip").requests().pop().unwrap();
        assert_eq!(last.path_and_query(), expect, "request path {path}");
    }
    // Without strip_prefix the path is forwarded unchanged.
    assert_eq!(routed(&s, "GET", "/orders/7?x=1", h).await, "generic");
    assert_eq!(
        s.up("generic").only_request().path_and_query(),
        "/orders/7?x=1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404_problem_json() {
    let s = setup().await;
    let r = get(s.gw.addr, "/nowhere/at/all", "other.example").await;
    let j = r.assert_problem(404, "no_route");
    assert_eq!(j["status"], 404);
    // Echoes a client-supplied request id in both the header and the body.
    let r = send_http1(
        s.gw.addr,
        req("GET", "/nowhere", "other.example")
            .header("x-request-id", "route-test-42")
            .body(empty())
            .unwrap(),
    )
    .await;
    let j = r.assert_problem(404, "no_route");
    assert_eq!(j["request_id"], "route-test-42");
    assert_eq!(
        s.total_upstream_requests(),
        0,
        "no upstream may be contacted on 404"
    );
}

fn explain_config() -> tempfile::TempDir {
    let vars: Vec<(&str, &str)> = NAMES.iter().map(|n| (*n, "http://127.0.0.1:9")).collect();
    write_config_with(
        &render(ROUTES, &vars),
        &[
            ("policies/public.yaml", DEFAULT_POLICY),
            ("policies/internal.yaml", DEFAULT_POLICY),
        ],
    )
}

#[test]
fn explain_prints_route_upstream_and_policy() {
    let dir = explain_config();
    let cfg = path_str(&config_path(&dir));
    let (code, out, err) = run_cli(&[
        "explain",
        "GET",
        "/orders/special/3",
        "--host",
        "other.example",
        "-c",
        &cfg,
    ]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("r-long"), "route name missing:\n{out}");
    assert!(out.contains("up_long"), "upstream missing:\n{out}");
    assert!(out.contains("internal"), "policy missing:\n{out}");

    // Host changes the answer.
    let (code, out, err) = run_cli(&[
        "explain",
        "GET",
        "/orders/special/3",
        "--host",
        "API.example.com:443",
        "-c",
        &cfg,
    ]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("r-host"), "route name missing:\n{out}");
    assert!(out.contains("up_host"), "upstream missing:\n{out}");
    assert!(out.contains("public"), "policy missing:\n{out}");

    // Method changes the answer.
    let (code, out, err) = run_cli(&["explain", "POST", "/orders", "-c", &cfg]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("r-post"), "route name missing:\n{out}");
    assert!(out.contains("up_post"), "upstream missing:\n{out}");
}

#[test]
fn explain_reports_no_match() {
    let dir = explain_config();
    let cfg = path_str(&config_path(&dir));
    let (code, out, err) = run_cli(&[
        "explain",
        "GET",
        "/ordersX",
        "--host",
        "other.example",
        "-c",
        &cfg,
    ]);
    let all = format!("{out}{err}");
    assert_ne!(code, 0, "no match must be a non-zero exit:\n{all}");
    assert!(
        all.contains("no_route"),
        "explain must report no_route:\n{all}"
    );
    // Says why the host-only route did not match, and selects no upstream.
    assert!(
        all.contains("r-host") && all.contains("api.example.com"),
        "{all}"
    );
    assert!(
        !all.contains("upstream:"),
        "no upstream may be selected:\n{all}"
    );
    assert!(
        !all.contains("r-generic"),
        "/ordersX is not under /orders:\n{all}"
    );

    let (code, out, err) = run_cli(&[
        "explain",
        "GET",
        "/only-delete",
        "--host",
        "other.example",
        "-c",
        &cfg,
    ]);
    let all = format!("{out}{err}");
    assert_ne!(code, 0, "{all}");
    assert!(all.contains("no_route"), "{all}");
    assert!(
        all.contains("r-delete") && all.contains("DELETE"),
        "method mismatch must be explained:\n{all}"
    );
    assert!(!all.contains("upstream:"), "{all}");
}

#[test]
fn explain_says_what_each_role_must_present() {
    let dir = write_config_with(
        "listen: 127.0.0.1:0\n\
         upstreams: { demo: { echo: {} } }\n\
         routes:\n\
         \x20 - { name: admin, match: { path: /admin }, upstream: demo, policy: admins }\n\
         \x20 - { name: keyed, match: { path: /keyed }, upstream: demo, policy: keyed }\n",
        &[
            (
                "policies/admins.yaml",
                "api_key: required\nsecond_factor: required\nstep_up: { ttl: 10m, scope: global }\n\
                 roles: { only: [admin], except: [contractor] }\n",
            ),
            (
                "policies/keyed.yaml",
                "api_key: required\nsecond_factor: off\n",
            ),
        ],
    );
    let cfg = path_str(&config_path(&dir));

    let (code, out, err) = run_cli(&["explain", "POST", "/admin/x", "--role", "admin", "-c", &cfg]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("X-Api-Key") && out.contains("X-OTP"), "{out}");
    assert!(
        out.contains("step-up token") && out.contains("10m on every route"),
        "{out}"
    );
    assert!(!out.contains("403"), "{out}");

    for roles in [&["partner"][..], &["admin", "contractor"][..]] {
        let mut args = vec!["explain", "POST", "/admin/x"];
        for role in roles {
            args.extend(["--role", role]);
        }
        args.extend(["-c", &cfg]);
        let (code, out, _) = run_cli(&args);
        assert_eq!(code, 0);
        assert!(out.contains("403 forbidden"), "{roles:?}: {out}");
        assert!(!out.contains("X-OTP"), "{roles:?}: {out}");
    }

    let (code, out, _) = run_cli(&["explain", "GET", "/keyed", "-c", &cfg]);
    assert_eq!(code, 0);
    assert!(
        out.contains("an API key (X-Api-Key)") && !out.contains("X-OTP"),
        "{out}"
    );
}
