//! Filling the held migrations' memory: from the destinations' exact needs,
//! each content from one source once, to every destination that lacks it
//! (a cast), or from a rack-mate of the destination (a fetch); the casts
//! paced so that they all run at once within every link's rate.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use pagecast_pages::{PAGE_BYTES, PageHash, PageHashMap, PageHashSet};
use pagecast_proto::v1;

use super::scatter::Stashes;
use super::{EvacuateSpec, Method, Prepared};
use crate::{Event, Services, lock};

/// Most pages one cast session carries (the source stages them in memory).
/// Its request lists 32 bytes of hash and a page number per page, which
/// must fit a control frame ([`pagecast_proto::MAX_CONTROL_FRAME_BYTES`],
/// 4 MiB): 65,536 pages take about 2.3 MiB.
pub(super) const CAST_CHUNK: usize = 65_536;

/// Fewest pages a cast of its own carries: a source's sends to a set of
/// destinations smaller than this go out together in one cast (a cast's
/// set-up, its receivers joining and finishing, costs about as much as
/// sending this many pages at 1 Gbit/s).
const MIN_CAST_PAGES: usize = 2_048;

/// Most contents one request to an intermediary takes from a source (64
/// MiB): a chunk is gathered once all of it is there.
const STASH_CHUNK: usize = 16_384;

/// Cast and fetch figures of a job.
#[derive(Default)]
pub(super) struct Traffic {
    /// Per source: bytes its casts sent.
    pub cast_bytes: BTreeMap<String, u64>,
    pub multicast: u64,
    pub unicast: u64,
    pub repair: u64,
    pub short_haul: u64,
    pub core: u64,
    /// Per destination: frames filled by casts and by fetches.
    pub cast_frames: HashMap<String, u64>,
    pub fetch_frames: HashMap<String, u64>,
    pub errors: Vec<String>,
    /// Destinations a cast found dead or frozen: later casts leave them
    /// out (their migrations fail anyway), so one stuck host holds up each
    /// chain of casts once, not once per cast.
    pub dead: HashSet<String>,
    /// Rack-mates the job fetched from, and intermediaries it scattered
    /// to (the job was opened there).
    pub mates: BTreeSet<String>,
    /// Per source: bytes intermediaries took from it.
    pub scattered: BTreeMap<String, u64>,
}

impl Traffic {
    /// Adds another part of the job's figures (a wave's).
    pub(super) fn absorb(&mut self, t: Traffic) {
        for (k, v) in t.cast_bytes {
            *self.cast_bytes.entry(k).or_default() += v;
        }
        self.multicast += t.multicast;
        self.unicast += t.unicast;
        self.repair += t.repair;
        self.short_haul += t.short_haul;
        self.core += t.core;
        for (k, v) in t.cast_frames {
            *self.cast_frames.entry(k).or_default() += v;
        }
        for (k, v) in t.fetch_frames {
            *self.fetch_frames.entry(k).or_default() += v;
        }
        self.errors.extend(t.errors);
        self.dead.extend(t.dead);
        self.mates.extend(t.mates);
        for (k, v) in t.scattered {
            *self.scattered.entry(k).or_default() += v;
        }
    }
}

/// One source's sends: per content, the destinations it goes to.
pub(super) type SourcePlan = BTreeMap<String, Vec<(PageHash, Vec<String>)>>;

/// Per (destination, rack-mate): the contents the destination fetches from
/// the rack-mate.
pub(super) type Fetches = BTreeMap<(String, String), Vec<PageHash>>;

/// Plans the casts and fetches from the destinations' exact needs: each
/// content from one source, to every destination that lacks it; contents a
/// rack-mate of the destination holds (pagecast only) from that rack-mate.
pub(super) fn plan_transfers(
    prep: &Prepared,
    needs: &HashMap<usize, Vec<PageHash>>,
    method: Method,
    held: &HashMap<String, HashSet<PageHash>>,
) -> (SourcePlan, Fetches) {
    let hosts = Hosts::of(prep);
    let (mut dest_needs, senders) = hosts.needs(prep, needs);
    let fetches = if method == Method::Pagecast {
        rack_mates(prep, &hosts, &mut dest_needs, held)
    } else {
        Fetches::new()
    };
    (hosts.senders_plan(&dest_needs, &senders), fetches)
}

/// The plan's hosts by number (the sets of a plan hold a number per page).
struct Hosts<'a> {
    names: Vec<&'a str>,
}

impl<'a> Hosts<'a> {
    fn of(prep: &'a Prepared) -> Self {
        let mut names: Vec<&str> = Vec::new();
        for m in &prep.moving {
            for h in [m.to.as_str(), m.from.as_str()] {
                if !names.contains(&h) {
                    names.push(h);
                }
            }
        }
        Hosts { names }
    }

    fn num(&self, h: &str) -> usize {
        self.names
            .iter()
            .position(|x| *x == h)
            .expect("a host of the plan")
    }

