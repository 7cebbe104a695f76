//! The host agent: owns this host's micro-VMs, keeps a map of the page
//! contents they hold (so incoming migrations copy what is already here),
//! and serves the control API (see `proto/proto/pagecast/v1/agent.proto`):
//! starting, listing and stopping VMs, migrating them out, and receiving
//! them. The network side is in [`server`] (tokio); everything here is
//! blocking and runs on blocking threads, the hashing on a rayon pool.

pub mod hosted;
pub mod job;
pub mod jobs;
pub mod metrics;
pub mod micro;
pub mod publish;
pub mod qemu;
pub mod server;
pub mod staging;
mod sync;

use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::sync::{lock, read, write};
use ::metrics::{counter, gauge};
use pagecast_channel::{AuthError, Channel, Role, Tls};
use pagecast_pages::{ContentKey, DomainSecret, Page, PageHash};
use pagecast_proto::v1;
use pagecast_proto::v1::RefusalCode;

use hosted::{Hosted, InDoubt, Look, Outbound, Registry};
use jobs::JobBook;
use pagecast_index::holders::HoldingSum;
use pagecast_index::keys::shard_of;
use pagecast_memory::fingerprint::{FingerprintError, Fingerprinter, read_and_hash};
use pagecast_memory::kvm::VmError;
use pagecast_memory::synth::SynthError;
use pagecast_memory::{DirtyBitmap, MemoryError};
use pagecast_migrate::{Hold, LocalContent, MigrationError, Progress};
use publish::{HostMeta, HostNow, IndexLink, VmOp};

pub use micro::{DEFAULT_MEMORY, DEFAULT_WORKING_SET};

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
    /// The request names a job this agent does not know, or one that
    /// ended.
    #[error("{0}")]
    UnknownJob(String),
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
    /// The caller may not do this: the job named does not list it in the
    /// role the request needs, or not for the VM or QEMU address it names.
    #[error("{0}")]
    Forbidden(String),
    /// A VM arriving would take more memory than this host offers.
    #[error(
        "no room for VM {vm:?} here: it needs {} MiB, {} MiB of {} MiB are free \
         (the VMs here and those arriving)",
        needs >> 20, free >> 20, capacity >> 20
    )]
    NoRoom {
        /// The VM.
        vm: String,
        /// Its memory, bytes.
        needs: u64,
        /// What is free, bytes.
        free: u64,
        /// What this host offers VMs (`pagecast agent --capacity`), bytes.
        capacity: u64,
    },
    /// This host is cordoned: no VM starts or is adopted here unless forced.
    #[error(
        "host {host} is cordoned ({reason}): no VM starts here; `pagecast uncordon {host}` \
         lifts it, --force starts one anyway"
    )]
    Cordoned {
        /// This host.
        host: String,
        /// Why, as the operator said.
        reason: String,
    },
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
            AgentError::VmExists(_) | AgentError::Cordoned { .. } | AgentError::NoRoom { .. } => {
                RefusalCode::Refused
            }
            AgentError::BadName(_) | AgentError::BadRequest(_) | AgentError::Synth(_) => {
                RefusalCode::Invalid
            }
            AgentError::Busy { .. } => RefusalCode::Busy,
            AgentError::UnknownJob(_) => RefusalCode::UnknownJob,
            AgentError::Forbidden(_) => RefusalCode::Forbidden,
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

/// Refuses `--switchover postcopy` by name where it cannot be used
/// (`mode`: a clone, or a move; `rounds`: whether the VM runs pagecast's
/// own rounds): the reason says what to use instead.
pub(crate) fn refuse_postcopy(
    switchover: i32,
    mode: pagecast_migrate::engine::Mode,
    rounds: bool,
) -> Result<(), AgentError> {
    if pagecast_migrate::Switchover::from_proto(switchover)
        == pagecast_migrate::Switchover::Postcopy
    {
        return Err(AgentError::BadRequest(
            pagecast_migrate::engine::postcopy_refusal(mode, rounds).into(),
        ));
    }
    Ok(())
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
    /// Memory this host offers VMs, bytes (0: no bound): an arriving VM
    /// that does not fit is refused.
    pub capacity_bytes: u64,
    /// This host's libvirt, if the agent drives it.
    pub libvirt: Option<Libvirt>,
    /// How long a migration held for a gang job may hear nothing from its
    /// coordinator before it is abandoned ([`HOLD_SILENCE`] by default).
    pub hold_silence: Duration,
}

/// How long a held migration may hear nothing from its coordinator (which
/// sends a keep-alive a second): one frozen, or cut off with its
/// connection open, would otherwise hold the VM, and the memory reserved
/// at its destination, until the job's deadline (hours for an
/// evacuation).
pub const HOLD_SILENCE: Duration = Duration::from_secs(30);

/// The agent's state.
pub struct Agent {
    name: String,
    tls: Tls,
    data: Option<PathBuf>,
    fp: Fingerprinter,
    /// Every VM here, and the names held for VMs starting or arriving.
    vms: Mutex<Registry>,
    /// A frame holding each content (a hint: checked on use).
    content: RwLock<HashMap<PageHash, (Arc<Hosted>, u64)>>,
    /// The content index this agent publishes to, if any.
    index: Option<Arc<IndexLink>>,
    /// The jobs this agent takes part in.
    jobs: JobBook,
    /// The address this host multicasts from.
    cast_iface: Mutex<std::net::Ipv4Addr>,
    /// The cluster's dedup-domain secret, if this host holds it.
    domain_secret: Option<DomainSecret>,
    /// Memory this host offers VMs, bytes (0: no bound): an arriving VM
    /// that would take more is refused.
    capacity: u64,
    hold_silence: Duration,
    /// This host's libvirt, if it runs one the agent may drive.
    libvirt: Option<Libvirt>,
}

