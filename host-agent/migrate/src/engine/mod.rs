//! One engine for every migration out, whatever the VM's kind and however
//! many destinations: N = 1 moves a VM ([`Mode::Move`]), N > 1 clones it
//! ([`Mode::Clone`]). It runs as stages, each written once:
//!
//! | stage | what happens | module |
//! |---|---|---|
//! | table | the hash of every frame (the agent's content map, or a fresh hash) | [`stages`] |
//! | offer | `MigrateBegin` and the manifest to each destination | [`stages`] |
//! | local fill | each destination fills what it holds and says what it lacks | [`stages`] |
//! | hold | a gang job's hold: keep-alives both ways until go or abort | [`stages`] |
//! | cast | each lacking content once, multicast to those lacking it | [`stages`] |
//! | refill | each destination says again what it lacks | [`stages`] |
//! | transfer: round 0, pre-copy, switchover | [`Transfer`]: the engine's own rounds ([`rounds`], a micro-VM), or the VM's own stream relayed ([`stream`], QEMU) | |
//! | commit | the destinations start the VM; the source hears they did | [`Transfer`] |
//! | post-copy | a move that switched over before every page arrived: the destination pulls what its guest touches, the rest is pushed, the whole table checked ([`Transfer::postcopy`]) | [`postcopy`] |
//! | finish | a move releases or hands everything back; a clone's source runs on | here |
//!
//! What passes between stages is typed: a [`Fleet`] of destinations, each
//! with its state and what it lacks, the frame table, and the report.
//!
//! A destination that fails drops out and the others go on; a move has one
//! destination, so its failure is the move's. Before commit a failed move
//! hands every dirty bit it took back and resumes the VM; after commit
//! with no word from the destination it is in doubt and the VM stays
//! paused. A clone's source always runs on.

mod postcopy;
mod rounds;
mod stages;
mod stream;

use std::time::{Duration, Instant};

use pagecast_memory::DirtyBitmap;
use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_multicast::pacing::TokenBucket;
use pagecast_pages::PageHash;
use pagecast_proto::v1;

use crate::{
    Caster, Hold, MigrateOptions, MigrationError, MigrationLink, MigrationReport, Progress,
    SourceVm, Switchover, wire_len,
};

pub use stages::postcopy_refusal;
pub use stream::{Started, StreamEnd, StreamSource};

type Body = v1::migrate_frame::Body;

/// Whether the VM leaves its source or is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One destination; on success the source VM is left paused for the
    /// caller to release.
    Move,
    /// One or more destinations, each a copy; the source VM runs on.
    Clone,
}

/// One destination of a migration.
pub struct Target<'a> {
    /// The VM's name there.
    pub name: String,
    /// The destination agent's name (its name as a cast receiver).
    pub host: String,
    /// The link to it.
    pub link: Box<dyn MigrationLink + 'a>,
}

/// How the pages travel after the destinations' needs are known.
pub enum How<'a> {
    /// The engine's own rounds: round 0 of what each lacks, pre-copy rounds
    /// from the dirty log, a stop-and-copy switchover and a digest (a VM
    /// whose memory and vCPU this host controls).
    Rounds,
    /// The VM's own migration stream (QEMU's rounds, switchover and device
    /// state), relayed with each page a destination holds as its hash.
    Stream(&'a mut dyn StreamSource),
}

/// Everything one run of the engine needs.
pub struct Spec<'a> {
    /// The VM.
    pub vm: &'a dyn SourceVm,
    /// Move or clone.
    pub mode: Mode,
    /// Where to (one for a move).
    pub targets: Vec<Target<'a>>,
    /// Settings.
    pub opts: &'a MigrateOptions,
    /// Told at every stage and page batch.
    pub progress: &'a mut dyn FnMut(&Progress),
    /// A gang job's hold, and the job's cancel (asked in every mode).
    pub hold: Option<&'a mut dyn Hold>,
    /// Multicast for pages several destinations lack (clones).
    pub caster: Option<&'a mut dyn Caster>,
    /// How pages travel.
    pub how: How<'a>,
}

