//! Before anything moves: the request checked against the cluster, the
//! planner's model of it, the moving VMs' exact contents from their
//! agents, who holds those contents from the index, the plan and its
//! prediction.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use pagecast_agent_api::VmContentAnswer;
use pagecast_pages::{PAGE_BYTES, PageHash, Sketch};
use pagecast_proto::v1::{HostedVmState, RefusalCode, VmKind};
use pagecast_scheduler::{
    Assignment, Cluster, ContentSource, Evacuation, Host, HostIdx, Plan, Planner, Rack, Strategy,
    Vm, VmIdx,
};

use super::{EvacuateSpec, Method, Moving, Prepared};
use crate::report::Predicted;
use crate::view::ClusterView;
use crate::{CoordError, Event, Services};

/// How long the placement search may refine a plan: each step re-plans the
/// transmission of every moving page (planning with up to 16 passes took
/// 10.8 s for 8 VMs of 512 MiB on two cores), so a large job keeps the best
/// plan found by then.
const REFINE_BUDGET: Duration = Duration::from_secs(1);

/// Reads the cluster, checks the request, asks the agents what the moving
/// VMs hold and the index who holds it, and plans.
pub(super) fn prepare(
    svc: &Services,
    spec: &EvacuateSpec,
    on: &(dyn Fn(Event) + Sync),
) -> Result<Prepared, CoordError> {
    on(Event::Step("reading the cluster from the index".into()));
    let view = only_these(svc.index.cluster()?, spec, on)?;
    let to = destinations(&view, spec)?;
    let mut model = Model::build(&view, spec, &to);
    on(Event::Step(format!(
        "asking the source agents what {} VM(s) hold",
        model.moving.len()
    )));
    let contents = exact_contents(svc, &view, &model, &spec.job)?;
    let (vm_pages, qemu_vms) = model.take(contents);
    if !qemu_vms.is_empty() {
        on(Event::Step(format!(
            "finding the waiting QEMUs of {} QEMU VM(s)",
            qemu_vms.len()
        )));
        pin_qemu_vms(svc, &view, &mut model, &qemu_vms)?;
    }
    on(Event::Step("asking the index who holds those pages".into()));
    let held = holders(svc, &view, &vm_pages)?;
    let content = ExactContent {
        vm_pages,
        sketches: std::mem::take(&mut model.sketches),
        held,
        host_vms: std::mem::take(&mut model.host_vms),
    };
    on(Event::Step(format!("planning ({})", spec.method.name())));
    let planner = Planner::new(&model.cluster, &model.evac, &content)?;
    let plan = plan(&planner, &model, spec)?;
    let prep = prepared(view, &model, content, &plan, spec);
    if !prep.predicted.lower_bound_s.is_empty() {
        on(Event::LowerBound(prep.predicted.lower_bound_s.clone()));
    }
    Ok(prep)
}

/// With `spec.only` (a retry), the view without the sources' other VMs:
/// only the named ones move. A named VM no longer on a source is said and
/// skipped; none left is an error.
fn only_these(
    mut view: ClusterView,
    spec: &EvacuateSpec,
    on: &(dyn Fn(Event) + Sync),
) -> Result<ClusterView, CoordError> {
    if spec.only.is_empty() {
        return Ok(view);
    }
    let on_source = |name: &str| {
        view.vms
            .iter()
            .any(|v| v.name == name && spec.from.contains(&v.host))
    };
    let (left, gone): (Vec<&String>, Vec<&String>) = spec.only.iter().partition(|n| on_source(n));
    for n in &gone {
        on(Event::Step(format!(
            "{n} is on none of {} any more: skipped",
            spec.from.join(", ")
        )));
    }
    if left.is_empty() {
        return Err(CoordError::Invalid(format!(
            "none of {} is on {} any more: nothing to retry",
            spec.only.join(", "),
            spec.from.join(", ")
        )));
    }
    view.vms
        .retain(|v| !spec.from.contains(&v.host) || spec.only.contains(&v.name));
    Ok(view)
}

