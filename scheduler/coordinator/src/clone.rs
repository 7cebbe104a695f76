//! One-to-many cloning: a running VM copied live to several hosts, each
//! page leaving the source once (the source agent casts what the targets
//! lack), the source running on.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use pagecast_proto::v1;

use crate::report::{CloneOutcome, CloneReport};
use crate::view::{ClusterView, HostView, VmView};
use crate::{CoordError, Event, Services};

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
    /// How the clones switch over (post-copy is refused by the source
    /// agent: a clone's source runs on).
    pub switchover: v1::SwitchoverMode,
    /// The job's id.
    pub job: String,
}

/// Clones a running VM to several hosts, live (see `pagecast clone`).
pub fn clone(
    svc: &Services,
    spec: &CloneSpec,
    on: &(dyn Fn(Event) + Sync),
) -> Result<CloneReport, CoordError> {
    let started = Instant::now();
    on(Event::Step("reading the cluster from the index".into()));
    let view = svc.index.cluster()?;
    let (vm, source) = source(&view, spec)?;
    let targets = targets(&view, spec, &vm)?;
    let rate = rate(&view, spec, &source);
    on(Event::Step(format!(
        "cloning {} from {} to {}",
        vm.name,
        source.name,
        spec.to.join(", ")
    )));
    let req = v1::CloneRequest {
        vm: vm.name.clone(),
        targets: targets.clone(),
        job: spec.job.clone(),
        bandwidth_bps: rate,
        max_downtime_ms: spec.max_downtime_ms,
        switchover: spec.switchover as i32,
    };
    // Each target takes the clone only for a job it was told of.
    open_job(svc, spec, &source, &targets);
    let r = svc
        .agents
        .clone_vm(&source.address, req, &mut |p| {
            on(Event::Vm {
                name: vm.name.clone(),
                phase: p.phase(),
                bytes: p.bytes_sent,
                pages_local: p.pages_local,
            })
        })
        .map_err(|source| CoordError::Agent {
            host: vm.host.clone(),
            source,
        });
    // All at once: a frozen target costs one request's deadline, not
    // one each.
    let mut closing: Vec<&str> = targets.iter().map(|t| t.addr.as_str()).collect();
    closing.push(&source.address);
    closing.sort_unstable();
    closing.dedup();
    crate::at_once(&closing, |addr| {
        let _ = svc.agents.close_job(addr, &spec.job);
    });
    let mut rep = report(spec, &targets, &r?, started);
    identities(svc, &source.address, &vm.name, &targets, &mut rep);
    Ok(rep)
}

/// Opens the clone's job at each target (its source the peer, sending
/// the clones that land there), all at once. A target that cannot be told
/// refuses the clone, which says so in its outcome.
fn open_job(svc: &Services, spec: &CloneSpec, source: &HostView, targets: &[v1::CloneTarget]) {
    let mut at: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for t in targets {
        at.entry(&t.addr).or_default().push(t.name.clone());
    }
    let at: Vec<(&str, Vec<String>)> = at.into_iter().collect();
    crate::at_once(&at, |(addr, vms)| {
        let _ = svc.agents.open_job(
            addr,
            v1::JobOpen {
                job: spec.job.clone(),
                peers: vec![v1::JobPeer {
                    host: source.name.clone(),
                    role: v1::JobRole::Source as i32,
                    vms: vms.clone(),
                }],
                deadline_ms: 0,
                qemu_connect: Vec::new(),
            },
        );
    });
}

/// The VM to clone and its host, which must have an agent.
fn source(view: &ClusterView, spec: &CloneSpec) -> Result<(VmView, HostView), CoordError> {
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
    Ok((vm, source))
}

