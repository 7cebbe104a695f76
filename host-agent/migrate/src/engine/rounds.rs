//! The engine's own transfer, for a VM whose memory and vCPU this host
//! controls (a KVM micro-VM): round 0 of what each destination lacks,
//! pre-copy rounds from the dirty log until the rest fits the downtime
//! target (slowing the guest when it does not converge), then a
//! stop-and-copy switchover, the vCPU state and a digest every
//! destination checks before it may start the VM.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use pagecast_memory::DirtyBitmap;
use pagecast_memory::fingerprint::{Fingerprinter, read_and_hash};
use pagecast_pages::{PAGE_SIZE, PageHash};
use pagecast_proto::{MAX_MIGRATE_PAGES_PER_FRAME, v1};

use super::postcopy::Push;
use super::{Body, Class, DestState, Fleet, Transfer, stages};
use crate::{CAST_MIN_PAGES, Caster, Hold, MigrationError, Round, Switchover, table_digest};

/// The rounds' state between stages.
#[derive(Default)]
pub(crate) struct Rounds {
    /// The round the switchover sends in.
    round: u32,
    /// The guest's throttle, percent.
    throttle: u8,
    /// When the source paused.
    paused: Option<Instant>,
    /// A post-copy switchover: what is still to push.
    push: Option<Push>,
}

/// How pre-copy ended.
enum Then {
    /// Stop and copy what is left.
    StopAndCopy,
    /// Resume at the destination now and complete its memory after.
    Postcopy,
}

/// Pre-copy ends when what is left would take this share of the downtime
/// target to send; the rest of the target is for the fixed costs of
/// switching over.
const DRAIN_SHARE: f64 = 0.6;

/// Under `auto`, the throttle tried before post-copy: a guest still too
/// fast at half speed resumes at its destination rather than be slowed
/// further.
const AUTO_THROTTLE: u8 = 50;

impl Transfer for Rounds {
    fn transfer(
        &mut self,
        fleet: &mut Fleet,
        hold: &mut Option<&mut dyn Hold>,
        caster: &mut Option<&mut dyn Caster>,
        fp: &Fingerprinter,
    ) -> Result<(), MigrationError> {
        let last = round_zero(fleet)?;
        fleet.any_left()?;
        let (rest, then) = self.precopy(fleet, hold, caster, last)?;
        fleet.check_cancel(hold)?;
        match then {
            Then::StopAndCopy => self.switchover(fleet, caster, rest, fp),
            Then::Postcopy => self.postcopy_switchover(fleet, rest, fp),
        }
    }

    fn postcopy(&mut self, fleet: &mut Fleet) -> Result<(), MigrationError> {
        let Some(push) = self.push.as_mut() else {
            return Ok(());
        };
        if let Some(i) = fleet.alive().first().copied() {
            fleet.tell(v1::MigratePhase::Postcopy);
            push.finish(fleet, i);
        }
        fleet.report.postcopy_requested = push.requested;
        fleet.report.postcopy_pages = push.pages;
        fleet.report.postcopy_ms = push
            .resumed
            .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
        fleet.report.pages_gathered = fleet.dests.iter().map(|d| d.gathering).sum();
        fleet.report.postcopy_pushed_ms = match (push.resumed, push.pushed) {
            (Some(r), Some(p)) => p.saturating_duration_since(r).as_secs_f64() * 1e3,
            _ => fleet.report.postcopy_ms,
        };
        self.tally(fleet);
        Ok(())
    }

