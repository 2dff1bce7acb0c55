//! Timers a client connection keeps for its requests: the upstream timeout's
//! ([`Timer::within`]) and hyper's header-read timeout's ([`HeaderReadTimer`]).
//!
//! Arming a fresh tokio timer for every request registers it in the runtime's timer wheel on
//! its first poll and takes it out again when it is dropped: a lock and a wheel update each
//! way, on every request. A connection's requests nearly always follow one another, each with
//! a deadline later than the last, and moving a registered timer's deadline later costs one
//! atomic exchange (the wheel catches up only when the earlier deadline comes round, at most
//! once per timeout). So a connection keeps one timer per use and lends it to the request at
//! hand; a request that finds it lent (HTTP/2 streams running at once) arms one of its own,
//! and every deadline holds either way. A kept timer that fires while nobody holds it wakes
//! its connection's task once, for nothing.

use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;

use tokio::time::{Instant, Sleep, sleep_until};

/// A timer a connection keeps between its requests (see the module's comment).
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
            lease: Lease::new(self, deadline),
        }
    }

    /// The kept timer set to `deadline`, or a new one while it is lent.
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

    /// Keeps `sleep` for the next request, unless another one went back first.
    fn give_back(&self, sleep: Pin<Box<Sleep>>) {
        let mut kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if kept.is_none() {
            *kept = Some(sleep);
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
        lease: Lease<&'a Timer>,
    }
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.work.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        this.lease.poll(cx).map(|()| Err(Elapsed))
    }
}

/// hyper's timer for one client connection. hyper arms a new timer for every HTTP/1.1 request
/// head it starts to read (its header-read timeout) and drops it once the head is in; this
/// lends it the connection's kept one instead.
#[derive(Clone, Debug, Default)]
pub struct HeaderReadTimer(Arc<Timer>);

impl hyper::rt::Timer for HeaderReadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.lend(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.lend(deadline.into())
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeaderReadSleep>() {
            Some(ours) => ours.get_mut().0.reset(new_deadline.into()),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

impl HeaderReadTimer {
    fn lend(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeaderReadSleep(Lease::new(self.0.clone(), deadline)))
    }
}

/// A [`HeaderReadTimer`]'s sleep: the connection's kept timer, on loan.
struct HeaderReadSleep(Lease<Arc<Timer>>);

impl Future for HeaderReadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.get_mut().0.poll(cx)
    }
}

impl hyper::rt::Sleep for HeaderReadSleep {}

/// A timer on loan from `home`; back to it when the loan ends (see [`Timer::give_back`]).
struct Lease<H: Deref<Target = Timer>> {
    /// Always `Some` until dropped.
    sleep: Option<Pin<Box<Sleep>>>,
    home: H,
}

impl<H: Deref<Target = Timer>> Lease<H> {
    fn new(home: H, deadline: Instant) -> Self {
        Self {
            sleep: Some(home.lend(deadline)),
            home,
        }
    }

    fn reset(&mut self, deadline: Instant) {
        if let Some(sleep) = self.sleep.as_mut() {
            sleep.as_mut().reset(deadline);
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.sleep.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl<H: Deref<Target = Timer>> Drop for Lease<H> {
    fn drop(&mut self) {
        if let Some(sleep) = self.sleep.take() {
            self.home.give_back(sleep);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// hyper's side: a sleep per head, dropped when the head is in, the next one lent the same
    /// kept timer with a later deadline; `reset` moves a sleep's deadline; two at once keep
    /// their own.
    #[tokio::test(start_paused = true)]
    async fn header_read_sleeps_keep_their_deadlines_across_loans() {
        use hyper::rt::Timer as _;
        let timer = HeaderReadTimer::default();
        // hyper's deadlines are std's instants; the paused clock's stand for them here.
        let start = Instant::now().into_std();
        let first = timer.sleep_until(start + Duration::from_secs(10));
        drop(first);
        assert!(timer.0.0.lock().unwrap().is_some(), "the timer went back");

        let t0 = Instant::now();
        timer.sleep_until(start + Duration::from_secs(20)).await;
        assert_eq!(t0.elapsed(), Duration::from_secs(20));

        let t1 = Instant::now();
        let mut moved = timer.sleep(Duration::from_secs(5));
        timer.reset(
            &mut moved,
            (Instant::now() + Duration::from_secs(2)).into_std(),
        );
        moved.await;
        assert_eq!(t1.elapsed(), Duration::from_secs(2));

        let t2 = Instant::now();
        let (a, b) = (
            timer.sleep(Duration::from_secs(3)),
            timer.sleep(Duration::from_secs(1)),
        );
        let first_done = tokio::select! {
            () = a => "a",
            () = b => "b",
        };
        assert_eq!(first_done, "b");
        assert_eq!(t2.elapsed(), Duration::from_secs(1));
    }
}
