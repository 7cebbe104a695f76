//! Every VM the agent runs, whatever its kind: one record ([`Hosted`]),
//! one registry ([`Registry`]) and one state ([`v1::HostedVmState`]). What
//! differs between kinds sits behind [`Backend`]: the KVM micro-VM
//! ([`crate::micro`]) and the adopted QEMU VM ([`crate::qemu`]). The rest
//! of the agent never asks which kind it holds.
//!
//! The bookkeeping every kind shares lives here: the content each frame
//! held when last looked at (`seen`), what the index should list
//! (`publication`), the guest's rewrite rate, and a switchover left in
//! doubt.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagecast_memory::{DirtyBitmap, GuestMemory, MemoryError};
use pagecast_migrate::{Hold, Progress};
use pagecast_pages::{ContentKey, PageHash};
use pagecast_proto::v1;

use crate::publish::Publication;
use crate::sync::lock;
use crate::{Agent, AgentError};

/// What changed in a VM's memory since the content map last looked.
pub enum Look {
    /// These frames (from a dirty log that sees every write).
    Frames(DirtyBitmap),
    /// Anything may have: hash all of it again and compare.
    All,
    /// Not worth looking yet (a rescan too soon after the last).
    NotDue,
}

/// What one kind of VM supplies. Implemented by the KVM micro-VM and the
/// adopted QEMU VM.
pub trait Backend: Send + Sync {
    /// Which kind of VM this is (for listings and reports only).
    fn kind(&self) -> v1::VmKind;

    /// The guest's memory, for reading and hashing.
    fn memory(&self) -> &dyn GuestMemory;

    /// What changed since the last look. `state` is the VM's state now;
    /// `force` asks for a look that brings the content map up to date now
    /// (a manifest is about to be built from it).
    fn look(&self, state: v1::HostedVmState, force: bool) -> Result<Look, MemoryError>;

    /// Forgets what changed so far: the caller hashes all memory next.
    fn reset_look(&self);

    /// Called after a full hash of the memory that took `took`.
    fn scanned(&self, _took: Duration) {}

    /// Whether [`Backend::look`] sees every write, so a fresh hash of all
    /// memory matches what the content map lists (an audit hashes afresh);
    /// otherwise the map is only as recent as the last scan, and an audit
    /// uses that scan.
    fn exact(&self) -> bool;

    /// Fills in what `vm list` shows of the guest beyond the agent's own
    /// bookkeeping (progress, write rate, throttle).
    fn status(&self, _info: &mut v1::VmInfo) {}

    /// Changes the guest's page-write rate, where the agent paces it.
    fn set_dirty_rate(&self, rate: u64) -> Result<(), AgentError>;

    /// Migrates the VM to the agent at `r.to`. Returns the result and the
    /// destination's name, or why not; a [`pagecast_migrate::MigrationError::InDoubt`]
    /// means the VM may run there and must not run here until settled.
    fn migrate_out(
        &self,
        out: Outbound<'_>,
        r: &v1::MigrateRequest,
        progress: &mut dyn FnMut(&Progress),
        hold: Option<&mut dyn Hold>,
    ) -> Result<(v1::MigrateResult, String), AgentError>;

    /// Clones the VM, live, to every target of `r`; the VM runs on here.
    fn clone_out(
        &self,
        out: Outbound<'_>,
        r: &v1::CloneRequest,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<v1::CloneResult, AgentError>;

    /// After a switchover in doubt turned out never to have started the VM
    /// at its destination: lets the paused guest run here again.
    fn resume(&self);

    /// Receives a migration into this VM, which waits for one (an adopted
    /// QEMU started with `-incoming`). Kinds that never wait refuse.
    fn receive(
        &self,
        _into: Outbound<'_>,
        link: &mut dyn pagecast_migrate::MigrationLink,
        begin: &v1::MigrateBegin,
        _job: &Arc<crate::jobs::Job>,
    ) -> Result<pagecast_migrate::IncomingReport, AgentError> {
        let e = AgentError::VmExists(begin.vm.clone());
        let _ = link.send(v1::migrate_frame::Body::Accept(v1::MigrateAccept {
            ok: false,
            reason: e.to_string(),
            code: e.code() as i32,
            postcopy: false,
        }));
        Err(e)
    }
}

/// A VM on its way out (or in), as a backend sees it: the agent and the
/// VM's record.
#[derive(Clone, Copy)]
pub struct Outbound<'a> {
    /// The agent.
    pub agent: &'a Agent,
    /// The VM.
    pub vm: &'a Arc<Hosted>,
}

