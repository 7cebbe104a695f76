//! An in-memory cluster for tests: an index and agents that keep each VM
//! as the list of its frames' contents and carry out what a job asks, as a
//! real cluster would, without KVM or sockets. A migration holds when
//! asked, says what its destination lacks, waits for the go, then moves
//! the VM, counting what it had to send itself; casts and fetches fill
//! destinations. Failures can be injected: an agent that cannot be
//! reached, a destination that fails every migration into it. Every call
//! is logged in order, for tests that check the sequence of a job.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use pagecast_agent_api::{
    AgentApi, CastPending, ClientError, Migration, MigrationControl, MigrationEvent,
    VmContentAnswer,
};
use pagecast_pages::{PAGE_BYTES, PageHash, Sketch};
use pagecast_proto::v1;

use crate::view::{ClusterView, HostView, VmView};
use crate::{CoordError, IndexApi, lock};

/// What the fake cluster was asked, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// A host was cordoned (`on`) or its cordon lifted.
    Cordon {
        /// The host.
        host: String,
        /// Cordoned.
        on: bool,
    },
    /// A migration started.
    Migrate {
        /// The VM.
        vm: String,
        /// Its destination host.
        to: String,
        /// Held for the job.
        hold: bool,
        /// How it was asked to switch over.
        switchover: v1::SwitchoverMode,
        /// The rate it was paced to (0: unpaced).
        bandwidth_bps: u64,
    },
    /// A migration said what its destination lacks.
    Held {
        /// The VM.
        vm: String,
        /// Contents lacking.
        needs: usize,
    },
    /// A migration was released (or, `abort`, stopped).
    Go {
        /// The VM.
        vm: String,
        /// Stopped.
        abort: bool,
    },
    /// A migration ended.
    Ended {
        /// The VM.
        vm: String,
        /// It runs at its destination.
        ok: bool,
    },
    /// A cast started at a source.
    Cast {
        /// The source host.
        source: String,
        /// Its contents.
        contents: Vec<PageHash>,
        /// Its receivers.
        receivers: Vec<String>,
    },
    /// A destination fetched contents from a rack-mate.
    Fetch {
        /// The destination.
        host: String,
        /// The rack-mate.
        from: String,
        /// Contents.
        contents: usize,
    },
    /// A job was opened (or joined) at a host.
    JobOpen {
        /// The host.
        host: String,
        /// The job.
        job: String,
        /// Its peers there, each as `host:role`.
        peers: Vec<String>,
    },
    /// A job was closed at a host.
    JobClose {
        /// The host.
        host: String,
        /// The job.
        job: String,
    },
    /// A VM was cloned.
    Clone {
        /// The VM.
        vm: String,
        /// The clones' names.
        clones: Vec<String>,
    },
}

#[derive(Debug, Clone)]
struct FakeHost {
    name: String,
    index: u32,
    rack: String,
    link_bps: u64,
    capacity_bytes: u64,
    down: bool,
    refuses_incoming: bool,
    cordoned: bool,
}

#[derive(Debug, Clone)]
struct FakeVm {
    name: String,
    host: String,
    frames: Vec<PageHash>,
}

impl FakeVm {
    fn distinct(&self) -> Vec<PageHash> {
        let s: BTreeSet<PageHash> = self
            .frames
            .iter()
            .filter(|h| !h.is_zero_page())
            .copied()
            .collect();
        s.into_iter().collect()
    }
}

#[derive(Default)]
struct State {
    hosts: Vec<FakeHost>,
    vms: Vec<FakeVm>,
    /// Per host: contents casts and fetches brought there.
    filled: HashMap<String, HashSet<PageHash>>,
    /// Per migration id: the go it heard (None: none yet).
    gos: HashMap<u64, Option<bool>>,
    calls: Vec<Call>,
    /// Per host: the jobs open there (as an agent keeps them: a
    /// host-to-host request naming a job not open there is refused).
    jobs: HashMap<String, HashSet<String>>,
    /// Per source host: migrations running now, and the most at once.
    running: HashMap<String, usize>,
    most: HashMap<String, usize>,
    /// Milliseconds of pause per switchover under way at once (0: none).
    pause_per_switchover: f64,
    /// Switchovers under way now.
    switching: usize,
    /// Per host: how long its agent takes to answer a bookkeeping request
    /// (as one frozen until the request's deadline would).
    job_stalls: HashMap<String, Duration>,
}

