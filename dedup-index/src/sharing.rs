//! Sharing questions answered from sketches alone: how alike two VMs are,
//! how much of a VM a host already holds, and the best hosts and most
//! similar VMs for one VM. Only loaded VMs and running VMs (published by
//! their agents) count; a host's sketch is the merge of theirs. Advice for
//! a VM looks only at VMs of its dedup domain: hashes of two domains never
//! match, and a sketch comparison across them would only report noise.

use std::collections::BTreeMap;

use pagecast_proto::refusal;
use pagecast_proto::v1::{
    AdviseResponse, Candidate, HostInfo, PairRequest, PairResponse, Refusal, RefusalCode, VmRecord,
    VmState,
};

use pagecast_pages::sharing::rank;

use crate::Sketch;

fn loaded(vms: &[VmRecord]) -> impl Iterator<Item = &VmRecord> {
    vms.iter()
        .filter(|v| v.state == VmState::Loaded as i32 || v.state == VmState::Running as i32)
}

fn sketch_of(v: &VmRecord) -> Result<Sketch, Refusal> {
    Sketch::from_bytes(&v.sketch)
        .map_err(|e| refusal(RefusalCode::Internal, format!("VM {}: {e}", v.name)))
}

fn host_name(hosts: &[HostInfo], n: u32) -> String {
    hosts
        .iter()
        .find(|h| h.index == n)
        .map_or_else(|| format!("#{n}"), |h| h.name.clone())
}

/// The merged sketch of every loaded VM on host `host`, leaving out the VM
/// named `except`.
pub fn host_sketch(vms: &[VmRecord], host: u32, except: &str) -> Result<Sketch, Refusal> {
    let mut s = Sketch::default();
    for v in loaded(vms).filter(|v| v.host == host && v.name != except) {
        s.merge(&sketch_of(v)?);
    }
    Ok(s)
}

fn subject(vms: &[VmRecord], hosts: &[HostInfo], vm: &str, host: &str) -> Result<Sketch, Refusal> {
    match (vm.is_empty(), host.is_empty()) {
        (false, true) => {
            let v = vms.iter().find(|v| v.name == vm).ok_or_else(|| {
                refusal(
                    RefusalCode::NotFound,
                    format!("VM {vm} is not in the index"),
                )
            })?;
            sketch_of(v)
        }
        (true, false) => {
            let h = hosts.iter().find(|h| h.name == host).ok_or_else(|| {
                refusal(
                    RefusalCode::NotFound,
                    format!("host {host} is not in the index"),
                )
            })?;
            host_sketch(vms, h.index, "")
        }
        _ => Err(refusal(
            RefusalCode::Invalid,
            "name exactly one of a VM or a host on each side",
        )),
    }
}

/// Jaccard and shared pages between two subjects.
pub fn pair(
    vms: &[VmRecord],
    hosts: &[HostInfo],
    p: &PairRequest,
) -> Result<PairResponse, Refusal> {
    let a = subject(vms, hosts, &p.vm_a, &p.host_a)?;
    let b = subject(vms, hosts, &p.vm_b, &p.host_b)?;
    Ok(PairResponse {
        jaccard: a.jaccard(&b),
        shared_pages: a.shared(&b),
        distinct_a: a.distinct(),
        distinct_b: b.distinct(),
    })
}

/// Whether two VMs are in the same dedup domain ("" and "cluster" alike).
pub fn same_domain(a: &VmRecord, b: &VmRecord) -> bool {
    pagecast_pages::domain::normalize(&a.domain) == pagecast_pages::domain::normalize(&b.domain)
}

