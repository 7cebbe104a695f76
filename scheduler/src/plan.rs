//! Planning a gang evacuation end to end.

use std::collections::BTreeMap;

use crate::content::{ContentSource, ExactModel, Model, SketchModel};
use crate::cost::{CostReport, PAGE_BYTES, cost_rewriting, precopy};
use crate::model::{Cluster, Evacuation, HostIdx, PlanError, VmIdx};
use crate::placement::{Assignment, Strategy, objective, place};
use crate::transmission::{Transmission, build};

/// One strategy's plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The strategy.
    pub strategy: Strategy,
    /// Where each moving VM goes.
    pub assignment: Assignment,
    /// What crosses the network.
    pub transmission: Transmission,
    /// Bytes per link and eviction time.
    pub cost: CostReport,
    /// The same placement moved by per-VM pre-copy.
    pub precopy: CostReport,
    /// The `pagecast` objective of the placement (lower is better).
    pub objective: f64,
}

impl Plan {
    /// Placement sorted by VM index.
    pub fn placement(&self) -> Vec<(VmIdx, HostIdx)> {
        let mut v: Vec<_> = self.assignment.iter().map(|(&a, &b)| (a, b)).collect();
        v.sort_unstable();
        v
    }

    /// Multicast groups (destination sets of two or more).
    pub fn multicast_groups(&self) -> usize {
        self.transmission
            .groups
            .iter()
            .filter(|g| g.is_multicast())
            .count()
    }
}

/// What a placement is judged by first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// The predicted eviction time (the most loaded link), then the bytes
    /// that leave the sources.
    Eviction,
    /// The bytes that leave the sources, then the eviction time.
    Bytes,
}

impl Objective {
    fn key(self, c: &CostReport) -> (f64, f64) {
        match self {
            Objective::Eviction => (c.eviction_s, c.source_total as f64),
            Objective::Bytes => (c.source_total as f64, c.eviction_s),
        }
    }
}

/// A key strictly better than another by more than a rounding error.
fn better(a: (f64, f64), b: (f64, f64)) -> bool {
    let eps = |x: f64| x.abs() * 1e-9 + 1e-12;
    if a.0 < b.0 - eps(b.0) {
        return true;
    }
    (a.0 - b.0).abs() <= eps(b.0) && a.1 < b.1 - eps(b.1)
}

/// Everything shared by the plans of one evacuation.
pub struct Planner<'a> {
    cluster: &'a Cluster,
    evacuation: &'a Evacuation,
    moving: Vec<VmIdx>,
    model: ExactModel,
}

impl<'a> Planner<'a> {
    /// Validates the problem and builds the exact content model (asking
    /// `src` what the hosts of every destination rack hold).
    pub fn new(
        c: &'a Cluster,
        e: &'a Evacuation,
        src: &dyn ContentSource,
    ) -> Result<Self, PlanError> {
        let moving = e.validate(c)?;
        let mut hosts: Vec<HostIdx> = Vec::new();
        for &d in &e.to {
            let r = c.hosts[d].rack;
            hosts.extend((0..c.hosts.len()).filter(|&h| c.hosts[h].rack == r));
        }
        hosts.sort_unstable();
        hosts.dedup();
        let model = ExactModel::build(src, c, &moving, &hosts)?;
        Ok(Planner {
            cluster: c,
            evacuation: e,
            moving,
            model,
        })
    }

    /// VMs that move.
    pub fn moving(&self) -> &[VmIdx] {
        &self.moving
    }

    /// The exact content model.
    pub fn model(&self) -> &ExactModel {
        &self.model
    }

    /// Bytes a per-VM pre-copy sends: every non-zero page of every moving VM.
    pub fn precopy_bytes(&self) -> u64 {
        self.moving
            .iter()
            .map(|&v| self.cluster.vms[v].nonzero_pages * PAGE_BYTES)
            .sum()
    }

    /// Places only.
    pub fn place(&self, s: Strategy) -> Result<Assignment, PlanError> {
        place(s, &self.model, self.cluster, self.evacuation, &self.moving)
    }

    /// Places, builds the transmission plan and costs it.
    pub fn plan(&self, s: Strategy) -> Result<Plan, PlanError> {
        let a = self.place(s)?;
        Ok(self.plan_for(s, a))
    }

    /// The plan of a given assignment.
    pub fn plan_for(&self, s: Strategy, a: Assignment) -> Plan {
        let (c, e) = (self.cluster, self.evacuation);
        // VMScatter as published reuses nothing the destinations hold.
        let t = build(
            &self.model,
            c,
            e,
            &self.moving,
            &a,
            s != Strategy::VmScatter,
        );
        Plan {
            strategy: s,
            cost: cost_rewriting(c, &t, &a),
            precopy: precopy(c, e, &self.moving, &a),
            objective: objective(&self.model, c, e, &a),
            transmission: t,
            assignment: a,
        }
    }

