//! One running VM cloned live to several destinations: each page leaves
//! the source once.
//!
//! ```text
//! source                                         destinations (each of N)
//!   | MigrateBegin {clone name, held} ----------> |  reserve memory
//!   | ManifestHeader, ManifestChunk x k --------> |  fill what it holds
//!   | <---------------------------- NeedHashes    |
//!   | CastJoin {control} -----------------------> |  join the cast
//!   | ~~ each missing content once, multicast ~~> |  (grouped by who lacks it)
//!   | Refill -----------------------------------> |
//!   | <------------------ NeedHashes (the rest)   |
//!   | PagesByHash (the rest, unicast) ----------> |
//!   | CastJoin {by_frame} / Pages (dirty rounds) > |  a round's pages once
//!   | [pause] the last dirty pages, VcpuState,    |
//!   |   Digest -----------------------------------> |  verify
//!   | <-------------------------------- Ready     |
//!   | Commit -----------------------------------> |  start the clone
//!   | <-------------------------------- Resumed   |
//!   | [resume the source VM]                      |
//! ```
//!
//! A destination that fails drops out; the others go on; the source VM
//! always runs on (it is paused only between the last round and the
//! clones' Resumed).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use pagecast_memory::fingerprint::{Fingerprinter, read_and_hash};
use pagecast_memory::manifest::Manifest;
use pagecast_pages::{PAGE_SIZE, PageHash};
use pagecast_proto::{MAX_MANIFEST_CHUNK_FRAMES, MAX_MIGRATE_PAGES_PER_FRAME, WIRE_VERSION, v1};

use crate::{
    MigrateOptions, MigrationError, MigrationLink, Progress, SourceVm, table_digest, wire_len,
};

type Body = v1::migrate_frame::Body;

/// A round with at least this many pages goes by multicast; smaller ones
/// over each destination's link.
pub const CAST_MIN_PAGES: usize = 256;

/// What a cast of some of the VM's frames did.
#[derive(Debug, Clone, Default)]
pub struct CastOutcome {
    /// The hash of each frame as it was staged (same order as asked).
    pub hashes: Vec<PageHash>,
    /// Per receiver: it received every page meant for it.
    pub complete: Vec<bool>,
    /// Bytes the cast sent.
    pub bytes: u64,
}

/// Sends pages of the VM once to several receivers (the agent runs the
/// transport).
pub trait Caster {
    /// Reads and stages `frames` now, hashing each, and sends them once:
    /// page `i` to the receivers `members[i]` (indexes into `receivers`; an
    /// empty `members` means every receiver for every page). Calls
    /// `invite(r, control)` for each receiver once the sender listens.
    fn cast(
        &mut self,
        frames: &[u64],
        members: &[Vec<usize>],
        by_frame: bool,
        receivers: &[String],
        invite: &mut dyn FnMut(usize, &str) -> Result<(), MigrationError>,
    ) -> Result<CastOutcome, MigrationError>;
}

/// One destination of a clone.
pub struct CloneTarget {
    /// The clone's name.
    pub name: String,
    /// The destination agent's name (its name as a cast receiver).
    pub host: String,
    /// The link to it.
    pub link: Box<dyn MigrationLink>,
}

/// One clone's outcome.
#[derive(Debug, Clone, Default)]
pub struct CloneResultOne {
    /// The clone's name.
    pub name: String,
    /// Its host.
    pub host: String,
    /// It runs there.
    pub ok: bool,
    /// Its memory matched the source's at switchover.
    pub verified: bool,
    /// Why not.
    pub error: Option<v1::Refusal>,
}

/// What a clone did.
#[derive(Debug, Clone, Default)]
pub struct CloneReportAll {
    /// Per destination.
    pub clones: Vec<CloneResultOne>,
    /// Bytes sent over the links.
    pub bytes_links: u64,
    /// Bytes sent by casts.
    pub bytes_cast: u64,
    /// The source VM's pause.
    pub downtime_ms: f64,
    /// From start to finish.
    pub total_ms: f64,
    /// Pre-copy rounds (after round 0).
    pub rounds: u32,
}

struct Dest {
    t: CloneTarget,
    alive: bool,
    error: Option<v1::Refusal>,
    verified: bool,
}

