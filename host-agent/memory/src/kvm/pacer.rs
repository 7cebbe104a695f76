//! Pacing the vCPU: a pure function of exits and time, so it is tested
//! without `/dev/kvm`.

use std::time::{Duration, Instant};

use super::IDLE_TICK;

/// Why the guest exited to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// It finished a batch of page writes.
    Batch,
    /// It ticked its progress counter with nothing to write.
    Idle,
    /// Anything else: the program never does this, so the VM is broken.
    Unexpected(String),
}

/// Holds the guest to its page-write rate: after each batch the vCPU waits
/// until the batch's share of a second at that rate has passed.
#[derive(Debug, Clone)]
pub struct Pacer {
    next: Instant,
}

/// How far the pacer lets a guest fall behind before forgetting the debt,
/// so a long pause is not followed by a burst.
const MAX_DEBT: Duration = Duration::from_millis(50);

impl Pacer {
    /// A pacer whose first batch may start at `now`.
    pub fn new(now: Instant) -> Self {
        Pacer { next: now }
    }

    /// Accounts for one exit at `now` with the VM's `rate` (page writes per
    /// second) and throttle (percent removed); returns when the vCPU may run
    /// again, or the fault that ends it.
    pub fn on_exit(
        &mut self,
        exit: &GuestExit,
        rate: u64,
        throttle_pct: u8,
        now: Instant,
    ) -> Result<Instant, String> {
        match exit {
            GuestExit::Unexpected(why) => Err(why.clone()),
            GuestExit::Idle => {
                self.next = now + IDLE_TICK;
                Ok(self.next)
            }
            GuestExit::Batch => {
                let effective = rate * u64::from(100 - throttle_pct.min(99)) / 100;
                if effective == 0 {
                    self.next = now + IDLE_TICK;
                    return Ok(self.next);
                }
                let batch = super::batch_for(rate) as f64;
                let share = Duration::from_secs_f64(batch / effective as f64);
                if self.next + MAX_DEBT < now {
                    self.next = now;
                }
                self.next += share;
                Ok(self.next)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        let mut t = t0;
        // 10,000 pages/s: 100 pages per batch, one batch per 10 ms.
        for _ in 0..100 {
            t = p.on_exit(&GuestExit::Batch, 10_000, 0, t).unwrap();
        }
        assert_eq!(t - t0, Duration::from_secs(1));
    }

    #[test]
    fn throttle_slows_proportionally() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        let mut t = t0;
        for _ in 0..10 {
            t = p.on_exit(&GuestExit::Batch, 10_000, 75, t).unwrap();
        }
        // A quarter of the rate: 10 batches of 100 pages take 400 ms.
        let took = (t - t0).as_secs_f64();
        assert!((took - 0.4).abs() < 1e-6, "{took}");
    }

    #[test]
    fn forgets_debt_after_a_pause() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        let late = t0 + Duration::from_secs(5);
        // 1,000 pages/s: batches of 10 pages, 10 ms each.
        let next = p.on_exit(&GuestExit::Batch, 1000, 0, late).unwrap();
        assert_eq!(next, late + Duration::from_millis(10));
    }

    #[test]
    fn idle_and_faults() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        assert_eq!(p.on_exit(&GuestExit::Idle, 0, 0, t0), Ok(t0 + IDLE_TICK));
        // Throttle is capped at 99%: 100 pages/s becomes 1 page/s, and a
        // batch of one page then takes a second.
        let mut p = Pacer::new(t0);
        assert_eq!(
            p.on_exit(&GuestExit::Batch, 100, 100, t0),
            Ok(t0 + Duration::from_secs(1))
        );
        assert_eq!(
            p.on_exit(&GuestExit::Unexpected("Hlt".into()), 100, 0, t0),
            Err("Hlt".to_string())
        );
    }
}
