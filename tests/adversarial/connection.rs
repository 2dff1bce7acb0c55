//! `Connection` names headers to drop at this hop. The client's hop-by-hop headers go before
//! the gateway adds its own, so they can never delete what the gateway vouches for; an option
//! naming a credential or identity header is refused outright.

use crate::tools::*;
use stepgate_testkit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_delete_or_name_identity_and_credential_headers() {
    let edge = Edge::start().await;
    for options in [
        "close, X-Consumer-Id, X-Consumer-Name, X-Stepgate-Auth",
        "X-Consumer-Roles",
        "keep-alive, x-stepgate-auth",
        "X-Api-Key",
        "X-OTP",
        "X-Step-Up-Token",
        "X_Consumer_Name",
    ] {
        let r = edge
            .refused(
                &format!(
                    "GET /keyed/x HTTP/1.1\r\nHost: a.test\r\nX-Api-Key: {}\r\nConnection: {options}",
                    edge.key
                ),
                b"",
            )
            .await;
        assert!(
            r.json()["detail"].as_str().unwrap().contains("Connection"),
            "Connection: {options}: {}",
            r.json()
        );
    }
    // The two defects together: a look-alike plus Connection deleting the real header.
    edge.refused(
        &format!(
            "GET /keyed/x HTTP/1.1\r\nHost: a.test\r\nX-Api-Key: {}\r\nX_Consumer_Name: admin\r\n\
             Connection: close, X-Consumer-Name",
            edge.key
        ),
        b"",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_connection_names_is_removed_before_the_gateway_adds_its_own() {
    let edge = Edge::start().await;
    let head = format!(
        "GET /keyed/x HTTP/1.1\r\nHost: a.test\r\nX-Api-Key: {}\r\n\
         Connection: keep-alive, X-Foo, X-Forwarded-For, X-Forwarded-Host, X-Real-IP, Forwarded, X-Request-Id\r\n\
         X-Foo: 1\r\nX-Forwarded-For: 10.0.0.1\r\nX-Kept: 1",
        edge.key
    );
    let (r, _) = edge.raw(&head, b"").await;
    assert_eq!(r.status, 200, "{}", r.head);
    let rec = edge.app.only_request();
    assert!(rec.header("x-foo").is_none());
    assert_eq!(rec.header("x-kept"), Some("1"));
    // What the gateway vouches for is all there, with its values.
    assert_eq!(rec.header("x-consumer-name"), Some("alice"));
    assert_eq!(rec.header("x-stepgate-auth"), Some("key"));
    assert_eq!(rec.header_all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(rec.header("x-forwarded-host"), Some("a.test"));
    assert_eq!(rec.header("x-real-ip"), Some("127.0.0.1"));
    assert!(rec.header("forwarded").is_some());
    assert!(rec.header("x-request-id").is_some_and(is_uuid));
    assert!(rec.header("connection").is_none());
}
