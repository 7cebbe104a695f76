//! Placement strategies: which destination each moving VM goes to.
//!
//! - `first-fit`: VMs in input order, each to the first destination with
//!   room. The baseline.
//! - `vmscatter`: VMScatter's greedy grouping, blind to what destinations
//!   hold: fill the destination with the most free memory first, seeding it
//!   with the VM that has the most pages identical to other VMs', then
//!   adding the VM with the most pages identical to the group, until it is
//!   full; then the next destination.
//! - `pagecast`: minimises the weighted bytes that must cross the core and
//!   the destination links, counting what destinations and their racks
//!   already hold and what VMs placed together share. Greedy (largest VMs
//!   first, each to its cheapest destination), then local search (moves,
//!   and swaps on small instances) until no move lowers the cost.
//!
//! All three respect memory capacity, anti-affinity groups and pinned VMs,
//! and are deterministic: ties break on the lowest index.

use std::collections::HashMap;

use crate::content::Model;
use crate::model::{Cluster, Evacuation, HostIdx, PlanError, RackIdx, VmIdx};

/// A placement strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// First fit, in input order.
    FirstFit,
    /// VMScatter's content-blind greedy grouping.
    VmScatter,
    /// pagecast's content-aware greedy with local search.
    Pagecast,
}

impl Strategy {
    /// Every strategy, baseline first.
    pub const ALL: [Strategy; 3] = [Strategy::FirstFit, Strategy::VmScatter, Strategy::Pagecast];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::FirstFit => "first-fit",
            Strategy::VmScatter => "vmscatter",
            Strategy::Pagecast => "pagecast",
        }
    }

    /// Parses a name from [`Strategy::name`].
    pub fn parse(s: &str) -> Option<Self> {
        Strategy::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// How the `pagecast` strategy weighs a page by the links it crosses.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    /// Cost of a page crossing the core into a rack, per rack: 1 plus the
    /// rack's oversubscription (sum of host links over the uplink), so the
    /// core counts for more where it is scarcer.
    pub core: Vec<f64>,
    /// Cost of a page crossing a destination's own link.
    pub host: f64,
}

impl Weights {
    /// Weights derived from the cluster's link rates.
    pub fn from_cluster(c: &Cluster) -> Self {
        let core = (0..c.racks.len())
            .map(|r| {
                let hosts: f64 = c
                    .hosts
                    .iter()
                    .filter(|h| h.rack == r)
                    .map(|h| h.link_bps)
                    .sum();
                1.0 + (hosts / c.racks[r].uplink_bps).max(1.0)
            })
            .collect();
        Weights { core, host: 1.0 }
    }
}

/// Tracks capacity and constraints while VMs are placed and moved.
struct Feasibility {
    free: Vec<u64>,
    memory: Vec<u64>,
    groups_of: Vec<Vec<usize>>,
    occupied: HashMap<(usize, HostIdx), u32>,
    pinned: HashMap<VmIdx, HostIdx>,
}

impl Feasibility {
    fn new(c: &Cluster, e: &Evacuation, moving: &[VmIdx]) -> Self {
        let mut groups_of = vec![Vec::new(); c.vms.len()];
        for (g, members) in e.anti_affinity.iter().enumerate() {
            for &v in members {
                groups_of[v].push(g);
            }
        }
        Feasibility {
            free: c.free_memory(moving),
            memory: c.vms.iter().map(|v| v.memory_bytes).collect(),
            groups_of,
            occupied: HashMap::new(),
            pinned: e.pinned.iter().copied().collect(),
        }
    }

    fn can(&self, v: VmIdx, h: HostIdx) -> bool {
        self.free[h] >= self.memory[v]
            && self.pinned.get(&v).is_none_or(|&p| p == h)
            && self.groups_of[v]
                .iter()
                .all(|&g| self.occupied.get(&(g, h)).is_none_or(|&n| n == 0))
    }

    fn put(&mut self, v: VmIdx, h: HostIdx) {
        self.free[h] -= self.memory[v];
        for &g in &self.groups_of[v] {
            *self.occupied.entry((g, h)).or_default() += 1;
        }
    }

    fn take(&mut self, v: VmIdx, h: HostIdx) {
        self.free[h] += self.memory[v];
        for &g in &self.groups_of[v] {
            if let Some(n) = self.occupied.get_mut(&(g, h)) {
                *n -= 1;
            }
        }
    }
}