/// A VM this agent runs.
pub struct Hosted {
    pub(crate) name: String,
    pub(crate) origin: String,
    /// Its dedup domain ("cluster" for the cluster-wide one) and the key
    /// its pages are named with there.
    pub(crate) domain: String,
    pub(crate) key: ContentKey,
    pub(crate) state: Mutex<v1::HostedVmState>,
    /// The content of each frame as the content map last saw it, so a
    /// rewritten frame's old content leaves the map.
    pub(crate) seen: Mutex<Vec<PageHash>>,
    /// What the content index should list for each frame.
    pub(crate) publication: Mutex<Publication>,
    /// Held while the VM's content map is refreshed.
    pub(crate) refreshing: Mutex<()>,
    /// How fast the guest rewrites pages, from the refreshes.
    pub(crate) rewrites: Mutex<RewriteMeter>,
    /// While the VM is in doubt: where it may run, and when to ask next.
    pub(crate) in_doubt: Mutex<Option<InDoubt>>,
    pub(crate) backend: Box<dyn Backend>,
}

impl Hosted {
    /// A VM of dedup domain `domain` (name, key) in `state`.
    pub fn new(
        name: &str,
        origin: String,
        domain: (&str, ContentKey),
        state: v1::HostedVmState,
        backend: Box<dyn Backend>,
    ) -> Self {
        let pages = backend.memory().page_count();
        Hosted {
            name: name.to_owned(),
            origin,
            domain: pagecast_pages::domain::normalize(domain.0).to_owned(),
            key: domain.1,
            state: Mutex::new(state),
            seen: Mutex::new(Vec::new()),
            publication: Mutex::new(Publication::new(pages)),
            refreshing: Mutex::new(()),
            rewrites: Mutex::new(RewriteMeter::default()),
            in_doubt: Mutex::new(None),
            backend,
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its state now.
    pub fn state(&self) -> v1::HostedVmState {
        *lock(&self.state)
    }

    /// Its memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.backend.memory().region().len() as u64
    }

    /// Its frames.
    pub fn page_count(&self) -> u64 {
        self.backend.memory().page_count()
    }

    /// Whether the content map has seen all of it once.
    pub(crate) fn indexed(&self) -> bool {
        lock(&self.seen).len() as u64 == self.page_count()
    }

    /// Moves a running VM into `to` for an operation; refuses one that is
    /// not running.
    pub(crate) fn claim(&self, to: v1::HostedVmState) -> Result<(), AgentError> {
        self.change(v1::HostedVmState::Running, to)
    }

    /// Moves the VM from `from` into `to`; refuses if it is not in `from`.
    pub(crate) fn change(
        &self,
        from: v1::HostedVmState,
        to: v1::HostedVmState,
    ) -> Result<(), AgentError> {
        let mut s = lock(&self.state);
        if *s != from {
            return Err(AgentError::Busy {
                vm: self.name.clone(),
                state: pagecast_proto::names::state(*s),
            });
        }
        *s = to;
        Ok(())
    }

    /// Sets the VM's state.
    pub(crate) fn set_state(&self, to: v1::HostedVmState) {
        *lock(&self.state) = to;
    }

    /// The VM as `vm list` shows it.
    pub fn info(&self) -> v1::VmInfo {
        let mut info = v1::VmInfo {
            name: self.name.clone(),
            memory_bytes: self.memory_bytes(),
            state: self.state() as i32,
            origin: self.origin.clone(),
            domain: self.domain.clone(),
            kind: self.backend.kind() as i32,
            ..v1::VmInfo::default()
        };
        self.backend.status(&mut info);
        info
    }

    /// Copies frame `f` if its content still hashes to `h` under the VM's
    /// key.
    pub(crate) fn copy(&self, f: u64, h: &PageHash, out: &mut pagecast_pages::Page) -> bool {
        self.backend.memory().read_page(f, out).is_ok() && self.key.hash_page(out) == *h
    }
}

/// A name on this agent: a VM, or a name held for one that is starting
/// or arriving.
pub enum Slot {
    /// Held while a VM starts or arrives (the state says which).
    Reserved(v1::HostedVmState, u64),
    /// A VM.
    Vm(Arc<Hosted>),
}

/// Every name on this agent.
#[derive(Default)]
pub struct Registry {
    slots: BTreeMap<String, Slot>,
}

impl Registry {
    /// The VM named `name`, if one is here (not a reservation).
    pub fn vm(&self, name: &str) -> Option<&Arc<Hosted>> {
        match self.slots.get(name)? {
            Slot::Vm(v) => Some(v),
            Slot::Reserved(..) => None,
        }
    }

    /// What holds `name`.
    pub fn get(&self, name: &str) -> Option<&Slot> {
        self.slots.get(name)
    }

