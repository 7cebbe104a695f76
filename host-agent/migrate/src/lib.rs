//! Live migration of a VM to one destination or, as a clone, to several.
//!
//! One engine ([`engine`]) serves every migration out, whatever the VM's
//! kind: the source and the destinations ([`migrate_in`], or
//! [`receive_front`] and the kind's own transfer) exchange
//! [`v1::MigrateFrame`]s over any [`MigrationLink`]; the one link that
//! exists today is [`ChannelLink`], an authenticated TCP connection
//! between two agents. The source reads guest memory through
//! [`SourceVm`], and a destination fills what it already holds through
//! [`LocalContent`]. See `docs/migration.md` for the exchange, the states
//! and failure handling.

mod dest;
pub mod engine;
mod entry;
pub mod failpoint;
pub mod mem;
mod plug;
mod postcopy;

use std::time::Duration;

use pagecast_channel::{AuthError, Channel};
use pagecast_pages::{ContentKey, Page, PageHash};
use pagecast_proto::v1;
use pagecast_proto::v1::RefusalCode;
use prost::Message;
use serde::Serialize;

pub use dest::{
    Arrival, IncomingReport, IncomingSlot, NoSlotEvents, ResumeSteps, Shape, SlotEvents,
    migrate_in, migrate_in_job, receive_front,
};
pub use engine::{How, Started, StreamEnd, StreamSource};
pub use entry::{
    CloneReportAll, CloneResultOne, CloneTarget, clone_out, migrate_out, migrate_out_held, move_one,
};
pub use plug::{CAST_MIN_PAGES, CastOutcome, Caster, Hold, HoldPoll};
pub use postcopy::{Gather, GatherSource};

/// How long either side waits for the other's next answer; a peer silent
/// this long (dead, frozen, or partitioned with the connection open) has
/// failed the migration.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

use pagecast_memory::kvm::{VcpuState, VmError};

/// Locks `m`, taking over from a holder that panicked.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
use pagecast_memory::manifest::ManifestError;
use pagecast_memory::{GuestMemory, MemoryError};

/// Errors of a migration. Every one names what failed; on the source the
/// VM keeps running after any of them except [`MigrationError::InDoubt`].
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The connection failed (including authentication and framing).
    #[error("migration connection: {0}")]
    Link(#[from] AuthError),
    /// The peer sent something the protocol does not allow here.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The manifest was malformed.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The destination refused the migration.
    #[error("the destination refused: {reason}")]
    Refused {
        /// Why, for programs.
        code: RefusalCode,
        /// Why, for people.
        reason: String,
    },
    /// The peer aborted.
    #[error("the peer aborted: {reason}")]
    Aborted {
        /// Why, for programs.
        code: RefusalCode,
        /// Why, for people.
        reason: String,
    },
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The destination's memory does not match the source's.
    #[error("verification failed: {0}")]
    Verification(String),
    /// The peer did not answer in time.
    #[error("no {what} from {peer} within {after:?} (is it frozen, or its network cut?)")]
    Timeout {
        /// Who was silent (its host name, where known).
        peer: String,
        /// What was awaited.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// The source sent Commit but heard no Resumed: the destination may or
    /// may not run the VM. The source keeps it paused, never resumes it.
    #[error(
        "switchover in doubt: commit sent, no word from the destination ({0}); the source VM stays paused"
    )]
    InDoubt(String),
    /// The destination could not start the migrated VM.
    #[error("the destination could not start the VM: {0}")]
    Start(String),
    /// The job this migration belongs to was cancelled.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// The VM's own migration stream failed at the source (QEMU refused,
    /// stalled, or sent what the relay cannot carry).
    #[error("the source's stream: {reason}")]
    Stream {
        /// Why, for programs.
        code: RefusalCode,
        /// Why, for people.
        reason: String,
    },
    /// Every destination failed (each one's error says why).
    #[error("every destination failed")]
    NoneLeft,
    /// Post-copy could not finish: the VM had resumed at its destination
    /// before every page arrived, and the host holding the rest failed.
    /// The VM cannot run on there; its source keeps its paused copy.
    #[error("post-copy lost its source of pages: {0}")]
    PostcopyLost(String),
}

