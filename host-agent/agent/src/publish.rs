//! Keeping the content index current: what this host's VMs hold, published
//! as holder deltas, kept fresh from the dirty log, withdrawn when a VM
//! leaves, and reconciled whenever the index and the agent may disagree.
//!
//! Three layers, each under its own lock:
//!
//! - [`Publication`], one per VM: for every guest frame the content the
//!   index should list for it (`intended`). A refresh of the content map
//!   hands it the frames the dirty log reported; frames dirty in each of
//!   the last [`HOT_AFTER`] refreshes are *hot*: their content is worth
//!   little as shared content and costs index writes, so they are left out
//!   (withdrawn) until they settle. At most [`FRAME_UPDATES_PER_REFRESH`]
//!   frames change per VM per refresh; the rest wait, coalesced (a frame
//!   rewritten ten times while waiting is published once).
//! - [`Ledger`], one per agent: for every content, the frames this host
//!   should be listed with (`desired`, the sum of its VMs' intents) and the
//!   frames the index has acknowledged (`acked`). Their difference is what
//!   remains to send, already netted across VMs and refreshes.
//! - The publisher loop ([`run`]), one thread: sends that difference to
//!   each shard in numbered batches under a session (a batch whose answer
//!   was lost is sent again unchanged and applied once), VM records and a
//!   host report to shard 0, and every [`CHECK_EVERY`] compares each
//!   shard's [`HoldingSum`] for this host with its own; on a mismatch it
//!   lists what the shard holds and corrects `acked`, so the next batches
//!   send exactly the difference. At start `acked` is unknown: the first
//!   check lists, and whatever a previous run left behind is withdrawn.
//!
//! The index is a hint: an unreachable index never stops VMs or
//! migrations; the loop keeps retrying, and `acked` stays exact because
//! nothing is taken as applied without an answer.

use crate::sync::lock;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use pagecast_index::client::{ClientError, IndexClient};
use pagecast_index::holders::HoldingSum;
use pagecast_index::keys::{shard_of, shard_prefix_range};
use pagecast_memory::DirtyBitmap;
use pagecast_pages::PageHash;
use pagecast_proto::v1::{
    self, DropVm, HolderDelta, HolderDeltas, HostReport, IndexCommand, MoveVm, PutVm, RefusalCode,
    VmRecord, index_command::Op,
};
use tracing::{info, warn};

/// A frame dirty in this many consecutive refreshes is hot: left out of
/// the index until a refresh finds it untouched.
pub const HOT_AFTER: u8 = 3;
/// Most frames whose published content changes per VM per refresh (each
/// costs at most two deltas).
pub const FRAME_UPDATES_PER_REFRESH: usize = pagecast_proto::MAX_FRAME_UPDATES_PER_REFRESH;
/// Most deltas in one batch.
pub const BATCH: usize = 8192;
/// How long one call to the index may take when no replica answers.
pub const CALL_DEADLINE: Duration = Duration::from_secs(8);
/// How long one holder batch may wait while the replicas answer that they
/// are busy: under a cold start's load a shard's queue can hold several
/// seconds of work, and a batch sent again while in flight only waits for
/// the same raft entry.
pub const BUSY_DEADLINE: Duration = Duration::from_secs(30);
/// How often every shard's totals are compared with the agent's.
pub const CHECK_EVERY: Duration = Duration::from_secs(30);
/// How often the host report goes out (also whenever the VMs change).
pub const REPORT_EVERY: Duration = Duration::from_secs(5);
/// Most hashes one listing of a shard's holdings returns.
const LIST_LIMIT: u32 = 16_384;

/// What one VM's frames should be listed as.
#[derive(Debug)]
pub struct Publication {
    /// Per frame: the content the index should list (zero marker: none).
    intended: Vec<PageHash>,
    /// Per frame: consecutive refreshes it was dirty in.
    streak: Vec<u8>,
    /// Frames with a non-zero streak.
    streaking: Vec<u64>,
    /// Frames whose intended content may be behind.
    pending: BTreeSet<u64>,
    /// Where the next refresh starts working through `pending`.
    cursor: u64,
    /// Hot frames (streak at least [`HOT_AFTER`]).
    hot: u64,
    /// Published at all (set by [`Publication::publish_all`]).
    live: bool,
}

impl Publication {
    /// Nothing published for a VM of `pages` frames.
    pub fn new(pages: u64) -> Self {
        Publication {
            intended: vec![PageHash::ZERO_PAGE; pages as usize],
            streak: vec![0; pages as usize],
            streaking: Vec::new(),
            pending: BTreeSet::new(),
            cursor: 0,
            hot: 0,
            live: false,
        }
    }

    /// Frames left out because they are hot, plus frames whose change
    /// waits for the update bound: what the index does not show as it is.
    pub fn unpublished(&self) -> u64 {
        self.hot + self.pending.len() as u64
    }

    /// Frames left out as hot.
    pub fn hot(&self) -> u64 {
        self.hot
    }