    /// Every VM (reservations left out).
    pub fn vms(&self) -> Vec<Arc<Hosted>> {
        self.slots
            .values()
            .filter_map(|s| match s {
                Slot::Vm(v) => Some(v.clone()),
                Slot::Reserved(..) => None,
            })
            .collect()
    }

    /// Names held while a VM starts or arrives.
    pub fn reserved(&self) -> Vec<(String, v1::HostedVmState)> {
        self.slots
            .iter()
            .filter_map(|(n, s)| match s {
                Slot::Reserved(st, _) => Some((n.clone(), *st)),
                Slot::Vm(_) => None,
            })
            .collect()
    }

    /// How many VMs (reservations left out).
    pub fn count(&self) -> usize {
        self.slots
            .values()
            .filter(|s| matches!(s, Slot::Vm(_)))
            .count()
    }

    /// Memory of the VMs here and of those held for (their sizes as
    /// reserved), bytes.
    pub fn committed_bytes(&self) -> u64 {
        self.slots
            .values()
            .map(|s| match s {
                Slot::Vm(v) => v.memory_bytes(),
                Slot::Reserved(_, b) => *b,
            })
            .sum()
    }

    /// Holds `name` in `state` for a VM of `bytes`, if that fits in
    /// `capacity` (0: no bound) beside what is committed here; refuses a
    /// name already taken, or a VM that does not fit.
    pub fn reserve_sized(
        &mut self,
        name: &str,
        state: v1::HostedVmState,
        bytes: u64,
        capacity: u64,
    ) -> Result<(), AgentError> {
        let committed = self.committed_bytes();
        if capacity > 0 && committed.saturating_add(bytes) > capacity {
            return Err(AgentError::NoRoom {
                vm: name.to_owned(),
                needs: bytes,
                free: capacity.saturating_sub(committed),
                capacity,
            });
        }
        self.hold(name, state, bytes)
    }

    /// Holds `name` in `state`; refuses a name already taken.
    pub fn reserve(&mut self, name: &str, state: v1::HostedVmState) -> Result<(), AgentError> {
        self.hold(name, state, 0)
    }

    /// Holds `name` in `state` for a VM of `bytes`; refuses a bad name or
    /// one already taken.
    fn hold(&mut self, name: &str, state: v1::HostedVmState, bytes: u64) -> Result<(), AgentError> {
        if !pagecast_proto::name_ok(name) {
            return Err(AgentError::BadName(name.to_owned()));
        }
        if self.slots.contains_key(name) {
            return Err(AgentError::VmExists(name.to_owned()));
        }
        self.slots
            .insert(name.to_owned(), Slot::Reserved(state, bytes));
        Ok(())
    }

    /// Adds a VM under its name, in place of its reservation; refuses a
    /// name that another VM holds.
    pub fn insert(&mut self, vm: Arc<Hosted>) -> Result<(), AgentError> {
        if let Some(Slot::Vm(_)) = self.slots.get(&vm.name) {
            return Err(AgentError::VmExists(vm.name.clone()));
        }
        self.slots.insert(vm.name.clone(), Slot::Vm(vm));
        Ok(())
    }

    /// Lets a reservation go (the VM did not start or arrive).
    pub fn release(&mut self, name: &str) {
        if let Some(Slot::Reserved(..)) = self.slots.get(name) {
            self.slots.remove(name);
        }
    }

    /// Removes the VM `name`, if it is one.
    pub fn remove(&mut self, name: &str) -> Option<Arc<Hosted>> {
        match self.slots.get(name)? {
            Slot::Vm(_) => match self.slots.remove(name) {
                Some(Slot::Vm(v)) => Some(v),
                _ => None,
            },
            Slot::Reserved(..) => None,
        }
    }

    /// Whether `vm` is the VM registered under its name.
    pub fn holds(&self, vm: &Arc<Hosted>) -> bool {
        self.vm(&vm.name).is_some_and(|v| Arc::ptr_eq(v, vm))
    }
}

/// A switchover that went unconfirmed: the destination to ask where the VM
/// stands, and when to ask next.
#[derive(Debug, Clone)]
pub struct InDoubt {
    /// The destination agent, HOST:PORT.
    pub to: String,
    /// The migration's job (named in the question).
    pub job: String,
    /// When to ask next.
    pub next: Instant,
    /// Questions that went unanswered so far.
    pub tries: u32,
    /// When it was last said that the VM stays in doubt.
    pub told: Option<Instant>,
}

impl InDoubt {
    /// A switchover to `to` just left in doubt: ask at once.
    pub fn new(to: &str, job: &str) -> Self {
        InDoubt {
            to: to.to_owned(),
            job: job.to_owned(),
            next: Instant::now(),
            tries: 0,
            told: None,
        }
    }

