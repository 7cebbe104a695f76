//! The jobs this agent takes part in. A job is what every host-to-host
//! request belongs to: a migration arriving, a rack-mate's fetch, a
//! question about a VM in doubt. An agent learns a job from the
//! operator's request that starts or joins it (`JobOpen`; a `Migrate`,
//! `Clone` or `CastSend` naming it opens it implicitly at the agent that
//! starts the work) and knows who ordered it, which peers take part in
//! which role, and until when it runs. A request naming a job this agent
//! does not know, or one that ended, is refused (`UNKNOWN_JOB`).
//!
//! Holds, releases and cancels go through the job: each held migration's
//! go or abort is kept in its job, whether it came on the migration's own
//! connection or alone (`JobGo` naming the job and the VM), and a cancel
//! reaches every migration of the job, held or running.
//!
//! Jobs live in memory: an agent that restarts knows none, and ended jobs
//! are forgotten [`RETAIN`] after they end.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagecast_channel::Identity;
use pagecast_migrate::{HoldPoll, IncomingSlot};
use pagecast_pages::{ContentKey, PAGE_SIZE, Page, PageHash};
use pagecast_proto::v1;

use crate::AgentError;
use crate::sync::lock;

/// How long a job runs when its opener names no deadline.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(3600);
/// Longest deadline a job may ask for.
pub const MAX_DEADLINE: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long an ended job is remembered (so a late request gets "ended",
/// not "unknown", in the log).
pub const RETAIN: Duration = Duration::from_secs(3600);
/// Most jobs open on one agent at once.
pub const MAX_JOBS: usize = 4096;
/// Most peers one job may list.
pub const MAX_PEERS: usize = 4096;
/// Most arriving VMs one job may list.
pub const MAX_ARRIVALS: usize = 65_536;
/// Most QEMU addresses one job may name.
pub const MAX_QEMU_CONNECT: usize = 64;
/// Most contents one job may have this host gather (a 1 TiB guest's
/// worth of distinct pages: 1.5 GiB of notes at most).
pub const MAX_GATHER: usize = 1 << 28;

/// Where a job stands on this agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Requests naming it are served.
    Open,
    /// Its operator cancelled it: its migrations stop before switchover.
    Cancelled(String),
    /// Its operator closed it.
    Closed,
}

/// A held migration's word from whoever holds it.
#[derive(Debug, Clone)]
struct HoldWord {
    poll: HoldPoll,
    /// Set by an abort after the go: stop before switchover.
    stop: Option<String>,
}

/// One job, as this agent knows it.
pub struct Job {
    id: String,
    /// Who opened it here.
    ordered_by: Identity,
    inner: Mutex<JobInner>,
    /// Where changes to the stash are listed (this host's holdings in the
    /// content index), if anywhere.
    listing: Option<Listing>,
    /// Pages every job's stash holds here (the book's count).
    stashed: Arc<AtomicU64>,
}

/// Changes to what this host holds, by content (+1: one more copy kept,
/// -1: one freed), as the content index lists them: the agent's
/// publication ledger.
pub type Listing = Arc<dyn Fn(&[(PageHash, i64)]) + Send + Sync>;

struct JobInner {
    peers: BTreeMap<String, BTreeSet<i32>>,
    /// The VMs each source may send here, by the name they arrive under.
    arrivals: BTreeMap<String, BTreeSet<String>>,
    /// The QEMUs (loopback addresses) the job's QEMU streams may feed.
    qemu_connect: BTreeSet<std::net::SocketAddr>,
    deadline: Instant,
    state: JobState,
    ended: Option<Instant>,
    /// The arriving VMs' memory, for the job's casts and fetches.
    slots: Vec<Arc<IncomingSlot>>,
    /// Held migrations out of here, by VM.
    holds: HashMap<String, HoldWord>,
    /// Pages this host keeps for the job as an intermediary of a
    /// scatter-gather eviction, by dedup domain key and content; each
    /// freed once served to every VM that gathers it (one that did not
    /// receive it asks the source instead), the rest when the job ends.
    stash: HashMap<(ContentKey, PageHash), Stashed>,
    /// Contents the job's arriving VMs gather after their post-copy
    /// switchover, and the intermediary (its agent's address) holding
    /// each.
    gather: HashMap<PageHash, String>,
}

/// A page an intermediary keeps, and how many more times it is to be
/// served.
struct Stashed {
    page: Box<Page>,
    left: u8,
}

impl JobInner {
    /// The job ended: what it kept is freed; the contents freed, to take
    /// off the listing.
    #[must_use]
    fn free(&mut self) -> Vec<(PageHash, i64)> {
        let freed = self.stash.keys().map(|(_, h)| (*h, -1)).collect();
        self.stash = HashMap::new();
        self.gather = HashMap::new();
        freed
    }
}

