//! A chain link's relay to the next receiver.
//!
//! The link hands each frame it takes from its predecessor to a bounded
//! queue, which a thread of the relay's own connects to the next receiver
//! and writes out. A next receiver that is slow to connect, or that froze
//! (its connection still open), then holds the link only once the queue
//! is full, and at most `wait` after it last took a frame: the link gives
//! it up and goes on taking pages for its own receiver. Before, the link
//! wrote each page to the next receiver itself before handing it on, so a
//! frozen next receiver starved the receiver before it, which gave its
//! own link up, and so on up the chain to its head.
//!
//! `wait` is what the sender names in the start ([`relay_wait`]): longer
//! for a receiver nearer the head, so that a frozen receiver is given up by
//! the one before it, never by those further up (each of which is held,
//! through the queues between, for as long as the one after it is).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use pagecast_channel::{Channel, ChannelWriter, Tls};
use pagecast_proto::v1;

/// Frames queued for the next receiver (about 1 MiB of pages).
pub(crate) const RELAY_FRAMES: usize = 256;
/// How often a link held by a full queue looks again.
const HELD_POLL: Duration = Duration::from_millis(2);
/// The pace at which a link waits for its queue to drain at the end.
const DRAIN_FLOOR: u64 = 1 << 20;
/// The most a start may ask a link to wait for its next receiver.
pub(crate) const MAX_RELAY_WAIT: Duration = Duration::from_secs(60);

/// How long the receiver `after` receivers from the chain's end (of
/// `chain` receivers) waits for the next one to take a frame before it
/// gives it up, for a sender that gives up a silent receiver after
/// `silent`: an eighth of that for each receiver after it, so the one
/// before a frozen receiver gives it up first, by at least that step,
/// and the head waits at most the silence limit (or that plus half of
/// `slack` for a long chain: the sender judges the head's feed over the
/// silence limit and `slack`).
pub fn relay_wait(silent: Duration, slack: Duration, chain: usize, after: usize) -> Duration {
    let chain = u32::try_from(chain.max(1)).unwrap_or(u32::MAX);
    let step = (silent / 8).min((silent + slack / 2) / chain);
    step * u32::try_from(after).unwrap_or(u32::MAX).min(chain)
}

/// The relay to the next receiver, seen from the link.
pub(crate) struct Relay {
    /// The queue; `None` once the next receiver is given up.
    tx: Option<mpsc::SyncSender<v1::CastFrame>>,
    /// When the next receiver last took a frame (or the relay began), in
    /// milliseconds from `epoch`.
    took: Arc<AtomicU64>,
    epoch: Instant,
    /// Why the relay's thread stopped, when it did.
    failed: Arc<Mutex<Option<String>>>,
    wait: Duration,
    /// Set while the link waits on a full queue, so its own receiver does
    /// not blame its predecessor for the pages it is not passed meanwhile.
    held: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Starts relaying to the receiver at `next`, which must hold the
    /// certificate `name` ("" for any host).
    pub(crate) fn start(
        next: String,
        name: String,
        tls: &Tls,
        wait: Duration,
        held: Arc<AtomicBool>,
    ) -> Relay {
        let (tx, rx) = mpsc::sync_channel::<v1::CastFrame>(RELAY_FRAMES);
        let epoch = Instant::now();
        let took = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(Mutex::new(None));
        let thread = {
            let (tls, took, failed) = (tls.clone(), took.clone(), failed.clone());
            std::thread::spawn(move || {
                let r = relay(&next, &name, &tls, wait, (rx, &took, epoch));
                if let Err(e) = r {
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(format!("the next receiver {next}: {e}"));
                }
            })
        };
        Relay {
            tx: Some(tx),
            took,
            epoch,
            failed,
            wait,
            held,
            thread: Some(thread),
        }
    }

    fn since_taken(&self) -> Duration {
        let took = Duration::from_millis(self.took.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(took)
    }

    fn why_failed(&self) -> String {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "the next receiver's relay ended".into())
    }