    /// No answer that settles it: ask again later (1 s, doubling to 30 s).
    /// Returns whether to say so in the log (at most every 30 s).
    pub fn again(&mut self, now: Instant) -> bool {
        let say = self.told.is_none_or(|t| now - t >= Duration::from_secs(30));
        if say {
            self.told = Some(now);
        }
        self.tries = self.tries.saturating_add(1);
        self.next = now + Duration::from_secs(1 << self.tries.min(5)).min(Duration::from_secs(30));
        say
    }
}

/// Distinct pages a guest rewrites a second: each content refresh sees the
/// frames dirtied since the one before, and the meter keeps a moving
/// average weighted by time (about the last [`RewriteMeter::HORIZON_S`]
/// seconds), which the planner uses to predict what pre-copy re-sends.
#[derive(Debug, Default)]
pub struct RewriteMeter {
    last: Option<Instant>,
    /// Frames seen since `last`.
    pending: u64,
    rate: Option<f64>,
}

impl RewriteMeter {
    const HORIZON_S: f64 = 10.0;

    /// Takes in `pages` frames dirtied since the previous sample.
    pub fn sample(&mut self, pages: u64, now: Instant) {
        let Some(last) = self.last else {
            self.last = Some(now);
            return;
        };
        self.pending += pages;
        let dt = now.saturating_duration_since(last).as_secs_f64();
        if dt < 0.05 {
            // Too short to rate: the frames count towards the next sample.
            return;
        }
        let r = std::mem::take(&mut self.pending) as f64 / dt;
        self.last = Some(now);
        let w = 1.0 - (-dt / Self::HORIZON_S).exp();
        self.rate = Some(match self.rate {
            Some(old) => old + w * (r - old),
            None => r,
        });
    }