impl Job {
    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Who opened it here.
    pub fn ordered_by(&self) -> &Identity {
        &self.ordered_by
    }

    /// Its state now (a job past its deadline has ended).
    pub fn state(&self) -> JobState {
        let mut g = lock(&self.inner);
        if g.state == JobState::Open && Instant::now() > g.deadline {
            let freed = g.free();
            self.changed(&freed);
            return JobState::Cancelled("its deadline passed".into());
        }
        g.state.clone()
    }

    /// Accounts for changes to the stash (+1: a content kept, -1: one
    /// freed): the gauge, the host's count of stashed pages (which local
    /// copies check first), and the listing of this host's holdings.
    /// Called with the job's lock held, so that a content's -1 never
    /// reaches the listing before its +1 (the listing takes only the
    /// publication's own locks).
    fn changed(&self, changes: &[(PageHash, i64)]) {
        if changes.is_empty() {
            return;
        }
        let n: i64 = changes.iter().map(|c| c.1).sum();
        ::metrics::gauge!(crate::metrics::STASH_BYTES).increment((n * PAGE_SIZE as i64) as f64);
        if n >= 0 {
            self.stashed.fetch_add(n.unsigned_abs(), Ordering::Relaxed);
        } else {
            self.stashed.fetch_sub(n.unsigned_abs(), Ordering::Relaxed);
        }
        if let Some(l) = &self.listing {
            l(changes);
        }
    }

    /// Keeps `page` (content `h` in the domain of `key`, checked by the
    /// caller) for the job's `gatherers` arriving VMs that gather it, if
    /// it has `room` bytes left: true if kept now, false if kept already.
    /// Refused once the job ended.
    pub fn stash(
        &self,
        key: ContentKey,
        h: PageHash,
        page: &Page,
        (room, gatherers): (u64, u8),
    ) -> Result<bool, AgentError> {
        let mut g = lock(&self.inner);
        // Checked under the lock that inserts: a job that ends meanwhile
        // has freed its stash, and would never free this page.
        if g.state != JobState::Open || Instant::now() > g.deadline {
            drop(g);
            let why = self.stopped().unwrap_or_else(|| "it ended".into());
            return Err(AgentError::UnknownJob(format!(
                "job {} ended here: {why}",
                self.id
            )));
        }
        if g.stash.contains_key(&(key, h)) {
            return Ok(false);
        }
        if room < PAGE_SIZE as u64 {
            return Err(AgentError::NoRoom {
                vm: format!("the stash of job {}", self.id),
                needs: PAGE_SIZE as u64,
                free: room,
                capacity: room,
            });
        }
        let kept = Stashed {
            page: Box::new(*page),
            left: gatherers.max(1),
        };
        g.stash.insert((key, h), kept);
        self.changed(&[(h, 1)]);
        Ok(true)
    }

    /// Copies content `h` (domain of `key`) from the job's stash into
    /// `out`, and frees it once served to as many VMs as gather it.
    pub fn take_stashed(&self, key: &ContentKey, h: &PageHash, out: &mut Page) -> bool {
        let mut g = lock(&self.inner);
        let Some(s) = g.stash.get_mut(&(*key, *h)) else {
            return false;
        };
        out.copy_from_slice(&s.page[..]);
        s.left -= 1;
        if s.left == 0 {
            g.stash.remove(&(*key, *h));
            self.changed(&[(*h, -1)]);
        }
        true
    }

    /// Copies content `h` (domain of `key`) from the job's stash into
    /// `out`, leaving it there for its gatherers.
    fn copy_stashed(&self, key: &ContentKey, h: &PageHash, out: &mut Page) -> bool {
        match lock(&self.inner).stash.get(&(*key, *h)) {
            Some(s) => {
                out.copy_from_slice(&s.page[..]);
                true
            }
            None => false,
        }
    }

    /// Whether the job's stash holds content `h` (domain of `key`).
    fn holds_stashed(&self, key: &ContentKey, h: &PageHash) -> bool {
        lock(&self.inner).stash.contains_key(&(*key, *h))
    }

    /// Bytes the job's stash holds here.
    pub fn stash_bytes(&self) -> u64 {
        lock(&self.inner).stash.len() as u64 * PAGE_SIZE as u64
    }

