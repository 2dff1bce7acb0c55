//! The failure-limiter layers. [`FailureLimitLayer`] wraps every credential check: a banned
//! client IP is refused before anything else is looked at, and each failed attempt coming
//! back from the checks below is counted (against the IP, and the consumer when known) and
//! may start a ban. [`ConsumerBan`] sits right after the API key has named the consumer and
//! refuses a banned consumer before its code or token is evaluated.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use serde_json::json;
use tower::{Layer, Service};

use crate::audit::Audit;
use crate::context::Context as RequestContext;
use crate::error::{Attempt, Refusal};
use crate::guard::Guard;
use crate::limiter::{AttemptLimiter, Recorded, Subject};
use crate::metrics::{Metrics, SubjectLabel};
use crate::routing::Route;

/// At most 100 failures per account per hour over all policies (NIST SP 800-63B §5.2.2).
const ACCOUNT_CEILING: crate::config::Rate = crate::config::Rate {
    max: std::num::NonZeroU32::new(100).unwrap(),
    window: std::time::Duration::from_secs(3600),
};

/// Marks a response whose request proved a second factor (resets that consumer's count).
#[derive(Debug, Clone)]
pub struct SecondFactorPassed {
    pub consumer_id: Arc<str>,
}

#[derive(Clone)]
pub struct FailureLimitLayer {
    limiter: Arc<dyn AttemptLimiter>,
    audit: Audit,
    metrics: Arc<Metrics>,
}

impl FailureLimitLayer {
    pub fn new(limiter: Arc<dyn AttemptLimiter>, audit: Audit, metrics: Arc<Metrics>) -> Self {
        Self {
            limiter,
            audit,
            metrics,
        }
    }
}

impl<S> Layer<S> for FailureLimitLayer {
    type Service = FailureLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        FailureLimit {
            limiter: self.limiter.clone(),
            audit: self.audit.clone(),
            metrics: self.metrics.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct FailureLimit<S> {
    limiter: Arc<dyn AttemptLimiter>,
    audit: Audit,
    metrics: Arc<Metrics>,
    inner: S,
}

/// Checks a ban, auditing its end the first time it is found over.
fn check_ban(
    limiter: &dyn AttemptLimiter,
    audit: &Audit,
    subject: &Subject,
    by: Option<&Attempt>,
) -> Result<(), Refusal> {
    match limiter.banned(subject) {
        Ok(None) => Ok(()),
        Ok(Some(retry_after)) => Err(Refusal::TooManyAttempts { retry_after }),
        Err(ended) => {
            let detail = json!({"subject": subject.describe(), "started": ended.started, "until": ended.until});
            match by {
                Some(by) => audit.attempt("ban_ended", by, detail),
                None => audit.event("ban_ended", None, None, detail),
            }
            Ok(())
        }
    }
}

impl<S, B, R> Service<Request<B>> for FailureLimit<S>
where
    S: Service<Request<B>, Response = Response<R>, Error = Refusal>,
    R: Send + 'static,
{
    type Response = Response<R>;
    type Error = Refusal;
    type Future = FailureLimitFuture<S::Future, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let context = RequestContext::of(&request)
            .ok()
            .and_then(|c| c.route.clone().zip(c.client));
        let Some((route, client)) = context else {
            return FailureLimitFuture::Refused {
                refusal: Some(Refusal::Internal("failure limiter before routing")),
            };
        };
        let ip = Subject::ip(client.ip);
        if let Err(refusal) = check_ban(self.limiter.as_ref(), &self.audit, &ip, None) {
            return FailureLimitFuture::Refused {
                refusal: Some(refusal),
            };
        }
        FailureLimitFuture::Inner {
            future: self.inner.call(request),
            tally: Some(Tally {
                limiter: self.limiter.clone(),
                audit: self.audit.clone(),
                metrics: self.metrics.clone(),
                route,
                ip,
            }),
        }
    }
}

struct Tally {
    limiter: Arc<dyn AttemptLimiter>,
    audit: Audit,
    metrics: Arc<Metrics>,
    route: Arc<Route>,
    ip: Subject,
}

impl Tally {
    /// Counts a failed attempt; the refusal becomes 429 when it started a ban.
    async fn failure(self, refusal: Refusal) -> Refusal {
        let Some(by) = refusal.failed_attempt() else {
            return refusal;
        };
        let by = by.cloned();
        let policy = &self.route.policy;
        let name = policy.shared_name.clone();
        let failures = &policy.failures;
        let recorded = self
            .limiter
            .record(&name, self.ip.clone(), failures.per_ip, failures)
            .await;
        let mut ban = self.ban_if(recorded, &self.ip, by.as_ref());
        if let Some(by) = &by {
            let consumer = Subject::Consumer(by.consumer_id.clone());
            let recorded = self
                .limiter
                .record(&name, consumer.clone(), failures.per_consumer, failures)
                .await;
            ban = ban.or(self.ban_if(recorded, &consumer, Some(by)));
            // Each policy counts on its own, so a consumer facing several policies gets each
            // one's allowance; this account-wide count keeps the sum within NIST's ceiling.
            if ban.is_none() {
                let recorded = self
                    .limiter
                    .record(
                        &self.limiter.account_wide(),
                        consumer.clone(),
                        ACCOUNT_CEILING,
                        failures,
                    )
                    .await;
                ban = self.ban_if(recorded, &consumer, Some(by));
            }
        }
        match ban {
            Some(retry_after) => Refusal::TooManyAttempts { retry_after },
            None => refusal,
        }
    }