impl MigrationError {
    /// The refusal code this error travels under.
    pub fn code(&self) -> RefusalCode {
        match self {
            MigrationError::Link(_) | MigrationError::Timeout { .. } => RefusalCode::Unavailable,
            MigrationError::InDoubt(_) | MigrationError::PostcopyLost(_) => {
                RefusalCode::Unavailable
            }
            MigrationError::Protocol(_) | MigrationError::Manifest(_) => RefusalCode::Invalid,
            MigrationError::Refused { code, .. }
            | MigrationError::Aborted { code, .. }
            | MigrationError::Stream { code, .. } => *code,
            MigrationError::NoneLeft => RefusalCode::Unavailable,
            MigrationError::Vm(_) | MigrationError::Memory(_) | MigrationError::Start(_) => {
                RefusalCode::Internal
            }
            MigrationError::Verification(_) => RefusalCode::Verification,
            MigrationError::Cancelled(_) => RefusalCode::Cancelled,
        }
    }

    /// Whether the link to the peer is past use: the peer stopped taking
    /// data or answering (frozen, or its network cut with the connection
    /// open), or the connection broke. An Abort sent on such a link would
    /// only wait out another write deadline (a frozen destination's
    /// migration once failed 16 s after the freeze instead of 10).
    pub fn link_is_gone(&self) -> bool {
        match self {
            MigrationError::Timeout { .. } => true,
            MigrationError::Link(e) => matches!(
                e,
                AuthError::Stalled { .. }
                    | AuthError::Slow { .. }
                    | AuthError::Closed { .. }
                    | AuthError::Io { .. }
            ),
            _ => false,
        }
    }

    /// The error as a result's refusal.
    pub fn refusal(&self) -> v1::Refusal {
        pagecast_proto::refusal(self.code(), self.to_string())
    }

    /// An `Abort` frame telling the peer why.
    pub fn to_abort(&self) -> v1::Abort {
        v1::Abort {
            reason: self.to_string(),
            code: self.code() as i32,
        }
    }

    /// The error a peer's `Abort` frame stands for.
    pub fn from_abort(a: v1::Abort) -> Self {
        MigrationError::Aborted {
            code: v1::RefusalCode::try_from(a.code).unwrap_or(RefusalCode::Unspecified),
            reason: a.reason,
        }
    }
}