    fn commit(&mut self, fleet: &mut Fleet) -> Result<(), MigrationError> {
        if let Some(push) = self.push.as_mut() {
            if let Some(i) = fleet.alive().first().copied() {
                push.commit(fleet, i);
            }
            fleet.report.postcopy = true;
            fleet.report.downtime_ms = match (self.paused, push.resumed) {
                (Some(p), Some(r)) => r.duration_since(p).as_secs_f64() * 1e3,
                (Some(p), None) => p.elapsed().as_secs_f64() * 1e3,
                _ => 0.0,
            };
            return Ok(());
        }
        // From here a destination may run the VM: a move never resumes it.
        fleet.committed = true;
        for i in fleet.alive() {
            fleet.send(i, Body::Commit(v1::Commit {}), Class::Control);
            if let DestState::Failed(e) = &fleet.dests[i].state {
                // It may have had the Commit before the link broke.
                let why = e.to_string();
                fleet.dests[i].state = DestState::InDoubt(why);
            }
        }
        // Every destination owes its answer from now: those that froze
        // together cost the paused source one wait, not one each.
        let wait = fleet.opts.reply_timeout;
        let by = Instant::now() + wait;
        for i in fleet.alive() {
            let d = &mut fleet.dests[i];
            d.state = match super::recv_by(&mut *d.t.link, by, wait) {
                Ok(Body::Resumed(r)) => {
                    d.progress_after = r.progress;
                    DestState::Done
                }
                // It could not start the VM (a destination never aborts
                // once the VM runs there): it does not run there.
                Ok(Body::Abort(a)) => DestState::Failed(MigrationError::from_abort(a)),
                Ok(other) => DestState::InDoubt(format!("expected resumed, got {other:?}")),
                Err(e) => DestState::InDoubt(e.to_string()),
            };
        }
        let paused = self.paused.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
        fleet.report.downtime_ms = paused;
        self.tally(fleet);
        Ok(())
    }
}

impl Rounds {
    /// The report's verdict over the destinations that run the VM.
    fn tally(&self, fleet: &mut Fleet) {
        let done: Vec<_> = fleet
            .dests
            .iter()
            .filter(|d| matches!(d.state, DestState::Done))
            .collect();
        fleet.report.verified = !done.is_empty() && done.iter().all(|d| d.verified);
        fleet.report.verified_full = fleet.report.verified && fleet.opts.verify_full;
        fleet.report.progress_after = done.first().map_or(0, |d| d.progress_after);
    }

    /// Pause and resume at the destination without the last pages (see
    /// [`Push`]).
    fn postcopy_switchover(
        &mut self,
        fleet: &mut Fleet,
        rest: DirtyBitmap,
        fp: &Fingerprinter,
    ) -> Result<(), MigrationError> {
        fleet.any_left()?;
        let i = fleet.alive()[0];
        fleet.tell(v1::MigratePhase::Switchover);
        self.paused = Some(Instant::now());
        fleet.vm.pause()?;
        let round = self.round;
        let s = v1::Switchover {
            round,
            postcopy: true,
        };
        fleet.send(i, Body::Switchover(s), Class::Control);
        let mut rest = rest;
        let fresh = fleet.take_dirty()?;
        rest.merge(&fresh)?;
        // The first working set goes before the VM resumes there: what
        // the guest wrote during the last round (it touches those again
        // first), then what it wrote before, up to FIRST_WORKING_SET
        // frames; their hashes join the table the destination's copy is
        // checked against.
        let mut first: Vec<u64> = fresh.iter().take(FIRST_WORKING_SET).collect();
        if first.len() < FIRST_WORKING_SET {
            let more = rest.iter().filter(|&f| !fresh.get(f));
            first.extend(more.take(FIRST_WORKING_SET - first.len()));
        }
        send_frames(fleet, &[i], &first, round)?;
        for &f in &first {
            rest.clear(f);
        }
        // --verify-full: all of the paused memory hashed now. Every frame
        // not dirty must be what was sent; the dirty ones must be what the
        // push sends (checked at its end).
        let full = if fleet.opts.verify_full {
            let key = fleet.vm.content_key();
            let f = fp
                .pool()
                .install(|| fp.fingerprint(fleet.vm, &key, &|_| {}));
            let lost =
                (0..f.hashes.len()).find(|&k| !rest.get(k as u64) && f.hashes[k] != fleet.table[k]);
            if let Some(k) = lost {
                return Err(MigrationError::Verification(format!(
                    "frame {k} of the source differs from what it sent (dirty tracking lost it)"
                )));
            }
            Some(f.hashes)
        } else {
            None
        };
        self.push = Some(Push::switchover(fleet, i, &rest, round, full)?);
        Ok(())
    }
}

/// Most frames a post-copy switchover sends before the VM resumes at its
/// destination (1 MiB): the pages its guest touches first then need no
/// round trip to the source, inside the pause, at a few milliseconds'
/// cost at the link's rate.
const FIRST_WORKING_SET: usize = 256;