/// The `top` hosts holding most of VM `vm`'s distinct pages (its own host
/// counted without it) and the `top` VMs most like it, among the VMs of
/// its dedup domain.
pub fn advise(
    vms: &[VmRecord],
    hosts: &[HostInfo],
    vm: &str,
    top: usize,
) -> Result<AdviseResponse, Refusal> {
    let target = vms.iter().find(|v| v.name == vm).ok_or_else(|| {
        refusal(
            RefusalCode::NotFound,
            format!("VM {vm} is not in the index"),
        )
    })?;
    let s = sketch_of(target)?;
    let mut by_host: BTreeMap<String, Sketch> = BTreeMap::new();
    let mut others: Vec<((String, String), Sketch)> = Vec::new();
    // A cordoned host takes no VM: never proposed, nor its VMs' places.
    let cordoned = |host: u32| hosts.iter().any(|h| h.index == host && h.cordoned);
    for v in loaded(vms).filter(|v| v.name != vm && same_domain(v, target) && !cordoned(v.host)) {
        let o = sketch_of(v)?;
        by_host
            .entry(host_name(hosts, v.host))
            .or_default()
            .merge(&o);
        others.push(((v.name.clone(), host_name(hosts, v.host)), o));
    }
    let hs: Vec<Candidate> = rank(&s, by_host.iter().map(|(h, sk)| (h.clone(), sk)), top)
        .into_iter()
        .map(|m| Candidate {
            name: m.key.clone(),
            host: m.key,
            jaccard: m.jaccard,
            shared_pages: m.shared_pages,
        })
        .collect();
    let others: Vec<Candidate> = rank(&s, others.iter().map(|(k, sk)| (k.clone(), sk)), top)
        .into_iter()
        .map(|m| Candidate {
            name: m.key.0,
            host: m.key.1,
            jaccard: m.jaccard,
            shared_pages: m.shared_pages,
        })
        .collect();
    Ok(AdviseResponse {
        vm: Some(target.clone()),
        vm_host: host_name(hosts, target.host),
        hosts: hs,
        vms: others,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PageHash;

    fn page(i: u64) -> PageHash {
        let mut b = *blake3::hash(&i.to_le_bytes()).as_bytes();
        b[31] |= 1;
        PageHash::from_bytes(b)
    }

    fn vm(name: &str, host: u32, pages: std::ops::Range<u64>) -> VmRecord {
        let hs: Vec<PageHash> = pages.map(page).collect();
        VmRecord {
            name: name.into(),
            host,
            sketch: Sketch::of(hs.iter()).to_bytes().into(),
            distinct: hs.len() as u64,
            state: VmState::Loaded as i32,
            ..Default::default()
        }
    }

    fn hosts() -> Vec<HostInfo> {
        (1..=3)
            .map(|i| HostInfo {
                index: i,
                name: format!("h{i}"),
                ..Default::default()
            })
            .collect()
    }

    /// Synthetic VMs with known overlap: the estimates must land within
    /// the stated error of the exact figures.
    #[test]
    fn estimates_track_exact_sharing() {
        // a: 0..40000; b shares 30000 of them; c shares 10000; d none.
        let vms = vec![
            vm("a", 1, 0..40_000),
            vm("b", 2, 10_000..50_000),
            vm("c", 3, 30_000..70_000),
            vm("d", 3, 100_000..120_000),
        ];
        let cases = [
            ("b", 30_000.0, 50_000.0),
            ("c", 10_000.0, 70_000.0),
            ("d", 0.0, 60_000.0),
        ];
        let r = advise(&vms, &hosts(), "a", 10).unwrap();
        for (name, shared, union) in cases {
            let c = r.vms.iter().find(|c| c.name == name).unwrap();
            let exact_j = shared / union;
            eprintln!(
                "{name}: J {:.4} (exact {exact_j:.4}), shared {:.0} (exact {shared})",
                c.jaccard, c.shared_pages
            );
            assert!(
                (c.jaccard - exact_j).abs() <= 0.08,
                "{name}: J {} vs {exact_j}",
                c.jaccard
            );
            assert!(
                (c.shared_pages - shared).abs() <= 0.10 * 40_000.0,
                "{name}: shared {} vs {shared}",
                c.shared_pages
            );
        }
        assert_eq!(r.vms[0].name, "b");
        assert_eq!(r.hosts[0].name, "h2");
        // Host 3 holds c and d: 10000 of a's pages.
        let h3 = r.hosts.iter().find(|c| c.name == "h3").unwrap();
        assert!(
            (h3.shared_pages - 10_000.0).abs() <= 4_000.0,
            "{}",
            h3.shared_pages
        );
        let p = pair(
            &vms,
            &hosts(),
            &PairRequest {
                vm_a: "a".into(),
                host_b: "h2".into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert!((p.shared_pages - 30_000.0).abs() <= 4_000.0);
        assert!(advise(&vms, &hosts(), "zz", 3).is_err());
    }

    #[test]
    fn a_cordoned_host_is_never_proposed() {
        let vms = vec![vm("a", 1, 0..1000), vm("b", 2, 0..1000), vm("c", 3, 0..900)];
        let r = advise(&vms, &hosts(), "a", 5).unwrap();
        assert_eq!(r.hosts[0].name, "h2");
        let mut hs = hosts();
        hs[1].cordoned = true;
        let r = advise(&vms, &hs, "a", 5).unwrap();
        assert!(r.hosts.iter().all(|c| c.host != "h2"), "{:?}", r.hosts);
        assert!(r.vms.iter().all(|c| c.host != "h2"), "{:?}", r.vms);
        assert_eq!(r.hosts[0].name, "h3");
    }

    #[test]
    fn unloaded_vms_do_not_count() {
        let mut vms = vec![vm("a", 1, 0..1000), vm("b", 2, 0..1000)];
        vms[1].state = VmState::Unloading as i32;
        let r = advise(&vms, &hosts(), "a", 5).unwrap();
        assert!(r.vms.is_empty());
        assert!(r.hosts.is_empty());
    }
}
