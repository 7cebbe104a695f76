//! The migrations of a job: one worker per VM talks to its source agent.
//! Held (pagecast, vmscatter): all start, each holds once its destination
//! filled what it holds and says what it lacks; the casts and fetches of
//! [`super::transfer`] fill those needs, and each VM is released as soon
//! as the transfers that bring what it lacks have ended. Queued
//! (pre-copy): at most `parallel` at once per source, none held.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagecast_agent_api::{MigrationControl, MigrationEvent};
use pagecast_pages::PageHash;
use pagecast_proto::v1;

use super::transfer::{self, Traffic};
use super::{EvacuateSpec, Method, Moving, Prepared, now_s};
use crate::{Event, Services, lock};

/// Most held VMs released to their rounds and switchover at once at
/// first; [`Run::release_paced`] narrows it while switchovers overshoot
/// the downtime target, and widens it again while they keep to it.
pub(super) const RELEASE_WINDOW: usize = 8;

/// What one VM's worker reports.
pub(super) enum Report {
    /// Held: the contents its destination lacks, and the frames it filled.
    Held(usize, Vec<PageHash>, u64),
    /// Ended (ok or not), and when, in seconds since the job started.
    Done(usize, v1::MigrateResult, f64),
    /// Its source agent failed it or could not be asked.
    Failed(usize, String),
}

/// How to release or stop a migration under way, and what it was told.
type Control = (Arc<dyn MigrationControl>, Told);

/// What a migration under way was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    Nothing,
    Go,
    Stop,
}

/// What the migrations came to.
#[derive(Default)]
pub(super) struct Finished {
    /// Per VM (index into the plan's moves): its result and when it came.
    pub results: HashMap<usize, (v1::MigrateResult, f64)>,
    /// Per VM: why it failed without a result.
    pub failures: HashMap<usize, String>,
    /// Per VM: frames its destination filled from what it held.
    pub local: HashMap<usize, u64>,
    /// The casts' and fetches' figures.
    pub traffic: Traffic,
}

impl Finished {
    fn take(&mut self, r: Report) {
        match r {
            Report::Held(i, _, local) => {
                self.local.insert(i, local);
            }
            Report::Done(i, r, t) => {
                self.results.insert(i, (r, t));
            }
            Report::Failed(i, e) => {
                self.failures.insert(i, e);
            }
        }
    }

    fn ended(&self) -> usize {
        self.results.len() + self.failures.len()
    }

    /// Adds a wave's figures, its VMs numbered `wave[i]` in the whole job.
    pub(super) fn absorb(&mut self, f: Finished, wave: &[usize]) {
        self.results
            .extend(f.results.into_iter().map(|(i, r)| (wave[i], r)));
        self.failures
            .extend(f.failures.into_iter().map(|(i, e)| (wave[i], e)));
        self.local
            .extend(f.local.into_iter().map(|(i, l)| (wave[i], l)));
        self.traffic.absorb(f.traffic);
    }
}

/// A job's migrations, as they run.
pub(super) struct Run<'a> {
    svc: &'a Services,
    spec: &'a EvacuateSpec,
    prep: &'a Prepared,
    on: &'a (dyn Fn(Event) + Sync),
    started: Instant,
    /// Per VM under way: how to release or stop it, and what it was told.
    controls: Mutex<HashMap<usize, Control>>,
    /// Per source: the migrations it runs at once.
    at_once: HashMap<String, u64>,
    /// Per destination: the migrations arriving there at once.
    arriving: HashMap<String, u64>,
    /// The job said it stops on a failure (`--on-failure stop`).
    said_stop: AtomicBool,
}

impl<'a> Run<'a> {
    pub(super) fn new(
        svc: &'a Services,
        spec: &'a EvacuateSpec,
        prep: &'a Prepared,
        on: &'a (dyn Fn(Event) + Sync),
        started: Instant,
    ) -> Self {
        let mut per_source: HashMap<String, u64> = HashMap::new();
        let mut arriving: HashMap<String, u64> = HashMap::new();
        for m in &prep.moving {
            *per_source.entry(m.from.clone()).or_default() += 1;
            *arriving.entry(m.to.clone()).or_default() += 1;
        }
        // How many run their rounds at once: held ones are released at most
        // RELEASE_WINDOW at a time; queued ones `queued_per_source` a source.
        let at_once_of = |n: u64| {
            if spec.method.holds() {
                n.min(RELEASE_WINDOW as u64)
            } else {
                (queued_per_source(spec) as u64).min(n)
            }
        };
        let at_once = per_source
            .into_iter()
            .map(|(s, n)| (s, at_once_of(n)))
            .collect();
        let arriving = arriving
            .into_iter()
            .map(|(d, n)| (d, at_once_of(n)))
            .collect();
        Run {
            svc,
            spec,
            prep,
            on,
            started,
            controls: Mutex::new(HashMap::new()),
            at_once,
            arriving,
            said_stop: AtomicBool::new(false),
        }
    }

