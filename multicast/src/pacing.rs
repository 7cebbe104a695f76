//! A token bucket that paces sending to a rate.

use std::time::{Duration, Instant};

/// Paces bytes to `rate` bytes per second with a burst allowance.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket for `bits_per_second`, allowing bursts of `burst` bytes.
    pub fn new(bits_per_second: u64, burst: usize, now: Instant) -> Self {
        TokenBucket {
            rate: bits_per_second as f64 / 8.0,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
        }
    }

    /// How long to wait before `bytes` may be sent at `now`; takes the
    /// tokens when the answer is zero.
    pub fn delay(&mut self, bytes: usize, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst.max(bytes as f64));
        let need = bytes as f64;
        if self.tokens >= need {
            self.tokens -= need;
            Duration::ZERO
        } else {
            Duration::from_secs_f64((need - self.tokens) / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_the_rate_over_time() {
        let t0 = Instant::now();
        // 8 Mbit/s = 1 MB/s, burst of one 4 KiB page.
        let mut b = TokenBucket::new(8_000_000, 4096, t0);
        let mut t = t0;
        let mut sent = 0;
        while t < t0 + Duration::from_secs(2) {
            let d = b.delay(4096, t);
            if d.is_zero() {
                sent += 4096;
            } else {
                t += d;
            }
        }
        let rate = sent as f64 / 2.0;
        assert!((rate - 1e6).abs() < 1e6 * 0.01, "{rate}");
    }
}
