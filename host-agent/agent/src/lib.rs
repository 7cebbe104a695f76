//! The host agent: owns this host's micro-VMs, keeps a map of the page
//! contents they hold (so incoming migrations copy what is already here),
//! and serves the control API (see `proto/proto/pagecast/v1/agent.proto`):
//! starting, listing and stopping VMs, migrating them out, and receiving
//! them. The network side is in [`server`] (tokio); everything here is
//! blocking and runs on blocking threads, the hashing on a rayon pool.

pub mod job;
pub mod metrics;
pub mod publish;
pub mod qemu;
pub mod server;
mod sync;

use std::collections::{BTreeMap, HashMap};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::sync::{lock, read, write};
use ::metrics::{counter, gauge, histogram};
use pagecast_channel::{AuthError, Channel, Role, Tls};
use pagecast_pages::{ContentKey, DomainSecret, PAGE_SIZE, Page, PageHash};
use pagecast_proto::v1;
use pagecast_proto::v1::RefusalCode;

use job::{JobContent, JobSlots, Jobs};
use pagecast_index::holders::HoldingSum;
use pagecast_index::keys::shard_of;
use pagecast_memory::fingerprint::{FingerprintError, Fingerprinter, read_and_hash};
use pagecast_memory::kvm::{InitialMemory, MicroVm, MicroVmConfig, VcpuState, VmError};
use pagecast_memory::synth::{SynthError, SynthSpec, SyntheticVm};
use pagecast_memory::{DirtyBitmap, GuestMemory, ImageFile, MemoryError, Region};
use pagecast_migrate::{
    ChannelLink, Hold, IncomingReport, LocalContent, MigrateOptions, MigrationError, MigrationLink,
    MigrationReport, Progress, SourceVm, migrate_in_job, migrate_out_held,
};
use publish::{HostMeta, HostNow, IndexLink, Publication, VmOp};