    /// Improves `a` by moving single VMs to other destinations while that
    /// lowers the plan's cost under `obj` (eviction time first, or bytes
    /// first), within capacity; pinned VMs stay and anti-affinity holds.
    /// Stops after `max_passes` passes, or when no move helps.
    pub fn refine(&self, s: Strategy, a: Assignment, obj: Objective, max_passes: usize) -> Plan {
        self.refine_until(s, a, obj, max_passes, None)
    }

    /// As [`Planner::refine`], stopping also at `until` (the best plan found
    /// by then): each step re-plans every moving page, so a large
    /// evacuation bounds its search by time.
    pub fn refine_until(
        &self,
        s: Strategy,
        a: Assignment,
        obj: Objective,
        max_passes: usize,
        until: impl Into<Option<std::time::Instant>>,
    ) -> Plan {
        let until = until.into();
        let late = || until.is_some_and(|u| std::time::Instant::now() >= u);
        let (c, e) = (self.cluster, self.evacuation);
        let mut best = self.plan_for(s, a);
        let pinned: std::collections::HashSet<VmIdx> = e.pinned.iter().map(|p| p.0).collect();
        let mut free = c.free_memory(&self.moving);
        for (&v, &d) in &best.assignment {
            free[d] = free[d].saturating_sub(c.vms[v].memory_bytes);
        }
        for _ in 0..max_passes {
            let mut improved = false;
            for &v in &self.moving {
                if pinned.contains(&v) {
                    continue;
                }
                if late() {
                    return best;
                }
                let from = best.assignment[&v];
                let mem = c.vms[v].memory_bytes;
                for &to in &e.to {
                    if to == from || free[to] < mem {
                        continue;
                    }
                    let conflict = e.anti_affinity.iter().any(|g| {
                        g.contains(&v)
                            && g.iter()
                                .any(|u| *u != v && best.assignment.get(u) == Some(&to))
                    });
                    if conflict {
                        continue;
                    }
                    let mut a = best.assignment.clone();
                    a.insert(v, to);
                    let p = self.plan_for(s, a);
                    if better(obj.key(&p.cost), obj.key(&best.cost)) {
                        free[from] += mem;
                        free[to] -= mem;
                        best = p;
                        improved = true;
                        break;
                    }
                }
            }
            if !improved {
                break;
            }
        }
        best
    }

    /// The objective of an assignment.
    pub fn objective(&self, a: &Assignment) -> f64 {
        objective(&self.model, self.cluster, self.evacuation, a)
    }
}

/// A placement made from sketches, with its estimated cost.
#[derive(Debug, Clone)]
pub struct SketchedPlan {
    /// The strategy.
    pub strategy: Strategy,
    /// Where each moving VM goes.
    pub assignment: Assignment,
    /// The estimated `pagecast` objective.
    pub objective: f64,
    /// Estimated pages crossing the core into each destination rack.
    pub core_pages: BTreeMap<usize, f64>,
}

/// Places from sketches alone (no exact page sets), for clusters where
/// only the index's sketches are at hand.
pub fn place_sketched(
    c: &Cluster,
    e: &Evacuation,
    src: &dyn ContentSource,
    s: Strategy,
) -> Result<SketchedPlan, PlanError> {
    let moving = e.validate(c)?;
    let m = SketchModel::build(src, c);
    let a = place(s, &m, c, e, &moving)?;
    let mut core_pages = BTreeMap::new();
    let mut order: Vec<(VmIdx, HostIdx)> = a.iter().map(|(&v, &d)| (v, d)).collect();
    order.sort_unstable();
    let mut racks: Vec<usize> = e.to.iter().map(|&d| c.hosts[d].rack).collect();
    racks.sort_unstable();
    racks.dedup();
    for r in racks {
        let mut st = m.empty();
        for (h, host) in c.hosts.iter().enumerate() {
            if host.rack == r {
                m.add_holdings(&mut st, h);
            }
        }
        let mut pages = 0.0;
        for &(v, d) in &order {
            if c.hosts[d].rack == r {
                pages += m.missing(v, &st);
                m.add(&mut st, v);
            }
        }
        core_pages.insert(r, pages);
    }
    Ok(SketchedPlan {
        strategy: s,
        objective: objective(&m, c, e, &a),
        assignment: a,
        core_pages,
    })
}