/// What became of one destination.
#[derive(Debug)]
pub struct DestOutcome {
    /// The VM's name there.
    pub name: String,
    /// The destination agent's name.
    pub host: String,
    /// The VM runs there, confirmed.
    pub ok: bool,
    /// Its memory matched the source's at switchover.
    pub verified: bool,
    /// Its guest's progress counter once resumed.
    pub progress_after: u64,
    /// Why not ok, if it was this destination's own failure (an in-doubt
    /// error: it may run there unconfirmed); `None` with `ok` false: the
    /// source's failure ([`Outcome::source_error`]) ended it.
    pub error: Option<MigrationError>,
}

impl DestOutcome {
    /// Why it failed, with the source's failure where that ended it.
    pub fn refusal(&self, source: Option<&MigrationError>) -> Option<v1::Refusal> {
        if self.ok {
            return None;
        }
        Some(match (&self.error, source) {
            (Some(e), _) | (None, Some(e)) => e.refusal(),
            (None, None) => pagecast_proto::refusal(v1::RefusalCode::Internal, "left unfinished"),
        })
    }
}

/// What a run of the engine did.
#[derive(Debug)]
pub struct Outcome {
    /// Totals over every destination (bytes, rounds, downtime).
    pub report: MigrationReport,
    /// Bytes the casts sent (beside the links' in `report`).
    pub bytes_cast: u64,
    /// Per destination, in the order given.
    pub dests: Vec<DestOutcome>,
    /// The source's own failure (reading memory, pausing, a stream that
    /// failed, a cancel), if one ended the run.
    pub source_error: Option<MigrationError>,
}

/// Where a destination stands.
#[derive(Debug)]
pub(crate) enum DestState {
    Live,
    Failed(MigrationError),
    /// Told to start the VM; no word since.
    InDoubt(String),
    /// The source's failure ended it (told so).
    Stopped,
    /// Runs the VM, confirmed.
    Done,
}

/// One destination while the engine runs.
pub(crate) struct Dest<'a> {
    pub t: Target<'a>,
    pub state: DestState,
    /// Contents it lacks, as it last said.
    pub needs: Vec<PageHash>,
    pub verified: bool,
    pub progress_after: u64,
    /// It can resume the VM before every page is there (it said so).
    pub postcopy: bool,
    /// Frames it gathers from other hosts after a post-copy switchover
    /// (counted as sent here): nonzero forces the post-copy switchover.
    pub gathering: u64,
}

impl Dest<'_> {
    pub fn live(&self) -> bool {
        matches!(self.state, DestState::Live)
    }
}

/// Which byte class a frame counts under.
#[derive(Clone, Copy)]
pub(crate) enum Class {
    Manifest,
    Pages,
    Vcpu,
    Control,
}

/// The state every stage works on.
pub(crate) struct Fleet<'a> {
    pub vm: &'a dyn SourceVm,
    pub mode: Mode,
    pub dests: Vec<Dest<'a>>,
    pub opts: &'a MigrateOptions,
    progress: &'a mut dyn FnMut(&Progress),
    pub prog: Progress,
    bucket: Option<TokenBucket>,
    /// Every dirty bit taken from the VM, handed back if a move fails.
    pub taken: DirtyBitmap,
    /// The hash of each frame as last read (the zero marker for zero pages).
    pub table: Vec<PageHash>,
    pub report: MigrationReport,
    pub bytes_cast: u64,
    /// The destinations may run the VM from here on.
    pub committed: bool,
    pub started: Instant,
    /// The engine's own rounds carry the pages (not a relayed stream).
    pub rounds: bool,
}