    /// A proved second factor clears the consumer's counts (this policy's and the
    /// account-wide one).
    async fn passed(self, consumer_id: Arc<str>) {
        let name = self.route.policy.shared_name.clone();
        let consumer = Subject::Consumer(consumer_id);
        self.limiter.reset(&name, consumer.clone()).await;
        self.limiter
            .reset(&self.limiter.account_wide(), consumer)
            .await;
    }

    fn ban_if(&self, recorded: Recorded, subject: &Subject, by: Option<&Attempt>) -> Option<u64> {
        let Recorded::Banned { until } = recorded else {
            return None;
        };
        let kind = match subject {
            Subject::Consumer(_) => "consumer",
            Subject::Ip(_) => "ip",
        };
        self.metrics
            .bans_started
            .get_or_create(&SubjectLabel { subject: kind })
            .inc();
        let detail = json!({"subject": subject.describe(), "until": crate::clock::rfc3339(until), "policy": self.route.policy.name});
        match by {
            Some(by) => self.audit.attempt("ban_started", by, detail),
            None => self.audit.event("ban_started", None, None, detail),
        }
        Some(until.saturating_sub(self.limiter.now()))
    }
}

type Tallying<R> = Pin<Box<dyn Future<Output = Result<Response<R>, Refusal>> + Send>>;

pin_project! {
    #[project = FailureLimitProj]
    pub enum FailureLimitFuture<F, R> {
        Inner { #[pin] future: F, tally: Option<Tally> },
        /// Counting a failure, or clearing the counts after a success (the limiter may be
        /// shared by several nodes, so this may wait on it). Only these requests pay for it.
        Tallying { future: Tallying<R> },
        Refused { refusal: Option<Refusal> },
    }
}

impl<F, R> Future for FailureLimitFuture<F, R>
where
    F: Future<Output = Result<Response<R>, Refusal>>,
    R: Send + 'static,
{
    type Output = Result<Response<R>, Refusal>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let tallying: Tallying<R> = match self.as_mut().project() {
            FailureLimitProj::Inner { future, tally } => {
                let result = ready!(future.poll(cx));
                let Some(tally) = tally.take() else {
                    return Poll::Ready(result);
                };
                match result {
                    Ok(response) => match response.extensions().get::<SecondFactorPassed>() {
                        Some(passed) => {
                            let consumer_id = passed.consumer_id.clone();
                            Box::pin(async move {
                                tally.passed(consumer_id).await;
                                Ok(response)
                            })
                        }
                        None => return Poll::Ready(Ok(response)),
                    },
                    Err(refusal) if refusal.failed_attempt().is_some() => {
                        Box::pin(async move { Err(tally.failure(refusal).await) })
                    }
                    Err(refusal) => return Poll::Ready(Err(refusal)),
                }
            }
            FailureLimitProj::Tallying { future } => return future.as_mut().poll(cx),
            FailureLimitProj::Refused { refusal } => {
                return Poll::Ready(Err(refusal
                    .take()
                    .unwrap_or(Refusal::Internal("failure limiter polled after completion"))));
            }
        };
        self.set(FailureLimitFuture::Tallying { future: tallying });
        self.poll(cx)
    }
}

/// Refuses a banned consumer as soon as its API key has named it.
#[derive(Clone)]
pub struct ConsumerBan {
    limiter: Arc<dyn AttemptLimiter>,
    audit: Audit,
}

impl ConsumerBan {
    pub fn new(limiter: Arc<dyn AttemptLimiter>, audit: Audit) -> Self {
        Self { limiter, audit }
    }
}

impl<B> Guard<B> for ConsumerBan {
    fn check(&self, request: &mut Request<B>) -> Result<(), Refusal> {
        let Some(entry) = RequestContext::entry_of(request) else {
            return Ok(()); // a public route: no consumer to ban
        };
        let subject = Subject::Consumer(entry.consumer.shared_id.clone());
        check_ban(
            self.limiter.as_ref(),
            &self.audit,
            &subject,
            Some(&entry.attempt),
        )
    }
}
