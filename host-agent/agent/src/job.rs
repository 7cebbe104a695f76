//! The agent's part in gang jobs (`pagecast evacuate`, `pagecast clone`):
//! the agent stays an engine, the coordinator decides.
//!
//! - **Held migrations.** A migration started with `hold` stops after the
//!   destination says what it lacks; the agent forwards that list to the
//!   coordinator ([`v1::Held`]) and waits for [`v1::JobGo`] on the same
//!   connection (the connection dropping meanwhile aborts it: the VM stays
//!   here, running).
//! - **Arriving VMs of a job** register their memory ([`IncomingSlot`]) in
//!   [`Jobs`], so the job's casts and fetches write pages straight into
//!   them, every page hash-checked, each page into every frame of every
//!   arriving VM of the job that waits for it. They also fill each other:
//!   a content that arrived for one VM is copied into the next
//!   ([`JobContent`]).
//! - **Casts.** On [`v1::CastSendRequest`] the agent reads the listed
//!   contents from its VMs into memory (so the session's pages cannot change
//!   under it; a content no VM holds any more is left out and travels later
//!   in the migration's own rounds) and sends them once to their receivers;
//!   on [`v1::CastRecvRequest`] it receives into the job's arriving VMs.
//! - **Rack-mates.** On [`v1::FetchRequest`] a destination asks the agent of
//!   a host in its rack for pages ([`v1::FetchPagesRequest`]), which that
//!   agent reads from its content map, hash-checked.

use crate::sync::lock;
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pagecast_channel::ChannelWriter;
use pagecast_migrate::{
    Gather, Hold, HoldPoll, IncomingSlot, LocalContent, MigrationError, SlotEvents,
};
use pagecast_multicast::{
    GroupPlan, Groups, PageEntry, PageSink, PageSource, ReceiverConfig, SenderConfig,
    TransportChoice,
};
use pagecast_pages::packed;
use pagecast_pages::{ContentKey, PAGE_SIZE, Page, PageHash};
use pagecast_proto::v1;

use crate::jobs::Job;
use crate::staging::{ReadFigures, advise_huge};
use crate::{Agent, AgentError};

type Resp = v1::agent_response::Body;

/// Most hashes one Held, VmContentPart or fetch frame carries.
pub const HASHES_PER_FRAME: usize = 65_536;
/// Most pages one fetch answer carries.
const PAGES_PER_FETCH_FRAME: usize = 64;

/// Hashes from their packed bytes (at most a control frame's worth).
pub fn hashes_of(b: &[u8]) -> Result<Vec<PageHash>, AgentError> {
    packed::unpack(b, pagecast_proto::MAX_CONTROL_FRAME_BYTES / 32)
        .map_err(|e| AgentError::BadRequest(e.to_string()))
}

/// Registers an arriving VM's slot with its job for as long as it fills,
/// and joins the casts its source invites it to.
pub struct JobSlots<'a> {
    /// The agent.
    pub agent: &'a Agent,
    /// The job.
    pub job: Arc<Job>,
}

impl SlotEvents for JobSlots<'_> {
    fn opened(&mut self, slot: &Arc<IncomingSlot>) {
        self.job.open_slot(slot);
    }
    fn gather(&mut self, slot: &Arc<IncomingSlot>, still: &[PageHash]) -> Option<Gather> {
        let plan = self.job.gather_plan(still);
        if plan.is_empty() {
            return None;
        }
        let contents = plan.iter().flat_map(|(_, hs)| hs.iter().copied()).collect();
        let from = plan
            .iter()
            .flat_map(|(at, hs)| hs.iter().map(move |h| (*h, at.clone())))
            .collect();
        Some(Gather {
            contents,
            source: Box::new(FromIntermediaries::new(
                self.agent.tls().clone(),
                self.job.id(),
                slot.domain(),
                from,
            )),
        })
    }
    fn closed(&mut self, slot: &Arc<IncomingSlot>) {
        self.job.close_slot(slot);
    }
    fn join_cast(
        &mut self,
        slot: &Arc<IncomingSlot>,
        control: &str,
        by_frame: bool,
    ) -> Result<u64, String> {
        let control = parse_addr(control).map_err(|e| e.to_string())?;
        let mut cfg = ReceiverConfig::new(control, self.agent.cast_iface(), self.agent.name());
        cfg.silent_after = Duration::from_secs(10);
        cfg.content_keys = vec![*slot.key()];
        cfg.job = self.job.id().to_owned();
        if by_frame {
            let mut sink = FrameSink {
                slot: slot.clone(),
                filled: 0,
            };
            pagecast_multicast::receive(&cfg, self.agent.tls(), &mut sink, &|_, _| {})
                .map_err(|e| e.to_string())?;
            Ok(sink.filled)
        } else {
            let mut sink = SlotSink::new(vec![slot.clone()]);
            pagecast_multicast::receive(&cfg, self.agent.tls(), &mut sink, &|_, _| {})
                .map_err(|e| e.to_string())?;
            Ok(sink.filled)
        }
    }
}

/// An arriving VM's gathering after its post-copy switchover: each
/// content from the intermediary the job placed it on, one connection per
/// intermediary, every intermediary of a batch asked at once (one that
/// is frozen holds up only the pages it holds). An intermediary that
/// fails (refuses, breaks, or stays silent for the reply timeout) is not
/// asked again: what it held is asked of the source instead.
struct FromIntermediaries {
    tls: pagecast_channel::Tls,
    job: String,
    domain: String,
    /// Where each content sits.
    from: HashMap<PageHash, String>,
    /// A connection per intermediary, or None once it failed.
    links: HashMap<String, Option<pagecast_channel::Channel>>,
    /// How long an intermediary may be silent while asked.
    reply_timeout: Duration,
}

/// One intermediary's part of a batch: its connection (if one is open)
/// and the contents asked of it.
struct Asking {
    at: String,
    link: Option<pagecast_channel::Channel>,
    hashes: Vec<PageHash>,
}

impl FromIntermediaries {
    fn new(
        tls: pagecast_channel::Tls,
        job: &str,
        domain: &str,
        from: HashMap<PageHash, String>,
    ) -> Self {
        FromIntermediaries {
            tls,
            job: job.to_owned(),
            domain: domain.to_owned(),
            from,
            links: HashMap::new(),
            reply_timeout: pagecast_migrate::REPLY_TIMEOUT,
        }
    }

    /// The intermediaries `hashes` sit on, and what each holds of them,
    /// leaving out those that failed.
    fn split(&mut self, hashes: &[PageHash]) -> Vec<Asking> {
        let mut by: HashMap<&str, Vec<PageHash>> = HashMap::new();
        for h in hashes {
            if let Some(at) = self.from.get(h) {
                by.entry(at).or_default().push(*h);
            }
        }
        let mut out = Vec::with_capacity(by.len());
        for (at, hashes) in by {
            let link = match self.links.remove(at) {
                Some(None) => {
                    self.links.insert(at.to_owned(), None);
                    continue;
                }
                Some(Some(ch)) => Some(ch),
                None => None,
            };
            out.push(Asking {
                at: at.to_owned(),
                link,
                hashes,
            });
        }
        out
    }