impl Fleet<'_> {
    /// Indexes of the destinations still in the run.
    pub fn alive(&self) -> Vec<usize> {
        (0..self.dests.len())
            .filter(|&i| self.dests[i].live())
            .collect()
    }

    /// Stops the run if no destination is left (each says why).
    pub fn any_left(&self) -> Result<(), MigrationError> {
        if self.dests.iter().any(Dest::live) {
            Ok(())
        } else {
            Err(MigrationError::NoneLeft)
        }
    }

    pub fn tell(&mut self, phase: v1::MigratePhase) {
        self.prog.phase = phase;
        (self.progress)(&self.prog);
    }

    pub fn told(&mut self) {
        (self.progress)(&self.prog);
    }

    /// Waits for the bandwidth limit to allow `n` more bytes.
    pub fn pace(&mut self, n: u64) {
        if let Some(b) = self.bucket.as_mut() {
            loop {
                let d = b.delay(n as usize, Instant::now());
                if d.is_zero() {
                    break;
                }
                std::thread::sleep(d);
            }
        }
    }

    /// Counts `n` bytes sent under `class`.
    pub fn count(&mut self, n: u64, class: Class) {
        self.report.bytes_sent += n;
        match class {
            Class::Manifest => self.report.bytes_manifest += n,
            Class::Pages => self.report.bytes_pages += n,
            Class::Vcpu => self.report.bytes_vcpu += n,
            Class::Control => self.report.bytes_control += n,
        }
        self.prog.bytes_sent = self.report.bytes_sent + self.bytes_cast;
    }

    /// Sends to destination `i` (paced); a failure drops it.
    pub fn send(&mut self, i: usize, body: Body, class: Class) {
        if !self.dests[i].live() {
            return;
        }
        let n = wire_len(&body);
        self.pace(n);
        match self.dests[i].t.link.send(body) {
            Ok(()) => self.count(n, class),
            Err(e) => self.fail(i, e),
        }
    }

    /// Drops destination `i` for `e`, telling it why where its link still
    /// carries anything.
    pub fn fail(&mut self, i: usize, e: MigrationError) {
        let d = &mut self.dests[i];
        if d.live() {
            if !e.link_is_gone() {
                let _ = d.t.link.send(Body::Abort(e.to_abort()));
            }
            d.state = DestState::Failed(e);
        }
    }

    /// The next frame from destination `i` other than a keep-alive, within
    /// `timeout`; a failure (its Abort, silence, a broken link) drops it.
    pub fn expect_within(
        &mut self,
        i: usize,
        what: &'static str,
        timeout: Duration,
    ) -> Option<Body> {
        self.expect_since(i, what, (Instant::now(), timeout))
    }

    /// [`Fleet::expect_within`] for a reply every destination owes at
    /// once, asked for at `since`: destination `i` is given up once it has
    /// been silent for `timeout` since then (or since its last
    /// keep-alive), so that destinations read one after another that froze
    /// together cost one wait, not one each.
    pub fn expect_since(
        &mut self,
        i: usize,
        what: &'static str,
        asked: (Instant, Duration),
    ) -> Option<Body> {
        self.expect_since_keeping(i, what, asked, false)
    }

    /// [`Fleet::expect_since`]; with `keep_others`, telling every other
    /// destination still in the run about once a second meanwhile that
    /// this source lives ([`KEEP_ALIVE_EVERY`]). A destination that has
    /// answered waits for what comes next on its own reply timeout, from
    /// its answer: without this, a frozen destination read before it
    /// could use that up while this source waits the frozen one out.
    pub fn expect_since_keeping(
        &mut self,
        i: usize,
        what: &'static str,
        (since, timeout): (Instant, Duration),
        keep_others: bool,
    ) -> Option<Body> {
        if !self.dests[i].live() {
            return None;
        }
        let mut by = since + timeout;
        loop {
            let wait = if keep_others {
                left_until(by).min(KEEP_ALIVE_EVERY)
            } else {
                left_until(by)
            };
            match self.dests[i].t.link.recv(Some(wait)) {
                Ok(Body::KeepAlive(_)) => {
                    by = Instant::now() + timeout;
                    continue;
                }
                Err(MigrationError::Timeout { .. }) if keep_others && Instant::now() < by => {
                    self.keep_alive_others(i);
                    continue;
                }
                Ok(Body::Abort(a)) => {
                    // It gave up: nothing to tell it.
                    self.dests[i].state = DestState::Failed(MigrationError::from_abort(a));
                    return None;
                }
                Ok(b) => return Some(b),
                Err(MigrationError::Timeout { peer, .. }) => {
                    let after = timeout;
                    self.fail(i, MigrationError::Timeout { peer, what, after });
                    return None;
                }
                Err(e) => {
                    self.fail(i, e);
                    return None;
                }
            }
        }
    }

    /// Tells every destination still in the run but `i` that this source
    /// lives, where nothing sent to it before is still on its way
    /// ([`MigrationLink::send_if_idle`]): one with frames still coming
    /// has something to read, and one that takes nothing (frozen, its
    /// socket buffers full) holds neither this source nor the others up
    /// for a send's deadline; it is found where its answer is owed.
    fn keep_alive_others(&mut self, i: usize) {
        for j in self.alive() {
            if j == i {
                continue;
            }
            let body = Body::KeepAlive(v1::KeepAlive {});
            let n = wire_len(&body);
            match self.dests[j].t.link.send_if_idle(body) {
                Ok(true) => self.count(n, Class::Control),
                Ok(false) => {}
                Err(e) => self.fail(j, e),
            }
        }
    }

    /// [`Fleet::expect_within`] the reply timeout.
    pub fn expect(&mut self, i: usize, what: &'static str) -> Option<Body> {
        self.expect_within(i, what, self.opts.reply_timeout)
    }

    /// Takes the VM's dirty bits, remembering them to hand back.
    pub fn take_dirty(&mut self) -> Result<DirtyBitmap, MigrationError> {
        let d = self.vm.take_dirty()?;
        self.taken.merge(&d)?;
        Ok(d)
    }

    /// Whether this run may offer post-copy: a move of a VM whose memory
    /// this host controls, not told to use pre-copy only.
    pub fn postcopy_offered(&self) -> bool {
        self.mode == Mode::Move && self.rounds && self.opts.switchover != Switchover::Precopy
    }

    /// Whether it may switch over with post-copy: offered, and every
    /// destination still in the run said it can take it.
    pub fn postcopy_allowed(&self) -> bool {
        self.postcopy_offered() && self.dests.iter().filter(|d| d.live()).all(|d| d.postcopy)
    }

    /// Stops if the job was cancelled (the VM stays, running).
    pub fn check_cancel(&mut self, hold: &mut Option<&mut dyn Hold>) -> Result<(), MigrationError> {
        match hold.as_deref_mut().and_then(|h| h.cancelled()) {
            Some(why) => Err(MigrationError::Cancelled(why)),
            None => Ok(()),
        }
    }
}

