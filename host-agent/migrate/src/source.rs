//! The source side of a migration.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use pagecast_multicast::pacing::TokenBucket;
use pagecast_pages::{PAGE_SIZE, PageHash};
use pagecast_proto::{MAX_MANIFEST_CHUNK_FRAMES, MAX_MIGRATE_PAGES_PER_FRAME, WIRE_VERSION, v1};

use pagecast_memory::fingerprint::read_and_hash;

use crate::{
    MigrateOptions, MigrationError, MigrationLink, MigrationReport, Progress, Round, SourceVm,
    table_digest, wire_len,
};
use pagecast_memory::DirtyBitmap;
use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_memory::manifest::Manifest;

type Body = v1::migrate_frame::Body;

/// Which byte class a frame counts under.
#[derive(Clone, Copy)]
enum Class {
    Manifest,
    Pages,
    Vcpu,
    Control,
}

/// What a held migration hears from whoever holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldPoll {
    /// Keep holding.
    Wait,
    /// Go on: ask the destination what it still needs and finish.
    Go,
    /// Give up (the VM stays here, running).
    Abort(String),
}

/// A gang job's hold: after the destination says what it lacks, the job
/// fills what it can (casts, rack-mates) before the migration goes on.
pub trait Hold {
    /// The destination lacks `needed` after filling `filled_locally` frames
    /// from what it held; called once.
    fn needs(&mut self, needed: &[PageHash], filled_locally: u64) -> Result<(), MigrationError>;
    /// Polled every 100 ms until it says go or abort.
    fn poll(&mut self) -> HoldPoll;
    /// Whether the engine holds at all (false: it only asks
    /// [`Hold::cancelled`]).
    fn holds(&self) -> bool {
        true
    }
    /// Asked before every pre-copy round and before switchover: a reason
    /// means stop (the VM stays here, running).
    fn cancelled(&mut self) -> Option<String> {
        None
    }
}

/// How often a held source tells the destination it is alive, and expects
/// the same back.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);

struct Out<'a> {
    vm: &'a dyn SourceVm,
    link: &'a mut dyn MigrationLink,
    opts: &'a MigrateOptions,
    progress: &'a mut dyn FnMut(&Progress),
    bucket: Option<TokenBucket>,
    /// Every dirty bit taken from the VM, handed back if the migration fails.
    taken: DirtyBitmap,
    /// The hash of each frame as last read (the zero marker for zero pages).
    table: Vec<PageHash>,
    report: MigrationReport,
    prog: Progress,
    committed: bool,
}