    /// Asks one intermediary (connecting first if need be), handing each
    /// page to `got`; the connection back if it is still good.
    fn ask(
        &self,
        a: Asking,
        got: &mut dyn FnMut(PageHash, &Page),
    ) -> Option<pagecast_channel::Channel> {
        let Asking { at, link, hashes } = a;
        let ch = match link {
            Some(ch) => Ok(ch),
            None => crate::connect_host(&self.tls, &at, "give gathered pages").and_then(|ch| {
                ch.set_read_timeout(Some(self.reply_timeout))?;
                Ok(ch)
            }),
        };
        let mut ch = match ch {
            Ok(ch) => ch,
            Err(e) => {
                tracing::warn!(intermediary = %at, "gathering: {e}");
                return None;
            }
        };
        // Unchecked here: the engine checks each page it is handed.
        match fetch_pages_from(&mut ch, (&at, &self.job), &self.domain, &hashes, got) {
            Ok(_) => Some(ch),
            Err(e) => {
                tracing::warn!(intermediary = %at, "gathering stopped: {e}");
                None
            }
        }
    }
}

impl pagecast_migrate::GatherSource for FromIntermediaries {
    fn fetch(
        &mut self,
        hashes: &[PageHash],
        got: &mut dyn FnMut(PageHash, &Page),
    ) -> Result<(), String> {
        let asking = self.split(hashes);
        let (tx, rx) = std::sync::mpsc::channel::<(PageHash, Box<Page>)>();
        let this = &*self;
        let back: Vec<(String, Option<pagecast_channel::Channel>)> = std::thread::scope(|s| {
            let mut running = Vec::new();
            let mut here = Vec::new();
            for a in asking {
                let tx = tx.clone();
                let at = a.at.clone();
                let a = Arc::new(Mutex::new(Some(a)));
                // The asking moves into the thread only once it runs: if
                // no thread starts, it is asked here.
                let h = std::thread::Builder::new()
                    .name("gather".into())
                    .spawn_scoped(s, {
                        let a = a.clone();
                        move || {
                            let a = lock(&a).take()?;
                            this.ask(a, &mut |h, p| {
                                let _ = tx.send((h, Box::new(*p)));
                            })
                        }
                    });
                match h {
                    Ok(h) => running.push((at, h)),
                    Err(_) => here.extend(lock(&a).take()),
                }
            }
            let mut back: Vec<_> = here
                .into_iter()
                .map(|a| (a.at.clone(), this.ask(a, got)))
                .collect();
            drop(tx);
            // Pages are handed over as they come, whichever intermediary
            // sends them.
            for (h, p) in rx {
                got(h, &p);
            }
            back.extend(
                running
                    .into_iter()
                    .map(|(at, h)| (at, h.join().ok().flatten())),
            );
            back
        });
        for (at, link) in back {
            self.links.insert(at, link);
        }
        Ok(())
    }
}

/// Where a clone's dirty-round pages go: each into its own frame.
struct FrameSink {
    slot: Arc<IncomingSlot>,
    filled: u64,
}

impl PageSink for FrameSink {
    fn begin(&mut self, _frames: u64) -> io::Result<()> {
        Ok(())
    }
    fn put(&mut self, entry: &PageEntry, data: &Page) -> io::Result<()> {
        self.slot
            .write_frame(entry.key, entry.hash, data)
            .map_err(io::Error::other)?;
        self.filled += 1;
        Ok(())
    }
    fn get(&mut self, key: u64, out: &mut Page) -> io::Result<()> {
        self.slot.read_frame(key, out).map_err(io::Error::other)
    }
    fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn abort(&mut self) {}
}

/// The source side's caster for clones: stages the VM's frames, sends
/// them once with the agent's transport, inviting each destination over its
/// migration link.
pub struct AgentCaster<'a> {
    /// The agent.
    pub agent: &'a Agent,
    /// The VM's memory.
    pub vm: &'a dyn pagecast_memory::GuestMemory,
    /// The key of the VM's dedup domain.
    pub key: ContentKey,
    /// Pacing, bits per second.
    pub rate_bps: Option<u64>,
    /// The job (for group addresses).
    pub job: String,
    /// Casts so far (for group addresses).
    pub casts: usize,
}

/// A clone cast's pages read out of the VM: the staged pages, every
/// frame's hash, and per set of receivers (by index) the staged pages it
/// takes.
struct CloneStage {
    staged: Staged,
    hashes: Vec<PageHash>,
    groups: std::collections::BTreeMap<Vec<usize>, Vec<u32>>,
}

impl AgentCaster<'_> {
    /// Reads and hashes every frame of `frames` now; frame `i` goes to
    /// the receivers `members[i]` (all `receivers` if `members` is
    /// empty). Zero pages do not travel in casts (their marker is not a
    /// hash of their bytes); the engine sends them over the links.
    fn stage(
        &self,
        frames: &[u64],
        members: &[Vec<usize>],
        receivers: usize,
    ) -> Result<CloneStage, MigrationError> {
        let (mut buf, mut hashes) = (Vec::new(), Vec::new());
        let mut entries = Vec::with_capacity(frames.len());
        let mut data = Vec::with_capacity(frames.len() * PAGE_SIZE);
        advise_huge(&mut data);
        let mut staged_hashes = Vec::with_capacity(frames.len());
        let all: Vec<usize> = (0..receivers).collect();
        let mut groups: std::collections::BTreeMap<Vec<usize>, Vec<u32>> = Default::default();
        for (c, chunk) in frames.chunks(64).enumerate() {
            pagecast_memory::fingerprint::read_and_hash(
                self.vm,
                &self.key,
                chunk,
                &mut buf,
                &mut hashes,
            )?;
            for (k, &f) in chunk.iter().enumerate() {
                staged_hashes.push(hashes[k]);
                if hashes[k].is_zero_page() {
                    continue;
                }
                let m = if members.is_empty() {
                    all.clone()
                } else {
                    members[c * 64 + k].clone()
                };
                if m.is_empty() {
                    continue;
                }
                groups.entry(m).or_default().push(entries.len() as u32);
                entries.push(PageEntry {
                    key: f,
                    hash: hashes[k],
                });
                data.extend_from_slice(&buf[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]);
            }
        }
        Ok(CloneStage {
            staged: Staged { entries, data },
            hashes: staged_hashes,
            groups,
        })
    }
}