/// What the transfer after the needs does, per kind of VM. The engine
/// calls the stages in order; a transfer that cannot do one says so.
pub(crate) trait Transfer {
    /// Everything up to the moment the destinations have a whole VM ready
    /// to start: round 0, the pre-copy rounds, the switchover (the source
    /// paused), the device state and the verification.
    fn transfer(
        &mut self,
        fleet: &mut Fleet,
        hold: &mut Option<&mut dyn Hold>,
        caster: &mut Option<&mut dyn Caster>,
        fp: &Fingerprinter,
    ) -> Result<(), MigrationError>;

    /// The destinations start the VM; each says it runs (Done), failed
    /// before starting it (Failed), or is not heard from (InDoubt). After a
    /// post-copy switchover one that resumed stays in the run (Live) for
    /// [`Transfer::postcopy`].
    fn commit(&mut self, fleet: &mut Fleet) -> Result<(), MigrationError>;

    /// Post-copy, after commit: the VM runs at its destination, which
    /// pulls each missing page its guest touches while the rest is pushed,
    /// then checks the whole table. Nothing to do after a stop-and-copy.
    fn postcopy(&mut self, _fleet: &mut Fleet) -> Result<(), MigrationError> {
        Ok(())
    }
}

/// Runs one migration or clone: the stages in order, then the finish the
/// mode asks for. Never leaves a destination uninformed: every one that
/// failed was sent an Abort.
pub fn run(spec: Spec<'_>, fp: &Fingerprinter) -> Outcome {
    let Spec {
        vm,
        mode,
        targets,
        opts,
        progress,
        mut hold,
        mut caster,
        how,
    } = spec;
    let mut fleet = Fleet {
        vm,
        mode,
        dests: targets
            .into_iter()
            .map(|t| Dest {
                t,
                state: DestState::Live,
                needs: Vec::new(),
                verified: false,
                progress_after: 0,
                postcopy: false,
                gathering: 0,
            })
            .collect(),
        opts,
        progress,
        prog: Progress::default(),
        bucket: opts
            .bandwidth_bps
            .map(|b| TokenBucket::new(b, 256 * 1024, Instant::now())),
        taken: DirtyBitmap::new(vm.page_count()),
        table: Vec::new(),
        report: MigrationReport {
            kind: vm.kind(),
            ..MigrationReport::default()
        },
        bytes_cast: 0,
        committed: false,
        started: Instant::now(),
        rounds: matches!(how, How::Rounds),
    };
    let mut rounds = rounds::Rounds::default();
    let mut relay;
    let transfer: &mut dyn Transfer = match how {
        How::Rounds => &mut rounds,
        How::Stream(source) => {
            relay = stream::Relay::new(source);
            &mut relay
        }
    };
    let ran = stages::run(&mut fleet, transfer, &mut hold, &mut caster, fp);
    finish(fleet, ran)
}