impl State {
    fn job_open(&self, host: &str, job: &str) -> bool {
        self.jobs.get(host).is_some_and(|j| j.contains(job))
    }

    fn host_of_addr(&self, addr: &str) -> Result<&FakeHost, ClientError> {
        let h = self
            .hosts
            .iter()
            .find(|h| address(&h.name) == addr)
            .ok_or_else(|| ClientError::Connect {
                addr: addr.to_owned(),
                source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            })?;
        if h.down {
            return Err(ClientError::Connect {
                addr: addr.to_owned(),
                source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            });
        }
        Ok(h)
    }

    /// Contents `host` holds: its VMs' and what was brought there.
    fn holds(&self, host: &str) -> HashSet<PageHash> {
        let mut s: HashSet<PageHash> = self
            .vms
            .iter()
            .filter(|v| v.host == host)
            .flat_map(|v| v.frames.iter().copied())
            .filter(|h| !h.is_zero_page())
            .collect();
        if let Some(f) = self.filled.get(host) {
            s.extend(f.iter().copied());
        }
        s
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    next: AtomicU64,
}

/// An in-memory cluster: an [`IndexApi`] and an [`AgentApi`] at once.
#[derive(Clone)]
pub struct FakeCluster {
    s: Arc<Shared>,
}

impl Default for FakeCluster {
    fn default() -> Self {
        Self::new()
    }
}

/// The control address of `host`'s fake agent.
pub fn address(host: &str) -> String {
    format!("fake-agent:{host}")
}

impl FakeCluster {
    /// An empty cluster.
    pub fn new() -> Self {
        FakeCluster {
            s: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                next: AtomicU64::new(1),
            }),
        }
    }

    /// Adds host `name` in `rack` with a link of `link_bps` and room for
    /// `capacity_bytes` of VMs.
    pub fn host(self, name: &str, rack: &str, link_bps: u64, capacity_bytes: u64) -> Self {
        {
            let mut st = lock(&self.s.state);
            let index = st.hosts.len() as u32 + 1;
            st.hosts.push(FakeHost {
                name: name.into(),
                index,
                rack: rack.into(),
                link_bps,
                capacity_bytes,
                down: false,
                refuses_incoming: false,
                cordoned: false,
            });
        }
        self
    }

    /// Adds VM `name` on `host`, one content per frame.
    pub fn vm(self, host: &str, name: &str, frames: Vec<PageHash>) -> Self {
        lock(&self.s.state).vms.push(FakeVm {
            name: name.into(),
            host: host.into(),
            frames,
        });
        self
    }

    /// Makes `host`'s agent unreachable.
    pub fn down(&self, host: &str) {
        let mut st = lock(&self.s.state);
        if let Some(h) = st.hosts.iter_mut().find(|h| h.name == host) {
            h.down = true;
        }
    }

    /// Makes `host`'s agent take `d` to answer each bookkeeping request
    /// (a job's opening or closing, its VM list).
    pub fn stall_jobs(&self, host: &str, d: Duration) {
        lock(&self.s.state).job_stalls.insert(host.into(), d);
    }

    /// Waits out `agent`'s stall for a bookkeeping request.
    fn job_stall(&self, agent: &str) {
        let d = {
            let st = lock(&self.s.state);
            st.host_of_addr(agent)
                .ok()
                .and_then(|h| st.job_stalls.get(&h.name).copied())
        };
        if let Some(d) = d {
            std::thread::sleep(d);
        }
    }

    /// Makes `host` fail every migration into it (it refuses at the
    /// switchover, as a destination that died there would).
    pub fn refuse_incoming(&self, host: &str) {
        let mut st = lock(&self.s.state);
        if let Some(h) = st.hosts.iter_mut().find(|h| h.name == host) {
            h.refuses_incoming = true;
        }
    }

    /// Where VM `name` runs now.
    pub fn where_is(&self, name: &str) -> Option<String> {
        lock(&self.s.state)
            .vms
            .iter()
            .find(|v| v.name == name)
            .map(|v| v.host.clone())
    }

    /// The most migrations `host` ran at once as a source.
    pub fn most_at_once(&self, host: &str) -> usize {
        lock(&self.s.state).most.get(host).copied().unwrap_or(0)
    }

    /// Makes every switchover pause its VM `ms` for each switchover under
    /// way at the same time (its own included).
    pub fn pause_per_switchover(&self, ms: f64) {
        lock(&self.s.state).pause_per_switchover = ms;
    }

    /// The most migrations arriving at `host` at once.
    pub fn most_arriving(&self, host: &str) -> usize {
        lock(&self.s.state)
            .most
            .get(&format!("into {host}"))
            .copied()
            .unwrap_or(0)
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.s.state).calls.clone()
    }

    fn log(&self, c: Call) {
        lock(&self.s.state).calls.push(c);
    }
}