impl pagecast_migrate::Caster for AgentCaster<'_> {
    fn cast(
        &mut self,
        frames: &[u64],
        members: &[Vec<usize>],
        _by_frame: bool,
        receivers: &[String],
        invite: &mut dyn FnMut(usize, &str) -> Result<(), MigrationError>,
    ) -> Result<pagecast_migrate::CastOutcome, MigrationError> {
        let CloneStage {
            staged,
            hashes: staged_hashes,
            groups,
        } = self.stage(frames, members, receivers.len())?;
        let mut complete = vec![true; receivers.len()];
        if groups.is_empty() {
            // Nothing to cast (every page zero): nothing is missing.
            return Ok(pagecast_migrate::CastOutcome {
                hashes: staged_hashes,
                complete,
                bytes: 0,
            });
        }
        self.casts += 1;
        let plans: Vec<GroupPlan> = groups
            .into_iter()
            .enumerate()
            .map(|(g, (members, pages))| GroupPlan {
                addr: clone_group_addr(&self.job, self.casts, g),
                members,
                pages,
            })
            .collect();
        let iface = self.agent.cast_iface();
        let listener = TcpListener::bind((iface, 0))
            .map_err(|e| MigrationError::Protocol(format!("cannot listen for a cast: {e}")))?;
        let control = listener
            .local_addr()
            .map_err(|e| MigrationError::Protocol(format!("cannot listen for a cast: {e}")))?;
        // Receivers a link cannot invite are dropped from the session.
        // A receiver that cannot be invited fails the cast: the engine then
        // sends over the links (receivers already invited give up on a
        // sender that never answers).
        for r in 0..receivers.len() {
            invite(r, &control.to_string())?;
        }
        let mut cfg = SenderConfig::new(control, iface, receivers.len());
        cfg.name = self.agent.name().to_owned();
        cfg.expected = receivers.to_vec();
        cfg.job = self.job.clone();
        cfg.rate_bps = self.rate_bps;
        cfg.accept_timeout = Duration::from_secs(10);
        let rep = pagecast_multicast::send_on(
            listener,
            &cfg,
            Groups::Plan(plans),
            &staged,
            self.agent.tls(),
            &|_, _| {},
        )
        .map_err(|e| MigrationError::Protocol(format!("cast: {e}")))?;
        for p in &rep.receivers {
            let i = (p.id as usize).saturating_sub(1);
            if let Some(c) = complete.get_mut(i) {
                *c &= matches!(
                    p.status,
                    pagecast_multicast::PeerStatus::Complete
                        | pagecast_multicast::PeerStatus::Unicast { .. }
                );
            }
        }
        Ok(pagecast_migrate::CastOutcome {
            hashes: staged_hashes,
            complete,
            bytes: cast_bytes(&rep),
        })
    }
}

fn clone_group_addr(job: &str, cast: usize, group: usize) -> std::net::SocketAddrV4 {
    let j = job
        .bytes()
        .fold(11u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
    let x = ((j as usize + cast) % 200) as u8 + 20;
    let y = (group % 250) as u8 + 1;
    std::net::SocketAddrV4::new(
        Ipv4Addr::new(239, 194, x, y),
        41_000 + 2 * (group / 250) as u16,
    )
}

/// What an arriving VM of a job copies locally: what this host's VMs hold,
/// then what the job's other arriving VMs already received, then what this
/// host keeps as an intermediary of another job (the content index lists
/// it here while it does).
pub struct JobContent<'a> {
    /// The agent.
    pub agent: &'a Agent,
    /// The job.
    pub job: &'a Job,
}

impl LocalContent for JobContent<'_> {
    fn copy(&self, key: &ContentKey, h: &PageHash, out: &mut Page) -> bool {
        if self.agent.copy(key, h, out) {
            return true;
        }
        self.job
            .slots()
            .iter()
            .any(|s| s.key() == key && s.copy(h, out))
            || self.agent.jobs().copy_stashed(key, h, out)
    }

    fn holds(&self, key: &ContentKey, h: &PageHash) -> bool {
        self.agent.holds(key, h)
            || self
                .job
                .slots()
                .iter()
                .any(|s| s.key() == key && s.holds(h))
            || self.agent.jobs().holds_stashed(key, h)
    }

    fn domain_key(&self, domain: &str) -> Result<ContentKey, String> {
        self.agent.domain_key(domain).map_err(|e| e.to_string())
    }
}

/// A migration's link to whoever asked for it, through its job: for a
/// gang job, the needs go out as Held frames on the connection and the go
/// (or abort) comes back on it, or alone (`JobGo` naming the job and the
/// VM); for any migration, a later abort (Ctrl-C, `pagecast cancel`, the
/// job's end or deadline) stops it before switchover. A thread reads the
/// connection and hands what it hears to the job.
pub struct CoordinatorHold {
    writer: Arc<Mutex<ChannelWriter>>,
    job: Arc<Job>,
    vm: String,
    holds: bool,
}

impl CoordinatorHold {
    /// Registers the migration of `vm` with `job` and starts reading from
    /// `reader`. `holding`: it holds for a gang job, and may hear nothing
    /// from its coordinator for that long while held, once the coordinator
    /// has said anything (a coordinator that sends no keep-alives, of an
    /// earlier version, is not judged so); then the connection dropping,
    /// or that silence, before the go aborts it. Otherwise a client that
    /// goes away does not stop the migration.
    pub fn new(
        writer: Arc<Mutex<ChannelWriter>>,
        mut reader: pagecast_channel::ChannelReader,
        holding: Option<Duration>,
        job: Arc<Job>,
        vm: &str,
    ) -> Self {
        job.hold(vm);
        let holds = holding.is_some();
        let (j, v) = (job.clone(), vm.to_owned());
        let _ = std::thread::Builder::new()
            .name("pagecast-hold".into())
            .spawn(move || {
                let mut heard = false;
                loop {
                    if let Some(silence) = holding
                        && heard
                        && !reader.readable_within(silence)
                    {
                        if j.poll(&v) == HoldPoll::Wait {
                            j.go(
                                &v,
                                true,
                                &format!(
                                    "the coordinator said nothing for {silence:?} while it held \
                                     the migration (frozen, or its network cut)"
                                ),
                            );
                            return;
                        }
                        // Released: the coordinator need not speak; a
                        // later abort is still read.
                        continue;
                    }
                    let r: Result<v1::AgentRequest, _> = reader.recv("job go");
                    heard |= r.is_ok();
                    match r {
                        Ok(v1::AgentRequest {
                            body: Some(v1::agent_request::Body::Go(g)),
                        }) => {
                            j.go(&v, g.abort, &g.reason);
                            if g.abort {
                                return;
                            }
                        }
                        // A keep-alive, or anything else: the coordinator
                        // lives.
                        Ok(_) => {}
                        Err(e) => {
                            if holds && j.poll(&v) == HoldPoll::Wait {
                                j.go(&v, true, &format!("the coordinator went away: {e}"));
                            }
                            return;
                        }
                    }
                }
            });
        CoordinatorHold {
            writer,
            job,
            vm: vm.to_owned(),
            holds,
        }
    }
}

impl Drop for CoordinatorHold {
    fn drop(&mut self) {
        self.job.unhold(&self.vm);
    }
}

impl Hold for CoordinatorHold {
    fn needs(&mut self, needed: &[PageHash], filled_locally: u64) -> Result<(), MigrationError> {
        let mut w = lock(&self.writer);
        let mut chunks = needed.chunks(HASHES_PER_FRAME).peekable();
        loop {
            let chunk = chunks.next().unwrap_or(&[]);
            let last = chunks.peek().is_none();
            w.send(&v1::AgentResponse {
                body: Some(Resp::Held(v1::Held {
                    hashes: packed::pack(chunk).into(),
                    last,
                    pages_local: if last { filled_locally } else { 0 },
                })),
            })
            .map_err(MigrationError::Link)?;
            if last {
                return Ok(());
            }
        }
    }