    /// Per destination, the contents it lacks; per content, the sources
    /// (of the VMs that need it) that can send it.
    fn needs(
        &self,
        prep: &Prepared,
        needs: &HashMap<usize, Vec<PageHash>>,
    ) -> (BTreeMap<usize, PageHashSet>, PageHashMap<Vec<usize>>) {
        let mut dest_needs: BTreeMap<usize, PageHashSet> = BTreeMap::new();
        let mut senders: PageHashMap<Vec<usize>> = PageHashMap::default();
        let mut order: Vec<usize> = needs.keys().copied().collect();
        order.sort_unstable();
        for i in order {
            let m = &prep.moving[i];
            let (d, s) = (self.num(&m.to), self.num(&m.from));
            let dn = dest_needs.entry(d).or_default();
            for h in &needs[&i] {
                dn.insert(*h);
                let v = senders.entry(*h).or_default();
                if !v.contains(&s) {
                    v.push(s);
                }
            }
        }
        (dest_needs, senders)
    }

    /// Each remaining content once, from the least loaded source that has
    /// it, in content order (the plan is the same every time).
    fn senders_plan(
        &self,
        dest_needs: &BTreeMap<usize, PageHashSet>,
        senders: &PageHashMap<Vec<usize>>,
    ) -> SourcePlan {
        let mut members: PageHashMap<Vec<usize>> = PageHashMap::default();
        for (&d, hs) in dest_needs {
            for h in hs {
                members.entry(*h).or_default().push(d);
            }
        }
        let mut contents: Vec<(PageHash, Vec<usize>)> = members.into_iter().collect();
        contents.sort_unstable_by_key(|c| c.0);
        let mut load: Vec<u64> = vec![0; self.names.len()];
        let mut sets: HashMap<Vec<usize>, Vec<String>> = HashMap::new();
        let mut plan = SourcePlan::new();
        for (h, ds) in contents {
            let Some(cands) = senders.get(&h) else {
                continue;
            };
            let src = *cands
                .iter()
                .min_by_key(|&&s| (load[s], self.names[s]))
                .expect("a content someone needs has a sender");
            load[src] += ds.len() as u64;
            let set = sets
                .entry(ds)
                .or_insert_with_key(|ds| ds.iter().map(|&d| self.names[d].to_owned()).collect())
                .clone();
            match plan.get_mut(self.names[src]) {
                Some(sends) => sends.push((h, set)),
                None => {
                    plan.insert(self.names[src].to_owned(), vec![(h, set)]);
                }
            }
        }
        plan
    }
}

/// Takes out of each destination's needs what a rack-mate of it (with an
/// agent, not a source of the job) holds: those contents are fetched from
/// the rack-mate.
fn rack_mates(
    prep: &Prepared,
    hosts: &Hosts<'_>,
    dest_needs: &mut BTreeMap<usize, PageHashSet>,
    held: &HashMap<String, HashSet<PageHash>>,
) -> Fetches {
    let sources: HashSet<&str> = prep.moving.iter().map(|m| m.from.as_str()).collect();
    let mut fetches = Fetches::new();
    for (&d, hs) in dest_needs.iter_mut() {
        let dname = hosts.names[d];
        let rack = prep.view.rack_of(dname);
        let mates: Vec<(&str, &HashSet<PageHash>)> = prep
            .view
            .hosts
            .iter()
            .filter(|h| {
                h.name != dname
                    && !h.address.is_empty()
                    && !sources.contains(h.name.as_str())
                    && !h.rack.is_empty()
                    && prep.view.rack_of(&h.name) == rack
            })
            .filter_map(|h| held.get(&h.name).map(|s| (h.name.as_str(), s)))
            .collect();
        if mates.is_empty() {
            continue;
        }
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
    fetches
}

/// How long an intermediary may take to fetch `pages` from a source: four
/// times their bits at the slower of the two links (1 Gbit/s where both
/// are unknown; the source's is shared with its casts), plus 5 s to set
/// up. One that has not answered by then (frozen) is given up, and the
/// rest of its share cast instead.
pub(super) fn stash_deadline(
    pages: usize,
    link: &dyn Fn(&str) -> u64,
    (src, inter): (&str, &str),
) -> Duration {
    let bps = [link(src), link(inter)]
        .into_iter()
        .filter(|&b| b > 0)
        .min()
        .unwrap_or(1_000_000_000);
    let secs = pages as f64 * PAGE_BYTES as f64 * 8.0 / bps as f64;
    Duration::from_secs_f64(5.0 + 4.0 * secs)
}

/// The multicast group of a job's cast `source` (its index among the
/// job's casts) and its `group`: distinct for every index below 10,000 and
/// group below 250, since the job's casts run at once. The caller numbers
/// chunk `c` of cast `n` as `n * 8 + c % 8`: distinct for the first 1,250
/// casts of a job.
pub(super) fn group_addr(job: &str, source: usize, group: usize) -> String {
    let j = job
        .bytes()
        .fold(7u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
    let x = (j as usize + source) % 200 + 20;
    let y = group % 250 + 1;
    let port = 40_000 + 2 * (group / 250) + 400 * ((source / 200) % 50);
    format!("239.193.{x}.{y}:{port}")
}

/// One cast: a source's sends to a set of destinations.
#[derive(Debug)]
pub(super) struct CastTask {
    pub source: String,
    pub sends: Vec<(PageHash, Vec<String>)>,
    /// The hosts whose links its datagrams arrive on: its destinations,
    /// or, where the network floods multicast, every destination of the job.
    pub reaches: BTreeSet<String>,
    /// Its bits per second (None: unpaced).
    pub rate: Option<u64>,
    /// Its expected seconds at `rate` (pages when unpaced): the larger go
    /// first.
    pub weight: f64,
}

/// Splits every source's sends into casts by destination set, smaller
/// sets of a source merged into one cast, and paces them so that they can
/// all run at once ([`share_links`]): each link is shared among the casts
/// that cross it in proportion to their pages, so that every cast ends
/// when the busiest link it crosses has carried all it must. A source's
/// link is the operator's `--bandwidth` if given, else its own rate;
/// unknown links leave the casts unpaced (and [`schedule_casts`] then runs
/// them one per source and destination at a time).
pub(super) fn cast_tasks(
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
        for sends in by_destination_set(sends) {
            let footprint: BTreeSet<String> = sends
                .iter()
                .flat_map(|(_, ds)| ds.iter().cloned())
                .collect();
            tasks.push(CastTask {
                source: src.clone(),
                sends,
                reaches: if floods { everyone.clone() } else { footprint },
                rate: None,
                weight: 0.0,
            });
        }
    }
    let cap = |end: &LinkEnd| match end {
        LinkEnd::Out(h) => bandwidth.unwrap_or_else(|| link(h)),
        LinkEnd::In(h) => link(h),
    };
    share_links(&mut tasks, &cap);
    for t in &mut tasks {
        let bits = t.sends.len() as f64 * PAGE_BYTES as f64 * 8.0;
        t.weight = t
            .rate
            .map_or(t.sends.len() as f64, |r| bits / r.max(1) as f64);
    }
    tasks
}

/// One direction of a host's link.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum LinkEnd {
    /// What the host sends.
    Out(String),
    /// What the host receives.
    In(String),
}

