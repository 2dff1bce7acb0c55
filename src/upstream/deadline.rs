//! The upstream timeout's timer, kept by a client connection for its requests.
//!
//! Arming a fresh tokio timer for every forwarded request registers it in the runtime's
//! timer wheel on its first poll and takes it out again when the answer comes: a lock and a
//! wheel update each way, on every request. A connection's requests nearly always follow one
//! another, each with a deadline later than the last, and moving a registered timer's
//! deadline later costs one atomic exchange (the wheel catches up only when the earlier
//! deadline comes round, at most once per timeout). So a connection keeps one timer and
//! lends it to the request in flight; a request that finds it lent (HTTP/2 streams running
//! at once) arms one of its own, and the timeout holds for each request either way.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

use tokio::time::{Instant, Sleep, sleep_until};

/// A connection's timer for its requests' upstream deadlines (see the module's comment).
#[derive(Debug, Default)]
pub struct Timer(Mutex<Option<Pin<Box<Sleep>>>>);

/// `work` did not finish by its deadline.
#[derive(Debug, PartialEq, Eq)]
pub struct Elapsed;

impl Timer {
    /// Runs `work` until `deadline`, like [`tokio::time::timeout_at`]: the work is polled
    /// first, so an answer that is ready when the deadline passes still counts.
    pub fn within<F: Future>(&self, deadline: Instant, work: F) -> Within<'_, F> {
        Within {
            work,
            lease: Lease {
                sleep: Some(self.lend(deadline)),
                home: self,
            },
        }
    }

    /// The connection's timer set to `deadline`, or a new one while it is lent.
    fn lend(&self, deadline: Instant) -> Pin<Box<Sleep>> {
        let kept = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        match kept {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(sleep_until(deadline)),
        }
    }
}

pin_project! {
    /// The future of [`Timer::within`]: the work, held in place (the request's future is
    /// large, and moving it again would cost more than the timer saves), and the timer lent
    /// to it.
    pub struct Within<'a, F> {
        #[pin]
        work: F,
        lease: Lease<'a>,
    }
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.work.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        match this.lease.sleep.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx).map(|()| Err(Elapsed)),
            None => Poll::Ready(Err(Elapsed)),
        }
    }
}

/// A timer on loan to one request; back to its connection when the request is done (or
/// dropped), unless another request's timer went back first.
struct Lease<'a> {
    /// Always `Some` until dropped.
    sleep: Option<Pin<Box<Sleep>>>,
    home: &'a Timer,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut kept = self.home.0.lock().unwrap_or_else(|p| p.into_inner());
        if kept.is_none() {
            *kept = self.sleep.take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn answers_in_time_and_times_out_with_one_kept_timer() {
        let timer = Timer::default();
        let soon = Instant::now() + Duration::from_secs(10);
        assert_eq!(timer.within(soon, async { 7 }).await, Ok(7));
        assert!(timer.0.lock().unwrap().is_some(), "the timer went back");

        // Reused for a later deadline: the work that outlasts it is cut off at that deadline,
        // not at the earlier one the timer was first armed for.
        let later = Instant::now() + Duration::from_secs(20);
        let started = Instant::now();
        let slow = tokio::time::sleep(Duration::from_secs(60));
        assert_eq!(timer.within(later, slow).await, Err(Elapsed));
        assert_eq!(started.elapsed(), Duration::from_secs(20));

        // And reused for an earlier deadline than the one it last had.
        let start = Instant::now();
        let deadline = start + Duration::from_secs(5);
        let slow = tokio::time::sleep(Duration::from_secs(60));
        assert_eq!(timer.within(deadline, slow).await, Err(Elapsed));
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_at_once_each_keep_their_own_deadline() {
        let timer = Timer::default();
        // The connection's timer is kept from an earlier request, so one of the two below
        // borrows it and the other arms its own.
        let _ = timer.within(Instant::now(), async {}).await;
        let start = Instant::now();
        let short = timer.within(
            start + Duration::from_secs(1),
            tokio::time::sleep(Duration::from_secs(60)),
        );
        let long = timer.within(start + Duration::from_secs(3), async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            "answered"
        });
        let (short, long) = tokio::join!(short, long);
        assert_eq!(short, Err(Elapsed));
        assert_eq!(long, Ok("answered"));
        assert_eq!(start.elapsed(), Duration::from_secs(2));

        // The timer that went back had already fired: armed again, it still keeps time.
        let again = Instant::now();
        let slow = tokio::time::sleep(Duration::from_secs(60));
        assert_eq!(
            timer.within(again + Duration::from_secs(4), slow).await,
            Err(Elapsed)
        );
        assert_eq!(again.elapsed(), Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_ready_answer_wins_over_a_passed_deadline() {
        let timer = Timer::default();
        let past = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            timer.within(past, async { "late but here" }).await,
            Ok("late but here")
        );
    }
}
