//! The cost model: bytes on every link class and the predicted eviction
//! time of a transmission plan.
//!
//! Links are full duplex. A page a source sends to its destination set
//! crosses the source's link once; if any member is in another rack it
//! crosses the source rack's uplink once, and the core once into every
//! other rack with members (the core replicates multicast per rack), then
//! that rack's downlink once and each member's link once. Short-haul
//! transfers stay in their rack. The eviction time is when the last source
//! has sent its last byte, taken as the most loaded link's bytes over its
//! rate (a fluid bound: sources run in parallel and multicast is paced to
//! the slowest receiver, so every link on a source's paths gates it).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::{Cluster, Evacuation, HostIdx, RackIdx, VmIdx};
use crate::placement::Assignment;
use crate::transmission::Transmission;

pub use pagecast_pages::PAGE_BYTES;

/// Predicted bytes per link and the time they take.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostReport {
    /// Bytes each source sends.
    pub source_bytes: BTreeMap<String, u64>,
    /// Sum of `source_bytes`.
    pub source_total: u64,
    /// Bytes up each rack's uplink to the core.
    pub rack_up_bytes: BTreeMap<String, u64>,
    /// Bytes down each rack's uplink from the core.
    pub rack_down_bytes: BTreeMap<String, u64>,
    /// Bytes the core delivers into racks (a multicast page counts once per
    /// rack it enters).
    pub core_bytes: u64,
    /// Bytes arriving on each destination's link.
    pub destination_bytes: BTreeMap<String, u64>,
    /// Bytes destinations copy from what they already hold.
    pub local_bytes: u64,
    /// Bytes taken short-haul inside racks.
    pub short_haul_bytes: u64,
    /// Of the bytes sent, those re-sending pages the guests rewrote while
    /// they moved (0 unless a VM's rewrite rate is known).
    pub rewrite_bytes: u64,
    /// Of the bytes sent, the manifests: every live migration first tells
    /// its destination the hash of each non-zero page
    /// ([`MANIFEST_BYTES_PER_PAGE`]), whatever the strategy.
    pub manifest_bytes: u64,
    /// Predicted time until every source has sent its last byte.
    pub eviction_s: f64,
    /// The link that decides `eviction_s`.
    pub bottleneck: String,
}

fn secs(bytes: u64, bps: f64) -> f64 {
    bytes as f64 * 8.0 / bps
}

/// Bytes on every link, before they are turned into times.
#[derive(Clone, Default)]
struct Loads {
    src: BTreeMap<HostIdx, u64>,
    dest: BTreeMap<HostIdx, u64>,
    rack_up: BTreeMap<RackIdx, u64>,
    rack_down: BTreeMap<RackIdx, u64>,
    core: u64,
    short_haul: u64,
    local: u64,
    rewrites: u64,
    manifests: u64,
}

impl Loads {
    fn of(c: &Cluster, t: &Transmission) -> Self {
        let mut l = Loads::default();
        for g in &t.groups {
            let bytes = g.pages.len() as u64 * PAGE_BYTES;
            *l.src.entry(g.source).or_default() += bytes;
            let rs = c.hosts[g.source].rack;
            let mut racks: Vec<RackIdx> = g.members.iter().map(|&d| c.hosts[d].rack).collect();
            racks.sort_unstable();
            racks.dedup();
            if racks.iter().any(|&r| r != rs) {
                *l.rack_up.entry(rs).or_default() += bytes;
            }
            for &r in racks.iter().filter(|&&r| r != rs) {
                l.core += bytes;
                *l.rack_down.entry(r).or_default() += bytes;
            }
            for &d in &g.members {
                *l.dest.entry(d).or_default() += bytes;
            }
        }
        for s in &t.short_haul {
            let bytes = s.pages.len() as u64 * PAGE_BYTES;
            l.short_haul += bytes;
            *l.dest.entry(s.to).or_default() += bytes;
        }
        l.local = t.local.values().map(|v| v.len() as u64 * PAGE_BYTES).sum();
        l
    }

    /// Adds `bytes` sent by `from` to `to` alone (a pre-copy round).
    fn unicast(&mut self, c: &Cluster, from: HostIdx, to: HostIdx, bytes: u64) {
        *self.src.entry(from).or_default() += bytes;
        *self.dest.entry(to).or_default() += bytes;
        let (rs, rd) = (c.hosts[from].rack, c.hosts[to].rack);
        if rs != rd {
            *self.rack_up.entry(rs).or_default() += bytes;
            *self.rack_down.entry(rd).or_default() += bytes;
            self.core += bytes;
        }
    }