    /// Notes that the job's arriving VMs gather `hashes` from the
    /// intermediary at `from` after switching over (a later note for a
    /// content replaces an earlier one).
    pub fn plan_gather(&self, from: &str, hashes: &[PageHash]) -> Result<(), AgentError> {
        let mut g = lock(&self.inner);
        if g.gather.len().saturating_add(hashes.len()) > MAX_GATHER {
            return Err(AgentError::BadRequest(format!(
                "job {} would gather more than {MAX_GATHER} contents here",
                self.id
            )));
        }
        for h in hashes {
            g.gather.insert(*h, from.to_owned());
        }
        Ok(())
    }

    /// Of `still`, the contents to gather, grouped by intermediary.
    pub fn gather_plan(&self, still: &[PageHash]) -> Vec<(String, Vec<PageHash>)> {
        let g = lock(&self.inner);
        let mut by: BTreeMap<&str, Vec<PageHash>> = BTreeMap::new();
        for h in still {
            if let Some(from) = g.gather.get(h) {
                by.entry(from).or_default().push(*h);
            }
        }
        by.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    /// Whether requests naming it are served.
    pub fn is_open(&self) -> bool {
        self.state() == JobState::Open
    }

    /// Why its migrations must stop, if they must.
    pub fn stopped(&self) -> Option<String> {
        match self.state() {
            JobState::Open => None,
            JobState::Cancelled(why) => Some(why),
            JobState::Closed => Some("the job was closed".into()),
        }
    }

    /// When it expires.
    pub fn deadline(&self) -> Instant {
        lock(&self.inner).deadline
    }

    /// Whether `host` takes part in `role`.
    pub fn has_peer(&self, host: &str, role: v1::JobRole) -> bool {
        lock(&self.inner)
            .peers
            .get(host)
            .is_some_and(|r| r.contains(&(role as i32)))
    }

    /// Admits host `who` to a request of this job that needs `role`:
    /// refused unless the operator who opened the job here listed it so.
    /// `what` names the request, for the refusal.
    pub fn admit(&self, who: &Identity, role: v1::JobRole, what: &str) -> Result<(), AgentError> {
        if self.has_peer(&who.name, role) {
            return Ok(());
        }
        Err(AgentError::Forbidden(format!(
            "{who} may not {what} in job {}: the job does not list it as a {}",
            self.id,
            role_name(role)
        )))
    }

    /// Admits VM `vm` arriving from host `source`: the job must list
    /// `source` as a source that may send `vm` here.
    pub fn admit_arrival(&self, source: &str, vm: &str) -> Result<(), AgentError> {
        let who = Identity {
            name: source.to_owned(),
            role: pagecast_channel::Role::Host,
        };
        self.admit(&who, v1::JobRole::Source, "migrate a VM in")?;
        if lock(&self.inner)
            .arrivals
            .get(source)
            .is_some_and(|vms| vms.contains(vm))
        {
            return Ok(());
        }
        Err(AgentError::Forbidden(format!(
            "{who} may not send VM {vm:?} here in job {}: the job does not list that VM from it",
            self.id
        )))
    }

    /// Admits a QEMU stream into the QEMU listening on `addr`: only one
    /// the operator named when it opened the job here.
    pub fn admit_qemu(&self, addr: std::net::SocketAddr) -> Result<(), AgentError> {
        if lock(&self.inner).qemu_connect.contains(&addr) {
            return Ok(());
        }
        Err(AgentError::Forbidden(format!(
            "job {} names no QEMU on {addr} here: the operator names the destination QEMU's \
             address when it opens the job (pagecast migrate --qemu-connect)",
            self.id
        )))
    }

    /// Every peer and its roles.
    pub fn peers(&self) -> Vec<(String, Vec<v1::JobRole>)> {
        lock(&self.inner)
            .peers
            .iter()
            .map(|(h, rs)| {
                (
                    h.clone(),
                    rs.iter()
                        .filter_map(|r| v1::JobRole::try_from(*r).ok())
                        .collect(),
                )
            })
            .collect()
    }

    fn add_peers(&self, peers: &[v1::JobPeer], qemu_connect: &[std::net::SocketAddr]) {
        let mut g = lock(&self.inner);
        for p in peers {
            g.peers.entry(p.host.clone()).or_default().insert(p.role);
            if p.role == v1::JobRole::Source as i32 {
                g.arrivals
                    .entry(p.host.clone())
                    .or_default()
                    .extend(p.vms.iter().cloned());
            }
        }
        g.qemu_connect.extend(qemu_connect.iter().copied());
    }

    /// The arriving VMs' memory.
    pub fn slots(&self) -> Vec<Arc<IncomingSlot>> {
        lock(&self.inner).slots.clone()
    }

    /// Lets the job's casts and fetches fill an arriving VM.
    pub fn open_slot(&self, slot: &Arc<IncomingSlot>) {
        lock(&self.inner).slots.push(slot.clone());
    }

    /// No more: the VM started or failed.
    pub fn close_slot(&self, slot: &Arc<IncomingSlot>) {
        lock(&self.inner).slots.retain(|s| !Arc::ptr_eq(s, slot));
    }

    /// Registers a held migration of VM `vm` out of here.
    pub fn hold(&self, vm: &str) {
        lock(&self.inner).holds.insert(
            vm.to_owned(),
            HoldWord {
                poll: HoldPoll::Wait,
                stop: None,
            },
        );
    }

    /// The migration of `vm` is over.
    pub fn unhold(&self, vm: &str) {
        lock(&self.inner).holds.remove(vm);
    }

    /// Go on with the held migration of `vm` (or, `abort`, give it up; an
    /// abort after the go stops it before switchover). False if no
    /// migration of `vm` is held in this job.
    pub fn go(&self, vm: &str, abort: bool, reason: &str) -> bool {
        let mut g = lock(&self.inner);
        let Some(w) = g.holds.get_mut(vm) else {
            return false;
        };
        if abort {
            if w.poll == HoldPoll::Wait {
                w.poll = HoldPoll::Abort(reason.to_owned());
            }
            w.stop = Some(reason.to_owned());
        } else if w.poll == HoldPoll::Wait {
            w.poll = HoldPoll::Go;
        }
        true
    }

    /// What the held migration of `vm` hears: the job's own end first.
    pub fn poll(&self, vm: &str) -> HoldPoll {
        if let Some(why) = self.stopped() {
            return HoldPoll::Abort(why);
        }
        lock(&self.inner)
            .holds
            .get(vm)
            .map_or(HoldPoll::Wait, |w| w.poll.clone())
    }

    /// Why the migration of `vm` must stop before switchover, if it must.
    pub fn cancelled(&self, vm: &str) -> Option<String> {
        self.stopped()
            .or_else(|| lock(&self.inner).holds.get(vm).and_then(|w| w.stop.clone()))
    }
}

/// A role's name as refusals say it.
fn role_name(role: v1::JobRole) -> &'static str {
    match role {
        v1::JobRole::Source => "source",
        v1::JobRole::Destination => "destination",
        v1::JobRole::RackMate => "rack-mate",
        v1::JobRole::Intermediary => "intermediary",
        v1::JobRole::Unspecified => "peer",
    }
}

