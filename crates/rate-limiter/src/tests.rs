use super::*;
use std::sync::Arc;

const MS: Duration = Duration::from_millis(1);

fn bucket(rate: u64, size: u64) -> BucketConfig {
    BucketConfig {
        rate,
        size,
        one_time_burst: 0,
    }
}

fn limiter(cfg: RateLimitConfig) -> (RateLimiter, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::default());
    let budget = Budget::with_clock(&cfg, clock.clone()).unwrap();
    (RateLimiter::with_budgets(vec![budget]).unwrap(), clock)
}

fn bytes(rate: u64, size: u64) -> RateLimitConfig {
    RateLimitConfig {
        bandwidth: Some(bucket(rate, size)),
        ops: None,
    }
}

#[test]
fn bucket_starts_full_and_refills_at_its_rate() {
    let mut b = TokenBucket::new(bucket(1000, 100), Duration::ZERO);
    assert_eq!(b.available(), 100);
    assert!(b.can_take(100));
    b.take(100);
    assert_eq!(b.available(), 0);
    assert!(!b.can_take(1));
    assert_eq!(b.wait_for(1), Duration::from_millis(1));
    assert_eq!(b.wait_for(50), Duration::from_millis(50));
    b.refill(Duration::from_millis(10));
    assert_eq!(b.available(), 10);
    // Never more than the size, however long it idles.
    b.refill(Duration::from_secs(3600));
    assert_eq!(b.available(), 100);
}

#[test]
fn refill_has_no_rounding_drift() {
    // 3 tokens per second looked at every millisecond: 3000 looks earn exactly 9 tokens.
    let mut b = TokenBucket::new(bucket(3, 1_000), Duration::ZERO);
    b.take(1_000);
    for i in 1..=3_000u64 {
        b.refill(Duration::from_millis(i));
    }
    assert_eq!(b.available(), 9);
    // A clock that steps back earns nothing and breaks nothing.
    b.refill(Duration::from_millis(1));
    assert_eq!(b.available(), 9);
}

#[test]
fn a_request_larger_than_the_bucket_goes_on_a_full_bucket_and_leaves_debt() {
    let mut b = TokenBucket::new(bucket(100, 10), Duration::ZERO);
    assert!(b.can_take(35));
    b.take(35);
    // 25 tokens of debt: a 1-token request waits for 26 tokens' worth of time.
    assert!(!b.can_take(1));
    assert_eq!(b.wait_for(1), Duration::from_millis(260));
    // Another big one waits for the bucket to be full again: 35 tokens of time.
    assert_eq!(b.wait_for(1_000), Duration::from_millis(350));
    b.refill(Duration::from_millis(349));
    assert!(!b.can_take(1_000));
    b.refill(Duration::from_millis(350));
    assert!(b.can_take(1_000));
    // A partly full bucket does not let a big one through.
    b.take(5);
    assert!(!b.can_take(11));
}

#[test]
fn one_time_burst_is_spent_first_and_never_refills() {
    let cfg = BucketConfig {
        rate: 10,
        size: 5,
        one_time_burst: 20,
    };
    let mut b = TokenBucket::new(cfg, Duration::ZERO);
    assert_eq!(b.available(), 25);
    b.take(20);
    assert_eq!(b.available(), 5);
    b.take(5);
    assert_eq!(b.available(), 0);
    b.refill(Duration::from_secs(100));
    assert_eq!(b.available(), 5);
    // Partly from the burst: 3 left in it, the other 4 from the bucket.
    let mut b = TokenBucket::new(cfg, Duration::ZERO);
    b.take(17);
    b.take(7);
    assert_eq!(b.available(), 1);
}

#[test]
fn give_back_caps_at_the_size() {
    let mut b = TokenBucket::new(bucket(1, 10), Duration::ZERO);
    b.take(4);
    b.give_back(100);
    assert_eq!(b.available(), 10);
}

#[test]
fn config_validation_and_defaults() {
    assert!(bytes(0, 10).validate().is_err());
    assert!(bytes(10, 0).validate().is_err());
    assert!(RateLimitConfig::default().validate().is_ok());
    assert!(RateLimitConfig::default().is_unlimited());
    assert_eq!(BucketConfig::with_rate(4 << 20).size, (4 << 20) / 10);
    assert_eq!(BucketConfig::with_rate(5).size, 1);
    let clock = Arc::new(ManualClock::default());
    assert!(matches!(
        Budget::with_clock(&bytes(0, 1), clock),
        Err(Error::Zero { what: "rate" })
    ));
    // Plain serde data.
    let cfg = RateLimitConfig {
        bandwidth: Some(bucket(1, 2)),
        ops: Some(BucketConfig::with_rate(50)),
    };
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(serde_json::from_str::<RateLimitConfig>(&json).unwrap(), cfg);
}

#[test]
fn limiter_blocks_arms_its_timer_and_resumes() {
    let (mut l, clock) = limiter(bytes(1_000, 100));
    assert!(!l.is_unlimited());
    assert!(l.consume(60, TokenKind::Bytes).unwrap());
    assert!(l.consume(40, TokenKind::Bytes).unwrap());
    assert_eq!(l.timer_remaining().unwrap(), None);
    assert!(!l.consume(30, TokenKind::Bytes).unwrap());
    assert!(l.is_blocked());
    // Armed for the 30 ms the 30 tokens take (the timer runs on real time: allow for it).
    let left = l.timer_remaining().unwrap().expect("armed");
    assert!(left <= 30 * MS && left > 20 * MS, "{left:?}");
    // Blocked: even a request that would fit waits its turn (order is kept).
    clock.advance(Duration::from_secs(1));
    assert!(!l.consume(1, TokenKind::Bytes).unwrap());
    l.event_handled().unwrap();
    assert!(!l.is_blocked());
    assert!(l.consume(30, TokenKind::Bytes).unwrap());
    // Operations are not limited here.
    assert!(l.consume(1_000_000, TokenKind::Ops).unwrap());
}