    fn poll(&mut self) -> HoldPoll {
        self.job.poll(&self.vm)
    }

    fn holds(&self) -> bool {
        self.holds
    }

    fn cancelled(&mut self) -> Option<String> {
        self.job.cancelled(&self.vm)
    }
}

/// A job's cancel, for a clone (never held): asked before every round,
/// before switchover and at every part of a relayed stream.
pub struct JobCancel {
    job: Arc<Job>,
}

impl JobCancel {
    /// The cancel of `job`.
    pub fn new(job: Arc<Job>) -> Self {
        JobCancel { job }
    }
}

impl Hold for JobCancel {
    fn needs(&mut self, _: &[PageHash], _: u64) -> Result<(), MigrationError> {
        Ok(())
    }
    fn poll(&mut self) -> HoldPoll {
        HoldPoll::Go
    }
    fn holds(&self) -> bool {
        false
    }
    fn cancelled(&mut self) -> Option<String> {
        self.job.stopped()
    }
}

/// Pages read out of this host's VMs for a clone's cast, fixed for the
/// session.
pub struct Staged {
    entries: Vec<PageEntry>,
    data: Vec<u8>,
}

impl PageSource for Staged {
    fn pages(&self) -> u32 {
        self.entries.len() as u32
    }
    fn entry(&self, i: u32) -> PageEntry {
        self.entries[i as usize]
    }
    fn read(&self, i: u32, out: &mut Page) -> io::Result<()> {
        let at = i as usize * PAGE_SIZE;
        out.copy_from_slice(&self.data[at..at + PAGE_SIZE]);
        Ok(())
    }
    fn frames(&self) -> u64 {
        // Keys need not come in order (a clone's pages go in content order).
        self.entries.iter().map(|e| e.key + 1).max().unwrap_or(0)
    }
}

/// Where a destination's cast pages go: into the job's arriving VMs. It
/// holds them weakly: a VM released while the cast runs (it lacks nothing
/// the cast brings) takes its memory back at its switchover without
/// waiting for the cast to end.
pub struct SlotSink {
    slots: Vec<std::sync::Weak<IncomingSlot>>,
    keys: HashMap<u64, PageHash>,
    /// Frames filled.
    pub filled: u64,
}

impl SlotSink {
    /// A sink filling `slots`.
    pub fn new(slots: Vec<Arc<IncomingSlot>>) -> Self {
        SlotSink {
            slots: slots.iter().map(Arc::downgrade).collect(),
            keys: HashMap::new(),
            filled: 0,
        }
    }
}

