//! A token bucket for log lines: anyone can cause an unauthenticated
//! reject, so those are logged at a bounded rate and the rest counted.

use std::time::Instant;

/// Unauthenticated rejects logged per second on average, and in a burst.
/// Past that they are only counted, so a flood cannot flood the journal.
const REJECT_LOGS_PER_SEC: f64 = 5.0;
const REJECT_LOG_BURST: f64 = 20.0;

/// A token bucket for log lines.
pub(super) struct LogLimiter {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl LogLimiter {
    pub(super) fn new(now: Instant) -> LogLimiter {
        LogLimiter {
            tokens: REJECT_LOG_BURST,
            last: now,
            suppressed: 0,
        }
    }

    /// Whether to log now; if so, how many lines were suppressed before.
    pub(super) fn allow(&mut self, now: Instant) -> Option<u64> {
        let refill = now.duration_since(self.last).as_secs_f64() * REJECT_LOGS_PER_SEC;
        self.tokens = (self.tokens + refill).min(REJECT_LOG_BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A burst of 20 lines, then 5 a second; what was held back is counted
    /// and reported with the next line let through.
    #[test]
    fn the_reject_log_allows_a_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut limiter = LogLimiter::new(t0);
        let burst = (0..100).filter(|_| limiter.allow(t0).is_some()).count();
        assert_eq!(burst, 20);
        assert_eq!(limiter.allow(t0 + Duration::from_millis(100)), None);
        // 0.2 s later a token has refilled: 81 lines were held back.
        assert_eq!(limiter.allow(t0 + Duration::from_millis(200)), Some(81));
        let later = t0 + Duration::from_secs(60);
        let refilled = (0..100).filter(|_| limiter.allow(later).is_some()).count();
        assert_eq!(refilled, 20, "never more than the burst");
    }
}