    /// Whether the VM is published (and not withdrawn).
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// Whether frame `f` is left out as hot.
    pub fn is_hot(&self, f: u64) -> bool {
        self.streak.get(f as usize).is_some_and(|s| *s >= HOT_AFTER)
    }

    /// The intended content of every frame.
    pub fn intended(&self) -> &[PageHash] {
        &self.intended
    }

    fn set(&mut self, f: u64, target: PageHash, out: &mut Vec<(PageHash, i64)>) -> bool {
        let cur = &mut self.intended[f as usize];
        if *cur == target {
            return false;
        }
        if !cur.is_zero_page() {
            out.push((*cur, -1));
        }
        if !target.is_zero_page() {
            out.push((target, 1));
        }
        *cur = target;
        true
    }

    /// Intends every frame's content `seen` (a VM that started or arrived).
    pub fn publish_all(&mut self, seen: &[PageHash], out: &mut Vec<(PageHash, i64)>) {
        if seen.len() != self.intended.len() {
            return;
        }
        self.live = true;
        for (f, h) in seen.iter().enumerate() {
            self.set(f as u64, *h, out);
        }
    }

    /// Takes in a refresh: `dirty` frames were re-read and their content is
    /// now `seen`. Returns how many frames changed what they publish.
    pub fn on_refresh(
        &mut self,
        dirty: &DirtyBitmap,
        seen: &[PageHash],
        budget: usize,
        out: &mut Vec<(PageHash, i64)>,
    ) -> usize {
        if !self.live || seen.len() != self.intended.len() {
            return 0;
        }
        // Frames that were streaking and stayed clean have settled.
        for f in std::mem::take(&mut self.streaking) {
            if !dirty.get(f) {
                if self.streak[f as usize] >= HOT_AFTER {
                    self.hot -= 1;
                }
                self.streak[f as usize] = 0;
                self.pending.insert(f);
            }
        }
        for f in dirty.iter() {
            let s = &mut self.streak[f as usize];
            if *s == HOT_AFTER - 1 {
                self.hot += 1;
            }
            // Saturates: a frame dirty in every refresh stays hot, counted once.
            *s = s.saturating_add(1).min(HOT_AFTER);
            self.streaking.push(f);
            self.pending.insert(f);
        }
        // Work through what waits, fairly: from where the last refresh
        // stopped, wrapping around.
        let mut done = Vec::new();
        let mut updates = 0;
        let order: Vec<u64> = self
            .pending
            .range(self.cursor..)
            .chain(self.pending.range(..self.cursor))
            .copied()
            .collect();
        for f in order {
            if updates >= budget {
                self.cursor = f;
                break;
            }
            let hot = self.streak[f as usize] >= HOT_AFTER;
            let target = if hot {
                PageHash::ZERO_PAGE
            } else {
                seen[f as usize]
            };
            if self.set(f, target, out) {
                updates += 1;
            }
            done.push(f);
        }
        for f in done {
            self.pending.remove(&f);
        }
        updates
    }

    /// Withdraws everything (the VM stopped or left).
    pub fn withdraw_all(&mut self, out: &mut Vec<(PageHash, i64)>) {
        self.live = false;
        for f in 0..self.intended.len() as u64 {
            self.set(f, PageHash::ZERO_PAGE, out);
        }
        self.pending.clear();
        self.streaking.clear();
        self.hot = 0;
    }
}

/// A change to the VM records, sent to shard 0 in order.
#[derive(Debug, Clone)]
pub enum VmOp {
    /// A VM runs here (started, arrived, or its content changed).
    Put(VmRecord),
    /// A VM that ran here is gone.
    Drop(String),
    /// A VM moved from here to the named host.
    Move {
        /// The VM.
        name: String,
        /// Where it went.
        to: String,
    },
}

/// Per content: frames this host should be listed with, and frames the
/// index acknowledged.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    desired: u64,
    acked: u64,
}

/// The host-level state of publication.
#[derive(Debug, Default)]
pub struct Ledger {
    counts: HashMap<PageHash, Counts>,
    /// Contents whose desired and acked may differ, in 256 buckets by the
    /// hash's first byte: a shard owns a range of hash prefixes, so taking
    /// its batch looks at its own buckets only (empty until first used).
    changed: Vec<HashSet<PageHash>>,
    vm_ops: VecDeque<VmOp>,
    /// The VM set changed: send a host report soon.
    report_due: bool,
}

impl Ledger {
    fn mark_changed(&mut self, h: PageHash) {
        if self.changed.is_empty() {
            self.changed = (0..256).map(|_| HashSet::new()).collect();
        }
        self.changed[h.as_bytes()[0] as usize].insert(h);
    }