/// Paces every cast for all of them to run at once: a cast gets, of each
/// link end it crosses (its source's sending side, the receiving side of
/// every host its datagrams reach), the share its pages are of all pages
/// crossing that end, and its rate is the smallest of those shares, less
/// 3% for the datagrams' headers. No link end is then asked for more than
/// it carries, and the casts crossing the busiest end all end together,
/// when it has carried its pages at its rate. A cast crossing an end of
/// unknown rate (`cap` 0) is left unpaced.
pub(super) fn share_links(tasks: &mut [CastTask], cap: &dyn Fn(&LinkEnd) -> u64) {
    let ends = |t: &CastTask| -> Vec<LinkEnd> {
        std::iter::once(LinkEnd::Out(t.source.clone()))
            .chain(t.reaches.iter().map(|d| LinkEnd::In(d.clone())))
            .collect()
    };
    let mut load: HashMap<LinkEnd, f64> = HashMap::new();
    for t in tasks.iter() {
        for e in ends(t) {
            *load.entry(e).or_default() += t.sends.len() as f64;
        }
    }
    for t in tasks.iter_mut() {
        let pages = t.sends.len() as f64;
        let shares: Option<Vec<f64>> = ends(t)
            .iter()
            .map(|e| {
                let c = cap(e);
                (c > 0).then(|| c as f64 * pages / load[e].max(1.0))
            })
            .collect();
        t.rate = shares
            .and_then(|s| s.into_iter().reduce(f64::min))
            .map(|r| ((r * 0.97) as u64).max(1));
    }
}

/// A source's sends grouped by destination set, the sets smaller than
/// [`MIN_CAST_PAGES`] together in one group.
fn by_destination_set(sends: &[(PageHash, Vec<String>)]) -> Vec<Vec<(PageHash, Vec<String>)>> {
    let mut by_set: BTreeMap<Vec<String>, Vec<(PageHash, Vec<String>)>> = BTreeMap::new();
    for (h, ds) in sends {
        let mut key = ds.clone();
        key.sort();
        by_set.entry(key).or_default().push((*h, ds.clone()));
    }
    let mut rest = Vec::new();
    let mut own = Vec::new();
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
    own
}

