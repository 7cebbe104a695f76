//! Gang evacuation: plan from the index, move every VM off the source
//! hosts, each unique page leaving its source once.
//!
//! Three methods, each from the same starting state:
//!
//! - `pagecast`: content-aware placement (eviction time first, or bytes
//!   first); every migration is held after the destination filled what it
//!   holds; contents a rack-mate of the destination holds come from it;
//!   every remaining content leaves one source once, multicast to every
//!   destination that lacks it (unicast where one does); then each
//!   migration finishes (the rest, pre-copy rounds, switchover).
//! - `vmscatter`: VMScatter as published: content-blind placement,
//!   identical pages among the moving VMs merged and multicast once, no
//!   reuse of what destinations already hold (nor rack-mates).
//! - `precopy`: what a user runs today: each VM its own pre-copy migration,
//!   every non-zero page sent (zero pages skipped, as QEMU does), no reuse,
//!   at most `parallel` at a time per source host (KubeVirt's default is
//!   2); placement spreads VMs over the destinations with the most free
//!   memory first (as a resource scheduler does).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagecast_agent::client::{AgentClient, MigrationEvent, MigrationHandle};
use pagecast_channel::Tls;
use pagecast_index::client::IndexClient;
use pagecast_index::keys::shard_of;
use pagecast_pages::{PAGE_BYTES, PageHash, Sketch};
use pagecast_proto::v1;
use pagecast_scheduler::{
    Cluster, ContentSource, Evacuation, Host, HostIdx, Objective, Planner, Rack, Strategy, Vm,
    VmIdx,
};

use crate::report::{
    BytesByClass, CloneOutcome, CloneReport, EvacuationReport, Predicted, VmOutcome,
};
use crate::view::ClusterView;
use crate::{CoordError, Event};

/// How a job moves VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Content-aware placement, local fill, short haul, multicast.
    Pagecast,
    /// VMScatter as published.
    VmScatter,
    /// Per-VM pre-copy, no reuse.
    Precopy,
}

impl Method {
    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Method::Pagecast => "pagecast",
            Method::VmScatter => "vmscatter",
            Method::Precopy => "precopy",
        }
    }

    /// Parses [`Method::name`].
    pub fn parse(s: &str) -> Option<Self> {
        [Method::Pagecast, Method::VmScatter, Method::Precopy]
            .into_iter()
            .find(|m| m.name() == s)
    }
}

/// What to evacuate, and how.
#[derive(Debug, Clone)]
pub struct EvacuateSpec {
    /// Hosts to empty.
    pub from: Vec<String>,
    /// Hosts that may receive (empty: every other host with an agent).
    pub to: Vec<String>,
    /// How.
    pub method: Method,
    /// Migrations at once per source host (precopy).
    pub parallel: usize,
    /// Bits per second each source may send (None: its link rate from the
    /// index, unpaced if unknown).
    pub bandwidth_bps: Option<u64>,
    /// The network's MTU: predictions then count the frames' headers.
    pub mtu: Option<u32>,
    /// The network delivers every multicast datagram to every host (no
    /// IGMP snooping): casts then run one at a time.
    pub multicast_floods: bool,
    /// Downtime target per VM.
    pub max_downtime_ms: u32,
    /// What placement minimises first.
    pub objective: Objective,
    /// Plan only.
    pub dry_run: bool,
    /// The job's id (for `pagecast cancel`).
    pub job: String,
    /// How casts travel (UNSPECIFIED: multicast where every receiver
    /// hears it, else the TCP chain).
    pub transport: v1::CastTransport,
}

/// Most pages one cast session carries (the source stages them in memory).
/// Its request lists 32 bytes of hash and a page number per page, which
/// must fit a control frame ([`pagecast_proto::MAX_CONTROL_FRAME_BYTES`],
/// 4 MiB): 65,536 pages take about 2.3 MiB.
const CAST_CHUNK: usize = 65_536;

/// How long the placement search may refine a plan: each step re-plans the
/// transmission of every moving page (planning with up to 16 passes took
/// 10.8 s for 8 VMs of 512 MiB on two cores), so a large job keeps the best
/// plan found by then.
const REFINE_BUDGET: Duration = Duration::from_secs(1);

/// The exact content the planner reasons with: the moving VMs' distinct
/// contents from their agents, and which hosts hold them from the index.
struct ExactContent {
    vm_pages: HashMap<VmIdx, Vec<PageHash>>,
    sketches: Vec<Sketch>,
    held: HashMap<HostIdx, HashSet<PageHash>>,
    host_vms: HashMap<HostIdx, Vec<VmIdx>>,
}

impl ContentSource for ExactContent {
    fn vm_pages(&self, vm: VmIdx) -> Option<&[PageHash]> {
        self.vm_pages.get(&vm).map(Vec::as_slice)
    }
    fn vm_sketch(&self, vm: VmIdx) -> Sketch {
        match self.vm_pages.get(&vm) {
            Some(p) => Sketch::of(p.iter()),
            None => self.sketches[vm].clone(),
        }
    }
    fn host_holds(&self, host: HostIdx, pages: &[PageHash]) -> Vec<bool> {
        let set = self.held.get(&host);
        pages
            .iter()
            .map(|p| set.is_some_and(|s| s.contains(p)))
            .collect()
    }
    fn host_sketch(&self, host: HostIdx) -> Sketch {
        let mut s = Sketch::default();
        for &v in self.host_vms.get(&host).map(Vec::as_slice).unwrap_or(&[]) {
            s.merge(&self.sketches[v]);
        }
        s
    }
}

/// A VM that moves.
#[derive(Debug, Clone)]
struct Moving {
    name: String,
    from: String,
    to: String,
}

/// Everything decided before anything moves.
struct Prepared {
    view: ClusterView,
    moving: Vec<Moving>,
    predicted: Predicted,
    /// Who held the moving VMs' contents when the plan was made, from the
    /// index (a hint: every page used is hash-checked).
    held: HashMap<String, HashSet<PageHash>>,
}

/// Header bytes of `payload` bytes sent over the agents' TLS on TCP at
/// `mtu`: a TLS record (5 bytes of header, 16 of tag, 1 of type) per 16
/// KiB, and Ethernet, IPv4 and TCP with timestamps (66 bytes) per segment
/// of `mtu - 52` bytes.
fn tcp_headers(payload: u64, mtu: u32) -> u64 {
    let tls = payload as f64 * 22.0 / 16_384.0;
    let mss = f64::from(mtu.saturating_sub(52).max(1));
    let wire = (payload as f64 + tls) * (1.0 + 66.0 / mss);
    (wire - payload as f64) as u64
}

