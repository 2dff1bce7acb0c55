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
    let upstream = services
        .keys()
        .find(|k| *k != "stepgate")
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
    let gateway = &compose["services"]["stepgate"];
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