    /// The request that starts `m`'s migration. A source's link is shared
    /// by its migrations running at once (and, for pagecast, a
    /// destination's by those arriving there): each gets its share of the
    /// source's rate (`--bandwidth`, or the link rate its agent reported;
    /// unpaced if neither is known).
    fn request(&self, m: &Moving) -> v1::MigrateRequest {
        let rate = self
            .spec
            .bandwidth_bps
            .or_else(|| {
                let l = self.prep.view.host(&m.from).map_or(0, |h| h.link_bps);
                (l > 0).then_some(l)
            })
            .unwrap_or(0);
        let method = self.spec.method;
        let mut bandwidth_bps = rate / self.at_once[&m.from].max(1);
        // pagecast's own migrations also share their destination's link
        // with the others arriving there (all held at once): a slower
        // destination link paces them, so that the rounds plan their
        // switchover with the rate the pages will really get, and no
        // shaper before the destination drops what a source sent too fast.
        // The baselines pace by the source only, as the systems they are
        // named after do.
        let dest = self.prep.view.host(&m.to).map_or(0, |h| h.link_bps);
        if method == Method::Pagecast && dest > 0 {
            let share = dest / self.arriving[&m.to].max(1);
            bandwidth_bps = if bandwidth_bps == 0 {
                share
            } else {
                bandwidth_bps.min(share)
            };
        }
        // A libvirt domain: its source agent has libvirt migrate it, the
        // stream on the same loopback port at both ends.
        let (qemu_listen, libvirt_to, qemu_wait_s) = match &m.libvirt {
            Some(l) => (format!("127.0.0.1:{}", l.port), l.uri.clone(), 120),
            None => Default::default(),
        };
        v1::MigrateRequest {
            vm: m.name.clone(),
            to: self.prep.address(&m.to).to_owned(),
            qemu_connect: qemu_listen.clone(),
            qemu_listen,
            libvirt_to,
            qemu_wait_s,
            bandwidth_bps,
            max_downtime_ms: self.spec.max_downtime_ms,
            verify_full: false,
            job: self.spec.job.clone(),
            hold: method.holds(),
            no_local: method != Method::Pagecast,
            per_frame: method == Method::Precopy,
            switchover: if method == Method::Pagecast {
                self.spec.switchover as i32
            } else {
                v1::SwitchoverMode::Precopy as i32
            },
        }
    }

    /// Runs VM `i`'s migration to its end: starts it, forwards its needs
    /// when held, reports its result; whether it moved.
    fn run_vm(&self, i: usize, tx: &mpsc::Sender<Report>) -> bool {
        let m = &self.prep.moving[i];
        let failed = |e: String| {
            let _ = tx.send(Report::Failed(i, format!("{}: {e}", m.from)));
            false
        };
        let mut s = match self
            .svc
            .agents
            .migrate(self.prep.address(&m.from), self.request(m))
        {
            Ok(s) => s,
            Err(e) => return failed(e.to_string()),
        };
        let control = s.control();
        lock(&self.controls).insert(i, (control.clone(), Told::Nothing));
        // The agent abandons a held migration that hears nothing from here
        // for its hold silence: a keep-alive about once a second, on the
        // agent's own reports (it sends one a second).
        let mut alive = std::time::Instant::now();
        loop {
            let ev = match s.next_event() {
                Ok(ev) => ev,
                Err(e) => return failed(e.to_string()),
            };
            if alive.elapsed() >= std::time::Duration::from_secs(1) {
                alive = std::time::Instant::now();
                let _ = control.keep_alive();
            }
            let (phase, bytes, local) = match &ev {
                MigrationEvent::Progress(p) => (p.phase(), p.bytes_sent, p.pages_local),
                MigrationEvent::Held(_, local) => (v1::MigratePhase::Held, 0, *local),
                MigrationEvent::Result(r) if r.ok => {
                    (v1::MigratePhase::Done, r.bytes_sent, r.pages_local)
                }
                MigrationEvent::Result(r) => {
                    (v1::MigratePhase::Failed, r.bytes_sent, r.pages_local)
                }
            };
            (self.on)(Event::Vm {
                name: m.name.clone(),
                phase,
                bytes,
                pages_local: local,
            });
            match ev {
                MigrationEvent::Progress(_) => {}
                MigrationEvent::Held(needs, local) => {
                    let _ = tx.send(Report::Held(i, needs, local));
                }
                MigrationEvent::Result(r) => {
                    let ok = r.ok;
                    let _ = tx.send(Report::Done(i, r, now_s(self.started)));
                    return ok;
                }
            }
        }
    }