#[test]
fn limiter_charges_bytes_and_ops_all_or_nothing() {
    let cfg = RateLimitConfig {
        bandwidth: Some(bucket(1_000, 1_000)),
        ops: Some(bucket(10, 2)),
    };
    let (mut l, clock) = limiter(cfg);
    assert!(l.consume_request(100, 1).unwrap());
    assert!(l.consume_request(100, 1).unwrap());
    // Out of ops: the bytes must not be charged either.
    assert!(!l.consume_request(100, 1).unwrap());
    let left = l.timer_remaining().unwrap().expect("armed");
    assert!(left <= 100 * MS && left > 90 * MS, "{left:?}");
    assert_eq!(l.budgets()[0].available(TokenKind::Bytes), Some(800));
    clock.advance(100 * MS);
    l.event_handled().unwrap();
    assert!(l.consume_request(100, 1).unwrap());
    // 800 + 100 earned - 100 = 800 bytes left.
    assert_eq!(l.budgets()[0].available(TokenKind::Bytes), Some(800));
    assert_eq!(l.budgets()[0].available(TokenKind::Ops), Some(0));
    l.replenish(1, TokenKind::Ops);
    assert_eq!(l.budgets()[0].available(TokenKind::Ops), Some(1));
}

#[test]
fn the_timer_waits_for_the_slowest_budget() {
    let clock = Arc::new(ManualClock::default());
    let own = Budget::with_clock(&bytes(1_000, 100), clock.clone()).unwrap();
    let vm = Budget::with_clock(&bytes(100, 100), clock.clone()).unwrap();
    let mut a = RateLimiter::with_budgets(vec![own, vm.clone()]).unwrap();
    let mut b = RateLimiter::with_budgets(vec![vm.clone()]).unwrap();
    assert!(a.consume(100, TokenKind::Bytes).unwrap());
    // The VM-wide budget is shared: b finds it empty too.
    assert!(!b.consume(50, TokenKind::Bytes).unwrap());
    let left = b.timer_remaining().unwrap().expect("armed");
    assert!(left <= 500 * MS && left > 450 * MS, "{left:?}");
    // a's own budget needs 50 ms for 50 bytes, the VM's 500 ms: the timer says 500 ms.
    assert!(!a.consume(50, TokenKind::Bytes).unwrap());
    let left = a.timer_remaining().unwrap().expect("armed");
    assert!(left > 450 * MS, "{left:?}");
    // Nothing was charged to a's own budget by the refused request.
    assert_eq!(a.budgets()[0].available(TokenKind::Bytes), Some(0));
    // 1 s later the VM budget has earned its 100 bytes, enough for both.
    clock.advance(1000 * MS);
    a.event_handled().unwrap();
    b.event_handled().unwrap();
    assert!(b.consume(50, TokenKind::Bytes).unwrap());
    assert!(a.consume(50, TokenKind::Bytes).unwrap());
    assert_eq!(vm.available(TokenKind::Bytes), Some(0));
    assert_eq!(a.budgets()[0].available(TokenKind::Bytes), Some(50));
}

#[test]
fn a_limiter_without_budgets_or_buckets_never_blocks() {
    let mut l = RateLimiter::with_budgets(Vec::new()).unwrap();
    assert!(l.is_unlimited());
    assert!(l.consume_request(u64::MAX, u64::MAX).unwrap());
    let (mut l, _) = limiter(RateLimitConfig::default());
    assert!(l.is_unlimited());
    assert!(l.consume_request(u64::MAX, u64::MAX).unwrap());
    assert!(!l.is_blocked());
}

#[test]
fn sustained_rate_matches_the_configured_one() {
    // A reader that asks for 64 KiB whenever allowed, on a simulated clock: over 10 s at
    // 4 MiB/s with a 64 KiB burst it moves 40 MiB plus the burst, to within one request.
    let rate = 4u64 << 20;
    let (mut l, clock) = limiter(bytes(rate, 64 << 10));
    let mut moved = 0u64;
    let end = Duration::from_secs(10);
    while clock.now() < end {
        if l.consume(64 << 10, TokenKind::Bytes).unwrap() {
            moved += 64 << 10;
        } else {
            // Sleep exactly as long as the timer says, then retry.
            let wait = l.timer_remaining().unwrap().expect("armed");
            let exact = l.budgets()[0].wait_for(64 << 10, 0);
            assert!(wait <= exact);
            clock.advance(exact);
            l.event_handled().unwrap();
        }
    }
    let expected = 10 * rate + (64 << 10);
    assert!(
        moved.abs_diff(expected) <= 64 << 10,
        "{moved} vs {expected}"
    );
}

#[test]
fn the_timerfd_becomes_readable() {
    let mut l = RateLimiter::new(&bytes(1_000, 1)).unwrap();
    assert!(l.consume(1, TokenKind::Bytes).unwrap());
    assert!(!l.consume(1, TokenKind::Bytes).unwrap());
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&l),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, alive across the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 5_000) };
    assert_eq!(n, 1, "the timer did not fire within 5 s");
    l.event_handled().unwrap();
    // Read: no longer readable.
    // SAFETY: as above.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    assert_eq!(n, 0);
    assert!(l.consume(1, TokenKind::Bytes).unwrap());
}