/// A host's libvirt, as its agent drives it.
#[derive(Clone, Debug)]
pub struct Libvirt {
    /// The URI other hosts reach it at (`qemu+tls://HOST/system`): what
    /// a source's libvirt connects to when a domain migrates here.
    pub uri: String,
    /// The URI this agent reaches it at (`qemu:///system`).
    pub local: String,
}

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
            vms: Mutex::new(Registry::default()),
            content: RwLock::new(HashMap::new()),
            index: None,
            jobs: JobBook::default(),
            cast_iface: Mutex::new(std::net::Ipv4Addr::LOCALHOST),
            domain_secret: None,
            capacity: 0,
            hold_silence: HOLD_SILENCE,
            libvirt: None,
        })
    }

    /// Names this host's libvirt: adopted QEMU VMs that are its domains
    /// migrate through it, and `vm list` tells coordinators where it is.
    pub fn set_libvirt(&mut self, libvirt: Libvirt) {
        self.libvirt = Some(libvirt);
    }

    /// This host's libvirt, if named.
    pub fn libvirt(&self) -> Option<&Libvirt> {
        self.libvirt.as_ref()
    }

    /// Bounds the memory this host gives VMs (0: none): a migration in that
    /// would take more than is free, counting the VMs here and those
    /// arriving, is refused before anything moves (before the agent is
    /// shared).
    pub fn set_capacity(&mut self, bytes: u64) {
        self.capacity = bytes;
    }

    /// Sets how long a held migration may hear nothing from its
    /// coordinator (before the agent is shared).
    pub fn set_hold_silence(&mut self, d: Duration) {
        self.hold_silence = d;
    }

    /// How long a held migration may hear nothing from its coordinator.
    pub fn hold_silence(&self) -> Duration {
        self.hold_silence
    }

    /// Holds `name` for an arriving VM of `bytes`, if it fits. A size no
    /// micro-VM can have is held at 0 here and refused as malformed when
    /// its begin is checked (so the error names what is wrong with it).
    fn reserve_arrival(&self, name: &str, bytes: u64) -> Result<(), AgentError> {
        let cap = self.capacity;
        let valid = (pagecast_memory::kvm::MIN_MEMORY_BYTES
            ..=pagecast_memory::kvm::MAX_MEMORY_BYTES)
            .contains(&bytes);
        let bytes = if valid { bytes } else { 0 };
        lock(&self.vms).reserve_sized(name, v1::HostedVmState::Incoming, bytes, cap)
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

    /// The jobs this agent takes part in.
    pub fn jobs(&self) -> &JobBook {
        &self.jobs
    }

    /// Opens (or joins) a job for `who`, from an operator's `JobOpen`.
    pub fn open_job(
        &self,
        r: &v1::JobOpen,
        who: &pagecast_channel::Identity,
    ) -> Result<bool, AgentError> {
        let deadline = (r.deadline_ms > 0).then(|| Duration::from_millis(r.deadline_ms));
        Ok(self
            .jobs
            .open_with(&r.job, who, &r.peers, &r.qemu_connect, deadline)?
            .1)
    }

    /// Cancels a job here: its held and running migrations stop before
    /// switchover (their VMs stay), its arriving VMs are refused further
    /// pages, and no request may name it any more.
    pub fn cancel_job(&self, job: &str) -> bool {
        self.jobs.cancel(job, "the job was cancelled")
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

    /// The VM named `name`.
    pub fn hosted(&self, name: &str) -> Result<Arc<Hosted>, AgentError> {
        lock(&self.vms)
            .vm(name)
            .cloned()
            .ok_or_else(|| AgentError::NoSuchVm(name.to_owned()))
    }

    /// A VM's frame hashes as the content map has them now (brought up to
    /// date first), its memory, and its kind.
    pub fn vm_hashes(&self, name: &str) -> Result<(Vec<PageHash>, u64, v1::VmKind), AgentError> {
        let vm = self.hosted(name)?;
        let h = self.current_hashes(&vm).ok_or_else(|| AgentError::Busy {
            vm: name.to_owned(),
            state: "still being indexed",
        })?;
        Ok((h, vm.memory_bytes(), vm.backend.kind()))
    }

    /// Distinct pages VM `name`'s guest rewrote a second lately (0 until
    /// two content refreshes have run).
    pub fn vm_rewrite_rate(&self, name: &str) -> Result<f64, AgentError> {
        let vm = self.hosted(name)?;
        let r = lock(&vm.rewrites).rate();
        Ok(r)
    }

    /// Publishes this agent's VMs to the content index at `addrs`
    /// (before the agent is shared; [`Agent::publish_loop`] does the
    /// sending).
    pub fn set_index(&mut self, addrs: Vec<String>, meta: HostMeta) {
        let link = IndexLink::new(addrs, self.tls.clone(), self.name.clone(), meta);
        // What an intermediary keeps for a job is listed as held here
        // while it keeps it.
        let to = link.clone();
        self.jobs.list_stashes(Arc::new(move |c| to.apply(c)));
        self.index = Some(link);
    }

    /// Refuses unless `force`, when the index says this host is cordoned
    /// (asked now; its last answer if it does not answer).
    pub fn check_cordon(&self, force: bool) -> Result<(), AgentError> {
        let Some(reason) = self.index.as_ref().and_then(|l| l.cordon_now()) else {
            return Ok(());
        };
        if force {
            tracing::warn!(
                "host {} is cordoned ({reason}); going on as forced",
                self.name()
            );
            return Ok(());
        }
        Err(AgentError::Cordoned {
            host: self.name().to_owned(),
            reason: if reason.is_empty() {
                "no reason given".into()
            } else {
                reason
            },
        })
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

    fn all_vms(&self) -> Vec<Arc<Hosted>> {
        lock(&self.vms).vms()
    }

    /// The records of the VMs that run here (published, fully indexed).
    pub fn vm_records(&self) -> Vec<v1::VmRecord> {
        self.all_vms()
            .iter()
            .filter_map(|v| {
                let p = lock(&v.publication);
                p.is_live()
                    .then(|| publish::vm_record(&v.name, &v.origin, &v.domain, p.intended()))
            })
            .collect()
    }

    /// What the host report says of the VMs now.
    pub fn host_now(&self) -> HostNow {
        let vms = self.all_vms();
        HostNow {
            vms: vms.iter().map(|v| v.name.clone()).collect(),
            // Arrivals under way count: a planner must not send more.
            used_bytes: lock(&self.vms).committed_bytes(),
            hot_pages: vms.iter().map(|v| lock(&v.publication).unpublished()).sum(),
        }
    }

    /// Recomputes, from a fresh hash of all memory, what the index should
    /// list for this host in each of `shards` shards (hot frames left out
    /// as they are from publication), beside what the agent's ledger says.
    /// A VM whose changes the agent only sees by rescanning counts as its
    /// last scan saw it (what its listing is made from).
    /// `shards` is bounded before anything is allocated: 1 to the index's
    /// [`MAX_SHARDS`](pagecast_index::keys::MAX_SHARDS).
    pub fn audit(&self, shards: u32, ledger_only: bool) -> Result<v1::AuditResponse, AgentError> {
        let max = pagecast_index::keys::MAX_SHARDS;
        if shards == 0 || shards > max {
            return Err(AgentError::BadRequest(format!(
                "an audit of {shards} shards: the index has 1 to {max}"
            )));
        }
        let vms = if ledger_only {
            Vec::new()
        } else {
            self.all_vms()
        };
        let mut fresh: HashMap<PageHash, u64> = HashMap::new();
        let mut hot = 0u64;
        for v in &vms {
            let hashes = if v.backend.exact() {
                self.fp
                    .fingerprint(v.backend.memory(), &v.key, &|_| {})
                    .hashes
            } else {
                lock(&v.seen).clone()
            };
            let p = lock(&v.publication);
            if !p.is_live() {
                continue;
            }
            for (frame, h) in hashes.iter().enumerate() {
                if p.is_hot(frame as u64) {
                    hot += 1;
                } else if !h.is_zero_page() {
                    *fresh.entry(*h).or_default() += 1;
                }
            }
        }
        let mut fresh_sums = vec![HoldingSum::default(); shards as usize];
        for (h, c) in &fresh {
            fresh_sums[shard_of(h, shards) as usize].change(h.as_bytes(), 0, *c);
        }
        let ledger = self.index.as_ref().map(|l| {
            let g = l.ledger();
            (0..shards)
                .map(|s| g.desired_sum(s, shards))
                .collect::<Vec<_>>()
        });
        Ok(v1::AuditResponse {
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
            vms: lock(&self.vms).count() as u32,
        })
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
        host_channel(&self.tls, stream, what)
    }

    /// Connects to the agent at `to` (10 s deadline) as a host channel
    /// (see [`Agent::host_channel`]).
    pub(crate) fn connect_host(&self, to: &str, what: &str) -> Result<Channel, AgentError> {
        connect_host(&self.tls, to, what)
    }

    /// Bytes this host may still keep in its jobs' stashes (as a
    /// scatter-gather intermediary): what it offers VMs and does not give
    /// them (`--capacity`), or [`MAX_STASH_BYTES`] where it bounds nothing.
    pub fn stash_room(&self) -> u64 {
        let stashed = self.jobs.stash_bytes();
        let offered = if self.capacity > 0 {
            self.capacity
                .saturating_sub(lock(&self.vms).committed_bytes())
                .min(MAX_STASH_BYTES)
        } else {
            MAX_STASH_BYTES
        };
        offered.saturating_sub(stashed)
    }
}

/// Most bytes an agent keeps in its jobs' stashes at once.
pub const MAX_STASH_BYTES: u64 = 16 << 30;

/// A host channel over `stream` with `tls`: the peer must be a host.
pub(crate) fn host_channel(
    tls: &Tls,
    stream: TcpStream,
    what: &str,
) -> Result<Channel, AgentError> {
    let ch = Channel::client(stream, tls)?;
    pagecast_channel::require(ch.identity(), &[Role::Host], ch.peer(), what)?;
    Ok(ch)
}

/// Connects to the agent at `to` (10 s deadline) as a host channel.
pub(crate) fn connect_host(tls: &Tls, to: &str, what: &str) -> Result<Channel, AgentError> {
    let addr = to
        .to_socket_addrs()
        .map_err(|source| AgentError::Connect {
            addr: to.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| AgentError::BadRequest(format!("{to} resolves to no address")))?;
    let stream =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(|source| {
            AgentError::Connect {
                addr: to.to_owned(),
                source,
            }
        })?;
    host_channel(tls, stream, what)
}

impl Agent {
    /// Opens an incoming migration of job `job` at the agent at `to`: the
    /// channel the migration then runs on.
    pub(crate) fn open_incoming(
        &self,
        to: &str,
        job: &str,
        what: &str,
    ) -> Result<Channel, AgentError> {
        let mut ch = self.connect_host(to, what)?;
        ch.send(&v1::AgentRequest {
            body: Some(v1::agent_request::Body::Incoming(v1::MigrateIncoming {
                source: self.name.clone(),
                job: job.to_owned(),
            })),
        })?;
        Ok(ch)
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        match (&self.data, p.is_relative()) {
            (Some(d), true) => d.join(p),
            _ => p.to_owned(),
        }
    }

    /// Holds `name` while a VM starts or arrives.
    fn reserve(&self, name: &str, state: v1::HostedVmState) -> Result<(), AgentError> {
        lock(&self.vms).reserve(name, state)
    }

    /// Lets a reservation go.
    fn release(&self, name: &str) {
        lock(&self.vms).release(name);
    }

    /// Lists a VM (in place of its reservation) without indexing it yet.
    fn arrived(&self, vm: &Arc<Hosted>) -> Result<(), AgentError> {
        let mut vms = lock(&self.vms);
        vms.insert(vm.clone())?;
        gauge!(crate::metrics::VMS).set(vms.count() as f64);
        Ok(())
    }

    /// Lists a VM and adds its pages to the content map.
    fn register(&self, vm: Arc<Hosted>) -> Result<(), AgentError> {
        self.arrived(&vm)?;
        self.index(&vm);
        Ok(())
    }

    /// Whether `vm` is still one of this agent's VMs. Checked under the
    /// content map's write lock: [`Agent::forget`] removes a VM from the
    /// list before it purges the map, so a VM checked here is purged after.
    fn registered(&self, vm: &Arc<Hosted>) -> bool {
        lock(&self.vms).holds(vm)
    }

    /// Adds every page of a VM to the content map (a first full hash).
    fn index(&self, vm: &Arc<Hosted>) {
        let _one = lock(&vm.refreshing);
        vm.backend.reset_look();
        let t0 = Instant::now();
        let f = self.fp.fingerprint(vm.backend.memory(), &vm.key, &|_| {});
        vm.backend.scanned(t0.elapsed());
        lock(&vm.rewrites).sample(0, Instant::now());
        let mut map = write(&self.content);
        if !self.registered(vm) {
            // Stopped meanwhile: its pages must not keep it alive.
            return;
        }
        for (frame, h) in f.hashes.iter().enumerate() {
            if !h.is_zero_page() {
                map.entry(*h).or_insert_with(|| (vm.clone(), frame as u64));
            }
        }
        gauge!(crate::metrics::CONTENT_ENTRIES).set(map.len() as f64);
        let mut seen = lock(&vm.seen);
        *seen = f.hashes;
        if let Some(link) = &self.index {
            let mut changes = Vec::new();
            let mut p = lock(&vm.publication);
            p.publish_all(&seen, &mut changes);
            let record = publish::vm_record(&vm.name, &vm.origin, &vm.domain, p.intended());
            drop(p);
            drop(seen);
            drop(map);
            link.apply(&changes);
            link.vm_op(VmOp::Put(record));
        }
    }

    /// Removes a VM from the agent: its pages leave the content map and
    /// the index (withdrawn; its record dropped, or moved to `moved_to`).
    fn forget(&self, name: &str, moved_to: Option<&str>) -> Option<Arc<Hosted>> {
        let vm = {
            let mut vms = lock(&self.vms);
            let vm = vms.remove(name)?;
            gauge!(crate::metrics::VMS).set(vms.count() as f64);
            vm
        };
        write(&self.content).retain(|_, (v, _)| !Arc::ptr_eq(v, &vm));
        if let Some(link) = &self.index {
            let mut p = lock(&vm.publication);
            if p.is_live() {
                let mut changes = Vec::new();
                p.withdraw_all(&mut changes);
                drop(p);
                link.apply(&changes);
                link.vm_op(match moved_to {
                    Some(to) => VmOp::Move {
                        name: name.to_owned(),
                        to: to.to_owned(),
                    },
                    None => VmOp::Drop(name.to_owned()),
                });
            }
        }
        Some(vm)
    }

    /// Lists the VMs.
    pub fn vm_list(&self) -> v1::VmList {
        let (vms, reserved) = {
            let g = lock(&self.vms);
            (g.vms(), g.reserved())
        };
        let mut infos: Vec<v1::VmInfo> = vms.iter().map(|v| v.info()).collect();
        infos.extend(reserved.into_iter().map(|(n, s)| v1::VmInfo {
            name: n,
            state: s as i32,
            ..Default::default()
        }));
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        v1::VmList {
            agent: self.name.clone(),
            vms: infos,
            content_entries: read(&self.content).len() as u64,
            libvirt: self
                .libvirt
                .as_ref()
                .map(|l| l.uri.clone())
                .unwrap_or_default(),
        }
    }

    /// Stops a VM (also one left in doubt by a migration). A micro-VM stops
    /// with its last reference; an adopted QEMU VM is only let go (QEMU is
    /// the operator's to stop).
    pub fn vm_stop(&self, name: &str) -> Result<v1::VmInfo, AgentError> {
        let vm = self.hosted(name)?;
        let s = vm.state();
        if matches!(
            s,
            v1::HostedVmState::MigratingOut
                | v1::HostedVmState::Cloning
                | v1::HostedVmState::MigratingIn
        ) {
            return Err(AgentError::Busy {
                vm: name.to_owned(),
                state: pagecast_proto::names::state(s),
            });
        }
        let vm = self
            .forget(name, None)
            .ok_or_else(|| AgentError::NoSuchVm(name.to_owned()))?;
        let info = vm.info();
        drop(vm);
        Ok(info)
    }

    /// Where the VM `name` stands here, for the source of a migration
    /// whose switchover went unconfirmed. A VM still waiting for its
    /// stream (an adopted QEMU) is not here yet.
    pub fn whereabouts(&self, name: &str) -> v1::Whereabouts {
        match lock(&self.vms).get(name) {
            Some(hosted::Slot::Vm(v)) => match v.state() {
                v1::HostedVmState::Incoming => v1::Whereabouts::Absent,
                v1::HostedVmState::MigratingIn => v1::Whereabouts::Arriving,
                _ => v1::Whereabouts::Running,
            },
            Some(hosted::Slot::Reserved(..)) => v1::Whereabouts::Arriving,
            None => v1::Whereabouts::Absent,
        }
    }

    /// Settles the VMs in doubt whose time to ask has come: each one's
    /// destination says where the VM stands. Running there: the copy here
    /// is released. Absent there (it died before or after starting the VM,
    /// and came back without it): the copy here resumes. Arriving, or no
    /// answer: it stays paused and is asked again later (1 s, doubling to
    /// 30 s). Exactly one copy runs in every case.
    pub fn resolve_in_doubt(&self) {
        let now = Instant::now();
        let due: Vec<(Arc<Hosted>, InDoubt)> = self
            .all_vms()
            .into_iter()
            .filter_map(|v| {
                let d = lock(&v.in_doubt).clone()?;
                (d.next <= now).then_some((v, d))
            })
            .collect();
        // Each asked on a thread of its own: a destination frozen or cut
        // off keeps no other VM paused while its question waits out its
        // deadline.
        pagecast_agent_api::at_once(&due, |(v, d)| {
            let answer = ask_whereabouts(self, &d.to, &v.name, &d.job);
            self.settle(v, d.clone(), answer);
        });
    }

    fn settle(
        &self,
        vm: &Arc<Hosted>,
        mut d: InDoubt,
        answer: Result<(v1::Whereabouts, String), AgentError>,
    ) {
        let mut state = lock(&vm.state);
        if *state != v1::HostedVmState::InDoubt {
            return;
        }
        match answer {
            Ok((v1::Whereabouts::Running, dest)) => {
                *lock(&vm.in_doubt) = None;
                drop(state);
                tracing::warn!(
                    "VM {}: its unconfirmed switchover went through: it runs at {dest}; \
                     released here",
                    vm.name
                );
                counter!(crate::metrics::IN_DOUBT_SETTLED, "outcome" => "released").increment(1);
                self.forget(&vm.name, Some(&dest));
            }
            Ok((v1::Whereabouts::Absent, dest)) => {
                *lock(&vm.in_doubt) = None;
                *state = v1::HostedVmState::Running;
                drop(state);
                vm.backend.resume();
                tracing::warn!(
                    "VM {}: its unconfirmed switchover never started it at {dest}; resumed here",
                    vm.name
                );
                counter!(crate::metrics::IN_DOUBT_SETTLED, "outcome" => "resumed").increment(1);
            }
            other => {
                let why = match other {
                    Ok((w, dest)) => format!("{dest} says it is {}", w.as_str_name()),
                    Err(err) => format!("cannot ask {}: {err}", d.to),
                };
                if d.again(Instant::now()) {
                    tracing::warn!("VM {} stays paused, in doubt: {why}", vm.name);
                }
                *lock(&vm.in_doubt) = Some(d);
            }
        }
    }

    /// Changes a VM's page-write rate (0: its guest only ticks).
    pub fn vm_set(&self, r: &v1::VmSetRequest) -> Result<v1::VmInfo, AgentError> {
        let vm = self.hosted(&r.name)?;
        vm.backend.set_dirty_rate(r.dirty_rate)?;
        Ok(vm.info())
    }

    /// Migrates a VM to the agent at `r.to`, reporting progress.
    pub fn migrate_out(
        &self,
        r: &v1::MigrateRequest,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<v1::MigrateResult, AgentError> {
        self.migrate_out_held(r, progress, None)
    }

    /// [`Agent::migrate_out`], held for a gang job by `hold` after the
    /// destination says what it lacks. Whatever the VM's kind: on success
    /// it is released here, on a switchover in doubt it stays paused until
    /// its destination says where it runs, on any other failure it runs on
    /// here.
    pub fn migrate_out_held(
        &self,
        r: &v1::MigrateRequest,
        progress: &mut dyn FnMut(&Progress),
        hold: Option<&mut dyn Hold>,
    ) -> Result<v1::MigrateResult, AgentError> {
        let vm = self.hosted(&r.vm)?;
        vm.claim(v1::HostedVmState::MigratingOut)?;
        let out = Outbound {
            agent: self,
            vm: &vm,
        };
        let result = vm.backend.migrate_out(out, r, progress, hold);
        match &result {
            Ok((rep, dest)) => {
                // Released: the destination runs it now.
                self.forget(&r.vm, Some(dest));
                metrics::migrated(rep);
            }
            Err(AgentError::Migration(MigrationError::InDoubt(_))) => {
                // Settled by asking the destination ([`Agent::resolve_in_doubt`]).
                *lock(&vm.in_doubt) = Some(InDoubt::new(&r.to, &r.job));
                vm.set_state(v1::HostedVmState::InDoubt);
                counter!(crate::metrics::MIGRATIONS, "role" => "source", "result" => "in-doubt")
                    .increment(1);
            }
            Err(_) => {
                // The engine handed back what it took and resumed the guest.
                vm.set_state(v1::HostedVmState::Running);
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
        let vm = self.hosted(&r.vm)?;
        if r.targets.is_empty() {
            return Err(AgentError::BadRequest(
                "a clone needs at least one target".into(),
            ));
        }
        for t in &r.targets {
            if !pagecast_proto::name_ok(&t.name) {
                return Err(AgentError::BadName(t.name.clone()));
            }
        }
        vm.claim(v1::HostedVmState::Cloning)?;
        let out = Outbound {
            agent: self,
            vm: &vm,
        };
        let result = vm.backend.clone_out(out, r, progress);
        vm.set_state(v1::HostedVmState::Running);
        result
    }

    /// Re-hashes pages the VMs changed since the last call and adds their
    /// new contents to the content map (stale entries are caught when used).
    pub fn refresh_content(&self) {
        for vm in self.all_vms() {
            self.refresh_vm(&vm, false);
        }
        if let Some(link) = &self.index {
            gauge!(crate::metrics::HOT_PAGES).set(self.host_now().hot_pages as f64);
            gauge!(crate::metrics::PUBLISH_BACKLOG).set(link.ledger().behind() as f64);
        }
        gauge!(crate::metrics::CONTENT_ENTRIES).set(read(&self.content).len() as f64);
    }

    /// Takes in the pages one VM changed since its last refresh: their new
    /// contents enter the content map (the old leave it) and, when this
    /// agent publishes, the index's intended listing. `force`: bring the
    /// map up to date now, whatever the VM's rescan schedule says.
    ///
    /// Never called on the hashing pool: it waits for the VM's other
    /// refresh or first hash, which needs the pool's threads to finish (a
    /// pool thread waiting here once deadlocked an agent).
    fn refresh_vm(&self, vm: &Arc<Hosted>, force: bool) {
        // One refresh of a VM at a time (the refresher and a migration's
        // manifest may both ask), so publication sees whole refreshes.
        let _one = lock(&vm.refreshing);
        if !vm.indexed() {
            // Not hashed whole yet (still arriving, or its first hash runs).
            return;
        }
        let state = vm.state();
        // The hashing runs on the agent's pool, like all its hashing.
        let dirty = self
            .fp
            .pool()
            .install(|| match vm.backend.look(state, force) {
                Ok(Look::Frames(d)) => self.rehash(vm, d),
                Ok(Look::All) => self.rescan(vm),
                Ok(Look::NotDue) | Err(_) => None,
            });
        let Some(dirty) = dirty else { return };
        lock(&vm.rewrites).sample(dirty.count(), Instant::now());
        if let Some(link) = &self.index {
            // A VM migrating out is withdrawn at its switchover: what its
            // guest rewrites meanwhile waits (coalesced, as over-budget
            // frames do) instead of costing the index writes, and is
            // published if the migration fails and the VM stays.
            let budget = if state == v1::HostedVmState::MigratingOut {
                0
            } else {
                publish::FRAME_UPDATES_PER_REFRESH
            };
            let mut changes = Vec::new();
            let seen = lock(&vm.seen);
            lock(&vm.publication).on_refresh(&dirty, &seen, budget, &mut changes);
            drop(seen);
            link.apply(&changes);
        }
    }

    /// Re-hashes the frames `dirty` of a VM into the content map; `None`
    /// if the VM left meanwhile.
    fn rehash(&self, vm: &Arc<Hosted>, dirty: DirtyBitmap) -> Option<DirtyBitmap> {
        let (mut buf, mut hashes) = (Vec::new(), Vec::new());
        let frames: Vec<u64> = dirty.iter().collect();
        for chunk in frames.chunks(64) {
            if read_and_hash(vm.backend.memory(), &vm.key, chunk, &mut buf, &mut hashes).is_err() {
                break;
            }
            let mut map = write(&self.content);
            if !self.registered(vm) {
                return None;
            }
            let mut seen = lock(&vm.seen);
            for (i, &f) in chunk.iter().enumerate() {
                if let Some(old) = seen.get_mut(f as usize) {
                    replace_in_map(&mut map, vm, f, old, hashes[i]);
                }
            }
        }
        Some(dirty)
    }

    /// Hashes all of a VM's memory again; its new contents replace the old
    /// in the content map. Returns the frames that changed (`None` if the
    /// VM left meanwhile).
    fn rescan(&self, vm: &Arc<Hosted>) -> Option<DirtyBitmap> {
        let t0 = Instant::now();
        let f = self.fp.fingerprint(vm.backend.memory(), &vm.key, &|_| {});
        vm.backend.scanned(t0.elapsed());
        let mut map = write(&self.content);
        if !self.registered(vm) {
            return None;
        }
        let mut seen = lock(&vm.seen);
        let mut dirty = DirtyBitmap::new(f.hashes.len() as u64);
        for (frame, new) in f.hashes.iter().enumerate() {
            let Some(old) = seen.get_mut(frame) else {
                continue;
            };
            if *old != *new {
                let _ = dirty.set(frame as u64);
                replace_in_map(&mut map, vm, frame as u64, old, *new);
            }
        }
        Some(dirty)
    }

    /// Every frame's hash of a VM as it is now: the content map, brought
    /// up to date (from the dirty log, or a fresh scan), without a fresh
    /// hash of memory the log says is unchanged.
    pub fn current_hashes(&self, vm: &Arc<Hosted>) -> Option<Vec<PageHash>> {
        self.refresh_vm(vm, true);
        let seen = lock(&vm.seen);
        (seen.len() as u64 == vm.page_count()).then(|| seen.clone())
    }

    /// Opens an incoming migration to each target of a clone: the targets
    /// reached, and the outcome of those that could not be.
    pub(crate) fn clone_targets(
        &self,
        r: &v1::CloneRequest,
    ) -> (Vec<pagecast_migrate::CloneTarget>, Vec<v1::CloneOne>) {
        let mut targets = Vec::new();
        let mut failed = Vec::new();
        // Every target reached at once: frozen ones cost one connection's
        // deadline, not one each.
        let opened = pagecast_agent_api::at_once(&r.targets, |t| {
            self.open_incoming(&t.addr, &r.job, "receive a clone")
        });
        for (t, opened) in r.targets.iter().zip(opened) {
            match opened {
                Ok(ch) => targets.push(pagecast_migrate::CloneTarget {
                    name: t.name.clone(),
                    host: ch.peer_name().to_owned(),
                    link: Box::new(pagecast_migrate::ChannelLink::new(ch)),
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
        (targets, failed)
    }

    /// Receives a QEMU VM: into the waiting QEMU adopted under its name,
    /// or, on the libvirt route, into the QEMU at its address.
    fn qemu_in(
        &self,
        link: &mut dyn pagecast_migrate::MigrationLink,
        begin: &v1::MigrateBegin,
        job: &Arc<jobs::Job>,
    ) -> Result<pagecast_migrate::IncomingReport, AgentError> {
        if !begin.connect.is_empty() {
            return self.qemu_route_in(link, begin, job);
        }
        let waiting = self.hosted(&begin.vm).and_then(|vm| {
            vm.change(v1::HostedVmState::Incoming, v1::HostedVmState::MigratingIn)?;
            Ok(vm)
        });
        let vm = match waiting {
            Ok(vm) => vm,
            Err(e) => {
                let e = match e {
                    AgentError::NoSuchVm(_) => AgentError::BadRequest(format!(
                        "no QEMU VM {:?} waits here: start QEMU with -incoming defer and adopt it with `pagecast vm adopt --incoming --name {}`",
                        begin.vm, begin.vm
                    )),
                    other => other,
                };
                let _ = link.send(v1::migrate_frame::Body::Accept(v1::MigrateAccept {
                    ok: false,
                    reason: e.to_string(),
                    code: e.code() as i32,
                    postcopy: false,
                }));
                return Err(e);
            }
        };
        let into = Outbound {
            agent: self,
            vm: &vm,
        };
        let res = vm.backend.receive(into, link, begin, job);
        if res.is_ok() {
            vm.set_state(v1::HostedVmState::Running);
            self.index(&vm);
        } else {
            vm.set_state(v1::HostedVmState::Incoming);
        }
        res
    }

    /// Lets every VM go (at shutdown), withdrawing them from the index:
    /// micro-VMs stop, adopted QEMU VMs run on.
    pub fn shutdown(&self) {
        let names: Vec<String> = self.all_vms().iter().map(|v| v.name.clone()).collect();
        for n in names {
            self.forget(&n, None);
        }
        write(&self.content).clear();
    }

    /// Whether the content map lists `h` for some VM here (a lookup: the
    /// page is checked only when copied).
    pub fn has_content(&self, h: &PageHash) -> bool {
        read(&self.content).contains_key(h)
    }

    /// Copies a resident page whose content hashes to `h` in the domain of
    /// the VM holding it (checked under that VM's key) into `out`; returns
    /// that key. For a source's casts, which send what the coordinator
    /// names by hash whatever its domain.
    pub fn copy_any(&self, h: &PageHash, out: &mut Page) -> Option<ContentKey> {
        let (vm, f) = read(&self.content).get(h).cloned()?;
        vm.copy(f, h, out).then_some(vm.key)
    }
}

/// A clone's result as the control API carries it: each target's outcome,
/// those that could not even be reached (`failed`) among them. With
/// `verified`, a clone counts only if its memory was checked against the
/// source's.
pub(crate) fn clone_result(
    rep: &pagecast_migrate::CloneReportAll,
    failed: Vec<v1::CloneOne>,
    verified: bool,
) -> v1::CloneResult {
    counter!(crate::metrics::BYTES_SENT, "kind" => "clone")
        .increment(rep.bytes_links + rep.bytes_cast);
    let mut clones: Vec<v1::CloneOne> = rep
        .clones
        .iter()
        .map(|c| v1::CloneOne {
            name: c.name.clone(),
            host: c.host.clone(),
            ok: c.ok && (c.verified || !verified),
            verified: c.verified,
            error: c.error.clone(),
        })
        .collect();
    clones.extend(failed);
    let ok = clones.iter().all(|c| c.ok);
    v1::CloneResult {
        ok,
        error: (!ok)
            .then(|| pagecast_proto::refusal(v1::RefusalCode::Unavailable, "some clones failed")),
        clones,
        bytes_sent: rep.bytes_links + rep.bytes_cast,
        bytes_cast: rep.bytes_cast,
        downtime_ms: rep.downtime_ms,
        total_ms: rep.total_ms,
        rounds: rep.rounds,
    }
}

/// Frame `f` of `vm` now holds `new` where it held `*old`: the old content
/// leaves the map if this frame was where the map found it, the new one
/// enters it.
fn replace_in_map(
    map: &mut HashMap<PageHash, (Arc<Hosted>, u64)>,
    vm: &Arc<Hosted>,
    f: u64,
    old: &mut PageHash,
    new: PageHash,
) {
    if map
        .get(old)
        .is_some_and(|(v, fr)| Arc::ptr_eq(v, vm) && *fr == f)
    {
        map.remove(old);
    }
    *old = new;
    if !new.is_zero_page() {
        map.insert(new, (vm.clone(), f));
    }
}

impl LocalContent for Agent {
    fn copy(&self, key: &ContentKey, h: &PageHash, out: &mut Page) -> bool {
        // Only a VM of the same domain answers (checked under its key).
        self.copy_any(h, out) == Some(*key)
    }

    fn holds(&self, key: &ContentKey, h: &PageHash) -> bool {
        read(&self.content)
            .get(h)
            .is_some_and(|(vm, _)| vm.key == *key)
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
    job: &str,
) -> Result<(v1::Whereabouts, String), AgentError> {
    let c = pagecast_agent_api::AgentClient::connect(to, agent.tls())?
        .with_answer_timeout(Duration::from_secs(5))?;
    let dest = c.agent_name().to_owned();
    Ok((c.whereabouts(name, job)?, dest))
}

#[cfg(test)]
pub(crate) mod test_hosts {
    //! Hosts for tests: real certificates of one CA, and peers that serve
    //! them on loopback as a test scripts.
    use super::*;

    /// A host certificate named `name` from the CA in `dir/ca`, made there
    /// first if there is none yet.
    pub fn tls(dir: &Path, name: &str) -> Tls {
        let at = dir.join("ca");
        let ca = pagecast_channel::ca::Authority::load(&at)
            .or_else(|_| pagecast_channel::ca::Authority::init(&at))
            .unwrap();
        ca.issue_to(name, Role::Host, 1, &dir.join(name)).unwrap();
        Tls::load(&dir.join(name)).unwrap()
    }

    /// A peer with host certificate `name` listening on loopback: each
    /// connection, once authenticated, goes to `serve`, and what it hands
    /// back stays open for as long as the test runs (a frozen peer's).
    /// Its address.
    pub fn peer(
        dir: &Path,
        name: &str,
        mut serve: impl FnMut(Channel) -> Option<Channel> + Send + 'static,
    ) -> String {
        let tls = tls(dir, name);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming() {
                let Ok(s) = s else { return };
                if let Ok(ch) = Channel::server(s, &tls) {
                    held.extend(serve(ch));
                }
            }
        });
        addr
    }
}

#[cfg(test)]
mod refresh_tests {
    use super::*;
    use std::sync::mpsc;

    /// An agent named `h1` with a hashing pool of two threads.
    fn agent(dir: &Path) -> Agent {
        Agent::new("h1", test_hosts::tls(dir, "h1"), None, 2).unwrap()
    }

    /// A destination that takes a question and never answers (a real host
    /// certificate, frozen after its handshake), and one that answers that
    /// the VM is absent there.
    /// (Certified by the CA of [`agent`] in `dir`.)
    fn destination(dir: &Path, answers: bool) -> String {
        let name = if answers { "live" } else { "frozen" };
        test_hosts::peer(dir, name, move |mut ch| {
            let _ = ch.recv::<v1::AgentRequest>("question");
            if answers {
                let _ = ch.send(&v1::AgentResponse {
                    body: Some(v1::agent_response::Body::Whereabouts(
                        v1::VmWhereaboutsAnswer {
                            state: v1::Whereabouts::Absent as i32,
                        },
                    )),
                });
            }
            Some(ch)
        })
    }

    /// VMs in doubt are settled at once, each by its own destination: one
    /// whose destination froze costs the others nothing. Before, they were
    /// asked one after another, and a VM whose destination answers at once
    /// stayed paused while the question to a frozen one waited out its
    /// deadline (5 s) first.
    #[test]
    fn a_frozen_destination_keeps_no_other_vm_in_doubt_paused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Arc::new(agent(dir.path()));
        let mut doubtful = Vec::new();
        for (vm, answers) in [("a-frozen", false), ("b-live", true)] {
            let v = crate::hosted::tests::vm(vm);
            a.register(v.clone()).unwrap();
            let to = destination(dir.path(), answers);
            *lock(&v.state) = v1::HostedVmState::InDoubt;
            *lock(&v.in_doubt) = Some(InDoubt::new(&to, "j"));
            doubtful.push(v);
        }
        let t = Instant::now();
        let resolving = {
            let a = a.clone();
            std::thread::spawn(move || a.resolve_in_doubt())
        };
        while *lock(&doubtful[1].state) == v1::HostedVmState::InDoubt {
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "the VM whose destination answered is still in doubt"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(*lock(&doubtful[1].state), v1::HostedVmState::Running);
        resolving.join().unwrap();
        // The frozen destination's VM stays paused, to be asked again.
        assert_eq!(*lock(&doubtful[0].state), v1::HostedVmState::InDoubt);
    }

    /// A clone's targets are reached at once: two that accept a connection
    /// and never shake hands (frozen) cost one handshake deadline (5 s),
    /// not one each.
    #[test]
    fn frozen_clone_targets_cost_one_handshake_deadline_not_one_each() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        let mut held = Vec::new();
        let mut targets = Vec::new();
        for i in 0..2 {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            targets.push(v1::CloneTarget {
                name: format!("c{i}"),
                addr: l.local_addr().unwrap().to_string(),
            });
            held.push(l);
        }
        let r = v1::CloneRequest {
            vm: "v".into(),
            targets,
            job: "j".into(),
            ..Default::default()
        };
        let t = Instant::now();
        let (reached, failed) = a.clone_targets(&r);
        let took = t.elapsed();
        assert!(reached.is_empty());
        let names: Vec<&str> = failed.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["c0", "c1"]);
        assert!(took >= pagecast_channel::HANDSHAKE_TIMEOUT, "{took:?}");
        assert!(
            took < 2 * pagecast_channel::HANDSHAKE_TIMEOUT,
            "reaching the targets took {took:?}"
        );
        drop(held);
    }

    /// A refresh waiting for a VM's other refresh (or first hash) waits
    /// off the hashing pool: the holder's hashing needs every pool thread.
    /// Before, the refresher waited on a pool thread, and an agent whose
    /// first hash of a new VM ran at that moment hung for good.
    #[test]
    fn a_refresh_waiting_for_a_vm_leaves_the_hashing_pool_free() {
        let dir = tempfile::tempdir().unwrap();
        let a = Arc::new(agent(dir.path()));
        let vm = crate::hosted::tests::vm("a");
        a.register(vm.clone()).unwrap();
        let held = lock(&vm.refreshing);
        let refresher = {
            let a = a.clone();
            std::thread::spawn(move || a.refresh_content())
        };
        std::thread::sleep(Duration::from_millis(200));
        // Work that needs both pool threads at once, as a hash of a VM's
        // memory does.
        let (tx, rx) = mpsc::channel();
        {
            let a = a.clone();
            std::thread::spawn(move || {
                let both = std::sync::Barrier::new(2);
                a.fp_pool()
                    .install(|| rayon::join(|| both.wait(), || both.wait()));
                let _ = tx.send(());
            });
        }
        let done = rx.recv_timeout(Duration::from_secs(10));
        drop(held);
        refresher.join().unwrap();
        assert!(
            done.is_ok(),
            "the pool was stuck behind a refresh waiting for the VM"
        );
    }
}
