//! Rate limits: over budget, transmit chains wait in their ring and received frames wait in
//! the tap, in order, and go once the budget refills. The budgets run on a [`ManualClock`],
//! so what may pass is decided by the test, not by timing; the limiter's real timerfd only
//! decides when the device looks again.

use super::*;
use keel_rate_limiter::{BucketConfig, Budget, ManualClock, RateLimitConfig};

/// `rate` frames per second, `burst` at once, on `clock`.
fn frames_per_sec(clock: &Arc<ManualClock>, rate: u64, burst: u64) -> Budget {
    let cfg = RateLimitConfig {
        bandwidth: None,
        ops: Some(BucketConfig {
            rate,
            size: burst,
            one_time_burst: 0,
        }),
    };
    Budget::with_clock(&cfg, clock.clone()).unwrap()
}

#[test]
fn tx_over_budget_waits_in_the_ring() {
    let clock = Arc::new(ManualClock::default());
    let tx = frames_per_sec(&clock, 10, 2);
    let Some(mut rig) = Rig::limited("tx_over_budget_waits_in_the_ring", 0, None, Some(tx)) else {
        return;
    };
    for i in 0..5u16 {
        rig.post_tx(i, TX_BUFS + u64::from(i) * 0x800, &frame(i as u8 + 1, 100));
    }
    rig.kick_tx();
    rig.tx.wait_used(2);
    // The timer (100 ms) fires and finds the simulated clock still: nothing more goes.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rig.tx.used_idx(), 2);
    assert_eq!(rig.counters().tx_frames + rig.counters().tx_errors, 2);
    // A kick while blocked changes nothing either.
    rig.kick_tx();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.tx.used_idx(), 2);
    // However long it waited, the bucket holds 2: two more go, then one after 100 ms.
    clock.advance(Duration::from_secs(1));
    rig.tx.wait_used(4);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(rig.tx.used_idx(), 4);
    clock.advance(Duration::from_millis(100));
    rig.tx.wait_used(5);
    let heads: Vec<u32> = (0..5).map(|i| rig.tx.used(i).0).collect();
    assert_eq!(heads, [0, 1, 2, 3, 4]);
    // They reached the tap in order, the last one included.
    rig.sock.recv_tagged(5);
    rig.assert_healthy();
}

#[test]
fn rx_over_budget_waits_in_the_tap() {
    let clock = Arc::new(ManualClock::default());
    let rx = frames_per_sec(&clock, 10, 2);
    let Some(mut rig) = Rig::limited("rx_over_budget_waits_in_the_tap", MRG, Some(rx), None) else {
        return;
    };
    let buf = |i: u16| RX_BUFS + u64::from(i) * 0x1000;
    for i in 0..4 {
        rig.post_rx(i, buf(i), 2048);
    }
    rig.kick_rx();
    let frames: Vec<_> = (1..=4).map(|t| frame(t, 60 + usize::from(t))).collect();
    for f in &frames {
        rig.sock.send(f);
    }
    rig.rx.wait_used(2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rig.rx.used_idx(), 2, "frames went past the budget");
    assert_eq!(rig.counters().rx_dropped, 0);
    clock.advance(Duration::from_millis(200));
    rig.rx.wait_used(4);
    for (i, f) in frames.iter().enumerate() {
        let i = i as u16;
        assert_eq!(rig.rx.used(i), (u32::from(i), f.len() as u32 + 12));
        assert_eq!(rig.read(buf(i) + 12, f.len()), *f);
    }
    let c = rig.counters();
    assert_eq!((c.rx_frames, c.rx_dropped), (4, 0));
    rig.assert_healthy();
}