/// Every job this agent knows.
#[derive(Default)]
pub struct JobBook {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    /// Where the jobs' stashes are listed, once the agent publishes.
    listing: std::sync::OnceLock<Listing>,
    /// Pages every job's stash holds here: local copies look in stashes
    /// only while some are.
    stashed: Arc<AtomicU64>,
}

/// A job id: 1 to 128 letters, digits, '-', '_', '.' or ':'.
pub fn id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

impl JobBook {
    /// Opens `job` (or joins it, adding peers and, if `deadline` is given,
    /// moving its deadline later) for `who`. Returns the job and whether it
    /// is new here. A job that ended stays ended: it cannot be opened again.
    pub fn open(
        &self,
        job: &str,
        who: &Identity,
        peers: &[v1::JobPeer],
        deadline: Option<Duration>,
    ) -> Result<(Arc<Job>, bool), AgentError> {
        self.open_with(job, who, peers, &[], deadline)
    }

    /// Refuses QEMU addresses another open job holds: two jobs naming one
    /// port would have this agent feed one job's stream into the QEMU
    /// libvirt started for the other's VM.
    fn qemu_addresses_free(
        jobs: &HashMap<String, Arc<Job>>,
        job: &str,
        qemu_connect: &[std::net::SocketAddr],
    ) -> Result<(), AgentError> {
        for (other, j) in jobs.iter().filter(|(id, j)| *id != job && j.is_open()) {
            let g = lock(&j.inner);
            if let Some(a) = qemu_connect.iter().find(|a| g.qemu_connect.contains(a)) {
                return Err(AgentError::BadRequest(format!(
                    "job {job}: the QEMU address {a} is job {other}'s here"
                )));
            }
        }
        Ok(())
    }