struct Cl<'a> {
    vm: &'a dyn SourceVm,
    dests: Vec<Dest>,
    opts: &'a MigrateOptions,
    table: Vec<PageHash>,
    report: CloneReportAll,
    progress: &'a mut dyn FnMut(&Progress),
    prog: Progress,
}

/// Clones `vm` to every target. The source VM runs on whatever happens.
pub fn clone_out(
    vm: &dyn SourceVm,
    targets: Vec<CloneTarget>,
    caster: &mut dyn Caster,
    fp: &Fingerprinter,
    opts: &MigrateOptions,
    progress: &mut dyn FnMut(&Progress),
) -> CloneReportAll {
    let started = Instant::now();
    let mut c = Cl {
        vm,
        dests: targets
            .into_iter()
            .map(|t| Dest {
                t,
                alive: true,
                error: None,
                verified: false,
            })
            .collect(),
        opts,
        table: Vec::new(),
        report: CloneReportAll::default(),
        progress,
        prog: Progress::default(),
    };
    if let Err(e) = c.run(caster, fp) {
        for d in c.dests.iter_mut().filter(|d| d.alive) {
            d.alive = false;
            d.error = Some(e.refusal());
            let _ = d.t.link.send(Body::Abort(e.to_abort()));
        }
    }
    // The source runs on, unthrottled, in every case.
    c.vm.set_throttle(0);
    c.vm.resume();
    c.report.total_ms = started.elapsed().as_secs_f64() * 1e3;
    c.report.clones = c
        .dests
        .iter()
        .map(|d| CloneResultOne {
            name: d.t.name.clone(),
            host: d.t.host.clone(),
            ok: d.alive && d.verified,
            verified: d.verified,
            error: d.error.clone(),
        })
        .collect();
    c.report
}