    /// The rate, pages a second (0 until two samples).
    pub fn rate(&self) -> f64 {
        self.rate.unwrap_or(0.0)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_meter_rates_dirty_frames_over_time_and_keeps_short_samples() {
        let t0 = Instant::now();
        let mut m = RewriteMeter::default();
        m.sample(10_000, t0);
        assert_eq!(m.rate(), 0.0, "one sample has no interval");
        m.sample(500, t0 + Duration::from_secs(1));
        assert!((m.rate() - 500.0).abs() < 1e-9, "{}", m.rate());
        // A refresh right after another: its frames wait for the next.
        m.sample(40, t0 + Duration::from_millis(1010));
        assert!((m.rate() - 500.0).abs() < 1e-9);
        m.sample(460, t0 + Duration::from_secs(2));
        assert!((m.rate() - 500.0).abs() < 1e-6, "{}", m.rate());
        // A guest that stops writing: the rate decays, not at once.
        for s in 3..=30 {
            m.sample(0, t0 + Duration::from_secs(s));
        }
        assert!(m.rate() < 500.0 * 0.1 && m.rate() > 0.0, "{}", m.rate());
    }

    #[test]
    fn questions_in_doubt_back_off_to_thirty_seconds_and_speak_twice_a_minute() {
        let t0 = Instant::now();
        let mut d = InDoubt::new("b:1", "j");
        assert!(d.next <= Instant::now());
        assert!(d.again(t0), "the first miss is said");
        assert_eq!(d.next, t0 + Duration::from_secs(2));
        assert!(!d.again(t0 + Duration::from_secs(2)), "not again so soon");
        let mut t = t0;
        for _ in 0..10 {
            t += Duration::from_secs(1);
            d.again(t);
        }
        assert_eq!(d.next - t, Duration::from_secs(30), "capped at 30 s");
        assert!(
            d.again(t0 + Duration::from_secs(31)),
            "said again after 30 s"
        );
    }

    /// A hosted VM's backend over plain memory.
    struct Fake(pagecast_memory::Region);
    impl GuestMemory for Fake {
        fn write_page(&self, f: u64, d: &pagecast_pages::Page) -> Result<(), MemoryError> {
            self.0.write_page(f, d)
        }
        fn take_dirty(&self) -> Result<DirtyBitmap, MemoryError> {
            Ok(DirtyBitmap::new(self.page_count()))
        }
        fn mark_dirty(&self, _: &DirtyBitmap) -> Result<(), MemoryError> {
            Ok(())
        }
        fn region(&self) -> &pagecast_memory::Region {
            &self.0
        }
    }
    impl Backend for Fake {
        fn kind(&self) -> v1::VmKind {
            v1::VmKind::MicroVm
        }
        fn memory(&self) -> &dyn GuestMemory {
            self
        }
        fn look(&self, _: v1::HostedVmState, _: bool) -> Result<Look, MemoryError> {
            Ok(Look::NotDue)
        }
        fn reset_look(&self) {}
        fn exact(&self) -> bool {
            true
        }
        fn set_dirty_rate(&self, _: u64) -> Result<(), AgentError> {
            Ok(())
        }
        fn migrate_out(
            &self,
            _: Outbound<'_>,
            _: &v1::MigrateRequest,
            _: &mut dyn FnMut(&Progress),
            _: Option<&mut dyn Hold>,
        ) -> Result<(v1::MigrateResult, String), AgentError> {
            unreachable!()
        }
        fn clone_out(
            &self,
            _: Outbound<'_>,
            _: &v1::CloneRequest,
            _: &mut dyn FnMut(&Progress),
        ) -> Result<v1::CloneResult, AgentError> {
            unreachable!()
        }
        fn resume(&self) {}
    }

    /// A running VM of four zero pages.
    pub(crate) fn vm(name: &str) -> Arc<Hosted> {
        let region = pagecast_memory::Region::anonymous(4 * 4096).unwrap();
        Arc::new(Hosted::new(
            name,
            "test".into(),
            ("", ContentKey::CLUSTER),
            v1::HostedVmState::Running,
            Box::new(Fake(region)),
        ))
    }

    /// Arrivals are held with their size: one that would take the host past
    /// its capacity, counting the VMs and the arrivals under way, is refused.
    #[test]
    fn an_arrival_that_does_not_fit_is_refused() {
        let mut r = Registry::default();
        r.insert(vm("here")).unwrap(); // 16 KiB
        let cap = 100 << 10;
        r.reserve_sized("a", v1::HostedVmState::Incoming, 60 << 10, cap)
            .unwrap();
        assert_eq!(r.committed_bytes(), (60 << 10) + 16384);
        let e = r
            .reserve_sized("b", v1::HostedVmState::Incoming, 40 << 10, cap)
            .unwrap_err();
        assert!(
            matches!(e, AgentError::NoRoom { free, .. } if free == cap - (60 << 10) - 16384),
            "{e}"
        );
        assert!(r.vm("b").is_none() && !r.reserved().iter().any(|(n, _)| n == "b"));
        // Without a bound, anything fits.
        r.reserve_sized("b", v1::HostedVmState::Incoming, 1 << 40, 0)
            .unwrap();
        // An arrival that ends lets its memory go.
        r.release("a");
        assert_eq!(r.committed_bytes(), (1 << 40) + 16384);
    }

    #[test]
    fn one_registry_holds_each_name_once_whatever_holds_it() {
        let mut r = Registry::default();
        r.reserve("a", v1::HostedVmState::Incoming).unwrap();
        assert!(matches!(
            r.reserve("a", v1::HostedVmState::Starting),
            Err(AgentError::VmExists(_))
        ));
        assert!(matches!(
            r.reserve("bad name", v1::HostedVmState::Starting),
            Err(AgentError::BadName(_))
        ));
        assert!(r.vm("a").is_none(), "a reservation is no VM");
        assert_eq!(r.count(), 0);
        let a = vm("a");
        r.insert(a.clone()).unwrap();
        assert!(r.holds(&a));
        assert!(matches!(r.insert(vm("a")), Err(AgentError::VmExists(_))));
        r.release("a");
        assert!(r.holds(&a), "release lets reservations go, never VMs");
        r.reserve("b", v1::HostedVmState::Starting).unwrap();
        assert_eq!(
            r.reserved(),
            vec![("b".to_owned(), v1::HostedVmState::Starting)]
        );
        assert!(
            r.remove("b").is_none(),
            "remove takes VMs, not reservations"
        );
        r.release("b");
        assert!(r.get("b").is_none());
        assert_eq!(r.remove("a").map(|v| v.name.clone()), Some("a".into()));
        assert_eq!(r.count(), 0);
    }

    #[test]
    fn a_vm_is_claimed_only_while_it_runs() {
        let a = vm("a");
        a.claim(v1::HostedVmState::MigratingOut).unwrap();
        let e = a.claim(v1::HostedVmState::Cloning).unwrap_err();
        assert!(
            matches!(e, AgentError::Busy { state, .. } if state == "migrating-out"),
            "{e}"
        );
        a.change(v1::HostedVmState::MigratingOut, v1::HostedVmState::Running)
            .unwrap();
        a.claim(v1::HostedVmState::Cloning).unwrap();
        assert_eq!(a.info().state, v1::HostedVmState::Cloning as i32);
    }
}