    /// Releases migration `i` if it was told nothing yet.
    fn release(&self, i: usize) {
        if let Some((c, told)) = lock(&self.controls).get_mut(&i)
            && *told == Told::Nothing
        {
            *told = Told::Go;
            let _ = c.go(false, "");
        }
    }

    /// Stops every migration under way not stopped yet (one released
    /// already gives up before its switchover). Called again while the
    /// job winds down, it reaches the migrations that started since.
    fn stop_all(&self) {
        for (c, told) in lock(&self.controls).values_mut() {
            if *told != Told::Stop {
                *told = Told::Stop;
                let _ = c.go(true, "the job was stopped");
            }
        }
    }

    /// Held migrations: all start; once every one is held (or ended), the
    /// casts and fetches fill their needs, each VM released once its own
    /// are filled; then any left are.
    pub(super) fn held(&self, stop: &AtomicBool) -> Finished {
        let n = self.prep.moving.len();
        (self.on)(Event::Step(format!(
            "starting {n} migrations (held until the shared pages are sent)"
        )));
        let (tx, rx) = mpsc::channel::<Report>();
        let mut fin = Finished::default();
        std::thread::scope(|s| {
            for i in 0..n {
                let tx = tx.clone();
                s.spawn(move || {
                    self.run_vm(i, &tx);
                });
            }
            drop(tx);
            let needs = self.wait_held(&rx, stop, &mut fin);
            if !stop.load(Ordering::Relaxed) {
                let filler = transfer::Filler::new(self.svc, self.spec, self.prep, self.on);
                // Each VM goes once what it lacks has come (not on a stop:
                // then none does).
                let release = |i: usize| {
                    if self.spec.release_early && !stop.load(Ordering::Relaxed) {
                        self.release(i);
                    }
                };
                fin.traffic = filler.fill(&needs, &release);
            }
            (self.on)(Event::Step("finishing the migrations".into()));
            if stop.load(Ordering::Relaxed) {
                self.stop_all();
            } else {
                self.release_paced(&rx, stop, &mut fin);
            }
            self.collect(&rx, stop, &mut fin);
        });
        fin
    }

