//! The SMS send budget's contract: one text per 30 s and five per hour per consumer and per
//! destination number; a reservation not committed is given back; a refused send counts
//! nothing.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use stepgate::sms::{NotNow, Phone, SendBudget};

const T: u64 = 1_800_000_000;

async fn send(
    budget: &dyn SendBudget,
    who: &Arc<str>,
    to: Option<&Phone>,
    at: u64,
) -> Result<(), NotNow> {
    budget.reserve(who, to, at).await.map(|r| r.commit())
}

pub async fn sends_are_limited_per_consumer_and_per_number<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn SendBudget>>,
{
    let budget = make().await;
    let b = budget.as_ref();
    let (alice, bob, carol): (Arc<str>, Arc<str>, Arc<str>) =
        ("alice".into(), "bob".into(), "carol".into());
    let one = Phone::parse("+447700900001").unwrap();
    let two = Phone::parse("+447700900002").unwrap();
    assert_eq!(send(b, &alice, Some(&one), T).await, Ok(()));
    // Same consumer, other number: the consumer's 30 s.
    assert_eq!(
        send(b, &alice, Some(&two), T + 10).await,
        Err(NotNow::Wait(20))
    );
    // Other consumer, same number: the number's 30 s.
    assert_eq!(
        send(b, &bob, Some(&one), T + 10).await,
        Err(NotNow::Wait(20))
    );
    assert_eq!(send(b, &bob, Some(&two), T + 10).await, Ok(()));
    // Five an hour.
    for i in 1..5 {
        assert_eq!(send(b, &alice, Some(&one), T + 30 * i).await, Ok(()), "{i}");
    }
    assert_eq!(
        send(b, &alice, Some(&one), T + 150).await,
        Err(NotNow::Wait(3600 - 150))
    );
    // A login text (no destination budget) of a consumer whose own budget allows it goes.
    assert_eq!(send(b, &carol, None, T + 150).await, Ok(()));
    assert_eq!(send(b, &alice, Some(&one), T + 3600).await, Ok(()));
}

pub async fn a_reservation_not_committed_is_given_back<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn SendBudget>>,
{
    let budget = make().await;
    let alice: Arc<str> = "alice".into();
    let one = Phone::parse("+447700900001").unwrap();
    let held = budget.reserve(&alice, Some(&one), T).await.unwrap();
    // While held, it counts: a concurrent send waits.
    assert_eq!(
        budget.reserve(&alice, None, T + 1).await.err(),
        Some(NotNow::Wait(29))
    );
    drop(held);
    // Giving back may take a moment on a shared budget.
    let mut again = None;
    for _ in 0..100 {
        if let Ok(r) = budget.reserve(&alice, Some(&one), T + 1).await {
            again = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    again.expect("the reservation was given back").commit();
    assert_eq!(
        budget.reserve(&alice, Some(&one), T + 2).await.err(),
        Some(NotNow::Wait(29))
    );
}

pub async fn a_send_refused_by_the_number_is_not_counted_for_the_consumer<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn SendBudget>>,
{
    let budget = make().await;
    let b = budget.as_ref();
    let (alice, bob): (Arc<str>, Arc<str>) = ("alice".into(), "bob".into());
    let one = Phone::parse("+447700900001").unwrap();
    assert_eq!(send(b, &alice, Some(&one), T).await, Ok(()));
    // Bob's text to alice's number is refused by the number's budget...
    assert_eq!(
        send(b, &bob, Some(&one), T + 1).await,
        Err(NotNow::Wait(29))
    );
    // ...and took nothing of bob's own (given back, perhaps a moment later).
    let mut sent = Err(NotNow::Unavailable);
    for _ in 0..100 {
        sent = send(b, &bob, None, T + 2).await;
        if sent.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sent, Ok(()));
}
