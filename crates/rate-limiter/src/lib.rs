//! Token-bucket rate limiting for device data paths (virtio-blk, virtio-net).
//!
//! A [`TokenBucket`] holds up to `size` tokens and gains `rate` of them per second; a request
//! spends tokens, and one the bucket cannot pay for waits. A request larger than the whole
//! bucket is let through when the bucket is full, driving it into debt (a negative balance
//! the refill pays off first), so a big request is slowed, never starved, and the long-run
//! rate stays exact. An optional one-time burst is spent before the bucket's own tokens and
//! never refills.
//!
//! A [`Budget`] is a pair of buckets, bytes and operations, that several devices may share
//! (a VM-wide `--io-bps`). A [`RateLimiter`] is one device's view: it charges a request to
//! one or more budgets all-or-nothing, and when a budget cannot pay it arms a timerfd that
//! becomes readable once the tokens will be there, so an epoll-driven device thread stops
//! taking requests and resumes on that event. Time comes from a [`Clock`], injectable for
//! deterministic tests.

mod limiter;
mod timer;

pub use limiter::{Budget, RateLimiter};

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("rate limit: the {what} of a token bucket must be at least 1")]
    Zero { what: &'static str },
    #[error("rate limiter: cannot create its timerfd: {0}")]
    TimerCreate(#[source] std::io::Error),
    #[error("rate limiter: its timerfd failed: {0}")]
    Timer(#[source] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// One bucket's shape. Plain data (it is part of a device's configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketConfig {
    /// Tokens added per second.
    pub rate: u64,
    /// Most tokens the bucket holds: the burst allowed after idling. It starts full.
    pub size: u64,
    /// Extra tokens spent before the bucket's own, once; they never come back.
    #[serde(default)]
    pub one_time_burst: u64,
}

impl BucketConfig {
    /// `rate` per second with the default burst, a tenth of a second's worth (at least 1).
    pub fn with_rate(rate: u64) -> BucketConfig {
        BucketConfig {
            rate,
            size: default_burst(rate),
            one_time_burst: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.rate == 0 {
            return Err(Error::Zero { what: "rate" });
        }
        if self.size == 0 {
            return Err(Error::Zero { what: "size" });
        }
        Ok(())
    }
}

/// The burst a bucket of `rate` per second gets when none is given: 100 ms worth, at least 1.
pub fn default_burst(rate: u64) -> u64 {
    (rate / 10).max(1)
}

/// A device's limits: bytes per second and operations (requests, packets) per second; `None`
/// is unlimited. Plain data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitConfig {
    pub bandwidth: Option<BucketConfig>,
    pub ops: Option<BucketConfig>,
}

impl RateLimitConfig {
    /// Whether neither bytes nor operations are limited.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    pub fn validate(&self) -> Result<()> {
        for b in [self.bandwidth, self.ops].into_iter().flatten() {
            b.validate()?;
        }
        Ok(())
    }
}

/// What a token stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    Bytes,
    Ops,
}

/// Monotonic time since an arbitrary start.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> Duration;
}

/// The host's monotonic clock (`CLOCK_MONOTONIC`, through [`Instant`]).
#[derive(Debug)]
pub struct MonotonicClock {
    start: Instant,
}

impl MonotonicClock {
    pub fn new() -> MonotonicClock {
        MonotonicClock {
            start: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

/// A clock that moves only when told to: for tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        let n = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(n, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

/// Balances are kept in token-nanoseconds (tokens × 10⁹): a refill of `rate` tokens per
/// second adds exactly `rate` per nanosecond, so nothing is lost to rounding however often
/// the bucket is looked at.
const SCALE: i128 = 1_000_000_000;

/// A token bucket (see the crate documentation).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    config: BucketConfig,
    /// Tokens × [`SCALE`]; negative while in debt.
    balance: i128,
    /// One-time burst tokens left.
    one_time: u64,
    /// When `balance` was last brought up to date.
    last: Duration,
}

impl TokenBucket {
    /// A full bucket as of `now`.
    pub fn new(config: BucketConfig, now: Duration) -> TokenBucket {
        TokenBucket {
            config,
            balance: i128::from(config.size) * SCALE,
            one_time: config.one_time_burst,
            last: now,
        }
    }

    pub fn config(&self) -> BucketConfig {
        self.config
    }

    fn capacity(&self) -> i128 {
        i128::from(self.config.size) * SCALE
    }

    /// Adds the tokens earned since the last call (a clock going backwards earns nothing).
    pub fn refill(&mut self, now: Duration) {
        let Some(dt) = now.checked_sub(self.last) else {
            return;
        };
        self.last = now;
        let dt = i128::try_from(dt.as_nanos()).unwrap_or(i128::MAX);
        let earned = dt.saturating_mul(i128::from(self.config.rate));
        self.balance = self.balance.saturating_add(earned).min(self.capacity());
    }

    /// Tokens available now (0 while in debt), one-time burst included.
    pub fn available(&self) -> u64 {
        let own = u64::try_from((self.balance / SCALE).max(0)).unwrap_or(u64::MAX);
        own.saturating_add(self.one_time)
    }

    /// The tokens `n` needs from the bucket itself: what the one-time burst does not cover,
    /// and never more than a full bucket (a larger request goes through on a full bucket).
    fn needed(&self, n: u64) -> i128 {
        i128::from(n.saturating_sub(self.one_time).min(self.config.size)) * SCALE
    }

    /// Whether a request of `n` tokens can go now.
    pub fn can_take(&self, n: u64) -> bool {
        n == 0 || self.balance >= self.needed(n)
    }

    /// Spends `n` tokens: the one-time burst first, then the bucket, which may go into debt.
    pub fn take(&mut self, n: u64) {
        let from_burst = n.min(self.one_time);
        self.one_time -= from_burst;
        self.balance = self
            .balance
            .saturating_sub(i128::from(n - from_burst) * SCALE);
    }

    /// Returns `n` tokens (up to a full bucket), e.g. for a request that was not done after all.
    pub fn give_back(&mut self, n: u64) {
        self.balance = self
            .balance
            .saturating_add(i128::from(n) * SCALE)
            .min(self.capacity());
    }

    /// How long until a request of `n` tokens can go; zero if it can now.
    pub fn wait_for(&self, n: u64) -> Duration {
        if n == 0 {
            return Duration::ZERO;
        }
        let missing = self.needed(n) - self.balance;
        if missing <= 0 {
            return Duration::ZERO;
        }
        let rate = i128::from(self.config.rate.max(1));
        let nanos = (missing + rate - 1) / rate;
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests;