/// Round 0: to each destination what it lacks, one copy per content (or,
/// `per_frame`, every non-zero frame, as a per-VM pre-copy sends).
fn round_zero(fleet: &mut Fleet) -> Result<Round, MigrationError> {
    fleet.tell(v1::MigratePhase::Round0);
    let t = Instant::now();
    let mut pages = 0;
    // Where each needed content is, as the manifest said: sending to one
    // destination updates the table for frames that changed since.
    let frames_of = frames_of(fleet);
    for i in fleet.alive() {
        let before = fleet.report.pages_sent;
        if fleet.opts.per_frame {
            let frames: Vec<u64> = nonzero(&fleet.table);
            send_frames(fleet, &[i], &frames, 0)?;
        } else {
            let needs = std::mem::take(&mut fleet.dests[i].needs);
            send_needed(fleet, i, &needs, &frames_of)?;
        }
        pages = pages.max(fleet.report.pages_sent - before);
    }
    let last = Round {
        round: 0,
        pages,
        seconds: t.elapsed().as_secs_f64(),
        throttle_pct: 0,
    };
    fleet.report.rounds.push(last.clone());
    Ok(last)
}

/// The frames holding each content some destination lacks.
fn frames_of(fleet: &Fleet) -> HashMap<PageHash, Vec<u64>> {
    let wanted: HashSet<PageHash> = fleet
        .dests
        .iter()
        .filter(|d| d.live())
        .flat_map(|d| d.needs.iter().copied())
        .collect();
    let mut frames_of: HashMap<PageHash, Vec<u64>> = HashMap::with_capacity(wanted.len());
    for (f, h) in fleet.table.iter().enumerate() {
        if wanted.contains(h) {
            frames_of.entry(*h).or_default().push(f as u64);
        }
    }
    frames_of
}

fn nonzero(table: &[PageHash]) -> Vec<u64> {
    table
        .iter()
        .enumerate()
        .filter(|(_, h)| !h.is_zero_page())
        .map(|(f, _)| f as u64)
        .collect()
}

impl Rounds {
    /// Pre-copy rounds until the rest fits the downtime target (or the
    /// round limit); returns the dirty pages left for the switchover.
    fn precopy(
        &mut self,
        fleet: &mut Fleet,
        hold: &mut Option<&mut dyn Hold>,
        caster: &mut Option<&mut dyn Caster>,
        mut last: Round,
    ) -> Result<(DirtyBitmap, Then), MigrationError> {
        let budget = fleet.opts.max_downtime.mul_f64(DRAIN_SHARE);
        let postcopy = fleet.postcopy_allowed();
        let mut previous = u64::MAX;
        let mut round = 1u32;
        loop {
            fleet.check_cancel(hold)?;
            let dirty = fleet.take_dirty()?;
            let count = dirty.count();
            fleet.prog.round = round;
            fleet.prog.dirty_pages = count;
            let rate = rate(fleet, &last);
            let drain = Duration::from_secs_f64(count as f64 * PAGE_SIZE as f64 / rate.max(1.0));
            self.round = round;
            // A destination gathering pages from elsewhere cannot take a
            // stop-and-copy: it lacks them until it runs the VM.
            let gathering = fleet.dests.iter().any(|d| d.live() && d.gathering > 0);
            if postcopy && (fleet.opts.switchover == Switchover::Postcopy || gathering) {
                return Ok((dirty, Then::Postcopy));
            }
            if drain <= budget {
                return Ok((dirty, Then::StopAndCopy));
            }
            if round > fleet.opts.max_rounds {
                let then = if postcopy {
                    Then::Postcopy
                } else {
                    Then::StopAndCopy
                };
                return Ok((dirty, then));
            }
            // Not converging fast: the guest dirtied more than half of what
            // the last round sent while it was sent (or no fewer pages than
            // the round before). Slow the guest down (auto-converge, with
            // QEMU's trigger) rather than loop until the round limit; where
            // post-copy may be used, one step of that (half speed) first,
            // and if the rounds still stall, resume at the destination.
            let stalled = round >= 2
                && (count as f64 > last.pages as f64 * 0.5 || count as f64 > previous as f64 * 0.9);
            if stalled && postcopy && self.throttle >= AUTO_THROTTLE {
                return Ok((dirty, Then::Postcopy));
            }
            if stalled {
                self.throttle = if self.throttle == 0 {
                    50
                } else {
                    (self.throttle + 25).min(99)
                };
                fleet.vm.set_throttle(self.throttle);
                fleet.report.max_throttle_pct = fleet.report.max_throttle_pct.max(self.throttle);
                fleet.prog.throttle_pct = self.throttle;
            }
            previous = count;
            fleet.tell(v1::MigratePhase::Precopy);
            let frames: Vec<u64> = dirty.iter().collect();
            let t = Instant::now();
            send_round(fleet, caster, &frames, round)?;
            fleet.any_left()?;
            last = Round {
                round,
                pages: frames.len() as u64,
                seconds: t.elapsed().as_secs_f64(),
                throttle_pct: self.throttle,
            };
            fleet.report.rounds.push(last.clone());
            round += 1;
        }
    }