fn no_room(c: &Cluster, v: VmIdx, f: &Feasibility) -> PlanError {
    let why = match f.pinned.get(&v) {
        Some(&h) => format!(
            " (pinned to {}, which has {} bytes free)",
            c.hosts[h].name, f.free[h]
        ),
        None if !f.groups_of[v].is_empty() => {
            " with room and no anti-affinity conflict".to_string()
        }
        None => " with enough free memory".to_string(),
    };
    PlanError::NoRoom {
        vm: c.vms[v].name.clone(),
        bytes: c.vms[v].memory_bytes,
        why,
    }
}

/// Where each moving VM goes, by VM index.
pub type Assignment = HashMap<VmIdx, HostIdx>;

/// Places `moving` on `e.to` with `strategy`.
pub fn place<M: Model>(
    strategy: Strategy,
    m: &M,
    c: &Cluster,
    e: &Evacuation,
    moving: &[VmIdx],
) -> Result<Assignment, PlanError> {
    let mut f = Feasibility::new(c, e, moving);
    let mut out = Assignment::new();
    // Pinned VMs first, whatever the strategy.
    for &(v, h) in &e.pinned {
        if !f.can(v, h) {
            return Err(no_room(c, v, &f));
        }
        f.put(v, h);
        out.insert(v, h);
    }
    let rest: Vec<VmIdx> = moving
        .iter()
        .copied()
        .filter(|v| !out.contains_key(v))
        .collect();
    let pinned = out.clone();
    let attempt = |f: &mut Feasibility, out: &mut Assignment| match strategy {
        Strategy::FirstFit => first_fit(c, e, &rest, f, out),
        Strategy::VmScatter => vmscatter(m, c, e, &rest, f, out),
        Strategy::Pagecast => pagecast(m, c, e, &rest, f, out, None),
    };
    match attempt(&mut f, &mut out) {
        Ok(()) => Ok(out),
        Err(err @ PlanError::NoRoom { .. }) => {
            // Greedy packing can strand a VM where a feasible placement
            // exists. Find one by bounded search, then (for `pagecast`)
            // improve it by local search.
            let mut f = Feasibility::new(c, e, moving);
            let mut out = pinned;
            for (&v, &h) in &out {
                f.put(v, h);
            }
            if !search(e, &rest, &mut f, &mut out) {
                return Err(err);
            }
            if strategy == Strategy::Pagecast {
                let start = out.clone();
                pagecast(m, c, e, &rest, &mut f, &mut out, Some(start))?;
            }
            Ok(out)
        }
        Err(other) => Err(other),
    }
}

/// Depth-first search for any feasible placement of `rest` (largest VMs
/// first, emptiest destinations first), visiting at most a million nodes.
fn search(e: &Evacuation, rest: &[VmIdx], f: &mut Feasibility, out: &mut Assignment) -> bool {
    let mut order = rest.to_vec();
    order.sort_by_key(|&v| (std::cmp::Reverse(f.memory[v]), v));
    let mut budget: u32 = 1_000_000;
    fn go(
        i: usize,
        order: &[VmIdx],
        e: &Evacuation,
        f: &mut Feasibility,
        out: &mut Assignment,
        budget: &mut u32,
    ) -> bool {
        let Some(&v) = order.get(i) else { return true };
        let mut dests: Vec<HostIdx> = e.to.iter().copied().filter(|&d| f.can(v, d)).collect();
        dests.sort_by_key(|&d| (std::cmp::Reverse(f.free[d]), d));
        for d in dests {
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            f.put(v, d);
            out.insert(v, d);
            if go(i + 1, order, e, f, out, budget) {
                return true;
            }
            f.take(v, d);
            out.remove(&v);
        }
        false
    }
    go(0, &order, e, f, out, &mut budget)
}

fn first_fit(
    c: &Cluster,
    e: &Evacuation,
    rest: &[VmIdx],
    f: &mut Feasibility,
    out: &mut Assignment,
) -> Result<(), PlanError> {
    for &v in rest {
        let d =
            e.to.iter()
                .copied()
                .find(|&d| f.can(v, d))
                .ok_or_else(|| no_room(c, v, f))?;
        f.put(v, d);
        out.insert(v, d);
    }
    Ok(())
}