/// The clones: each target host known, with an agent, named once, with
/// room for the clone, and the clone's name free.
fn targets(
    view: &ClusterView,
    spec: &CloneSpec,
    vm: &VmView,
) -> Result<Vec<v1::CloneTarget>, CoordError> {
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
        if host.cordoned {
            return Err(CoordError::Invalid(format!(
                "host {h} is cordoned (`pagecast uncordon {h}` lifts it)"
            )));
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
    Ok(targets)
}

/// Unless the operator gave a rate, the clone's casts and streams go at
/// the slowest link among the source's and the targets' (less 3% for
/// headers): faster, the targets' links drop the excess and it comes back
/// as repairs.
fn rate(view: &ClusterView, spec: &CloneSpec, source: &HostView) -> u64 {
    spec.bandwidth_bps.unwrap_or_else(|| {
        std::iter::once(source.link_bps)
            .chain(
                spec.to
                    .iter()
                    .filter_map(|h| view.host(h).map(|x| x.link_bps)),
            )
            .filter(|&l| l > 0)
            .min()
            .map_or(0, |l| l / 100 * 97)
    })
}

/// What each clone's identity became, against its source's, as the agents
/// list them: a micro-VM's clone gets a fresh identity at its destination;
/// an adopted QEMU VM's clone the VM generation ID its QEMU was started
/// with (checked to differ before the clone), and the MACs its cards carry.
fn identities(
    svc: &Services,
    source_addr: &str,
    vm: &str,
    targets: &[v1::CloneTarget],
    rep: &mut CloneReport,
) {
    let of = |addr: &str, name: &str| -> Option<v1::VmInfo> {
        svc.agents
            .vm_list(addr)
            .ok()
            .and_then(|l| l.vms.into_iter().find(|v| v.name == name))
    };
    // Without the source's listing nothing can be said to have changed.
    let Some(source) = of(source_addr, vm) else {
        return;
    };
    rep.source_identity = source.identity.clone();
    // Every target asked at once: a frozen one costs one request's
    // deadline, not one each.
    let asked: Vec<(usize, &v1::CloneTarget)> = rep
        .clones
        .iter()
        .enumerate()
        .filter(|(_, c)| c.ok)
        .filter_map(|(i, c)| Some((i, targets.iter().find(|t| t.name == c.name)?)))
        .collect();
    let listed = crate::at_once(&asked, |(_, t)| of(&t.addr, &t.name));
    for ((i, _), info) in asked.into_iter().zip(listed) {
        let Some(info) = info else {
            continue;
        };
        let c = &mut rep.clones[i];
        c.identity = info.identity.clone();
        let (changed, kept) = compare(&source, &info);
        c.changed = changed;
        c.kept = kept;
    }
}

/// What a clone (`clone`) changed and kept of its source's (`source`)
/// identity.
fn compare(source: &v1::VmInfo, clone: &v1::VmInfo) -> (Vec<String>, Vec<String>) {
    let (mut changed, mut kept) = (Vec::new(), Vec::new());
    if !clone.identity.is_empty() && clone.identity != source.identity {
        changed.push(
            if clone.kind() == v1::VmKind::Qemu {
                "vm_generation_id"
            } else {
                "identity"
            }
            .to_owned(),
        );
    }
    if !clone.macs.is_empty() {
        if clone.macs.iter().any(|m| source.macs.contains(m)) {
            kept.push("mac".to_owned());
        } else {
            changed.push("mac".to_owned());
        }
    }
    (changed, kept)
}

fn report(
    spec: &CloneSpec,
    targets: &[v1::CloneTarget],
    r: &v1::CloneResult,
    started: Instant,
) -> CloneReport {
    let host_of: HashMap<&str, &str> = targets
        .iter()
        .zip(&spec.to)
        .map(|(t, h)| (t.name.as_str(), h.as_str()))
        .collect();
    CloneReport {
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
                error: pagecast_proto::refusal_text(&c.error).to_owned(),
                ..CloneOutcome::default()
            })
            .collect(),
        source_bytes: r.bytes_sent,
        source_downtime_ms: r.downtime_ms,
        total_s: started.elapsed().as_secs_f64(),
        source_identity: String::new(),
    }
}