    /// [`JobBook::open`], also naming the QEMUs on this host the job's
    /// QEMU streams may feed (loopback addresses).
    pub fn open_with(
        &self,
        job: &str,
        who: &Identity,
        peers: &[v1::JobPeer],
        qemu_connect: &[String],
        deadline: Option<Duration>,
    ) -> Result<(Arc<Job>, bool), AgentError> {
        if !id_ok(job) {
            return Err(AgentError::BadRequest(format!(
                "job {job:?}: use 1 to 128 letters, digits, '-', '_', '.' or ':'"
            )));
        }
        let arrivals: usize = peers.iter().map(|p| p.vms.len()).sum();
        if arrivals > MAX_ARRIVALS
            || peers
                .iter()
                .flat_map(|p| &p.vms)
                .any(|v| !pagecast_proto::name_ok(v))
        {
            return Err(AgentError::BadRequest(format!(
                "job {job}: at most {MAX_ARRIVALS} arriving VMs, each a VM name"
            )));
        }
        if qemu_connect.len() > MAX_QEMU_CONNECT {
            return Err(AgentError::BadRequest(format!(
                "job {job}: at most {MAX_QEMU_CONNECT} QEMU addresses"
            )));
        }
        let qemu_connect = qemu_connect
            .iter()
            .map(|a| crate::qemu::loopback(a, "a job's QEMU address"))
            .collect::<Result<Vec<_>, _>>()?;
        let qemu_connect = &qemu_connect[..];
        if peers.len() > MAX_PEERS
            || peers
                .iter()
                .any(|p| !pagecast_proto::name_ok(&p.host) && !p.host.contains(':'))
        {
            return Err(AgentError::BadRequest(format!(
                "job {job}: at most {MAX_PEERS} peers, each a host name"
            )));
        }
        let asked = deadline.map(|d| d.min(MAX_DEADLINE));
        let deadline = asked.unwrap_or(DEFAULT_DEADLINE);
        let mut jobs = lock(&self.jobs);
        Self::sweep(&mut jobs);
        Self::qemu_addresses_free(&jobs, job, qemu_connect)?;
        if let Some(j) = jobs.get(job) {
            if let Some(why) = j.stopped() {
                return Err(AgentError::UnknownJob(format!(
                    "job {job} ended here: {why}"
                )));
            }
            j.add_peers(peers, qemu_connect);
            // Only a deadline asked for moves it (later); a request that
            // joins the job implicitly (a Migrate naming it) keeps it.
            if let Some(d) = asked {
                let mut g = lock(&j.inner);
                g.deadline = g.deadline.max(Instant::now() + d);
            }
            return Ok((j.clone(), false));
        }
        if jobs.len() >= MAX_JOBS {
            return Err(AgentError::Busy {
                vm: String::new(),
                state: "holding as many jobs as it may",
            });
        }
        let j = Arc::new(Job {
            id: job.to_owned(),
            listing: self.listing.get().cloned(),
            stashed: self.stashed.clone(),
            ordered_by: who.clone(),
            inner: Mutex::new(JobInner {
                peers: BTreeMap::new(),
                arrivals: BTreeMap::new(),
                qemu_connect: BTreeSet::new(),
                deadline: Instant::now() + deadline,
                state: JobState::Open,
                ended: None,
                slots: Vec::new(),
                holds: HashMap::new(),
                stash: HashMap::new(),
                gather: HashMap::new(),
            }),
        });
        j.add_peers(peers, qemu_connect);
        jobs.insert(job.to_owned(), j.clone());
        Ok((j, true))
    }

    /// The open job `job`, for a request naming it; refused if unknown or
    /// ended.
    pub fn get(&self, job: &str) -> Result<Arc<Job>, AgentError> {
        let j = lock(&self.jobs).get(job).cloned();
        match j {
            Some(j) => match j.stopped() {
                None => Ok(j),
                Some(why) => Err(AgentError::UnknownJob(format!(
                    "job {job} ended here: {why}"
                ))),
            },
            None if job.is_empty() => Err(AgentError::UnknownJob(
                "the request names no job: open one with JobOpen first (pagecast migrate, \
                 evacuate and clone do)"
                    .into(),
            )),
            None => Err(AgentError::UnknownJob(format!(
                "job {job} is not open on this agent (open it with JobOpen first)"
            ))),
        }
    }

    /// Job `job` whatever its state, if this agent knows it.
    pub fn known(&self, job: &str) -> Option<Arc<Job>> {
        lock(&self.jobs).get(job).cloned()
    }

    /// Cancels `job`: true if it was open here.
    pub fn cancel(&self, job: &str, why: &str) -> bool {
        self.end(job, JobState::Cancelled(why.to_owned()))
    }

    /// Closes `job`: true if it was open here.
    pub fn close(&self, job: &str) -> bool {
        self.end(job, JobState::Closed)
    }

    fn end(&self, job: &str, to: JobState) -> bool {
        let Some(j) = lock(&self.jobs).get(job).cloned() else {
            return false;
        };
        let mut g = lock(&j.inner);
        if g.state != JobState::Open {
            return false;
        }
        g.state = to;
        g.ended = Some(Instant::now());
        let freed = g.free();
        j.changed(&freed);
        true
    }