/// The hosts that may receive, checked: every one known, with an agent,
/// and not being evacuated; by default every other host with an agent.
fn destinations(view: &ClusterView, spec: &EvacuateSpec) -> Result<Vec<String>, CoordError> {
    if spec.from.is_empty() {
        return Err(CoordError::Invalid(
            "name at least one host to evacuate".into(),
        ));
    }
    let with_agent = |h: &str| match view.host(h) {
        None => Err(CoordError::Invalid(format!("unknown host {h}"))),
        Some(x) if x.address.is_empty() => Err(CoordError::Invalid(format!(
            "host {h} has no agent reporting to the index"
        ))),
        Some(_) => Ok(()),
    };
    for h in &spec.from {
        with_agent(h)?;
    }
    let to: Vec<String> = if spec.to.is_empty() {
        view.hosts
            .iter()
            .filter(|h| !h.address.is_empty() && !spec.from.contains(&h.name) && !h.cordoned)
            .map(|h| h.name.clone())
            .collect()
    } else {
        for h in &spec.to {
            with_agent(h)?;
            if spec.from.contains(h) {
                return Err(CoordError::Invalid(format!(
                    "--to names {h}, which is being evacuated"
                )));
            }
            if view.host(h).is_some_and(|x| x.cordoned) {
                return Err(CoordError::Invalid(format!(
                    "--to names {h}, which is cordoned (`pagecast uncordon {h}` lifts it)"
                )));
            }
        }
        spec.to.clone()
    };
    if to.is_empty() {
        return Err(CoordError::Invalid(
            "no destination host has an agent and is not cordoned".into(),
        ));
    }
    Ok(to)
}

/// The planner's model of the cluster: every host, rack and running VM.
struct Model {
    cluster: Cluster,
    evac: Evacuation,
    sketches: Vec<Sketch>,
    host_vms: HashMap<HostIdx, Vec<VmIdx>>,
    /// The VMs on the hosts being emptied.
    moving: Vec<VmIdx>,
    /// Adopted QEMU VMs that are libvirt domains with no waiting QEMU:
    /// libvirt moves them.
    libvirt_vms: HashSet<VmIdx>,
    /// The destinations' libvirt URIs, where their agents name one.
    libvirt_uris: HashMap<HostIdx, String>,
    /// Adopted QEMU VMs (libvirt domains or not).
    qemu_vms: HashSet<VmIdx>,
}

impl Model {
    fn build(view: &ClusterView, spec: &EvacuateSpec, to: &[String]) -> Model {
        let mut racks: Vec<String> = view.hosts.iter().map(|h| view.rack_of(&h.name)).collect();
        racks.sort();
        racks.dedup();
        let default_link = spec.bandwidth_bps.unwrap_or(10_000_000_000) as f64;
        let link_of = |l: u64| if l > 0 { l as f64 } else { default_link };
        let mut cluster = Cluster::default();
        for r in &racks {
            let uplink: f64 = view
                .hosts
                .iter()
                .filter(|h| view.rack_of(&h.name) == *r)
                .map(|h| link_of(h.link_bps))
                .sum();
            cluster.racks.push(Rack {
                name: r.clone(),
                uplink_bps: uplink.max(1.0),
            });
        }
        let host_idx: HashMap<&str, HostIdx> = view
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.as_str(), i))
            .collect();
        for h in &view.hosts {
            let rack = racks
                .iter()
                .position(|r| *r == view.rack_of(&h.name))
                .expect("listed");
            let link = match spec.bandwidth_bps {
                Some(b) if spec.from.contains(&h.name) => b as f64,
                _ => link_of(h.link_bps),
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
            let h = host_idx[v.host.as_str()];
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
            from: spec.from.iter().map(|h| host_idx[h.as_str()]).collect(),
            to: to.iter().map(|h| host_idx[h.as_str()]).collect(),
            ..Evacuation::default()
        };
        let moving = (0..cluster.vms.len())
            .filter(|&v| evac.from.contains(&cluster.vms[v].host))
            .collect();
        Model {
            cluster,
            evac,
            sketches,
            host_vms,
            moving,
            libvirt_vms: HashSet::new(),
            libvirt_uris: HashMap::new(),
            qemu_vms: HashSet::new(),
        }
    }

    /// Takes in the moving VMs' exact contents: their sizes and rewrite
    /// rates into the model; their pages, and which are adopted QEMU VMs.
    fn take(
        &mut self,
        contents: Vec<(VmIdx, VmContentAnswer)>,
    ) -> (HashMap<VmIdx, Vec<PageHash>>, Vec<VmIdx>) {
        let mut vm_pages = HashMap::new();
        let mut qemu = Vec::new();
        for (v, c) in contents {
            let vm = &mut self.cluster.vms[v];
            vm.memory_bytes = c.memory_bytes;
            vm.nonzero_pages = c.nonzero_frames;
            vm.rewrite_pages_per_s = c.rewrite_pages_per_s;
            if c.kind == VmKind::Qemu {
                qemu.push(v);
                self.qemu_vms.insert(v);
            }
            vm_pages.insert(v, c.hashes);
        }
        (vm_pages, qemu)
    }
}