/// Migrates `vm` over `link`. On success the VM is left paused for the
/// caller to release. On any failure before commit it runs again, every
/// dirty bit the engine took is handed back, and the destination is told to
/// abort; after commit without confirmation the error is
/// [`MigrationError::InDoubt`] and the VM stays paused.
pub fn migrate_out(
    vm: &dyn SourceVm,
    link: &mut dyn MigrationLink,
    fp: &Fingerprinter,
    opts: &MigrateOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, MigrationError> {
    migrate_out_held(vm, link, fp, opts, progress, None)
}

/// [`migrate_out`], holding after the destination's first answer for a
/// gang job (`hold`), with keep-alives both ways meanwhile.
pub fn migrate_out_held(
    vm: &dyn SourceVm,
    link: &mut dyn MigrationLink,
    fp: &Fingerprinter,
    opts: &MigrateOptions,
    progress: &mut dyn FnMut(&Progress),
    hold: Option<&mut dyn Hold>,
) -> Result<MigrationReport, MigrationError> {
    let mut out = Out {
        vm,
        link,
        opts,
        progress,
        bucket: opts
            .bandwidth_bps
            .map(|b| TokenBucket::new(b, 256 * 1024, Instant::now())),
        taken: DirtyBitmap::new(vm.page_count()),
        table: Vec::new(),
        report: MigrationReport::default(),
        prog: Progress::default(),
        committed: false,
    };
    let started = Instant::now();
    match out.run(fp, started, hold) {
        Ok(()) => Ok(out.report),
        Err(e) if out.committed => Err(match e {
            MigrationError::InDoubt(w) => MigrationError::InDoubt(w),
            other => MigrationError::InDoubt(other.to_string()),
        }),
        Err(e) => {
            let _ = out.vm.mark_dirty(&out.taken);
            out.vm.set_throttle(0);
            out.vm.resume();
            let _ = out.link.send(Body::Abort(e.to_abort()));
            Err(e)
        }
    }
}

impl Out<'_> {
    fn send(&mut self, body: Body, class: Class) -> Result<(), MigrationError> {
        let n = wire_len(&body);
        if let Some(b) = self.bucket.as_mut() {
            loop {
                let d = b.delay(n as usize, Instant::now());
                if d.is_zero() {
                    break;
                }
                std::thread::sleep(d);
            }
        }
        self.link.send(body)?;
        self.report.bytes_sent += n;
        match class {
            Class::Manifest => self.report.bytes_manifest += n,
            Class::Pages => self.report.bytes_pages += n,
            Class::Vcpu => self.report.bytes_vcpu += n,
            Class::Control => self.report.bytes_control += n,
        }
        self.prog.bytes_sent = self.report.bytes_sent;
        Ok(())
    }

    fn expect(&mut self, what: &'static str) -> Result<Body, MigrationError> {
        match self.link.recv(Some(self.opts.reply_timeout)) {
            Ok(Body::Abort(a)) => Err(MigrationError::from_abort(a)),
            Ok(b) => Ok(b),
            Err(MigrationError::Timeout { after, .. }) => {
                Err(MigrationError::Timeout { what, after })
            }
            Err(e) => Err(e),
        }
    }

    fn take_dirty(&mut self) -> Result<DirtyBitmap, MigrationError> {
        let d = self.vm.take_dirty()?;
        self.taken.merge(&d)?;
        Ok(d)
    }

    fn tell(&mut self, phase: v1::MigratePhase) {
        self.prog.phase = phase;
        (self.progress)(&self.prog);
    }

    /// Reads and sends `frames` (a round's dirty pages, or pages whose
    /// content changed since the manifest), 64 to a message; returns how
    /// many went.
    fn send_frames(&mut self, frames: &[u64], round: u32) -> Result<u64, MigrationError> {
        let (mut buf, mut hashes) = (Vec::new(), Vec::new());
        for chunk in frames.chunks(MAX_MIGRATE_PAGES_PER_FRAME) {
            read_and_hash(
                self.vm,
                &self.vm.content_key(),
                chunk,
                &mut buf,
                &mut hashes,
            )?;
            let mut hash_bytes = Vec::with_capacity(chunk.len() * 32);
            for (&f, h) in chunk.iter().zip(&hashes) {
                self.table[f as usize] = *h;
                hash_bytes.extend_from_slice(h.as_bytes());
            }
            self.send(
                Body::Pages(v1::Pages {
                    frames: chunk.to_vec(),
                    hashes: hash_bytes.into(),
                    data: buf.clone().into(),
                    round,
                }),
                Class::Pages,
            )?;
            self.report.pages_sent += chunk.len() as u64;
            self.prog.pages_sent = self.report.pages_sent;
            (self.progress)(&self.prog);
        }
        Ok(frames.len() as u64)
    }

    /// Round 0: one copy of each content the destination lacks, read from
    /// the first frame holding it; contents that changed since the manifest
    /// go frame by frame instead.
    fn send_needed(&mut self, needed: &[PageHash]) -> Result<u64, MigrationError> {
        let wanted: HashSet<PageHash> = needed.iter().copied().collect();
        let mut frames_of: HashMap<PageHash, Vec<u64>> = HashMap::with_capacity(wanted.len());
        for (f, h) in self.table.iter().enumerate() {
            if wanted.contains(h) {
                frames_of.entry(*h).or_default().push(f as u64);
            }
        }
        let mut sent = 0u64;
        let (mut buf, mut now) = (Vec::new(), Vec::new());
        let mut stale: Vec<u64> = Vec::new();
        for chunk in needed.chunks(MAX_MIGRATE_PAGES_PER_FRAME) {
            let mut firsts = Vec::with_capacity(chunk.len());
            for h in chunk {
                let Some(frames) = frames_of.get(h) else {
                    return Err(MigrationError::Protocol(format!(
                        "the destination asked for {h}, which no frame holds"
                    )));
                };
                firsts.push(frames[0]);
            }
            read_and_hash(self.vm, &self.vm.content_key(), &firsts, &mut buf, &mut now)?;
            let n = chunk.len();
            let (mut hashes, mut data) = (Vec::new(), Vec::new());
            for i in 0..n {
                if now[i] == chunk[i] {
                    hashes.extend_from_slice(chunk[i].as_bytes());
                    data.extend_from_slice(&buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
                } else {
                    // The content moved on since the manifest.
                    stale.extend(&frames_of[&chunk[i]]);
                }
            }
            if !hashes.is_empty() {
                let k = (hashes.len() / 32) as u64;
                self.send(
                    Body::ByHash(v1::PagesByHash {
                        hashes: hashes.into(),
                        data: data.into(),
                    }),
                    Class::Pages,
                )?;
                sent += k;
                self.report.pages_sent += k;
                self.prog.pages_sent = self.report.pages_sent;
                (self.progress)(&self.prog);
            }
        }
        stale.sort_unstable();
        sent += self.send_frames(&stale, 0)?;
        Ok(sent)
    }

    /// Reads one batch of NeedHashes frames (up to `last`).
    fn read_needs(&mut self, pages: u64) -> Result<Vec<PageHash>, MigrationError> {
        let mut needed: Vec<PageHash> = Vec::new();
        loop {
            match self.expect("list of needed pages")? {
                Body::Need(n) => {
                    if n.hashes.len() % 32 != 0 {
                        return Err(MigrationError::Protocol(
                            "needed hashes are not 32-byte multiples".into(),
                        ));
                    }
                    needed.extend(
                        n.hashes
                            .chunks_exact(32)
                            .map(|h| PageHash::try_from(h).expect("32 bytes")),
                    );
                    if needed.len() as u64 > pages {
                        return Err(MigrationError::Protocol(
                            "more needed pages than frames".into(),
                        ));
                    }
                    if n.last {
                        self.report.pages_local = n.filled_locally.min(pages);
                        self.prog.pages_local = self.report.pages_local;
                        return Ok(needed);
                    }
                }
                Body::KeepAlive(_) => {}
                other => {
                    return Err(MigrationError::Protocol(format!(
                        "expected needed pages, got {other:?}"
                    )));
                }
            }
        }
    }

    /// Holds for a gang job, keeping the link alive both ways, until the
    /// job says go (or abort).
    fn hold(&mut self, hold: &mut dyn Hold, needed: &[PageHash]) -> Result<(), MigrationError> {
        self.tell(v1::MigratePhase::Held);
        hold.needs(needed, self.report.pages_local)?;
        let mut last_sent = Instant::now();
        let mut last_heard = Instant::now();
        let mut last_told = Instant::now();
        loop {
            if last_told.elapsed() >= Duration::from_secs(2) {
                // Whoever holds us hears we are alive too.
                self.tell(v1::MigratePhase::Held);
                last_told = Instant::now();
            }
            match hold.poll() {
                HoldPoll::Go => return Ok(()),
                HoldPoll::Abort(why) => return Err(MigrationError::Cancelled(why)),
                HoldPoll::Wait => {}
            }
            // Often enough that an answer comes well within the reply
            // timeout, however short it is set.
            if last_sent.elapsed() >= KEEPALIVE_EVERY.min(self.opts.reply_timeout / 4) {
                self.send(Body::KeepAlive(v1::KeepAlive {}), Class::Control)?;
                last_sent = Instant::now();
            }
            match self.link.recv(Some(Duration::from_millis(100))) {
                Ok(Body::KeepAlive(_)) => last_heard = Instant::now(),
                Ok(Body::Abort(a)) => return Err(MigrationError::from_abort(a)),
                Ok(other) => {
                    return Err(MigrationError::Protocol(format!(
                        "unexpected {other:?} while held"
                    )));
                }
                Err(MigrationError::Timeout { .. }) => {}
                Err(e) => return Err(e),
            }
            if last_heard.elapsed() > self.opts.reply_timeout {
                return Err(MigrationError::Timeout {
                    what: "keep-alive while held",
                    after: self.opts.reply_timeout,
                });
            }
        }
    }

    fn run(
        &mut self,
        fp: &Fingerprinter,
        started: Instant,
        hold: Option<&mut dyn Hold>,
    ) -> Result<(), MigrationError> {
        let pages = self.vm.page_count();
        // Everything dirtied from here on shows up in the dirty log; the
        // hashes below may see torn pages, which the log then covers.
        self.take_dirty()?;
        self.table = match self.vm.current_hashes() {
            // The agent's content map, kept current by the dirty log.
            Some(t) if t.len() as u64 == pages => t,
            _ => {
                self.tell(v1::MigratePhase::Fingerprinting);
                fp.pool()
                    .install(|| fp.fingerprint(self.vm, &self.vm.content_key(), &|_| {}))
                    .hashes
            }
        };
        self.report.nonzero_pages = self.table.iter().filter(|h| !h.is_zero_page()).count() as u64;

        self.send(
            Body::Begin(v1::MigrateBegin {
                version: WIRE_VERSION as i32,
                vm: self.vm.name().to_owned(),
                memory_bytes: pages * PAGE_SIZE as u64,
                dirty_rate: self.vm.dirty_rate(),
                source: String::new(),
                verify_full: self.opts.verify_full,
                origin: self.vm.origin(),
                job: self.opts.job.clone(),
                no_local: self.opts.no_local,
                per_frame: self.opts.per_frame,
                held: hold.as_ref().is_some_and(|h| h.holds()),
                domain: self.vm.domain().to_owned(),
                domain_check: self.vm.content_key().check(),
            }),
            Class::Control,
        )?;
        match self.expect("answer to the migration request")? {
            Body::Accept(a) if a.ok => {}
            Body::Accept(a) => {
                return Err(MigrationError::Refused {
                    code: v1::RefusalCode::try_from(a.code).unwrap_or(v1::RefusalCode::Refused),
                    reason: a.reason,
                });
            }
            other => {
                return Err(MigrationError::Protocol(format!(
                    "expected accept, got {other:?}"
                )));
            }
        }

        self.tell(v1::MigratePhase::Manifest);
        let manifest = Manifest {
            vm: self.vm.name().to_owned(),
            hashes: self.table.clone(),
        };
        self.send(Body::ManifestHeader(manifest.header()), Class::Manifest)?;
        for c in manifest.chunks(MAX_MANIFEST_CHUNK_FRAMES) {
            self.send(Body::ManifestChunk(c), Class::Manifest)?;
        }
        drop(manifest);

        let mut hold = hold;
        let mut needed = self.read_needs(pages)?;
        if let Some(h) = hold.as_deref_mut().filter(|h| h.holds()) {
            self.hold(h, &needed)?;
            self.send(Body::Refill(v1::Refill {}), Class::Control)?;
            needed = self.read_needs(pages)?;
        }

        self.tell(v1::MigratePhase::Round0);
        let t = Instant::now();
        let n = if self.opts.per_frame {
            // As a per-VM pre-copy does: every non-zero frame, each once.
            let frames: Vec<u64> = self
                .table
                .iter()
                .enumerate()
                .filter(|(_, h)| !h.is_zero_page())
                .map(|(f, _)| f as u64)
                .collect();
            self.send_frames(&frames, 0)?
        } else {
            self.send_needed(&needed)?
        };
        let mut last = Round {
            round: 0,
            pages: n,
            seconds: t.elapsed().as_secs_f64(),
            throttle_pct: 0,
        };
        self.report.rounds.push(last.clone());

        // Pre-copy rounds until the rest fits the downtime target. Leave
        // part of the target for the fixed costs of switching over.
        let budget = self.opts.max_downtime.mul_f64(0.6);
        let mut throttle = 0u8;
        let mut previous = u64::MAX;
        let mut round = 1u32;
        let last_dirty = loop {
            if let Some(why) = hold.as_deref_mut().and_then(|h| h.cancelled()) {
                return Err(MigrationError::Cancelled(why));
            }
            let dirty = self.take_dirty()?;
            let count = dirty.count();
            self.prog.round = round;
            self.prog.dirty_pages = count;
            let rate = self.rate(&last);
            let drain = Duration::from_secs_f64(count as f64 * PAGE_SIZE as f64 / rate.max(1.0));
            if drain <= budget || round > self.opts.max_rounds {
                break dirty;
            }
            // Not converging fast: the guest dirtied more than half of what
            // the last round sent while it was sent (or no fewer pages than
            // the round before). Slow it down (auto-converge, with QEMU's
            // trigger) rather than loop until the round limit.
            if round >= 2
                && (count as f64 > last.pages as f64 * 0.5 || count as f64 > previous as f64 * 0.9)
            {
                throttle = if throttle == 0 {
                    50
                } else {
                    (throttle + 25).min(99)
                };
                self.vm.set_throttle(throttle);
                self.report.max_throttle_pct = self.report.max_throttle_pct.max(throttle);
                self.prog.throttle_pct = throttle;
            }
            previous = count;
            self.tell(v1::MigratePhase::Precopy);
            let frames: Vec<u64> = dirty.iter().collect();
            let t = Instant::now();
            let n = self.send_frames(&frames, round)?;
            last = Round {
                round,
                pages: n,
                seconds: t.elapsed().as_secs_f64(),
                throttle_pct: throttle,
            };
            self.report.rounds.push(last.clone());
            round += 1;
        };

        // Stop and copy.
        if let Some(why) = hold.and_then(|h| h.cancelled()) {
            return Err(MigrationError::Cancelled(why));
        }
        self.tell(v1::MigratePhase::Switchover);
        let paused = Instant::now();
        self.vm.pause()?;
        self.send(Body::Switchover(v1::Switchover { round }), Class::Control)?;
        let mut rest = last_dirty;
        rest.merge(&self.take_dirty()?)?;
        let frames: Vec<u64> = rest.iter().collect();
        let t = Instant::now();
        let n = self.send_frames(&frames, round)?;
        self.report.rounds.push(Round {
            round,
            pages: n,
            seconds: t.elapsed().as_secs_f64(),
            throttle_pct: throttle,
        });
        let state = self.vm.vcpu_state()?;
        let (regs, sregs) = state.to_bytes();
        self.send(
            Body::Vcpu(v1::VcpuState {
                regs: regs.into(),
                sregs: sregs.into(),
            }),
            Class::Vcpu,
        )?;
        let digest = table_digest(&self.table);
        let full = if self.opts.verify_full {
            let f = fp
                .pool()
                .install(|| fp.fingerprint(self.vm, &self.vm.content_key(), &|_| {}));
            if f.hashes != self.table {
                return Err(MigrationError::Verification(
                    "the source's memory differs from what it sent (dirty tracking lost a page)"
                        .into(),
                ));
            }
            table_digest(&f.hashes).to_vec()
        } else {
            Vec::new()
        };
        self.send(
            Body::Digest(v1::Digest {
                digest: digest.to_vec().into(),
                full: full.into(),
            }),
            Class::Control,
        )?;
        match self.expect("verification")? {
            Body::Ready(r) if r.ok => {}
            Body::Ready(r) => return Err(MigrationError::Verification(r.reason)),
            other => {
                return Err(MigrationError::Protocol(format!(
                    "expected ready, got {other:?}"
                )));
            }
        }
        // From here the destination may run the VM: never resume ours.
        self.committed = true;
        self.send(Body::Commit(v1::Commit {}), Class::Control)?;
        match self.expect("confirmation that the VM resumed") {
            Ok(Body::Resumed(r)) => self.report.progress_after = r.progress,
            Ok(other) => {
                return Err(MigrationError::InDoubt(format!(
                    "expected resumed, got {other:?}"
                )));
            }
            Err(e) => return Err(MigrationError::InDoubt(e.to_string())),
        }
        self.report.downtime_ms = paused.elapsed().as_secs_f64() * 1e3;
        self.report.total_ms = started.elapsed().as_secs_f64() * 1e3;
        self.report.verified = true;
        self.report.verified_full = self.opts.verify_full;
        self.tell(v1::MigratePhase::Done);
        Ok(())
    }

    /// Bytes per second to plan with: what the last round achieved, bounded
    /// by the bandwidth limit.
    fn rate(&self, last: &Round) -> f64 {
        let limit = self.opts.bandwidth_bps.map(|b| b as f64 / 8.0);
        let seen = (last.pages > 0 && last.seconds > 0.0)
            .then(|| last.pages as f64 * PAGE_SIZE as f64 / last.seconds);
        match (seen, limit) {
            (Some(s), Some(l)) => s.min(l),
            (Some(s), None) => s,
            (None, Some(l)) => l,
            (None, None) => 1e9,
        }
    }
}