    /// Applies frame-level changes to what this host should be listed with.
    pub fn apply(&mut self, changes: &[(PageHash, i64)]) {
        for &(h, d) in changes {
            let c = self.counts.entry(h).or_default();
            c.desired = c.desired.checked_add_signed(d).unwrap_or_else(|| {
                // Publication never withdraws what it did not add; if it
                // did, listing nothing is the honest answer.
                warn!("ledger: {h} would go below zero frames; listing none");
                0
            });
            if *c == Counts::default() {
                self.counts.remove(&h);
            }
            self.mark_changed(h);
        }
    }

    /// Queues a VM record change.
    pub fn vm_op(&mut self, op: VmOp) {
        self.vm_ops.push_back(op);
        self.report_due = true;
    }

    /// Contents whose listing is not yet what it should be.
    pub fn behind(&self) -> usize {
        self.changed.iter().map(HashSet::len).sum()
    }

    /// Nothing left to send: no holder change, no VM record change.
    pub fn idle(&self) -> bool {
        self.behind() == 0 && self.vm_ops.is_empty()
    }

    /// Frames the index has acknowledged for this host for `h`.
    pub fn acked_of(&self, h: &PageHash) -> u64 {
        self.counts.get(h).map_or(0, |c| c.acked)
    }

    /// Frames this host should be listed with for `h`.
    pub fn desired(&self, h: &PageHash) -> u64 {
        self.counts.get(h).map_or(0, |c| c.desired)
    }

    /// The totals of `shard` (of `n`) as the index should hold them.
    pub fn desired_sum(&self, shard: u32, n: u32) -> HoldingSum {
        let mut s = HoldingSum::default();
        for (h, c) in &self.counts {
            if shard_of(h, n) == shard {
                s.change(h.as_bytes(), 0, c.desired);
            }
        }
        s
    }

    fn acked_sum(&self, shard: u32, n: u32) -> HoldingSum {
        let mut s = HoldingSum::default();
        for (h, c) in &self.counts {
            if shard_of(h, n) == shard {
                s.change(h.as_bytes(), 0, c.acked);
            }
        }
        s
    }

    /// Up to `max` deltas that bring `shard` from acked to desired; the
    /// contents they cover leave `changed` (a failed send puts them back).
    fn take_batch(&mut self, shard: u32, n: u32, max: usize) -> Vec<(PageHash, i64)> {
        let mut out = Vec::new();
        if self.changed.is_empty() {
            return out;
        }
        let (lo, hi) = shard_prefix_range(shard, n);
        if lo >= hi {
            return out;
        }
        let mut covered = Vec::new();
        'buckets: for b in (lo >> 8)..=((hi - 1) >> 8) {
            for h in &self.changed[b as usize] {
                if shard_of(h, n) != shard {
                    continue;
                }
                covered.push(*h);
                let c = self.counts.get(h).copied().unwrap_or_default();
                if c.desired != c.acked {
                    out.push((*h, c.desired as i64 - c.acked as i64));
                    if out.len() >= max {
                        break 'buckets;
                    }
                }
            }
        }
        for h in covered {
            self.changed[h.as_bytes()[0] as usize].remove(&h);
        }
        out
    }

    /// Records that the index applied `batch`.
    fn acked(&mut self, batch: &[(PageHash, i64)]) {
        for &(h, d) in batch {
            let c = self.counts.entry(h).or_default();
            c.acked = c.acked.checked_add_signed(d).unwrap_or(0);
            if *c == Counts::default() {
                self.counts.remove(&h);
            }
        }
    }

    fn retry(&mut self, batch: &[(PageHash, i64)]) {
        for &(h, _) in batch {
            self.mark_changed(h);
        }
    }

    /// Replaces what the index is known to hold in `shard` by `actual`
    /// (a listing); returns how many contents differed.
    fn correct(&mut self, shard: u32, n: u32, actual: &HashMap<PageHash, u64>) -> u64 {
        let mut fixed = 0;
        let mut seen_here: Vec<PageHash> = Vec::new();
        for (h, c) in self.counts.iter_mut() {
            if shard_of(h, n) != shard {
                continue;
            }
            let a = actual.get(h).copied().unwrap_or(0);
            if c.acked != a {
                c.acked = a;
                fixed += 1;
            }
            seen_here.push(*h);
        }
        for (h, &a) in actual {
            if !self.counts.contains_key(h) {
                self.counts.insert(
                    *h,
                    Counts {
                        desired: 0,
                        acked: a,
                    },
                );
                fixed += 1;
                seen_here.push(*h);
            }
        }
        for h in seen_here {
            let c = self.counts[&h];
            if c.desired != c.acked {
                self.mark_changed(h);
            }
            if c == Counts::default() {
                self.counts.remove(&h);
            }
        }
        fixed
    }
}

/// What the agent tells the index about itself besides its holders.
#[derive(Debug, Clone, Default)]
pub struct HostMeta {
    /// Control address.
    pub address: String,
    /// Rack name.
    pub rack: String,
    /// Link rate, bits per second.
    pub link_bps: u64,
    /// Memory this host offers VMs, bytes.
    pub capacity_bytes: u64,
    /// The address it multicasts from.
    pub cast_addr: String,
}