/// Runs `tasks` with `run`: every paced cast at once (their rates share
/// the links, [`share_links`]); an unpaced one only while no other unpaced
/// cast shares its source or a destination, since a destination that hears
/// two unpaced sources at once drops what its link cannot take
/// (`pagecast-evaluate` measured 600 packets dropped by the destinations'
/// shapers and 16-111 MiB of repairs with two sources casting at full
/// rate to one 1 Gbit/s destination at once). Whenever a cast ends, the
/// longest waiting ones that can start do.
pub(super) fn schedule_casts(mut tasks: Vec<CastTask>, run: &(dyn Fn(usize, &CastTask) + Sync)) {
    order_casts(&mut tasks);
    let mut pending: Vec<(usize, CastTask)> = tasks.into_iter().enumerate().collect();
    let (tx, rx) = mpsc::channel::<(usize, CastTask)>();
    std::thread::scope(|s| {
        // What the running unpaced casts use.
        let mut sources: HashSet<String> = HashSet::new();
        let mut dests: HashSet<String> = HashSet::new();
        let mut running = 0usize;
        loop {
            let mut i = 0;
            while i < pending.len() {
                let t = &pending[i].1;
                if t.rate.is_none()
                    && (sources.contains(&t.source) || t.reaches.iter().any(|d| dests.contains(d)))
                {
                    i += 1;
                    continue;
                }
                let (n, t) = pending.remove(i);
                if t.rate.is_none() {
                    sources.insert(t.source.clone());
                    dests.extend(t.reaches.iter().cloned());
                }
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
            if t.rate.is_none() {
                sources.remove(&t.source);
                for d in &t.reaches {
                    dests.remove(d);
                }
            }
        }
    });
}

/// A transfer of a job: chunk `1` of cast task `0` (in the order
/// [`order_casts`] gives), or the fetch into a destination from a
/// rack-mate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Unit {
    Cast(usize, usize),
    Fetch(String, String),
    /// An intermediary taking contents from a source (and telling the
    /// destinations where to gather them).
    Stash(String, String),
}

/// Releases each held VM once every transfer that brings its destination
/// contents the VM lacks has ended (well or not: what a failed transfer
/// did not bring travels in the VM's own migration), rather than when the
/// job's last transfer ends. A VM no transfer feeds goes at once.
pub(super) struct Releases<'r> {
    /// Per transfer: the VMs waiting for it.
    waiting: HashMap<Unit, Vec<usize>>,
    /// Per held VM: transfers it still waits for.
    left: Mutex<HashMap<usize, usize>>,
    /// Transfers that ended (one that is told twice counts once).
    ended: Mutex<HashSet<Unit>>,
    release: &'r (dyn Fn(usize) + Sync),
}

impl<'r> Releases<'r> {
    /// Which VM waits for which transfer: `needs` per VM (by index into
    /// `to`, its destination), the casts in order and the fetches.
    pub(super) fn new(
        to: &dyn Fn(usize) -> String,
        needs: &HashMap<usize, Vec<PageHash>>,
        tasks: &[CastTask],
        fetches: &Fetches,
        stashes: &Stashes,
        release: &'r (dyn Fn(usize) + Sync),
    ) -> Self {
        // Per destination: each content it lacks, and the VMs lacking it.
        let mut lacking: HashMap<String, HashMap<PageHash, Vec<usize>>> = HashMap::new();
        for (&i, hs) in needs {
            let by = lacking.entry(to(i)).or_default();
            for h in hs {
                by.entry(*h).or_default().push(i);
            }
        }
        let mut waiting: HashMap<Unit, BTreeSet<usize>> = HashMap::new();
        let mut feed = |unit: Unit, d: &str, h: &PageHash| {
            if let Some(vms) = lacking.get(d).and_then(|m| m.get(h)) {
                waiting.entry(unit).or_default().extend(vms.iter().copied());
            }
        };
        for (n, t) in tasks.iter().enumerate() {
            for (ci, chunk) in t.sends.chunks(CAST_CHUNK).enumerate() {
                for (h, ds) in chunk {
                    for d in ds {
                        feed(Unit::Cast(n, ci), d, h);
                    }
                }
            }
        }
        for ((d, mate), hs) in fetches {
            for h in hs {
                feed(Unit::Fetch(d.clone(), mate.clone()), d, h);
            }
        }
        for ((src, inter), items) in stashes {
            for (h, d) in items {
                feed(Unit::Stash(src.clone(), inter.clone()), d, h);
            }
        }
        let mut left: HashMap<usize, usize> = needs.keys().map(|&i| (i, 0)).collect();
        for vms in waiting.values() {
            for i in vms {
                *left.entry(*i).or_default() += 1;
            }
        }
        Releases {
            waiting: waiting
                .into_iter()
                .map(|(u, vms)| (u, vms.into_iter().collect()))
                .collect(),
            left: Mutex::new(left),
            ended: Mutex::new(HashSet::new()),
            release,
        }
    }

    /// Releases the VMs that wait for no transfer.
    pub(super) fn start(&self) {
        let ready: Vec<usize> = {
            let mut left = lock(&self.left);
            let ready: Vec<usize> = left
                .iter()
                .filter(|&(_, &n)| n == 0)
                .map(|(&i, _)| i)
                .collect();
            for i in &ready {
                left.remove(i);
            }
            ready
        };
        for i in ready {
            (self.release)(i);
        }
    }

    /// Transfer `u` ended: releases the VMs it was the last wait of.
    pub(super) fn ended(&self, u: &Unit) {
        let Some(vms) = self.waiting.get(u) else {
            return;
        };
        if !lock(&self.ended).insert(u.clone()) {
            return;
        }
        let mut ready = Vec::new();
        {
            let mut left = lock(&self.left);
            for i in vms {
                if let Some(n) = left.get_mut(i) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        // Released once: gone from the waits.
                        left.remove(i);
                        ready.push(*i);
                    }
                }
            }
        }
        for i in ready {
            (self.release)(i);
        }
    }
}