/// Errors of the agent's operations. Each is sent back to the client as
/// its message.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The listen or metrics address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// No VM of that name here.
    #[error("no VM named {0:?} on this agent")]
    NoSuchVm(String),
    /// A VM of that name already runs here.
    #[error("a VM named {0:?} already runs on this agent")]
    VmExists(String),
    /// A VM name the agent does not accept.
    #[error("VM name {0:?} must be 1 to 64 letters, digits, '-', '_' or '.'")]
    BadName(String),
    /// A request missing or contradicting what it needs.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// An adopted QEMU VM's QEMU failed or refused.
    #[error("QEMU: {0}")]
    Qemu(String),
    /// The VM is busy (migrating, in doubt).
    #[error("VM {vm:?} is {state}")]
    Busy {
        /// The VM.
        vm: String,
        /// What it is doing.
        state: &'static str,
    },
    /// The destination agent could not be reached.
    #[error("cannot reach the agent at {addr}: {source}")]
    Connect {
        /// Its address.
        addr: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Another agent, called by this one, failed.
    #[error(transparent)]
    Peer(#[from] pagecast_agent_api::ClientError),
    /// The agent answered with an error.
    #[error("the agent at {addr} says: {message}")]
    Remote {
        /// Its address.
        addr: String,
        /// Why, for programs.
        code: RefusalCode,
        /// What it said.
        message: String,
    },
    /// The agent answered with something the request does not expect.
    #[error("unexpected answer from the agent at {addr}: {what}")]
    Unexpected {
        /// Its address.
        addr: String,
        /// What came.
        what: String,
    },
    /// Authentication or framing failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A synthetic profile was refused.
    #[error(transparent)]
    Synth(#[from] SynthError),
    /// The hashing pool failed.
    #[error(transparent)]
    Fingerprint(#[from] FingerprintError),
    /// A migration failed.
    #[error(transparent)]
    Migration(#[from] MigrationError),
    /// The metrics exporter could not start.
    #[error("metrics endpoint: {0}")]
    Metrics(String),
    /// The runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl AgentError {
    /// The refusal code this error travels under.
    pub fn code(&self) -> RefusalCode {
        match self {
            AgentError::NoSuchVm(_) => RefusalCode::NotFound,
            AgentError::VmExists(_) => RefusalCode::Refused,
            AgentError::BadName(_) | AgentError::BadRequest(_) | AgentError::Synth(_) => {
                RefusalCode::Invalid
            }
            AgentError::Busy { .. } => RefusalCode::Busy,
            AgentError::Connect { .. } | AgentError::Auth(_) => RefusalCode::Unavailable,
            AgentError::Remote { code, .. } => *code,
            AgentError::Peer(e) => e.code(),
            AgentError::Migration(e) => e.code(),
            AgentError::Bind { .. }
            | AgentError::Unexpected { .. }
            | AgentError::Vm(_)
            | AgentError::Memory(_)
            | AgentError::Fingerprint(_)
            | AgentError::Metrics(_)
            | AgentError::Runtime(_)
            | AgentError::Qemu(_) => RefusalCode::Internal,
        }
    }

    /// The error as a result's refusal.
    pub fn refusal(&self) -> v1::Refusal {
        pagecast_proto::refusal(self.code(), self.to_string())
    }

    /// The error as the control API carries it.
    pub fn to_proto(&self) -> v1::AgentError {
        v1::AgentError {
            message: self.to_string(),
            code: self.code() as i32,
        }
    }
}

/// What a VM here is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VmState {
    Running,
    MigratingOut,
    /// Commit was sent but the destination never confirmed: the VM stays
    /// paused here and may be running there.
    InDoubt,
}

impl VmState {
    fn proto(self) -> v1::HostedVmState {
        match self {
            VmState::Running => v1::HostedVmState::Running,
            VmState::MigratingOut => v1::HostedVmState::MigratingOut,
            VmState::InDoubt => v1::HostedVmState::InDoubt,
        }
    }

    fn name(self) -> &'static str {
        pagecast_proto::names::state(self.proto())
    }
}

/// A VM this agent runs. KVM's dirty log is read in one place
/// ([`VmEntry::pull`]) and its bits kept twice, once for a migration and
/// once for the content map, so neither consumer steals the other's.
pub struct VmEntry {
    name: String,
    origin: String,
    /// Its dedup domain ("cluster" for the cluster-wide one) and the key
    /// its pages are named with there.
    domain: String,
    key: ContentKey,
    vm: MicroVm,
    state: Mutex<VmState>,
    for_migration: Mutex<DirtyBitmap>,
    for_content: Mutex<DirtyBitmap>,
    /// The content of each frame as the content map last saw it, so a
    /// rewritten frame's old content leaves the map.
    seen: Mutex<Vec<PageHash>>,
    /// What the content index should list for each frame.
    publication: Mutex<Publication>,
    /// Held while the VM's content map is refreshed.
    refreshing: Mutex<()>,
    /// How fast the guest rewrites pages, from the refreshes' dirty bits.
    rewrites: Mutex<RewriteMeter>,
    /// While the VM is in doubt: where it may run, and when to ask next.
    in_doubt: Mutex<Option<InDoubt>>,
}

/// A switchover that went unconfirmed: the destination to ask where the VM
/// stands, and when to ask next.
#[derive(Debug, Clone)]
struct InDoubt {
    /// The destination agent, HOST:PORT.
    to: String,
    /// When to ask next.
    next: std::time::Instant,
    /// Questions that went unanswered so far.
    tries: u32,
    /// When it was last said that the VM stays in doubt.
    told: Option<std::time::Instant>,
}

/// Distinct pages a guest rewrites a second: each content refresh sees the
/// frames dirtied since the one before, and the meter keeps a moving
/// average weighted by time (about the last [`RewriteMeter::HORIZON_S`]
/// seconds), which the planner uses to predict what pre-copy re-sends.
#[derive(Debug, Default)]
struct RewriteMeter {
    last: Option<std::time::Instant>,
    /// Frames seen since `last`.
    pending: u64,
    rate: Option<f64>,
}

impl RewriteMeter {
    const HORIZON_S: f64 = 10.0;

    /// Takes in `pages` frames dirtied since the previous sample.
    fn sample(&mut self, pages: u64, now: std::time::Instant) {
        let Some(last) = self.last else {
            self.last = Some(now);
            return;
        };
        self.pending += pages;
        let dt = now.saturating_duration_since(last).as_secs_f64();
        if dt < 0.05 {
            // Too short to rate: the frames count towards the next sample.
            return;
        }
        let r = std::mem::take(&mut self.pending) as f64 / dt;
        self.last = Some(now);
        let w = 1.0 - (-dt / Self::HORIZON_S).exp();
        self.rate = Some(match self.rate {
            Some(old) => old + w * (r - old),
            None => r,
        });
    }

    fn rate(&self) -> f64 {
        self.rate.unwrap_or(0.0)
    }
}

impl VmEntry {
    fn new(name: &str, origin: String, domain: (&str, ContentKey), vm: MicroVm) -> Self {
        let pages = vm.page_count();
        VmEntry {
            name: name.to_owned(),
            origin,
            domain: pagecast_pages::domain::normalize(domain.0).to_owned(),
            key: domain.1,
            vm,
            state: Mutex::new(VmState::Running),
            for_migration: Mutex::new(DirtyBitmap::new(pages)),
            for_content: Mutex::new(DirtyBitmap::new(pages)),
            seen: Mutex::new(Vec::new()),
            publication: Mutex::new(Publication::new(pages)),
            refreshing: Mutex::new(()),
            rewrites: Mutex::new(RewriteMeter::default()),
            in_doubt: Mutex::new(None),
        }
    }

    /// Reads KVM's dirty log into both bitmaps. The migration bitmap stays
    /// locked from the read to the merge, so a migration taking its bits
    /// never misses some that another thread has read but not yet merged.
    fn pull_into(&self, m: &mut DirtyBitmap) -> Result<(), MemoryError> {
        let d = self.vm.take_dirty()?;
        m.merge(&d)?;
        lock(&self.for_content).merge(&d)
    }

    fn pull(&self) -> Result<(), MemoryError> {
        self.pull_into(&mut lock(&self.for_migration))
    }

    fn info(&self) -> v1::VmInfo {
        v1::VmInfo {
            name: self.name.clone(),
            memory_bytes: self.vm.region().len() as u64,
            state: lock(&self.state).proto() as i32,
            progress: self.vm.progress().unwrap_or(0),
            dirty_rate: self.vm.dirty_rate(),
            throttle_pct: u32::from(self.vm.throttle()),
            origin: self.origin.clone(),
            domain: self.domain.clone(),
            kind: v1::VmKind::MicroVm as i32,
        }
    }
}

impl GuestMemory for VmEntry {
    fn write_page(&self, frame: u64, data: &Page) -> Result<(), MemoryError> {
        self.vm.write_page(frame, data)
    }

    fn take_dirty(&self) -> Result<DirtyBitmap, MemoryError> {
        let mut m = lock(&self.for_migration);
        self.pull_into(&mut m)?;
        Ok(std::mem::replace(
            &mut *m,
            DirtyBitmap::new(self.page_count()),
        ))
    }

    fn mark_dirty(&self, pages: &DirtyBitmap) -> Result<(), MemoryError> {
        lock(&self.for_migration).merge(pages)
    }

    fn region(&self) -> &Region {
        self.vm.region()
    }
}

/// A VM on its way out, seen by the migration engine: the VM, with the
/// agent's content map for its manifest.
struct Outgoing<'a> {
    agent: &'a Agent,
    entry: &'a Arc<VmEntry>,
}

impl GuestMemory for Outgoing<'_> {
    fn write_page(&self, frame: u64, data: &Page) -> Result<(), MemoryError> {
        self.entry.write_page(frame, data)
    }
    fn take_dirty(&self) -> Result<DirtyBitmap, MemoryError> {
        self.entry.take_dirty()
    }
    fn mark_dirty(&self, pages: &DirtyBitmap) -> Result<(), MemoryError> {
        self.entry.mark_dirty(pages)
    }
    fn region(&self) -> &Region {
        self.entry.region()
    }
}

impl SourceVm for Outgoing<'_> {
    fn name(&self) -> &str {
        &self.entry.name
    }
    fn origin(&self) -> String {
        self.entry.origin.clone()
    }
    fn dirty_rate(&self) -> u64 {
        self.entry.vm.dirty_rate()
    }
    fn pause(&self) -> Result<(), VmError> {
        self.entry.vm.pause()
    }
    fn resume(&self) {
        self.entry.vm.resume()
    }
    fn vcpu_state(&self) -> Result<VcpuState, VmError> {
        self.entry.vm.vcpu_state()
    }
    fn set_throttle(&self, pct: u8) {
        self.entry.vm.set_throttle(pct)
    }
    fn current_hashes(&self) -> Option<Vec<PageHash>> {
        self.agent.current_hashes(self.entry)
    }
    fn domain(&self) -> &str {
        &self.entry.domain
    }
    fn content_key(&self) -> ContentKey {
        self.entry.key
    }
}

impl SourceVm for VmEntry {
    fn name(&self) -> &str {
        &self.name
    }
    fn origin(&self) -> String {
        self.origin.clone()
    }
    fn dirty_rate(&self) -> u64 {
        self.vm.dirty_rate()
    }
    fn pause(&self) -> Result<(), VmError> {
        self.vm.pause()
    }
    fn resume(&self) {
        self.vm.resume()
    }
    fn vcpu_state(&self) -> Result<VcpuState, VmError> {
        self.vm.vcpu_state()
    }
    fn set_throttle(&self, pct: u8) {
        self.vm.set_throttle(pct)
    }
    fn domain(&self) -> &str {
        &self.domain
    }
    fn content_key(&self) -> ContentKey {
        self.key
    }
}

