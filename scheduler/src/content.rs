//! What the planner knows about page content, and the two ways it reasons
//! about it.
//!
//! The planner is fed through [`ContentSource`]: VMs' page sets (exact,
//! from manifests or images) or sketches, and which pages each host
//! already holds. Today `pagecast plan` (from a topology file's images)
//! and the tests use [`InMemoryContent`]; nothing reads it from the
//! content index yet.
//!
//! Internally a [`Model`] answers the one question placement asks: how many
//! of VM v's pages are *not* yet in a set of content (a host's, a rack's)?
//! [`ExactModel`] interns every page of the moving VMs to a dense id and
//! keeps per-set counts; [`SketchModel`] estimates from MinHash and
//! HyperLogLog sketches, for clusters too large for exact sets.

use pagecast_pages::{PageHash, Sketch};

use crate::model::{Cluster, HostIdx, VmIdx};

/// The planner's view of content.
pub trait ContentSource {
    /// The sorted, distinct, non-zero pages of a VM, if known exactly.
    fn vm_pages(&self, vm: VmIdx) -> Option<&[PageHash]>;
    /// A sketch of the VM's distinct non-zero pages.
    fn vm_sketch(&self, vm: VmIdx) -> Sketch;
    /// For each page, whether `host` already holds it.
    fn host_holds(&self, host: HostIdx, pages: &[PageHash]) -> Vec<bool>;
    /// A sketch of what `host` holds.
    fn host_sketch(&self, host: HostIdx) -> Sketch;
}

/// Exact page sets held in memory; a host holds what its VMs hold.
#[derive(Debug, Clone)]
pub struct InMemoryContent {
    vm_pages: Vec<Vec<PageHash>>,
    host_pages: Vec<Vec<PageHash>>,
}

impl InMemoryContent {
    /// Content from each VM's pages (any order, duplicates and zero markers
    /// allowed); each host holds the union of its VMs' pages.
    pub fn new(cluster: &Cluster, mut vm_pages: Vec<Vec<PageHash>>) -> Self {
        vm_pages.resize(cluster.vms.len(), Vec::new());
        for p in &mut vm_pages {
            p.retain(|h| !h.is_zero_page());
            p.sort_unstable();
            p.dedup();
        }
        let mut host_pages = vec![Vec::new(); cluster.hosts.len()];
        for (v, vm) in cluster.vms.iter().enumerate() {
            host_pages[vm.host].extend_from_slice(&vm_pages[v]);
        }
        for p in &mut host_pages {
            p.sort_unstable();
            p.dedup();
        }
        InMemoryContent {
            vm_pages,
            host_pages,
        }
    }

    /// Adds content a host holds beyond its VMs (a page cache).
    pub fn add_host_pages(&mut self, host: HostIdx, pages: &[PageHash]) {
        let p = &mut self.host_pages[host];
        p.extend(pages.iter().filter(|h| !h.is_zero_page()));
        p.sort_unstable();
        p.dedup();
    }
}

impl ContentSource for InMemoryContent {
    fn vm_pages(&self, vm: VmIdx) -> Option<&[PageHash]> {
        self.vm_pages.get(vm).map(Vec::as_slice)
    }

    fn vm_sketch(&self, vm: VmIdx) -> Sketch {
        Sketch::of(self.vm_pages.get(vm).into_iter().flatten())
    }

    fn host_holds(&self, host: HostIdx, pages: &[PageHash]) -> Vec<bool> {
        let held = &self.host_pages[host];
        pages
            .iter()
            .map(|p| held.binary_search(p).is_ok())
            .collect()
    }

    fn host_sketch(&self, host: HostIdx) -> Sketch {
        Sketch::of(&self.host_pages[host])
    }
}

