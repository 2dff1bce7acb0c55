//! The `sms` section of gateway.yaml (issue 7): off by default, validated like the rest with
//! `file:line:column` errors, the auth token only from the environment or an owner-only file.
use stepgate_testkit::*;

const SID: &str = "AC0123456789abcdef0123456789abcdef";

fn base(sms: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nupstreams: {{ demo: {{ echo: {{}} }} }}\n{sms}routes:\n  - {{ name: r, match: {{ path: /r }}, upstream: demo, policy: p }}\n"
    )
}

const SMS_POLICY: &str = "api_key: required\nsecond_factor: required\nfactors: [totp, sms]\n";

fn token_file(dir: &tempfile::TempDir, mode: u32) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.path().join("twilio.token");
    std::fs::write(&path, "fedcba9876543210fedcba9876543210\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path_str(&path)
}

/// Loads `sms` (with `${token}` replaced by an owner-only token file) and asserts an error on
/// the line containing `at` naming every word.
fn assert_refused(sms: &str, at: &str, words: &[&str]) {
    let secrets = tempfile::tempdir().unwrap();
    let sms = sms.replace("${token}", &token_file(&secrets, 0o600));
    let yaml = base(&sms);
    let dir = write_config_with(
        &yaml,
        &[(
            "policies/p.yaml",
            "api_key: required\nsecond_factor: required\n",
        )],
    );
    let line = yaml
        .lines()
        .position(|l| l.contains(at))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{at} not in\n{yaml}"));
    let marker = format!("gateway.yaml:{line}:");
    let errors = match stepgate::config::load(&config_path(&dir)) {
        Ok(_) => panic!("accepted:\n{yaml}"),
        Err(e) => e.to_string(),
    };
    assert!(
        errors
            .lines()
            .any(|l| l.contains(&marker) && words.iter().all(|w| l.contains(w))),
        "no {marker} error naming {words:?}:\n{errors}\n---\n{yaml}"
    );
}

#[test]
fn sms_settings_are_validated_at_their_line() {
    let ok_sender = "    from: \"+15005550006\"\n";
    let twilio = |fields: &str| format!("sms:\n  twilio:\n{fields}");
    assert_refused(
        &twilio(&format!(
            "    account_sid: ACnope\n    auth_token_file: \"${{token}}\"\n{ok_sender}"
        )),
        "account_sid",
        &["sms.twilio.account_sid", "ACnope"],
    );
    assert_refused(
        &twilio(&format!("    account_sid: {SID}\n{ok_sender}")),
        // A whole-section problem points at the section's first line.
        "account_sid",
        &["auth_token_env", "auth_token_file"],
    );
    assert_refused(
        &twilio(&format!(
            "    account_sid: {SID}\n    auth_token_env: TWILIO_AUTH_TOKEN\n    auth_token_file: \"${{token}}\"\n{ok_sender}"
        )),
        // A whole-section problem points at the section's first line.
        "account_sid",
        &["exactly one of `auth_token_env` or `auth_token_file`"],
    );
    // The token itself is never accepted in the file.
    assert_refused(
        &twilio(&format!(
            "    account_sid: {SID}\n    auth_token: s3cret\n{ok_sender}"
        )),
        "auth_token:",
        &["auth_token"],
    );
    assert_refused(
        &twilio(&format!(
            "    account_sid: {SID}\n    auth_token_env: STEPGATE_TEST_UNSET_{}\n{ok_sender}",
            std::process::id()
        )),
        "auth_token_env",
        &["sms.twilio.auth_token_env", "not set"],
    );
    assert_refused(
        &twilio(&format!(
            "    account_sid: {SID}\n    auth_token_file: \"${{token}}\"\n    from: \"0800 123\"\n"
        )),
        "from:",
        &["sms.twilio.from", "E.164"],
    );
    assert_refused(
        &twilio(&format!(
            "    account_sid: {SID}\n    auth_token_file: \"${{token}}\"\n{ok_sender}    messaging_service_sid: MG0123456789abcdef0123456789abcdef\n"
        )),
        // A whole-section problem points at the section's first line.
        "account_sid",
        &["exactly one of `from` or `messaging_service_sid`"],
    );
    assert_refused(
        &twilio(&format!(
            "    account_sid: {SID}\n    auth_token_file: \"${{token}}\"\n    messaging_service_sid: MGx\n"
        )),
        "messaging_service_sid",
        &["sms.twilio.messaging_service_sid"],
    );
    assert_refused(
        &twilio(&format!(
            "    account_sid: {SID}\n    auth_token_file: \"${{token}}\"\n{ok_sender}    base_url: http://api.twilio.com\n"
        )),
        "base_url",
        &["sms.twilio.base_url", "https"],
    );
    assert_refused(
        &twilio(&format!(
            "    account_sid: {SID}\n    auth_token_file: \"${{token}}\"\n{ok_sender}    timeout: 0s\n"
        )),
        "timeout",
        &["sms.twilio.timeout"],
    );
    assert_refused(
        &format!(
            "sms:\n  twilio: {{ account_sid: {SID}, auth_token_file: \"${{token}}\", from: \"+15005550006\" }}\n  code_ttl: 20m\n"
        ),
        "code_ttl",
        &["sms.code_ttl", "10m"],
    );
    assert_refused("sms: {}\n", "sms:", &["twilio"]);
}