impl IndexApi for FakeCluster {
    fn cluster(&self) -> Result<ClusterView, CoordError> {
        let st = lock(&self.s.state);
        let mut hosts: Vec<HostView> = st
            .hosts
            .iter()
            .map(|h| HostView {
                name: h.name.clone(),
                index: h.index,
                address: address(&h.name),
                rack: h.rack.clone(),
                link_bps: h.link_bps,
                capacity_bytes: h.capacity_bytes,
                used_bytes: st
                    .vms
                    .iter()
                    .filter(|v| v.host == h.name)
                    .map(|v| v.frames.len() as u64 * PAGE_BYTES)
                    .sum(),
                vms: st
                    .vms
                    .iter()
                    .filter(|v| v.host == h.name)
                    .map(|v| v.name.clone())
                    .collect(),
                cordoned: h.cordoned,
            })
            .collect();
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        let mut vms: Vec<VmView> = st
            .vms
            .iter()
            .map(|v| VmView {
                name: v.name.clone(),
                host: v.host.clone(),
                frames: v.frames.len() as u64,
                nonzero_frames: v.frames.iter().filter(|h| !h.is_zero_page()).count() as u64,
                sketch: Sketch::of(v.distinct().iter()),
            })
            .collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(ClusterView { hosts, vms })
    }

    fn holders(&self, hashes: &[PageHash]) -> Result<Vec<(u32, PageHash)>, CoordError> {
        let st = lock(&self.s.state);
        let wanted: HashSet<&PageHash> = hashes.iter().collect();
        let mut out = Vec::new();
        for h in &st.hosts {
            let holds: HashSet<PageHash> = st
                .vms
                .iter()
                .filter(|v| v.host == h.name)
                .flat_map(|v| v.frames.iter().copied())
                .filter(|p| !p.is_zero_page() && wanted.contains(p))
                .collect();
            out.extend(holds.into_iter().map(|p| (h.index, p)));
        }
        Ok(out)
    }

    fn set_cordon(&self, name: &str, on: bool, _reason: &str) -> Result<(), CoordError> {
        let mut st = lock(&self.s.state);
        let Some(h) = st.hosts.iter_mut().find(|h| h.name == name) else {
            return Err(CoordError::Invalid(format!("unknown host {name}")));
        };
        h.cordoned = on;
        st.calls.push(Call::Cordon {
            host: name.to_owned(),
            on,
        });
        Ok(())
    }
}

/// A migration under way in the fake cluster.
struct FakeMigration {
    c: FakeCluster,
    id: u64,
    vm: String,
    from: String,
    to: String,
    req: v1::MigrateRequest,
    /// Events still to come before the result.
    script: Vec<MigrationEvent>,
    /// Contents the destination lacked when asked.
    needs: Vec<PageHash>,
    ended: bool,
    /// Why the destination refused it at once, if it did.
    refused: Option<String>,
}