/// How placement sees content: sets it can grow and shrink, and how much of
/// a VM a set lacks.
pub trait Model {
    /// A set of content: what a host or a rack holds plus VMs placed there.
    type State: Clone;
    /// An empty set.
    fn empty(&self) -> Self::State;
    /// Adds what `host` held before the evacuation.
    fn add_holdings(&self, s: &mut Self::State, host: HostIdx);
    /// Adds a moving VM's pages.
    fn add(&self, s: &mut Self::State, v: VmIdx);
    /// Removes a moving VM's pages (added before with [`Model::add`]).
    fn remove(&self, s: &mut Self::State, v: VmIdx);
    /// Pages of `v` not in `s`.
    fn missing(&self, v: VmIdx, s: &Self::State) -> f64;
    /// Distinct pages of `v`.
    fn pages(&self, v: VmIdx) -> f64;
    /// Most local-search passes worth making: estimates are noisy, and
    /// chasing noise costs time without lowering the true cost.
    fn search_passes(&self) -> usize {
        16
    }
}

/// Exact sets over the pages of the moving VMs, interned to dense ids.
pub struct ExactModel {
    /// Every distinct page of the moving VMs, sorted; ids index into it.
    pub universe: Vec<PageHash>,
    /// Page ids of each VM (empty for VMs that do not move).
    pub vm_ids: Vec<Vec<u32>>,
    /// Per host, which universe pages it held (for hosts that matter).
    pub holdings: Vec<Option<Bits>>,
}

/// A fixed-size bit set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bits(Vec<u64>);

impl Bits {
    /// `n` clear bits.
    pub fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    /// Sets bit `i`.
    pub fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    /// Whether bit `i` is set.
    pub fn get(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
    /// Adds every bit of `o`.
    pub fn or(&mut self, o: &Bits) {
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a |= b;
        }
    }
}

/// An exact content set: holdings as bits, placed VMs as page counts, and
/// a presence bit per page (held or counted) that [`Model::missing`] reads:
/// one bit per page keeps the hot loop in cache.
#[derive(Debug, Clone)]
pub struct ExactState {
    held: Bits,
    counts: Vec<u16>,
    present: Bits,
}

impl Bits {
    /// Clears bit `i`.
    pub fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

impl ExactModel {
    /// Interns the moving VMs' pages and asks `src` which of them each host
    /// in `hosts` holds.
    pub fn build(
        src: &dyn ContentSource,
        cluster: &Cluster,
        moving: &[VmIdx],
        hosts: &[HostIdx],
    ) -> Result<Self, crate::PlanError> {
        let mut universe: Vec<PageHash> = Vec::new();
        for &v in moving {
            let pages = src
                .vm_pages(v)
                .ok_or_else(|| crate::PlanError::NoPages(cluster.vms[v].name.clone()))?;
            universe.extend(pages.iter().filter(|h| !h.is_zero_page()));
        }
        universe.sort_unstable();
        universe.dedup();
        let mut vm_ids = vec![Vec::new(); cluster.vms.len()];
        for &v in moving {
            let mut ids: Vec<u32> = src
                .vm_pages(v)
                .into_iter()
                .flatten()
                .filter(|h| !h.is_zero_page())
                .map(|h| universe.binary_search(h).expect("interned above") as u32)
                .collect();
            ids.sort_unstable();
            ids.dedup();
            vm_ids[v] = ids;
        }
        let mut holdings = vec![None; cluster.hosts.len()];
        for &h in hosts {
            if holdings[h].is_some() {
                continue;
            }
            let mut bits = Bits::new(universe.len());
            for (i, held) in src.host_holds(h, &universe).into_iter().enumerate() {
                if held {
                    bits.set(i);
                }
            }
            holdings[h] = Some(bits);
        }
        Ok(ExactModel {
            universe,
            vm_ids,
            holdings,
        })
    }

    /// Whether `host` held page `id` (false for hosts not asked about).
    pub fn held(&self, host: HostIdx, id: u32) -> bool {
        self.holdings[host]
            .as_ref()
            .is_some_and(|b| b.get(id as usize))
    }
}

impl Model for ExactModel {
    type State = ExactState;

