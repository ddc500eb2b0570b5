//! The one retry policy every connector uses for errors that pass with time (a restart, a
//! failover, a network blip): exponential backoff with jitter, bounded by a time budget rather
//! than a count, so that an outage of a minute is ridden out whatever the backoff's steps. What
//! counts as transient stays each connector's call; when to try again and when to give up is
//! decided here.

use std::fmt::Display;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::operator::TaskMetrics;

/// Backoff settings: the first delay, the longest, and how long to keep trying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub first: Duration,
    pub max: Duration,
    pub budget: Duration,
}

impl Policy {
    /// The default for sinks and lookups: 100 ms doubling to 5 s, for up to 5 minutes.
    pub const DEFAULT: Policy = Policy { first: Duration::from_millis(100), max: Duration::from_secs(5), budget: Duration::from_secs(300) };

    /// Starts counting one operation's attempts.
    pub fn start(self) -> Retry {
        Retry { policy: self, started: Instant::now(), failures: 0, report: None }
    }

    /// Starts counting one operation's attempts, showing the error being retried in `metrics`
    /// (`eddy status`) from the first failure until the operation ends either way.
    pub fn start_reporting(self, metrics: &Arc<TaskMetrics>, what: &'static str) -> Retry {
        Retry { report: Some((metrics.clone(), what)), ..self.start() }
    }
}

/// One operation's retries under a [`Policy`].
#[derive(Debug)]
pub struct Retry {
    policy: Policy,
    started: Instant,
    failures: u32,
    /// Where to show the error being retried, and what does it.
    report: Option<(Arc<TaskMetrics>, &'static str)>,
}

impl Drop for Retry {
    fn drop(&mut self) {
        if let (Some((metrics, _)), true) = (&self.report, self.failures > 0) {
            metrics.set_retrying(String::new());
        }
    }
}

impl Retry {
    /// [`Retry::next_delay`] after `error`, which is shown as the cause while it is retried.
    pub fn next_delay_after(&mut self, error: &dyn Display) -> Option<Duration> {
        let delay = self.next_delay()?;
        if let Some((metrics, what)) = &self.report {
            metrics.set_retrying(format!("{what}: {error} (retry {} after {} s)", self.failures, self.started.elapsed().as_secs()));
        }
        Some(delay)
    }

    /// After a transient failure: how long to wait before the next attempt, or `None` once the
    /// budget is spent. The delay is drawn from the upper half of the backoff step (jitter), so that
    /// many tasks failing together do not come back together.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if self.started.elapsed() >= self.policy.budget {
            return None;
        }
        let step = self.policy.first.saturating_mul(1u32 << self.failures.min(16)).min(self.policy.max);
        self.failures += 1;
        let half = step / 2;
        let jitter = Duration::from_nanos(random() % (half.as_nanos() as u64).max(1));
        Some(half + jitter)
    }

    /// Failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Time since the first attempt.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// A random number from the standard library's per-process hash keys (no RNG crate needed for
/// jitter).
fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        Instant::now().elapsed().as_nanos()
            ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_with_jitter_and_stop_at_the_budget() {
        let policy = Policy { first: Duration::from_millis(100), max: Duration::from_millis(800), budget: Duration::from_secs(60) };
        let mut retry = policy.start();
        let steps: Vec<Duration> = (0..6).map(|_| retry.next_delay().unwrap()).collect();
        for (delay, step) in steps.iter().zip([100u64, 200, 400, 800, 800, 800]) {
            let step = Duration::from_millis(step);
            assert!(*delay >= step / 2 && *delay <= step, "{delay:?} for a step of {step:?}");
        }
        assert_eq!(retry.failures(), 6);
        let spent = Policy { budget: Duration::ZERO, ..policy }.start().next_delay();
        assert_eq!(spent, None, "no budget, no retry");
    }

    #[test]
    fn the_error_being_retried_shows_until_the_operation_ends() {
        let metrics = Arc::new(TaskMetrics::default());
        let mut retry = Policy::DEFAULT.start_reporting(&metrics, "redis sink");
        assert_eq!(metrics.retrying(), "");
        retry.next_delay_after(&"connection refused").unwrap();
        retry.next_delay_after(&"connection refused").unwrap();
        assert!(metrics.retrying().starts_with("redis sink: connection refused (retry 2 after 0 s)"), "{}", metrics.retrying());
        drop(retry);
        assert_eq!(metrics.retrying(), "", "it succeeded (or gave up): nothing is being retried");
    }
}
