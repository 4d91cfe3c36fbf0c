//! Log lines a guest can trigger at will (a device it broke, a BAR it moved onto another) must
//! not let it flood the host's logs: [`guest_warn!`](crate::guest_warn) passes the first few
//! from each call site, then one in [`EVERY`], each saying how many were held back.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lines passed from a call site before limiting starts.
pub const BURST: u64 = 10;
/// Past the burst, one line in this many is logged.
pub const EVERY: u64 = 1000;

/// A call site's count of lines.
pub struct LogBudget {
    seen: AtomicU64,
}

impl LogBudget {
    pub const fn new() -> Self {
        LogBudget {
            seen: AtomicU64::new(0),
        }
    }

    /// `Some(held back since the last line logged)` when this line may be logged.
    pub fn allow(&self) -> Option<u64> {
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        if n < BURST {
            Some(0)
        } else if (n - BURST + 1).is_multiple_of(EVERY) {
            Some(EVERY - 1)
        } else {
            None
        }
    }
}

impl Default for LogBudget {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` for guest-triggered events, limited per call site (see [`LogBudget`]).
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static BUDGET: $crate::log::LogBudget = $crate::log::LogBudget::new();
        match BUDGET.allow() {
            Some(0) => ::tracing::warn!($($arg)+),
            Some(held) => ::tracing::warn!(
                "{} ({held} similar lines held back)",
                format_args!($($arg)+)
            ),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_in_every() {
        let b = LogBudget::new();
        let allowed: Vec<u64> = (0..BURST + 3 * EVERY).filter_map(|_| b.allow()).collect();
        assert_eq!(allowed.len() as u64, BURST + 3);
        assert!(allowed[..BURST as usize].iter().all(|&h| h == 0));
        assert!(allowed[BURST as usize..].iter().all(|&h| h == EVERY - 1));
    }
}