fn vmscatter<M: Model>(
    m: &M,
    c: &Cluster,
    e: &Evacuation,
    rest: &[VmIdx],
    f: &mut Feasibility,
    out: &mut Assignment,
) -> Result<(), PlanError> {
    // Each VM's count of pages identical to some other moving VM's.
    let mut all = m.empty();
    for &v in rest {
        m.add(&mut all, v);
    }
    let identical: HashMap<VmIdx, f64> = rest
        .iter()
        .map(|&v| {
            m.remove(&mut all, v);
            let n = m.pages(v) - m.missing(v, &all);
            m.add(&mut all, v);
            (v, n)
        })
        .collect();
    let mut targets: Vec<HostIdx> = e.to.clone();
    targets.sort_by_key(|&d| (std::cmp::Reverse(f.free[d]), d));
    let mut unplaced: Vec<VmIdx> = rest.to_vec();
    for t in targets {
        let mut group = m.empty();
        for (&v, &d) in out.iter() {
            if d == t {
                m.add(&mut group, v);
            }
        }
        let mut seeded = out.values().any(|&d| d == t);
        loop {
            let pick = unplaced
                .iter()
                .copied()
                .filter(|&v| f.can(v, t))
                .map(|v| {
                    let score = if seeded {
                        m.pages(v) - m.missing(v, &group)
                    } else {
                        identical[&v]
                    };
                    (v, score)
                })
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
            let Some((v, _)) = pick else { break };
            f.put(v, t);
            out.insert(v, t);
            m.add(&mut group, v);
            unplaced.retain(|&u| u != v);
            seeded = true;
        }
    }
    match unplaced.first() {
        Some(&v) => Err(no_room(c, v, f)),
        None => Ok(()),
    }
}

/// Destination and rack content sets for the `pagecast` strategy.
struct Sets<M: Model> {
    host: HashMap<HostIdx, M::State>,
    rack: HashMap<RackIdx, M::State>,
}

fn pagecast<M: Model>(
    m: &M,
    c: &Cluster,
    e: &Evacuation,
    rest: &[VmIdx],
    f: &mut Feasibility,
    out: &mut Assignment,
    start: Option<Assignment>,
) -> Result<(), PlanError> {
    let mut s = Search {
        m,
        c,
        e,
        w: Weights::from_cluster(c),
        sets: Sets::of(m, c, e),
        f,
        out,
    };
    // With a starting placement (already in `out` and `f`), every VM is
    // in the sets and only local search runs.
    let placed: Vec<(VmIdx, HostIdx)> = s.out.iter().map(|(&v, &d)| (v, d)).collect();
    for (v, d) in placed {
        add_to(m, c, &mut s.sets, v, d);
    }
    // Largest VMs first (they are hardest to fit).
    let mut order: Vec<VmIdx> = rest.to_vec();
    order.sort_by_key(|&v| (std::cmp::Reverse(c.vms[v].memory_bytes), v));
    if start.is_none() {
        s.greedy(&order)?;
    }
    for _pass in 0..m.search_passes() {
        let mut improved = s.moves(&order);
        // Swaps help where capacity blocks single moves; quadratic, so only
        // on small instances.
        if order.len() <= 64 {
            improved |= s.swaps(&order);
        }
        if !improved {
            break;
        }
    }
    Ok(())
}

impl<M: Model> Sets<M> {
    /// Each destination's holdings, and each destination rack's: everything
    /// any host of the rack holds, sources included (a page a source in the
    /// same rack sends never crosses the core).
    fn of(m: &M, c: &Cluster, e: &Evacuation) -> Sets<M> {
        let mut sets = Sets::<M> {
            host: HashMap::new(),
            rack: HashMap::new(),
        };
        for &d in &e.to {
            let mut s = m.empty();
            m.add_holdings(&mut s, d);
            sets.host.insert(d, s);
            let r = c.hosts[d].rack;
            sets.rack.entry(r).or_insert_with(|| {
                let mut s = m.empty();
                for (h, host) in c.hosts.iter().enumerate() {
                    if host.rack == r {
                        m.add_holdings(&mut s, h);
                    }
                }
                s
            });
        }
        sets
    }
}

/// The `pagecast` strategy's search: the content sets as VMs are placed,
/// and what fits where.
struct Search<'a, M: Model> {
    m: &'a M,
    c: &'a Cluster,
    e: &'a Evacuation,
    w: Weights,
    sets: Sets<M>,
    f: &'a mut Feasibility,
    out: &'a mut Assignment,
}

