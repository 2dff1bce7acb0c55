//! Encouraging enrolment (issue 7): `GET /reports/enrollment` and `stepgate report enrollment`
//! list every consumer not enrolled for a policy that needs a second factor and applies to its
//! roles, with the grace deadline and whether it passed; moving the injected clock past the
//! deadline turns `grace` into `overdue`.
use stepgate_testkit::self_service::*;
use stepgate_testkit::*;

use serde_json::{Value, json};

fn entries(report: &Value) -> Vec<(String, String, String)> {
    report["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries: {report}"))
        .iter()
        .map(|e| {
            (
                e["consumer"].as_str().unwrap().to_string(),
                e["policy"].as_str().unwrap().to_string(),
                e["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn row(consumer: &str, policy: &str, status: &str) -> (String, String, String) {
    (consumer.into(), policy.into(), status.into())
}

async fn cli(s: &Ss, args: &[&str]) -> (i32, String, String) {
    let url = format!("http://{}", s.gw.admin);
    let mut all = vec![
        "--admin-url",
        url.as_str(),
        "--admin-token",
        s.gw.token.as_str(),
    ];
    all.extend_from_slice(args);
    run_cli_async(&all, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_lists_who_is_not_enrolled_with_grace_or_overdue() {
    let s = Ss::start().await;
    // alice: TOTP (so only the SMS-only policy is left); bob: nothing; carol: a pending TOTP;
    // dave: an admin with nothing; erin: disabled; frank: SMS only.
    let alice = s.consumer("alice", &[]).await;
    s.enrol_totp(&alice.key, None).await;
    s.consumer("bob", &[]).await;
    let carol = s.consumer("carol", &[]).await;
    let r = s.api("POST", "/2fa/totp", &carol.key, None, None).await;
    assert_eq!(r.status, 201);
    s.consumer("dave", &["admin"]).await;
    s.consumer("erin", &[]).await;
    s.gw.ok(
        "PATCH",
        "/consumers/erin",
        Some(json!({"disabled": true})),
        200,
    )
    .await;
    let frank = s.consumer("frank", &[]).await;
    s.enrol_sms(&frank.key, None, PHONE).await;

    let report = s.gw.ok("GET", "/reports/enrollment", None, 200).await;
    assert_eq!(report["generated_at"], date_rfc3339(s.now()));
    let unenrolled = |who: &str| {
        vec![
            row(who, "any", "overdue"),
            row(who, "grace", "grace"),
            row(who, "sms", "overdue"),
            row(who, "totp", "overdue"),
            row(who, "totp-only", "overdue"),
        ]
    };
    let mut want = vec![row("alice", "sms", "overdue")];
    want.extend(unenrolled("bob"));
    want.extend(unenrolled("carol"));
    want.push(row("dave", "admins", "overdue"));
    want.extend(unenrolled("dave"));
    // frank's recovery codes came with SMS: they count only for policies that accept SMS
    // (review I3), so he is listed for every policy that does not.
    want.push(row("frank", "grace", "grace"));
    want.push(row("frank", "totp", "overdue"));
    want.push(row("frank", "totp-only", "overdue"));
    want.sort();
    let mut got = entries(&report);
    got.sort();
    assert_eq!(got, want, "{report:#}");

    let first = report["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["consumer"] == "carol" && e["policy"] == "grace")
        .unwrap();
    assert_eq!(first["grace_until"], "2027-01-31T00:00:00Z");
    assert_eq!(first["pending"], json!(["totp"]));
    assert_eq!(first["enrolled_factors"], json!([]));
    assert_eq!(first["factors"], json!(["totp", "recovery_code"]));
    let frank_row = report["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["consumer"] == "frank" && e["policy"] == "totp")
        .unwrap();
    assert_eq!(
        frank_row["enrolled_factors"],
        json!(["sms", "recovery_code"])
    );
    assert_eq!(frank_row["grace_until"], Value::Null);

    // The CLI says the same, readably.
    let (code, out, err) = cli(&s, &["report", "enrollment"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let line = |who: &str, policy: &str| {
        out.lines()
            .find(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.first() == Some(&who) && cols.get(1) == Some(&policy)
            })
            .unwrap_or_else(|| panic!("no {who} {policy} line:\n{out}"))
            .to_string()
    };
    assert!(
        out.contains("CONSUMER") && out.contains("DEADLINE") && out.contains("STATUS"),
        "{out}"
    );
    let l = line("bob", "grace");
    assert!(
        l.contains("2027-01-31T00:00:00Z") && l.contains("grace"),
        "{l}"
    );
    let l = line("bob", "totp");
    assert!(l.contains("none") && l.contains("overdue"), "{l}");
    assert!(
        line("carol", "grace").ends_with("totp"),
        "pending column:\n{out}"
    );
    assert!(
        !out.contains("erin"),
        "disabled consumers are left out:\n{out}"
    );
    assert!(out.contains("5 consumer(s) to enrol"), "{out}");
    let (code, json_out, _) = cli(&s, &["--json", "report", "enrollment"]).await;
    assert_eq!(code, 0);
    let parsed: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(parsed["entries"].as_array().unwrap().len(), want.len());

    // After the grace deadline: overdue.
    s.set(date_unix("2027-01-31"));
    let report = s.gw.ok("GET", "/reports/enrollment", None, 200).await;
    assert!(
        entries(&report)
            .iter()
            .all(|(_, _, status)| status == "overdue"),
        "{report:#}"
    );
    assert_eq!(entries(&report).len(), want.len());
    let (code, out, _) = cli(&s, &["report", "enrollment"]).await;
    assert_eq!(code, 0);
    assert!(line_has(&out, "bob", "grace", "overdue"), "{out}");
}

fn line_has(out: &str, who: &str, policy: &str, word: &str) -> bool {
    out.lines().any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.first() == Some(&who) && cols.get(1) == Some(&policy) && l.contains(word)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_report_says_everyone_is_enrolled() {
    let s = Ss::start_with(Options {
        sms: false,
        ..Options::default()
    })
    .await;
    let alice = s.consumer("alice", &[]).await;
    s.enrol_totp(&alice.key, None).await;
    let report = s.gw.ok("GET", "/reports/enrollment", None, 200).await;
    assert_eq!(report["entries"], json!([]), "{report}");
    let (code, out, err) = cli(&s, &["report", "enrollment"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Every consumer is enrolled"), "{out}");
    // The report needs the admin token like every admin call.
    let r = admin_call(s.gw.admin, None, "GET", "/reports/enrollment", None).await;
    assert_admin_problem(&r, 401, "unauthorized");
}
