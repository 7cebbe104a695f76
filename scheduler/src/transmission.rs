//! From a placement to what crosses the network: per destination, which
//! pages it copies locally, which it takes short-haul from a host in its own
//! rack, and which come from a source, grouped by destination set into
//! multicast groups (unicast where the set has one member), in an order
//! that keeps group joins and leaves few.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::content::{Bits, ExactModel};
use crate::model::{Cluster, Evacuation, HostIdx, VmIdx};
use crate::placement::Assignment;

/// Pages a destination takes from a non-evacuated host in its own rack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShortHaul {
    /// The host that holds them.
    pub from: HostIdx,
    /// The destination.
    pub to: HostIdx,
    /// Page ids (into [`ExactModel::universe`]).
    pub pages: Vec<u32>,
}

/// Pages one source sends once to a set of destinations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// The sending (evacuated) host.
    pub source: HostIdx,
    /// Destinations, sorted. One member: unicast; more: multicast.
    pub members: Vec<HostIdx>,
    /// Page ids (into [`ExactModel::universe`]).
    pub pages: Vec<u32>,
}

impl Group {
    /// Whether the group needs multicast.
    pub fn is_multicast(&self) -> bool {
        self.members.len() > 1
    }
}

/// The transmission plan of a placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmission {
    /// Per destination, the pages it already holds and copies locally.
    pub local: BTreeMap<HostIdx, Vec<u32>>,
    /// Rack-local transfers from hosts that hold the pages.
    pub short_haul: Vec<ShortHaul>,
    /// What the sources send.
    pub groups: Vec<Group>,
    /// Per source, its groups (indices into `groups`) in sending order.
    pub sequence: BTreeMap<HostIdx, Vec<usize>>,
    /// Receivers joining a group, summed over every source's sequence.
    pub joins: u64,
    /// Receivers leaving a group, likewise.
    pub leaves: u64,
}

/// Builds the transmission plan for assignment `a`. With `reuse`, a
/// destination copies the pages it already holds and takes pages a
/// rack-mate holds short-haul (pagecast); without, every page it needs
/// comes from a source (VMScatter, which reuses nothing at destinations).
pub fn build(
    m: &ExactModel,
    c: &Cluster,
    e: &Evacuation,
    moving: &[VmIdx],
    a: &Assignment,
    reuse: bool,
) -> Transmission {
    let n = m.universe.len();
    let evacuated: HashSet<HostIdx> = e.from.iter().copied().collect();

    // What each destination needs: the union of its new VMs' pages.
    let mut needed: BTreeMap<HostIdx, Bits> = BTreeMap::new();
    for &v in moving {
        let bits = needed.entry(a[&v]).or_insert_with(|| Bits::new(n));
        for &p in &m.vm_ids[v] {
            bits.set(p as usize);
        }
    }
    // What each source can send.
    let mut source_bits: BTreeMap<HostIdx, Bits> = BTreeMap::new();
    for &v in moving {
        let bits = source_bits
            .entry(c.vms[v].host)
            .or_insert_with(|| Bits::new(n));
        for &p in &m.vm_ids[v] {
            bits.set(p as usize);
        }
    }

    let mut local: BTreeMap<HostIdx, Vec<u32>> = BTreeMap::new();
    let mut short: BTreeMap<(HostIdx, HostIdx), Vec<u32>> = BTreeMap::new();
    let mut short_load: HashMap<HostIdx, u64> = HashMap::new();
    let mut from_source: BTreeMap<HostIdx, Bits> = BTreeMap::new();
    for (&d, bits) in &needed {
        let providers: Vec<HostIdx> = (0..c.hosts.len())
            .filter(|&h| h != d && c.hosts[h].rack == c.hosts[d].rack && !evacuated.contains(&h))
            .collect();
        let remote = from_source.entry(d).or_insert_with(|| Bits::new(n));
        let loc = local.entry(d).or_default();
        for p in 0..n as u32 {
            if !bits.get(p as usize) {
                continue;
            }
            if reuse && m.held(d, p) {
                loc.push(p);
                continue;
            }
            let provider = providers
                .iter()
                .copied()
                .filter(|&h| reuse && m.held(h, p))
                .min_by_key(|h| (short_load.get(h).copied().unwrap_or(0), *h));
            match provider {
                Some(h) => {
                    short.entry((h, d)).or_default().push(p);
                    *short_load.entry(h).or_default() += 1;
                }
                None => remote.set(p as usize),
            }
        }
    }

    // Each page still needed goes once from one source to every
    // destination that lacks it: the source that keeps most of the set in
    // its own rack, then the least loaded.
    let mut groups: BTreeMap<(HostIdx, Vec<HostIdx>), Vec<u32>> = BTreeMap::new();
    let mut source_load: HashMap<HostIdx, u64> = HashMap::new();
    for p in 0..n {
        let set: Vec<HostIdx> = from_source
            .iter()
            .filter(|(_, b)| b.get(p))
            .map(|(&d, _)| d)
            .collect();
        if set.is_empty() {
            continue;
        }
        let racks: HashSet<usize> = set.iter().map(|&d| c.hosts[d].rack).collect();
        let source = source_bits
            .iter()
            .filter(|(_, b)| b.get(p))
            .map(|(&s, _)| s)
            .min_by_key(|&s| {
                let remote_racks = racks.iter().filter(|&&r| r != c.hosts[s].rack).count();
                (remote_racks, source_load.get(&s).copied().unwrap_or(0), s)
            })
            .expect("a needed page comes from some moving VM's source");
        *source_load.entry(source).or_default() += 1;
        groups.entry((source, set)).or_default().push(p as u32);
    }
    let groups: Vec<Group> = groups
        .into_iter()
        .map(|((source, members), pages)| Group {
            source,
            members,
            pages,
        })
        .collect();

    let mut sequence: BTreeMap<HostIdx, Vec<usize>> = BTreeMap::new();
    for (i, g) in groups.iter().enumerate() {
        sequence.entry(g.source).or_default().push(i);
    }
    let (mut joins, mut leaves) = (0, 0);
    for seq in sequence.values_mut() {
        *seq = order_groups(&groups, seq);
        let (j, l) = churn(&groups, seq);
        joins += j;
        leaves += l;
    }
    Transmission {
        local: local.into_iter().filter(|(_, v)| !v.is_empty()).collect(),
        short_haul: short
            .into_iter()
            .map(|((from, to), pages)| ShortHaul { from, to, pages })
            .collect(),
        groups,
        sequence,
        joins,
        leaves,
    }
}