    /// Queues `f` for the next receiver, waiting while the queue is full
    /// for as long as the next receiver takes frames. `Err` (why) once it
    /// is given up: it failed, or took nothing for the relay's wait; the
    /// link then goes on without it.
    pub(crate) fn pass(&mut self, f: v1::CastFrame) -> Result<(), String> {
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        let mut f = match tx.try_send(f) {
            Ok(()) => return Ok(()),
            Err(mpsc::TrySendError::Full(f)) => f,
            Err(mpsc::TrySendError::Disconnected(_)) => return Err(self.give_up(None)),
        };
        self.held.store(true, Ordering::Release);
        let r = loop {
            if self.since_taken() > self.wait {
                break Err(self.give_up(Some(self.wait)));
            }
            std::thread::sleep(HELD_POLL);
            f = match tx.try_send(f) {
                Ok(()) => break Ok(()),
                Err(mpsc::TrySendError::Full(f)) => f,
                Err(mpsc::TrySendError::Disconnected(_)) => break Err(self.give_up(None)),
            };
        };
        self.held.store(false, Ordering::Release);
        r
    }

    /// Lets the next receiver go: the relay's thread writes nothing more
    /// than it is writing (its write limit is the relay's wait).
    fn give_up(&mut self, silent: Option<Duration>) -> String {
        self.tx = None;
        self.thread = None;
        match silent {
            Some(w) => format!("the next receiver took nothing for {w:?}; gave it up"),
            None => self.why_failed(),
        }
    }

    /// At the chain's end: lets the queue drain to the next receiver for
    /// at most the relay's wait plus the queue at 1 MiB/s, so that what
    /// this receiver took reaches it too; then leaves it.
    pub(crate) fn drain(mut self) -> Result<(), String> {
        self.tx = None;
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        let within = self.wait
            + Duration::from_secs((RELAY_FRAMES * pagecast_pages::PAGE_SIZE) as u64 / DRAIN_FLOOR);
        let deadline = Instant::now() + within;
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(HELD_POLL);
        }
        if !t.is_finished() {
            return Err(format!(
                "the next receiver had not taken the chain's last pages within {within:?}"
            ));
        }
        let _ = t.join();
        match self.failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The relay's thread: connects to the next receiver and writes it what
/// the link queues, each frame within `wait`, until the queue closes.
fn relay(
    next: &str,
    name: &str,
    tls: &Tls,
    wait: Duration,
    (rx, took, epoch): (mpsc::Receiver<v1::CastFrame>, &AtomicU64, Instant),
) -> Result<(), String> {
    let mut w = successor(next, name, tls, wait)?;
    let mark = || took.store(epoch.elapsed().as_millis() as u64, Ordering::Release);
    mark();
    for f in rx {
        w.send(&f).map_err(|e| e.to_string())?;
        mark();
    }
    Ok(())
}

/// The chain successor at `next`, which must hold the certificate `name`
/// ("" for any host), with a write limit of `wait` per frame.
fn successor(next: &str, name: &str, tls: &Tls, wait: Duration) -> Result<ChannelWriter, String> {
    let s = crate::session::connect(next).map_err(|e| e.to_string())?;
    let mut ch = Channel::client(s, tls).map_err(|e| e.to_string())?;
    if !name.is_empty() && ch.identity().name != name {
        return Err(format!(
            "it is {}, not the next receiver {name:?}",
            ch.identity()
        ));
    }
    ch.set_write_limit(wait.max(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    ch.split().map(|(_, w)| w).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each receiver waits a step less than the one before it, the last
    /// (with no one after it) not at all, and the head of a long chain no
    /// more than the silence limit plus half the slack.
    #[test]
    fn a_receiver_waits_a_step_less_than_the_one_before_it() {
        let (silent, slack) = (Duration::from_secs(5), Duration::from_secs(15));
        for chain in [1, 2, 4, 16, 64, 1000] {
            let waits: Vec<Duration> = (0..chain)
                .map(|k| relay_wait(silent, slack, chain, chain - k - 1))
                .collect();
            assert_eq!(waits[chain - 1], Duration::ZERO);
            for w in waits.windows(2) {
                assert!(w[0] > w[1], "{chain}: {w:?}");
                assert_eq!(w[0] - w[1], waits[chain - 2], "{chain}: equal steps");
            }
            assert!(waits[0] <= silent + slack / 2, "{chain}: {:?}", waits[0]);
        }
        assert_eq!(relay_wait(silent, slack, 4, 3), silent / 8 * 3);
    }
}