/// What the host report says of the VMs right now.
#[derive(Debug, Clone, Default)]
pub struct HostNow {
    /// VM names.
    pub vms: Vec<String>,
    /// Memory they use, bytes.
    pub used_bytes: u64,
    /// Frames the index does not show as they are (hot or waiting).
    pub hot_pages: u64,
}

/// Counters of the publisher, for metrics and tests.
#[derive(Debug, Clone, Default)]
pub struct PublishStatus {
    /// The host number the index gave this agent.
    pub host: Option<u32>,
    /// Whether the last call to the index failed.
    pub unreachable: bool,
    /// Deltas sent (resends counted again).
    pub deltas_sent: u64,
    /// Reconciliations that found and corrected a difference.
    pub reconciliations: u64,
    /// Every shard checked equal at least once since the last change.
    pub in_sync: bool,
    /// Cordoned, and why, as the index answered this host's last report.
    pub cordon: Option<String>,
}

/// The agent's link to the index: the ledger, the publisher's status, and
/// a way to wake it.
pub struct IndexLink {
    /// The replicas.
    pub addrs: Vec<String>,
    /// This host's identity, for the replicas.
    pub tls: pagecast_channel::Tls,
    /// This host's name.
    pub host: String,
    /// What the host report carries.
    meta: Mutex<HostMeta>,
    ledger: Mutex<Ledger>,
    status: Mutex<PublishStatus>,
    wake: Condvar,
    woken: Mutex<bool>,
    /// Set to end the loop.
    pub stop: AtomicBool,
}

impl IndexLink {
    /// A link to the index at `addrs` for host `host`.
    pub fn new(
        addrs: Vec<String>,
        tls: pagecast_channel::Tls,
        host: String,
        meta: HostMeta,
    ) -> Arc<Self> {
        Arc::new(IndexLink {
            addrs,
            tls,
            host,
            meta: Mutex::new(meta),
            ledger: Mutex::new(Ledger {
                report_due: true,
                ..Ledger::default()
            }),
            status: Mutex::new(PublishStatus::default()),
            wake: Condvar::new(),
            woken: Mutex::new(false),
            stop: AtomicBool::new(false),
        })
    }

    /// Sets the control address the host report carries (once the agent
    /// knows the port it bound).
    pub fn set_address(&self, addr: String) {
        lock(&self.meta).address = addr;
    }

    /// The ledger.
    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    /// The publisher's status.
    pub fn status(&self) -> PublishStatus {
        lock(&self.status).clone()
    }

    /// Whether this host is cordoned, and why: asked of the index now
    /// (within 2 s), so that a cordon set or lifted a moment ago counts;
    /// what its last report was answered if the index does not answer.
    pub fn cordon_now(&self) -> Option<String> {
        let fresh = IndexClient::new(&self.addrs, self.tls.clone())
            .and_then(|mut c| {
                c.timeout = Duration::from_secs(2);
                c.hosts(false)
            })
            .map(|hs| {
                hs.into_iter()
                    .find(|h| h.name == self.host)
                    .and_then(|h| h.cordoned.then_some(h.cordon_reason))
            });
        match fresh {
            Ok(c) => {
                lock(&self.status).cordon = c.clone();
                c
            }
            Err(e) => {
                warn!(
                    "cannot ask the index whether this host is cordoned ({e}); going by its last answer"
                );
                lock(&self.status).cordon.clone()
            }
        }
    }

    /// Applies changes and wakes the publisher.
    pub fn apply(&self, changes: &[(PageHash, i64)]) {
        if changes.is_empty() {
            return;
        }
        self.ledger().apply(changes);
        self.notify();
    }

    /// Queues a VM record change and wakes the publisher.
    pub fn vm_op(&self, op: VmOp) {
        self.ledger().vm_op(op);
        self.notify();
    }

    /// Wakes the publisher.
    pub fn notify(&self) {
        *lock(&self.woken) = true;
        self.wake.notify_one();
    }

    fn sleep(&self, d: Duration) {
        let g = lock(&self.woken);
        let (mut g, _) = self
            .wake
            .wait_timeout_while(g, d, |w| !*w)
            .unwrap_or_else(|e| e.into_inner());
        *g = false;
    }
}

/// A batch on its way to a shard: sent again unchanged until answered.
struct Inflight {
    seq: u64,
    deltas: Vec<(PageHash, i64)>,
    /// Per delta, the frames the index had acknowledged for this host when
    /// the batch was taken: the delta's `before`, by which the index counts
    /// this host's distinct contents without reading its lists.
    before: Vec<u64>,
}

/// What sends one shard's batches: its own client (connection), the next
/// sequence number, the batch whose answer is still owed.
struct ShardWriter {
    client: IndexClient,
    seq: u64,
    inflight: Option<Inflight>,
}