    /// Lists every job's stash changes with `listing` from now on (the
    /// agent's publication to the content index): an intermediary's
    /// stashed contents are listed as held here while it keeps them.
    pub fn list_stashes(&self, listing: Listing) {
        let _ = self.listing.set(listing);
    }

    /// Copies content `h` (domain of `key`) into `out` from any open
    /// job's stash here, leaving it there: for a destination that fills
    /// what it lacks from what this host keeps for another job.
    pub fn copy_stashed(&self, key: &ContentKey, h: &PageHash, out: &mut Page) -> bool {
        if self.stashed.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let jobs: Vec<Arc<Job>> = lock(&self.jobs).values().cloned().collect();
        jobs.iter()
            .any(|j| j.is_open() && j.copy_stashed(key, h, out))
    }

    /// Whether any open job's stash here holds content `h` (domain of
    /// `key`).
    pub fn holds_stashed(&self, key: &ContentKey, h: &PageHash) -> bool {
        if self.stashed.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let jobs: Vec<Arc<Job>> = lock(&self.jobs).values().cloned().collect();
        jobs.iter().any(|j| j.is_open() && j.holds_stashed(key, h))
    }

    /// How many jobs are open.
    pub fn open_count(&self) -> usize {
        lock(&self.jobs).values().filter(|j| j.is_open()).count()
    }

    /// Bytes every job's stash holds here.
    pub fn stash_bytes(&self) -> u64 {
        let jobs: Vec<Arc<Job>> = lock(&self.jobs).values().cloned().collect();
        // A job past its deadline frees its stash when looked at.
        jobs.iter()
            .map(|j| {
                let _ = j.state();
                j.stash_bytes()
            })
            .sum()
    }

