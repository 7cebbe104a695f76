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
//! A next receiver that takes frames, but slowly, is given up by the same
//! rule: the kernel wakes a write blocked on a full socket only once about
//! a third of the send buffer has drained, so one that reads less than
//! that in a wait (megabytes, on autotuned buffers) took nothing in it as
//! the link sees it.
//!
//! `wait` is what the sender names in the start ([`relay_wait`]): longer
//! for a receiver nearer the head, so that a frozen receiver is given up by
//! the one before it, never by those further up (each of which is held,
//! through the queues between, for as long as the one after it is).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use pagecast_channel::{Channel, ChannelWriter, Closer, Tls};
use pagecast_proto::v1;

/// Frames queued for the next receiver (about 1 MiB of pages).
pub(crate) const RELAY_FRAMES: usize = 256;
/// How often a link held by a full queue looks again.
const HELD_POLL: Duration = Duration::from_millis(2);
/// The pace at which a link waits for its queue to drain at the end.
const DRAIN_FLOOR: u64 = 1 << 20;
/// The most a start may ask a link to wait for its next receiver.
pub(crate) const MAX_RELAY_WAIT: Duration = Duration::from_secs(60);
/// The shortest step between two receivers' waits.
const MIN_STEP: Duration = Duration::from_millis(250);

/// How long the receiver `after` receivers from the chain's end (of
/// `chain` receivers) waits for the next one before it gives it up, for a
/// sender that gives up a silent receiver after `silent` and judges the
/// head's feed over that and `slack`: a quarter of the silence limit for
/// each receiver after it (1.25 s by default), so the one before a frozen
/// receiver gives it up first, by at least a step. The head is held for as
/// long as its own wait, and the sender's send to it fails at the write
/// limit: no wait is longer than three quarters of that limit (7.5 s), nor
/// the silence limit and half the slack, so the step shrinks in long
/// chains, to [`MIN_STEP`] at least. A chain longer than the longest wait
/// over that (30 receivers) keeps the order in its last 30; the receivers
/// before them share the longest wait.
pub fn relay_wait(silent: Duration, slack: Duration, chain: usize, after: usize) -> Duration {
    let budget = (silent + slack / 2).min(pagecast_channel::WRITE_TIMEOUT * 3 / 4);
    let chain = u32::try_from(chain.max(1)).unwrap_or(u32::MAX);
    let step = (silent / 4).min(budget / chain).max(MIN_STEP);
    let after = u32::try_from(after).unwrap_or(u32::MAX).min(chain);
    step.checked_mul(after).unwrap_or(budget).min(budget)
}

/// What the link and the relay's thread share.
#[derive(Default)]
struct Shared {
    /// When the next receiver last took a frame (or the relay began), in
    /// milliseconds from the relay's start.
    took: AtomicU64,
    /// Why the relay's thread stopped, when it did.
    failed: Mutex<Option<String>>,
    /// Set once the link lets the next receiver go: the thread writes
    /// nothing more.
    gone: AtomicBool,
    /// Closes the connection to the next receiver under the thread.
    closer: Mutex<Option<Closer>>,
}

impl Shared {
    /// Lets the next receiver go: the thread stops at its next frame, and
    /// a write it is blocked in fails now.
    fn let_go(&self) {
        self.gone.store(true, Ordering::Release);
        if let Some(c) = self.closer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            c.shutdown();
        }
    }
}

/// The flags a link shares with its receiver's session.
#[derive(Clone, Default)]
pub(crate) struct LinkFlags {
    /// Set while the link waits on a full queue, so the receiver does not
    /// blame its predecessor for the pages it is not passed meanwhile.
    pub(crate) held: Arc<AtomicBool>,
    /// Set by the session when it ends: the link waits on the next
    /// receiver no more.
    pub(crate) ended: Arc<AtomicBool>,
}

/// The relay to the next receiver, seen from the link.
pub(crate) struct Relay {
    /// The queue; `None` once the next receiver is given up.
    tx: Option<mpsc::SyncSender<v1::CastFrame>>,
    shared: Arc<Shared>,
    epoch: Instant,
    wait: Duration,
    flags: LinkFlags,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Starts relaying to the receiver at `next`, which must hold the
    /// certificate `name` ("" for any host).
    pub(crate) fn start(
        (next, name): (String, String),
        tls: &Tls,
        wait: Duration,
        flags: LinkFlags,
    ) -> Relay {
        let (tx, rx) = mpsc::sync_channel::<v1::CastFrame>(RELAY_FRAMES);
        let epoch = Instant::now();
        let shared = Arc::new(Shared::default());
        let thread = {
            let (tls, shared) = (tls.clone(), shared.clone());
            std::thread::spawn(move || {
                if let Err(e) = relay((&next, &name), &tls, wait, (rx, &shared, epoch)) {
                    *shared.failed.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(format!("the next receiver {next}: {e}"));
                }
            })
        };
        Relay {
            tx: Some(tx),
            shared,
            epoch,
            wait,
            flags,
            thread: Some(thread),
        }
    }

