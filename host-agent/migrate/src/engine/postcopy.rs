//! The source's side of post-copy (a move of a VM whose memory this host
//! controls): at the pause it names the frames the destination still
//! lacks and sends the vCPU state; after Commit it answers the
//! destination's requests before anything else and pushes every other
//! missing frame, read from the paused VM and hashed as it goes; then the
//! digest of the whole table, which the destination must match.
//!
//! From Commit on the VM runs at the destination: a failure there leaves
//! it in doubt here (never resumed), and the destination, which can no
//! longer complete its memory, stops its copy.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use pagecast_memory::DirtyBitmap;
use pagecast_pages::PageHash;
use pagecast_proto::{MAX_MIGRATE_PAGES_PER_FRAME, MAX_NEED_HASHES_PER_FRAME, v1};

use super::rounds::send_frames;
use super::{Body, Class, DestState, Fleet};
use crate::{MigrationError, table_digest};

/// Frames still to send after a post-copy switchover, and what was done.
pub(crate) struct Push {
    /// The round number post-copy pages travel under.
    round: u32,
    /// Missing frames in order; `next` is the first not yet pushed.
    missing: Vec<u64>,
    next: usize,
    /// Frames sent since the switchover.
    sent: DirtyBitmap,
    /// Frames asked for, to send first (each once: `queued`).
    urgent: VecDeque<u64>,
    queued: DirtyBitmap,
    pub requested: u64,
    pub pages: u64,
    /// When the destination said the VM resumed.
    pub resumed: Option<Instant>,
    /// When every page this host was to push had gone (the destination may
    /// still be gathering others elsewhere).
    pub pushed: Option<Instant>,
    /// `--verify-full`: every frame's hash, from all of the paused memory.
    full: Option<Vec<PageHash>>,
}

impl Push {
    /// After the pause: `missing` (the frames dirty since they were sent)
    /// to destination `i`, then the vCPU state. The destination answers
    /// Ready once every other frame is there.
    pub fn switchover(
        fleet: &mut Fleet,
        i: usize,
        missing: &DirtyBitmap,
        round: u32,
        full: Option<Vec<PageHash>>,
    ) -> Result<Push, MigrationError> {
        let frames: Vec<u64> = missing.iter().collect();
        // The table the destination must already hold: every frame not
        // listed is as last sent (the VM is paused, none changed since).
        let masked = fleet.table.iter().enumerate().map(|(f, h)| {
            if missing.get(f as u64) {
                crate::postcopy::MASKED
            } else {
                *h
            }
        });
        let digest = crate::digest_of(masked).to_vec();
        let mut chunks = frames.chunks(MAX_NEED_HASHES_PER_FRAME).peekable();
        loop {
            let chunk = chunks.next().unwrap_or(&[]);
            let last = chunks.peek().is_none();
            let m = v1::PostcopyMissing {
                frames: chunk.to_vec(),
                last,
                digest: if last {
                    digest.clone().into()
                } else {
                    Default::default()
                },
            };
            fleet.send(i, Body::PostcopyMissing(m), Class::Control);
            if last {
                break;
            }
        }
        let (regs, sregs) = fleet.vm.vcpu_state()?.to_bytes();
        let vcpu = v1::VcpuState {
            regs: regs.into(),
            sregs: sregs.into(),
        };
        fleet.send(i, Body::Vcpu(vcpu), Class::Vcpu);
        match fleet.expect(i, "readiness for post-copy") {
            Some(Body::Ready(r)) if r.ok => {}
            Some(Body::Ready(r)) => fleet.fail(i, MigrationError::Verification(r.reason)),
            Some(other) => fleet.fail(
                i,
                MigrationError::Protocol(format!("expected ready, got {other:?}")),
            ),
            None => {}
        }
        Ok(Push {
            round,
            missing: frames,
            next: 0,
            sent: DirtyBitmap::new(fleet.vm.page_count()),
            urgent: VecDeque::new(),
            queued: DirtyBitmap::new(fleet.vm.page_count()),
            requested: 0,
            pages: 0,
            resumed: None,
            pushed: None,
            full,
        })
    }

