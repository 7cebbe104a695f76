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
    /// Predicted time until every source has sent its last byte.
    pub eviction_s: f64,
    /// The link that decides `eviction_s`.
    pub bottleneck: String,
}

fn secs(bytes: u64, bps: f64) -> f64 {
    bytes as f64 * 8.0 / bps
}

/// Costs `t` on cluster `c`.
pub fn cost(c: &Cluster, t: &Transmission) -> CostReport {
    let mut src: BTreeMap<HostIdx, u64> = BTreeMap::new();
    let mut host_up: BTreeMap<HostIdx, u64> = BTreeMap::new();
    let mut dest: BTreeMap<HostIdx, u64> = BTreeMap::new();
    let mut rack_up: BTreeMap<RackIdx, u64> = BTreeMap::new();
    let mut rack_down: BTreeMap<RackIdx, u64> = BTreeMap::new();
    let mut core = 0u64;
    for g in &t.groups {
        let bytes = g.pages.len() as u64 * PAGE_BYTES;
        *src.entry(g.source).or_default() += bytes;
        let rs = c.hosts[g.source].rack;
        let mut racks: Vec<RackIdx> = g.members.iter().map(|&d| c.hosts[d].rack).collect();
        racks.sort_unstable();
        racks.dedup();
        if racks.iter().any(|&r| r != rs) {
            *rack_up.entry(rs).or_default() += bytes;
        }
        for &r in racks.iter().filter(|&&r| r != rs) {
            core += bytes;
            *rack_down.entry(r).or_default() += bytes;
        }
        for &d in &g.members {
            *dest.entry(d).or_default() += bytes;
        }
    }
    let mut short_haul = 0;
    for s in &t.short_haul {
        let bytes = s.pages.len() as u64 * PAGE_BYTES;
        short_haul += bytes;
        *host_up.entry(s.from).or_default() += bytes;
        *dest.entry(s.to).or_default() += bytes;
    }
    let local = t.local.values().map(|v| v.len() as u64 * PAGE_BYTES).sum();

    let mut worst = (0.0, "nothing to send".to_string());
    let mut consider = |s: f64, what: String| {
        if s > worst.0 {
            worst = (s, what);
        }
    };
    for (&h, &b) in &src {
        consider(
            secs(b, c.hosts[h].link_bps),
            format!("source link of {}", c.hosts[h].name),
        );
    }
    for (&h, &b) in &dest {
        consider(
            secs(b, c.hosts[h].link_bps),
            format!("link of destination {}", c.hosts[h].name),
        );
    }
    for (&r, &b) in &rack_up {
        consider(
            secs(b, c.racks[r].uplink_bps),
            format!("uplink of rack {}", c.racks[r].name),
        );
    }
    for (&r, &b) in &rack_down {
        consider(
            secs(b, c.racks[r].uplink_bps),
            format!("downlink of rack {}", c.racks[r].name),
        );
    }
    if let Some(bps) = c.core_bps {
        consider(secs(core, bps), "core".to_string());
    }
    let host_name = |m: BTreeMap<HostIdx, u64>| -> BTreeMap<String, u64> {
        m.into_iter()
            .map(|(h, b)| (c.hosts[h].name.clone(), b))
            .collect()
    };
    let rack_name = |m: BTreeMap<RackIdx, u64>| -> BTreeMap<String, u64> {
        m.into_iter()
            .map(|(r, b)| (c.racks[r].name.clone(), b))
            .collect()
    };
    CostReport {
        source_total: src.values().sum(),
        source_bytes: host_name(src),
        rack_up_bytes: rack_name(rack_up),
        rack_down_bytes: rack_name(rack_down),
        core_bytes: core,
        destination_bytes: host_name(dest),
        local_bytes: local,
        short_haul_bytes: short_haul,
        eviction_s: worst.0,
        bottleneck: worst.1,
    }
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
    cost(c, &t)
}