/// The order casts are numbered and started in: the longest first.
pub(super) fn order_casts(tasks: &mut [CastTask]) {
    tasks.sort_by(|a, b| b.weight.total_cmp(&a.weight));
}

/// One cast session of a source: its request and what it carries.
struct Session {
    req: v1::CastSendRequest,
    receivers: Vec<String>,
    /// Per group: its members and its pages.
    groups: Vec<(Vec<String>, usize)>,
    pages: usize,
}

/// Fills the held migrations: plans, casts and fetches.
pub(super) struct Filler<'a> {
    svc: &'a Services,
    spec: &'a EvacuateSpec,
    prep: &'a Prepared,
    on: &'a (dyn Fn(Event) + Sync),
    traffic: Mutex<Traffic>,
}

impl<'a> Filler<'a> {
    pub(super) fn new(
        svc: &'a Services,
        spec: &'a EvacuateSpec,
        prep: &'a Prepared,
        on: &'a (dyn Fn(Event) + Sync),
    ) -> Self {
        Filler {
            svc,
            spec,
            prep,
            on,
            traffic: Mutex::new(Traffic::default()),
        }
    }

    /// Casts and fetches every need: rack-mates that can serve a
    /// destination's needs are the index's answer of a moment ago, asked
    /// when planning. Each VM is released (`release`) once the transfers
    /// that bring what it lacks have ended ([`Releases`]).
    pub(super) fn fill(
        self,
        needs: &HashMap<usize, Vec<PageHash>>,
        release: &(dyn Fn(usize) + Sync),
    ) -> Traffic {
        let (mut plan, fetches) =
            plan_transfers(self.prep, needs, self.spec.method, &self.prep.held);
        let link = |h: &str| self.prep.view.host(h).map_or(0, |h| h.link_bps);
        let stashes = self.scatter(&mut plan, &link);
        let mut tasks = cast_tasks(
            &plan,
            &link,
            self.spec.bandwidth_bps,
            self.spec.multicast_floods,
        );
        order_casts(&mut tasks);
        let to = |i: usize| self.prep.moving[i].to.clone();
        let releases = Releases::new(&to, needs, &tasks, &fetches, &stashes, release);
        let uses = super::scatter::gatherer_counts(&stashes, needs, &to);
        // Casts instead of a failed stash are numbered after the planned
        // ones, so that no two casts of the job share a group.
        let planned = tasks.len();
        releases.start();
        std::thread::scope(|s| {
            let (me, rel, uses) = (&self, &releases, &uses);
            s.spawn(move || schedule_casts(tasks, &|n, t| me.casts(n, t, rel)));
            for ((d, mate), hs) in &fetches {
                s.spawn(move || {
                    me.fetch(d, mate, hs);
                    rel.ended(&Unit::Fetch(d.clone(), mate.clone()));
                });
            }
            for (k, ((src, inter), items)) in stashes.iter().enumerate() {
                s.spawn(move || {
                    me.stash((planned + k, src, inter), items, uses);
                    rel.ended(&Unit::Stash(src.clone(), inter.clone()));
                });
            }
        });
        self.traffic.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    /// `--scatter`: takes out of `plan` what goes to intermediaries.
    fn scatter(&self, plan: &mut SourcePlan, link: &dyn Fn(&str) -> u64) -> Stashes {
        if !self.spec.scatter || self.spec.method != Method::Pagecast {
            return Stashes::new();
        }
        let spare = super::scatter::intermediaries(self.prep);
        let gatherers = super::scatter::gatherers(self.prep);
        let stashes = super::scatter::plan(plan, link, &spare, &gatherers);
        let pages: usize = stashes.values().map(Vec::len).sum();
        let to: BTreeSet<&str> = stashes.keys().map(|(_, i)| i.as_str()).collect();
        (self.on)(Event::Step(if spare.is_empty() {
            "scatter: nothing to scatter (no host to take pages: every other host with an \
             agent, a known link and free memory is cordoned, or there is none)"
                .to_owned()
        } else if pages == 0 {
            format!(
                "scatter: nothing to scatter ({} possible intermediaries; the destinations' \
                 links keep up with the sources', or cannot gather, or a link is unknown)",
                spare.len()
            )
        } else {
            format!(
                "scatter: {pages} pages to {} intermediaries ({}), gathered after post-copy",
                to.len(),
                to.into_iter().collect::<Vec<_>>().join(", ")
            )
        }));
        stashes
    }

    /// Has intermediary `inter` take `items` from source `src`, a chunk at
    /// a time, and tells each destination where to gather a chunk's
    /// contents once they are all there. Where the intermediary fails (the
    /// job cannot be opened there, or a chunk fails), the rest is cast from
    /// the source to its destinations instead ([`Filler::cast_instead`]),
    /// as the job's cast number `k`.
    fn stash(
        &self,
        (k, src, inter): (usize, &str, &str),
        items: &[(PageHash, String)],
        uses: &HashMap<(PageHash, String), u8>,
    ) {
        (self.on)(Event::Step(format!(
            "{src}: {} pages to intermediary {inter}",
            items.len()
        )));
        let link = |h: &str| self.prep.view.host(h).map_or(0, |h| h.link_bps);
        let mut dests: Vec<&str> = items.iter().map(|x| x.1.as_str()).collect();
        dests.sort_unstable();
        dests.dedup();
        let opened =
            super::jobs::open_stash(self.svc, self.prep, &self.spec.job, (src, inter), &dests);
        // Closed at the end where it was opened: a host that did not
        // answer (frozen) is not asked again.
        if opened.is_ok() {
            lock(&self.traffic).mates.insert(inter.to_owned());
        }
        if let Err(e) = opened {
            lock(&self.traffic)
                .errors
                .push(format!("scatter to {inter}: {e}"));
            self.cast_instead(k, src, items);
            return;
        }
        for (c, chunk) in items.chunks(STASH_CHUNK).enumerate() {
            let hashes: Vec<PageHash> = chunk.iter().map(|x| x.0).collect();
            let gatherers: Vec<u8> = chunk
                .iter()
                .map(|x| uses.get(x).copied().unwrap_or(1))
                .collect();
            let r = self.order_fetch(
                (inter, src),
                (&hashes, gatherers),
                v1::FetchMode::IntoStash,
                stash_deadline(hashes.len(), &link, (src, inter)),
            );
            let why = match r {
                Ok(f) if f.error.is_none() => {
                    *lock(&self.traffic)
                        .scattered
                        .entry(src.to_owned())
                        .or_default() += f.bytes;
                    // What the source no longer held (its guests rewrote
                    // it) travels in the VM's own migration.
                    let missing: HashSet<PageHash> =
                        pagecast_pages::packed::unpack(&f.missing, hashes.len())
                            .unwrap_or_else(|_| hashes.clone())
                            .into_iter()
                            .collect();
                    let there: Vec<(PageHash, String)> = chunk
                        .iter()
                        .filter(|x| !missing.contains(&x.0))
                        .cloned()
                        .collect();
                    self.gather_at(inter, &there);
                    continue;
                }
                Ok(f) => {
                    let e = pagecast_proto::refusal_text(&f.error).to_owned();
                    format!("kept {} of {} pages: {e}", f.pages, hashes.len())
                }
                Err(e) => e.to_string(),
            };
            lock(&self.traffic)
                .errors
                .push(format!("scatter from {src} to {inter}: {why}"));
            self.cast_instead(k, src, &items[c * STASH_CHUNK..]);
            return;
        }
    }

    /// Casts `items` (contents an intermediary failed to take, each with
    /// the destination that lacks it) from `src` after all, at the slower
    /// of its link and theirs; the cast's loss control slows it where
    /// other casts still share a link. `k` is its number among the job's
    /// casts (after the planned ones), which its groups are named by.
    fn cast_instead(&self, k: usize, src: &str, items: &[(PageHash, String)]) {
        let link = |h: &str| self.prep.view.host(h).map_or(0, |h| h.link_bps);
        let sends: Vec<(PageHash, Vec<String>)> =
            items.iter().map(|(h, d)| (*h, vec![d.clone()])).collect();
        let slowest = items
            .iter()
            .map(|(_, d)| link(d))
            .chain([link(src)])
            .min()
            .unwrap_or(0);
        let rate = (slowest > 0).then(|| slowest / 100 * 97);
        for (ci, chunk) in sends.chunks(CAST_CHUNK).enumerate() {
            let dead = lock(&self.traffic).dead.clone();
            let idx = k * 8 + ci % 8;
            if let Some(session) = self.session(chunk, &dead, idx, rate)
                && !self.cast(src, session, rate)
            {
                return;
            }
        }
    }

    /// Has the agent of `at` fetch `hashes` from the agent of `from` in
    /// the job, as `mode` says (contents of the cluster-wide domain), with
    /// how many VMs gather each (mode `INTO_STASH`; empty: one each).
    fn order_fetch(
        &self,
        (at, from): (&str, &str),
        (hashes, gatherers): (&[PageHash], Vec<u8>),
        mode: v1::FetchMode,
        within: Duration,
    ) -> Result<v1::FetchResult, pagecast_agent_api::ClientError> {
        self.svc.agents.fetch(
            self.prep.address(at),
            v1::FetchRequest {
                job: self.spec.job.clone(),
                from: self.prep.address(from).to_owned(),
                hashes: pagecast_pages::packed::pack(hashes).into(),
                mode: mode as i32,
                domain: String::new(),
                gatherers: gatherers.into(),
            },
            within,
        )
    }

    /// Tells each destination of `items` to gather its contents from
    /// intermediary `inter` after switching over: every destination at
    /// once, leaving out those found dead or frozen. One that cannot be
    /// reached is counted so (its migrations fail anyway), so that a
    /// frozen destination costs the stash one request's deadline, not one
    /// per chunk.
    fn gather_at(&self, inter: &str, items: &[(PageHash, String)]) {
        let dead = lock(&self.traffic).dead.clone();
        let mut by: BTreeMap<&str, Vec<PageHash>> = BTreeMap::new();
        for (h, d) in items.iter().filter(|(_, d)| !dead.contains(d)) {
            by.entry(d.as_str()).or_default().push(*h);
        }
        let by: Vec<(&str, Vec<PageHash>)> = by.into_iter().collect();
        let answers = crate::at_once(&by, |(d, hs)| {
            self.order_fetch(
                (d, inter),
                (hs, Vec::new()),
                v1::FetchMode::GatherLater,
                Duration::from_secs(10),
            )
        });
        let mut tr = lock(&self.traffic);
        for ((d, _), r) in by.into_iter().zip(answers) {
            let failed = match r {
                Ok(f) => f.error.map(|e| e.message),
                Err(e) => {
                    if e.code() == v1::RefusalCode::Unavailable {
                        tr.dead.insert(d.to_owned());
                    }
                    Some(e.to_string())
                }
            };
            if let Some(e) = failed {
                tr.errors.push(format!("gather plan at {d}: {e}"));
            }
        }
    }

    /// Fetches `hashes` into destination `d` from its rack-mate `mate`.
    fn fetch(&self, d: &str, mate: &str, hashes: &[PageHash]) {
        (self.on)(Event::Step(format!(
            "{d}: fetching {} pages from rack-mate {mate}",
            hashes.len()
        )));
        let within = Duration::from_secs(30 + hashes.len() as u64 / 2_000);
        lock(&self.traffic).mates.insert(mate.to_owned());
        let r =
            super::jobs::open_fetch(self.svc, self.prep, &self.spec.job, d, mate).and_then(|()| {
                self.order_fetch(
                    (d, mate),
                    (hashes, Vec::new()),
                    v1::FetchMode::IntoVms,
                    within,
                )
            });
        let mut t = lock(&self.traffic);
        match r {
            Ok(f) => {
                t.short_haul += f.bytes;
                *t.fetch_frames.entry(d.to_owned()).or_default() += f.frames_filled;
                if let Some(e) = &f.error {
                    t.errors.push(format!("fetch into {d}: {e}"));
                }
            }
            Err(e) => t.errors.push(format!("fetch into {d}: {e}")),
        }
    }

    /// Runs cast task `t` (the `n`th of the job), chunk by chunk, telling
    /// `rel` as each chunk ends (or is given up with its source).
    fn casts(&self, n: usize, t: &CastTask, rel: &Releases) {
        let mut gave_up = false;
        for (ci, chunk) in t.sends.chunks(CAST_CHUNK).enumerate() {
            if !gave_up {
                let dead = lock(&self.traffic).dead.clone();
                if let Some(session) = self.session(chunk, &dead, n * 8 + ci % 8, t.rate) {
                    gave_up = !self.cast(&t.source, session, t.rate);
                }
            }
            rel.ended(&Unit::Cast(n, ci));
        }
    }

    /// The cast session of `chunk`, leaving out `dead` destinations; None
    /// if no live destination needs any of it. Its groups are numbered
    /// from `idx`.
    fn session(
        &self,
        chunk: &[(PageHash, Vec<String>)],
        dead: &HashSet<String>,
        idx: usize,
        rate: Option<u64>,
    ) -> Option<Session> {
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
            return None;
        }
        let receivers: Vec<String> = receivers.into_iter().collect();
        // Largest groups first: the most shared pages go out first. The
        // session's pages are numbered group by group, so each group is
        // one range of page numbers (the receivers' page lists stay small).
        let mut by_group: Vec<(Vec<String>, Vec<&PageHash>)> = groups.into_iter().collect();
        by_group.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(b.1.len().cmp(&a.1.len())));
        let mut hashes = Vec::with_capacity(chunk.len() * 32);
        let mut req_groups = Vec::with_capacity(by_group.len());
        let mut sizes = Vec::with_capacity(by_group.len());
        let mut next = 0u32;
        for (g, (members, hs)) in by_group.into_iter().enumerate() {
            let first = next;
            for h in &hs {
                hashes.extend_from_slice(h.as_bytes());
            }
            next += hs.len() as u32;
            sizes.push((members.clone(), hs.len()));
            req_groups.push(v1::JobCastGroup {
                members,
                pages: (first..next).collect(),
                addr: group_addr(&self.spec.job, idx, g),
            });
        }
        Some(Session {
            req: v1::CastSendRequest {
                job: self.spec.job.clone(),
                hashes: hashes.into(),
                groups: req_groups,
                receivers: receivers.clone(),
                rate_bps: rate.unwrap_or(0),
                transport: self.spec.transport as i32,
            },
            receivers,
            groups: sizes,
            pages: next as usize,
        })
    }

    /// Runs one cast session from `source` and its receivers' sides;
    /// false if the source could not start it (the rest of its casts are
    /// given up).
    fn cast(&self, source: &str, s: Session, rate: Option<u64>) -> bool {
        (self.on)(Event::Step(format!(
            "{source}: casting {} pages to {}",
            s.pages,
            s.receivers.join(", ")
        )));
        // How long the cast may take: its bytes at the source's rate (1
        // Gbit/s if unknown), doubled, plus set-up; an agent silent past
        // that is frozen.
        let bytes = s.pages as f64 * PAGE_BYTES as f64 * s.receivers.len() as f64;
        let within = Duration::from_secs_f64(
            bytes * 8.0 / rate.unwrap_or(1_000_000_000).max(1) as f64 * 2.0 + 30.0,
        );
        let (open, pending) =
            match self
                .svc
                .agents
                .cast_send(self.prep.address(source), s.req.clone(), within)
            {
                Ok(x) => x,
                Err(e) => {
                    lock(&self.traffic)
                        .errors
                        .push(format!("cast from {source}: {e}"));
                    return false;
                }
            };
        let answered = self.receive(&s.receivers, &open.control, within, || pending.result());
        self.account(source, &s, answered);
        true
    }

    /// Tells every receiver to join the cast at `control`, waits for the
    /// sender (`sent`), then gives the receivers 15 s more: one that hangs
    /// must not hold the job.
    fn receive(
        &self,
        receivers: &[String],
        control: &str,
        within: Duration,
        sent: impl FnOnce() -> Result<v1::CastResult, pagecast_agent_api::ClientError>,
    ) -> Answered {
        let (rtx, rrx) = mpsc::channel::<(String, Result<v1::CastResult, String>)>();
        for r in receivers {
            let (rtx, r) = (rtx.clone(), r.clone());
            let req = v1::CastRecvRequest {
                job: self.spec.job.clone(),
                control: control.to_owned(),
            };
            let addr = self.prep.address(&r).to_owned();
            let agents = self.svc.agents.clone();
            // Not joined: a receiver that hangs is left behind (its call
            // ends at its own deadline).
            std::thread::spawn(move || {
                let res = agents
                    .cast_recv(&addr, req, within)
                    .map_err(|e| e.to_string());
                let _ = rtx.send((r, res));
            });
        }
        drop(rtx);
        let sent = sent();
        let mut results = Vec::new();
        let grace = Instant::now() + Duration::from_secs(15);
        while results.len() < receivers.len() {
            match rrx.recv_timeout(grace.saturating_duration_since(Instant::now())) {
                Ok(x) => results.push(x),
                Err(_) => break,
            }
        }
        Answered {
            sent,
            silent: receivers
                .iter()
                .filter(|r| !results.iter().any(|(x, _)| x == *r))
                .cloned()
                .collect(),
            results,
        }
    }

    /// Adds what a cast session did to the job's figures.
    fn account(&self, source: &str, s: &Session, a: Answered) {
        let mut tr = lock(&self.traffic);
        for r in a.silent {
            tr.errors
                .push(format!("cast into {r}: its agent did not answer (frozen?)"));
            tr.dead.insert(r);
        }
        for (r, res) in a.results {
            match res {
                Ok(c) => {
                    *tr.cast_frames.entry(r.clone()).or_default() += c.frames_filled;
                    if !c.ok {
                        tr.errors.push(format!(
                            "cast into {r}: {}",
                            pagecast_proto::refusal_text(&c.error)
                        ));
                    }
                }
                Err(e) => {
                    tr.errors.push(format!("cast into {r}: {e}"));
                    tr.dead.insert(r);
                }
            }
        }
        match a.sent {
            Ok(c) => self.account_sent(&mut tr, source, s, &c),
            Err(e) => tr.errors.push(format!("cast from {source}: {e}")),
        }
    }

    /// The sender's bytes, by class: the first pass split between
    /// multicast (groups of two or more) and unicast by the groups' pages,
    /// the rest heartbeats, control and repairs; bytes into other racks.
    fn account_sent(&self, tr: &mut Traffic, source: &str, s: &Session, c: &v1::CastResult) {
        *tr.cast_bytes.entry(source.to_owned()).or_default() += c.bytes_sent;
        let st = c.stats.unwrap_or_default();
        let src_rack = self.prep.view.rack_of(source);
        let pages = s.pages.max(1);
        for (members, n) in &s.groups {
            let share = st.bytes_first as f64 * *n as f64 / pages as f64;
            if members.len() > 1 {
                tr.multicast += share as u64;
            } else {
                tr.unicast += share as u64;
            }
            let racks: BTreeSet<String> = members
                .iter()
                .map(|m| self.prep.view.rack_of(m))
                .filter(|r| *r != src_rack)
                .collect();
            tr.core += (share * racks.len() as f64) as u64;
        }
        tr.unicast += st.bytes_heartbeat + st.bytes_control;
        tr.repair += st.bytes_repair + st.bytes_unicast;
        if !c.ok {
            tr.errors.push(format!(
                "cast from {source}: {}",
                pagecast_proto::refusal_text(&c.error)
            ));
        }
    }
}

/// What a cast session's receivers and sender answered.
struct Answered {
    sent: Result<v1::CastResult, pagecast_agent_api::ClientError>,
    results: Vec<(String, Result<v1::CastResult, String>)>,
    /// Receivers that did not answer within the grace period.
    silent: Vec<String>,
}