    /// Forgets jobs that ended (or expired) more than [`RETAIN`] ago.
    fn sweep(jobs: &mut HashMap<String, Arc<Job>>) {
        let now = Instant::now();
        jobs.retain(|_, j| {
            let mut g = lock(&j.inner);
            let ended = g.ended.or((now > g.deadline).then_some(g.deadline));
            let keep = ended.is_none_or(|t| now.saturating_duration_since(t) < RETAIN);
            if !keep {
                // A job whose deadline passed unseen still held its stash.
                let freed = g.free();
                j.changed(&freed);
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagecast_channel::Role;

    fn op() -> Identity {
        Identity {
            name: "ops".into(),
            role: Role::Operator,
        }
    }

    fn peer(host: &str, role: v1::JobRole) -> v1::JobPeer {
        v1::JobPeer {
            host: host.into(),
            role: role as i32,
            vms: Vec::new(),
        }
    }

    #[test]
    fn a_job_admits_each_peer_only_in_its_role_and_a_source_only_its_vms() {
        let book = JobBook::default();
        let src = v1::JobPeer {
            vms: vec!["vm1".into()],
            ..peer("s", v1::JobRole::Source)
        };
        let (j, _) = book
            .open_with(
                "j",
                &op(),
                &[src, peer("d", v1::JobRole::Destination)],
                &["127.0.0.1:4444".into()],
                None,
            )
            .unwrap();
        let host = |n: &str| Identity {
            name: n.into(),
            role: Role::Host,
        };
        j.admit(&host("d"), v1::JobRole::Destination, "fetch pages")
            .unwrap();
        let e = j
            .admit(&host("s"), v1::JobRole::Destination, "fetch pages")
            .unwrap_err();
        assert_eq!(e.code(), v1::RefusalCode::Forbidden);
        assert!(e.to_string().contains("as a destination"), "{e}");
        j.admit_arrival("s", "vm1").unwrap();
        for (from, vm) in [("s", "vm2"), ("d", "vm1"), ("x", "vm1")] {
            let e = j.admit_arrival(from, vm).unwrap_err();
            assert_eq!(e.code(), v1::RefusalCode::Forbidden, "{from} {vm}: {e}");
        }
        // Joining adds VMs for a source; nothing else widens.
        let more = v1::JobPeer {
            vms: vec!["vm2".into()],
            ..peer("s", v1::JobRole::Source)
        };
        book.open("j", &op(), &[more], None).unwrap();
        j.admit_arrival("s", "vm2").unwrap();
        j.admit_qemu("127.0.0.1:4444".parse().unwrap()).unwrap();
        // Another open job may not name the same QEMU.
        let e = book
            .open_with("other", &op(), &[], &["127.0.0.1:4444".into()], None)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("is job"), "{e}");
        let e = j.admit_qemu("127.0.0.1:22".parse().unwrap()).unwrap_err();
        assert!(
            e.to_string().contains("names no QEMU on 127.0.0.1:22"),
            "{e}"
        );
        // Grants are bounded and checked: names, loopback addresses.
        let bad = v1::JobPeer {
            vms: vec!["../x".into()],
            ..peer("s", v1::JobRole::Source)
        };
        assert!(book.open("j9", &op(), &[bad], None).is_err());
        for addr in ["10.0.0.1:80", "127.0.0.1:0", "nonsense"] {
            let e = book
                .open_with("j9", &op(), &[], &[addr.into()], None)
                .err()
                .unwrap();
            assert!(
                e.to_string().contains("a job's QEMU address"),
                "{addr}: {e}"
            );
            assert_eq!(e.code(), v1::RefusalCode::Invalid, "{addr}: {e}");
        }
    }

    #[test]
    fn a_job_is_known_once_opened_and_refused_once_ended() {
        let book = JobBook::default();
        assert!(matches!(book.get("j1"), Err(AgentError::UnknownJob(_))));
        assert!(matches!(book.get(""), Err(AgentError::UnknownJob(_))));
        let (j, newly) = book
            .open("j1", &op(), &[peer("a", v1::JobRole::Source)], None)
            .unwrap();
        assert!(newly);
        assert_eq!(j.ordered_by().name, "ops");
        let (_, again) = book
            .open("j1", &op(), &[peer("b", v1::JobRole::RackMate)], None)
            .unwrap();
        assert!(!again, "opening it again joins it");
        let j = book.get("j1").unwrap();
        assert!(j.has_peer("a", v1::JobRole::Source));
        assert!(j.has_peer("b", v1::JobRole::RackMate));
        assert!(!j.has_peer("a", v1::JobRole::Destination));
        assert!(book.close("j1"));
        assert!(!book.close("j1"), "closed once");
        let e = book.get("j1").err().unwrap();
        assert_eq!(e.code(), v1::RefusalCode::UnknownJob, "{e}");
        assert!(e.to_string().contains("ended"), "{e}");
        assert!(
            book.open("j1", &op(), &[], None).is_err(),
            "an ended job is not opened again"
        );
        assert!(book.known("j1").is_some(), "remembered after it ended");
    }

    /// An intermediary's stash gives each content to as many VMs as gather
    /// it and frees it then; what is left goes when the job ends.
    #[test]
    fn a_stashed_content_is_freed_once_served_and_the_rest_at_the_end() {
        let book = JobBook::default();
        let (j, _) = book.open("j4", &op(), &[], None).unwrap();
        let key = ContentKey::CLUSTER;
        let (a, b) = ([1u8; PAGE_SIZE], [2u8; PAGE_SIZE]);
        let (ha, hb) = (key.hash_page(&a), key.hash_page(&b));
        assert!(j.stash(key, ha, &a, (u64::MAX, 2)).unwrap());
        assert!(!j.stash(key, ha, &a, (u64::MAX, 2)).unwrap(), "kept once");
        assert!(j.stash(key, hb, &b, (u64::MAX, 1)).unwrap());
        assert_eq!(j.stash_bytes(), 2 * PAGE_SIZE as u64);
        let mut out = [0u8; PAGE_SIZE];
        assert!(j.take_stashed(&key, &ha, &mut out));
        assert_eq!(out, a);
        assert_eq!(j.stash_bytes(), 2 * PAGE_SIZE as u64, "one more to serve");
        out = [0; PAGE_SIZE];
        assert!(j.take_stashed(&key, &ha, &mut out));
        assert_eq!(out, a);
        assert_eq!(j.stash_bytes(), PAGE_SIZE as u64, "freed once served");
        assert!(!j.take_stashed(&key, &ha, &mut out), "served twice only");
        assert!(book.close("j4"));
        assert_eq!(j.stash_bytes(), 0, "the rest freed at the end");
        assert!(!j.take_stashed(&key, &hb, &mut out));
    }

    /// While a job keeps a content, the host's listing in the index says
    /// it holds it, and another job's arriving VMs may copy it; once freed
    /// (served to its gatherers, or at the job's end) the listing drops it
    /// again, to exactly what it was.
    #[test]
    fn a_stash_is_listed_while_kept_and_copied_by_other_jobs() {
        let book = JobBook::default();
        let listed: Arc<Mutex<HashMap<PageHash, i64>>> = Arc::default();
        let l = listed.clone();
        book.list_stashes(Arc::new(move |c| {
            let mut m = lock(&l);
            for (h, d) in c {
                *m.entry(*h).or_default() += d;
            }
        }));
        let (j, _) = book.open("j5", &op(), &[], None).unwrap();
        let key = ContentKey::CLUSTER;
        let (a, b) = ([3u8; PAGE_SIZE], [4u8; PAGE_SIZE]);
        let (ha, hb) = (key.hash_page(&a), key.hash_page(&b));
        let mut out = [0u8; PAGE_SIZE];
        assert!(!book.copy_stashed(&key, &ha, &mut out), "nothing kept yet");
        j.stash(key, ha, &a, (u64::MAX, 1)).unwrap();
        j.stash(key, hb, &b, (u64::MAX, 1)).unwrap();
        assert!(!j.stash(key, hb, &b, (u64::MAX, 1)).unwrap());
        assert_eq!(lock(&listed).get(&ha), Some(&1));
        assert_eq!(lock(&listed).get(&hb), Some(&1), "listed once");
        // Another job's arrival copies it, leaving it for its gatherer.
        assert!(book.copy_stashed(&key, &ha, &mut out));
        assert_eq!(out, a);
        assert_eq!(j.stash_bytes(), 2 * PAGE_SIZE as u64);
        let keyed = ContentKey::keyed([7; 32]);
        assert!(!book.copy_stashed(&keyed, &ha, &mut out), "another domain");
        assert!(j.take_stashed(&key, &ha, &mut out));
        assert_eq!(lock(&listed).get(&ha), Some(&0), "freed once served");
        assert!(book.close("j5"));
        assert_eq!(lock(&listed).get(&hb), Some(&0), "freed at the end");
        assert!(!book.copy_stashed(&key, &hb, &mut out));
        // Nothing is kept, or listed, once the job ended.
        assert!(j.stash(key, hb, &b, (u64::MAX, 1)).is_err());
        assert_eq!(lock(&listed).get(&hb), Some(&0));
        assert_eq!(j.stash_bytes(), 0);
        // A job whose deadline passes frees and unlists its stash when
        // next looked at (here: the room left for stashing).
        // (A deadline long enough that a preempted test thread still sees
        // the job open.)
        let (j, _) = book
            .open("j6", &op(), &[], Some(Duration::from_millis(600)))
            .unwrap();
        j.stash(key, ha, &a, (u64::MAX, 1)).unwrap();
        assert_eq!(book.stash_bytes(), PAGE_SIZE as u64);
        assert_eq!(lock(&listed).get(&ha), Some(&1));
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(book.stash_bytes(), 0);
        assert_eq!(lock(&listed).get(&ha), Some(&0), "unlisted at its deadline");
    }

    #[test]
    fn a_job_past_its_deadline_has_ended_and_stops_its_migrations() {
        let book = JobBook::default();
        let (j, _) = book
            .open("j2", &op(), &[], Some(Duration::from_millis(600)))
            .unwrap();
        j.hold("vm1");
        assert_eq!(j.poll("vm1"), HoldPoll::Wait);
        std::thread::sleep(Duration::from_millis(700));
        assert!(book.get("j2").is_err());
        assert!(matches!(j.poll("vm1"), HoldPoll::Abort(w) if w.contains("deadline")));
        assert!(j.cancelled("vm1").is_some());
    }

    #[test]
    fn holds_go_through_the_job_and_a_cancel_reaches_every_migration() {
        let book = JobBook::default();
        let (j, _) = book.open("j3", &op(), &[], None).unwrap();
        assert!(!j.go("vm1", false, ""), "nothing held yet");
        j.hold("vm1");
        j.hold("vm2");
        assert!(j.go("vm1", false, ""));
        assert_eq!(j.poll("vm1"), HoldPoll::Go);
        assert_eq!(j.poll("vm2"), HoldPoll::Wait);
        // An abort after the go stops it before switchover; the go stands.
        assert!(j.go("vm1", true, "operator"));
        assert_eq!(j.poll("vm1"), HoldPoll::Go);
        assert_eq!(j.cancelled("vm1").as_deref(), Some("operator"));
        assert!(book.cancel("j3", "the job was cancelled"));
        assert!(matches!(j.poll("vm2"), HoldPoll::Abort(_)));
        assert!(j.cancelled("vm2").is_some());
        assert!(!book.cancel("j3", "again"));
        assert!(!book.cancel("unknown", "x"));
    }

    #[test]
    fn bad_ids_and_too_many_peers_are_refused() {
        let book = JobBook::default();
        for bad in ["", "has space", &"x".repeat(129)] {
            assert!(book.open(bad, &op(), &[], None).is_err(), "{bad:?}");
        }
        let many: Vec<v1::JobPeer> = (0..=MAX_PEERS)
            .map(|i| peer(&format!("h{i}"), v1::JobRole::Destination))
            .collect();
        assert!(book.open("j4", &op(), &many, None).is_err());
        assert!(book.open("evacuate:r1.2", &op(), &many[..2], None).is_ok());
    }
}
