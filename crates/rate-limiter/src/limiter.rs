//! [`Budget`]: a shareable pair of buckets; [`RateLimiter`]: one device's handle on budgets,
//! with the timerfd its thread waits on.

use crate::timer::Timer;
use crate::{
    BucketConfig, Clock, Error, MonotonicClock, RateLimitConfig, Result, TokenBucket, TokenKind,
};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

#[derive(Debug)]
struct Buckets {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    clock: Arc<dyn Clock>,
}

impl Buckets {
    fn refill(&mut self) {
        let now = self.clock.now();
        for b in [&mut self.bytes, &mut self.ops].into_iter().flatten() {
            b.refill(now);
        }
    }

    fn can_take(&self, bytes: u64, ops: u64) -> bool {
        self.bytes.as_ref().is_none_or(|b| b.can_take(bytes))
            && self.ops.as_ref().is_none_or(|b| b.can_take(ops))
    }

    fn take(&mut self, bytes: u64, ops: u64) {
        if let Some(b) = &mut self.bytes {
            b.take(bytes);
        }
        if let Some(b) = &mut self.ops {
            b.take(ops);
        }
    }

    fn wait_for(&self, bytes: u64, ops: u64) -> Duration {
        let w = |b: &Option<TokenBucket>, n| b.as_ref().map_or(Duration::ZERO, |b| b.wait_for(n));
        w(&self.bytes, bytes).max(w(&self.ops, ops))
    }
}

/// Byte and operation buckets that one device or several (cloning shares them) draw on.
#[derive(Debug, Clone)]
pub struct Budget {
    config: RateLimitConfig,
    inner: Arc<Mutex<Buckets>>,
}

impl Budget {
    /// Full buckets shaped by `config`, on the host's monotonic clock.
    pub fn new(config: &RateLimitConfig) -> Result<Budget> {
        Budget::with_clock(config, Arc::new(MonotonicClock::new()))
    }

    pub fn with_clock(config: &RateLimitConfig, clock: Arc<dyn Clock>) -> Result<Budget> {
        config.validate()?;
        let now = clock.now();
        let bucket = |c: Option<BucketConfig>| c.map(|c| TokenBucket::new(c, now));
        Ok(Budget {
            config: *config,
            inner: Arc::new(Mutex::new(Buckets {
                bytes: bucket(config.bandwidth),
                ops: bucket(config.ops),
                clock,
            })),
        })
    }

    pub fn config(&self) -> RateLimitConfig {
        self.config
    }

    fn lock(&self) -> MutexGuard<'_, Buckets> {
        // The buckets are plain numbers, consistent after any panic: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long until a request of `bytes` and `ops` could go.
    pub fn wait_for(&self, bytes: u64, ops: u64) -> Duration {
        let mut b = self.lock();
        b.refill();
        b.wait_for(bytes, ops)
    }

    /// Tokens of `kind` available now (`None`: that kind is unlimited).
    pub fn available(&self, kind: TokenKind) -> Option<u64> {
        let mut b = self.lock();
        b.refill();
        match kind {
            TokenKind::Bytes => b.bytes.as_ref().map(TokenBucket::available),
            TokenKind::Ops => b.ops.as_ref().map(TokenBucket::available),
        }
    }
}

/// One device's rate limiter: charges requests to its budgets and, when they cannot pay,
/// arms a timerfd ([`AsRawFd`]) that becomes readable when they can.
///
/// Once a request is refused the limiter stays blocked — it refuses everything, so requests
/// keep their order — until the device calls [`RateLimiter::event_handled`] on the timer's
/// event and tries again.
#[derive(Debug)]
pub struct RateLimiter {
    budgets: Vec<Budget>,
    timer: Timer,
    blocked: bool,
}

impl RateLimiter {
    /// A limiter with a budget of its own, on the host's monotonic clock.
    pub fn new(config: &RateLimitConfig) -> Result<RateLimiter> {
        RateLimiter::with_budgets(vec![Budget::new(config)?])
    }

    /// A limiter charging every request to each of `budgets` (e.g. the device's own and a
    /// VM-wide one). Lock order is list order: list shared budgets in the same order
    /// everywhere.
    pub fn with_budgets(budgets: Vec<Budget>) -> Result<RateLimiter> {
        Ok(RateLimiter {
            budgets,
            timer: Timer::new().map_err(Error::TimerCreate)?,
            blocked: false,
        })
    }

    /// Whether this limiter limits nothing (no budget has a bucket).
    pub fn is_unlimited(&self) -> bool {
        self.budgets.iter().all(|b| b.config.is_unlimited())
    }

    /// Charges `tokens` of `kind`; false (and the timer armed) if they are not there.
    pub fn consume(&mut self, tokens: u64, kind: TokenKind) -> Result<bool> {
        match kind {
            TokenKind::Bytes => self.consume_request(tokens, 0),
            TokenKind::Ops => self.consume_request(0, tokens),
        }
    }

    /// Charges a request of `bytes` bytes and `ops` operations to every budget, or to none:
    /// false (and the timer armed for when all can pay) if any cannot pay now.
    pub fn consume_request(&mut self, bytes: u64, ops: u64) -> Result<bool> {
        if self.blocked {
            return Ok(false);
        }
        if self.budgets.is_empty() {
            return Ok(true);
        }
        let mut locked: Vec<MutexGuard<'_, Buckets>> =
            self.budgets.iter().map(Budget::lock).collect();
        for b in locked.iter_mut() {
            b.refill();
        }
        if locked.iter().all(|b| b.can_take(bytes, ops)) {
            for b in locked.iter_mut() {
                b.take(bytes, ops);
            }
            return Ok(true);
        }
        let wait = locked
            .iter()
            .map(|b| b.wait_for(bytes, ops))
            .max()
            .unwrap_or(Duration::ZERO);
        drop(locked);
        self.timer.arm(wait).map_err(Error::Timer)?;
        self.blocked = true;
        Ok(false)
    }

    /// Gives `tokens` of `kind` back to every budget (a charged request that was not done).
    pub fn replenish(&mut self, tokens: u64, kind: TokenKind) {
        for budget in &self.budgets {
            let mut b = budget.lock();
            let bucket = match kind {
                TokenKind::Bytes => &mut b.bytes,
                TokenKind::Ops => &mut b.ops,
            };
            if let Some(bucket) = bucket {
                bucket.give_back(tokens);
            }
        }
    }

    /// Whether a refused request is waiting for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timerfd became readable: consume its event and unblock (the caller retries).
    pub fn event_handled(&mut self) -> Result<()> {
        self.timer.clear().map_err(Error::Timer)?;
        self.blocked = false;
        Ok(())
    }

    /// Time left before the timer fires; `None` when it is not armed.
    pub fn timer_remaining(&self) -> Result<Option<Duration>> {
        self.timer.remaining().map_err(Error::Timer)
    }

    pub fn budgets(&self) -> &[Budget] {
        &self.budgets
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}
