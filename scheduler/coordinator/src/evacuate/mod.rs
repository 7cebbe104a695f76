//! Gang evacuation: plan from the index, move every VM off the source
//! hosts, each unique page leaving its source once.
//!
//! Three methods, each from the same starting state:
//!
//! - `pagecast`: content-aware placement (eviction time first, or bytes
//!   first); every migration is held after the destination filled what it
//!   holds; contents a rack-mate of the destination holds come from it;
//!   every remaining content leaves one source once, multicast to every
//!   destination that lacks it (unicast where one does); then each
//!   migration finishes (the rest, pre-copy rounds, switchover).
//! - `vmscatter`: VMScatter as published: content-blind placement,
//!   identical pages among the moving VMs merged and multicast once, no
//!   reuse of what destinations already hold (nor rack-mates).
//! - `precopy`: what a user runs today: each VM its own pre-copy migration,
//!   every non-zero page sent (zero pages skipped, as QEMU does), no reuse,
//!   at most `parallel` at a time per source host (KubeVirt's default is
//!   2); placement spreads VMs over the destinations with the most free
//!   memory first (as a resource scheduler does).
//!
//! The phases, each its own module, with typed values between them:
//! [`prepare`] (the request checked, the model, the exact contents, the
//! plan) → [`run`] (migrations started, held, released; or queued per
//! source for pre-copy) with [`transfer`] (casts and fetches into the held
//! migrations) → [`outcome`] (the report).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use pagecast_pages::PageHash;
use pagecast_proto::v1;
use pagecast_scheduler::Objective;

use crate::report::{EvacuationReport, Predicted};
use crate::view::ClusterView;
use crate::{CoordError, Event, Services};

mod jobs;
mod outcome;
mod prepare;
mod run;
mod scatter;
mod transfer;

#[cfg(test)]
mod tests;

/// How a job moves VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Content-aware placement, local fill, short haul, multicast.
    Pagecast,
    /// VMScatter as published.
    VmScatter,
    /// Per-VM pre-copy, no reuse.
    Precopy,
}

impl Method {
    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Method::Pagecast => "pagecast",
            Method::VmScatter => "vmscatter",
            Method::Precopy => "precopy",
        }
    }

    /// Parses [`Method::name`].
    pub fn parse(s: &str) -> Option<Self> {
        [Method::Pagecast, Method::VmScatter, Method::Precopy]
            .into_iter()
            .find(|m| m.name() == s)
    }

    /// Whether its migrations hold for the job's casts.
    fn holds(self) -> bool {
        self != Method::Precopy
    }
}

/// What to evacuate, and how.
#[derive(Debug, Clone)]
pub struct EvacuateSpec {
    /// Hosts to empty.
    pub from: Vec<String>,
    /// Hosts that may receive (empty: every other host with an agent).
    pub to: Vec<String>,
    /// How.
    pub method: Method,
    /// Migrations at once per source host (precopy).
    pub parallel: usize,
    /// Bits per second each source may send (None: its link rate from the
    /// index, unpaced if unknown).
    pub bandwidth_bps: Option<u64>,
    /// The network's MTU: predictions then count the frames' headers.
    pub mtu: Option<u32>,
    /// The network delivers every multicast datagram to every host (no
    /// IGMP snooping): every cast then counts against every destination's
    /// link when the casts share the links.
    pub multicast_floods: bool,
    /// Downtime target per VM.
    pub max_downtime_ms: u32,
    /// How pagecast's own moves switch over (the baselines always use
    /// pre-copy, as the systems they are named after do).
    pub switchover: v1::SwitchoverMode,
    /// What placement minimises first.
    pub objective: Objective,
    /// Plan only.
    pub dry_run: bool,
    /// The job's id (for `pagecast cancel`).
    pub job: String,
    /// How casts travel (UNSPECIFIED: multicast where every receiver
    /// hears it, else the TCP chain).
    pub transport: v1::CastTransport,
    /// Release each held VM once the transfers that bring what it lacks
    /// have ended, not when the job's last one has.
    pub release_early: bool,
    /// Scatter-gather (pagecast only): what the destinations' links cannot
    /// take in the sources' time goes to intermediaries, and the
    /// destinations gather it after switching over by post-copy.
    pub scatter: bool,
    /// Stop the job when a VM fails (`--on-failure stop`): the migrations
    /// not yet switched over give up. Otherwise the others go on.
    pub stop_on_failure: bool,
    /// Move only these VMs of the sources (`--retry`); empty: all of them.
    pub only: Vec<String>,
    /// Most VMs arriving at one host at once (`--max-incoming`).
    pub max_incoming: Option<usize>,
    /// Most VMs leaving one host at once (`--max-outgoing`).
    pub max_outgoing: Option<usize>,
}