    fn empty(&self) -> ExactState {
        ExactState {
            held: Bits::new(self.universe.len()),
            counts: vec![0; self.universe.len()],
            present: Bits::new(self.universe.len()),
        }
    }

    fn add_holdings(&self, s: &mut ExactState, host: HostIdx) {
        if let Some(b) = &self.holdings[host] {
            s.held.or(b);
            s.present.or(b);
        }
    }

    fn add(&self, s: &mut ExactState, v: VmIdx) {
        for &p in &self.vm_ids[v] {
            let p = p as usize;
            s.counts[p] = s.counts[p].saturating_add(1);
            s.present.set(p);
        }
    }

    fn remove(&self, s: &mut ExactState, v: VmIdx) {
        for &p in &self.vm_ids[v] {
            let p = p as usize;
            s.counts[p] = s.counts[p].saturating_sub(1);
            if s.counts[p] == 0 && !s.held.get(p) {
                s.present.clear(p);
            }
        }
    }

    fn missing(&self, v: VmIdx, s: &ExactState) -> f64 {
        self.vm_ids[v]
            .iter()
            .filter(|&&p| !s.present.get(p as usize))
            .count() as f64
    }

    fn pages(&self, v: VmIdx) -> f64 {
        self.vm_ids[v].len() as f64
    }
}

/// Estimates from sketches.
pub struct SketchModel {
    vms: Vec<Sketch>,
    vm_pages: Vec<f64>,
    hosts: Vec<Sketch>,
}

/// A sketched content set.
#[derive(Debug, Clone)]
pub struct SketchState {
    holdings: Sketch,
    members: Vec<VmIdx>,
    merged: Sketch,
    size: f64,
}

impl SketchModel {
    /// Sketches of every VM and host, from `src`.
    pub fn build(src: &dyn ContentSource, cluster: &Cluster) -> Self {
        let vms: Vec<Sketch> = (0..cluster.vms.len()).map(|v| src.vm_sketch(v)).collect();
        let vm_pages = vms.iter().map(Sketch::distinct).collect();
        SketchModel {
            vms,
            vm_pages,
            hosts: (0..cluster.hosts.len())
                .map(|h| src.host_sketch(h))
                .collect(),
        }
    }

    /// The sketch of a VM.
    pub fn vm(&self, v: VmIdx) -> &Sketch {
        &self.vms[v]
    }

    fn refresh(&self, s: &mut SketchState) {
        let mut merged = s.holdings.clone();
        for &m in &s.members {
            merged.merge(&self.vms[m]);
        }
        s.size = merged.distinct();
        s.merged = merged;
    }
}

impl Model for SketchModel {
    type State = SketchState;

    fn empty(&self) -> SketchState {
        SketchState {
            holdings: Sketch::default(),
            members: Vec::new(),
            merged: Sketch::default(),
            size: 0.0,
        }
    }

    fn add_holdings(&self, s: &mut SketchState, host: HostIdx) {
        s.holdings.merge(&self.hosts[host]);
        s.merged.merge(&self.hosts[host]);
        s.size = s.merged.distinct();
    }

    fn add(&self, s: &mut SketchState, v: VmIdx) {
        s.members.push(v);
        s.merged.merge(&self.vms[v]);
        s.size = s.merged.distinct();
    }

    fn remove(&self, s: &mut SketchState, v: VmIdx) {
        if let Some(i) = s.members.iter().position(|&m| m == v) {
            s.members.swap_remove(i);
            self.refresh(s);
        }
    }

    fn missing(&self, v: VmIdx, s: &SketchState) -> f64 {
        let a = self.vm_pages[v];
        if s.size == 0.0 {
            return a;
        }
        let j = self.vms[v].jaccard(&s.merged);
        let shared = (j / (1.0 + j) * (a + s.size)).min(a).min(s.size);
        (a - shared).max(0.0)
    }

    fn pages(&self, v: VmIdx) -> f64 {
        self.vm_pages[v]
    }

    fn search_passes(&self) -> usize {
        2
    }
}