/// Receivers in exactly one of two sorted member lists.
fn distance(a: &[HostIdx], b: &[HostIdx]) -> u64 {
    let (mut i, mut j, mut d) = (0, 0, 0u64);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                d += 1;
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                d += 1;
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                i += 1;
                j += 1;
            }
        }
    }
    d + (a.len() - i + b.len() - j) as u64
}

/// Joins and leaves when `seq` is sent in order: each receiver joins a
/// group it was not in before and leaves one it is not in next.
pub fn churn(groups: &[Group], seq: &[usize]) -> (u64, u64) {
    let mut prev: &[HostIdx] = &[];
    let (mut joins, mut leaves) = (0, 0);
    for &g in seq {
        let cur = &groups[g].members[..];
        joins += cur.iter().filter(|m| !prev.contains(m)).count() as u64;
        leaves += prev.iter().filter(|m| !cur.contains(m)).count() as u64;
        prev = cur;
    }
    leaves += prev.len() as u64;
    (joins, leaves)
}

/// VMScatter-style sequence scheduling: start from the largest destination
/// set, always go to the nearest remaining set (fewest receivers joining or
/// leaving), then improve with 2-opt reversals while they lower the churn.
fn order_groups(groups: &[Group], ids: &[usize]) -> Vec<usize> {
    let mut left: Vec<usize> = ids.to_vec();
    let Some(start) = left.iter().copied().max_by_key(|&g| {
        (
            groups[g].members.len(),
            groups[g].pages.len(),
            std::cmp::Reverse(g),
        )
    }) else {
        return Vec::new();
    };
    let mut seq = vec![start];
    left.retain(|&g| g != start);
    while !left.is_empty() {
        let last = &groups[*seq.last().expect("non-empty")].members;
        let (i, _) = left
            .iter()
            .enumerate()
            .min_by_key(|&(_, &g)| {
                (
                    distance(last, &groups[g].members),
                    std::cmp::Reverse(groups[g].pages.len()),
                    g,
                )
            })
            .expect("non-empty");
        seq.push(left.swap_remove(i));
    }
    // 2-opt: reversing seq[i..k] changes only the two transitions at its
    // ends (the distance is symmetric), with the empty set before the first
    // group and after the last.
    let members = |x: Option<&usize>| -> &[HostIdx] { x.map_or(&[], |&g| &groups[g].members) };
    let mut improved = true;
    let mut passes = 0;
    while improved && passes < 50 && seq.len() <= 2000 {
        improved = false;
        passes += 1;
        for i in 0..seq.len() {
            for k in i + 2..=seq.len() {
                let before = members(i.checked_sub(1).and_then(|p| seq.get(p)));
                let (first, last) = (members(seq.get(i)), members(seq.get(k - 1)));
                let after = members(seq.get(k));
                let old = distance(before, first) + distance(last, after);
                let new = distance(before, last) + distance(first, after);
                if new < old {
                    seq[i..k].reverse();
                    improved = true;
                }
            }
        }
    }
    seq
}