    /// Releases the migrations still held, as many at once as keep each
    /// switchover within `--max-downtime`: at first up to
    /// [`RELEASE_WINDOW`] at once; a VM paused longer than the target
    /// halves that window (down to one), one within it widens the window
    /// by one. Returns once every VM was released (or the job stopped).
    fn release_paced(&self, rx: &mpsc::Receiver<Report>, stop: &AtomicBool, fin: &mut Finished) {
        let target = f64::from(self.spec.max_downtime_ms.max(1));
        let mut waiting: std::collections::VecDeque<usize> = {
            let controls = lock(&self.controls);
            (0..self.prep.moving.len())
                .filter(|i| controls.get(i).is_some_and(|(_, t)| *t == Told::Nothing))
                .filter(|i| !fin.results.contains_key(i) && !fin.failures.contains_key(i))
                .collect()
        };
        let mut window = waiting.len().clamp(1, RELEASE_WINDOW);
        let mut under_way: HashSet<usize> = HashSet::new();
        while !waiting.is_empty() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            while under_way.len() < window {
                let Some(i) = waiting.pop_front() else { break };
                self.release(i);
                under_way.insert(i);
            }
            if waiting.is_empty() {
                return;
            }
            let r = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Report::Held(..)) | Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let (i, paused) = match &r {
                Report::Done(i, res, _) => (*i, res.ok.then_some(res.downtime_ms)),
                Report::Failed(i, _) => (*i, None),
                Report::Held(..) => unreachable!("skipped above"),
            };
            under_way.remove(&i);
            match paused {
                Some(ms) if ms > target => {
                    let was = window;
                    window = (window / 2).max(1);
                    if window < was {
                        (self.on)(Event::Step(format!(
                            "{} paused {ms:.0} ms (target {target:.0} ms): switching over at most \
                             {window} VM(s) at once",
                            self.prep.moving[i].name
                        )));
                    }
                }
                Some(_) => window = (window + 1).min(self.prep.moving.len()),
                None => {}
            }
            self.take(fin, r, stop);
        }
    }

    /// Waits until every migration is held or has ended (or the job is
    /// stopped); each held one's needs.
    fn wait_held(
        &self,
        rx: &mpsc::Receiver<Report>,
        stop: &AtomicBool,
        fin: &mut Finished,
    ) -> HashMap<usize, Vec<PageHash>> {
        let n = self.prep.moving.len();
        let mut needs = HashMap::new();
        while needs.len() + fin.ended() < n && !stop.load(Ordering::Relaxed) {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Report::Held(i, h, l)) => {
                    fin.local.insert(i, l);
                    needs.insert(i, h);
                }
                Ok(r) => self.take(fin, r, stop),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        needs
    }

    /// Keeps what a VM's worker reported; under `--on-failure stop`, a VM
    /// that failed stops the job (as Ctrl-C does): the migrations not yet
    /// switched over give up and their VMs stay at their sources.
    fn take(&self, fin: &mut Finished, r: Report, stop: &AtomicBool) {
        let failed = match &r {
            Report::Done(i, res, _) if !res.ok => {
                Some((*i, pagecast_proto::refusal_text(&res.error).to_owned()))
            }
            Report::Failed(i, e) => Some((*i, e.clone())),
            _ => None,
        };
        fin.take(r);
        if let Some((i, why)) = failed
            && self.spec.stop_on_failure
            && !self.said_stop.swap(true, Ordering::Relaxed)
        {
            stop.store(true, Ordering::Relaxed);
            (self.on)(Event::Step(format!(
                "{} failed ({why}); stopping the job (--on-failure stop)",
                self.prep.moving[i].name
            )));
        }
    }

    /// Collects every result; on a stop, first tells the migrations still
    /// running to give up.
    fn collect(&self, rx: &mpsc::Receiver<Report>, stop: &AtomicBool, fin: &mut Finished) {
        loop {
            if stop.load(Ordering::Relaxed) {
                self.stop_all();
            }
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Report::Held(..)) => {}
                Ok(r) => self.take(fin, r, stop),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    /// Per-VM pre-copy: at most `parallel` at once per source (and at most
    /// `--max-outgoing`), each as the one before it ends; with
    /// `--max-incoming`, a VM whose destination has that many arriving
    /// waits, and its source's next VM for another destination goes first.
    pub(super) fn queued(&self, stop: &AtomicBool) -> Finished {
        let mut queues: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, m) in self.prep.moving.iter().enumerate() {
            queues.entry(m.from.as_str()).or_default().push(i);
        }
        let per_source = queued_per_source(self.spec);
        let arriving = Arrivals::new(self.spec.max_incoming);
        let (tx, rx) = mpsc::channel::<Report>();
        let mut fin = Finished::default();
        std::thread::scope(|s| {
            for (_, q) in queues {
                let q = Arc::new(Mutex::new(q));
                for _ in 0..per_source {
                    let (q, tx, arriving) = (q.clone(), tx.clone(), &arriving);
                    s.spawn(move || {
                        while let Some(i) = arriving.next(&q, &self.prep.moving, stop) {
                            let moved = self.run_vm(i, &tx);
                            arriving.ended(&self.prep.moving[i].to);
                            // Stopped here, before this worker takes its
                            // next VM, not once the collector sees it.
                            if !moved && self.spec.stop_on_failure {
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                    });
                }
            }
            drop(tx);
            self.collect(&rx, stop, &mut fin);
        });
        fin
    }
}

/// Pre-copy migrations a source runs at once: `--parallel`, at most
/// `--max-outgoing`.
fn queued_per_source(spec: &EvacuateSpec) -> usize {
    spec.max_outgoing
        .map_or(spec.parallel, |k| k.min(spec.parallel))
        .max(1)
}

/// The migrations arriving at each destination, bounded.
struct Arrivals {
    most: Option<usize>,
    now: Mutex<HashMap<String, usize>>,
    changed: std::sync::Condvar,
}

impl Arrivals {
    fn new(most: Option<usize>) -> Self {
        Arrivals {
            most: most.map(|m| m.max(1)),
            now: Mutex::new(HashMap::new()),
            changed: std::sync::Condvar::new(),
        }
    }

    /// Takes from `q` the last VM whose destination has room (counting it
    /// as arriving), waiting while none has; None when `q` is empty or the
    /// job stops.
    fn next(&self, q: &Mutex<Vec<usize>>, moving: &[Moving], stop: &AtomicBool) -> Option<usize> {
        let mut now = lock(&self.now);
        loop {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            let pick = {
                let mut q = lock(q);
                if q.is_empty() {
                    return None;
                }
                let room = |i: &usize| {
                    self.most
                        .is_none_or(|k| now.get(&moving[*i].to).copied().unwrap_or(0) < k)
                };
                q.iter().rposition(room).map(|at| q.remove(at))
            };
            if let Some(i) = pick {
                *now.entry(moving[i].to.clone()).or_default() += 1;
                return Some(i);
            }
            now = self
                .changed
                .wait_timeout(now, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A migration into `to` ended.
    fn ended(&self, to: &str) {
        if let Some(n) = lock(&self.now).get_mut(to) {
            *n = n.saturating_sub(1);
        }
        self.changed.notify_all();
    }
}