/// Settings of an agent.
pub struct AgentConfig {
    /// This host's name.
    pub name: String,
    /// Control address.
    pub listen: std::net::SocketAddr,
    /// Base directory for relative image paths.
    pub data: Option<PathBuf>,
    /// Prometheus endpoint.
    pub metrics: Option<std::net::SocketAddr>,
    /// This node's TLS identity (certificate, key, cluster CA).
    pub tls: Tls,
    /// Hashing threads.
    pub threads: usize,
    /// The content index to publish to, and what to tell it of this host.
    pub index: Option<(Vec<String>, HostMeta)>,
    /// The address this host multicasts from (default: the listen IP).
    pub cast_iface: Option<std::net::Ipv4Addr>,
    /// The cluster's dedup-domain secret (`domains.key` beside the TLS
    /// identity); without it only the cluster-wide domain can be used.
    pub domain_secret: Option<DomainSecret>,
}

/// The agent's state.
pub struct Agent {
    name: String,
    tls: Tls,
    data: Option<PathBuf>,
    fp: Fingerprinter,
    vms: Mutex<BTreeMap<String, Arc<VmEntry>>>,
    /// Names of VMs migrating in (reserved until they start or fail).
    incoming: Mutex<HashMap<String, v1::HostedVmState>>,
    /// A resident frame holding each content (a hint: checked on use).
    content: RwLock<HashMap<PageHash, (Arc<VmEntry>, u64)>>,
    /// The content index this agent publishes to, if any.
    index: Option<Arc<IndexLink>>,
    /// VMs arriving for gang jobs.
    jobs: Jobs,
    /// Gang jobs an operator cancelled (`pagecast cancel`).
    cancelled_jobs: Arc<Mutex<std::collections::HashSet<String>>>,
    /// The address this host multicasts from.
    cast_iface: Mutex<std::net::Ipv4Addr>,
    /// The cluster's dedup-domain secret, if this host holds it.
    domain_secret: Option<DomainSecret>,
    /// QEMU VMs taken on with `vm adopt`.
    adopted: Mutex<BTreeMap<String, Arc<qemu::Adopted>>>,
    /// A frame of an adopted VM holding each content, as its last scan saw
    /// it (a hint: checked on use).
    adopted_content: RwLock<HashMap<PageHash, (Arc<qemu::Adopted>, u64)>>,
}

fn valid_name(n: &str) -> bool {
    pagecast_proto::name_ok(n)
}

/// Default memory of a synthetic VM.
pub const DEFAULT_MEMORY: u64 = 64 << 20;
/// Default working set, in pages.
pub const DEFAULT_WORKING_SET: u64 = 1024;
/// First frame of the working set.
const WORKING_SET_START: u64 = 16;

impl Agent {
    /// A new agent with no VMs.
    pub fn new(
        name: &str,
        tls: Tls,
        data: Option<PathBuf>,
        threads: usize,
    ) -> Result<Self, AgentError> {
        let me = tls.identity();
        if me.role != Role::Host {
            return Err(AgentError::BadRequest(format!(
                "an agent needs a host certificate; this one is {me}"
            )));
        }
        if me.name != name {
            return Err(AgentError::BadRequest(format!(
                "the agent is named {name:?} but its certificate names host {:?} \
                 (issue one with `pagecast ca issue --name {name} --role host`)",
                me.name
            )));
        }
        Ok(Agent {
            name: name.to_owned(),
            tls,
            data,
            fp: Fingerprinter::new(threads)?,
            vms: Mutex::new(BTreeMap::new()),
            incoming: Mutex::new(HashMap::new()),
            content: RwLock::new(HashMap::new()),
            index: None,
            jobs: Jobs::default(),
            cancelled_jobs: Arc::default(),
            cast_iface: Mutex::new(std::net::Ipv4Addr::LOCALHOST),
            domain_secret: None,
            adopted: Mutex::new(BTreeMap::new()),
            adopted_content: RwLock::new(HashMap::new()),
        })
    }

    /// Gives the agent the cluster's dedup-domain secret (before it is
    /// shared), so VMs may run in domains other than the cluster-wide one.
    pub fn set_domain_secret(&mut self, s: Option<DomainSecret>) {
        self.domain_secret = s;
    }

    /// The key of dedup domain `domain` on this host.
    pub fn domain_key(&self, domain: &str) -> Result<ContentKey, AgentError> {
        pagecast_pages::domain::key_for(self.domain_secret.as_ref(), domain)
            .map_err(|e| AgentError::BadRequest(e.to_string()))
    }

    /// VMs arriving here for gang jobs.
    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    /// Cancels a gang job here: its held and running migrations stop
    /// before switchover (their VMs stay), its arriving VMs are discarded.
    pub fn cancel_job(&self, job: &str) -> bool {
        !job.is_empty() && lock(&self.cancelled_jobs).insert(job.to_owned())
    }

    /// Whether `job` was cancelled here, as a check migrations can keep.
    pub fn job_cancel_flag(&self, job: &str) -> Box<dyn Fn() -> bool + Send> {
        let set = self.cancelled_jobs.clone();
        let job = job.to_owned();
        Box::new(move || !job.is_empty() && lock(&set).contains(&job))
    }

    /// The address this host multicasts from.
    pub fn cast_iface(&self) -> std::net::Ipv4Addr {
        *lock(&self.cast_iface)
    }

    /// Sets the address this host multicasts from.
    pub fn set_cast_iface(&self, a: std::net::Ipv4Addr) {
        *lock(&self.cast_iface) = a;
    }

    /// The hashing pool (for other CPU-heavy work).
    pub fn fp_pool(&self) -> &rayon::ThreadPool {
        self.fp.pool()
    }

