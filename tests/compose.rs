//! No Docker engine runs on the development machines, so the compose file and Dockerfile are
//! checked for structure here, and the configuration the compose file mounts is assembled
//! exactly as the container sees it and validated. `tests/docker_context.rs` builds the image's
//! build context and compiles it.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn compose() -> Value {
    let text = fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(from, to).unwrap();
    }
}

#[test]
fn compose_file_has_the_gateway_and_an_upstream() {
    let compose = compose();
    let services = compose["services"].as_object().expect("services");
    let gateway = &services["stepgate"];
    assert_eq!(
        gateway["build"], ".",
        "stepgate is built from the repository"
    );
    let ports: Vec<&str> = gateway["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(ports.contains(&"8080:8080"), "{ports:?}");
    assert!(
        ports.contains(&"127.0.0.1:9901:9901"),
        "the admin API must only be published on the host's loopback: {ports:?}"
    );
    let test: Vec<&str> = gateway["healthcheck"]["test"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(test, ["CMD", "stepgate", "health"]);
    // The single-node setup: the services outside any profile.
    let upstream = services
        .iter()
        .find(|(k, v)| *k != "stepgate" && v.get("profiles").is_none())
        .map(|(k, _)| k)
        .expect("an example upstream");
    assert!(services[upstream]["image"].is_string());
    let depends: Vec<&str> = gateway["depends_on"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(depends, [upstream.as_str()]);
    // Every named volume used is declared.
    for volume in gateway["volumes"].as_array().unwrap() {
        let source = volume.as_str().unwrap().split(':').next().unwrap();
        if !source.starts_with('.') {
            assert!(
                compose["volumes"].get(source).is_some(),
                "undeclared volume {source}"
            );
        }
    }
}

#[test]
fn mounted_configuration_is_valid_as_the_container_sees_it() {
    let compose = compose();
    let snapshot = mounted_config(&compose, "stepgate");
    assert!(matches!(
        snapshot.store,
        stepgate::config::StoreSettings::Sqlite { .. }
    ));
}

/// The configuration service `name` mounts, assembled as its container sees it, validated;
/// its listeners as the compose file publishes them, its upstreams compose services.
fn mounted_config(compose: &Value, name: &str) -> stepgate::config::Config {
    let gateway = &compose["services"][name];
    let root = tempfile::tempdir().unwrap();
    let mut config_path = None;
    for volume in gateway["volumes"].as_array().unwrap() {
        let parts: Vec<&str> = volume.as_str().unwrap().split(':').collect();
        let (source, target) = (parts[0], parts[1]);
        if !source.starts_with("./") {
            continue; // a named volume (the data dir)
        }
        let from = repo().join(source);
        assert!(
            from.exists(),
            "{source} is mounted but missing from the repository"
        );
        let to = root.path().join(target.trim_start_matches('/'));
        copy_tree(&from, &to);
        if target.ends_with("gateway.yaml") {
            config_path = Some(to);
        }
    }
    let env_config = gateway["environment"]["STEPGATE_CONFIG"].as_str().unwrap();
    let config_path = config_path.expect("gateway.yaml is mounted");
    assert!(config_path.ends_with(env_config.trim_start_matches('/')));
    let snapshot = stepgate::config::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(snapshot.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(snapshot.admin.map(|a| a.port()), Some(9901));
    // Upstreams by URL point at compose services.
    let services = compose["services"].as_object().unwrap();
    for upstream in snapshot.upstreams.values() {
        if let stepgate::config::Target::Http(http) = &upstream.target {
            let host = http
                .url
                .trim_start_matches("http://")
                .split(':')
                .next()
                .unwrap();
            assert!(
                services.contains_key(host),
                "upstream host {host} is not a compose service"
            );
        }
    }
    snapshot
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("a list: {value}"))
        .iter()
        .filter_map(Value::as_str)
        .collect()
}

#[test]
fn the_cluster_profile_is_two_gateways_on_a_durable_redis_behind_a_balancer() {
    let compose = compose();
    let services = compose["services"].as_object().unwrap();
    let in_cluster: Vec<&str> = services
        .iter()
        .filter(|(_, s)| s.get("profiles").is_some_and(|p| strings(p) == ["cluster"]))
        .map(|(k, _)| k.as_str())
        .collect();
    for name in ["redis", "stepgate-a", "stepgate-b", "lb"] {
        assert!(in_cluster.contains(&name), "{name} in profile cluster");
    }
    let redis = strings(&services["redis"]["command"]).join(" ");
    for setting in [
        "--appendonly yes",
        "--appendfsync always",
        "--maxmemory-policy noeviction",
    ] {
        assert!(redis.contains(setting), "redis: {setting} in {redis}");
    }
    assert!(
        services["redis"]["volumes"][0]
            .as_str()
            .unwrap()
            .ends_with(":/data")
    );

    let mut admin_ports = Vec::new();
    let mut data_volumes = Vec::new();
    for name in ["stepgate-a", "stepgate-b"] {
        let node = &services[name];
        assert_eq!(
            node["image"], "stepgate:local",
            "{name} runs the image built here"
        );
        let key = node["environment"]["STEPGATE_MASTER_KEY"].as_str().unwrap();
        assert!(
            key.starts_with("${STEPGATE_MASTER_KEY:?"),
            "{name}: one master key for every node, required from the environment: {key}"
        );
        let ports = strings(&node["ports"]);
        assert_eq!(ports.len(), 1, "{name}: only the admin API is published");
        assert!(
            ports[0].starts_with("127.0.0.1:"),
            "{name}: admin on loopback: {ports:?}"
        );
        admin_ports.push(ports[0].to_owned());
        let volumes = strings(&node["volumes"]);
        data_volumes.extend(
            volumes
                .iter()
                .filter(|v| v.ends_with(":/var/lib/stepgate"))
                .map(|v| v.to_string()),
        );
        for volume in &volumes {
            let source = volume.split(':').next().unwrap();
            assert!(
                source.starts_with('.') || compose["volumes"].get(source).is_some(),
                "undeclared volume {source}"
            );
        }
        let config = mounted_config(&compose, name);
        let stepgate::config::StoreSettings::Redis(store) = &config.store else {
            panic!("{name} is on Redis");
        };
        let host = store
            .url
            .trim_start_matches("redis://")
            .split(':')
            .next()
            .unwrap();
        assert_eq!(host, "redis", "{name}: the compose service");
        // The balancer's fixed address is the one proxy trusted.
        let lb_address = services["lb"]["networks"]["cluster"]["ipv4_address"]
            .as_str()
            .unwrap();
        let trusted: Vec<String> = config
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(trusted, [format!("{lb_address}/32")], "{name}");
    }
    assert_ne!(admin_ports[0], admin_ports[1]);
    assert_eq!(data_volumes.len(), 2);
    assert_ne!(
        data_volumes[0], data_volumes[1],
        "each node its own data dir"
    );
    let subnet = compose["networks"]["cluster"]["ipam"]["config"][0]["subnet"]
        .as_str()
        .unwrap();
    let lb_address = services["lb"]["networks"]["cluster"]["ipv4_address"]
        .as_str()
        .unwrap();
    assert!(
        lb_address.starts_with(subnet.trim_end_matches("0/24")),
        "{lb_address} in {subnet}"
    );
    assert_eq!(
        strings(&services["lb"]["volumes"]),
        ["./docker/nginx-cluster.conf:/etc/nginx/nginx.conf:ro"]
    );
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_a_healthcheck() {
    let text = fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let stages = lines.iter().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage build expected");
    let user = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("USER "))
        .expect("a USER line");
    assert!(
        !user.contains("root") && !user.ends_with(" 0") && !user.contains(" 0:"),
        "{user}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("HEALTHCHECK")),
        "a HEALTHCHECK"
    );
    assert!(
        text.contains("COPY --from="),
        "the runtime stage copies only the binary"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("FROM ") && l.contains("slim")),
        "a small runtime image"
    );
}

/// The cluster profile's nginx configuration, run by a real nginx in front of two real
/// gateways on one real Redis (the service names replaced by their loopback addresses):
/// requests are spread over both nodes, and the client's own `X-Forwarded-For` is replaced by
/// its address, so the gateways' per-client counts cannot be dodged through the balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cluster_balancer_spreads_requests_and_sets_the_client_address() {
    use stepgate_testkit::cluster::Cluster;
    use stepgate_testkit::*;

    let c = Cluster::start(2).await;
    let conf = fs::read_to_string(repo().join("docker/nginx-cluster.conf")).unwrap();
    let port = free_port();
    let conf = conf
        .replace("stepgate-a:8080", &c.node(0).addr.to_string())
        .replace("stepgate-b:8080", &c.node(1).addr.to_string())
        .replace("listen 8080;", &format!("listen 127.0.0.1:{port};"));
    assert!(
        conf.contains(&c.node(1).addr.to_string()),
        "the upstream block was found"
    );
    let prefix = tempfile::tempdir().unwrap();
    fs::create_dir_all(prefix.path().join("logs")).unwrap();
    let conf_path = prefix.path().join("nginx.conf");
    fs::write(&conf_path, conf).unwrap();
    let mut nginx = std::process::Command::new("nginx")
        .arg("-p")
        .arg(prefix.path())
        .arg("-c")
        .arg(&conf_path)
        // One process (no orphaned worker when it is killed), logging into its prefix.
        .args([
            "-e",
            "logs/error.log",
            "-g",
            "daemon off; master_process off; pid nginx.pid;",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nginx is installed (scripts/test installs it)");
    let lb = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut up = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(lb).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(up, "nginx did not start");

    let key = c
        .node(0)
        .ok(
            "POST",
            "/consumers",
            Some(serde_json::json!({"name": "alice"})),
            201,
        )
        .await["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    // Live on the other node within milliseconds.
    for _ in 0..200 {
        if c.node(1).get("/keyed/x", &key, None).await.status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for _ in 0..10 {
        let r = send_http1(
            lb,
            req("GET", "/keyed/x", "api.example.com")
                .header("x-api-key", &key)
                .header("x-forwarded-for", "203.0.113.66")
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let seen = r.json();
        let forwarded = seen["headers"]["x-forwarded-for"].to_string();
        assert!(
            !forwarded.contains("203.0.113.66") && forwarded.contains("127.0.0.1"),
            "the client's own X-Forwarded-For was replaced: {seen}"
        );
    }
    for node in &c.nodes {
        let metrics = node.call("GET", "/metrics", None).await.text();
        let served: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("stepgate_requests_total{") && l.contains("route=\"keyed\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(served >= 3.0, "each node served its share: {served}");
    }
    let _ = nginx.kill();
    let _ = nginx.wait();
}