    /// Stop and copy: pause, the last dirty pages, the vCPU state and the
    /// digest; each destination checks it and says whether it is ready.
    fn switchover(
        &mut self,
        fleet: &mut Fleet,
        caster: &mut Option<&mut dyn Caster>,
        rest: DirtyBitmap,
        fp: &Fingerprinter,
    ) -> Result<(), MigrationError> {
        fleet.any_left()?;
        fleet.tell(v1::MigratePhase::Switchover);
        self.paused = Some(Instant::now());
        fleet.vm.pause()?;
        let round = self.round;
        for i in fleet.alive() {
            fleet.send(
                i,
                Body::Switchover(v1::Switchover {
                    round,
                    postcopy: false,
                }),
                Class::Control,
            );
        }
        let mut rest = rest;
        rest.merge(&fleet.take_dirty()?)?;
        let frames: Vec<u64> = rest.iter().collect();
        let t = Instant::now();
        send_round(fleet, caster, &frames, round)?;
        fleet.report.rounds.push(Round {
            round,
            pages: frames.len() as u64,
            seconds: t.elapsed().as_secs_f64(),
            throttle_pct: self.throttle,
        });
        let (regs, sregs) = fleet.vm.vcpu_state()?.to_bytes();
        let digest = table_digest(&fleet.table).to_vec();
        let full = if fleet.opts.verify_full {
            full_digest(fleet, fp)?
        } else {
            Vec::new()
        };
        for i in fleet.alive() {
            let vcpu = v1::VcpuState {
                regs: regs.clone().into(),
                sregs: sregs.clone().into(),
            };
            fleet.send(i, Body::Vcpu(vcpu), Class::Vcpu);
            let d = v1::Digest {
                digest: digest.clone().into(),
                full: full.clone().into(),
            };
            fleet.send(i, Body::Digest(d), Class::Control);
        }
        // Every destination owes its answer from now (see
        // `Fleet::expect_since`); those that answered wait for the Commit,
        // kept alive meanwhile.
        let asked = (Instant::now(), fleet.opts.reply_timeout);
        for i in fleet.alive() {
            match fleet.expect_since_keeping(i, "verification", asked, true) {
                Some(Body::Ready(r)) if r.ok => fleet.dests[i].verified = true,
                Some(Body::Ready(r)) => fleet.fail(i, MigrationError::Verification(r.reason)),
                Some(other) => fleet.fail(
                    i,
                    MigrationError::Protocol(format!("expected ready, got {other:?}")),
                ),
                None => {}
            }
        }
        Ok(())
    }
}

/// All of the source's memory hashed again at the pause: it must be what
/// the destinations were sent.
fn full_digest(fleet: &Fleet, fp: &Fingerprinter) -> Result<Vec<u8>, MigrationError> {
    let key = fleet.vm.content_key();
    let f = fp
        .pool()
        .install(|| fp.fingerprint(fleet.vm, &key, &|_| {}));
    if f.hashes != fleet.table {
        return Err(MigrationError::Verification(
            "the source's memory differs from what it sent (dirty tracking lost a page)".into(),
        ));
    }
    Ok(table_digest(&f.hashes).to_vec())
}

/// Bytes per second to plan with: what the last round achieved, bounded
/// by the bandwidth limit.
fn rate(fleet: &Fleet, last: &Round) -> f64 {
    let limit = fleet.opts.bandwidth_bps.map(|b| b as f64 / 8.0);
    let seen = (last.pages > 0 && last.seconds > 0.0)
        .then(|| last.pages as f64 * PAGE_SIZE as f64 / last.seconds);
    match (seen, limit) {
        (Some(s), Some(l)) => s.min(l),
        (Some(s), None) => s,
        (None, Some(l)) => l,
        (None, None) => 1e9,
    }
}