/// A VM that moves.
#[derive(Debug, Clone)]
struct Moving {
    name: String,
    from: String,
    to: String,
    /// A libvirt domain: moved by its source host's libvirt, its stream
    /// through pagecast.
    libvirt: Option<LibvirtMove>,
    /// An adopted QEMU VM: its own stream switches it over, never by
    /// pagecast's post-copy, so its destination cannot gather.
    qemu: bool,
}

/// How a libvirt domain moves: its destination host's libvirt, and the
/// loopback port its QEMUs stream on at both ends.
#[derive(Debug, Clone)]
struct LibvirtMove {
    uri: String,
    port: u16,
}

/// Loopback ports given libvirt domains' streams: each job takes a block
/// of [`LIBVIRT_BLOCK`] from this range, chosen by its id, below libvirt's
/// own default migration ports (49152 up), and each domain of the job one
/// port of it. Two jobs that chose the same block and meet on a host are
/// refused there by its agent (a QEMU address is one job's), never mixed.
const LIBVIRT_PORTS: std::ops::Range<u16> = 40000..48000;
/// Ports per job.
const LIBVIRT_BLOCK: u16 = 64;

/// The first port of job `job`'s block.
fn libvirt_base(job: &str) -> u16 {
    // FNV-1a: stable across runs and builds.
    let h = job.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let blocks = (LIBVIRT_PORTS.end - LIBVIRT_PORTS.start) / LIBVIRT_BLOCK;
    LIBVIRT_PORTS.start + (h % u64::from(blocks)) as u16 * LIBVIRT_BLOCK
}

/// Everything decided before anything moves.
struct Prepared {
    view: ClusterView,
    moving: Vec<Moving>,
    predicted: Predicted,
    /// Who held the moving VMs' contents when the plan was made, from the
    /// index (a hint: every page used is hash-checked).
    held: std::sync::Arc<HashMap<String, HashSet<PageHash>>>,
}

impl Prepared {
    /// The same plan for the moves `wave` (indices into `moving`) only.
    fn wave(&self, wave: &[usize]) -> Prepared {
        Prepared {
            view: self.view.clone(),
            moving: wave.iter().map(|&i| self.moving[i].clone()).collect(),
            predicted: self.predicted.clone(),
            held: self.held.clone(),
        }
    }

    /// The control address of `host`'s agent (every host of a plan has
    /// one: [`prepare`] checks).
    fn address(&self, host: &str) -> &str {
        &self
            .view
            .host(host)
            .expect("every host of a plan is in its view")
            .address
    }
}