impl<M: Model> Search<'_, M> {
    /// What placing `v` on `d` costs given the sets now: its content the
    /// rack lacks, over the core, and what the host lacks, over its link.
    fn cost(&self, v: VmIdx, d: HostIdx) -> f64 {
        let r = self.c.hosts[d].rack;
        self.w.core[r] * self.m.missing(v, &self.sets.rack[&r])
            + self.w.host * self.m.missing(v, &self.sets.host[&d])
    }

    fn place(&mut self, v: VmIdx, d: HostIdx) {
        self.f.put(v, d);
        self.out.insert(v, d);
        add_to(self.m, self.c, &mut self.sets, v, d);
    }

    fn unplace(&mut self, v: VmIdx, d: HostIdx) {
        remove_from(self.m, self.c, &mut self.sets, v, d);
        self.f.take(v, d);
    }

    /// Each VM of `order` to the destination where it costs least.
    fn greedy(&mut self, order: &[VmIdx]) -> Result<(), PlanError> {
        for &v in order {
            let best = self
                .e
                .to
                .iter()
                .copied()
                .filter(|&d| self.f.can(v, d))
                .map(|d| (d, self.cost(v, d)))
                .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            let Some((d, _)) = best else {
                return Err(no_room(self.c, v, self.f));
            };
            self.place(v, d);
        }
        Ok(())
    }

    /// One pass of single moves. Removing v from its destination lowers
    /// the total cost by exactly cost(v, d) measured without v, and adding
    /// it elsewhere raises it by cost(v, d'), so a move is taken only when
    /// it helps. Returns whether any VM moved.
    fn moves(&mut self, order: &[VmIdx]) -> bool {
        let mut improved = false;
        for &v in order {
            let d1 = self.out[&v];
            self.unplace(v, d1);
            let mut best = (d1, self.cost(v, d1));
            for &d2 in &self.e.to {
                if d2 != d1 && self.f.can(v, d2) {
                    let there = self.cost(v, d2);
                    if there < best.1 - EPS {
                        best = (d2, there);
                    }
                }
            }
            self.place(v, best.0);
            improved |= best.0 != d1;
        }
        improved
    }

    /// One pass of pairwise swaps; returns whether any pair swapped.
    fn swaps(&mut self, order: &[VmIdx]) -> bool {
        let mut improved = false;
        for i in 0..order.len() {
            for j in i + 1..order.len() {
                let (v, u) = (order[i], order[j]);
                let (dv, du) = (self.out[&v], self.out[&u]);
                if dv == du {
                    continue;
                }
                self.unplace(v, dv);
                self.unplace(u, du);
                let before = self.cost(v, dv) + self.cost(u, du);
                let after = self.cost(v, du) + self.cost(u, dv);
                let swap = after < before - EPS && self.f.can(v, du) && {
                    self.f.put(v, du);
                    let ok = self.f.can(u, dv);
                    self.f.take(v, du);
                    ok
                };
                let (nv, nu) = if swap { (du, dv) } else { (dv, du) };
                self.place(v, nv);
                self.place(u, nu);
                improved |= swap;
            }
        }
        improved
    }
}

/// Cost differences below this are ties (floating-point noise).
const EPS: f64 = 1e-9;

fn add_to<M: Model>(m: &M, c: &Cluster, sets: &mut Sets<M>, v: VmIdx, d: HostIdx) {
    m.add(sets.host.get_mut(&d).expect("destination set"), v);
    m.add(sets.rack.get_mut(&c.hosts[d].rack).expect("rack set"), v);
}

fn remove_from<M: Model>(m: &M, c: &Cluster, sets: &mut Sets<M>, v: VmIdx, d: HostIdx) {
    m.remove(sets.host.get_mut(&d).expect("destination set"), v);
    m.remove(sets.rack.get_mut(&c.hosts[d].rack).expect("rack set"), v);
}

/// The `pagecast` objective of a complete assignment, computed from
/// scratch: weighted pages crossing the core into each rack plus pages
/// crossing each destination's link.
pub fn objective<M: Model>(m: &M, c: &Cluster, e: &Evacuation, a: &Assignment) -> f64 {
    let w = Weights::from_cluster(c);
    let mut total = 0.0;
    let mut vms: Vec<(&VmIdx, &HostIdx)> = a.iter().collect();
    vms.sort();
    let mut racks: Vec<RackIdx> = e.to.iter().map(|&d| c.hosts[d].rack).collect();
    racks.sort_unstable();
    racks.dedup();
    for r in racks {
        let mut s = m.empty();
        for (h, host) in c.hosts.iter().enumerate() {
            if host.rack == r {
                m.add_holdings(&mut s, h);
            }
        }
        for &(&v, &d) in &vms {
            if c.hosts[d].rack == r {
                total += w.core[r] * m.missing(v, &s);
                m.add(&mut s, v);
            }
        }
    }
    for &d in &e.to {
        let mut s = m.empty();
        m.add_holdings(&mut s, d);
        for &(&v, &dv) in &vms {
            if dv == d {
                total += w.host * m.missing(v, &s);
                m.add(&mut s, v);
            }
        }
    }
    total
}