#[cfg(test)]
mod identity_tests {
    use super::compare;
    use pagecast_proto::v1;

    fn vm(kind: v1::VmKind, identity: &str, macs: &[&str]) -> v1::VmInfo {
        v1::VmInfo {
            kind: kind as i32,
            identity: identity.into(),
            macs: macs.iter().map(|m| m.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_clone_says_what_it_changed_and_what_it_kept() {
        let src = vm(v1::VmKind::Qemu, "aa", &["52:54:00:00:00:01"]);
        // New generation ID, same MAC: the MAC is kept, not changed.
        let c = vm(v1::VmKind::Qemu, "bb", &["52:54:00:00:00:01"]);
        assert_eq!(
            compare(&src, &c),
            (vec!["vm_generation_id".into()], vec!["mac".into()])
        );
        // Its own MAC.
        let c = vm(v1::VmKind::Qemu, "bb", &["52:54:00:00:00:02"]);
        assert_eq!(
            compare(&src, &c),
            (vec!["vm_generation_id".into(), "mac".into()], vec![])
        );
        // The same ID (or none) is not a change; a micro-VM's is its
        // identity.
        assert_eq!(
            compare(&src, &vm(v1::VmKind::Qemu, "aa", &[])),
            (vec![], vec![])
        );
        assert_eq!(
            compare(&src, &vm(v1::VmKind::Qemu, "", &[])),
            (vec![], vec![])
        );
        let m = vm(v1::VmKind::MicroVm, "cc", &[]);
        assert_eq!(compare(&src, &m), (vec!["identity".into()], vec![]));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use pagecast_pages::PageHash;
    use pagecast_proto::v1;

    use super::{CloneSpec, clone};
    use crate::Services;
    use crate::fake::FakeCluster;

    /// A clone's job is opened and closed at its targets, and their VM
    /// lists read, all at once: two targets that each take 1.5 s to answer
    /// (as agents frozen until the request's deadline would) cost the clone
    /// one such wait to open, one to read the lists and one to close, not
    /// one per target each time. Before, the targets were asked one after
    /// another: 9 s here.
    #[test]
    fn targets_slow_to_answer_cost_a_clone_one_wait_not_one_each() {
        let gib = 1 << 30;
        let frames: Vec<PageHash> = (1..=64u8).map(|b| PageHash::from_bytes([b; 32])).collect();
        let f = FakeCluster::new()
            .host("src", "r1", 1_000_000_000, 4 * gib)
            .host("t1", "r2", 1_000_000_000, 4 * gib)
            .host("t2", "r2", 1_000_000_000, 4 * gib)
            .host("t3", "r2", 1_000_000_000, 4 * gib)
            .vm("src", "web", frames);
        let stall = Duration::from_millis(1500);
        f.stall_jobs("t1", stall);
        f.stall_jobs("t2", stall);
        let svc = Services {
            index: Arc::new(f.clone()),
            agents: Arc::new(f.clone()),
        };
        let spec = CloneSpec {
            vm: "web".into(),
            to: vec!["t1".into(), "t2".into(), "t3".into()],
            names: "{vm}-{host}".into(),
            bandwidth_bps: None,
            max_downtime_ms: 300,
            switchover: v1::SwitchoverMode::Precopy,
            job: "clone-test".into(),
        };
        let t = Instant::now();
        let rep = clone(&svc, &spec, &|_| {}).unwrap();
        let took = t.elapsed();
        assert_eq!(rep.clones.len(), 3);
        assert!(
            rep.clones.iter().all(|c| c.error.is_empty()),
            "{:?}",
            rep.clones
        );
        // Three waits (open, lists, close) and what the rest takes.
        assert!(took >= 3 * stall, "{took:?}");
        assert!(took < 4 * stall, "the clone took {took:?}");
    }
}