/// The moving VMs' exact contents, from their agents' content maps, asked
/// all at once.
fn exact_contents(
    svc: &Services,
    view: &ClusterView,
    model: &Model,
    job: &str,
) -> Result<Vec<(VmIdx, VmContentAnswer)>, CoordError> {
    let cluster = &model.cluster;
    let answers: Vec<Result<(VmIdx, VmContentAnswer), CoordError>> = std::thread::scope(|s| {
        let handles: Vec<_> = model
            .moving
            .iter()
            .map(|&v| {
                let vm = &cluster.vms[v];
                let host = &cluster.hosts[vm.host].name;
                let addr = &view.host(host).expect("known").address;
                s.spawn(move || match svc.agents.vm_content(addr, &vm.name, job) {
                    Ok(c) => Ok((v, c)),
                    Err(e) if e.code() == RefusalCode::NotFound => {
                        Err(CoordError::Invalid(format!(
                            "VM {} is not on {host} any more (the index is behind); run again",
                            vm.name
                        )))
                    }
                    Err(source) => Err(CoordError::Agent {
                        host: host.clone(),
                        source,
                    }),
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a content thread panicked"))
            .collect()
    });
    answers.into_iter().collect()
}

/// Pins each adopted QEMU VM to the destination where the operator started
/// its waiting QEMU (adopted there with `--incoming` under the same name);
/// a libvirt domain with none is left to the planner, its destination's
/// libvirt to start one (every destination must name its libvirt).
fn pin_qemu_vms(
    svc: &Services,
    view: &ClusterView,
    model: &mut Model,
    qemu_vms: &[VmIdx],
) -> Result<(), CoordError> {
    let list = |h: &str| {
        let addr = &view.host(h).expect("known").address;
        svc.agents
            .vm_list(addr)
            .map_err(|source| CoordError::Agent {
                host: h.to_owned(),
                source,
            })
    };
    let mut waiting: HashMap<String, Vec<HostIdx>> = HashMap::new();
    // Every destination asked at once: a frozen one costs one request's
    // deadline, not one each.
    let lists = crate::at_once(&model.evac.to, |&d| list(&model.cluster.hosts[d].name));
    for (&d, l) in model.evac.to.clone().iter().zip(lists) {
        let l = l?;
        if !l.libvirt.is_empty() {
            model.libvirt_uris.insert(d, l.libvirt);
        }
        for v in l.vms {
            if v.kind() == VmKind::Qemu && v.state() == HostedVmState::Incoming {
                waiting.entry(v.name).or_default().push(d);
            }
        }
    }
    let domains = libvirt_domains(model, qemu_vms, list)?;
    for &v in qemu_vms {
        let name = &model.cluster.vms[v].name;
        match waiting.get(name).map(Vec::as_slice) {
            Some([d]) => model.evac.pinned.push((v, *d)),
            Some(many) => {
                return Err(CoordError::Invalid(format!(
                    "QEMU VM {name} has a waiting QEMU on {} destinations ({}): keep one",
                    many.len(),
                    many.iter()
                        .map(|&d| model.cluster.hosts[d].name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            None if domains.contains(&v) => {
                let lacking: Vec<&str> = model
                    .evac
                    .to
                    .iter()
                    .filter(|d| !model.libvirt_uris.contains_key(d))
                    .map(|&d| model.cluster.hosts[d].name.as_str())
                    .collect();
                if !lacking.is_empty() {
                    return Err(CoordError::Invalid(format!(
                        "QEMU VM {name} is a libvirt domain, and {} name no libvirt (`pagecast agent --libvirt URI`): evacuate --to hosts that do",
                        lacking.join(", ")
                    )));
                }
                model.libvirt_vms.insert(v);
                if model.libvirt_vms.len() > usize::from(super::LIBVIRT_BLOCK) {
                    return Err(CoordError::Invalid(format!(
                        "at most {} libvirt domains move in one job: evacuate these hosts in several",
                        super::LIBVIRT_BLOCK
                    )));
                }
            }
            None => {
                return Err(CoordError::Invalid(format!(
                    "QEMU VM {name} has no waiting QEMU on any destination: start one with -incoming defer on the host it should go to and adopt it there with `pagecast vm adopt --incoming --name {name}`, or, for a libvirt domain, adopt it with --libvirt-domain (docs/qemu.md)"
                )));
            }
        }
    }
    Ok(())
}

/// Which of `qemu_vms` their source agents know as libvirt domains.
fn libvirt_domains(
    model: &Model,
    qemu_vms: &[VmIdx],
    list: impl Fn(&str) -> Result<pagecast_proto::v1::VmList, CoordError> + Sync,
) -> Result<HashSet<VmIdx>, CoordError> {
    let mut sources: Vec<HostIdx> = qemu_vms
        .iter()
        .map(|&v| model.cluster.vms[v].host)
        .collect();
    sources.sort_unstable();
    sources.dedup();
    let mut domains = HashSet::new();
    let lists = crate::at_once(&sources, |&s| list(&model.cluster.hosts[s].name));
    for (s, l) in sources.into_iter().zip(lists) {
        let l = l?;
        for info in l.vms.iter().filter(|i| !i.libvirt_domain.is_empty()) {
            if let Some(&v) = qemu_vms.iter().find(|&&v| {
                model.cluster.vms[v].host == s && model.cluster.vms[v].name == info.name
            }) {
                domains.insert(v);
            }
        }
    }
    Ok(domains)
}

/// Who holds the moving VMs' contents, from the index, by host.
fn holders(
    svc: &Services,
    view: &ClusterView,
    vm_pages: &HashMap<VmIdx, Vec<PageHash>>,
) -> Result<HashMap<HostIdx, HashSet<PageHash>>, CoordError> {
    let by_number: HashMap<u32, HostIdx> = view
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.index, i))
        .collect();
    // Each content asked once: VMs of one family share most of theirs.
    let mut all: Vec<PageHash> = vm_pages.values().flatten().copied().collect();
    all.sort_unstable();
    all.dedup();
    let mut held: HashMap<HostIdx, HashSet<PageHash>> = HashMap::new();
    for (host, p) in svc.index.holders(&all)? {
        if let Some(&h) = by_number.get(&host) {
            held.entry(h).or_default().insert(p);
        }
    }
    Ok(held)
}

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

/// The plan of `spec.method`.
fn plan(planner: &Planner<'_>, model: &Model, spec: &EvacuateSpec) -> Result<Plan, CoordError> {
    Ok(match spec.method {
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
        Method::Precopy => planner.plan_for(Strategy::FirstFit, spread(planner, model)?),
    })
}

/// A resource scheduler's spreading: largest VM first, each to the
/// destination with the most free memory.
fn spread(planner: &Planner<'_>, model: &Model) -> Result<Assignment, CoordError> {
    let cluster = &model.cluster;
    let mut free = cluster.free_memory(planner.moving());
    let mut order: Vec<VmIdx> = planner.moving().to_vec();
    order.sort_by_key(|&v| std::cmp::Reverse(cluster.vms[v].memory_bytes));
    let mut a = Assignment::new();
    for v in order {
        let mem = cluster.vms[v].memory_bytes;
        if let Some(&(_, d)) = model.evac.pinned.iter().find(|p| p.0 == v) {
            free[d] = free[d].saturating_sub(mem);
            a.insert(v, d);
            continue;
        }
        let best = model
            .evac
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
    Ok(a)
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

/// Per source: the bytes of its moving VMs' pages that no other host
/// holds, and those bytes over its link (where its rate is known): no plan
/// evicts it sooner.
fn lower_bounds(
    cluster: &Cluster,
    content: &ExactContent,
    plan: &Plan,
) -> (
    std::collections::BTreeMap<String, u64>,
    std::collections::BTreeMap<String, f64>,
) {
    let mut pages: HashMap<HostIdx, HashSet<PageHash>> = HashMap::new();
    for (v, _) in plan.placement() {
        let src = cluster.vms[v].host;
        let set = pages.entry(src).or_default();
        for h in content.vm_pages.get(&v).into_iter().flatten() {
            if !h.is_zero_page() {
                set.insert(*h);
            }
        }
    }
    let (mut bytes, mut secs) = (
        std::collections::BTreeMap::new(),
        std::collections::BTreeMap::new(),
    );
    for (src, set) in pages {
        let only = set
            .iter()
            .filter(|h| {
                !content
                    .held
                    .iter()
                    .any(|(host, held)| *host != src && held.contains(*h))
            })
            .count() as u64
            * PAGE_BYTES;
        let host = &cluster.hosts[src];
        bytes.insert(host.name.clone(), only);
        if host.link_bps > 0.0 {
            secs.insert(host.name.clone(), only as f64 * 8.0 / host.link_bps);
        }
    }
    (bytes, secs)
}

/// The plan's moves and its prediction.
fn prepared(
    view: ClusterView,
    model: &Model,
    content: ExactContent,
    plan: &Plan,
    spec: &EvacuateSpec,
) -> Prepared {
    let cluster = &model.cluster;
    let mut port = super::libvirt_base(&spec.job);
    let moving: Vec<Moving> = plan
        .placement()
        .into_iter()
        .map(|(v, d)| Moving {
            name: cluster.vms[v].name.clone(),
            from: cluster.hosts[cluster.vms[v].host].name.clone(),
            to: cluster.hosts[d].name.clone(),
            libvirt: model.libvirt_vms.contains(&v).then(|| {
                port += 1;
                super::LibvirtMove {
                    uri: model.libvirt_uris[&d].clone(),
                    port: port - 1,
                }
            }),
            qemu: model.qemu_vms.contains(&v),
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
            // A cast datagram carries a tag per member of its group: at
            // most one per destination of the plan.
            let members = moving
                .iter()
                .map(|m| m.to.as_str())
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                .max(1);
            let per_page = pagecast_multicast::wire::link_bytes_per_page(mtu as usize, members)
                - PAGE_BYTES as f64;
            (pages as f64 / PAGE_BYTES as f64 * per_page) as u64 + tcp_headers(tcp, mtu)
        }
    });
    let (only_at_source_bytes, lower_bound_s) = lower_bounds(cluster, &content, plan);
    let predicted = Predicted {
        only_at_source_bytes,
        lower_bound_s,
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
    let held = std::sync::Arc::new(
        content
            .held
            .into_iter()
            .map(|(h, s)| (cluster.hosts[h].name.clone(), s))
            .collect(),
    );
    Prepared {
        view,
        moving,
        predicted,
        held,
    }
}