impl Cl<'_> {
    fn tell(&mut self, phase: v1::MigratePhase) {
        self.prog.phase = phase;
        (self.progress)(&self.prog);
    }

    /// Sends to destination `i`; a failure drops it.
    fn send(&mut self, i: usize, body: Body) {
        if !self.dests[i].alive {
            return;
        }
        let n = wire_len(&body);
        match self.dests[i].t.link.send(body) {
            Ok(()) => {
                self.report.bytes_links += n;
                self.prog.bytes_sent = self.report.bytes_links + self.report.bytes_cast;
            }
            Err(e) => self.fail(i, e),
        }
    }

    fn fail(&mut self, i: usize, e: MigrationError) {
        let d = &mut self.dests[i];
        if d.alive {
            d.alive = false;
            d.error = Some(e.refusal());
            let _ = d.t.link.send(Body::Abort(e.to_abort()));
        }
    }

    fn expect(&mut self, i: usize, what: &'static str) -> Option<Body> {
        if !self.dests[i].alive {
            return None;
        }
        loop {
            match self.dests[i].t.link.recv(Some(self.opts.reply_timeout)) {
                Ok(Body::KeepAlive(_)) => continue,
                Ok(Body::Abort(a)) => {
                    self.fail(i, MigrationError::from_abort(a));
                    return None;
                }
                Ok(b) => return Some(b),
                Err(MigrationError::Timeout { after, .. }) => {
                    self.fail(i, MigrationError::Timeout { what, after });
                    return None;
                }
                Err(e) => {
                    self.fail(i, e);
                    return None;
                }
            }
        }
    }

    fn alive(&self) -> Vec<usize> {
        (0..self.dests.len())
            .filter(|&i| self.dests[i].alive)
            .collect()
    }

    fn read_needs(&mut self, i: usize) -> Option<Vec<PageHash>> {
        let mut needed = Vec::new();
        loop {
            match self.expect(i, "list of needed pages")? {
                Body::Need(n) if n.hashes.len() % 32 == 0 => {
                    needed.extend(
                        n.hashes
                            .chunks_exact(32)
                            .map(|h| PageHash::try_from(h).expect("32 bytes")),
                    );
                    if needed.len() > self.table.len() {
                        self.fail(i, MigrationError::Protocol("more needs than frames".into()));
                        return None;
                    }
                    if n.last {
                        return Some(needed);
                    }
                }
                other => {
                    self.fail(
                        i,
                        MigrationError::Protocol(format!("expected needed pages, got {other:?}")),
                    );
                    return None;
                }
            }
        }
    }

    /// Sends `frames` (read now) to destination `i` over its link.
    fn send_frames(&mut self, i: usize, frames: &[u64], round: u32) -> Result<(), MigrationError> {
        let (mut buf, mut hashes) = (Vec::new(), Vec::new());
        for chunk in frames.chunks(MAX_MIGRATE_PAGES_PER_FRAME) {
            read_and_hash(
                self.vm,
                &self.vm.content_key(),
                chunk,
                &mut buf,
                &mut hashes,
            )?;
            let mut hb = Vec::with_capacity(chunk.len() * 32);
            for (&f, h) in chunk.iter().zip(&hashes) {
                self.table[f as usize] = *h;
                hb.extend_from_slice(h.as_bytes());
            }
            self.send(
                i,
                Body::Pages(v1::Pages {
                    frames: chunk.to_vec(),
                    hashes: hb.into(),
                    data: buf.clone().into(),
                    round,
                }),
            );
        }
        Ok(())
    }

    /// Sends the contents `needed` to destination `i` over its link, one
    /// copy each; a content that changed goes frame by frame.
    fn send_needed(&mut self, i: usize, needed: &[PageHash]) -> Result<(), MigrationError> {
        let mut frames_of: HashMap<PageHash, Vec<u64>> = HashMap::new();
        let wanted: std::collections::HashSet<&PageHash> = needed.iter().collect();
        for (f, h) in self.table.iter().enumerate() {
            if wanted.contains(h) {
                frames_of.entry(*h).or_default().push(f as u64);
            }
        }
        let (mut buf, mut now) = (Vec::new(), Vec::new());
        let mut stale = Vec::new();
        for chunk in needed.chunks(MAX_MIGRATE_PAGES_PER_FRAME) {
            let known: Vec<&PageHash> =
                chunk.iter().filter(|h| frames_of.contains_key(h)).collect();
            let firsts: Vec<u64> = known.iter().map(|h| frames_of[*h][0]).collect();
            read_and_hash(self.vm, &self.vm.content_key(), &firsts, &mut buf, &mut now)?;
            let (mut hb, mut data) = (Vec::new(), Vec::new());
            for (k, h) in known.iter().enumerate() {
                if now[k] == **h {
                    hb.extend_from_slice(h.as_bytes());
                    data.extend_from_slice(&buf[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]);
                } else {
                    stale.extend(&frames_of[*h]);
                }
            }
            if !hb.is_empty() {
                self.send(
                    i,
                    Body::ByHash(v1::PagesByHash {
                        hashes: hb.into(),
                        data: data.into(),
                    }),
                );
            }
        }
        stale.sort_unstable();
        self.send_frames(i, &stale, 0)
    }

    /// Sends a round's frames to every live destination: by multicast when
    /// there are many, falling back to the links for receivers the cast
    /// did not complete.
    fn send_round(
        &mut self,
        caster: &mut dyn Caster,
        frames: &[u64],
        round: u32,
    ) -> Result<(), MigrationError> {
        let alive = self.alive();
        if alive.is_empty() || frames.is_empty() {
            return Ok(());
        }
        if frames.len() >= CAST_MIN_PAGES && alive.len() > 1 {
            let receivers: Vec<String> = alive
                .iter()
                .map(|&i| self.dests[i].t.host.clone())
                .collect();
            let out = self.cast(caster, frames, &[], true, &alive, &receivers);
            let (complete, zeros) = match &out {
                Ok(o) => {
                    let mut zeros = Vec::new();
                    for (k, &f) in frames.iter().enumerate() {
                        self.table[f as usize] = o.hashes[k];
                        if o.hashes[k].is_zero_page() {
                            zeros.push(f);
                        }
                    }
                    (o.complete.clone(), zeros)
                }
                Err(_) => (vec![false; alive.len()], Vec::new()),
            };
            for (r, &i) in alive.iter().enumerate() {
                if !complete.get(r).copied().unwrap_or(false) {
                    self.send_frames(i, frames, round)?;
                } else if !zeros.is_empty() {
                    // Zero pages do not travel in casts.
                    self.send_frames(i, &zeros, round)?;
                }
            }
            return Ok(());
        }
        // Read once, send to each.
        let (mut buf, mut hashes) = (Vec::new(), Vec::new());
        for chunk in frames.chunks(MAX_MIGRATE_PAGES_PER_FRAME) {
            read_and_hash(
                self.vm,
                &self.vm.content_key(),
                chunk,
                &mut buf,
                &mut hashes,
            )?;
            let mut hb = Vec::with_capacity(chunk.len() * 32);
            for (&f, h) in chunk.iter().zip(&hashes) {
                self.table[f as usize] = *h;
                hb.extend_from_slice(h.as_bytes());
            }
            for &i in &alive {
                self.send(
                    i,
                    Body::Pages(v1::Pages {
                        frames: chunk.to_vec(),
                        hashes: hb.clone().into(),
                        data: buf.clone().into(),
                        round,
                    }),
                );
            }
        }
        Ok(())
    }

    fn cast(
        &mut self,
        caster: &mut dyn Caster,
        frames: &[u64],
        members: &[Vec<usize>],
        by_frame: bool,
        alive: &[usize],
        receivers: &[String],
    ) -> Result<CastOutcome, MigrationError> {
        let dests = &mut self.dests;
        let mut invited = 0u64;
        let out = caster.cast(frames, members, by_frame, receivers, &mut |r, control| {
            let body = Body::CastJoin(v1::CastJoin {
                control: control.to_owned(),
                by_frame,
            });
            invited += wire_len(&body);
            dests[alive[r]].t.link.send(body)
        });
        self.report.bytes_links += invited;
        let out = out?;
        self.report.bytes_cast += out.bytes;
        self.prog.bytes_sent = self.report.bytes_links + self.report.bytes_cast;
        Ok(out)
    }

    fn run(&mut self, caster: &mut dyn Caster, fp: &Fingerprinter) -> Result<(), MigrationError> {
        let pages = self.vm.page_count();
        self.vm.take_dirty()?;
        self.table = match self.vm.current_hashes() {
            Some(t) if t.len() as u64 == pages => t,
            _ => {
                self.tell(v1::MigratePhase::Fingerprinting);
                fp.pool()
                    .install(|| fp.fingerprint(self.vm, &self.vm.content_key(), &|_| {}))
                    .hashes
            }
        };
        // Begin and manifest, to each.
        self.tell(v1::MigratePhase::Manifest);
        for i in 0..self.dests.len() {
            let begin = Body::Begin(v1::MigrateBegin {
                version: WIRE_VERSION as i32,
                vm: self.dests[i].t.name.clone(),
                memory_bytes: pages * PAGE_SIZE as u64,
                dirty_rate: self.vm.dirty_rate(),
                source: String::new(),
                verify_full: false,
                origin: format!("clone of {}", self.vm.name()),
                job: self.opts.job.clone(),
                no_local: self.opts.no_local,
                per_frame: false,
                held: true,
                domain: self.vm.domain().to_owned(),
                domain_check: self.vm.content_key().check(),
            });
            self.send(i, begin);
            match self.expect(i, "answer to the clone request") {
                Some(Body::Accept(a)) if a.ok => {}
                Some(Body::Accept(a)) => self.fail(
                    i,
                    MigrationError::Refused {
                        code: v1::RefusalCode::try_from(a.code).unwrap_or(v1::RefusalCode::Refused),
                        reason: a.reason,
                    },
                ),
                Some(other) => self.fail(
                    i,
                    MigrationError::Protocol(format!("expected accept, got {other:?}")),
                ),
                None => {}
            }
        }
        let manifest = Manifest {
            vm: String::new(),
            hashes: self.table.clone(),
        };
        for i in self.alive() {
            let mut m = manifest.clone();
            m.vm = self.dests[i].t.name.clone();
            self.send(i, Body::ManifestHeader(m.header()));
            for c in m.chunks(MAX_MANIFEST_CHUNK_FRAMES) {
                self.send(i, Body::ManifestChunk(c));
            }
        }
        drop(manifest);
        // What each lacks; each missing content once, multicast to those
        // lacking it.
        let mut lacking: BTreeMap<PageHash, Vec<usize>> = BTreeMap::new();
        for i in self.alive() {
            if let Some(n) = self.read_needs(i) {
                for h in n {
                    lacking.entry(h).or_default().push(i);
                }
            }
        }
        self.tell(v1::MigratePhase::Cast);
        let alive = self.alive();
        if !lacking.is_empty() && !alive.is_empty() {
            let mut first: HashMap<PageHash, u64> = HashMap::new();
            for (f, h) in self.table.iter().enumerate() {
                if lacking.contains_key(h) {
                    first.entry(*h).or_insert(f as u64);
                }
            }
            let receivers: Vec<String> = alive
                .iter()
                .map(|&i| self.dests[i].t.host.clone())
                .collect();
            let (mut frames, mut members) = (Vec::new(), Vec::new());
            for (h, who) in &lacking {
                if let Some(&f) = first.get(h) {
                    frames.push(f);
                    members.push(
                        who.iter()
                            .filter_map(|i| alive.iter().position(|a| a == i))
                            .collect(),
                    );
                }
            }
            // A failed cast is not fatal: the links carry the rest.
            let _ = self.cast(caster, &frames, &members, false, &alive, &receivers);
        }
        for i in self.alive() {
            self.send(i, Body::Refill(v1::Refill {}));
        }
        self.tell(v1::MigratePhase::Round0);
        for i in self.alive() {
            if let Some(n) = self.read_needs(i) {
                self.send_needed(i, &n)?;
            }
        }
        // Pre-copy rounds, each round's pages once.
        let budget = self.opts.max_downtime.mul_f64(0.6);
        let rate = self.opts.bandwidth_bps.map_or(1e9, |b| b as f64 / 8.0);
        let mut round = 1u32;
        let mut throttle = 0u8;
        let mut previous = u64::MAX;
        let last = loop {
            let dirty = self.vm.take_dirty()?;
            let count = dirty.count();
            let drain = Duration::from_secs_f64(count as f64 * PAGE_SIZE as f64 / rate);
            if drain <= budget || round > self.opts.max_rounds || self.alive().is_empty() {
                break dirty;
            }
            if round >= 2 && count as f64 > previous as f64 * 0.9 {
                throttle = if throttle == 0 {
                    50
                } else {
                    (throttle + 25).min(99)
                };
                self.vm.set_throttle(throttle);
            }
            previous = count;
            self.tell(v1::MigratePhase::Precopy);
            let frames: Vec<u64> = dirty.iter().collect();
            self.send_round(caster, &frames, round)?;
            round += 1;
        };
        self.report.rounds = round - 1;
        // Switchover: the source pauses until every clone resumed.
        self.tell(v1::MigratePhase::Switchover);
        let paused = Instant::now();
        self.vm.pause()?;
        let mut rest = last;
        rest.merge(&self.vm.take_dirty()?)?;
        for i in self.alive() {
            self.send(i, Body::Switchover(v1::Switchover { round }));
        }
        let frames: Vec<u64> = rest.iter().collect();
        self.send_round(caster, &frames, round)?;
        let state = self.vm.vcpu_state()?;
        let (regs, sregs) = state.to_bytes();
        let digest = table_digest(&self.table);
        for i in self.alive() {
            self.send(
                i,
                Body::Vcpu(v1::VcpuState {
                    regs: regs.clone().into(),
                    sregs: sregs.clone().into(),
                }),
            );
            self.send(
                i,
                Body::Digest(v1::Digest {
                    digest: digest.to_vec().into(),
                    full: Default::default(),
                }),
            );
        }
        for i in self.alive() {
            match self.expect(i, "verification") {
                Some(Body::Ready(r)) if r.ok => self.dests[i].verified = true,
                Some(Body::Ready(r)) => self.fail(i, MigrationError::Verification(r.reason)),
                Some(other) => self.fail(
                    i,
                    MigrationError::Protocol(format!("expected ready, got {other:?}")),
                ),
                None => {}
            }
        }
        for i in self.alive() {
            self.send(i, Body::Commit(v1::Commit {}));
        }
        for i in self.alive() {
            match self.expect(i, "confirmation that the clone started") {
                Some(Body::Resumed(_)) => {}
                Some(other) => self.fail(
                    i,
                    MigrationError::Protocol(format!("expected resumed, got {other:?}")),
                ),
                None => {}
            }
        }
        self.report.downtime_ms = paused.elapsed().as_secs_f64() * 1e3;
        self.tell(v1::MigratePhase::Done);
        Ok(())
    }
}