/// How a shard's flush ended without a transport error.
enum Flushed {
    /// Nothing left to send.
    Done,
    /// The shard refused a batch: the index holds something else than the
    /// agent believes; reconcile, and (for `Refused`) flush again after.
    Refused(RefusalCode),
}

/// Sends what `shard` lacks, one batch at a time, until nothing is left.
fn flush_shard(
    link: &IndexLink,
    w: &mut ShardWriter,
    shard: u32,
    shards: u32,
    session: u64,
    host: u32,
) -> Result<Flushed, ClientError> {
    loop {
        let batch = match w.inflight.take() {
            Some(b) => b,
            None => {
                let mut ledger = link.ledger();
                let deltas = ledger.take_batch(shard, shards, BATCH);
                if deltas.is_empty() {
                    return Ok(Flushed::Done);
                }
                let before = deltas.iter().map(|(h, _)| ledger.acked_of(h)).collect();
                drop(ledger);
                let seq = w.seq;
                w.seq += 1;
                Inflight {
                    seq,
                    deltas,
                    before,
                }
            }
        };
        let cmd = IndexCommand {
            client: session,
            seq: batch.seq,
            op: Some(Op::Deltas(HolderDeltas {
                deltas: batch
                    .deltas
                    .iter()
                    .zip(&batch.before)
                    .map(|((h, d), before)| HolderDelta {
                        hash: h.as_bytes().to_vec().into(),
                        host,
                        frames: *d,
                        before: *before,
                    })
                    .collect(),
            })),
        };
        lock(&link.status).deltas_sent += batch.deltas.len() as u64;
        ::metrics::counter!(crate::metrics::INDEX_DELTAS).increment(batch.deltas.len() as u64);
        match w.client.write(shard, cmd) {
            Ok(_) => link.ledger().acked(&batch.deltas),
            Err(ClientError::Refused { code, message }) if !code.is_retryable() => {
                warn!("shard {shard} refused a batch ({message}); reconciling");
                link.ledger().retry(&batch.deltas);
                return Ok(Flushed::Refused(code));
            }
            Err(e) => {
                // Unknown outcome: the same batch goes again.
                w.inflight = Some(batch);
                return Err(e);
            }
        }
    }
}

struct Loop<'a> {
    link: &'a IndexLink,
    client: IndexClient,
    /// The session of holder batches: per shard, one batch at a time, a
    /// batch whose answer was lost sent again under its number before any
    /// other.
    session: u64,
    /// The session of host reports and VM records (idempotent operations,
    /// shard 0), kept apart so they never overtake an unanswered batch.
    meta_session: u64,
    meta_seq: u64,
    shards: u32,
    host: u32,
    /// One writer per shard: the shards' batches travel in parallel, each
    /// shard's one at a time.
    writers: Vec<ShardWriter>,
    check: Vec<bool>,
    last_check: Instant,
    last_report: Option<Instant>,
    unreachable_since: Option<Instant>,
    /// Per VM: since when the index has refused its record because another
    /// host (the source of its migration) still holds it.
    put_waits: HashMap<String, Instant>,
}

/// How long a VM record the index refuses because another host still
/// holds it (a migration's source, whose move of the record has not landed
/// yet) is tried again before it is given up.
const PUT_WAIT: Duration = Duration::from_secs(60);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn session_id(host: &str) -> u64 {
    let mut nonce = [0u8; 16];
    let _ = pagecast_channel::random_bytes(&mut nonce);
    let mut h = blake3::Hasher::new();
    h.update(host.as_bytes());
    h.update(&nonce);
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8")) | 1
}

/// Runs the publisher until `link.stop` is set. `now` describes the host's
/// VMs for the host report; `records` gives their records, for comparing
/// with the VM records the index keeps under this host.
pub fn run(link: &IndexLink, now: &dyn Fn() -> HostNow, records: &dyn Fn() -> Vec<VmRecord>) {
    let mut client = match IndexClient::new(&link.addrs, link.tls.clone()) {
        Ok(c) => c,
        Err(e) => {
            warn!("index publishing disabled: {e}");
            return;
        }
    };
    // One call gives up within seconds: the loop itself retries forever.
    client.timeout = CALL_DEADLINE;
    let mut l = Loop {
        link,
        client,
        session: session_id(&link.host),
        meta_session: session_id(&link.host),
        meta_seq: 1,
        shards: 0,
        host: 0,
        writers: Vec::new(),
        check: Vec::new(),
        last_check: Instant::now(),
        last_report: None,
        unreachable_since: None,
        put_waits: HashMap::new(),
    };
    let mut behind_since: Option<Instant> = None;
    while !link.stop.load(Ordering::Relaxed) {
        if behind_since.is_none() && link.ledger().behind() > 0 {
            behind_since = Some(Instant::now());
        }
        let result = l.round(now, records);
        if let Some(t) = behind_since
            && link.ledger().behind() == 0
        {
            ::metrics::histogram!(crate::metrics::PUBLISH_LAG_SECONDS)
                .record(t.elapsed().as_secs_f64());
            behind_since = None;
        }
        let unreachable = match result {
            Ok(()) => false,
            Err(e) => {
                if l.unreachable_since.is_none() {
                    warn!("index unreachable, VMs and migrations go on: {e}");
                }
                true
            }
        };
        match (unreachable, l.unreachable_since) {
            (true, None) => l.unreachable_since = Some(Instant::now()),
            (false, Some(t)) => {
                info!(
                    "index reachable again after {:.1} s; checking every shard",
                    t.elapsed().as_secs_f64()
                );
                ::metrics::counter!(crate::metrics::INDEX_UNREACHABLE_SECONDS)
                    .increment(t.elapsed().as_secs());
                l.unreachable_since = None;
                l.check.iter_mut().for_each(|c| *c = true);
            }
            _ => {}
        }
        lock(&link.status).unreachable = unreachable;
        let idle = !unreachable && link.ledger().behind() == 0;
        link.sleep(if unreachable {
            Duration::from_secs(1)
        } else if idle {
            Duration::from_millis(500)
        } else {
            Duration::from_millis(20)
        });
    }
}