    fn report(&self, c: &Cluster) -> CostReport {
        let mut worst = (0.0, "nothing to send".to_string());
        let mut consider = |s: f64, what: String| {
            if s > worst.0 {
                worst = (s, what);
            }
        };
        for (&h, &b) in &self.src {
            consider(
                secs(b, c.hosts[h].link_bps),
                format!("source link of {}", c.hosts[h].name),
            );
        }
        for (&h, &b) in &self.dest {
            consider(
                secs(b, c.hosts[h].link_bps),
                format!("link of destination {}", c.hosts[h].name),
            );
        }
        for (&r, &b) in &self.rack_up {
            consider(
                secs(b, c.racks[r].uplink_bps),
                format!("uplink of rack {}", c.racks[r].name),
            );
        }
        for (&r, &b) in &self.rack_down {
            consider(
                secs(b, c.racks[r].uplink_bps),
                format!("downlink of rack {}", c.racks[r].name),
            );
        }
        if let Some(bps) = c.core_bps {
            consider(secs(self.core, bps), "core".to_string());
        }
        let host_name = |m: &BTreeMap<HostIdx, u64>| -> BTreeMap<String, u64> {
            m.iter()
                .map(|(&h, &b)| (c.hosts[h].name.clone(), b))
                .collect()
        };
        let rack_name = |m: &BTreeMap<RackIdx, u64>| -> BTreeMap<String, u64> {
            m.iter()
                .map(|(&r, &b)| (c.racks[r].name.clone(), b))
                .collect()
        };
        CostReport {
            source_total: self.src.values().sum(),
            source_bytes: host_name(&self.src),
            rack_up_bytes: rack_name(&self.rack_up),
            rack_down_bytes: rack_name(&self.rack_down),
            core_bytes: self.core,
            destination_bytes: host_name(&self.dest),
            local_bytes: self.local,
            short_haul_bytes: self.short_haul,
            rewrite_bytes: self.rewrites,
            manifest_bytes: self.manifests,
            eviction_s: worst.0,
            bottleneck: worst.1,
        }
    }
}

/// Bytes of a moving VM's manifest per non-zero page: its 32-byte hash
/// (zero pages travel as ranges, a few bytes for the lot).
pub const MANIFEST_BYTES_PER_PAGE: u64 = 32;

/// Costs `t` on cluster `c`, as if no guest wrote while it moves and
/// nothing but pages crossed the links.
pub fn cost(c: &Cluster, t: &Transmission) -> CostReport {
    Loads::of(c, t).report(c)
}

/// Costs `t` with the pages the moving guests rewrite meanwhile: live
/// migration sends a rewritten page again in a later pre-copy round,
/// unicast from its source to its destination. A VM rewriting `r` distinct
/// pages a second ([`crate::model::Vm::rewrite_pages_per_s`]) for the
/// whole eviction of `T` seconds re-sends `r * T` pages (at most its
/// memory), and those bytes lengthen `T`: the time is found as a fixed
/// point, a few rounds from the time without rewrites. Each moving VM's
/// manifest is sent too, unicast source to destination.
pub fn cost_rewriting(c: &Cluster, t: &Transmission, a: &Assignment) -> CostReport {
    let mut base = Loads::of(c, t);
    for (&v, &d) in a {
        let vm = &c.vms[v];
        let bytes = vm.nonzero_pages * MANIFEST_BYTES_PER_PAGE;
        base.unicast(c, vm.host, d, bytes);
        base.manifests += bytes;
    }
    let mut r = base.report(c);
    if !a.keys().any(|&v| c.vms[v].rewrite_pages_per_s > 0.0) {
        return r;
    }
    for _ in 0..16 {
        let mut l = base.clone();
        for (&v, &d) in a {
            let vm = &c.vms[v];
            if vm.rewrite_pages_per_s <= 0.0 {
                continue;
            }
            let most = (vm.memory_bytes / PAGE_BYTES) as f64;
            let pages = (vm.rewrite_pages_per_s * r.eviction_s).min(most);
            let bytes = pages as u64 * PAGE_BYTES;
            l.unicast(c, vm.host, d, bytes);
            l.rewrites += bytes;
        }
        let next = l.report(c);
        let settled = (next.eviction_s - r.eviction_s).abs() <= 1e-3 * r.eviction_s.max(1e-9);
        r = next;
        if settled {
            break;
        }
    }
    r
}

/// What a per-VM pre-copy of the same placement costs: every non-zero page
/// of every VM, unicast from its source, nothing deduplicated.
pub fn precopy(c: &Cluster, e: &Evacuation, moving: &[VmIdx], a: &Assignment) -> CostReport {
    let _ = e;
    let mut groups = Vec::new();
    for &v in moving {
        groups.push(crate::transmission::Group {
            source: c.vms[v].host,
            members: vec![a[&v]],
            // Page ids do not matter for costing, only their number.
            pages: vec![0; c.vms[v].nonzero_pages as usize],
        });
    }
    let t = Transmission {
        local: BTreeMap::new(),
        short_haul: Vec::new(),
        sequence: BTreeMap::new(),
        joins: 0,
        leaves: 0,
        groups,
    };
    cost_rewriting(c, &t, a)
}