fn now_s(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Evacuates `spec.from`. Returns the report (with `ok` false if any VM
/// failed: each failed VM still runs at its source, unless in doubt).
/// `stop` set meanwhile (Ctrl-C) aborts every VM not yet switched over.
pub fn evacuate(
    svc: &Services,
    spec: &EvacuateSpec,
    on: &(dyn Fn(Event) + Sync),
    stop: &AtomicBool,
) -> Result<EvacuationReport, CoordError> {
    let started = Instant::now();
    let prep = prepare::prepare(svc, spec, on)?;
    let mut report = outcome::planned(spec, &prep);
    if spec.dry_run || prep.moving.is_empty() {
        // A plan was made (or there was nothing to move).
        report.ok = true;
        report.total_s = now_s(started);
        return Ok(report);
    }
    let cordoned = cordon_sources(svc, spec, &prep, on);
    let opened = jobs::open(svc, &prep, &spec.job, on);
    let finished = if spec.method.holds() {
        in_waves(svc, spec, &prep, on, started, stop)
    } else {
        run::Run::new(svc, spec, &prep, on, started).queued(stop)
    };
    let mut closing = opened;
    closing.extend(finished.traffic.fetch_frames.keys().cloned());
    closing.extend(finished.traffic.mates.iter().cloned());
    closing.sort();
    closing.dedup();
    jobs::close(svc, &prep, &spec.job, &closing);
    for h in cordoned {
        if let Err(e) = svc.index.set_cordon(&h, false, "") {
            on(Event::Step(format!(
                "could not lift the job's cordon of {h} ({e}): `pagecast uncordon {h}` does"
            )));
        }
    }
    Ok(outcome::measured(
        report, &prep, finished, started, on, stop,
    ))
}

/// The held migrations, in waves when `--max-incoming` or `--max-outgoing`
/// bound how many arrive at or leave one host at once: each wave is held,
/// filled and released as a whole job is, and the next starts when it has
/// ended (its casts then find what the waves before brought, and the
/// destinations fill it locally). One wave without bounds.
fn in_waves(
    svc: &Services,
    spec: &EvacuateSpec,
    prep: &Prepared,
    on: &(dyn Fn(Event) + Sync),
    started: Instant,
    stop: &AtomicBool,
) -> run::Finished {
    let waves = waves(&prep.moving, spec.max_incoming, spec.max_outgoing);
    if waves.len() == 1 {
        return run::Run::new(svc, spec, prep, on, started).held(stop);
    }
    let mut all = run::Finished::default();
    for (n, wave) in waves.iter().enumerate() {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        on(Event::Step(format!(
            "wave {} of {}: {} VM(s)",
            n + 1,
            waves.len(),
            wave.len()
        )));
        let part = prep.wave(wave);
        let fin = run::Run::new(svc, spec, &part, on, started).held(stop);
        all.absorb(fin, wave);
    }
    all
}

/// Splits the moves into waves in which no host sends more than
/// `max_out` or receives more than `max_in` (each bound off when None),
/// the moves in plan order, each in the first wave with room.
fn waves(moving: &[Moving], max_in: Option<usize>, max_out: Option<usize>) -> Vec<Vec<usize>> {
    /// A wave: its moves, and per host its departures and arrivals.
    #[derive(Default)]
    struct Wave<'m> {
        moves: Vec<usize>,
        leaving: HashMap<&'m str, usize>,
        arriving: HashMap<&'m str, usize>,
    }
    let mut waves: Vec<Wave> = Vec::new();
    for (i, m) in moving.iter().enumerate() {
        let room = |count: &HashMap<&str, usize>, host: &str, most: Option<usize>| {
            most.is_none_or(|k| count.get(host).copied().unwrap_or(0) < k.max(1))
        };
        let fits =
            |w: &Wave| room(&w.leaving, &m.from, max_out) && room(&w.arriving, &m.to, max_in);
        let at = match waves.iter().position(fits) {
            Some(at) => at,
            None => {
                waves.push(Wave::default());
                waves.len() - 1
            }
        };
        let w = &mut waves[at];
        w.moves.push(i);
        *w.leaving.entry(m.from.as_str()).or_default() += 1;
        *w.arriving.entry(m.to.as_str()).or_default() += 1;
    }
    if waves.is_empty() {
        return vec![Vec::new()];
    }
    waves.into_iter().map(|w| w.moves).collect()
}

/// Cordons the sources not cordoned yet, so that no other job places a VM
/// on them while they are emptied; returns those it cordoned (the job
/// lifts their cordon at its end; a host an operator had cordoned stays
/// so). A cordon that cannot be set is said and the job goes on: it only
/// guards against other jobs. A job that dies leaves its cordons, the safe
/// side: `pagecast uncordon` lifts them.
fn cordon_sources(
    svc: &Services,
    spec: &EvacuateSpec,
    prep: &Prepared,
    on: &(dyn Fn(Event) + Sync),
) -> Vec<String> {
    let mut done = Vec::new();
    for h in &spec.from {
        if prep.view.host(h).is_some_and(|x| x.cordoned) {
            continue;
        }
        let why = format!("being evacuated by job {}", spec.job);
        match svc.index.set_cordon(h, true, &why) {
            Ok(()) => done.push(h.clone()),
            Err(e) => on(Event::Step(format!(
                "could not cordon {h} for the job ({e}); going on"
            ))),
        }
    }
    done
}