/// Ends a run: a move that moved nothing hands its dirty bits back and
/// resumes the VM; a clone's source always runs on; every destination
/// still in the run when the source failed hears why.
fn finish(mut fleet: Fleet, ran: Result<(), MigrationError>) -> Outcome {
    let source_error = ran.err().filter(|e| !matches!(e, MigrationError::NoneLeft));
    if let Some(e) = &source_error {
        for d in &mut fleet.dests {
            if !d.live() {
                continue;
            }
            d.state = if fleet.committed {
                DestState::InDoubt(e.to_string())
            } else {
                let _ = d.t.link.send(Body::Abort(e.to_abort()));
                DestState::Stopped
            };
        }
    }
    let moved = fleet.mode == Mode::Move
        && fleet
            .dests
            .iter()
            .any(|d| matches!(d.state, DestState::Done | DestState::InDoubt(_)));
    if !moved {
        // Nothing runs elsewhere instead: the VM runs on here, with every
        // change it made meanwhile still to send next time.
        let _ = fleet.vm.mark_dirty(&fleet.taken);
        fleet.vm.set_throttle(0);
        let t = Instant::now();
        fleet.vm.resume();
        if fleet.mode == Mode::Clone {
            fleet.report.downtime_ms += t.elapsed().as_secs_f64() * 1e3;
        }
    }
    fleet.report.total_ms = fleet.started.elapsed().as_secs_f64() * 1e3;
    let dests = fleet
        .dests
        .into_iter()
        .map(|d| {
            let (ok, error) = match d.state {
                DestState::Done => (true, None),
                DestState::Failed(e) => (false, Some(e)),
                DestState::InDoubt(why) => (false, Some(MigrationError::InDoubt(why))),
                DestState::Live | DestState::Stopped => (false, None),
            };
            DestOutcome {
                name: d.t.name,
                host: d.t.host,
                ok,
                verified: d.verified,
                progress_after: d.progress_after,
                error,
            }
        })
        .collect();
    Outcome {
        report: fleet.report,
        bytes_cast: fleet.bytes_cast,
        dests,
        source_error,
    }
}

/// What is left until `by`, at least a millisecond: a reply already
/// waiting is still taken once the time is up.
pub fn left_until(by: Instant) -> Duration {
    by.saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// The next frame on `link` until `by`, for a reply owed since `by` less
/// `timeout`: a silence is reported as lasting `timeout`, not what was
/// left of it when this link's turn came.
/// A destination's keep-alive (the answer to one from the source) is no
/// reply, and is skipped; the deadline holds all the same.
pub fn recv_by(
    link: &mut dyn MigrationLink,
    by: Instant,
    timeout: Duration,
) -> Result<Body, MigrationError> {
    let late = |peer: String, what: &'static str| MigrationError::Timeout {
        peer,
        what,
        after: timeout,
    };
    loop {
        match link.recv(Some(left_until(by))) {
            // Past the deadline, what is already here still counts: the
            // keep-alives a destination answered earlier may sit ahead of
            // its reply.
            Ok(Body::KeepAlive(_)) if Instant::now() >= by => loop {
                match link.poll_frame()? {
                    Some(Body::KeepAlive(_)) => {}
                    Some(b) => return Ok(b),
                    None => return Err(late(link.peer(), "reply (only keep-alives came)")),
                }
            },
            Ok(Body::KeepAlive(_)) => {}
            Err(MigrationError::Timeout { peer, what, .. }) => return Err(late(peer, what)),
            r => return r,
        }
    }
}

/// How often a source waiting on one destination tells the others that
/// it lives ([`Fleet::expect_since_keeping`]).
pub const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(1);
