//! Recovery codes through the consumer's own eyes (issue 7): each of the ten works once, the
//! tenth used leaves none (the security page's status says 0, an eleventh attempt fails), and
//! regenerating them invalidates the old set.
use stepgate_testkit::self_service::*;
use stepgate_testkit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_code_works_once_and_the_tenth_leaves_none() {
    let s = Ss::start().await;
    let alice = s.consumer("alice", &[]).await;
    let e = s.enrol_totp(&alice.key, None).await;
    assert_eq!(e.recovery_codes.len(), 10);

    for (i, code) in e.recovery_codes.iter().enumerate() {
        // Case and dashes do not matter; the code works once.
        let typed = if i % 2 == 0 {
            code.to_uppercase().replace('-', "")
        } else {
            code.clone()
        };
        let r = s.call("/totp/x", &alice.key, Some(&typed)).await;
        assert_eq!(r.status, 200, "code {i}: {}", r.text());
        assert_eq!(
            s.last_upstream().header("x-stepgate-auth"),
            Some("key+recovery_code")
        );
        let left = s.status(&alice.key).await["factors"]["recovery_codes"]["remaining"].clone();
        assert_eq!(left, 9 - i, "after code {i}");
        if i < 4 {
            // Used: refused (only a few, to stay below the failure limit).
            let r = s.call("/totp/x", &alice.key, Some(code)).await;
            assert_otp_refused(&r, "otp_invalid", "totp recovery_code");
        }
    }
    assert_eq!(s.gw.view("alice").await["recovery_codes_remaining"], 0);
    // An eleventh attempt, with any of them, fails.
    let r = s
        .call("/totp/x", &alice.key, Some(&e.recovery_codes[9]))
        .await;
    assert_otp_refused(&r, "otp_invalid", "totp recovery_code");
    let events = s.audit("alice").await;
    assert_eq!(
        events
            .iter()
            .filter(|e| e["kind"] == "recovery_code_used")
            .count(),
        10
    );
    // TOTP still works with no codes left.
    let r = s
        .call("/totp/x", &alice.key, Some(&totp_at(&e.secret, s.now())))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regeneration_invalidates_the_old_set() {
    let s = Ss::start().await;
    let alice = s.consumer("alice", &[]).await;
    let e = s.enrol_totp(&alice.key, None).await;
    let r = s
        .call("/totp/x", &alice.key, Some(&e.recovery_codes[0]))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    let code = totp_at(&e.secret, s.now());
    let r = s
        .api("POST", "/2fa/recovery-codes", &alice.key, Some(&code), None)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let fresh = strings(&r.json()["recovery_codes"]);
    assert_eq!(fresh.len(), 10);
    assert_eq!(
        s.status(&alice.key).await["factors"]["recovery_codes"]["remaining"],
        10
    );
    // Unused codes of the old set no longer work; the new ones do, once.
    for old in &e.recovery_codes[1..4] {
        let r = s.call("/totp/x", &alice.key, Some(old)).await;
        assert_otp_refused(&r, "otp_invalid", "totp recovery_code");
    }
    let r = s.call("/totp/x", &alice.key, Some(&fresh[0])).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.call("/totp/x", &alice.key, Some(&fresh[0])).await;
    assert_otp_refused(&r, "otp_invalid", "totp recovery_code");
    assert_eq!(
        s.status(&alice.key).await["factors"]["recovery_codes"]["remaining"],
        9
    );
}
