//! Counters and latency histograms the request path can update without a lock and without
//! two threads writing one cache line: each thread adds to atomics of its own, and a scrape
//! sums them. prometheus-client's own histogram takes a mutex per observation, and its
//! counter is one atomic that every worker writes.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};
use thread_local::ThreadLocal;

/// A monotonic counter.
#[derive(Clone, Default)]
pub struct Count(Arc<ThreadLocal<AtomicU64>>);

impl Count {
    pub fn inc(&self) {
        self.0.get_or_default().fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }
}

impl fmt::Debug for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Count({})", self.get())
    }
}

impl TypedMetric for Count {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for Count {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Upper bounds: 100 µs doubling to ~6.5 s, then +Inf.
const BOUNDS: usize = 17;
const FIRST_BOUND_NANOS: u64 = 100_000;

#[derive(Default)]
struct Shard {
    /// Observations per bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; BOUNDS + 1],
    sum_nanos: AtomicU64,
}

/// A latency histogram with fixed exponential buckets.
#[derive(Clone, Default)]
pub struct Latency(Arc<ThreadLocal<Shard>>);

impl Latency {
    pub fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let shard = self.0.get_or_default();
        shard.buckets[bucket(nanos)].fetch_add(1, Ordering::Relaxed);
        shard.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn totals(&self) -> ([u64; BOUNDS + 1], u64) {
        let mut buckets = [0; BOUNDS + 1];
        let mut sum = 0u64;
        for shard in self.0.iter() {
            for (total, n) in buckets.iter_mut().zip(&shard.buckets) {
                *total += n.load(Ordering::Relaxed);
            }
            sum = sum.wrapping_add(shard.sum_nanos.load(Ordering::Relaxed));
        }
        (buckets, sum)
    }
}

/// The first bucket whose upper bound (100 µs · 2^i) holds `nanos`; `BOUNDS` for +Inf.
fn bucket(nanos: u64) -> usize {
    // In units of the first bound, rounded up: the bucket is ceil(log2(units)).
    let units = nanos.div_ceil(FIRST_BOUND_NANOS);
    if units <= 1 {
        return 0;
    }
    let index = (u64::BITS - (units - 1).leading_zeros()) as usize;
    index.min(BOUNDS)
}

fn upper_bound(index: usize) -> f64 {
    if index >= BOUNDS {
        f64::INFINITY
    } else {
        FIRST_BOUND_NANOS as f64 * 2f64.powi(index as i32) / 1e9
    }
}

impl fmt::Debug for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (buckets, _) = self.totals();
        write!(f, "Latency({} observations)", buckets.iter().sum::<u64>())
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        let (counts, sum_nanos) = self.totals();
        let buckets: Vec<(f64, u64)> = counts
            .iter()
            .enumerate()
            .map(|(i, n)| (upper_bound(i), *n))
            .collect();
        let count = counts.iter().sum();
        encoder.encode_histogram::<NoLabelSet>(sum_nanos as f64 / 1e9, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_their_upper_bound() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(100_000), 0);
        assert_eq!(bucket(100_001), 1);
        assert_eq!(bucket(200_000), 1);
        assert_eq!(bucket(300_000), 2);
        assert_eq!(bucket(400_000), 2);
        assert_eq!(bucket(400_001), 3);
        let last_finite = FIRST_BOUND_NANOS << (BOUNDS - 1);
        assert_eq!(bucket(last_finite), BOUNDS - 1);
        assert_eq!(bucket(last_finite + 1), BOUNDS);
        assert_eq!(bucket(u64::MAX), BOUNDS);
        for i in 0..BOUNDS {
            let bound_nanos = (upper_bound(i) * 1e9).round() as u64;
            assert_eq!(bucket(bound_nanos), i, "bound {i}");
        }
    }

    #[test]
    fn counts_from_several_threads_add_up() {
        let count = Count::default();
        let latency = Latency::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        count.inc();
                        latency.observe(Duration::from_micros(150));
                    }
                });
            }
        });
        assert_eq!(count.get(), 4000);
        let (buckets, sum) = latency.totals();
        assert_eq!(buckets[1], 4000);
        assert_eq!(sum, 4000 * 150_000);
    }
}