    /// Commit to destination `i`, answering its requests until it says the
    /// VM resumed there. Destination states: Live (resumed, post-copy
    /// goes on), Failed (it did not start the VM: the source may run on)
    /// or InDoubt.
    pub fn commit(&mut self, fleet: &mut Fleet, i: usize) {
        fleet.committed = true;
        fleet.send(i, Body::Commit(v1::Commit {}), Class::Control);
        if let Err(e) = self.pump(fleet, i, false) {
            let d = &mut fleet.dests[i];
            d.state = match (&d.state, e) {
                (_, e @ MigrationError::Aborted { .. }) => DestState::Failed(e),
                (DestState::Failed(e), _) => DestState::InDoubt(e.to_string()),
                (_, e) => DestState::InDoubt(e.to_string()),
            };
        }
    }

    /// Every missing frame not sent yet, requests first; then the digest
    /// and the destination's verdict. Any failure leaves it in doubt.
    pub fn finish(&mut self, fleet: &mut Fleet, i: usize) {
        let r = self.pump(fleet, i, true).and_then(|()| {
            if self.full.as_ref().is_some_and(|f| *f != fleet.table) {
                return Err(MigrationError::Verification(
                    "the pages pushed differ from the source's memory at the pause".into(),
                ));
            }
            let d = v1::Digest {
                digest: table_digest(&fleet.table).to_vec().into(),
                full: Vec::new().into(),
            };
            fleet.send(i, Body::Digest(d), Class::Control);
            self.pushed = Some(Instant::now());
            loop {
                return match fleet.expect(i, "the end of post-copy") {
                    // Asked for while its page was on the way (sent
                    // already, skipped), or a page the destination was to
                    // gather elsewhere and could not: sent now.
                    Some(Body::PageRequest(r)) => {
                        self.asked(&r.frames, fleet.vm.page_count())?;
                        loop {
                            let batch = self.batch(false);
                            if batch.is_empty() {
                                break;
                            }
                            send_frames(fleet, &[i], &batch, self.round)?;
                            self.pages += batch.len() as u64;
                        }
                        continue;
                    }
                    Some(Body::PostcopyDone(d)) if d.ok => Ok(()),
                    Some(Body::PostcopyDone(d)) => Err(MigrationError::Verification(d.reason)),
                    Some(other) => Err(MigrationError::Protocol(format!(
                        "expected the end of post-copy, got {other:?}"
                    ))),
                    None => Err(MigrationError::Protocol("the destination failed".into())),
                };
            }
        });
        let d = &mut fleet.dests[i];
        d.state = match (std::mem::replace(&mut d.state, DestState::Stopped), r) {
            (DestState::Live, Ok(())) => {
                d.verified = true;
                DestState::Done
            }
            (DestState::Failed(e), _) | (_, Err(e)) => DestState::InDoubt(format!(
                "post-copy did not finish, the VM runs at the destination without every page: \
                 {e}"
            )),
            (other, Ok(())) => other,
        };
    }