impl PageSink for SlotSink {
    fn begin(&mut self, _frames: u64) -> io::Result<()> {
        Ok(())
    }
    fn put(&mut self, entry: &PageEntry, data: &Page) -> io::Result<()> {
        // The transport checked the page against its hash.
        self.keys.insert(entry.key, entry.hash);
        for s in self.slots.iter().filter_map(std::sync::Weak::upgrade) {
            self.filled += s.fill(&entry.hash, data).map_err(io::Error::other)?;
        }
        Ok(())
    }
    fn get(&mut self, key: u64, out: &mut Page) -> io::Result<()> {
        let h = self
            .keys
            .get(&key)
            .ok_or_else(|| io::Error::other(format!("page {key} was never received")))?;
        if self
            .slots
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .any(|s| s.copy(h, out))
        {
            Ok(())
        } else {
            Err(io::Error::other(format!("page {key} is no longer held")))
        }
    }
    fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn abort(&mut self) {
        // Pages already written were verified: they stay.
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, AgentError> {
    s.to_socket_addrs()
        .map_err(|source| AgentError::Connect {
            addr: s.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| AgentError::BadRequest(format!("{s} resolves to no address")))
}

/// Runs a cast from this agent: answers CastOpen on `writer`, lists the
/// pages and sends them as they are read, returns the outcome.
pub fn cast_send(
    agent: &Agent,
    r: &v1::CastSendRequest,
    writer: &mut dyn FnMut(Resp) -> Result<(), AgentError>,
) -> Result<v1::CastResult, AgentError> {
    let hashes = hashes_of(&r.hashes)?;
    if hashes.len() > pagecast_proto::MAX_CAST_PAGES as usize {
        return Err(AgentError::BadRequest(format!(
            "{} pages in one cast; at most {}",
            hashes.len(),
            pagecast_proto::MAX_CAST_PAGES
        )));
    }
    if r.receivers.is_empty() || r.groups.is_empty() {
        return Err(AgentError::BadRequest(
            "a cast needs receivers and groups".into(),
        ));
    }
    let groups = parse_groups(r)?;
    let iface = agent.cast_iface();
    let listener = TcpListener::bind((iface, 0)).map_err(|source| AgentError::Bind {
        addr: format!("{iface}:0"),
        source,
    })?;
    let control = listener.local_addr().map_err(|source| AgentError::Bind {
        addr: format!("{iface}:0"),
        source,
    })?;
    // The receivers are told where to join at once. What the content map
    // lacks is left out (counted here); a page that fails its check when
    // read is withdrawn mid-session (counted in the cast's log line).
    let (entries, index, left_out) = send_order(agent, &hashes, &groups);
    writer(Resp::CastOpen(v1::CastOpen {
        control: control.to_string(),
        left_out,
    }))?;
    let cfg = sender_config(agent, r, (control, iface));
    let t0 = std::time::Instant::now();
    tracing::info!(
        "cast of {} pages ({left_out} of the request's {} not here) to {}: receivers join at \
         {control}",
        entries.len(),
        hashes.len(),
        r.receivers.join(", ")
    );
    let plan = Groups::Plan(plans_of(&groups, &index));
    let cpu0 = crate::sync::thread_cpu_s();
    let (res, read) = crate::staging::send_as_read(agent, listener, &cfg, plan, entries);
    if let Ok(rep) = &res {
        log_sent(
            &read,
            r,
            rep,
            t0.elapsed().as_secs_f64(),
            crate::sync::thread_cpu_s() - cpu0,
        );
        ::metrics::counter!(crate::metrics::BYTES_SENT, "kind" => "cast")
            .increment(cast_bytes(rep));
    }
    Ok(match res {
        Ok(rep) => v1::CastResult {
            ok: true,
            error: None,
            bytes_sent: cast_bytes(&rep),
            stats: Some(send_stats(&rep)),
            frames_filled: 0,
        },
        Err(e) => v1::CastResult {
            ok: false,
            error: Some(pagecast_proto::refusal(
                v1::RefusalCode::Unavailable,
                e.to_string(),
            )),
            ..Default::default()
        },
    })
}

/// Every byte a cast sent: pages, repairs, heartbeats, unicast and
/// control.
fn cast_bytes(rep: &pagecast_multicast::SendReport) -> u64 {
    rep.bytes_first + rep.bytes_repair + rep.bytes_heartbeat + rep.bytes_unicast + rep.bytes_control
}

/// The sender's settings for a cast request: its receivers, job, rate and
/// transport, on the control listener at `control` over `iface`.
fn sender_config(
    agent: &Agent,
    r: &v1::CastSendRequest,
    (control, iface): (SocketAddr, Ipv4Addr),
) -> SenderConfig {
    let mut cfg = SenderConfig::new(control, iface, r.receivers.len());
    cfg.name = agent.name().to_owned();
    cfg.expected = r.receivers.clone();
    cfg.job = r.job.clone();
    cfg.rate_bps = (r.rate_bps > 0).then_some(r.rate_bps);
    cfg.accept_timeout = Duration::from_secs(20);
    cfg.transport = match v1::CastTransport::try_from(r.transport) {
        Ok(v1::CastTransport::Multicast) => TransportChoice::Multicast,
        Ok(v1::CastTransport::Chain) => TransportChoice::Chain,
        _ => TransportChoice::Auto,
    };
    cfg
}

/// A cast request's pages in the order the sender sends them (each
/// group's in turn), those the content map lacks left out: their entries
/// (keyed by their place in the request), per place in the request its
/// index in the session (None: left out), and how many were left out.
fn send_order(
    agent: &Agent,
    hashes: &[PageHash],
    groups: &[RequestGroup<'_>],
) -> (Vec<PageEntry>, Vec<Option<u32>>, u64) {
    let mut index: Vec<Option<u32>> = vec![None; hashes.len()];
    let mut seen = vec![false; hashes.len()];
    let mut entries = Vec::new();
    let mut left_out = 0;
    for &(_, _, pages) in groups {
        for &p in pages {
            let Some(h) = hashes.get(p as usize) else {
                continue;
            };
            if std::mem::replace(&mut seen[p as usize], true) {
                continue;
            }
            if !agent.has_content(h) {
                left_out += 1;
                continue;
            }
            index[p as usize] = Some(entries.len() as u32);
            entries.push(PageEntry {
                key: u64::from(p),
                hash: *h,
            });
        }
    }
    (entries, index, left_out)
}

/// A group of a cast request, checked: its address, its members by
/// receiver index, and its pages by their place in the request.
type RequestGroup<'r> = (std::net::SocketAddrV4, Vec<usize>, &'r [u32]);

/// Each group of a cast request, checked.
fn parse_groups(r: &v1::CastSendRequest) -> Result<Vec<RequestGroup<'_>>, AgentError> {
    r.groups
        .iter()
        .map(|g| {
            let addr: std::net::SocketAddrV4 = g.addr.parse().map_err(|_| {
                AgentError::BadRequest(format!("group address {:?} is not ADDR:PORT", g.addr))
            })?;
            let members = g
                .members
                .iter()
                .map(|m| {
                    r.receivers.iter().position(|x| x == m).ok_or_else(|| {
                        AgentError::BadRequest(format!("group member {m} is not a receiver"))
                    })
                })
                .collect::<Result<Vec<usize>, AgentError>>()?;
            Ok((addr, members, g.pages.as_slice()))
        })
        .collect()
}

/// The groups as the sender plans them: their pages by their place among
/// those staged (`index`: per page of the request, its place, None if
/// left out), groups left empty dropped. With nothing left at all, the
/// first group goes on empty, so that the receivers hear there is
/// nothing to send.
fn plans_of(groups: &[RequestGroup<'_>], index: &[Option<u32>]) -> Vec<GroupPlan> {
    let mut plans: Vec<GroupPlan> = groups
        .iter()
        .filter_map(|(addr, members, pages)| {
            let pages: Vec<u32> = pages
                .iter()
                .filter_map(|&p| index.get(p as usize).copied().flatten())
                .collect();
            (!pages.is_empty()).then(|| GroupPlan {
                addr: *addr,
                members: members.clone(),
                pages,
            })
        })
        .collect();
    if plans.is_empty()
        && let Some((addr, members, _)) = groups.first()
    {
        plans.push(GroupPlan {
            addr: *addr,
            members: members.clone(),
            pages: Vec::new(),
        });
    }
    plans
}

/// Logs where a sent cast's time and CPU went, for operators and for
/// tuning: the reading of its pages (hash-checked, on a thread of its own
/// beside the sending), and the session from its request (`secs`) and the
/// sending thread's CPU (`cpu`).
fn log_sent(
    read: &ReadFigures,
    r: &v1::CastSendRequest,
    rep: &pagecast_multicast::SendReport,
    secs: f64,
    cpu: f64,
) {
    let gb = read.read as f64 * PAGE_SIZE as f64 / 1e9;
    tracing::info!(
        "cast of {} pages ({} withdrawn: no longer here when read) to {} receivers at {} \
         bit/s by {:?}: read in {:.2} s beside the sending ({:.2} CPU-s/GB reading and \
         hash-checking), ended {secs:.2} s after the request ({:.2} Gbit/s of pages; \
         receivers joined after {:.2} s, in their groups at {:.2} s, first page at {:.2} s, then \
         pages on the wire {:.2} s: \
         paced {:.2} s, waiting {:.2} s (for pages still being read {:.2} s), in socket calls \
         {:.2} s), \
         {:.2} CPU-s/GB on the sending thread; rate cut {} times for \
         loss (lowest {} bit/s), {} repair bytes",
        read.read,
        read.withdrawn,
        r.receivers.len(),
        r.rate_bps,
        rep.transport,
        read.secs,
        read.cpu / gb.max(1e-9),
        gb * 8.0 / secs.max(1e-9),
        rep.joined_s,
        rep.ready_s,
        rep.setup_s,
        rep.duration_s,
        rep.paced_s,
        rep.waited_s,
        rep.unread_s,
        rep.socket_s,
        cpu / gb.max(1e-9),
        rep.rate_cuts,
        rep.lowest_rate_bps,
        rep.bytes_repair + rep.bytes_unicast,
    );
}

/// Receives a cast into the job's arriving VMs.
pub fn cast_recv(
    agent: &Agent,
    job: &Job,
    r: &v1::CastRecvRequest,
) -> Result<v1::CastResult, AgentError> {
    let control = parse_addr(&r.control)?;
    let slots = job.slots();
    let mut cfg = ReceiverConfig::new(control, agent.cast_iface(), agent.name());
    cfg.silent_after = Duration::from_secs(10);
    cfg.job = r.job.clone();
    // Pages are checked in the domains of the VMs they may fill.
    let mut keys: Vec<ContentKey> = Vec::new();
    for s in &slots {
        if !keys.contains(s.key()) {
            keys.push(*s.key());
        }
    }
    if !keys.is_empty() {
        cfg.content_keys = keys;
    }
    let mut sink = SlotSink::new(slots);
    tracing::info!("joining the cast at {control}");
    let (t0, cpu0) = (std::time::Instant::now(), crate::sync::thread_cpu_s());
    let res = pagecast_multicast::receive(&cfg, agent.tls(), &mut sink, &|_, _| {});
    let (took, cpu) = (
        t0.elapsed().as_secs_f64(),
        crate::sync::thread_cpu_s() - cpu0,
    );
    let gb = sink.filled as f64 * PAGE_SIZE as f64 / 1e9;
    // From joining to the sender's start, then to the last page.
    let started = res.as_ref().map_or(0.0, |rep| took - rep.duration_s);
    tracing::info!(
        "cast received from {}: {} frames filled in {took:.2} s (the sender started after \
         {started:.2} s), {:.2} CPU-s/GB of frames on the receiving thread",
        r.control,
        sink.filled,
        cpu / gb.max(1e-9),
    );
    Ok(match res {
        Ok(rep) => v1::CastResult {
            ok: true,
            error: None,
            stats: Some(recv_stats(&rep)),
            frames_filled: sink.filled,
            bytes_sent: 0,
        },
        Err(e) => v1::CastResult {
            ok: false,
            error: Some(pagecast_proto::refusal(
                v1::RefusalCode::Unavailable,
                e.to_string(),
            )),
            frames_filled: sink.filled,
            ..Default::default()
        },
    })
}

/// Serves a rack-mate's fetch: the pages of `hashes` this host's VMs of
/// dedup domain `domain` hold.
pub fn serve_fetch(
    agent: &Agent,
    job: &Job,
    domain: &str,
    hashes: &[PageHash],
    send: &mut dyn FnMut(Resp) -> Result<(), AgentError>,
) -> Result<(), AgentError> {
    let key = agent.domain_key(domain)?;
    let mut page = [0u8; PAGE_SIZE];
    let (mut hs, mut data) = (Vec::new(), Vec::new());
    let mut stashed = false;
    // Each frame counted once sent, as the fetching side counts them:
    // hashes and pages.
    for h in hashes {
        let held = agent.copy(&key, h, &mut page);
        if held || job.take_stashed(&key, h, &mut page) {
            stashed |= !held;
            hs.extend_from_slice(h.as_bytes());
            data.extend_from_slice(&page);
            if hs.len() / 32 == PAGES_PER_FETCH_FRAME {
                let n = (hs.len() + data.len()) as u64;
                send(Resp::Pages(v1::PagesByHash {
                    hashes: std::mem::take(&mut hs).into(),
                    data: std::mem::take(&mut data).into(),
                }))?;
                ::metrics::counter!(crate::metrics::BYTES_SENT, "kind" => "fetch").increment(n);
                // The tests' failpoint, once per process.
                static SERVED: std::sync::atomic::AtomicBool =
                    std::sync::atomic::AtomicBool::new(false);
                if stashed && !SERVED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    pagecast_migrate::failpoint::hit(
                        pagecast_migrate::failpoint::Point::GatherServed,
                    )
                    .map_err(|e| AgentError::BadRequest(e.to_string()))?;
                }
            }
        }
    }
    if !hs.is_empty() {
        let n = (hs.len() + data.len()) as u64;
        send(Resp::Pages(v1::PagesByHash {
            hashes: hs.into(),
            data: data.into(),
        }))?;
        ::metrics::counter!(crate::metrics::BYTES_SENT, "kind" => "fetch").increment(n);
    }
    // The end: an empty frame.
    send(Resp::Pages(v1::PagesByHash::default()))
}

/// Does what a [`v1::FetchRequest`] asks: fetches pages from a rack-mate's
/// agent into the job's arriving VMs, or from a source's into this
/// intermediary's stash, or notes where the arriving VMs gather them.
pub fn fetch(agent: &Agent, job: &Job, r: &v1::FetchRequest) -> v1::FetchResult {
    let mut missing = Vec::new();
    let mut run = || -> Result<(u64, u64, u64), AgentError> {
        let hashes = hashes_of(&r.hashes)?;
        match v1::FetchMode::try_from(r.mode) {
            Ok(v1::FetchMode::IntoVms) => fetch_into_vms(agent, job, r, hashes),
            Ok(v1::FetchMode::IntoStash) => {
                let (kept, bytes, lacking) = fetch_into_stash(agent, job, r, &hashes)?;
                missing = lacking;
                Ok((kept, 0, bytes))
            }
            Ok(v1::FetchMode::GatherLater) => {
                parse_addr(&r.from)?;
                job.plan_gather(&r.from, &hashes)?;
                Ok((hashes.len() as u64, 0, 0))
            }
            Err(_) => Err(AgentError::BadRequest(format!(
                "fetch mode {} is not one this agent knows",
                r.mode
            ))),
        }
    };
    let mut out = v1::FetchResult::default();
    match run() {
        Ok((p, f, b)) => {
            out.pages = p;
            out.frames_filled = f;
            out.bytes = b;
        }
        Err(e) => out.error = Some(e.refusal()),
    }
    out.missing = packed::pack(&missing).into();
    out
}

/// Fetches pages from a source's agent into this intermediary's stash for
/// the job: pages kept, bytes received, and the contents the source did
/// not give.
fn fetch_into_stash(
    agent: &Agent,
    job: &Job,
    r: &v1::FetchRequest,
    hashes: &[PageHash],
) -> Result<(u64, u64, Vec<PageHash>), AgentError> {
    let key = agent.domain_key(&r.domain)?;
    let uses = gatherers_of(&r.gatherers, hashes)?;
    let mut ch = agent.connect_host(&r.from, "give pages to an intermediary")?;
    ch.set_read_timeout(Some(pagecast_migrate::REPLY_TIMEOUT))?;
    let at = (&r.from[..], &r.job[..]);
    let mut kept = 0u64;
    let mut err = None;
    let mut got = std::collections::HashSet::with_capacity(hashes.len());
    let bytes = fetch_pages_from(&mut ch, at, &r.domain, hashes, &mut |h, page| {
        if err.is_some() || key.hash_page(page) != h {
            return;
        }
        // Kept now or kept already: there for the destinations either way.
        let n = uses.get(&h).copied().unwrap_or(1);
        match job.stash(key, h, page, (agent.stash_room(), n)) {
            Ok(_) => {
                kept += 1;
                got.insert(h);
            }
            Err(e) => err = Some(e),
        }
        // The tests' failpoint, once per process.
        static KEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if kept == 1_024
            && !KEPT.swap(true, std::sync::atomic::Ordering::Relaxed)
            && let Err(e) =
                pagecast_migrate::failpoint::hit(pagecast_migrate::failpoint::Point::StashKept)
        {
            err = Some(AgentError::BadRequest(e.to_string()));
        }
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    tracing::info!(
        job = %r.job,
        from = %r.from,
        "kept {kept} pages for destinations to gather ({} MiB stashed here)",
        job.stash_bytes() >> 20
    );
    let missing = hashes
        .iter()
        .filter(|h| !got.contains(h))
        .copied()
        .collect();
    Ok((kept, bytes, missing))
}

/// How many VMs gather each of `hashes`, from a [`v1::FetchRequest`]'s
/// `gatherers` (one byte each, 1 to 255; empty: one each, and the map is
/// empty).
pub fn gatherers_of(b: &[u8], hashes: &[PageHash]) -> Result<HashMap<PageHash, u8>, AgentError> {
    if b.is_empty() {
        return Ok(HashMap::new());
    }
    if b.len() != hashes.len() {
        return Err(AgentError::BadRequest(format!(
            "{} gatherer counts for {} contents",
            b.len(),
            hashes.len()
        )));
    }
    if b.contains(&0) {
        return Err(AgentError::BadRequest(
            "a stashed content with no VM to gather it".into(),
        ));
    }
    let mut m = HashMap::with_capacity(hashes.len());
    for (h, &n) in hashes.iter().zip(b) {
        let e = m.entry(*h).or_insert(n);
        *e = (*e).max(n);
    }
    Ok(m)
}

/// Fetches pages from a rack-mate's agent into the job's arriving VMs.
fn fetch_into_vms(
    agent: &Agent,
    job: &Job,
    r: &v1::FetchRequest,
    hashes: Vec<PageHash>,
) -> Result<(u64, u64, u64), AgentError> {
    let addr = parse_addr(&r.from)?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|source| {
        AgentError::Connect {
            addr: r.from.clone(),
            source,
        }
    })?;
    let mut ch = agent.host_channel(stream, "serve pages to fetch")?;
    ch.set_read_timeout(Some(pagecast_migrate::REPLY_TIMEOUT))?;
    // The job's arriving VMs by dedup domain: each domain's pages are
    // asked for, checked and filled apart from the others'.
    let mut domains: Vec<(String, ContentKey, Vec<Arc<IncomingSlot>>)> = Vec::new();
    // Only the VMs that lack any of these pages: one that lacks none
    // may have been released and must not be held up at its
    // switchover by this fetch holding its memory.
    for s in job
        .slots()
        .into_iter()
        .filter(|s| hashes.iter().any(|h| s.wants(h)))
    {
        match domains.iter_mut().find(|d| d.1 == *s.key()) {
            Some(d) => d.2.push(s),
            None => domains.push((s.domain().to_owned(), *s.key(), vec![s])),
        }
    }
    let (mut pages, mut frames, mut bytes) = (0u64, 0u64, 0u64);
    for (domain, key, slots) in &domains {
        let wanted: Vec<PageHash> = if domains.len() == 1 {
            hashes.clone()
        } else {
            hashes
                .iter()
                .filter(|h| slots.iter().any(|s| s.wants(h)))
                .copied()
                .collect()
        };
        let at = (&r.from[..], &r.job[..]);
        let (mut p, mut f) = (0u64, 0u64);
        let mut failed = None;
        let b = fetch_pages_from(&mut ch, at, domain, &wanted, &mut |h, page| {
            if key.hash_page(page) != h {
                // A rack-mate's page that does not match its hash is not
                // used; the source sends it instead.
                return;
            }
            p += 1;
            for s in slots {
                match s.fill(&h, page) {
                    Ok(n) => f += n,
                    Err(e) => failed = Some(e),
                }
            }
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        pages += p;
        frames += f;
        bytes += b;
    }
    Ok((pages, frames, bytes))
}

/// Fetches the pages of `hashes` in dedup domain `domain` over `ch`,
/// handing each page to `got` with the content it was sent as (unchecked:
/// `got` checks it); returns the bytes received.
fn fetch_pages_from(
    ch: &mut pagecast_channel::Channel,
    (from, job): (&str, &str),
    domain: &str,
    hashes: &[PageHash],
    got: &mut dyn FnMut(PageHash, &Page),
) -> Result<u64, AgentError> {
    let mut bytes = 0u64;
    for chunk in hashes.chunks(HASHES_PER_FRAME) {
        ch.send(&v1::AgentRequest {
            body: Some(v1::agent_request::Body::FetchPages(v1::FetchPagesRequest {
                hashes: packed::pack(chunk).into(),
                domain: domain.to_owned(),
                job: job.to_owned(),
            })),
        })?;
        loop {
            let resp: v1::AgentResponse = ch.recv("fetched pages")?;
            let p = match resp.body {
                Some(Resp::Pages(p)) => p,
                Some(Resp::Error(e)) => {
                    return Err(AgentError::Remote {
                        addr: from.to_owned(),
                        code: v1::RefusalCode::try_from(e.code)
                            .unwrap_or(v1::RefusalCode::Unspecified),
                        message: e.message,
                    });
                }
                other => {
                    return Err(AgentError::Unexpected {
                        addr: from.to_owned(),
                        what: format!("{other:?}"),
                    });
                }
            };
            if p.hashes.is_empty() {
                break;
            }
            let n = p.hashes.len() / 32;
            if p.hashes.len() % 32 != 0 || p.data.len() != n * PAGE_SIZE {
                return Err(AgentError::BadRequest(
                    "fetched pages of the wrong size".into(),
                ));
            }
            bytes += (p.hashes.len() + p.data.len()) as u64;
            for i in 0..n {
                let h = PageHash::try_from(&p.hashes[i * 32..(i + 1) * 32]).expect("32");
                let page: &Page = p.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                    .try_into()
                    .expect("page");
                got(h, page);
            }
        }
    }
    Ok(bytes)
}

/// The distinct contents of a VM, from the content map, in frames.
pub fn vm_content(agent: &Agent, name: &str) -> Result<Vec<v1::VmContentPart>, AgentError> {
    let (hashes, memory, kind) = agent.vm_hashes(name)?;
    let rewrites = agent.vm_rewrite_rate(name)?;
    let frames = hashes.len() as u64;
    let nonzero = hashes.iter().filter(|h| !h.is_zero_page()).count() as u64;
    let mut distinct: Vec<PageHash> = hashes.into_iter().filter(|h| !h.is_zero_page()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let mut parts = Vec::new();
    let mut chunks = distinct.chunks(HASHES_PER_FRAME).peekable();
    loop {
        let chunk = chunks.next().unwrap_or(&[]);
        let last = chunks.peek().is_none();
        parts.push(v1::VmContentPart {
            hashes: packed::pack(chunk).into(),
            last,
            frames,
            nonzero_frames: nonzero,
            memory_bytes: memory,
            rewrite_pages_per_s: rewrites,
            kind: kind as i32,
        });
        if last {
            return Ok(parts);
        }
    }
}

/// The multicast interface of an agent listening on `listen`, unless given.
pub fn default_cast_iface(listen: &SocketAddr) -> Ipv4Addr {
    match listen.ip() {
        std::net::IpAddr::V4(v4) if !v4.is_unspecified() => v4,
        _ => Ipv4Addr::LOCALHOST,
    }
}

fn transport(t: pagecast_multicast::Transport) -> v1::CastTransport {
    match t {
        pagecast_multicast::Transport::Multicast => v1::CastTransport::Multicast,
        pagecast_multicast::Transport::Chain => v1::CastTransport::Chain,
    }
}

/// A sender's report as the control API carries it.
fn send_stats(r: &pagecast_multicast::SendReport) -> v1::CastStats {
    v1::CastStats {
        transport: transport(r.transport) as i32,
        pages: r.pages,
        bytes_first: r.bytes_first,
        bytes_repair: r.bytes_repair,
        bytes_unicast: r.bytes_unicast,
        bytes_control: r.bytes_control,
        bytes_heartbeat: r.bytes_heartbeat,
        nacks: r.nacks,
        repairs: r.repairs,
        coded_repairs: r.coded_repairs,
        datagrams: r.datagrams,
        duration_s: r.duration_s,
        ..v1::CastStats::default()
    }
}

/// A receiver's report as the control API carries it.
fn recv_stats(r: &pagecast_multicast::RecvReport) -> v1::CastStats {
    v1::CastStats {
        transport: transport(r.transport) as i32,
        pages: r.pages,
        pages_main: r.pages_main,
        pages_unicast: r.pages_unicast,
        bytes_received: r.bytes_received,
        joins: r.joins,
        leaves: r.leaves,
        duration_s: r.duration_s,
        ..v1::CastStats::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagecast_migrate::GatherSource;
    use std::time::Instant;

    /// An intermediary with a real host certificate of the CA in `dir`:
    /// with `pages` it serves the fetches asked of it from them; without,
    /// it takes the first ask and never answers (frozen after its
    /// handshake).
    fn intermediary(dir: &std::path::Path, name: &str, pages: Option<Vec<Page>>) -> String {
        let held: HashMap<PageHash, Page> = pages
            .iter()
            .flatten()
            .map(|p| (PageHash::of_page(p), *p))
            .collect();
        crate::test_hosts::peer(dir, name, move |mut ch| {
            if pages.is_none() {
                let _ = ch.recv::<v1::AgentRequest>("ask");
                return Some(ch);
            }
            while let Ok(v1::AgentRequest {
                body: Some(v1::agent_request::Body::FetchPages(r)),
            }) = ch.recv("ask")
            {
                let (mut hs, mut data) = (Vec::new(), Vec::new());
                for h in hashes_of(&r.hashes).unwrap() {
                    if let Some(p) = held.get(&h) {
                        hs.extend_from_slice(h.as_bytes());
                        data.extend_from_slice(p);
                    }
                }
                for body in [
                    v1::PagesByHash {
                        hashes: hs.into(),
                        data: data.into(),
                    },
                    v1::PagesByHash::default(),
                ] {
                    let _ = ch.send(&v1::AgentResponse {
                        body: Some(Resp::Pages(body)),
                    });
                }
            }
            None
        })
    }

    /// A post-copy gather asks every intermediary of a batch at once: the
    /// pages of a live one arrive at once while two frozen ones (after
    /// their handshakes) cost one reply timeout together, and once failed
    /// they are passed over. Before, they were asked one after another:
    /// the two frozen cost two reply timeouts (3 s here), and the live
    /// one's pages waited behind whichever came first.
    #[test]
    fn a_frozen_intermediary_holds_up_only_the_pages_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let tls = crate::test_hosts::tls(dir.path(), "h1");
        let pages: Vec<Page> = (1..=6u8).map(|i| [i; PAGE_SIZE]).collect();
        let hashes: Vec<PageHash> = pages.iter().map(PageHash::of_page).collect();
        let live = intermediary(dir.path(), "live", Some(pages[..2].to_vec()));
        let frozen = [
            intermediary(dir.path(), "frozen-1", None),
            intermediary(dir.path(), "frozen-2", None),
        ];
        let mut from = HashMap::new();
        for (i, h) in hashes.iter().enumerate() {
            let at = match i {
                0 | 1 => &live,
                2 | 3 => &frozen[0],
                _ => &frozen[1],
            };
            from.insert(*h, at.clone());
        }
        let mut g = FromIntermediaries::new(tls, "j", "", from);
        g.reply_timeout = Duration::from_millis(1500);
        let t = Instant::now();
        let mut arrived = Vec::new();
        g.fetch(&hashes, &mut |h, p| {
            assert_eq!(PageHash::of_page(p), h);
            arrived.push((h, t.elapsed()));
        })
        .unwrap();
        let took = t.elapsed();
        let mut got: Vec<PageHash> = arrived.iter().map(|a| a.0).collect();
        got.sort_unstable();
        let mut want = hashes[..2].to_vec();
        want.sort_unstable();
        assert_eq!(got, want);
        for (_, at) in &arrived {
            assert!(
                *at < Duration::from_secs(1),
                "a live page arrived at {at:?}"
            );
        }
        assert!(took >= g.reply_timeout, "{took:?}");
        assert!(
            took < g.reply_timeout + Duration::from_secs(1),
            "the batch took {took:?}"
        );
        // Asked again, the frozen ones are not waited for.
        let t = Instant::now();
        let mut again = 0;
        g.fetch(&hashes, &mut |_, _| again += 1).unwrap();
        assert_eq!(again, 2);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }

    #[test]
    fn packed_hashes_are_whole_and_bounded() {
        let hs: Vec<PageHash> = (0u8..3)
            .map(|i| PageHash::of_page(&[i; PAGE_SIZE]))
            .collect();
        let mut b = Vec::new();
        for h in &hs {
            b.extend_from_slice(h.as_bytes());
        }
        assert_eq!(hashes_of(&b).unwrap(), hs);
        assert!(hashes_of(&[]).unwrap().is_empty());
        let e = hashes_of(&b[..33]).unwrap_err();
        assert!(matches!(e, AgentError::BadRequest(_)), "{e}");
        let too_many = vec![0u8; pagecast_proto::MAX_CONTROL_FRAME_BYTES + 32];
        let e = hashes_of(&too_many).unwrap_err();
        assert!(matches!(e, AgentError::BadRequest(_)), "{e}");
    }

    /// The huge-page hint leaves a buffer as it was: small ones untouched,
    /// large ones written and read back whole.
    #[test]
    fn a_staging_buffer_advised_huge_holds_what_is_written() {
        let mut small: Vec<u8> = Vec::with_capacity(100);
        advise_huge(&mut small);
        small.extend_from_slice(&[7; 100]);
        assert_eq!(small, vec![7; 100]);
        let mut big: Vec<u8> = Vec::with_capacity(8 << 20);
        advise_huge(&mut big);
        for i in 0..(8 << 20) / PAGE_SIZE {
            big.extend_from_slice(&[(i % 251) as u8; PAGE_SIZE]);
        }
        assert_eq!(big.len(), 8 << 20);
        assert!(
            big.chunks(PAGE_SIZE)
                .enumerate()
                .all(|(i, p)| p.iter().all(|&b| b == (i % 251) as u8))
        );
    }

    /// Gatherer counts, over many random inputs: accepted only one per
    /// content and none zero; then every content has its count (the
    /// largest where a content is named twice).
    #[test]
    fn gatherer_counts_are_one_per_content_and_never_zero() {
        let hs: Vec<PageHash> = (0u8..6)
            .map(|i| PageHash::of_page(&[i % 5; PAGE_SIZE]))
            .collect();
        assert!(
            gatherers_of(&[], &hs).unwrap().is_empty(),
            "empty: one each"
        );
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2_000 {
            let len = (next() % 9) as usize;
            let b: Vec<u8> = (0..len).map(|_| (next() % 4) as u8).collect();
            match gatherers_of(&b, &hs) {
                Ok(m) if b.is_empty() => assert!(m.is_empty(), "empty: one each"),
                Ok(m) => {
                    assert_eq!(b.len(), hs.len(), "{b:?}");
                    assert!(!b.contains(&0), "{b:?}");
                    for (h, n) in hs.iter().zip(&b) {
                        assert!(m[h] >= *n && m[h] > 0, "{b:?}");
                    }
                    // The fifth and sixth name one content.
                    assert_eq!(m[&hs[5]], b[0].max(b[5]), "{b:?}");
                }
                Err(e) => {
                    assert!(b.len() != hs.len() || b.contains(&0), "{b:?}: {e}");
                    assert!(matches!(e, AgentError::BadRequest(_)), "{e}");
                }
            }
        }
    }
}