    /// A VM's frame hashes as the content map has them now, and its memory.
    pub fn vm_hashes(&self, name: &str) -> Result<(Vec<PageHash>, u64), AgentError> {
        if self.is_adopted(name) {
            return self.adopted_hashes(name);
        }
        let e = lock(&self.vms)
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::NoSuchVm(name.to_owned()))?;
        let h = self.current_hashes(&e).ok_or_else(|| AgentError::Busy {
            vm: name.to_owned(),
            state: "still being indexed",
        })?;
        Ok((h, e.vm.region().len() as u64))
    }

    /// Distinct pages VM `name`'s guest rewrote a second lately, from the
    /// dirty log (0 until two content refreshes have run).
    pub fn vm_rewrite_rate(&self, name: &str) -> Result<f64, AgentError> {
        if let Some(r) = self.adopted_rewrite_rate(name) {
            return Ok(r);
        }
        let e = lock(&self.vms)
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::NoSuchVm(name.to_owned()))?;
        let r = lock(&e.rewrites).rate();
        Ok(r)
    }

    /// Publishes this agent's VMs to the content index at `addrs`
    /// (before the agent is shared; [`Agent::publish_loop`] does the
    /// sending).
    pub fn set_index(&mut self, addrs: Vec<String>, meta: HostMeta) {
        self.index = Some(IndexLink::new(
            addrs,
            self.tls.clone(),
            self.name.clone(),
            meta,
        ));
    }

    /// The link to the content index, if this agent publishes.
    pub fn index_link(&self) -> Option<&Arc<IndexLink>> {
        self.index.as_ref()
    }

    /// Sends this agent's content to the index until `stop` is set on the
    /// link (run on a thread of its own).
    pub fn publish_loop(&self) {
        if let Some(link) = &self.index {
            publish::run(link, &|| self.host_now(), &|| self.vm_records());
        }
    }

    /// The records of the VMs that run here (published, fully indexed).
    pub fn vm_records(&self) -> Vec<v1::VmRecord> {
        let vms: Vec<Arc<VmEntry>> = lock(&self.vms).values().cloned().collect();
        let mut records: Vec<v1::VmRecord> = vms
            .iter()
            .filter_map(|v| {
                let p = lock(&v.publication);
                p.is_live()
                    .then(|| publish::vm_record(&v.name, &v.origin, &v.domain, p.intended()))
            })
            .collect();
        records.extend(self.adopted_records());
        records
    }

    /// What the host report says of the VMs now.
    pub fn host_now(&self) -> HostNow {
        let vms: Vec<Arc<VmEntry>> = lock(&self.vms).values().cloned().collect();
        HostNow {
            vms: vms.iter().map(|v| v.name.clone()).collect(),
            used_bytes: vms.iter().map(|v| v.vm.region().len() as u64).sum(),
            hot_pages: vms.iter().map(|v| lock(&v.publication).unpublished()).sum(),
        }
    }

    /// Recomputes, from a fresh hash of all memory, what the index should
    /// list for this host in each of `shards` shards (hot frames left out
    /// as they are from publication), beside what the agent's ledger says.
    pub fn audit(&self, shards: u32, ledger_only: bool) -> v1::AuditResponse {
        let vms: Vec<Arc<VmEntry>> = if ledger_only {
            Vec::new()
        } else {
            lock(&self.vms).values().cloned().collect()
        };
        let n = shards.max(1);
        let mut fresh: HashMap<PageHash, u64> = HashMap::new();
        let mut hot = 0u64;
        for v in &vms {
            let f = self.fp.fingerprint(&**v, &v.key, &|_| {});
            let p = lock(&v.publication);
            for (frame, h) in f.hashes.iter().enumerate() {
                if p.is_hot(frame as u64) {
                    hot += 1;
                } else if !h.is_zero_page() {
                    *fresh.entry(*h).or_default() += 1;
                }
            }
        }
        if !ledger_only {
            // Adopted QEMU VMs as their last scan saw them (what their
            // listing is made from; their memory may have moved on since).
            self.adopted_audit(&mut fresh, &mut hot);
        }
        let mut fresh_sums = vec![HoldingSum::default(); n as usize];
        for (h, c) in &fresh {
            fresh_sums[shard_of(h, n) as usize].change(h.as_bytes(), 0, *c);
        }
        let ledger = self.index.as_ref().map(|l| {
            let g = l.ledger();
            (0..n).map(|s| g.desired_sum(s, n)).collect::<Vec<_>>()
        });
        v1::AuditResponse {
            fresh: fresh_sums
                .iter()
                .map(|s| s.encode().to_vec().into())
                .collect(),
            desired: ledger
                .unwrap_or_default()
                .iter()
                .map(|s| s.encode().to_vec().into())
                .collect(),
            hot_frames: hot,
            vms: lock(&self.vms).len() as u32,
        }
    }

    /// This agent's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This node's TLS identity (certificate, key, cluster CA).
    pub fn tls(&self) -> &Tls {
        &self.tls
    }

    /// Opens a channel to another host's agent over `stream`, refusing a
    /// peer whose certificate is not a host's (it would be trusted to
    /// `what`).
    pub fn host_channel(&self, stream: TcpStream, what: &str) -> Result<Channel, AgentError> {
        let ch = Channel::client(stream, &self.tls)?;
        pagecast_channel::require(ch.identity(), &[Role::Host], ch.peer(), what)?;
        Ok(ch)
    }

    /// Connects to the agent at `to` (10 s deadline) as a host channel
    /// (see [`Agent::host_channel`]).
    pub(crate) fn connect_host(&self, to: &str, what: &str) -> Result<Channel, AgentError> {
        let addr = to
            .to_socket_addrs()
            .map_err(|source| AgentError::Connect {
                addr: to.to_owned(),
                source,
            })?
            .next()
            .ok_or_else(|| AgentError::BadRequest(format!("{to} resolves to no address")))?;
        let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(
            |source| AgentError::Connect {
                addr: to.to_owned(),
                source,
            },
        )?;
        self.host_channel(stream, what)
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        match (&self.data, p.is_relative()) {
            (Some(d), true) => d.join(p),
            _ => p.to_owned(),
        }
    }

    fn reserve(&self, name: &str, state: v1::HostedVmState) -> Result<(), AgentError> {
        if !valid_name(name) {
            return Err(AgentError::BadName(name.to_owned()));
        }
        let vms = lock(&self.vms);
        let mut incoming = lock(&self.incoming);
        if vms.contains_key(name) || incoming.contains_key(name) || self.is_adopted(name) {
            return Err(AgentError::VmExists(name.to_owned()));
        }
        incoming.insert(name.to_owned(), state);
        Ok(())
    }

    fn register(&self, entry: Arc<VmEntry>) {
        lock(&self.incoming).remove(&entry.name);
        lock(&self.vms).insert(entry.name.clone(), entry.clone());
        gauge!(crate::metrics::VMS).set(lock(&self.vms).len() as f64);
        self.index(&entry);
    }

    /// Whether `e` is still one of this agent's VMs. Checked under the
    /// content map's write lock: [`Agent::forget`] removes a VM from the
    /// list before it purges the map, so a VM checked here is purged after.
    fn registered(&self, e: &Arc<VmEntry>) -> bool {
        lock(&self.vms)
            .get(&e.name)
            .is_some_and(|v| Arc::ptr_eq(v, e))
    }

    /// Adds every page of a VM to the content map.
    fn index(&self, entry: &Arc<VmEntry>) {
        let _ = entry.pull();
        *lock(&entry.for_content) = DirtyBitmap::new(entry.page_count());
        let f = self.fp.fingerprint(&**entry, &entry.key, &|_| {});
        let mut map = write(&self.content);
        if !self.registered(entry) {
            // Stopped meanwhile: its pages must not keep it alive.
            return;
        }
        for (frame, h) in f.hashes.iter().enumerate() {
            if !h.is_zero_page() {
                map.entry(*h)
                    .or_insert_with(|| (entry.clone(), frame as u64));
            }
        }
        gauge!(crate::metrics::CONTENT_ENTRIES).set(map.len() as f64);
        let mut seen = lock(&entry.seen);
        *seen = f.hashes;
        if let Some(link) = &self.index {
            let mut changes = Vec::new();
            let mut p = lock(&entry.publication);
            p.publish_all(&seen, &mut changes);
            let record =
                publish::vm_record(&entry.name, &entry.origin, &entry.domain, p.intended());
            drop(p);
            drop(seen);
            drop(map);
            link.apply(&changes);
            link.vm_op(VmOp::Put(record));
        }
    }

    /// Removes a VM from the agent: its pages leave the content map and
    /// the index (withdrawn; its record dropped, or moved to `moved_to`).
    fn forget(&self, name: &str, moved_to: Option<&str>) -> Option<Arc<VmEntry>> {
        let e = lock(&self.vms).remove(name)?;
        self.content
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, (vm, _)| !Arc::ptr_eq(vm, &e));
        gauge!(crate::metrics::VMS).set(lock(&self.vms).len() as f64);
        if let Some(link) = &self.index {
            let mut changes = Vec::new();
            lock(&e.publication).withdraw_all(&mut changes);
            link.apply(&changes);
            link.vm_op(match moved_to {
                Some(to) => VmOp::Move {
                    name: name.to_owned(),
                    to: to.to_owned(),
                },
                None => VmOp::Drop(name.to_owned()),
            });
        }
        Some(e)
    }

    /// Starts a VM.
    pub fn vm_start(&self, r: &v1::VmStartRequest) -> Result<v1::VmInfo, AgentError> {
        self.reserve(&r.name, v1::HostedVmState::Starting)?;
        let started = self.boot(r);
        match started {
            Ok(entry) => {
                let info = entry.info();
                self.register(entry);
                Ok(info)
            }
            Err(e) => {
                lock(&self.incoming).remove(&r.name);
                Err(e)
            }
        }
    }

    fn boot(&self, r: &v1::VmStartRequest) -> Result<Arc<VmEntry>, AgentError> {
        let key = self.domain_key(&r.domain)?;
        let (memory, origin, synth) = match (r.image.is_empty(), r.synthetic.is_empty()) {
            (false, true) => {
                let path = self.resolve(&r.image);
                let len = ImageFile::open(&path)?.len_bytes();
                if r.memory_bytes != 0 && r.memory_bytes != len {
                    return Err(AgentError::BadRequest(format!(
                        "image {} holds {len} bytes, not the {} asked for",
                        path.display(),
                        r.memory_bytes
                    )));
                }
                (len, path.display().to_string(), None)
            }
            (true, false) => {
                let memory = if r.memory_bytes == 0 {
                    DEFAULT_MEMORY
                } else {
                    r.memory_bytes
                };
                let spec = SynthSpec::parse(&r.synthetic, memory)?;
                (
                    spec.memory_bytes(),
                    format!("synthetic {}", r.synthetic),
                    Some(SyntheticVm::new(spec)?),
                )
            }
            _ => {
                return Err(AgentError::BadRequest(
                    "give exactly one of an image and a synthetic profile".into(),
                ));
            }
        };
        let pages = memory / PAGE_SIZE as u64;
        let ws = if r.working_set_pages == 0 {
            DEFAULT_WORKING_SET
        } else {
            r.working_set_pages
        };
        let start = WORKING_SET_START.min(pages.saturating_sub(1)).max(2);
        let end = (start + ws).min(pages);
        let config = MicroVmConfig {
            memory_bytes: memory,
            working_set: (end > start).then_some(start..end).into_iter().collect(),
            dirty_rate: r.dirty_rate,
        };
        let initial = match &synth {
            Some(s) => InitialMemory::Synthetic(s),
            None => InitialMemory::Image(Path::new(&origin)),
        };
        let vm = self.fp.pool().install(|| MicroVm::boot(&config, initial))?;
        Ok(Arc::new(VmEntry::new(
            &r.name,
            origin,
            (&r.domain, key),
            vm,
        )))
    }

    /// Lists the VMs.
    pub fn vm_list(&self) -> v1::VmList {
        let vms: Vec<Arc<VmEntry>> = lock(&self.vms).values().cloned().collect();
        let mut infos: Vec<v1::VmInfo> = vms.iter().map(|e| e.info()).collect();
        infos.extend(lock(&self.incoming).iter().map(|(n, s)| v1::VmInfo {
            name: n.clone(),
            state: *s as i32,
            ..Default::default()
        }));
        infos.extend(self.adopted_infos());
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        v1::VmList {
            agent: self.name.clone(),
            vms: infos,
            content_entries: read(&self.content).len() as u64,
        }
    }

    /// Stops a VM (also one left in doubt by a migration).
    pub fn vm_stop(&self, name: &str) -> Result<v1::VmInfo, AgentError> {
        if self.is_adopted(name) {
            // Only forgotten: QEMU is the operator's to stop.
            return self
                .forget_adopted(name, None)
                .ok_or_else(|| AgentError::NoSuchVm(name.to_owned()));
        }
        {
            let vms = lock(&self.vms);
            let e = vms
                .get(name)
                .ok_or_else(|| AgentError::NoSuchVm(name.to_owned()))?;
            let s = *lock(&e.state);
            if s == VmState::MigratingOut {
                return Err(AgentError::Busy {
                    vm: name.to_owned(),
                    state: s.name(),
                });
            }
        }
        let e = self
            .forget(name, None)
            .ok_or_else(|| AgentError::NoSuchVm(name.to_owned()))?;
        let info = e.info();
        // The VM stops when the last reference goes (its Drop joins the vCPU).
        drop(e);
        Ok(info)
    }

    /// Where the VM `name` stands here, for the source of a migration
    /// whose switchover went unconfirmed.
    pub fn whereabouts(&self, name: &str) -> v1::Whereabouts {
        if lock(&self.vms).contains_key(name) || self.is_adopted(name) {
            v1::Whereabouts::Running
        } else if lock(&self.incoming).contains_key(name) {
            v1::Whereabouts::Arriving
        } else {
            v1::Whereabouts::Absent
        }
    }

    /// Settles the VMs in doubt whose time to ask has come: each one's
    /// destination says where the VM stands. Running there: the copy here
    /// is released. Absent there (it died before or after starting the VM,
    /// and came back without it): the copy here resumes. Arriving, or no
    /// answer: it stays paused and is asked again later (1 s, doubling to
    /// 30 s). Exactly one copy runs in every case.
    pub fn resolve_in_doubt(&self) {
        let now = std::time::Instant::now();
        let due: Vec<(Arc<VmEntry>, InDoubt)> = lock(&self.vms)
            .values()
            .filter_map(|e| {
                let d = lock(&e.in_doubt).clone()?;
                (d.next <= now).then(|| (e.clone(), d))
            })
            .collect();
        for (e, d) in due {
            let answer = ask_whereabouts(self, &d.to, &e.name);
            self.settle(&e, d, answer);
        }
    }

    fn settle(
        &self,
        e: &Arc<VmEntry>,
        mut d: InDoubt,
        answer: Result<(v1::Whereabouts, String), AgentError>,
    ) {
        let mut state = lock(&e.state);
        if *state != VmState::InDoubt {
            return;
        }
        match answer {
            Ok((v1::Whereabouts::Running, dest)) => {
                *lock(&e.in_doubt) = None;
                drop(state);
                tracing::warn!(
                    "VM {}: its unconfirmed switchover went through: it runs at {dest}; \
                     released here",
                    e.name
                );
                counter!(crate::metrics::IN_DOUBT_SETTLED, "outcome" => "released").increment(1);
                self.forget(&e.name, Some(&dest));
            }
            Ok((v1::Whereabouts::Absent, dest)) => {
                *lock(&e.in_doubt) = None;
                *state = VmState::Running;
                e.vm.set_throttle(0);
                e.vm.resume();
                tracing::warn!(
                    "VM {}: its unconfirmed switchover never started it at {dest}; resumed here",
                    e.name
                );
                counter!(crate::metrics::IN_DOUBT_SETTLED, "outcome" => "resumed").increment(1);
            }
            other => {
                let why = match other {
                    Ok((w, dest)) => format!("{dest} says it is {}", w.as_str_name()),
                    Err(err) => format!("cannot ask {}: {err}", d.to),
                };
                let now = std::time::Instant::now();
                if d.told.is_none_or(|t| now - t >= Duration::from_secs(30)) {
                    tracing::warn!("VM {} stays paused, in doubt: {why}", e.name);
                    d.told = Some(now);
                }
                d.tries = d.tries.saturating_add(1);
                d.next =
                    now + Duration::from_secs(1 << d.tries.min(5)).min(Duration::from_secs(30));
                *lock(&e.in_doubt) = Some(d);
            }
        }
    }

    /// Changes a VM's page-write rate (0: its guest only ticks).
    pub fn vm_set(&self, r: &v1::VmSetRequest) -> Result<v1::VmInfo, AgentError> {
        let e = lock(&self.vms)
            .get(&r.name)
            .cloned()
            .ok_or_else(|| AgentError::NoSuchVm(r.name.clone()))?;
        e.vm.set_dirty_rate(r.dirty_rate)?;
        Ok(e.info())
    }

    /// Migrates a VM to the agent at `r.to`, reporting progress.
    pub fn migrate_out(
        &self,
        r: &v1::MigrateRequest,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<MigrationReport, AgentError> {
        self.migrate_out_held(r, progress, None)
    }

    /// [`Agent::migrate_out`], held for a gang job by `hold` after the
    /// destination says what it lacks.
    pub fn migrate_out_held(
        &self,
        r: &v1::MigrateRequest,
        progress: &mut dyn FnMut(&Progress),
        hold: Option<&mut dyn Hold>,
    ) -> Result<MigrationReport, AgentError> {
        let entry = lock(&self.vms)
            .get(&r.vm)
            .cloned()
            .ok_or_else(|| AgentError::NoSuchVm(r.vm.clone()))?;
        {
            let mut s = lock(&entry.state);
            if *s != VmState::Running {
                return Err(AgentError::Busy {
                    vm: r.vm.clone(),
                    state: s.name(),
                });
            }
            *s = VmState::MigratingOut;
        }
        let result = self.run_out(&entry, r, progress, hold);
        let mut s = lock(&entry.state);
        match &result {
            Ok((rep, dest)) => {
                drop(s);
                // Released: the destination runs it now.
                self.forget(&r.vm, Some(dest));
                counter!(crate::metrics::MIGRATIONS, "role" => "source", "result" => "ok")
                    .increment(1);
                histogram!(crate::metrics::DOWNTIME_SECONDS).record(rep.downtime_ms / 1e3);
                counter!(crate::metrics::MIGRATION_BYTES, "class" => "pages")
                    .increment(rep.bytes_pages);
                counter!(crate::metrics::MIGRATION_BYTES, "class" => "manifest")
                    .increment(rep.bytes_manifest);
                counter!(crate::metrics::PAGES_LOCAL).increment(rep.pages_local);
                counter!(crate::metrics::BYTES_SENT, "kind" => "migration")
                    .increment(rep.bytes_sent);
            }
            Err(AgentError::Migration(MigrationError::InDoubt(_))) => {
                *s = VmState::InDoubt;
                // Settled by asking the destination ([`Agent::resolve_in_doubt`]).
                *lock(&entry.in_doubt) = Some(InDoubt {
                    to: r.to.clone(),
                    next: std::time::Instant::now(),
                    tries: 0,
                    told: None,
                });
                counter!(crate::metrics::MIGRATIONS, "role" => "source", "result" => "in-doubt")
                    .increment(1);
            }
            Err(_) => {
                *s = VmState::Running;
                counter!(crate::metrics::MIGRATIONS, "role" => "source", "result" => "failed")
                    .increment(1);
            }
        }
        result.map(|(rep, _)| rep)
    }

    /// Clones a running VM to every target of `r`, live; the VM runs on here.
    pub fn clone_out(
        &self,
        r: &v1::CloneRequest,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<v1::CloneResult, AgentError> {
        let entry = lock(&self.vms)
            .get(&r.vm)
            .cloned()
            .ok_or_else(|| AgentError::NoSuchVm(r.vm.clone()))?;
        if r.targets.is_empty() {
            return Err(AgentError::BadRequest(
                "a clone needs at least one target".into(),
            ));
        }
        for t in &r.targets {
            if !valid_name(&t.name) {
                return Err(AgentError::BadName(t.name.clone()));
            }
        }
        {
            let mut s = lock(&entry.state);
            if *s != VmState::Running {
                return Err(AgentError::Busy {
                    vm: r.vm.clone(),
                    state: s.name(),
                });
            }
            *s = VmState::MigratingOut;
        }
        let result = self.run_clone(&entry, r, progress);
        *lock(&entry.state) = VmState::Running;
        result
    }

    fn run_clone(
        &self,
        entry: &Arc<VmEntry>,
        r: &v1::CloneRequest,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<v1::CloneResult, AgentError> {
        let mut targets = Vec::new();
        let mut failed = Vec::new();
        for t in &r.targets {
            let link = (|| -> Result<(String, ChannelLink), AgentError> {
                let addr = t
                    .addr
                    .to_socket_addrs()
                    .map_err(|source| AgentError::Connect {
                        addr: t.addr.clone(),
                        source,
                    })?
                    .next()
                    .ok_or_else(|| {
                        AgentError::BadRequest(format!("{} resolves to nothing", t.addr))
                    })?;
                let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(
                    |source| AgentError::Connect {
                        addr: t.addr.clone(),
                        source,
                    },
                )?;
                let mut ch = self.host_channel(stream, "receive a clone")?;
                ch.send(&v1::AgentRequest {
                    body: Some(v1::agent_request::Body::Incoming(v1::MigrateIncoming {
                        source: self.name.clone(),
                    })),
                })?;
                let host = ch.peer_name().to_owned();
                Ok((host, ChannelLink::new(ch)))
            })();
            match link {
                Ok((host, link)) => targets.push(pagecast_migrate::CloneTarget {
                    name: t.name.clone(),
                    host,
                    link: Box::new(link),
                }),
                Err(e) => failed.push(v1::CloneOne {
                    name: t.name.clone(),
                    host: t.addr.clone(),
                    ok: false,
                    verified: false,
                    error: Some(e.refusal()),
                }),
            }
        }
        let opts = MigrateOptions {
            bandwidth_bps: (r.bandwidth_bps > 0).then_some(r.bandwidth_bps),
            max_downtime: Duration::from_millis(if r.max_downtime_ms == 0 {
                50
            } else {
                u64::from(r.max_downtime_ms)
            }),
            job: r.job.clone(),
            ..MigrateOptions::default()
        };
        let vm = Outgoing { agent: self, entry };
        let mut caster = job::AgentCaster {
            agent: self,
            vm: &vm,
            key: entry.key,
            rate_bps: opts.bandwidth_bps,
            job: r.job.clone(),
            casts: 0,
        };
        let rep = pagecast_migrate::clone_out(&vm, targets, &mut caster, &self.fp, &opts, progress);
        counter!(crate::metrics::BYTES_SENT, "kind" => "clone")
            .increment(rep.bytes_links + rep.bytes_cast);
        let mut clones: Vec<v1::CloneOne> = rep
            .clones
            .iter()
            .map(|c| v1::CloneOne {
                name: c.name.clone(),
                host: c.host.clone(),
                ok: c.ok,
                verified: c.verified,
                error: c.error.clone(),
            })
            .collect();
        clones.extend(failed);
        let ok = clones.iter().all(|c| c.ok && c.verified);
        Ok(v1::CloneResult {
            ok,
            error: (!ok).then(|| {
                pagecast_proto::refusal(v1::RefusalCode::Unavailable, "some clones failed")
            }),
            clones,
            bytes_sent: rep.bytes_links + rep.bytes_cast,
            bytes_cast: rep.bytes_cast,
            downtime_ms: rep.downtime_ms,
            total_ms: rep.total_ms,
            rounds: rep.rounds,
        })
    }

    /// Runs a migration out; returns its report and the destination's name.
    fn run_out(
        &self,
        entry: &Arc<VmEntry>,
        r: &v1::MigrateRequest,
        progress: &mut dyn FnMut(&Progress),
        hold: Option<&mut dyn Hold>,
    ) -> Result<(MigrationReport, String), AgentError> {
        let mut ch = self.connect_host(&r.to, "receive a migrated VM")?;
        ch.send(&v1::AgentRequest {
            body: Some(v1::agent_request::Body::Incoming(v1::MigrateIncoming {
                source: self.name.clone(),
            })),
        })?;
        let mut link = ChannelLink::new(ch);
        let opts = MigrateOptions {
            bandwidth_bps: (r.bandwidth_bps > 0).then_some(r.bandwidth_bps),
            max_downtime: Duration::from_millis(if r.max_downtime_ms == 0 {
                50
            } else {
                u64::from(r.max_downtime_ms)
            }),
            verify_full: r.verify_full,
            job: r.job.clone(),
            no_local: r.no_local,
            per_frame: r.per_frame,
            ..MigrateOptions::default()
        };
        let dest = link.peer_name().to_owned();
        let vm = Outgoing { agent: self, entry };
        Ok((
            migrate_out_held(&vm, &mut link, &self.fp, &opts, progress, hold)?,
            dest,
        ))
    }

    /// Receives a VM over `link` from the agent named `source`.
    pub fn migrate_in(
        &self,
        link: &mut dyn MigrationLink,
        source: &str,
    ) -> Result<IncomingReport, AgentError> {
        let begin = match link.recv(Some(Duration::from_secs(10)))? {
            v1::migrate_frame::Body::Begin(b) => b,
            other => {
                return Err(AgentError::BadRequest(format!(
                    "expected a migration to begin, got {other:?}"
                )));
            }
        };
        tracing::debug!(
            "incoming VM {} of {} MiB (job {:?})",
            begin.vm,
            begin.memory_bytes >> 20,
            begin.job
        );
        if let Err(e) = self.reserve(&begin.vm, v1::HostedVmState::Incoming) {
            let _ = link.send(v1::migrate_frame::Body::Accept(v1::MigrateAccept {
                ok: false,
                reason: e.to_string(),
                code: e.code() as i32,
            }));
            return Err(e);
        }
        let origin = if begin.origin.is_empty() {
            format!("migrated from {source}")
        } else {
            format!("{} (migrated from {source})", begin.origin)
        };
        let mut started: Option<Arc<VmEntry>> = None;
        let local = JobContent {
            agent: self,
            job: &begin.job,
        };
        let mut events = JobSlots {
            agent: self,
            job: begin.job.clone(),
        };
        let result = migrate_in_job(
            link,
            &begin,
            &local,
            &self.fp,
            &mut events,
            &mut |region: Region, state: VcpuState| {
                let vm = MicroVm::restore(region, &state, begin.dirty_rate)
                    .map_err(|e| e.to_string())?;
                let p = vm.progress().map_err(|e| e.to_string())?;
                // Listed as running before the source hears it resumed, so a
                // `vm list` after the migration reports success shows it here.
                let key = self.domain_key(&begin.domain).map_err(|e| e.to_string())?;
                let entry = Arc::new(VmEntry::new(
                    &begin.vm,
                    origin.clone(),
                    (&begin.domain, key),
                    vm,
                ));
                {
                    let mut vms = lock(&self.vms);
                    lock(&self.incoming).remove(&begin.vm);
                    vms.insert(begin.vm.clone(), entry.clone());
                    gauge!(crate::metrics::VMS).set(vms.len() as f64);
                }
                started = Some(entry);
                Ok(p)
            },
        );
        match (result, started) {
            (result, Some(entry)) => {
                // Committed and resumed: it runs here whatever happened to
                // the confirmation (the source then holds its copy paused,
                // in doubt). Its contents join the map off the switchover path.
                self.index(&entry);
                counter!(crate::metrics::MIGRATIONS, "role" => "destination", "result" => "ok")
                    .increment(1);
                match result {
                    Ok(rep) => Ok(rep),
                    Err(e) => Err(AgentError::Migration(MigrationError::InDoubt(format!(
                        "the VM runs here but the source was not told: {e}"
                    )))),
                }
            }
            (result, None) => {
                lock(&self.incoming).remove(&begin.vm);
                counter!(crate::metrics::MIGRATIONS, "role" => "destination", "result" => "failed")
                    .increment(1);
                Err(match result {
                    Err(e) => e.into(),
                    Ok(_) => {
                        AgentError::Migration(MigrationError::Start("the VM did not start".into()))
                    }
                })
            }
        }
    }

    /// Re-hashes pages the VMs dirtied since the last call and adds their new
    /// contents to the content map (stale entries are caught when used).
    pub fn refresh_content(&self) {
        // The hashing runs on the agent's pool, like all its hashing.
        self.fp.pool().install(|| self.refresh_inner());
    }

    fn refresh_inner(&self) {
        let vms: Vec<Arc<VmEntry>> = lock(&self.vms).values().cloned().collect();
        for e in vms {
            self.refresh_vm(&e);
        }
        self.rescan_adopted();
        if let Some(link) = &self.index {
            gauge!(crate::metrics::HOT_PAGES).set(self.host_now().hot_pages as f64);
            gauge!(crate::metrics::PUBLISH_BACKLOG).set(link.ledger().behind() as f64);
        }
        gauge!(crate::metrics::CONTENT_ENTRIES).set(read(&self.content).len() as f64);
    }

    /// Takes in the pages one VM dirtied since its last refresh: their new
    /// contents enter the content map (the old leave it) and, when this
    /// agent publishes, the index's intended listing.
    fn refresh_vm(&self, e: &Arc<VmEntry>) {
        // One refresh of a VM at a time (the refresher and a migration's
        // manifest may both ask), so publication sees whole refreshes.
        let _one = lock(&e.refreshing);
        if e.pull().is_err() {
            return;
        }
        let pages = e.page_count();
        let mut meter = lock(&e.rewrites);
        let dirty = std::mem::replace(&mut *lock(&e.for_content), DirtyBitmap::new(pages));
        if meter.last.is_none() || lock(&e.seen).len() as u64 == pages {
            meter.sample(dirty.count(), std::time::Instant::now());
        }
        drop(meter);
        if lock(&e.seen).len() as u64 != pages {
            // Still being indexed: its first full hash takes these in.
            let _ = lock(&e.for_content).merge(&dirty);
            return;
        }
        let (mut buf, mut hashes) = (Vec::new(), Vec::new());
        let frames: Vec<u64> = dirty.iter().collect();
        for chunk in frames.chunks(64) {
            if read_and_hash(&**e, &e.key, chunk, &mut buf, &mut hashes).is_err() {
                break;
            }
            let mut map = write(&self.content);
            if !self.registered(e) {
                return;
            }
            let mut seen = lock(&e.seen);
            for (i, &f) in chunk.iter().enumerate() {
                // The frame's old content leaves the map if this frame
                // was where the map found it.
                if let Some(old) = seen.get_mut(f as usize) {
                    if map
                        .get(old)
                        .is_some_and(|(vm, fr)| Arc::ptr_eq(vm, e) && *fr == f)
                    {
                        map.remove(old);
                    }
                    *old = hashes[i];
                }
                if !hashes[i].is_zero_page() {
                    map.insert(hashes[i], (e.clone(), f));
                }
            }
        }
        if let Some(link) = &self.index {
            // A VM migrating out is withdrawn at its switchover: what its
            // guest rewrites meanwhile waits (coalesced, as over-budget
            // frames do) instead of costing the index writes, and is
            // published if the migration fails and the VM stays.
            let budget = if *lock(&e.state) == VmState::MigratingOut {
                0
            } else {
                publish::FRAME_UPDATES_PER_REFRESH
            };
            let mut changes = Vec::new();
            let seen = lock(&e.seen);
            lock(&e.publication).on_refresh(&dirty, &seen, budget, &mut changes);
            drop(seen);
            link.apply(&changes);
        }
    }

    /// Every frame's hash of a VM as it is now: the content map, brought
    /// up to date with the dirty log (no fresh hash of all memory).
    pub fn current_hashes(&self, e: &Arc<VmEntry>) -> Option<Vec<PageHash>> {
        self.fp.pool().install(|| self.refresh_vm(e));
        let seen = lock(&e.seen);
        (seen.len() as u64 == e.page_count()).then(|| seen.clone())
    }

    /// Stops every VM (at shutdown), withdrawing them from the index.
    pub fn shutdown(&self) {
        let names: Vec<String> = lock(&self.vms).keys().cloned().collect();
        for n in names {
            self.forget(&n, None);
        }
        self.content
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let vms = std::mem::take(&mut *lock(&self.vms));
        drop(vms);
    }
}

impl Agent {
    /// Copies a resident page whose content hashes to `h` in the domain of
    /// the VM holding it (checked under that VM's key) into `out`; returns
    /// that key. For a source's casts, which send what the coordinator
    /// names by hash whatever its domain.
    pub fn copy_any(&self, h: &PageHash, out: &mut Page) -> Option<ContentKey> {
        let e = self
            .content
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(h)
            .cloned();
        if let Some((e, f)) = e
            && e.read_page(f, out).is_ok()
            && e.key.hash_page(out) == *h
        {
            return Some(e.key);
        }
        self.copy_adopted(h, out)
    }
}

impl LocalContent for Agent {
    fn copy(&self, key: &ContentKey, h: &PageHash, out: &mut Page) -> bool {
        // Only a VM of the same domain answers (checked under its key).
        self.copy_any(h, out) == Some(*key)
    }

    fn domain_key(&self, domain: &str) -> Result<ContentKey, String> {
        Agent::domain_key(self, domain).map_err(|e| e.to_string())
    }
}

/// Asks the agent at `to` where the VM `name` stands (as `agent`, a host),
/// within a few seconds; the answer and the destination's name.
fn ask_whereabouts(
    agent: &Agent,
    to: &str,
    name: &str,
) -> Result<(v1::Whereabouts, String), AgentError> {
    let c = pagecast_agent_api::AgentClient::connect(to, agent.tls())?
        .with_answer_timeout(Duration::from_secs(5))?;
    let dest = c.agent_name().to_owned();
    Ok((c.whereabouts(name)?, dest))
}

#[cfg(test)]
mod rewrite_tests {
    use super::RewriteMeter;
    use std::time::{Duration, Instant};

    #[test]
    fn the_meter_rates_dirty_frames_over_time_and_keeps_short_samples() {
        let t0 = Instant::now();
        let mut m = RewriteMeter::default();
        m.sample(10_000, t0);
        assert_eq!(m.rate(), 0.0, "one sample has no interval");
        m.sample(500, t0 + Duration::from_secs(1));
        assert!((m.rate() - 500.0).abs() < 1e-9, "{}", m.rate());
        // A refresh right after another: its frames wait for the next.
        m.sample(40, t0 + Duration::from_millis(1010));
        assert!((m.rate() - 500.0).abs() < 1e-9);
        m.sample(460, t0 + Duration::from_secs(2));
        assert!((m.rate() - 500.0).abs() < 1e-6, "{}", m.rate());
        // A guest that stops writing: the rate decays, not at once.
        for s in 3..=30 {
            m.sample(0, t0 + Duration::from_secs(s));
        }
        assert!(m.rate() < 500.0 * 0.1 && m.rate() > 0.0, "{}", m.rate());
    }
}