struct FakeControl {
    c: FakeCluster,
    id: u64,
    vm: String,
}

impl MigrationControl for FakeControl {
    fn go(&self, abort: bool, _reason: &str) -> Result<(), ClientError> {
        let mut st = lock(&self.c.s.state);
        st.calls.push(Call::Go {
            vm: self.vm.clone(),
            abort,
        });
        st.gos.insert(self.id, Some(abort));
        self.c.s.changed.notify_all();
        Ok(())
    }
}

impl FakeMigration {
    /// Waits (up to 10 s) for a go; whether it says abort.
    fn wait_go(&self) -> Option<bool> {
        let mut st = lock(&self.c.s.state);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(Some(abort)) = st.gos.get(&self.id) {
                return Some(*abort);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            st = self
                .c
                .s
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The migration's end: the VM moves unless stopped or refused; what
    /// the destination still lacked went over the link.
    fn finish(&mut self) -> v1::MigrateResult {
        if let Some(why) = &self.refused {
            return failed(v1::RefusalCode::UnknownJob, why);
        }
        if self.req.hold {
            match self.wait_go() {
                Some(false) => {}
                Some(true) => return failed(v1::RefusalCode::Cancelled, "the job was stopped"),
                None => return failed(v1::RefusalCode::Unavailable, "no word from the job"),
            }
        } else {
            // Long enough for migrations of one source to overlap.
            std::thread::sleep(Duration::from_millis(30));
        }
        // Switchovers under way at once slow each other: each pauses its VM
        // for its share of the load it saw.
        let per = lock(&self.c.s.state).pause_per_switchover;
        let mut paused = 0.0;
        if per > 0.0 {
            lock(&self.c.s.state).switching += 1;
            std::thread::sleep(Duration::from_millis(40));
            let mut st = lock(&self.c.s.state);
            paused = per * st.switching as f64;
            st.switching -= 1;
        }
        let mut st = lock(&self.c.s.state);
        let refused = st
            .hosts
            .iter()
            .find(|h| h.name == self.to)
            .is_none_or(|h| h.down || h.refuses_incoming);
        if refused {
            return failed(
                v1::RefusalCode::Unavailable,
                &format!("destination {} failed", self.to),
            );
        }
        let there = st.holds(&self.to);
        let sent = self.needs.iter().filter(|h| !there.contains(h)).count() as u64;
        let v = st
            .vms
            .iter_mut()
            .find(|v| v.name == self.vm)
            .expect("a migrating VM exists");
        v.host = self.to.clone();
        let frames = v.frames.len() as u64;
        // Asked for post-copy, the VM resumes at its destination and the
        // pages it still lacks follow (here: a tenth of what was sent, a
        // third of them asked for by its guest).
        let postcopy = self.req.switchover == v1::SwitchoverMode::Postcopy as i32;
        v1::MigrateResult {
            ok: true,
            verified: true,
            bytes_sent: sent * PAGE_BYTES,
            pages_sent: sent,
            nonzero_pages: frames,
            kind: v1::VmKind::MicroVm as i32,
            postcopy,
            postcopy_pages: if postcopy { sent / 10 } else { 0 },
            postcopy_requested: if postcopy { sent / 30 } else { 0 },
            postcopy_ms: if postcopy { 12.5 } else { 0.0 },
            downtime_ms: paused,
            ..Default::default()
        }
    }
}

fn failed(code: v1::RefusalCode, why: &str) -> v1::MigrateResult {
    v1::MigrateResult {
        ok: false,
        error: Some(pagecast_proto::refusal(code, why)),
        kind: v1::VmKind::MicroVm as i32,
        ..Default::default()
    }
}

impl Migration for FakeMigration {
    fn next_event(&mut self) -> Result<MigrationEvent, ClientError> {
        if !self.script.is_empty() {
            let ev = self.script.remove(0);
            if let MigrationEvent::Held(needs, _) = &ev {
                self.c.log(Call::Held {
                    vm: self.vm.clone(),
                    needs: needs.len(),
                });
            }
            return Ok(ev);
        }
        if self.ended {
            return Err(ClientError::Unexpected {
                addr: address(&self.from),
                what: "a report after the result".into(),
            });
        }
        self.ended = true;
        let r = self.finish();
        {
            let mut st = lock(&self.c.s.state);
            for k in [self.from.clone(), format!("into {}", self.to)] {
                if let Some(n) = st.running.get_mut(&k) {
                    *n -= 1;
                }
            }
        }
        self.c.log(Call::Ended {
            vm: self.vm.clone(),
            ok: r.ok,
        });
        Ok(MigrationEvent::Result(r))
    }

    fn control(&self) -> Arc<dyn MigrationControl> {
        Arc::new(FakeControl {
            c: self.c.clone(),
            id: self.id,
            vm: self.vm.clone(),
        })
    }
}

/// A cast's result at its sender.
struct FakePending(v1::CastResult);

impl CastPending for FakePending {
    fn result(self: Box<Self>) -> Result<v1::CastResult, ClientError> {
        Ok(self.0)
    }
}

impl AgentApi for FakeCluster {
    fn vm_list(&self, agent: &str) -> Result<v1::VmList, ClientError> {
        self.job_stall(agent);
        let st = lock(&self.s.state);
        let h = st.host_of_addr(agent)?;
        Ok(v1::VmList {
            libvirt: String::new(),
            agent: h.name.clone(),
            vms: st
                .vms
                .iter()
                .filter(|v| v.host == h.name)
                .map(|v| v1::VmInfo {
                    name: v.name.clone(),
                    memory_bytes: v.frames.len() as u64 * PAGE_BYTES,
                    state: v1::HostedVmState::Running as i32,
                    kind: v1::VmKind::MicroVm as i32,
                    ..Default::default()
                })
                .collect(),
            content_entries: 0,
        })
    }

    fn vm_content(
        &self,
        agent: &str,
        vm: &str,
        _job: &str,
    ) -> Result<VmContentAnswer, ClientError> {
        let st = lock(&self.s.state);
        let h = st.host_of_addr(agent)?;
        let v = st
            .vms
            .iter()
            .find(|v| v.name == vm && v.host == h.name)
            .ok_or_else(|| ClientError::Refused {
                addr: agent.to_owned(),
                code: v1::RefusalCode::NotFound,
                message: format!("no VM named {vm:?} on this agent"),
            })?;
        Ok(VmContentAnswer {
            hashes: v.distinct(),
            frames: v.frames.len() as u64,
            nonzero_frames: v.frames.iter().filter(|h| !h.is_zero_page()).count() as u64,
            memory_bytes: v.frames.len() as u64 * PAGE_BYTES,
            rewrite_pages_per_s: 0.0,
            kind: v1::VmKind::MicroVm,
        })
    }

    fn migrate(
        &self,
        agent: &str,
        r: v1::MigrateRequest,
    ) -> Result<Box<dyn Migration>, ClientError> {
        let mut st = lock(&self.s.state);
        let from = st.host_of_addr(agent)?.name.clone();
        let to = st
            .hosts
            .iter()
            .find(|h| address(&h.name) == r.to)
            .map(|h| h.name.clone())
            .unwrap_or_default();
        let v = st
            .vms
            .iter()
            .find(|v| v.name == r.vm && v.host == from)
            .ok_or_else(|| ClientError::Refused {
                addr: agent.to_owned(),
                code: v1::RefusalCode::NotFound,
                message: format!("no VM named {:?} on this agent", r.vm),
            })?;
        let there = st.holds(&to);
        let distinct = v.distinct();
        let needs: Vec<PageHash> = distinct
            .iter()
            .filter(|h| r.no_local || !there.contains(h))
            .copied()
            .collect();
        let local = if r.no_local {
            0
        } else {
            v.frames.iter().filter(|h| there.contains(h)).count() as u64
        };
        let mut script = vec![MigrationEvent::Progress(v1::MigrateProgress {
            phase: v1::MigratePhase::Manifest as i32,
            ..Default::default()
        })];
        // The source opens the job; the destination refuses a job it was
        // not told of, before anything else.
        st.jobs
            .entry(from.clone())
            .or_default()
            .insert(r.job.clone());
        let refused =
            (!st.job_open(&to, &r.job)).then(|| format!("job {} is not open at {to}", r.job));
        if r.hold && refused.is_none() {
            script.push(MigrationEvent::Held(needs.clone(), local));
        }
        for k in [from.clone(), format!("into {to}")] {
            let n = st.running.entry(k.clone()).or_default();
            *n += 1;
            let n = *n;
            let most = st.most.entry(k).or_default();
            *most = (*most).max(n);
        }
        drop(st);
        let id = self.s.next.fetch_add(1, Ordering::Relaxed);
        self.log(Call::Migrate {
            vm: r.vm.clone(),
            to: to.clone(),
            hold: r.hold,
            switchover: v1::SwitchoverMode::try_from(r.switchover)
                .unwrap_or(v1::SwitchoverMode::Unspecified),
            bandwidth_bps: r.bandwidth_bps,
        });
        Ok(Box::new(FakeMigration {
            c: self.clone(),
            id,
            vm: r.vm.clone(),
            from,
            to,
            req: r,
            script,
            needs,
            ended: false,
            refused,
        }))
    }

    fn cast_send(
        &self,
        agent: &str,
        r: v1::CastSendRequest,
        _within: Duration,
    ) -> Result<(v1::CastOpen, Box<dyn CastPending>), ClientError> {
        let contents = pagecast_pages::packed::unpack(&r.hashes, usize::MAX).map_err(|e| {
            ClientError::Unexpected {
                addr: agent.to_owned(),
                what: e.to_string(),
            }
        })?;
        let mut st = lock(&self.s.state);
        let source = st.host_of_addr(agent)?.name.clone();
        for g in &r.groups {
            for m in &g.members {
                let f = st.filled.entry(m.clone()).or_default();
                f.extend(g.pages.iter().filter_map(|&p| contents.get(p as usize)));
            }
        }
        let bytes = contents.len() as u64 * PAGE_BYTES;
        st.calls.push(Call::Cast {
            source,
            contents,
            receivers: r.receivers.clone(),
        });
        let id = self.s.next.fetch_add(1, Ordering::Relaxed);
        Ok((
            v1::CastOpen {
                control: format!("fake-cast-{id}"),
                ..Default::default()
            },
            Box::new(FakePending(v1::CastResult {
                ok: true,
                bytes_sent: bytes,
                stats: Some(v1::CastStats {
                    bytes_first: bytes,
                    ..Default::default()
                }),
                ..Default::default()
            })),
        ))
    }

    fn cast_recv(
        &self,
        agent: &str,
        r: v1::CastRecvRequest,
        _within: Duration,
    ) -> Result<v1::CastResult, ClientError> {
        let st = lock(&self.s.state);
        let host = st.host_of_addr(agent)?.name.clone();
        if !st.job_open(&host, &r.job) {
            return Err(ClientError::Refused {
                addr: agent.to_owned(),
                code: v1::RefusalCode::UnknownJob,
                message: format!("job {} is not open at {host}", r.job),
            });
        }
        Ok(v1::CastResult {
            ok: true,
            ..Default::default()
        })
    }

    fn fetch(
        &self,
        agent: &str,
        r: v1::FetchRequest,
        _within: Duration,
    ) -> Result<v1::FetchResult, ClientError> {
        let hashes = pagecast_pages::packed::unpack(&r.hashes, usize::MAX).map_err(|e| {
            ClientError::Unexpected {
                addr: agent.to_owned(),
                what: e.to_string(),
            }
        })?;
        let mut st = lock(&self.s.state);
        let host = st.host_of_addr(agent)?.name.clone();
        let from = st.host_of_addr(&r.from)?.name.clone();
        for h in [&host, &from] {
            if !st.job_open(h, &r.job) {
                return Ok(v1::FetchResult {
                    error: Some(pagecast_proto::refusal(
                        v1::RefusalCode::UnknownJob,
                        format!("job {} is not open at {h}", r.job),
                    )),
                    ..Default::default()
                });
            }
        }
        let n = hashes.len() as u64;
        st.filled.entry(host.clone()).or_default().extend(hashes);
        st.calls.push(Call::Fetch {
            host,
            from,
            contents: n as usize,
        });
        Ok(v1::FetchResult {
            bytes: n * PAGE_BYTES,
            frames_filled: n,
            ..Default::default()
        })
    }

    fn clone_vm(
        &self,
        agent: &str,
        r: v1::CloneRequest,
        progress: &mut dyn FnMut(&v1::MigrateProgress),
    ) -> Result<v1::CloneResult, ClientError> {
        progress(&v1::MigrateProgress {
            phase: v1::MigratePhase::Cast as i32,
            ..Default::default()
        });
        let mut st = lock(&self.s.state);
        st.host_of_addr(agent)?;
        let v = st
            .vms
            .iter()
            .find(|v| v.name == r.vm)
            .cloned()
            .ok_or_else(|| ClientError::Refused {
                addr: agent.to_owned(),
                code: v1::RefusalCode::NotFound,
                message: format!("no VM named {:?}", r.vm),
            })?;
        let mut clones = Vec::new();
        for t in &r.targets {
            let host = st.host_of_addr(&t.addr)?.name.clone();
            if !st.job_open(&host, &r.job) {
                clones.push(v1::CloneOne {
                    name: t.name.clone(),
                    host: host.clone(),
                    error: Some(pagecast_proto::refusal(
                        v1::RefusalCode::UnknownJob,
                        format!("job {} is not open at {host}", r.job),
                    )),
                    ..Default::default()
                });
                continue;
            }
            st.vms.push(FakeVm {
                name: t.name.clone(),
                host: host.clone(),
                frames: v.frames.clone(),
            });
            clones.push(v1::CloneOne {
                name: t.name.clone(),
                host,
                ok: true,
                verified: true,
                ..Default::default()
            });
        }
        st.calls.push(Call::Clone {
            vm: r.vm.clone(),
            clones: clones.iter().map(|c| c.name.clone()).collect(),
        });
        Ok(v1::CloneResult {
            ok: clones.iter().all(|c| c.ok),
            clones,
            bytes_sent: v.distinct().len() as u64 * PAGE_BYTES,
            ..Default::default()
        })
    }

    fn cancel_job(&self, agent: &str, _job: &str) -> Result<bool, ClientError> {
        lock(&self.s.state).host_of_addr(agent)?;
        Ok(true)
    }

    fn open_job(&self, agent: &str, r: v1::JobOpen) -> Result<bool, ClientError> {
        self.job_stall(agent);
        let mut st = lock(&self.s.state);
        let host = st.host_of_addr(agent)?.name.clone();
        let newly = st
            .jobs
            .entry(host.clone())
            .or_default()
            .insert(r.job.clone());
        let peers = r
            .peers
            .iter()
            .map(|p| {
                let role = v1::JobRole::try_from(p.role).unwrap_or_default();
                format!("{}:{}", p.host, role.as_str_name())
            })
            .collect();
        st.calls.push(Call::JobOpen {
            host,
            job: r.job,
            peers,
        });
        Ok(newly)
    }

    fn close_job(&self, agent: &str, job: &str) -> Result<bool, ClientError> {
        self.job_stall(agent);
        let mut st = lock(&self.s.state);
        let host = st.host_of_addr(agent)?.name.clone();
        let was = st.jobs.get_mut(&host).is_some_and(|j| j.remove(job));
        st.calls.push(Call::JobClose {
            host,
            job: job.to_owned(),
        });
        Ok(was)
    }
}
