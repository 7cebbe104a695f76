//! Pacing: a token bucket that holds sending to a rate, and the loss-driven
//! control ([`Aimd`]) that lowers that rate while the receivers lose
//! datagrams, so that a cast shares a congested link instead of taking it.

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

    /// Paces to `bits_per_second` from now on.
    pub fn set_rate(&mut self, bits_per_second: f64) {
        self.rate = (bits_per_second / 8.0).max(1.0);
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

/// How long the loss control looks before it judges the rate.
pub const AIMD_INTERVAL: Duration = Duration::from_millis(100);
/// A share of the pages sent in an interval that the receivers asked to
/// be sent again above which the rate is cut (below it, it climbs back).
const LOSS_CUT: f64 = 0.05;
/// The cut: the rate times this.
const CUT: f64 = 0.7;
/// The climb per interval, a share of the rate the cast was given.
const CLIMB: f64 = 0.05;
/// The rate never goes below the given one over this.
const FLOOR: f64 = 16.0;

/// Additive increase, multiplicative decrease of a cast's rate, driven by
/// loss: the receivers' repair requests. A cast is paced to the share of
/// each link its coordinator gave it; when something else crosses a link
/// too (another job's casts, TCP streams of migrations) and the link
/// drops datagrams, the receivers ask for them again, and the cast cuts
/// its rate by 30% for each interval of 100 ms that loses more than 5% of
/// what it sent, and climbs back by 5% of its given rate for each that
/// loses less. (Letting the interval after a cut pass unjudged, since its
/// requests are partly for the same losses, was tried: TCP beside the cast
/// then took 1.41-1.43 s for 16 MiB instead of 0.79-0.81 s.) Two casts sharing a link converge to equal shares, and a TCP
/// stream beside a cast keeps a share instead of starving. Never above the
/// given rate, never below a sixteenth of it.
#[derive(Debug, Clone)]
pub struct Aimd {
    given: f64,
    rate: f64,
    sent: u64,
    lost: u64,
    since: Instant,
    cuts: u64,
    lowest: f64,
}

impl Aimd {
    /// Control for a cast given `bits_per_second`.
    pub fn new(bits_per_second: u64, now: Instant) -> Self {
        let given = bits_per_second as f64;
        Aimd {
            given,
            rate: given,
            sent: 0,
            lost: 0,
            since: now,
            cuts: 0,
            lowest: given,
        }
    }

    /// `pages` went out for the first time.
    pub fn sent(&mut self, pages: u64) {
        self.sent += pages;
    }

    /// The receivers asked for `pages` again.
    pub fn lost(&mut self, pages: u64) {
        self.lost += pages;
    }

    /// Judges the interval that ended by `now`, if one did: the new rate,
    /// if it changed.
    pub fn tick(&mut self, now: Instant) -> Option<f64> {
        if now.saturating_duration_since(self.since) < AIMD_INTERVAL {
            return None;
        }
        self.since = now;
        let (sent, lost) = (self.sent, self.lost);
        self.sent = 0;
        self.lost = 0;
        if sent == 0 {
            return None;
        }
        let loss = lost as f64 / sent as f64;
        let before = self.rate;
        if loss > LOSS_CUT {
            self.rate = (self.rate * CUT).max(self.given / FLOOR);
            self.cuts += 1;
        } else {
            self.rate = (self.rate + self.given * CLIMB).min(self.given);
        }
        self.lowest = self.lowest.min(self.rate);
        (self.rate != before).then_some(self.rate)
    }

    /// The rate now, bits per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Times the rate was cut.
    pub fn cuts(&self) -> u64 {
        self.cuts
    }

    /// The lowest rate it went to, bits per second.
    pub fn lowest(&self) -> f64 {
        self.lowest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Casts given `given` each share a link of `link` bits per second,
    /// starting at `start`: each interval the link drops what exceeds it,
    /// from each in proportion to what it sent. Their rates after 300
    /// intervals (30 s), averaged over the last 100.
    fn share(given: f64, link: f64, start: &[f64]) -> (Vec<f64>, f64) {
        let mut t = Instant::now();
        let mut casts: Vec<Aimd> = start
            .iter()
            .map(|&r| {
                let mut a = Aimd::new(given as u64, t);
                a.rate = r;
                a
            })
            .collect();
        let mut sums = vec![0.0; casts.len()];
        let mut lost_total = 0.0;
        for i in 0..300 {
            let offered: f64 = casts.iter().map(|c| c.rate()).sum();
            let drop = (1.0 - link / offered).max(0.0);
            for (k, c) in casts.iter_mut().enumerate() {
                // Pages of 4 KiB in an interval of 100 ms.
                let pages = (c.rate() * 0.1 / 8.0 / 4096.0) as u64;
                c.sent(pages);
                c.lost((pages as f64 * drop) as u64);
                if i >= 200 {
                    sums[k] += c.rate();
                    lost_total += drop / 100.0;
                }
            }
            t += AIMD_INTERVAL;
            for c in &mut casts {
                c.tick(t);
            }
        }
        (
            sums.iter().map(|s| s / 100.0).collect(),
            lost_total / casts.len() as f64,
        )
    }

    #[test]
    fn two_casts_on_one_link_converge_to_equal_shares() {
        // Both given the whole 1 Gbit/s link; one starts at full rate, the
        // other at its floor.
        let (rates, loss) = share(1e9, 1e9, &[1e9, 1e9 / 16.0]);
        let (a, b) = (rates[0], rates[1]);
        assert!(
            (a / b - 1.0).abs() < 0.25,
            "shares {a:.3e} and {b:.3e} are not near equal"
        );
        // Together they use most of the link and lose little of it.
        assert!(a + b > 0.7e9 && a + b < 1.15e9, "{a:.3e} + {b:.3e}");
        assert!(loss < 0.08, "they lose {loss:.3} of what they send");
    }

    #[test]
    fn alone_on_its_link_a_cast_keeps_its_rate_and_never_goes_past_it() {
        let (rates, _) = share(5e8, 1e9, &[5e8]);
        assert_eq!(rates[0], 5e8);
        let mut a = Aimd::new(1_000_000, Instant::now());
        let mut t = Instant::now();
        for _ in 0..50 {
            a.sent(100);
            a.lost(100);
            t += AIMD_INTERVAL;
            a.tick(t);
        }
        // Losing everything: down to its floor, not below.
        assert_eq!(a.rate(), 1_000_000.0 / 16.0);
        assert!(a.cuts() > 0 && a.lowest() == a.rate());
        // Nothing sent in an interval: no judgement.
        t += AIMD_INTERVAL;
        assert_eq!(a.tick(t), None);
    }

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