/// Reads `frames` now and sends them to the destinations `to`, 64 to a
/// message, each batch read once whatever the number of destinations.
pub(super) fn send_frames(
    fleet: &mut Fleet,
    to: &[usize],
    frames: &[u64],
    round: u32,
) -> Result<(), MigrationError> {
    let key = fleet.vm.content_key();
    let (mut buf, mut hashes) = (Vec::new(), Vec::new());
    for chunk in frames.chunks(MAX_MIGRATE_PAGES_PER_FRAME) {
        read_and_hash(fleet.vm, &key, chunk, &mut buf, &mut hashes)?;
        let mut hash_bytes = Vec::with_capacity(chunk.len() * 32);
        for (&f, h) in chunk.iter().zip(&hashes) {
            fleet.table[f as usize] = *h;
            hash_bytes.extend_from_slice(h.as_bytes());
        }
        let body = v1::Pages {
            frames: chunk.to_vec(),
            hashes: hash_bytes.into(),
            data: buf.clone().into(),
            round,
        };
        for &i in to {
            fleet.send(i, Body::Pages(body.clone()), Class::Pages);
        }
        fleet.report.pages_sent += chunk.len() as u64;
        fleet.prog.pages_sent = fleet.report.pages_sent;
        fleet.told();
    }
    Ok(())
}

/// One copy of each content destination `i` lacks, read from the first
/// frame holding it; contents that changed since the manifest go frame by
/// frame instead.
fn send_needed(
    fleet: &mut Fleet,
    i: usize,
    needed: &[PageHash],
    frames_of: &HashMap<PageHash, Vec<u64>>,
) -> Result<(), MigrationError> {
    let key = fleet.vm.content_key();
    let (mut buf, mut now) = (Vec::new(), Vec::new());
    let mut stale: Vec<u64> = Vec::new();
    for chunk in needed.chunks(MAX_MIGRATE_PAGES_PER_FRAME) {
        let mut firsts = Vec::with_capacity(chunk.len());
        for h in chunk {
            let Some(frames) = frames_of.get(h) else {
                fleet.fail(
                    i,
                    MigrationError::Protocol(format!(
                        "the destination asked for {h}, which no frame holds"
                    )),
                );
                return Ok(());
            };
            firsts.push(frames[0]);
        }
        read_and_hash(fleet.vm, &key, &firsts, &mut buf, &mut now)?;
        let (mut hashes, mut data) = (Vec::new(), Vec::new());
        for (k, h) in chunk.iter().enumerate() {
            if now[k] == *h {
                hashes.extend_from_slice(h.as_bytes());
                data.extend_from_slice(&buf[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]);
            } else {
                // The content moved on since the manifest.
                stale.extend(&frames_of[h]);
            }
        }
        if !hashes.is_empty() {
            let n = (hashes.len() / 32) as u64;
            let body = v1::PagesByHash {
                hashes: hashes.into(),
                data: data.into(),
            };
            fleet.send(i, Body::ByHash(body), Class::Pages);
            fleet.report.pages_sent += n;
            fleet.prog.pages_sent = fleet.report.pages_sent;
            fleet.told();
        }
    }
    stale.sort_unstable();
    send_frames(fleet, &[i], &stale, 0)
}

/// A round's frames to every destination still in the run: by multicast
/// when several take many pages (falling back to the links for those the
/// cast did not complete, and for zero pages, which casts do not carry),
/// else read once and sent over each link.
fn send_round(
    fleet: &mut Fleet,
    caster: &mut Option<&mut dyn Caster>,
    frames: &[u64],
    round: u32,
) -> Result<(), MigrationError> {
    let alive = fleet.alive();
    if alive.is_empty() || frames.is_empty() {
        return Ok(());
    }
    let Some(c) = caster
        .as_deref_mut()
        .filter(|_| frames.len() >= CAST_MIN_PAGES && alive.len() > 1)
    else {
        return send_frames(fleet, &alive, frames, round);
    };
    let (complete, zeros) = match stages::cast(fleet, c, frames, &[], true, &alive) {
        Ok(o) => {
            let mut zeros = Vec::new();
            for (k, &f) in frames.iter().enumerate() {
                fleet.table[f as usize] = o.hashes[k];
                if o.hashes[k].is_zero_page() {
                    zeros.push(f);
                }
            }
            (o.complete, zeros)
        }
        Err(_) => (vec![false; alive.len()], Vec::new()),
    };
    for (r, &i) in alive.iter().enumerate() {
        if !complete.get(r).copied().unwrap_or(false) {
            send_frames(fleet, &[i], frames, round)?;
        } else if !zeros.is_empty() {
            send_frames(fleet, &[i], &zeros, round)?;
        }
    }
    Ok(())
}