/// A two-way channel of migration frames.
pub trait MigrationLink: Send {
    /// Sends one frame.
    fn send(&mut self, body: v1::migrate_frame::Body) -> Result<(), MigrationError>;
    /// Sends one small frame that must not hold the sender up (a
    /// keep-alive to one peer while it waits on another), only if nothing
    /// sent before is still on its way: true if it went. A link that
    /// cannot tell sends it ([`MigrationLink::send`]).
    fn send_if_idle(&mut self, body: v1::migrate_frame::Body) -> Result<bool, MigrationError> {
        self.send(body)?;
        Ok(true)
    }
    /// Receives one frame, waiting at most `timeout` (`None`: forever).
    fn recv(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<v1::migrate_frame::Body, MigrationError>;
    /// Who is at the other end, for errors ("host NAME (ADDRESS)").
    fn peer(&self) -> String {
        "the peer".into()
    }
    /// A frame if one is there now (or arriving), else `None` at once:
    /// a source pushing post-copy pages looks for requests between
    /// batches this way. By default, a receive that waits 1 ms.
    fn poll_frame(&mut self) -> Result<Option<v1::migrate_frame::Body>, MigrationError> {
        match self.recv(Some(Duration::from_millis(1))) {
            Ok(b) => Ok(Some(b)),
            Err(MigrationError::Timeout { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
    /// A frame if one comes within `within`, else `None`: a destination
    /// that also answers its source between frames waits this way. By
    /// default, a receive that waits that long.
    fn wait_frame(
        &mut self,
        within: Duration,
    ) -> Result<Option<v1::migrate_frame::Body>, MigrationError> {
        match self.recv(Some(within)) {
            Ok(b) => Ok(Some(b)),
            Err(MigrationError::Timeout { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A [`MigrationLink`] over an authenticated [`Channel`].
pub struct ChannelLink {
    ch: Channel,
}

/// How long one frame's send to a migration peer may take before the peer
/// counts as stalled: with the socket buffers (which fill first, under a
/// second at the rates migrations run) a frozen peer is found within 10 s.
pub const LINK_WRITE_LIMIT: Duration = Duration::from_secs(8);

impl ChannelLink {
    /// Wraps an authenticated channel; its sends stall after
    /// [`LINK_WRITE_LIMIT`].
    pub fn new(mut ch: Channel) -> Self {
        // A socket that cannot take the option still has the channel's own
        // (longer) limit.
        let _ = ch.set_write_limit(LINK_WRITE_LIMIT);
        ChannelLink { ch }
    }

    /// The channel back.
    pub fn into_inner(self) -> Channel {
        self.ch
    }

    /// The name the peer gave in the handshake.
    pub fn peer_name(&self) -> &str {
        self.ch.peer_name()
    }

    /// Closes the connection both ways.
    pub fn shutdown(&self) {
        self.ch.shutdown();
    }
}

impl MigrationLink for ChannelLink {
    fn send(&mut self, body: v1::migrate_frame::Body) -> Result<(), MigrationError> {
        Ok(self.ch.send(&v1::MigrateFrame { body: Some(body) })?)
    }

    fn send_if_idle(&mut self, body: v1::migrate_frame::Body) -> Result<bool, MigrationError> {
        Ok(self
            .ch
            .send_if_idle(&v1::MigrateFrame { body: Some(body) })?)
    }

    fn recv(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<v1::migrate_frame::Body, MigrationError> {
        self.ch.set_read_timeout(timeout)?;
        match self.ch.recv::<v1::MigrateFrame>("migration frame") {
            Ok(v1::MigrateFrame { body: Some(b) }) => Ok(b),
            Ok(_) => Err(MigrationError::Protocol("empty migration frame".into())),
            Err(AuthError::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(MigrationError::Timeout {
                    peer: self.peer(),
                    what: "frame",
                    after: timeout.unwrap_or_default(),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn peer(&self) -> String {
        format!("host {} ({})", self.ch.peer_name(), self.ch.peer())
    }

    fn poll_frame(&mut self) -> Result<Option<v1::migrate_frame::Body>, MigrationError> {
        if !self.ch.readable() {
            return Ok(None);
        }
        // Part of a frame is there: the rest follows within the reply
        // timeout or the peer has failed.
        self.recv(Some(REPLY_TIMEOUT)).map(Some)
    }

    fn wait_frame(
        &mut self,
        within: Duration,
    ) -> Result<Option<v1::migrate_frame::Body>, MigrationError> {
        // Wait for the first byte, then give the whole frame the reply
        // timeout (a receive cut off mid-frame keeps what came, but the
        // caller would take it for no frame yet).
        if !self.ch.readable_within(within) {
            return Ok(None);
        }
        self.recv(Some(REPLY_TIMEOUT)).map(Some)
    }
}

/// What the source engine needs from the VM it migrates.
pub trait SourceVm: GuestMemory {
    /// The VM's name.
    fn name(&self) -> &str;
    /// Where its memory came from (for the destination's `vm list`).
    fn origin(&self) -> String;
    /// The page-write rate its guest is paced to.
    fn dirty_rate(&self) -> u64;
    /// Stops the vCPU at its next exit; memory is then quiescent (only the
    /// engine's own rounds pause a VM).
    fn pause(&self) -> Result<(), VmError> {
        Err(VmError::Unsupported("pausing the guest"))
    }
    /// Lets the guest run again.
    fn resume(&self);
    /// The vCPU registers (the VM must be paused).
    fn vcpu_state(&self) -> Result<VcpuState, VmError> {
        Err(VmError::Unsupported("reading the vCPU"))
    }
    /// Slows the guest to `100 - pct` percent of its rate.
    fn set_throttle(&self, pct: u8);
    /// The hash of every frame as it is now, if the VM keeps a map of its
    /// content current (the agent's content map, refreshed from the dirty
    /// log); `None` makes the engine hash all of memory. Called after the
    /// migration's dirty log was reset, so anything written later is sent
    /// in a pre-copy round.
    fn current_hashes(&self) -> Option<Vec<PageHash>> {
        None
    }
    /// The VM's dedup domain ("" for the cluster-wide one).
    fn domain(&self) -> &str {
        ""
    }
    /// The key its pages are named with in that domain.
    fn content_key(&self) -> ContentKey {
        ContentKey::CLUSTER
    }
    /// What runs the guest.
    fn kind(&self) -> v1::VmKind {
        v1::VmKind::MicroVm
    }
}

/// A KVM micro-VM migrated on its own (the benchmarks do): named
/// "micro-vm", in the cluster-wide dedup domain. The agent wraps its VMs
/// with their names and domains instead.
impl SourceVm for pagecast_memory::kvm::MicroVm {
    fn name(&self) -> &str {
        "micro-vm"
    }
    fn origin(&self) -> String {
        String::new()
    }
    fn dirty_rate(&self) -> u64 {
        pagecast_memory::kvm::MicroVm::dirty_rate(self)
    }
    fn pause(&self) -> Result<(), VmError> {
        pagecast_memory::kvm::MicroVm::pause(self)
    }
    fn resume(&self) {
        pagecast_memory::kvm::MicroVm::resume(self)
    }
    fn vcpu_state(&self) -> Result<VcpuState, VmError> {
        pagecast_memory::kvm::MicroVm::vcpu_state(self)
    }
    fn set_throttle(&self, pct: u8) {
        pagecast_memory::kvm::MicroVm::set_throttle(self, pct)
    }
}

/// Where the destination finds content it already holds.
pub trait LocalContent: Sync {
    /// Copies a resident page of dedup domain `key` whose content hashes to
    /// `h` into `out`, checking the copy's hash; false if there is none (or
    /// it changed). Pages of other domains never answer.
    fn copy(&self, key: &ContentKey, h: &PageHash, out: &mut Page) -> bool;

    /// Whether a resident page of domain `key` holds content `h`, by
    /// lookup only: an arriving VM plans its local copies with this and
    /// makes them later with [`LocalContent::copy`], which checks the
    /// page. By default, a copy.
    fn holds(&self, key: &ContentKey, h: &PageHash) -> bool {
        let mut page = [0u8; pagecast_pages::PAGE_SIZE];
        self.copy(key, h, &mut page)
    }

    /// The key of dedup domain `domain` on this host, or why there is none.
    /// By default only the cluster-wide domain is known.
    fn domain_key(&self, domain: &str) -> Result<ContentKey, String> {
        pagecast_pages::domain::key_for(None, domain).map_err(|e| e.to_string())
    }
}

/// No local content (a destination that fetches everything).
pub struct NoLocalContent;

impl LocalContent for NoLocalContent {
    fn copy(&self, _: &ContentKey, _: &PageHash, _: &mut Page) -> bool {
        false
    }

    fn holds(&self, _: &ContentKey, _: &PageHash) -> bool {
        false
    }
}

/// Migration settings.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Bits per second the migration may use (`None`: unlimited).
    pub bandwidth_bps: Option<u64>,
    /// Stop-and-copy once the remaining dirty pages fit this downtime.
    pub max_downtime: Duration,
    /// Stop-and-copy after this many pre-copy rounds regardless.
    pub max_rounds: u32,
    /// Also hash all memory on both sides at switchover.
    pub verify_full: bool,
    /// How long to wait for each answer from the peer.
    pub reply_timeout: Duration,
    /// The gang job this migration belongs to ("" for none).
    pub job: String,
    /// Fill nothing from content the destination already holds.
    pub no_local: bool,
    /// Round 0 sends every non-zero frame (no deduplication within the VM).
    pub per_frame: bool,
    /// A QEMU VM's stream goes to a QEMU listening on this loopback
    /// address at the destination ("": the adopted VM waiting there).
    pub connect: String,
    /// How the VM switches over to its destination.
    pub switchover: Switchover,
    /// A QEMU VM's VM generation ID, for its clones' destinations to check
    /// theirs differs ("" for none).
    pub vm_generation_id: String,
}

/// How a migration switches over to its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Switchover {
    /// Stop and copy once the rest fits the downtime target; a guest that
    /// dirties faster than the link is slowed down until it does.
    Precopy,
    /// Right after round 0 the VM resumes at its destination, which pulls
    /// each page it lacks when its guest touches it while the source
    /// pushes the rest (a move of a micro-VM only).
    Postcopy,
    /// Pre-copy; where the rounds stop shrinking, one throttle step (half
    /// speed), then post-copy if they still stall or run out (a move of a
    /// micro-VM; anything else: pre-copy).
    #[default]
    Auto,
}

impl Switchover {
    /// From the agent protocol's value (unspecified: auto).
    pub fn from_proto(m: i32) -> Self {
        match v1::SwitchoverMode::try_from(m) {
            Ok(v1::SwitchoverMode::Precopy) => Switchover::Precopy,
            Ok(v1::SwitchoverMode::Postcopy) => Switchover::Postcopy,
            _ => Switchover::Auto,
        }
    }

    /// As the agent protocol carries it.
    pub fn to_proto(self) -> v1::SwitchoverMode {
        match self {
            Switchover::Precopy => v1::SwitchoverMode::Precopy,
            Switchover::Postcopy => v1::SwitchoverMode::Postcopy,
            Switchover::Auto => v1::SwitchoverMode::Auto,
        }
    }
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            bandwidth_bps: None,
            max_downtime: Duration::from_millis(50),
            max_rounds: 30,
            verify_full: false,
            reply_timeout: REPLY_TIMEOUT,
            job: String::new(),
            no_local: false,
            per_frame: false,
            connect: String::new(),
            switchover: Switchover::Auto,
            vm_generation_id: String::new(),
        }
    }
}

/// One pre-copy round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Round {
    /// Round number (0: the pages the destination lacked).
    pub round: u32,
    /// Pages sent.
    pub pages: u64,
    /// How long it took.
    pub seconds: f64,
    /// The guest's throttle during it, percent.
    pub throttle_pct: u8,
}

/// What a migration did, from the source's side.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct MigrationReport {
    /// Pages sent per round.
    pub rounds: Vec<Round>,
    /// Frames the destination filled from pages it already held.
    pub pages_local: u64,
    /// Pages sent in all.
    pub pages_sent: u64,
    /// Non-zero pages of the VM when the migration started.
    pub nonzero_pages: u64,
    /// Bytes of the manifest.
    pub bytes_manifest: u64,
    /// Bytes of page data and their hashes.
    pub bytes_pages: u64,
    /// Bytes of vCPU state.
    pub bytes_vcpu: u64,
    /// Bytes of everything else (begin, switchover, digest, commit).
    pub bytes_control: u64,
    /// All bytes sent to the destination.
    pub bytes_sent: u64,
    /// From pausing the source VM to the destination confirming it resumed.
    pub downtime_ms: f64,
    /// From start to finish.
    pub total_ms: f64,
    /// The destination's memory matched the source's at switchover.
    pub verified: bool,
    /// Also checked by hashing all memory on both sides.
    pub verified_full: bool,
    /// The destination's guest progress counter after resuming.
    pub progress_after: u64,
    /// The highest throttle applied, percent.
    pub max_throttle_pct: u8,
    /// Distinct contents the destinations held (a relayed stream: those
    /// sent as hashes).
    pub contents_local: u64,
    /// What ran the guest.
    #[serde(skip)]
    pub kind: v1::VmKind,
    /// The switchover was post-copy (the VM resumed at its destination
    /// before every page was there).
    pub postcopy: bool,
    /// Post-copy: pages the destination asked for when its guest touched
    /// them.
    pub postcopy_requested: u64,
    /// Post-copy: pages sent from Commit on, while and after the VM
    /// resumed (those asked for too).
    pub postcopy_pages: u64,
    /// Post-copy: from the VM resuming at its destination to its last page
    /// arriving there.
    pub postcopy_ms: f64,
    /// Post-copy: from the VM resuming to the last page this host pushed
    /// (below `postcopy_ms` where the destination gathered pages from
    /// other hosts).
    pub postcopy_pushed_ms: f64,
    /// Frames the destination gathered from other hosts instead (as it
    /// said at the refill).
    pub pages_gathered: u64,
}

impl MigrationReport {
    /// The report as the agent protocol carries it.
    pub fn to_proto(&self) -> v1::MigrateResult {
        v1::MigrateResult {
            ok: true,
            error: None,
            rounds: self
                .rounds
                .iter()
                .map(|r| v1::RoundStat {
                    round: r.round,
                    pages: r.pages,
                    seconds: r.seconds,
                    throttle_pct: u32::from(r.throttle_pct),
                })
                .collect(),
            pages_local: self.pages_local,
            bytes_manifest: self.bytes_manifest,
            bytes_pages: self.bytes_pages,
            bytes_vcpu: self.bytes_vcpu,
            bytes_control: self.bytes_control,
            bytes_sent: self.bytes_sent,
            downtime_ms: self.downtime_ms,
            total_ms: self.total_ms,
            verified: self.verified,
            nonzero_pages: self.nonzero_pages,
            pages_sent: self.pages_sent,
            progress_after: self.progress_after,
            max_throttle_pct: u32::from(self.max_throttle_pct),
            in_doubt: false,
            contents_local: self.contents_local,
            kind: self.kind as i32,
            postcopy: self.postcopy,
            postcopy_requested: self.postcopy_requested,
            postcopy_pages: self.postcopy_pages,
            postcopy_ms: self.postcopy_ms,
            postcopy_pushed_ms: self.postcopy_pushed_ms,
            pages_gathered: self.pages_gathered,
        }
    }
}

/// Bytes a frame body takes on the wire (payload, length, TLS records).
fn wire_len(body: &v1::migrate_frame::Body) -> u64 {
    let f = v1::MigrateFrame {
        body: Some(body.clone()),
    };
    pagecast_channel::wire_bytes(f.encoded_len())
}

/// BLAKE3 over the 32-byte hash of every frame, in order.
pub fn table_digest(table: &[PageHash]) -> [u8; 32] {
    digest_of(table.iter().copied())
}

/// [`table_digest`] of the hashes `frames` yields, in order (a table seen
/// through a mask or an option, without copying it).
pub fn digest_of(frames: impl Iterator<Item = PageHash>) -> [u8; 32] {
    // The same digest as hashing each 32-byte hash in turn, fed to BLAKE3
    // 32 KiB at a time: both sides compute it inside the downtime, and
    // 32-byte updates made it several times slower.
    let mut h = blake3::Hasher::new();
    let mut buf = Vec::with_capacity(1024 * 32);
    for t in frames {
        buf.extend_from_slice(t.as_bytes());
        if buf.len() == buf.capacity() {
            h.update(&buf);
            buf.clear();
        }
    }
    h.update(&buf);
    *h.finalize().as_bytes()
}

/// Progress of a running migration.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// What is happening.
    pub phase: v1::MigratePhase,
    /// The current round.
    pub round: u32,
    /// Pages sent so far.
    pub pages_sent: u64,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// Dirty pages of the current round.
    pub dirty_pages: u64,
    /// The guest's throttle.
    pub throttle_pct: u8,
    /// Frames the destination filled locally.
    pub pages_local: u64,
}

impl Progress {
    /// As the agent protocol carries it.
    pub fn to_proto(&self) -> v1::MigrateProgress {
        v1::MigrateProgress {
            phase: self.phase as i32,
            round: self.round,
            pages_sent: self.pages_sent,
            bytes_sent: self.bytes_sent,
            dirty_pages: self.dirty_pages,
            throttle_pct: u32::from(self.throttle_pct),
            pages_local: self.pages_local,
        }
    }
}