    /// Sends what is asked for (and, `background`, every other missing
    /// frame) until all is sent, or (not `background`) until the
    /// destination says the VM resumed.
    fn pump(
        &mut self,
        fleet: &mut Fleet,
        i: usize,
        background: bool,
    ) -> Result<(), MigrationError> {
        let pages = fleet.vm.page_count();
        let mut idle_since = Instant::now();
        loop {
            if !fleet.dests[i].live() {
                return Err(MigrationError::Protocol("the destination failed".into()));
            }
            while let Some(b) = fleet.dests[i].t.link.poll_frame()? {
                match b {
                    Body::PageRequest(r) => self.asked(&r.frames, pages)?,
                    Body::Resumed(r) => {
                        fleet.dests[i].progress_after = r.progress;
                        self.resumed = Some(Instant::now());
                        if !background {
                            return Ok(());
                        }
                    }
                    Body::KeepAlive(_) => {}
                    Body::Abort(a) => return Err(MigrationError::from_abort(a)),
                    other => {
                        return Err(MigrationError::Protocol(format!(
                            "unexpected {other:?} during post-copy"
                        )));
                    }
                }
            }
            let batch = self.batch(background);
            if batch.is_empty() {
                if background && self.next >= self.missing.len() && self.urgent.is_empty() {
                    return Ok(());
                }
                if idle_since.elapsed() > fleet.opts.reply_timeout {
                    return Err(MigrationError::Timeout {
                        peer: fleet.dests[i].t.link.peer(),
                        what: "the VM to resume",
                        after: fleet.opts.reply_timeout,
                    });
                }
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            idle_since = Instant::now();
            send_frames(fleet, &[i], &batch, self.round)?;
            self.pages += batch.len() as u64;
        }
    }

    /// Queues the frames a request names to go first. A frame asked for
    /// again (or requests spammed by a hostile destination) is queued
    /// once, so the queue never outgrows the VM's frames.
    fn asked(&mut self, frames: &[u64], pages: u64) -> Result<(), MigrationError> {
        for &f in frames {
            if f >= pages {
                return Err(MigrationError::Protocol(format!(
                    "request for frame {f} of {pages}"
                )));
            }
            self.requested += 1;
            if !self.sent.get(f) && !self.queued.get(f) {
                self.queued.set(f)?;
                self.urgent.push_back(f);
            }
        }
        Ok(())
    }

    /// The next frames to send: asked-for ones first, then (`background`)
    /// the missing ones in order; none twice.
    fn batch(&mut self, background: bool) -> Vec<u64> {
        let mut out = Vec::with_capacity(MAX_MIGRATE_PAGES_PER_FRAME);
        while out.len() < MAX_MIGRATE_PAGES_PER_FRAME {
            let f = match self.urgent.pop_front() {
                Some(f) => f,
                None if background && self.next < self.missing.len() => {
                    self.next += 1;
                    self.missing[self.next - 1]
                }
                None => break,
            };
            if !self.sent.get(f) && self.sent.set(f).is_ok() {
                out.push(f);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(missing: &[u64], pages: u64) -> Push {
        Push {
            round: 1,
            missing: missing.to_vec(),
            next: 0,
            sent: DirtyBitmap::new(pages),
            urgent: VecDeque::new(),
            queued: DirtyBitmap::new(pages),
            requested: 0,
            pages: 0,
            resumed: None,
            pushed: None,
            full: None,
        }
    }

    /// Frames asked for go before the rest, in the order asked; then the
    /// missing frames in order; none twice, however often asked for; and
    /// nothing but what was asked for until the VM has resumed.
    #[test]
    fn requests_go_first_and_every_frame_once() {
        let mut p = push(&[1, 2, 3, 4, 5, 6], 16);
        p.urgent.extend([5, 2]);
        assert_eq!(
            p.batch(false),
            vec![5, 2],
            "only requests before the resume"
        );
        assert_eq!(p.batch(false), Vec::<u64>::new());
        p.urgent.extend([5, 9]);
        assert_eq!(
            p.batch(true),
            vec![9, 1, 3, 4, 6],
            "sent frames are skipped"
        );
        assert!(p.batch(true).is_empty());
        assert_eq!(p.next, p.missing.len());
        // A batch holds at most a frame's worth of pages.
        let many: Vec<u64> = (0..200).collect();
        let mut p = push(&many, 256);
        assert_eq!(p.batch(true).len(), MAX_MIGRATE_PAGES_PER_FRAME);
    }

    /// A destination asking for the same frames over and over (a hostile
    /// one, or a guest that keeps faulting) grows the queue by each frame
    /// once; a frame outside memory is refused.
    #[test]
    fn spammed_requests_queue_each_frame_once() {
        let mut p = push(&[3, 4], 16);
        for _ in 0..10_000 {
            p.asked(&[3, 4, 3], 16).unwrap();
        }
        assert_eq!(p.urgent.len(), 2, "queued once each");
        assert_eq!(p.requested, 30_000, "every request counted");
        assert_eq!(p.batch(false), vec![3, 4]);
        p.asked(&[3], 16).unwrap();
        assert!(p.urgent.is_empty(), "a frame sent is not queued again");
        assert!(p.asked(&[16], 16).is_err(), "beyond memory");
    }
}
