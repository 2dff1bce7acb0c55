//! The failure-limiter layers. [`FailureLimitLayer`] wraps every credential check: a banned
//! client IP is refused before anything else is looked at, and each failed attempt coming
//! back from the checks below is counted (against the IP, and the consumer when known) and
//! may start a ban. [`ConsumerBan`] sits right after the API key has named the consumer and
//! refuses a banned consumer before its code or token is evaluated.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use serde_json::json;
use tower::{Layer, Service};

use super::limiter::{FailureLimiter, Recorded, Subject};
use crate::context::Context as RequestContext;
use crate::error::{Attempt, Refusal};
use crate::guard::Guard;
use crate::metrics::{Metrics, SubjectLabel};
use crate::registry::Registry;
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
    limiter: Arc<FailureLimiter>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
}

impl FailureLimitLayer {
    pub fn new(
        limiter: Arc<FailureLimiter>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            limiter,
            registry,
            metrics,
        }
    }
}

impl<S> Layer<S> for FailureLimitLayer {
    type Service = FailureLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        FailureLimit {
            limiter: self.limiter.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct FailureLimit<S> {
    limiter: Arc<FailureLimiter>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    inner: S,
}

/// Checks a ban, auditing its end the first time it is found over.
fn check_ban(
    limiter: &FailureLimiter,
    registry: &Registry,
    subject: &Subject,
    by: Option<&Attempt>,
) -> Result<(), Refusal> {
    match limiter.banned(subject) {
        Ok(None) => Ok(()),
        Ok(Some(retry_after)) => Err(Refusal::TooManyAttempts { retry_after }),
        Err(ended) => {
            let detail = json!({"subject": subject.describe(), "started": ended.started, "until": ended.until});
            match by {
                Some(by) => registry.audit_attempt("ban_ended", by, detail),
                None => registry.audit_event("ban_ended", None, None, detail),
            }
            Ok(())
        }
    }
}

impl<S, B, R> Service<Request<B>> for FailureLimit<S>
where
    S: Service<Request<B>, Response = Response<R>, Error = Refusal>,
{
    type Response = Response<R>;
    type Error = Refusal;
    type Future = FailureLimitFuture<S::Future>;

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
        if let Err(refusal) = check_ban(&self.limiter, &self.registry, &ip, None) {
            return FailureLimitFuture::Refused {
                refusal: Some(refusal),
            };
        }
        FailureLimitFuture::Inner {
            future: self.inner.call(request),
            tally: Some(Tally {
                limiter: self.limiter.clone(),
                registry: self.registry.clone(),
                metrics: self.metrics.clone(),
                route,
                ip,
            }),
        }
    }
}

struct Tally {
    limiter: Arc<FailureLimiter>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    route: Arc<Route>,
    ip: Subject,
}

impl Tally {
    /// Counts a failed attempt; the refusal becomes 429 when it started a ban.
    fn failure(&self, refusal: Refusal) -> Refusal {
        let Some(by) = refusal.failed_attempt() else {
            return refusal;
        };
        let by = by.cloned();
        let policy = &self.route.policy;
        let name = policy.shared_name.clone();
        let failures = &policy.failures;
        let mut ban = self.ban_if(
            self.limiter
                .record(&name, self.ip.clone(), failures.per_ip, failures),
            &self.ip,
            by.as_ref(),
        );
        if let Some(by) = &by {
            let consumer = Subject::Consumer(by.consumer_id.clone());
            let recorded =
                self.limiter
                    .record(&name, consumer.clone(), failures.per_consumer, failures);
            ban = ban.or(self.ban_if(recorded, &consumer, Some(by)));
            // Each policy counts on its own, so a consumer facing several policies gets each
            // one's allowance; this account-wide count keeps the sum within NIST's ceiling.
            if ban.is_none() {
                let recorded = self.limiter.record(
                    &self.limiter.account_wide(),
                    consumer.clone(),
                    ACCOUNT_CEILING,
                    failures,
                );
                ban = self.ban_if(recorded, &consumer, Some(by));
            }
        }
        match ban {
            Some(retry_after) => Refusal::TooManyAttempts { retry_after },
            None => refusal,
        }
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
            Some(by) => self.registry.audit_attempt("ban_started", by, detail),
            None => self.registry.audit_event("ban_started", None, None, detail),
        }
        Some(until.saturating_sub(self.limiter.now()))
    }
}

pin_project! {
    #[project = FailureLimitProj]
    pub enum FailureLimitFuture<F> {
        Inner { #[pin] future: F, tally: Option<Tally> },
        Refused { refusal: Option<Refusal> },
    }
}

impl<F, R> Future for FailureLimitFuture<F>
where
    F: Future<Output = Result<Response<R>, Refusal>>,
{
    type Output = Result<Response<R>, Refusal>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            FailureLimitProj::Inner { future, tally } => {
                let result = ready!(future.poll(cx));
                let Some(tally) = tally.take() else {
                    return Poll::Ready(result);
                };
                Poll::Ready(match result {
                    Ok(response) => {
                        if let Some(passed) = response.extensions().get::<SecondFactorPassed>() {
                            let name = tally.route.policy.shared_name.clone();
                            let consumer = Subject::Consumer(passed.consumer_id.clone());
                            tally.limiter.reset(&name, consumer.clone());
                            tally.limiter.reset(&tally.limiter.account_wide(), consumer);
                        }
                        Ok(response)
                    }
                    Err(refusal) => Err(tally.failure(refusal)),
                })
            }
            FailureLimitProj::Refused { refusal } => Poll::Ready(Err(refusal
                .take()
                .unwrap_or(Refusal::Internal("failure limiter polled after completion")))),
        }
    }
}

/// Refuses a banned consumer as soon as its API key has named it.
#[derive(Clone)]
pub struct ConsumerBan {
    limiter: Arc<FailureLimiter>,
    registry: Arc<Registry>,
}

impl ConsumerBan {
    pub fn new(limiter: Arc<FailureLimiter>, registry: Arc<Registry>) -> Self {
        Self { limiter, registry }
    }
}

impl<B> Guard<B> for ConsumerBan {
    fn check(&self, request: &mut Request<B>) -> Result<(), Refusal> {
        let Some(entry) = RequestContext::entry_of(request) else {
            return Ok(()); // a public route: no consumer to ban
        };
        let subject = Subject::Consumer(entry.consumer.shared_id.clone());
        check_ban(
            &self.limiter,
            &self.registry,
            &subject,
            Some(&entry.attempt),
        )
    }
}
