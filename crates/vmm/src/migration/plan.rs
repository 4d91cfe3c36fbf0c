//! When to stop pre-copy: the bandwidth measured so far and the downtime budget.

use keel_migration::PAGE;
use std::time::Duration;

/// Pre-copy's bookkeeping.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// The longest the guest may be paused for the last copy.
    budget: Duration,
    /// Rounds after which pre-copy gives up converging.
    max_rounds: u32,
    rounds: u32,
    bytes: u64,
    busy: Duration,
}

/// What to do after a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Send another round of dirty pages.
    Round,
    /// What is left fits the budget: pause and send it.
    StopAndCopy,
    /// Pre-copy does not converge (the guest dirties pages faster than they go).
    NotConverging,
}

impl Plan {
    pub(crate) fn new(budget: Duration, max_rounds: u32) -> Plan {
        Plan {
            budget,
            max_rounds: max_rounds.max(1),
            rounds: 0,
            bytes: 0,
            busy: Duration::ZERO,
        }
    }

    /// A round sent `bytes` in `took`.
    pub(crate) fn record(&mut self, bytes: u64, took: Duration) {
        self.rounds += 1;
        self.bytes += bytes;
        self.busy += took;
    }

    pub(crate) fn rounds(&self) -> u32 {
        self.rounds
    }

    /// Bytes per second so far (`None` before anything measurable was sent).
    pub(crate) fn bandwidth(&self) -> Option<f64> {
        let s = self.busy.as_secs_f64();
        (s > 0.0 && self.bytes > 0).then(|| self.bytes as f64 / s)
    }

    /// How long sending `pages` pages would take at the bandwidth so far.
    pub(crate) fn estimate(&self, pages: u64) -> Option<Duration> {
        let bw = self.bandwidth()?;
        Some(Duration::from_secs_f64(pages as f64 * PAGE as f64 / bw))
    }

    /// After a round, with `dirty` pages dirtied meanwhile.
    pub(crate) fn next(&self, dirty: u64) -> Next {
        match self.estimate(dirty) {
            Some(t) if t <= self.budget => Next::StopAndCopy,
            _ if dirty == 0 => Next::StopAndCopy,
            _ if self.rounds >= self.max_rounds => Next::NotConverging,
            _ => Next::Round,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_when_what_is_left_fits_the_budget_at_the_measured_bandwidth() {
        // 100 MiB/s measured; a 20 ms budget holds 2 MiB = 512 pages.
        let mut p = Plan::new(Duration::from_millis(20), 30);
        assert_eq!(p.bandwidth(), None);
        // Nothing measured yet: only an empty dirty set is safe to stop on.
        assert_eq!(p.next(1), Next::Round);
        assert_eq!(p.next(0), Next::StopAndCopy);
        p.record(100 << 20, Duration::from_secs(1));
        assert_eq!(p.bandwidth(), Some((100 << 20) as f64));
        assert_eq!(p.next(512), Next::StopAndCopy);
        assert_eq!(p.next(513), Next::Round);
        let est = p.estimate(256).unwrap();
        assert!((est.as_secs_f64() - 0.01).abs() < 1e-9, "{est:?}");
    }

    #[test]
    fn gives_up_after_its_rounds_when_the_guest_dirties_too_fast() {
        let mut p = Plan::new(Duration::from_millis(5), 3);
        for _ in 0..2 {
            p.record(10 << 20, Duration::from_millis(100));
            assert_eq!(p.next(1 << 20), Next::Round);
        }
        p.record(10 << 20, Duration::from_millis(100));
        assert_eq!(p.rounds(), 3);
        assert_eq!(p.next(1 << 20), Next::NotConverging);
        // Still converged if the guest went quiet.
        assert_eq!(p.next(10), Next::StopAndCopy);
    }
}