impl Loop<'_> {
    fn write_meta(&mut self, op: Op) -> Result<v1::WriteResponse, ClientError> {
        let seq = self.meta_seq;
        self.meta_seq += 1;
        self.client.write(
            0,
            IndexCommand {
                client: self.meta_session,
                seq,
                op: Some(op),
            },
        )
    }

    fn connect(&mut self, now: &dyn Fn() -> HostNow) -> Result<(), ClientError> {
        let shards = self.client.shards()?;
        self.shards = shards;
        self.writers = (0..shards)
            .map(|_| {
                let mut client = IndexClient::new(&self.link.addrs, self.link.tls.clone())?;
                client.timeout = CALL_DEADLINE;
                client.busy_timeout = Some(BUSY_DEADLINE);
                Ok(ShardWriter {
                    client,
                    seq: 1,
                    inflight: None,
                })
            })
            .collect::<Result<_, ClientError>>()?;
        self.check = vec![true; shards as usize];
        self.report(now)?;
        info!(
            "publishing to the content index ({} shards) as host {} (#{})",
            shards, self.link.host, self.host
        );
        Ok(())
    }

    fn report(&mut self, now: &dyn Fn() -> HostNow) -> Result<(), ClientError> {
        let n = now();
        let m = lock(&self.link.meta).clone();
        let w = self.write_meta(Op::HostReport(HostReport {
            name: self.link.host.clone(),
            address: m.address.clone(),
            rack: m.rack.clone(),
            link_bps: m.link_bps,
            capacity_bytes: m.capacity_bytes,
            used_bytes: n.used_bytes,
            vms: n.vms,
            cast_addr: m.cast_addr.clone(),
            hot_pages: n.hot_pages,
            reported_ms: now_ms(),
        }))?;
        self.host = w.host;
        {
            let mut st = lock(&self.link.status);
            st.host = Some(w.host);
            if w.cordoned && st.cordon.is_none() {
                info!("this host is cordoned: {}", w.cordon_reason);
            } else if !w.cordoned && st.cordon.is_some() {
                info!("this host is no longer cordoned");
            }
            st.cordon = w.cordoned.then(|| w.cordon_reason.clone());
        }
        self.last_report = Some(Instant::now());
        self.link.ledger().report_due = false;
        Ok(())
    }

    fn round(
        &mut self,
        now: &dyn Fn() -> HostNow,
        records: &dyn Fn() -> Vec<VmRecord>,
    ) -> Result<(), ClientError> {
        if self.shards == 0 {
            self.connect(now)?;
        }
        let due = self.link.ledger().report_due
            || self.last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY);
        if due {
            self.report(now)?;
        }
        self.vm_ops()?;
        if self.last_check.elapsed() >= CHECK_EVERY {
            self.check.iter_mut().for_each(|c| *c = true);
            self.last_check = Instant::now();
        }
        if self.check.first().copied().unwrap_or(false) {
            self.reconcile_vms(records)?;
            self.vm_ops()?;
        }
        self.flush_all()?;
        for shard in 0..self.shards {
            if self.check[shard as usize] {
                self.reconcile(shard)?;
                self.check[shard as usize] = false;
                self.flush_all()?;
            }
        }
        Ok(())
    }

    /// Flushes every shard, the shards in parallel; a shard that refused a
    /// batch is reconciled and flushed again. The first transport error
    /// is returned after every shard has stopped.
    fn flush_all(&mut self) -> Result<(), ClientError> {
        loop {
            let pending = self.link.ledger().behind() > 0
                || self.writers.iter().any(|w| w.inflight.is_some());
            if !pending {
                return Ok(());
            }
            let (link, shards, session, host) = (self.link, self.shards, self.session, self.host);
            let results: Vec<Result<Flushed, ClientError>> = std::thread::scope(|s| {
                let handles: Vec<_> = self
                    .writers
                    .iter_mut()
                    .enumerate()
                    .map(|(i, w)| {
                        s.spawn(move || flush_shard(link, w, i as u32, shards, session, host))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(ClientError::Unexpected(
                                "a publisher thread panicked".into(),
                            ))
                        })
                    })
                    .collect()
            });
            let mut again = false;
            let mut first_err = None;
            for (shard, r) in results.into_iter().enumerate() {
                match r {
                    Ok(Flushed::Done) => {}
                    Ok(Flushed::Refused(code)) => {
                        self.reconcile(shard as u32)?;
                        again |= code == RefusalCode::Refused;
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            if !again {
                return Ok(());
            }
        }
    }

    fn vm_ops(&mut self) -> Result<(), ClientError> {
        loop {
            let Some(op) = self.link.ledger().vm_ops.front().cloned() else {
                return Ok(());
            };
            let put = match &op {
                VmOp::Put(r) => Some(r.name.clone()),
                _ => None,
            };
            let cmd = match op {
                VmOp::Put(mut r) => {
                    r.host = self.host;
                    Op::PutVm(PutVm { vm: Some(r) })
                }
                VmOp::Drop(name) => Op::DropVm(DropVm {
                    name,
                    host: self.host,
                }),
                VmOp::Move { name, to } => Op::MoveVm(MoveVm {
                    name,
                    from: self.host,
                    to,
                }),
            };
            match self.write_meta(cmd) {
                Ok(_) => {
                    if let Some(name) = &put {
                        self.put_waits.remove(name);
                    }
                }
                // An arrival's record, while its source's move of it has
                // not landed: tried again on the next round, after the
                // other changes, for a while (before, it was dropped and
                // the record kept the source's content summary).
                Err(e)
                    if e.code() == Some(RefusalCode::Refused)
                        && put.as_ref().is_some_and(|n| {
                            self.put_waits
                                .entry(n.clone())
                                .or_insert_with(Instant::now)
                                .elapsed()
                                < PUT_WAIT
                        }) =>
                {
                    let mut l = self.link.ledger();
                    if let Some(op) = l.vm_ops.pop_front() {
                        l.vm_ops.push_back(op);
                    }
                    return Ok(());
                }
                Err(e) if e.code().is_some_and(|c| !c.is_retryable()) => {
                    if let Some(name) = &put {
                        self.put_waits.remove(name);
                    }
                    warn!("the index refused a VM record change: {e}");
                }
                Err(e) => return Err(e),
            }
            self.link.ledger().vm_ops.pop_front();
        }
    }

    /// Compares the VM records the index keeps under this host with the
    /// VMs that run here: records of VMs gone (a crash, a lost drop) are
    /// dropped, missing ones put.
    fn reconcile_vms(&mut self, records: &dyn Fn() -> Vec<VmRecord>) -> Result<(), ClientError> {
        let listed = self.client.vms(false)?;
        let local = records();
        let mut l = self.link.ledger();
        for r in listed
            .iter()
            .filter(|r| r.host == self.host && r.state == v1::VmState::Running as i32)
        {
            if !local.iter().any(|x| x.name == r.name) {
                info!(
                    "the index lists VM {} here, which does not run here; dropping it",
                    r.name
                );
                l.vm_ops.push_back(VmOp::Drop(r.name.clone()));
            }
        }
        for x in local {
            let here = listed
                .iter()
                .any(|r| r.name == x.name && r.host == self.host);
            if !here
                && !l
                    .vm_ops
                    .iter()
                    .any(|op| matches!(op, VmOp::Put(p) if p.name == x.name))
            {
                l.vm_ops.push_back(VmOp::Put(x));
            }
        }
        Ok(())
    }

    /// Compares `shard`'s totals for this host with the agent's; lists and
    /// corrects on a difference.
    fn reconcile(&mut self, shard: u32) -> Result<(), ClientError> {
        let theirs = self.client.holdings(shard, self.host)?;
        let ours = self.link.ledger().acked_sum(shard, self.shards);
        // Frames and digest: the index keeps those exactly; its count of
        // distinct contents is this host's own account.
        if theirs.same_holdings(&ours) {
            return Ok(());
        }
        let mut actual: HashMap<PageHash, u64> = HashMap::new();
        let mut after: Option<PageHash> = None;
        loop {
            let (page, next) = self
                .client
                .list_holdings(shard, self.host, after, LIST_LIMIT)?;
            actual.extend(page);
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let fixed = self.link.ledger().correct(shard, self.shards, &actual);
        if fixed > 0 {
            info!(
                "shard {shard}: the index listed {} contents for this host; corrected {fixed}",
                actual.len()
            );
            lock(&self.link.status).reconciliations += 1;
            ::metrics::counter!(crate::metrics::RECONCILIATIONS).increment(1);
        }
        Ok(())
    }
}

/// A VM's record as the index keeps it, from what it publishes.
pub fn vm_record(name: &str, image: &str, domain: &str, intended: &[PageHash]) -> VmRecord {
    pagecast_index::client::VmContent::from_frames(name, image, intended).record(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> PageHash {
        PageHash::from_bytes([i; 32])
    }

    fn dirty(pages: u64, frames: &[u64]) -> DirtyBitmap {
        let mut d = DirtyBitmap::new(pages);
        for &f in frames {
            d.set(f).unwrap();
        }
        d
    }

    /// Sums frame-level changes into per-content counts.
    fn net(changes: &[(PageHash, i64)]) -> HashMap<PageHash, i64> {
        let mut m = HashMap::new();
        for &(h, d) in changes {
            *m.entry(h).or_default() += d;
        }
        m.retain(|_, v| *v != 0);
        m
    }

    #[test]
    fn hot_frames_leave_and_come_back_when_they_settle() {
        let mut p = Publication::new(4);
        let mut seen = vec![h(1), h(2), PageHash::ZERO_PAGE, h(2)];
        let mut out = Vec::new();
        p.publish_all(&seen, &mut out);
        assert_eq!(net(&out), HashMap::from([(h(1), 1), (h(2), 2)]));
        // Frame 0 rewritten every refresh: published twice, then left out.
        for (round, v) in [10u8, 11, 12, 13].into_iter().enumerate() {
            out.clear();
            seen[0] = h(v);
            p.on_refresh(&dirty(4, &[0]), &seen, 100, &mut out);
            if round < 2 {
                assert_eq!(net(&out)[&h(v)], 1, "round {round}");
            } else if round == 2 {
                assert_eq!(
                    net(&out),
                    HashMap::from([(h(11), -1)]),
                    "withdrawn when hot"
                );
            } else {
                assert!(out.is_empty(), "hot frames cost nothing");
            }
        }
        assert_eq!(p.hot(), 1);
        // A refresh that leaves it alone: it settles and is published.
        out.clear();
        p.on_refresh(&dirty(4, &[]), &seen, 100, &mut out);
        assert_eq!(net(&out), HashMap::from([(h(13), 1)]));
        assert_eq!(p.hot(), 0);
        out.clear();
        p.withdraw_all(&mut out);
        assert_eq!(net(&out), HashMap::from([(h(13), -1), (h(2), -2)]));
    }

    #[test]
    fn updates_per_refresh_are_bounded_and_coalesced() {
        let pages = 10_000u64;
        let mut p = Publication::new(pages);
        let mut seen = vec![h(1); pages as usize];
        let mut out = Vec::new();
        p.publish_all(&seen, &mut out);
        // Every frame rewritten once (new content): at most the budget per
        // refresh, the rest waits.
        seen.iter_mut().for_each(|s| *s = h(2));
        let all: Vec<u64> = (0..pages).collect();
        out.clear();
        let n = p.on_refresh(&dirty(pages, &all), &seen, 1000, &mut out);
        assert_eq!(n, 1000);
        assert!(out.len() <= 2000);
        assert_eq!(p.unpublished(), pages - 1000);
        // Rewritten again while waiting: only the final content goes out.
        seen.iter_mut().for_each(|s| *s = h(3));
        let mut total = HashMap::new();
        for _ in 0..20 {
            out.clear();
            let n = p.on_refresh(&dirty(pages, &[]), &seen, 1000, &mut out);
            assert!(n <= 1000);
            for (k, v) in net(&out) {
                *total.entry(k).or_insert(0i64) += v;
            }
        }
        assert_eq!(p.unpublished(), 0);
        assert!(p.intended().iter().all(|x| *x == h(3)));
        assert!(!total.contains_key(&h(2)) || total[&h(2)] <= 0);
    }

    #[test]
    fn the_ledger_sends_the_net_difference_and_corrects_from_a_listing() {
        let mut l = Ledger::default();
        l.apply(&[(h(1), 1), (h(1), 1), (h(2), 1), (h(2), -1), (h(3), 3)]);
        let mut b = l.take_batch(0, 1, 100);
        b.sort();
        assert_eq!(b, vec![(h(1), 2), (h(3), 3)]);
        l.acked(&b);
        assert_eq!(l.behind(), 0);
        assert_eq!(l.acked_sum(0, 1), l.desired_sum(0, 1));
        // The index turns out to hold h(3) once and a leftover h(9).
        let actual = HashMap::from([(h(1), 2), (h(3), 1), (h(9), 4)]);
        assert_eq!(l.correct(0, 1, &actual), 2);
        let mut b = l.take_batch(0, 1, 100);
        b.sort();
        assert_eq!(b, vec![(h(3), 2), (h(9), -4)]);
        l.acked(&b);
        assert_eq!(l.acked_sum(0, 1), l.desired_sum(0, 1));
        // A failed send is retried in full.
        l.apply(&[(h(4), 1)]);
        let b = l.take_batch(0, 1, 100);
        l.retry(&b);
        assert_eq!(l.take_batch(0, 1, 100), b);
    }
}