fn now_s(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Reads the cluster, checks the request, asks the agents what the moving
/// VMs hold and the index who holds it, and plans.
fn prepare(
    index: &[String],
    tls: &Tls,
    spec: &EvacuateSpec,
    on: &(dyn Fn(Event) + Sync),
) -> Result<Prepared, CoordError> {
    let mut ic = IndexClient::new(index, tls.clone())?;
    ic.timeout = Duration::from_secs(20);
    on(Event::Step("reading the cluster from the index".into()));
    let view = ClusterView::read(&mut ic)?;
    if spec.from.is_empty() {
        return Err(CoordError::Invalid(
            "name at least one host to evacuate".into(),
        ));
    }
    for h in &spec.from {
        match view.host(h) {
            None => return Err(CoordError::Invalid(format!("unknown host {h}"))),
            Some(x) if x.address.is_empty() => {
                return Err(CoordError::Invalid(format!(
                    "host {h} has no agent reporting to the index"
                )));
            }
            _ => {}
        }
    }
    let to: Vec<String> = if spec.to.is_empty() {
        view.hosts
            .iter()
            .filter(|h| !h.address.is_empty() && !spec.from.contains(&h.name))
            .map(|h| h.name.clone())
            .collect()
    } else {
        for h in &spec.to {
            match view.host(h) {
                None => return Err(CoordError::Invalid(format!("unknown host {h}"))),
                Some(x) if x.address.is_empty() => {
                    return Err(CoordError::Invalid(format!(
                        "host {h} has no agent reporting to the index"
                    )));
                }
                _ if spec.from.contains(h) => {
                    return Err(CoordError::Invalid(format!(
                        "--to names {h}, which is being evacuated"
                    )));
                }
                _ => {}
            }
        }
        spec.to.clone()
    };
    if to.is_empty() {
        return Err(CoordError::Invalid(
            "no destination host has an agent".into(),
        ));
    }

    // The model: every host, rack and running VM.
    let mut racks: Vec<String> = view.hosts.iter().map(|h| view.rack_of(&h.name)).collect();
    racks.sort();
    racks.dedup();
    let default_link = spec.bandwidth_bps.unwrap_or(10_000_000_000) as f64;
    let mut cluster = Cluster::default();
    for r in &racks {
        let uplink: f64 = view
            .hosts
            .iter()
            .filter(|h| view.rack_of(&h.name) == *r)
            .map(|h| {
                if h.link_bps > 0 {
                    h.link_bps as f64
                } else {
                    default_link
                }
            })
            .sum();
        cluster.racks.push(Rack {
            name: r.clone(),
            uplink_bps: uplink.max(1.0),
        });
    }
    let host_idx: HashMap<String, HostIdx> = view
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.name.clone(), i))
        .collect();
    for h in &view.hosts {
        let rack = racks
            .iter()
            .position(|r| *r == view.rack_of(&h.name))
            .expect("listed");
        let link = match spec.bandwidth_bps {
            Some(b) if spec.from.contains(&h.name) => b as f64,
            _ if h.link_bps > 0 => h.link_bps as f64,
            _ => default_link,
        };
        cluster.hosts.push(Host {
            name: h.name.clone(),
            rack,
            memory_bytes: if h.capacity_bytes > 0 {
                h.capacity_bytes
            } else {
                u64::MAX / 4
            },
            link_bps: link,
        });
    }
    let mut sketches = Vec::new();
    let mut host_vms: HashMap<HostIdx, Vec<VmIdx>> = HashMap::new();
    for v in &view.vms {
        let h = host_idx[&v.host];
        host_vms.entry(h).or_default().push(cluster.vms.len());
        cluster.vms.push(Vm {
            name: v.name.clone(),
            host: h,
            memory_bytes: v.memory_bytes(),
            nonzero_pages: v.nonzero_frames,
            rewrite_pages_per_s: 0.0,
        });
        sketches.push(v.sketch.clone());
    }
    let evac = Evacuation {
        from: spec.from.iter().map(|h| host_idx[h]).collect(),
        to: to.iter().map(|h| host_idx[h]).collect(),
        ..Evacuation::default()
    };
    let moving_idx: Vec<VmIdx> = (0..cluster.vms.len())
        .filter(|&v| evac.from.contains(&cluster.vms[v].host))
        .collect();

    // The moving VMs' exact contents, from their agents' content maps.
    on(Event::Step(format!(
        "asking the source agents what {} VM(s) hold",
        moving_idx.len()
    )));
    let contents: Vec<Result<pagecast_agent::client::VmContentAnswer, CoordError>> =
        std::thread::scope(|s| {
            let handles: Vec<_> = moving_idx
                .iter()
                .map(|&v| {
                    let vm = &cluster.vms[v];
                    let host = &view.host(&cluster.hosts[vm.host].name).expect("known").address;
                    let hname = cluster.hosts[vm.host].name.clone();
                    s.spawn(move || {
                        AgentClient::connect(host, tls)
                            .and_then(|c| c.vm_content(&vm.name))
                            .map_err(|e| match e {
                                pagecast_agent::AgentError::Remote {
                                    code: v1::RefusalCode::NotFound,
                                    ..
                                } => CoordError::Invalid(format!(
                                    "VM {} is not on {hname} any more (the index is behind); run again",
                                    vm.name
                                )),
                                other => CoordError::Agent {
                                    host: hname.clone(),
                                    source: other,
                                },
                            })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a content thread panicked"))
                .collect()
        });
    let mut vm_pages = HashMap::new();
    let mut qemu_vms = Vec::new();
    for (&v, c) in moving_idx.iter().zip(contents) {
        let c = c?;
        cluster.vms[v].memory_bytes = c.memory_bytes;
        cluster.vms[v].nonzero_pages = c.nonzero_frames;
        cluster.vms[v].rewrite_pages_per_s = c.rewrite_pages_per_s;
        if c.kind == "qemu" {
            qemu_vms.push(v);
        }
        vm_pages.insert(v, c.hashes);
    }
    // An adopted QEMU VM goes where the operator started its waiting QEMU
    // (adopted there with --incoming under the same name).
    let mut evac = evac;
    if !qemu_vms.is_empty() {
        on(Event::Step(format!(
            "finding the waiting QEMUs of {} QEMU VM(s)",
            qemu_vms.len()
        )));
        let mut waiting: HashMap<String, Vec<HostIdx>> = HashMap::new();
        for &d in &evac.to {
            let h = &cluster.hosts[d].name;
            let addr = &view.host(h).expect("known").address;
            let list = AgentClient::connect(addr, tls)
                .and_then(|c| c.vm_list())
                .map_err(|e| CoordError::Agent {
                    host: h.clone(),
                    source: e,
                })?;
            for v in list.vms {
                if v.kind == "qemu" && v.state == "incoming" {
                    waiting.entry(v.name).or_default().push(d);
                }
            }
        }
        for v in qemu_vms {
            let name = &cluster.vms[v].name;
            match waiting.get(name).map(Vec::as_slice) {
                Some([d]) => evac.pinned.push((v, *d)),
                Some(many) => {
                    return Err(CoordError::Invalid(format!(
                        "QEMU VM {name} has a waiting QEMU on {} destinations ({}): keep one",
                        many.len(),
                        many.iter()
                            .map(|&d| cluster.hosts[d].name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                None => {
                    return Err(CoordError::Invalid(format!(
                        "QEMU VM {name} has no waiting QEMU on any destination: start one with -incoming defer on the host it should go to and adopt it there with `pagecast vm adopt --incoming --name {name}` (docs/qemu.md)"
                    )));
                }
            }
        }
    }

    // Who holds those contents, from the index.
    on(Event::Step("asking the index who holds those pages".into()));
    let by_number: HashMap<u32, HostIdx> = view
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.index, i))
        .collect();
    let mut held: HashMap<HostIdx, HashSet<PageHash>> = HashMap::new();
    for (host, p) in who_holds(
        index,
        tls,
        vm_pages.values().flatten(),
        Duration::from_secs(20),
    )? {
        if let Some(&h) = by_number.get(&host) {
            held.entry(h).or_default().insert(p);
        }
    }
    let content = ExactContent {
        vm_pages,
        sketches,
        held,
        host_vms,
    };

    on(Event::Step(format!("planning ({})", spec.method.name())));
    let planner = Planner::new(&cluster, &evac, &content)?;
    let plan = match spec.method {
        Method::Pagecast => {
            let a = planner.place(Strategy::Pagecast)?;
            planner.refine_until(
                Strategy::Pagecast,
                a,
                spec.objective,
                16,
                Instant::now() + REFINE_BUDGET,
            )
        }
        Method::VmScatter => planner.plan(Strategy::VmScatter)?,
        Method::Precopy => {
            // Largest first, each to the destination with the most free
            // memory (a resource scheduler's spreading).
            let mut free = cluster.free_memory(planner.moving());
            let mut order: Vec<VmIdx> = planner.moving().to_vec();
            order.sort_by_key(|&v| std::cmp::Reverse(cluster.vms[v].memory_bytes));
            let mut a = pagecast_scheduler::Assignment::new();
            for v in order {
                let mem = cluster.vms[v].memory_bytes;
                if let Some(&(_, d)) = evac.pinned.iter().find(|p| p.0 == v) {
                    free[d] = free[d].saturating_sub(mem);
                    a.insert(v, d);
                    continue;
                }
                let best = evac
                    .to
                    .iter()
                    .copied()
                    .filter(|&d| free[d] >= mem)
                    .max_by_key(|&d| (free[d], std::cmp::Reverse(d)))
                    .ok_or_else(|| {
                        CoordError::Invalid(format!(
                            "VM {} ({} bytes) fits on no destination",
                            cluster.vms[v].name, mem
                        ))
                    })?;
                free[best] -= mem;
                a.insert(v, best);
            }
            planner.plan_for(Strategy::FirstFit, a)
        }
    };
    let moving: Vec<Moving> = plan
        .placement()
        .into_iter()
        .map(|(v, d)| Moving {
            name: cluster.vms[v].name.clone(),
            from: cluster.hosts[cluster.vms[v].host].name.clone(),
            to: cluster.hosts[d].name.clone(),
        })
        .collect();
    let cost = if spec.method == Method::Precopy {
        &plan.precopy
    } else {
        &plan.cost
    };
    // Headers: casts carry the pages (all of them for pre-copy go over
    // TCP), manifests and re-sent pages go over the agents' TLS.
    let header_bytes = spec.mtu.map_or(0, |mtu| {
        let tcp = cost.rewrite_bytes + cost.manifest_bytes;
        let pages = cost.source_total - tcp;
        if spec.method == Method::Precopy {
            tcp_headers(pages + tcp, mtu)
        } else {
            let per_page =
                pagecast_multicast::wire::link_bytes_per_page(mtu as usize) - PAGE_BYTES as f64;
            (pages as f64 / PAGE_BYTES as f64 * per_page) as u64 + tcp_headers(tcp, mtu)
        }
    });
    let predicted = Predicted {
        source_bytes: cost.source_total + header_bytes,
        header_bytes,
        rewrite_bytes: cost.rewrite_bytes,
        manifest_bytes: cost.manifest_bytes,
        core_bytes: cost.core_bytes,
        eviction_s: cost.eviction_s,
        bottleneck: cost.bottleneck.clone(),
        precopy_source_bytes: plan.precopy.source_total,
        placement: moving
            .iter()
            .map(|m| (m.name.clone(), m.to.clone()))
            .collect(),
    };
    drop(planner);
    let held = content
        .held
        .into_iter()
        .map(|(h, s)| (cluster.hosts[h].name.clone(), s))
        .collect();
    Ok(Prepared {
        view,
        moving,
        predicted,
        held,
    })
}

/// What one VM's worker thread reports.
enum Report {
    Held(usize, Vec<PageHash>, u64),
    Done(usize, v1::MigrateResult, f64),
    Failed(usize, String),
}

/// Runs one VM's migration on its own thread: starts it, forwards its
/// needs when held, waits for the go, reports its result.
#[allow(clippy::too_many_arguments)]
fn run_vm(
    i: usize,
    m: &Moving,
    src_addr: &str,
    req: v1::MigrateRequest,
    tls: &Tls,
    tx: mpsc::Sender<Report>,
    handles: &Mutex<HashMap<usize, MigrationHandle>>,
    on: &(dyn Fn(Event) + Sync),
    started: Instant,
) {
    let mut s = match AgentClient::connect(src_addr, tls).and_then(|c| c.start_migrate(req)) {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(Report::Failed(i, format!("{}: {e}", m.from)));
            return;
        }
    };
    handles
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(i, s.handle());
    loop {
        match s.next_event() {
            Ok(MigrationEvent::Progress(p)) => on(Event::Vm {
                name: m.name.clone(),
                phase: p.phase.clone(),
                bytes: p.bytes_sent,
                pages_local: p.pages_local,
            }),
            Ok(MigrationEvent::Held(needs, local)) => {
                on(Event::Vm {
                    name: m.name.clone(),
                    phase: "held".into(),
                    bytes: 0,
                    pages_local: local,
                });
                let _ = tx.send(Report::Held(i, needs, local));
            }
            Ok(MigrationEvent::Result(r)) => {
                on(Event::Vm {
                    name: m.name.clone(),
                    phase: if r.ok { "done".into() } else { "failed".into() },
                    bytes: r.bytes_sent,
                    pages_local: r.pages_local,
                });
                let _ = tx.send(Report::Done(i, r, now_s(started)));
                return;
            }
            Err(e) => {
                let _ = tx.send(Report::Failed(i, format!("{}: {e}", m.from)));
                return;
            }
        }
    }
}

/// Cast and fetch figures of a job.
#[derive(Default)]
struct Traffic {
    /// Per source: bytes its casts sent.
    cast_bytes: BTreeMap<String, u64>,
    multicast: u64,
    unicast: u64,
    repair: u64,
    short_haul: u64,
    core: u64,
    /// Per destination: frames filled by casts and by fetches.
    cast_frames: HashMap<String, u64>,
    fetch_frames: HashMap<String, u64>,
    errors: Vec<String>,
    /// Destinations a cast found dead or frozen: later casts leave them
    /// out (their migrations fail anyway), so one stuck host holds up each
    /// chain of casts once, not once per cast.
    dead: HashSet<String>,
}

/// One source's sends: per content, the destinations it goes to.
type SourcePlan = BTreeMap<String, Vec<(PageHash, Vec<String>)>>;

/// Plans the casts and fetches from the destinations' exact needs: each
/// content from one source, to every destination that lacks it; contents a
/// rack-mate of the destination holds (pagecast only) from that rack-mate.
fn plan_transfers(
    prep: &Prepared,
    needs: &HashMap<usize, Vec<PageHash>>,
    method: Method,
    held: &HashMap<String, HashSet<PageHash>>,
) -> (SourcePlan, BTreeMap<(String, String), Vec<PageHash>>) {
    // Hosts by number here: the sets below hold a page each.
    let mut names: Vec<&str> = Vec::new();
    for m in &prep.moving {
        for h in [m.to.as_str(), m.from.as_str()] {
            if !names.contains(&h) {
                names.push(h);
            }
        }
    }
    let num = |h: &str| -> usize { names.iter().position(|x| *x == h).expect("listed above") };
    let sources: HashSet<&str> = prep.moving.iter().map(|m| m.from.as_str()).collect();
    // Per destination: contents it lacks; per content, which moving VMs'
    // sources can send it.
    let mut dest_needs: BTreeMap<usize, HashSet<PageHash>> = BTreeMap::new();
    let mut senders: HashMap<PageHash, Vec<usize>> = HashMap::new();
    let mut order: Vec<usize> = needs.keys().copied().collect();
    order.sort_unstable();
    for i in order {
        let m = &prep.moving[i];
        let (d, s) = (num(&m.to), num(&m.from));
        let dn = dest_needs.entry(d).or_default();
        for h in &needs[&i] {
            dn.insert(*h);
            let v = senders.entry(*h).or_default();
            if !v.contains(&s) {
                v.push(s);
            }
        }
    }
    let mut fetches: BTreeMap<(String, String), Vec<PageHash>> = BTreeMap::new();
    if method == Method::Pagecast {
        for (&d, hs) in dest_needs.iter_mut() {
            let dname = names[d];
            let rack = prep.view.rack_of(dname);
            let mates: Vec<&str> = prep
                .view
                .hosts
                .iter()
                .filter(|h| {
                    h.name != dname
                        && !h.address.is_empty()
                        && !sources.contains(h.name.as_str())
                        && prep.view.rack_of(&h.name) == rack
                        && !h.rack.is_empty()
                })
                .map(|h| h.name.as_str())
                .collect();
            if mates.is_empty() {
                continue;
            }
            let mates: Vec<(&str, &HashSet<PageHash>)> = mates
                .into_iter()
                .filter_map(|m| held.get(m).map(|s| (m, s)))
                .collect();
            let mut sorted: Vec<PageHash> = hs.iter().copied().collect();
            sorted.sort_unstable();
            for h in sorted {
                if let Some((mate, _)) = mates.iter().find(|(_, s)| s.contains(&h)) {
                    fetches
                        .entry((dname.to_owned(), (*mate).to_owned()))
                        .or_default()
                        .push(h);
                    hs.remove(&h);
                }
            }
        }
    }
    // Each remaining content once, from the least loaded source that has
    // it, in content order (the plan is the same every time).
    let mut members: HashMap<PageHash, Vec<usize>> = HashMap::new();
    for (&d, hs) in &dest_needs {
        for h in hs {
            members.entry(*h).or_default().push(d);
        }
    }
    let mut contents: Vec<(PageHash, Vec<usize>)> = members.into_iter().collect();
    contents.sort_unstable_by_key(|c| c.0);
    let mut load: Vec<u64> = vec![0; names.len()];
    let mut sets: HashMap<Vec<usize>, Vec<String>> = HashMap::new();
    let mut plan: SourcePlan = BTreeMap::new();
    for (h, ds) in contents {
        let Some(cands) = senders.get(&h) else {
            continue;
        };
        let src = *cands
            .iter()
            .min_by_key(|&&s| (load[s], names[s]))
            .expect("a content someone needs has a sender");
        load[src] += ds.len() as u64;
        let set = sets
            .entry(ds)
            .or_insert_with_key(|ds| ds.iter().map(|&d| names[d].to_owned()).collect())
            .clone();
        plan.entry(names[src].to_owned())
            .or_default()
            .push((h, set));
    }
    (plan, fetches)
}

fn group_addr(job: &str, source: usize, group: usize) -> String {
    let j = job
        .bytes()
        .fold(7u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
    let x = ((j as usize + source * 17) % 200) + 20;
    let y = group % 250 + 1;
    let port = 40_000 + 2 * (group / 250) + 400 * (source % 50);
    format!("239.193.{x}.{y}:{port}")
}

/// Fewest pages a cast of its own carries: a source's sends to a set of
/// destinations smaller than this go out together in one cast (a cast's
/// set-up, its receivers joining and finishing, costs about as much as
/// sending this many pages at 1 Gbit/s).
const MIN_CAST_PAGES: usize = 2_048;

/// One cast: a source's sends to a set of destinations.
#[derive(Debug)]
struct CastTask {
    source: String,
    sends: Vec<(PageHash, Vec<String>)>,
    /// The hosts whose links its datagrams arrive on: its destinations,
    /// or, where the network floods multicast, every destination of the job.
    reaches: BTreeSet<String>,
    /// Its bits per second (None: unpaced).
    rate: Option<u64>,
    /// Its expected seconds at `rate` (pages when unpaced): the larger go
    /// first.
    weight: f64,
}

/// Splits every source's sends into casts by destination set, smaller
/// sets of a source merged into one cast, and gives each its rate: the
/// operator's `--bandwidth` if given, else the slower of the source's link
/// and its destinations' links, less 3% for the datagrams' headers (the
/// casts are scheduled so that no two feed one destination at once, see
/// [`schedule_casts`]).
fn cast_tasks(
    plan: &SourcePlan,
    link: &dyn Fn(&str) -> u64,
    bandwidth: Option<u64>,
    floods: bool,
) -> Vec<CastTask> {
    // On a flooding network every cast reaches every destination.
    let everyone: BTreeSet<String> = if floods {
        plan.values()
            .flat_map(|s| s.iter().flat_map(|(_, ds)| ds.iter().cloned()))
            .collect()
    } else {
        BTreeSet::new()
    };
    let mut tasks = Vec::new();
    for (src, sends) in plan {
        let mut by_set: BTreeMap<Vec<String>, Vec<(PageHash, Vec<String>)>> = BTreeMap::new();
        for (h, ds) in sends {
            let mut key = ds.clone();
            key.sort();
            by_set.entry(key).or_default().push((*h, ds.clone()));
        }
        let mut rest: Vec<(PageHash, Vec<String>)> = Vec::new();
        let mut own: Vec<Vec<(PageHash, Vec<String>)>> = Vec::new();
        for (_, s) in by_set {
            if s.len() < MIN_CAST_PAGES {
                rest.extend(s);
            } else {
                own.push(s);
            }
        }
        if !rest.is_empty() {
            own.push(rest);
        }
        for sends in own {
            let footprint: BTreeSet<String> = sends
                .iter()
                .flat_map(|(_, ds)| ds.iter().cloned())
                .collect();
            let rate = bandwidth.or_else(|| {
                let own = link(src);
                (own > 0).then(|| {
                    let slowest = footprint
                        .iter()
                        .map(|d| link(d))
                        .filter(|&l| l > 0)
                        .min()
                        .unwrap_or(own);
                    own.min(slowest) / 100 * 97
                })
            });
            let bits = sends.len() as f64 * PAGE_BYTES as f64 * 8.0;
            let weight = rate.map_or(sends.len() as f64, |r| bits / r.max(1) as f64);
            let reaches = if floods {
                everyone.clone()
            } else {
                footprint.clone()
            };
            tasks.push(CastTask {
                source: src.clone(),
                sends,
                reaches,
                rate,
                weight,
            });
        }
    }
    tasks
}

/// Runs `tasks` with `run`, as many at once as can be without two of them
/// sharing a source or a destination: a destination hears one source at a
/// time, so each cast may use its whole link (datagrams beyond a
/// destination's link are dropped there and come back as unicast repairs:
/// `pagecast evaluate` measured 600 packets dropped by the destinations'
/// shapers and 16-111 MiB of repairs with two sources casting to one
/// 1 Gbit/s destination at once). Whenever a cast ends, the longest
/// waiting ones that can start do.
fn schedule_casts(mut tasks: Vec<CastTask>, run: &(dyn Fn(usize, &CastTask) + Sync)) {
    tasks.sort_by(|a, b| b.weight.total_cmp(&a.weight));
    let mut pending: Vec<(usize, CastTask)> = tasks.into_iter().enumerate().collect();
    let (tx, rx) = mpsc::channel::<(usize, CastTask)>();
    std::thread::scope(|s| {
        let mut sources: HashSet<String> = HashSet::new();
        let mut dests: HashSet<String> = HashSet::new();
        let mut running = 0usize;
        loop {
            let mut i = 0;
            while i < pending.len() {
                let t = &pending[i].1;
                if sources.contains(&t.source) || t.reaches.iter().any(|d| dests.contains(d)) {
                    i += 1;
                    continue;
                }
                let (n, t) = pending.remove(i);
                sources.insert(t.source.clone());
                dests.extend(t.reaches.iter().cloned());
                running += 1;
                let tx = tx.clone();
                s.spawn(move || {
                    run(n, &t);
                    let _ = tx.send((n, t));
                });
            }
            if running == 0 {
                break;
            }
            let Ok((_, t)) = rx.recv() else { break };
            running -= 1;
            sources.remove(&t.source);
            for d in &t.reaches {
                dests.remove(d);
            }
        }
    });
}

/// Runs the casts of one source's task, chunk by chunk, and the
/// receivers' sides; adds to `t`. `cast_idx` keeps its groups' addresses
/// apart from other casts of the job.
#[allow(clippy::too_many_arguments)]
fn run_source_casts(
    prep: &Prepared,
    spec: &EvacuateSpec,
    tls: &Tls,
    cast_idx: usize,
    source: &str,
    sends: &[(PageHash, Vec<String>)],
    rate: Option<u64>,
    t: &Mutex<Traffic>,
    on: &(dyn Fn(Event) + Sync),
) {
    let addr = prep.view.host(source).expect("known").address.clone();
    let src_rack = prep.view.rack_of(source);
    for (ci, chunk) in sends.chunks(CAST_CHUNK).enumerate() {
        let dead = lock(t).dead.clone();
        let mut receivers: BTreeSet<String> = BTreeSet::new();
        let mut groups: BTreeMap<Vec<String>, Vec<&PageHash>> = BTreeMap::new();
        for (h, ds) in chunk {
            let ds: Vec<String> = ds.iter().filter(|d| !dead.contains(*d)).cloned().collect();
            if ds.is_empty() {
                continue;
            }
            receivers.extend(ds.iter().cloned());
            groups.entry(ds).or_default().push(h);
        }
        if receivers.is_empty() {
            continue;
        }
        let chunk_pages: usize = groups.values().map(Vec::len).sum();
        let receivers: Vec<String> = receivers.into_iter().collect();
        // Largest groups first: the most shared pages go out first. The
        // session's pages are numbered group by group, so each group is
        // one range of page numbers (the receivers' page lists stay small).
        let mut by_group: Vec<(Vec<String>, Vec<&PageHash>)> = groups.into_iter().collect();
        by_group.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(b.1.len().cmp(&a.1.len())));
        let mut hashes = Vec::with_capacity(chunk.len() * 32);
        let mut glist: Vec<(Vec<String>, Vec<u32>)> = Vec::with_capacity(by_group.len());
        let mut next = 0u32;
        for (members, hs) in by_group {
            let first = next;
            for h in &hs {
                hashes.extend_from_slice(h.as_bytes());
            }
            next += hs.len() as u32;
            glist.push((members, (first..next).collect()));
        }
        let group_pages: Vec<(Vec<String>, usize)> =
            glist.iter().map(|(m, p)| (m.clone(), p.len())).collect();
        let req = v1::CastSendRequest {
            job: spec.job.clone(),
            hashes: hashes.into(),
            groups: glist
                .into_iter()
                .enumerate()
                .map(|(g, (members, pages))| v1::JobCastGroup {
                    members,
                    pages,
                    addr: group_addr(&spec.job, cast_idx * 8 + ci % 8, g),
                })
                .collect(),
            receivers: receivers.clone(),
            rate_bps: rate.unwrap_or(0),
            transport: spec.transport as i32,
        };
        on(Event::Step(format!(
            "{source}: casting {chunk_pages} pages to {}",
            receivers.join(", ")
        )));
        // How long the cast may take: its bytes at the source's rate (1
        // Gbit/s if unknown), doubled, plus set-up; an agent silent past
        // that is frozen.
        let bytes = chunk_pages as f64 * PAGE_BYTES as f64 * receivers.len() as f64;
        let expect = Duration::from_secs_f64(
            bytes * 8.0 / rate.unwrap_or(1_000_000_000).max(1) as f64 * 2.0 + 30.0,
        );
        let opened = AgentClient::connect(&addr, tls)
            .and_then(|c| c.with_answer_timeout(expect))
            .and_then(|c| c.cast_send(req));
        let (open, wait) = match opened {
            Ok(x) => x,
            Err(e) => {
                lock(t).errors.push(format!("cast from {source}: {e}"));
                return;
            }
        };
        // Receivers answer when the cast ends for them; one that hangs
        // must not hold the job, so they answer on a channel and are given
        // a grace period once the sender is done.
        let (rtx, rrx) = mpsc::channel::<(String, Result<v1::CastResult, String>)>();
        for r in &receivers {
            let raddr = prep.view.host(r).expect("known").address.clone();
            let control = open.control.clone();
            let job = spec.job.clone();
            let (rtx, tls, r) = (rtx.clone(), tls.clone(), r.clone());
            std::thread::spawn(move || {
                let res = AgentClient::connect(&raddr, &tls)
                    .and_then(|c| c.with_answer_timeout(expect))
                    .and_then(|c| c.cast_recv(v1::CastRecvRequest { job, control }))
                    .map_err(|e| e.to_string());
                let _ = rtx.send((r, res));
            });
        }
        drop(rtx);
        let sent = wait.result();
        let mut results = Vec::new();
        let grace = Instant::now() + Duration::from_secs(15);
        while results.len() < receivers.len() {
            let left = grace.saturating_duration_since(Instant::now());
            match rrx.recv_timeout(left) {
                Ok(x) => results.push(x),
                Err(_) => break,
            }
        }
        let mut tr = lock(t);
        for r in &receivers {
            if !results.iter().any(|(x, _)| x == r) {
                tr.errors
                    .push(format!("cast into {r}: its agent did not answer (frozen?)"));
                tr.dead.insert(r.clone());
            }
        }
        for (r, res) in results {
            match res {
                Ok(c) if c.ok => {
                    *tr.cast_frames.entry(r).or_default() += c.frames_filled;
                }
                Ok(c) => {
                    *tr.cast_frames.entry(r.clone()).or_default() += c.frames_filled;
                    tr.errors.push(format!("cast into {r}: {}", c.error));
                }
                Err(e) => {
                    tr.errors.push(format!("cast into {r}: {e}"));
                    tr.dead.insert(r);
                }
            }
        }
        match sent {
            Ok(c) => {
                *tr.cast_bytes.entry(source.to_owned()).or_default() += c.bytes_sent;
                let rep: serde_json::Value =
                    serde_json::from_str(&c.report).unwrap_or(serde_json::Value::Null);
                let num = |k: &str| rep[k].as_u64().unwrap_or(0);
                let first = num("bytes_first");
                let other = num("bytes_heartbeat") + num("bytes_control");
                let repair = num("bytes_repair") + num("bytes_unicast");
                let pages: usize = group_pages.iter().map(|g| g.1).sum::<usize>().max(1);
                for (members, n) in &group_pages {
                    let share = first as f64 * *n as f64 / pages as f64;
                    if members.len() > 1 {
                        tr.multicast += share as u64;
                    } else {
                        tr.unicast += share as u64;
                    }
                    let racks: BTreeSet<String> = members
                        .iter()
                        .map(|m| prep.view.rack_of(m))
                        .filter(|r| *r != src_rack)
                        .collect();
                    tr.core += (share * racks.len() as f64) as u64;
                }
                tr.unicast += other;
                tr.repair += repair;
                if !c.ok {
                    tr.errors.push(format!("cast from {source}: {}", c.error));
                }
            }
            Err(e) => tr.errors.push(format!("cast from {source}: {e}")),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Evacuates `spec.from`. Returns the report (with `ok` false if any VM
/// failed: each failed VM still runs at its source, unless in doubt).
/// `stop` set meanwhile (Ctrl-C) aborts every VM not yet switched over.
pub fn evacuate(
    index: &[String],
    tls: &Tls,
    spec: &EvacuateSpec,
    on: &(dyn Fn(Event) + Sync),
    stop: &AtomicBool,
) -> Result<EvacuationReport, CoordError> {
    let started = Instant::now();
    let prep = prepare(index, tls, spec, on)?;
    let mut report = EvacuationReport {
        job: spec.job.clone(),
        strategy: spec.method.name().into(),
        dry_run: spec.dry_run,
        predicted: prep.predicted.clone(),
        ..Default::default()
    };
    report.vms = prep
        .moving
        .iter()
        .map(|m| VmOutcome {
            name: m.name.clone(),
            from: m.from.clone(),
            to: m.to.clone(),
            ..Default::default()
        })
        .collect();
    if spec.dry_run || prep.moving.is_empty() {
        // A plan was made (or there was nothing to move).
        report.ok = true;
        report.total_s = now_s(started);
        return Ok(report);
    }
    let held = spec.method != Method::Precopy;
    let (tx, rx) = mpsc::channel::<Report>();
    let handles: Mutex<HashMap<usize, MigrationHandle>> = Mutex::new(HashMap::new());
    let traffic = Mutex::new(Traffic::default());
    let n = prep.moving.len();
    let mut results: HashMap<usize, (v1::MigrateResult, f64)> = HashMap::new();
    let mut failures: HashMap<usize, String> = HashMap::new();
    let mut local: HashMap<usize, u64> = HashMap::new();
    // A source's link is shared by its migrations running at once: each
    // gets its share of the source's rate (--bandwidth, or the link rate
    // its agent reported; unpaced if neither is known).
    let mut per_source: HashMap<&str, u64> = HashMap::new();
    for m in &prep.moving {
        *per_source.entry(m.from.as_str()).or_default() += 1;
    }
    let share = |m: &Moving| -> u64 {
        let rate = spec
            .bandwidth_bps
            .or_else(|| {
                let l = prep.view.host(&m.from).map_or(0, |h| h.link_bps);
                (l > 0).then_some(l)
            })
            .unwrap_or(0);
        let at_once = if held {
            per_source[m.from.as_str()]
        } else {
            (spec.parallel.max(1) as u64).min(per_source[m.from.as_str()])
        };
        rate / at_once.max(1)
    };
    let request = |m: &Moving| v1::MigrateRequest {
        vm: m.name.clone(),
        to: prep.view.host(&m.to).expect("known").address.clone(),
        bandwidth_bps: share(m),
        max_downtime_ms: spec.max_downtime_ms,
        verify_full: false,
        job: spec.job.clone(),
        hold: held,
        no_local: spec.method != Method::Pagecast,
        per_frame: spec.method == Method::Precopy,
        ..Default::default()
    };
    std::thread::scope(|s| {
        if held {
            // 1. Every migration starts and holds once its destination has
            //    filled what it holds.
            on(Event::Step(format!(
                "starting {n} migrations (held until the shared pages are sent)"
            )));
            for (i, m) in prep.moving.iter().enumerate() {
                let tx = tx.clone();
                let (handles, req) = (&handles, request(m));
                let src = prep.view.host(&m.from).expect("known").address.clone();
                s.spawn(move || run_vm(i, m, &src, req, tls, tx, handles, on, started));
            }
            let mut needs: HashMap<usize, Vec<PageHash>> = HashMap::new();
            while needs.len() + failures.len() + results.len() < n {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(Report::Held(i, h, l)) => {
                        local.insert(i, l);
                        needs.insert(i, h);
                    }
                    Ok(Report::Done(i, r, t)) => {
                        results.insert(i, (r, t));
                    }
                    Ok(Report::Failed(i, e)) => {
                        failures.insert(i, e);
                    }
                    Err(_) => {}
                }
            }
            if !stop.load(Ordering::Relaxed) {
                // 2. Casts and fetches fill the held migrations' memory.
                // Rack-mates that can serve a destination's needs: the
                // index's answer of a moment ago, asked when planning.
                let (plan, fetches) = plan_transfers(&prep, &needs, spec.method, &prep.held);
                let link = |h: &str| prep.view.host(h).map_or(0, |h| h.link_bps);
                let tasks = cast_tasks(&plan, &link, spec.bandwidth_bps, spec.multicast_floods);
                std::thread::scope(|s2| {
                    let (p, tr) = (&prep, &traffic);
                    s2.spawn(move || {
                        schedule_casts(tasks, &|n, t| {
                            run_source_casts(p, spec, tls, n, &t.source, &t.sends, t.rate, tr, on)
                        })
                    });
                    for ((d, mate), hs) in &fetches {
                        let (prep, traffic) = (&prep, &traffic);
                        s2.spawn(move || {
                            on(Event::Step(format!(
                                "{d}: fetching {} pages from rack-mate {mate}",
                                hs.len()
                            )));
                            let daddr = &prep.view.host(d).expect("known").address;
                            let maddr = &prep.view.host(mate).expect("known").address;
                            let expect = Duration::from_secs(30 + hs.len() as u64 / 2_000);
                            let r = AgentClient::connect(daddr, tls)
                                .and_then(|c| c.with_answer_timeout(expect))
                                .and_then(|c| {
                                    c.fetch(v1::FetchRequest {
                                        job: spec.job.clone(),
                                        from: maddr.clone(),
                                        hashes: pagecast_pages::packed::pack(hs).into(),
                                    })
                                });
                            let mut t = lock(traffic);
                            match r {
                                Ok(f) => {
                                    t.short_haul += f.bytes;
                                    *t.fetch_frames.entry(d.clone()).or_default() +=
                                        f.frames_filled;
                                    if !f.error.is_empty() {
                                        t.errors.push(format!("fetch into {d}: {}", f.error));
                                    }
                                }
                                Err(e) => t.errors.push(format!("fetch into {d}: {e}")),
                            }
                        });
                    }
                });
            }
            // 3. Go (or, stopped, give up).
            let stopped = stop.load(Ordering::Relaxed);
            for (_, h) in lock(&handles).iter() {
                let _ = if stopped {
                    h.go(true, "the job was stopped")
                } else {
                    h.go(false, "")
                };
            }
            on(Event::Step("finishing the migrations".into()));
        } else {
            // Per-VM pre-copy, `parallel` at a time per source.
            let mut queues: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            for (i, m) in prep.moving.iter().enumerate() {
                queues.entry(m.from.clone()).or_default().push(i);
            }
            for (src, q) in queues {
                let per = spec.parallel.max(1);
                let q = Arc::new(Mutex::new(q));
                for _ in 0..per {
                    let q = q.clone();
                    let tx = tx.clone();
                    let (prep, handles, src) = (&prep, &handles, src.clone());
                    let request = &request;
                    s.spawn(move || {
                        let addr = prep.view.host(&src).expect("known").address.clone();
                        loop {
                            if stop.load(Ordering::Relaxed) {
                                return;
                            }
                            let Some(i) = lock(&q).pop() else {
                                return;
                            };
                            let (itx, irx) = mpsc::channel();
                            let m = &prep.moving[i];
                            run_vm(i, m, &addr, request(m), tls, itx, handles, on, started);
                            for r in irx.try_iter() {
                                let _ = tx.send(r);
                            }
                        }
                    });
                }
            }
        }
        drop(tx);
        // Results, and on a stop, aborts for migrations still running.
        let mut aborted = false;
        loop {
            if stop.load(Ordering::Relaxed) && !aborted {
                aborted = true;
                for (_, h) in lock(&handles).iter() {
                    let _ = h.go(true, "the job was stopped");
                }
            }
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Report::Done(i, r, t)) => {
                    results.insert(i, (r, t));
                }
                Ok(Report::Failed(i, e)) => {
                    failures.insert(i, e);
                }
                Ok(Report::Held(..)) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    });

    // The report.
    let t = traffic.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut per_dest_vms: HashMap<String, u64> = HashMap::new();
    for m in &prep.moving {
        *per_dest_vms.entry(m.to.clone()).or_default() += 1;
    }
    let mut eviction: f64 = 0.0;
    let mut all_ok = true;
    for (i, o) in report.vms.iter_mut().enumerate() {
        let m = &prep.moving[i];
        let k = per_dest_vms[&m.to].max(1);
        o.pages_short_haul = t.fetch_frames.get(&m.to).copied().unwrap_or(0) / k;
        o.pages_cast = t.cast_frames.get(&m.to).copied().unwrap_or(0) / k;
        if let Some((r, at)) = results.get(&i) {
            o.ok = r.ok;
            o.verified = r.ok && r.verified;
            o.kind = if r.kind.is_empty() {
                "micro-vm".into()
            } else {
                r.kind.clone()
            };
            o.downtime_ms = r.downtime_ms;
            o.bytes_sent = r.bytes_sent;
            o.pages_local = local.get(&i).copied().unwrap_or(r.pages_local);
            o.error = r.error.clone();
            o.in_doubt = r.in_doubt;
            *report.bytes_by_source.entry(m.from.clone()).or_default() += r.bytes_sent;
            if r.ok {
                eviction = eviction.max(*at);
            }
            report.bytes_by_class.unicast += r.bytes_sent;
            if prep.view.rack_of(&m.from) != prep.view.rack_of(&m.to) {
                report.core_bytes += r.bytes_sent;
            }
        } else if let Some(e) = failures.get(&i) {
            o.error = e.clone();
        } else {
            o.error = "stopped before it started".into();
        }
        all_ok &= o.ok && (o.verified || o.kind == "qemu");
    }
    for (src, b) in &t.cast_bytes {
        *report.bytes_by_source.entry(src.clone()).or_default() += b;
    }
    report.bytes_by_class = BytesByClass {
        multicast: t.multicast,
        unicast: report.bytes_by_class.unicast + t.unicast,
        short_haul: t.short_haul,
        repair: t.repair,
    };
    report.core_bytes += t.core;
    report.source_bytes = report.bytes_by_source.values().sum();
    report.eviction_s = eviction;
    report.total_s = now_s(started);
    report.ok = all_ok;
    if !t.errors.is_empty() {
        on(Event::Step(format!(
            "some pages travelled in the migrations instead: {}",
            t.errors.join("; ")
        )));
    }
    if stop.load(Ordering::Relaxed) && !all_ok {
        on(Event::Step(
            "stopped: VMs that had not switched over run at their sources".into(),
        ));
    }
    Ok(report)
}

/// `(host number, content)` for every host the index lists as holding one
/// of `hashes`. Every shard is asked at once, each from any replica's
/// applied state: who holds what is a hint (every page used is
/// hash-checked), and a linearizable read per 16,384 hashes costs seconds
/// at a million pages.
fn who_holds<'a>(
    index: &[String],
    tls: &Tls,
    hashes: impl Iterator<Item = &'a PageHash>,
    timeout: Duration,
) -> Result<Vec<(u32, PageHash)>, CoordError> {
    let mut all: Vec<PageHash> = hashes.copied().collect();
    all.sort_unstable();
    all.dedup();
    let mut c = IndexClient::new(index, tls.clone())?;
    c.timeout = timeout;
    let shards = c.shards()?;
    let mut by_shard: Vec<Vec<PageHash>> = vec![Vec::new(); shards as usize];
    for h in &all {
        by_shard[shard_of(h, shards) as usize].push(*h);
    }
    let per_shard: Vec<Result<Vec<(u32, PageHash)>, CoordError>> = std::thread::scope(|sc| {
        let handles: Vec<_> = by_shard
            .iter()
            .enumerate()
            .map(|(s, hs)| {
                sc.spawn(move || -> Result<Vec<(u32, PageHash)>, CoordError> {
                    let mut c = IndexClient::new(index, tls.clone())?;
                    c.timeout = timeout;
                    let mut out = Vec::new();
                    for chunk in hs.chunks(16_384) {
                        let l = c.lookup(s as u32, chunk, &[], true)?;
                        for (i, host) in l.hash_index.iter().zip(&l.host) {
                            if let Some(p) = chunk.get(*i as usize) {
                                out.push((*host, *p));
                            }
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a lookup thread panicked"))
            .collect()
    });
    let mut out = Vec::new();
    for r in per_shard {
        out.extend(r?);
    }
    Ok(out)
}

/// What to clone, where, and how.
#[derive(Debug, Clone)]
pub struct CloneSpec {
    /// The VM.
    pub vm: String,
    /// Hosts to clone it to.
    pub to: Vec<String>,
    /// Clone names: `{vm}` and `{host}` are replaced (default
    /// `{vm}-{host}`).
    pub names: String,
    /// Bits per second the source may send.
    pub bandwidth_bps: Option<u64>,
    /// Longest pause of the source VM.
    pub max_downtime_ms: u32,
    /// The job's id.
    pub job: String,
}

/// Clones a running VM to several hosts, live (see `pagecast clone`).
pub fn clone(
    index: &[String],
    tls: &Tls,
    spec: &CloneSpec,
    on: &(dyn Fn(Event) + Sync),
) -> Result<CloneReport, CoordError> {
    let started = Instant::now();
    let mut ic = IndexClient::new(index, tls.clone())?;
    ic.timeout = Duration::from_secs(20);
    on(Event::Step("reading the cluster from the index".into()));
    let view = ClusterView::read(&mut ic)?;
    let vm = view
        .vm(&spec.vm)
        .ok_or_else(|| CoordError::Invalid(format!("no running VM {} in the index", spec.vm)))?
        .clone();
    let source = view.host(&vm.host).expect("a VM's host is listed").clone();
    if source.address.is_empty() {
        return Err(CoordError::Invalid(format!(
            "host {} has no agent",
            source.name
        )));
    }
    if spec.to.is_empty() {
        return Err(CoordError::Invalid(
            "name at least one host to clone to".into(),
        ));
    }
    let mut targets = Vec::new();
    let mut seen = HashSet::new();
    for h in &spec.to {
        let host = view
            .host(h)
            .ok_or_else(|| CoordError::Invalid(format!("unknown host {h}")))?;
        if host.address.is_empty() {
            return Err(CoordError::Invalid(format!("host {h} has no agent")));
        }
        if !seen.insert(h.clone()) {
            return Err(CoordError::Invalid(format!("host {h} is named twice")));
        }
        let free = host.capacity_bytes.saturating_sub(host.used_bytes);
        if host.capacity_bytes > 0 && free < vm.memory_bytes() {
            return Err(CoordError::Invalid(format!(
                "host {h} has {free} bytes free, the clone needs {}",
                vm.memory_bytes()
            )));
        }
        let name = spec.names.replace("{vm}", &vm.name).replace("{host}", h);
        if view.vm(&name).is_some() {
            return Err(CoordError::Invalid(format!(
                "a VM named {name} already runs"
            )));
        }
        targets.push(v1::CloneTarget {
            name,
            addr: host.address.clone(),
        });
    }
    // Unless the operator gave a rate, the clone's casts and streams go
    // at the slowest link among the source's and the targets' (less 3% for
    // headers): faster, the targets' links drop the excess and it comes
    // back as repairs.
    let rate = spec.bandwidth_bps.unwrap_or_else(|| {
        std::iter::once(source.link_bps)
            .chain(
                spec.to
                    .iter()
                    .filter_map(|h| view.host(h).map(|x| x.link_bps)),
            )
            .filter(|&l| l > 0)
            .min()
            .map_or(0, |l| l / 100 * 97)
    });
    on(Event::Step(format!(
        "cloning {} from {} to {}",
        vm.name,
        source.name,
        spec.to.join(", ")
    )));
    let r = AgentClient::connect(&source.address, tls)
        .and_then(|c| {
            c.clone_vm(
                v1::CloneRequest {
                    vm: vm.name.clone(),
                    targets: targets.clone(),
                    job: spec.job.clone(),
                    bandwidth_bps: rate,
                    max_downtime_ms: spec.max_downtime_ms,
                },
                &mut |p| {
                    on(Event::Vm {
                        name: vm.name.clone(),
                        phase: p.phase.clone(),
                        bytes: p.bytes_sent,
                        pages_local: p.pages_local,
                    })
                },
            )
        })
        .map_err(|source| CoordError::Agent {
            host: vm.host.clone(),
            source,
        })?;
    let host_of: HashMap<&str, &str> = targets
        .iter()
        .zip(&spec.to)
        .map(|(t, h)| (t.name.as_str(), h.as_str()))
        .collect();
    Ok(CloneReport {
        job: spec.job.clone(),
        ok: r.ok,
        clones: r
            .clones
            .iter()
            .map(|c| CloneOutcome {
                name: c.name.clone(),
                host: host_of
                    .get(c.name.as_str())
                    .copied()
                    .unwrap_or(&c.host)
                    .to_owned(),
                ok: c.ok,
                verified: c.verified,
                error: c.error.clone(),
            })
            .collect(),
        source_bytes: r.bytes_sent,
        source_downtime_ms: r.downtime_ms,
        total_s: now_s(started),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn sends(from: u8, n: usize, ds: &[&str]) -> Vec<(PageHash, Vec<String>)> {
        (0..n)
            .map(|i| {
                let mut b = [from; 32];
                b[..8].copy_from_slice(&(i as u64).to_le_bytes());
                (
                    PageHash::from_bytes(b),
                    ds.iter().map(|d| (*d).to_owned()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn casts_are_split_by_destination_set_and_paced_to_the_slower_link() {
        let mut plan: SourcePlan = BTreeMap::new();
        let mut a1 = sends(1, 3_000, &["b1", "b2"]);
        a1.extend(sends(2, 2_500, &["b1"]));
        a1.extend(sends(3, 100, &["b2"]));
        a1.extend(sends(4, 100, &["b3"]));
        plan.insert("a1".into(), a1);
        plan.insert("a2".into(), sends(5, 10, &["b2"]));
        let link = |h: &str| {
            if h == "b3" {
                100_000_000
            } else {
                1_000_000_000
            }
        };
        let tasks = cast_tasks(&plan, &link, None, false);
        let of = |src: &str| -> Vec<(Vec<&str>, usize, Option<u64>)> {
            let mut v: Vec<_> = tasks
                .iter()
                .filter(|t| t.source == src)
                .map(|t| {
                    (
                        t.reaches.iter().map(String::as_str).collect(),
                        t.sends.len(),
                        t.rate,
                    )
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            of("a1"),
            vec![
                (vec!["b1"], 2_500, Some(970_000_000)),
                (vec!["b1", "b2"], 3_000, Some(970_000_000)),
                // The small sets go together, at the slowest member's rate.
                (vec!["b2", "b3"], 200, Some(97_000_000)),
            ]
        );
        assert_eq!(of("a2"), vec![(vec!["b2"], 10, Some(970_000_000))]);
        // --bandwidth wins.
        let capped = cast_tasks(&plan, &link, Some(5), false);
        assert!(capped.iter().all(|t| t.rate == Some(5)));
        // Unknown links: unpaced.
        assert!(
            cast_tasks(&plan, &|_| 0, None, false)
                .iter()
                .all(|t| t.rate.is_none())
        );
        // A flooding network brings every cast to every destination of
        // the job.
        let flooded = cast_tasks(&plan, &link, None, true);
        assert!(flooded.iter().all(|t| t.reaches.len() == 3));
    }

    #[test]
    fn no_two_casts_feed_one_destination_at_once_and_disjoint_ones_overlap() {
        let task = |src: &str, ds: &[&str], weight: f64| CastTask {
            source: src.into(),
            sends: Vec::new(),
            reaches: ds.iter().map(|d| (*d).to_owned()).collect(),
            rate: None,
            weight,
        };
        let tasks = vec![
            task("a1", &["b1", "b2"], 5.0),
            task("a1", &["b1"], 3.0),
            task("a1", &["b2"], 1.0),
            task("a2", &["b1", "b2"], 4.0),
            task("a2", &["b2"], 3.0),
            task("a2", &["b1"], 1.0),
            task("a3", &["c1"], 0.5),
        ];
        let busy: Mutex<HashSet<String>> = Mutex::new(HashSet::new());
        let running: Mutex<Vec<String>> = Mutex::new(Vec::new());
        // Each cast as it starts, with the casts running then.
        let starts: Mutex<Vec<(String, Vec<String>)>> = Mutex::new(Vec::new());
        let name = |t: &CastTask| format!("{}>{:?}", t.source, t.reaches);
        schedule_casts(tasks, &|_, t| {
            let mine: Vec<String> = std::iter::once(format!("src:{}", t.source))
                .chain(t.reaches.iter().cloned())
                .collect();
            {
                let mut b = lock(&busy);
                for r in &mine {
                    assert!(b.insert(r.clone()), "{r} used by two casts at once");
                }
                let mut r = lock(&running);
                lock(&starts).push((name(t), r.clone()));
                r.push(name(t));
            }
            std::thread::sleep(Duration::from_millis(40));
            lock(&running).retain(|x| *x != name(t));
            let mut b = lock(&busy);
            for r in &mine {
                b.remove(r);
            }
        });
        let starts = lock(&starts).clone();
        assert_eq!(starts.len(), 7, "every cast ran: {starts:?}");
        // The heaviest first, with nothing running.
        assert_eq!(starts[0], ("a1>{\"b1\", \"b2\"}".to_owned(), vec![]));
        // a3's cast shares nothing: it starts beside the first.
        assert!(starts.contains(&(
            "a3>{\"c1\"}".to_owned(),
            vec!["a1>{\"b1\", \"b2\"}".to_owned()]
        )));
        // a1 -> b1 and a2 -> b2 share nothing: they ran side by side.
        let (x, y) = ("a1>{\"b1\"}", "a2>{\"b2\"}");
        assert!(
            starts
                .iter()
                .any(|(n, r)| (n == x && r.iter().any(|o| o == y))
                    || (n == y && r.iter().any(|o| o == x))),
            "{starts:?}"
        );
    }

    /// A cast request of a full chunk fits one control frame, whatever
    /// the grouping (page numbers as large as they get, names as long as
    /// agents allow).
    #[test]
    fn a_full_cast_request_fits_a_control_frame() {
        let name = "h".repeat(64);
        let groups: Vec<v1::JobCastGroup> = (0..8)
            .map(|g| v1::JobCastGroup {
                members: vec![name.clone(); 4],
                pages: (0..CAST_CHUNK as u32).filter(|p| p % 8 == g).collect(),
                addr: group_addr("ev-00000000", 7, g as usize),
            })
            .collect();
        let req = v1::AgentRequest {
            body: Some(v1::agent_request::Body::CastSend(v1::CastSendRequest {
                job: "ev-00000000".into(),
                hashes: vec![0xa5u8; CAST_CHUNK * 32].into(),
                groups,
                receivers: vec![name; 4],
                rate_bps: u64::MAX,
                transport: v1::CastTransport::Multicast as i32,
            })),
        };
        let len = req.encoded_len();
        assert!(
            len <= pagecast_proto::MAX_CONTROL_FRAME_BYTES,
            "{len} bytes for {CAST_CHUNK} pages"
        );
    }
}