    fn since_taken(&self) -> Duration {
        let took = Duration::from_millis(self.shared.took.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(took)
    }

    /// Queues `f` for the next receiver, waiting while the queue is full
    /// for as long as the next receiver takes frames. `Err` (why) once it
    /// is given up: it failed or took nothing for the relay's wait (or the
    /// session ended meanwhile); the link then goes on without it.
    pub(crate) fn pass(&mut self, f: v1::CastFrame) -> Result<(), String> {
        let r = self.queue(f);
        r.map_err(|why| self.give_up(why))
    }

    /// [`Relay::pass`] up to the verdict: `Err(None)` when the relay
    /// failed (for the reason it gave), `Err(Some(why))` when the link
    /// gives the next receiver up.
    fn queue(&self, f: v1::CastFrame) -> Result<(), Option<String>> {
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        let mut f = match tx.try_send(f) {
            Ok(()) => return Ok(()),
            Err(mpsc::TrySendError::Full(f)) => f,
            Err(mpsc::TrySendError::Disconnected(_)) => return Err(None),
        };
        self.flags.held.store(true, Ordering::Release);
        let r = loop {
            if self.since_taken() > self.wait {
                let why = format!(
                    "the next receiver took nothing for {:?}; gave it up",
                    self.wait
                );
                break Err(Some(why));
            }
            if self.flags.ended.load(Ordering::Acquire) {
                break Err(Some("the session ended".into()));
            }
            std::thread::sleep(HELD_POLL);
            f = match tx.try_send(f) {
                Ok(()) => break Ok(()),
                Err(mpsc::TrySendError::Full(f)) => f,
                Err(mpsc::TrySendError::Disconnected(_)) => break Err(None),
            };
        };
        self.flags.held.store(false, Ordering::Release);
        r
    }

    /// Lets the next receiver go, for `why` (`None`: its relay failed, for
    /// the reason it gave).
    fn give_up(&mut self, why: Option<String>) -> String {
        self.tx = None;
        self.thread = None;
        self.shared.let_go();
        why.unwrap_or_else(|| {
            self.shared
                .failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_else(|| "the next receiver's relay ended".into())
        })
    }

    /// At the chain's end: lets the queue drain to the next receiver for
    /// at most the relay's wait plus the queue at 1 MiB/s (or until the
    /// session ends), so that what this receiver took reaches it too; then
    /// lets it go.
    pub(crate) fn drain(mut self) -> Result<(), String> {
        self.tx = None;
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        let within = self.wait
            + Duration::from_secs((RELAY_FRAMES * pagecast_pages::PAGE_SIZE) as u64 / DRAIN_FLOOR);
        let deadline = Instant::now() + within;
        while !t.is_finished()
            && Instant::now() < deadline
            && !self.flags.ended.load(Ordering::Acquire)
        {
            std::thread::sleep(HELD_POLL);
        }
        if !t.is_finished() {
            self.shared.let_go();
            return Err(format!(
                "the next receiver had not taken the chain's last pages within {within:?}"
            ));
        }
        let _ = t.join();
        match self
            .shared
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Relay {
    /// A link that ends without draining (its predecessor failed, or its
    /// session ended) writes nothing more to the next receiver.
    fn drop(&mut self) {
        if self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            self.shared.let_go();
        }
    }
}

/// The relay's thread: connects to the next receiver and writes it what
/// the link queues, each frame within `wait`, until the queue closes or
/// the link lets it go.
fn relay(
    (next, name): (&str, &str),
    tls: &Tls,
    wait: Duration,
    (rx, shared, epoch): (mpsc::Receiver<v1::CastFrame>, &Shared, Instant),
) -> Result<(), String> {
    let mut w = successor(next, name, tls, wait)?;
    // The closer first, then the flag: either the link finds the closer,
    // or this finds the flag.
    *shared.closer.lock().unwrap_or_else(|p| p.into_inner()) = w.closer().ok();
    let mark = || {
        let now = epoch.elapsed().as_millis() as u64;
        shared.took.store(now, Ordering::Release);
    };
    mark();
    for f in rx {
        if shared.gone.load(Ordering::Acquire) {
            break;
        }
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

    /// Each receiver waits a step less than the one before it (at least
    /// 250 ms), the last (with no one after it) not at all, and none
    /// longer than three quarters of the write limit, at which the
    /// sender's send to a held head fails; past 30 receivers, the first
    /// share the longest wait.
    #[test]
    fn a_receiver_waits_a_step_less_than_the_one_before_it() {
        let slack = Duration::from_secs(15);
        let budget = pagecast_channel::WRITE_TIMEOUT * 3 / 4;
        for silent in [1, 3, 5, 10, 120].map(Duration::from_secs) {
            for chain in [1, 2, 4, 16, 30, 64, 1000] {
                let waits: Vec<Duration> = (0..chain)
                    .map(|k| relay_wait(silent, slack, chain, chain - k - 1))
                    .collect();
                assert_eq!(waits[chain - 1], Duration::ZERO);
                let ordered = &waits[chain.saturating_sub(31)..];
                for w in ordered.windows(2) {
                    if w[0] < budget {
                        assert!(w[0] - w[1] >= MIN_STEP, "{silent:?} {chain}: {w:?}");
                    }
                    assert!(w[0] >= w[1], "{silent:?} {chain}: {w:?}");
                }
                let strictly = waits.windows(2).filter(|w| w[0] > w[1]).count();
                assert!(
                    strictly >= (chain - 1).min(30),
                    "{silent:?} {chain}: {waits:?}"
                );
                assert!(
                    waits[0] <= budget && waits[0] <= silent + slack / 2,
                    "{waits:?}"
                );
            }
        }
        assert_eq!(
            relay_wait(Duration::from_secs(5), slack, 4, 3),
            Duration::from_millis(3750)
        );
        assert_eq!(
            relay_wait(Duration::from_secs(5), slack, 3, 1),
            Duration::from_millis(1250)
        );
    }
}