/// World-readable, group-readable (0640, the usual "secret for a service group") and
/// group-writable files are all refused: only the owner may read the token.
#[test]
fn a_token_file_readable_by_others_is_refused() {
    for mode in [0o644, 0o640, 0o620, 0o604] {
        let secrets = tempfile::tempdir().unwrap();
        let path = token_file(&secrets, mode);
        let yaml = base(&format!(
            "sms:\n  twilio:\n    account_sid: {SID}\n    auth_token_file: \"{path}\"\n    from: \"+15005550006\"\n"
        ));
        let dir = write_config_with(&yaml, &[("policies/p.yaml", SMS_POLICY)]);
        let errors = stepgate::config::load(&config_path(&dir))
            .err()
            .unwrap_or_else(|| panic!("mode {mode:o} accepted"))
            .to_string();
        assert!(
            errors.contains("gateway.yaml:6:")
                && errors.contains("other users")
                && errors.contains(&format!("mode {mode:o}"))
                && errors.contains("chmod 600"),
            "{mode:o}: {errors}"
        );
        // The policy's `sms` is not also reported: the section is there, only broken.
        assert!(!errors.contains("p.yaml"), "{errors}");
    }
    // A directory in its place is refused too, not read.
    let secrets = tempfile::tempdir().unwrap();
    let yaml = base(&format!(
        "sms:\n  twilio:\n    account_sid: {SID}\n    auth_token_file: \"{}\"\n    from: \"+15005550006\"\n",
        path_str(secrets.path())
    ));
    let dir = write_config_with(&yaml, &[("policies/p.yaml", SMS_POLICY)]);
    let errors = stepgate::config::load(&config_path(&dir))
        .err()
        .expect("a directory is refused")
        .to_string();
    assert!(errors.contains("gateway.yaml:6:"), "{errors}");
}

#[test]
fn sms_is_off_by_default_and_a_policy_listing_it_needs_it() {
    let dir = write_config_with(&base(""), &[("policies/p.yaml", SMS_POLICY)]);
    let errors = stepgate::config::load(&config_path(&dir))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        errors.contains("p.yaml:3:") && errors.contains("sms") && errors.contains("off by default"),
        "{errors}"
    );
    // Without sms in any policy, no sms section is fine and nothing is configured.
    let dir = write_config_with(
        &base(""),
        &[(
            "policies/p.yaml",
            "api_key: required\nsecond_factor: required\n",
        )],
    );
    let snapshot = stepgate::config::load(&config_path(&dir)).unwrap();
    assert!(snapshot.sms.is_none());
    assert!(!snapshot.policies["p"].factors.sms);
}

#[test]
fn a_valid_sms_section_loads_with_the_token_from_the_environment() {
    // Through the binary, so the environment variable is the child's alone.
    let yaml = base(&format!(
        "sms:\n  twilio:\n    account_sid: {SID}\n    auth_token_env: TWILIO_AUTH_TOKEN\n    messaging_service_sid: MG0123456789abcdef0123456789abcdef\n  code_ttl: 10m\n"
    ));
    let dir = write_config_with(&yaml, &[("policies/p.yaml", SMS_POLICY)]);
    let config = path_str(&config_path(&dir));
    let env = [(
        "TWILIO_AUTH_TOKEN".to_string(),
        "0123456789abcdef0123456789abcdef".to_string(),
    )];
    let (code, out, err) = run_cli_env(&["check", "-c", &config], &env);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = run_cli_env(&["check", "-c", &config], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("gateway.yaml:6:") && err.contains("TWILIO_AUTH_TOKEN"),
        "{err}"
    );
    // explain names the SMS code among what a caller may present.
    let (code, out, err) = run_cli_env(&["explain", "GET", "/r", "-c", &config], &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("an SMS code"), "{out}");
}

#[test]
fn with_sms_configured_a_policy_may_list_it_and_the_challenge_names_it() {
    let secrets = tempfile::tempdir().unwrap();
    let path = token_file(&secrets, 0o600);
    let yaml = base(&format!(
        "sms:\n  twilio:\n    account_sid: {SID}\n    auth_token_file: \"{path}\"\n    from: Stepgate\n"
    ));
    let dir = write_config_with(&yaml, &[("policies/p.yaml", SMS_POLICY)]);
    let snapshot = stepgate::config::load(&config_path(&dir)).unwrap();
    let p = &snapshot.policies["p"];
    assert!(p.factors.sms && p.factors.totp && !p.factors.recovery_code);
    assert_eq!(&*p.challenge_methods, "totp sms");
    let sms = snapshot.sms.as_ref().unwrap();
    assert_eq!(sms.code_ttl.as_secs(), 300);
    let debug = format!("{sms:?}");
    assert!(!debug.contains("fedcba9876543210"), "{debug}");
}
