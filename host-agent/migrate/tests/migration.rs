//! The migration engine between two real micro-VMs in one process, over an
//! authenticated loopback connection. Needs `/dev/kvm` (`pagecast_testkit`).

use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use pagecast_channel::ca::Authority;
use pagecast_channel::{Channel, Role};
use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_memory::kvm::{InitialMemory, MicroVm, MicroVmConfig, VcpuState, VmError, guest};
use pagecast_memory::synth::{SynthSpec, SyntheticVm};
use pagecast_memory::{DirtyBitmap, GuestMemory, MemoryError, PAGE_SIZE, Page, Region};
use pagecast_migrate::*;
use pagecast_pages::{ContentKey, PageHash};
use pagecast_proto::v1;
use pagecast_testkit::{Need, needs};

/// A micro-VM as the engine's source, in a dedup domain (name and key;
/// `None`: the cluster-wide one).
struct Src<'a>(&'a MicroVm, Option<(&'static str, ContentKey)>);

impl GuestMemory for Src<'_> {
    fn write_page(&self, frame: u64, data: &Page) -> Result<(), MemoryError> {
        self.0.write_page(frame, data)
    }
    fn take_dirty(&self) -> Result<DirtyBitmap, MemoryError> {
        self.0.take_dirty()
    }
    fn mark_dirty(&self, pages: &DirtyBitmap) -> Result<(), MemoryError> {
        self.0.mark_dirty(pages)
    }
    fn region(&self) -> &Region {
        self.0.region()
    }
}

impl SourceVm for Src<'_> {
    fn name(&self) -> &str {
        "vm1"
    }
    fn origin(&self) -> String {
        "test".into()
    }
    fn dirty_rate(&self) -> u64 {
        self.0.dirty_rate()
    }
    fn pause(&self) -> Result<(), VmError> {
        self.0.pause()
    }
    fn resume(&self) {
        self.0.resume()
    }
    fn vcpu_state(&self) -> Result<VcpuState, VmError> {
        self.0.vcpu_state()
    }
    fn set_throttle(&self, pct: u8) {
        self.0.set_throttle(pct)
    }
    fn domain(&self) -> &str {
        self.1.map_or("", |d| d.0)
    }
    fn content_key(&self) -> ContentKey {
        self.1.map_or(ContentKey::CLUSTER, |d| d.1)
    }
}

/// Content held by a resident VM on the destination.
struct Resident {
    vm: MicroVm,
    by_hash: std::collections::HashMap<PageHash, u64>,
    /// The one keyed domain this destination knows, if any.
    domain: Option<(&'static str, ContentKey)>,
}

impl Resident {
    fn new(vm: MicroVm, fp: &Fingerprinter) -> Self {
        Self::in_domain(vm, fp, None)
    }

    /// A resident VM of `domain`, which is the one domain this destination
    /// has a key for.
    fn in_domain(
        vm: MicroVm,
        fp: &Fingerprinter,
        domain: Option<(&'static str, ContentKey)>,
    ) -> Self {
        let key = domain.map_or(ContentKey::CLUSTER, |d| d.1);
        let f = fp.fingerprint(&vm, &key, &|_| {});
        let by_hash = f
            .hashes
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_zero_page())
            .map(|(i, h)| (*h, i as u64))
            .collect();
        Resident {
            vm,
            by_hash,
            domain,
        }
    }
}

impl LocalContent for Resident {
    fn copy(&self, key: &ContentKey, h: &PageHash, out: &mut Page) -> bool {
        let Some(&f) = self.by_hash.get(h) else {
            return false;
        };
        self.vm.read_page(f, out).is_ok() && key.hash_page(out) == *h
    }

    fn domain_key(&self, domain: &str) -> Result<ContentKey, String> {
        match self.domain {
            Some((name, key)) if name == domain => Ok(key),
            _ => pagecast_pages::domain::key_for(None, domain).map_err(|e| e.to_string()),
        }
    }
}

fn links() -> (ChannelLink, ChannelLink) {
    let ca = Authority::generate().unwrap();
    let (tls, s2) = (
        ca.issue("src", Role::Host, 1).unwrap(),
        ca.issue("dst", Role::Host, 1).unwrap(),
    );
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || Channel::server(l.accept().unwrap().0, &s2).unwrap());
    let c = Channel::client(TcpStream::connect(addr).unwrap(), &tls).unwrap();
    (ChannelLink::new(c), ChannelLink::new(t.join().unwrap()))
}

/// A destination's link that drops its connection when its `left`-th
/// frame arrives, as a destination that dies there would.
struct Dying {
    link: Option<ChannelLink>,
    left: u64,
}

fn gone() -> MigrationError {
    MigrationError::Aborted {
        code: pagecast_proto::v1::RefusalCode::Unavailable,
        reason: "the destination died".into(),
    }
}

impl MigrationLink for Dying {
    fn send(&mut self, body: v1::migrate_frame::Body) -> Result<(), MigrationError> {
        self.link.as_mut().ok_or_else(gone)?.send(body)
    }

    fn recv(&mut self, t: Option<Duration>) -> Result<v1::migrate_frame::Body, MigrationError> {
        let f = self.link.as_mut().ok_or_else(gone)?.recv(t)?;
        self.left = self.left.saturating_sub(1);
        if self.left == 0 {
            if let Some(l) = self.link.take() {
                l.into_inner().shutdown();
            }
            return Err(gone());
        }
        Ok(f)
    }
}

struct Outcome {
    report: Result<MigrationReport, MigrationError>,
    incoming: Result<IncomingReport, MigrationError>,
    dest_vm: Option<MicroVm>,
}

fn migrate(
    src: &MicroVm,
    local: &dyn LocalContent,
    opts: MigrateOptions,
    kill_dest_after: Option<u64>,
) -> Outcome {
    migrate_src(&Src(src, None), local, opts, kill_dest_after)
}

fn migrate_src(
    src: &Src<'_>,
    local: &dyn LocalContent,
    opts: MigrateOptions,
    kill_dest_after: Option<u64>,
) -> Outcome {
    let fp = Fingerprinter::new(2).unwrap();
    let (mut a, mut b) = links();
    let started: Mutex<Option<MicroVm>> = Mutex::new(None);
    let (report, incoming) = std::thread::scope(|s| {
        let dst = s.spawn(|| {
            let begin = match b.recv(Some(Duration::from_secs(10)))? {
                v1::migrate_frame::Body::Begin(b) => b,
                other => panic!("expected begin, got {other:?}"),
            };
            if let Some(n) = kill_dest_after {
                // A destination that dies mid-migration: it takes part as
                // usual, and drops the connection on its n-th frame.
                let mut dying = Dying {
                    link: Some(b),
                    left: n,
                };
                return migrate_in(&mut dying, &begin, local, &fp, &mut |_, _| {
                    Err("a dying destination starts nothing".into())
                });
            }
            migrate_in(&mut b, &begin, local, &fp, &mut |region, state| {
                let vm = MicroVm::restore(region, &state, begin.dirty_rate)
                    .map_err(|e| e.to_string())?;
                let p = vm.progress().map_err(|e| e.to_string())?;
                *started.lock().unwrap() = Some(vm);
                Ok(p)
            })
        });
        let report = migrate_out(src, &mut a, &fp, &opts, &mut |_| {});
        (report, dst.join().unwrap())
    });
    Outcome {
        report,
        incoming,
        dest_vm: started.into_inner().unwrap(),
    }
}

fn boot(family: &str, index: u32, mib: u64, rate: u64, ws: u64) -> MicroVm {
    let synth = SyntheticVm::new(SynthSpec::new(family, index, mib << 20).unwrap()).unwrap();
    let cfg = MicroVmConfig {
        memory_bytes: mib << 20,
        working_set: std::iter::once(16..16 + ws).collect(),
        dirty_rate: rate,
    };
    MicroVm::boot(&cfg, InitialMemory::Synthetic(&synth)).unwrap()
}

#[test]
fn a_dirtying_guest_moves_verified_and_keeps_running() {
    if !needs(
        "a_dirtying_guest_moves_verified_and_keeps_running",
        &[Need::Kvm],
    ) {
        return;
    }
    let src = boot("web", 0, 64, 20_000, 2048);
    std::thread::sleep(Duration::from_millis(100));
    let opts = MigrateOptions {
        verify_full: true,
        ..MigrateOptions::default()
    };
    let out = migrate(&src, &NoLocalContent, opts, None);
    let report = out.report.unwrap();
    eprintln!("{}", serde_json::to_string(&report).unwrap());
    out.incoming.unwrap();
    assert!(report.verified && report.verified_full, "{report:?}");
    assert!(
        report.rounds.len() >= 2,
        "pre-copy rounds ran: {:?}",
        report.rounds
    );
    assert!(
        report.pages_sent >= report.nonzero_pages - 64,
        "everything was sent"
    );
    // The source is paused for the caller to release; it does not run.
    let before = src.progress().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        src.progress().unwrap(),
        before,
        "the source no longer runs the VM"
    );
    // The destination runs it and its counter keeps advancing.
    let dest = out.dest_vm.unwrap();
    let p0 = dest.progress().unwrap();
    // The counter it reported on resuming is where the guest went on from:
    // at least the source's last value, at most what it reads now.
    assert!(
        report.progress_after >= before && report.progress_after <= p0,
        "resumed at {} (source stopped at {before}, destination now {p0})",
        report.progress_after
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        dest.progress().unwrap() > p0,
        "the guest runs on at the destination"
    );
    assert!(
        dest.progress().unwrap() > before,
        "and continues from where it was"
    );
    dest.stop().unwrap();
    src.stop().unwrap();
}

#[test]
fn pages_the_destination_holds_are_filled_there_and_not_sent() {
    if !needs(
        "pages_the_destination_holds_are_filled_there_and_not_sent",
        &[Need::Kvm],
    ) {
        return;
    }
    let src = boot("db", 0, 32, 0, 64);
    let resident = boot("db", 1, 32, 0, 64);
    let fp = Fingerprinter::new(2).unwrap();
    let local = Resident::new(resident, &fp);
    // What the resident can supply: frames of the source whose content it
    // holds (zero pages aside). The parameter frame is left out: both guests
    // tick their progress counters there while they run, so it matches the
    // resident's only when the two counters happen to be equal at the pause.
    src.pause().unwrap();
    let f = fp.fingerprint(&src, &ContentKey::CLUSTER, &|_| {});
    src.resume();
    let params_frame = (guest::PARAMS_ADDR / PAGE_SIZE as u64) as usize;
    let shared = f
        .hashes
        .iter()
        .enumerate()
        .filter(|&(frame, h)| {
            frame != params_frame && !h.is_zero_page() && local.by_hash.contains_key(h)
        })
        .count() as u64;
    assert!(
        shared > 1000,
        "the two VMs of one family share pages: {shared}"
    );
    let out = migrate(&src, &local, MigrateOptions::default(), None);
    let report = out.report.unwrap();
    eprintln!("{}", serde_json::to_string(&report).unwrap());
    let incoming = out.incoming.unwrap();
    // Every shared frame was filled locally (within the VM's own duplicates
    // too), and only the rest crossed the connection.
    assert!(
        report.pages_local >= shared,
        "{} filled locally, {shared} shared",
        report.pages_local
    );
    assert_eq!(incoming.pages_local, report.pages_local);
    let sent_round0 = report.rounds[0].pages;
    let distinct_needed = {
        let mut v: Vec<_> = f
            .hashes
            .iter()
            .filter(|h| !h.is_zero_page() && !local.by_hash.contains_key(*h))
            .collect();
        v.sort_unstable();
        v.dedup();
        v.len() as u64
    };
    assert!(
        sent_round0 <= distinct_needed + 70,
        "round 0 sent {sent_round0}, needed {distinct_needed}"
    );
    out.dest_vm.unwrap().stop().unwrap();
    src.stop().unwrap();
    local.vm.stop().unwrap();
}

#[test]
fn a_vm_of_a_dedup_domain_is_filled_only_from_its_domain_and_checked_under_its_key() {
    if !needs(
        "a_vm_of_a_dedup_domain_is_filled_only_from_its_domain_and_checked_under_its_key",
        &[Need::Kvm],
    ) {
        return;
    }
    let fp = Fingerprinter::new(2).unwrap();
    let red = ("red", ContentKey::keyed([1; 32]));
    let src = boot("db", 0, 32, 0, 64);
    // A resident of the same family in the same domain fills most pages.
    let local = Resident::in_domain(boot("db", 1, 32, 0, 64), &fp, Some(red));
    let out = migrate_src(
        &Src(&src, Some(red)),
        &local,
        MigrateOptions::default(),
        None,
    );
    let report = out.report.unwrap();
    assert!(report.verified, "{report:?}");
    assert!(
        report.pages_local > 1000,
        "{} filled locally",
        report.pages_local
    );
    out.dest_vm.unwrap().stop().unwrap();
    local.vm.stop().unwrap();

    // The same resident, named in another domain: nothing is filled.
    let blue = Resident::in_domain(
        boot("db", 1, 32, 0, 64),
        &fp,
        Some(("blue", ContentKey::keyed([3; 32]))),
    );
    let other = Resident {
        domain: Some(red),
        ..blue
    };
    let out = migrate_src(
        &Src(&src, Some(red)),
        &other,
        MigrateOptions::default(),
        None,
    );
    let report = out.report.unwrap();
    assert_eq!(report.pages_local, 0, "filled across domains");
    out.dest_vm.unwrap().stop().unwrap();
    other.vm.stop().unwrap();

    // A destination whose key for the domain differs refuses at once.
    let wrong = Resident::in_domain(
        boot("db", 1, 32, 0, 64),
        &fp,
        Some(("red", ContentKey::keyed([2; 32]))),
    );
    let out = migrate_src(
        &Src(&src, Some(red)),
        &wrong,
        MigrateOptions::default(),
        None,
    );
    let err = out.report.unwrap_err().to_string();
    assert!(err.contains("key differs"), "{err}");
    assert!(out.dest_vm.is_none());
    wrong.vm.stop().unwrap();
    // The source runs on after the refusal.
    let p = src.progress().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(src.progress().unwrap() > p, "the source still runs");
    src.stop().unwrap();
}

#[test]
fn a_destination_that_dies_leaves_the_source_running() {
    if !needs(
        "a_destination_that_dies_leaves_the_source_running",
        &[Need::Kvm],
    ) {
        return;
    }
    let src = boot("web", 2, 32, 5_000, 512);
    // Frames the guest never writes (its working set is 16..528), marked
    // dirty before the migration: the engine takes them with its first
    // read of the log, so only its handing them back can put them there
    // again.
    let pages = src.page_count();
    let mut taken = DirtyBitmap::new(pages);
    for f in (4000..pages).step_by(97) {
        taken.set(f).unwrap();
    }
    src.mark_dirty(&taken).unwrap();
    // The destination dies on its 20th frame: past the manifest, in the
    // middle of round 0's pages.
    let out = migrate(&src, &NoLocalContent, MigrateOptions::default(), Some(20));
    let e = out.report.expect_err("the migration failed");
    eprintln!("the source says: {e}");
    assert!(out.incoming.is_err(), "the destination gave up");
    assert!(out.dest_vm.is_none(), "no VM at the destination");
    // The source runs on.
    let p0 = src.progress().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(src.progress().unwrap() > p0, "the source VM keeps running");
    // And every dirty bit the engine took was handed back.
    let d = src.take_dirty().unwrap();
    let lost: Vec<u64> = taken.iter().filter(|&f| !d.get(f)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} dirty bits the engine took were lost, frames {:?}...",
        lost.len(),
        taken.count(),
        &lost[..lost.len().min(8)]
    );
    src.stop().unwrap();
}

#[test]
fn a_guest_dirtying_faster_than_the_link_converges_by_throttling() {
    if !needs(
        "a_guest_dirtying_faster_than_the_link_converges_by_throttling",
        &[Need::Kvm],
    ) {
        return;
    }
    // 50,000 page writes/s over 4,096 pages against a 100 Mbit/s link
    // (about 3,000 pages/s): without throttling it would never converge.
    let src = boot("web", 3, 32, 50_000, 4096);
    let opts = MigrateOptions {
        bandwidth_bps: Some(100_000_000),
        max_downtime: Duration::from_millis(300),
        switchover: Switchover::Precopy,
        ..MigrateOptions::default()
    };
    let out = migrate(&src, &NoLocalContent, opts, None);
    let report = out.report.unwrap();
    eprintln!("{}", serde_json::to_string(&report).unwrap());
    assert!(!report.postcopy, "pre-copy was asked for");
    assert!(
        report.max_throttle_pct > 0,
        "throttled: {:?}",
        report.rounds
    );
    assert!(
        report.rounds.len() < 31,
        "converged before the round limit: {} rounds",
        report.rounds.len()
    );
    assert!(report.verified);
    out.dest_vm.unwrap().stop().unwrap();
    src.stop().unwrap();
}

/// The same guest under `auto`: where pre-copy stops shrinking, the guest
/// is slowed to half speed once; still too fast, the VM resumes at its
/// destination instead of being slowed further, and every page it lacked
/// arrives afterwards, checked.
#[test]
fn auto_slows_a_guest_that_outruns_the_link_once_then_resumes_it_by_postcopy() {
    if !needs(
        "auto_slows_a_guest_that_outruns_the_link_once_then_resumes_it_by_postcopy",
        &[Need::Kvm],
    ) {
        return;
    }
    let src = boot("web", 3, 32, 50_000, 4096);
    let opts = MigrateOptions {
        bandwidth_bps: Some(100_000_000),
        max_downtime: Duration::from_millis(300),
        ..MigrateOptions::default()
    };
    assert_eq!(opts.switchover, Switchover::Auto, "auto is the default");
    let out = migrate(&src, &NoLocalContent, opts, None);
    let report = out.report.unwrap();
    eprintln!("{}", serde_json::to_string(&report).unwrap());
    let incoming = out.incoming.unwrap();
    assert!(
        report.postcopy,
        "switched to post-copy: {:?}",
        report.rounds
    );
    assert!(incoming.postcopy);
    assert_eq!(report.max_throttle_pct, 50, "slowed once, to half speed");
    assert!(report.postcopy_pages > 0, "pages pushed after the resume");
    assert!(report.verified, "the table matched the source's digest");
    let dest = out.dest_vm.unwrap();
    let p = dest.progress().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(dest.progress().unwrap() > p, "the guest runs on there");
    dest.stop().unwrap();
    src.stop().unwrap();
}

/// Boots guest `index` writing `ws` pages, moves it by `postcopy` with
/// every frame verified (at most `bandwidth_bps`), and checks that it runs
/// on at its destination from where it paused; the two reports, and the
/// source and destination VMs (stopped by [`stop_both`]).
fn moved_by_postcopy(
    index: u32,
    ws: u64,
    bandwidth_bps: Option<u64>,
) -> (MigrationReport, IncomingReport, MicroVm, MicroVm) {
    let src = boot("web", index, 64, 20_000, ws);
    std::thread::sleep(Duration::from_millis(100));
    let opts = MigrateOptions {
        switchover: Switchover::Postcopy,
        verify_full: true,
        bandwidth_bps,
        ..MigrateOptions::default()
    };
    let out = migrate(&src, &NoLocalContent, opts, None);
    let report = out.report.unwrap();
    eprintln!("{}", serde_json::to_string(&report).unwrap());
    let incoming = out.incoming.unwrap();
    assert!(report.postcopy && incoming.postcopy);
    assert!(report.verified && report.verified_full, "{report:?}");
    let dest = out.dest_vm.unwrap();
    let p = dest.progress().unwrap();
    assert!(p >= report.progress_after);
    std::thread::sleep(Duration::from_millis(100));
    assert!(dest.progress().unwrap() > p, "the guest runs on there");
    (report, incoming, src, dest)
}

fn stop_both(src: MicroVm, dest: MicroVm) {
    dest.stop().unwrap();
    src.stop().unwrap();
}

/// `postcopy` resumes right after round 0: the guest's touches of pages
/// dirtied since are asked for and served first, the rest pushed; the
/// memory it resumed on is the source's at the pause, frame for frame.
#[test]
fn postcopy_resumes_after_round_zero_and_pulls_what_the_guest_touches() {
    if !needs(
        "postcopy_resumes_after_round_zero_and_pulls_what_the_guest_touches",
        &[Need::Kvm],
    ) {
        return;
    }
    // Paced, so that the push of the 7 MB missing outlasts the VM's start
    // and the guest touches pages still missing: unpaced, on a busy host,
    // the push could end before the guest ran, and nothing was asked for.
    let (report, incoming, src, dest) = moved_by_postcopy(0, 2048, Some(300_000_000));
    assert_eq!(
        report.rounds.len(),
        1,
        "no pre-copy round: {:?}",
        report.rounds
    );
    assert!(report.postcopy_pages > 0);
    assert!(
        incoming.postcopy_requested > 0 && report.postcopy_requested >= incoming.postcopy_requested,
        "the guest touched missing pages and they were asked for: {} asked, {} heard",
        incoming.postcopy_requested,
        report.postcopy_requested
    );
    stop_both(src, dest);
}

/// A guest whose working set fits the first working set a post-copy
/// switchover sends (256 frames): every page it wrote during the last
/// round arrives before it resumes, so it asks the source for none of the
/// pages it goes on writing; the copy is verified frame for frame.
#[test]
fn a_small_working_set_goes_with_the_postcopy_switchover() {
    if !needs(
        "a_small_working_set_goes_with_the_postcopy_switchover",
        &[Need::Kvm],
    ) {
        return;
    }
    let (_, incoming, src, dest) = moved_by_postcopy(1, 64, None);
    assert_eq!(
        incoming.postcopy_requested, 0,
        "the guest's pages came with the switchover"
    );
    stop_both(src, dest);
}

/// A source's link that fails after the Commit and `after` more frames:
/// `frozen`, it keeps its connection open and sends nothing more (a
/// source stopped with SIGSTOP, or cut off by a partition); otherwise it
/// closes it (a source that died).
struct SourceFails {
    link: ChannelLink,
    committed: bool,
    after: u64,
    frozen: bool,
    failed: bool,
}

impl MigrationLink for SourceFails {
    fn send(&mut self, body: v1::migrate_frame::Body) -> Result<(), MigrationError> {
        if self.failed {
            return if self.frozen { Ok(()) } else { Err(gone()) };
        }
        if self.committed {
            if self.after == 0 {
                self.failed = true;
                if !self.frozen {
                    self.link.shutdown();
                    return Err(gone());
                }
                return Ok(());
            }
            self.after -= 1;
        }
        self.committed |= matches!(body, v1::migrate_frame::Body::Commit(_));
        self.link.send(body)
    }

    fn recv(&mut self, t: Option<Duration>) -> Result<v1::migrate_frame::Body, MigrationError> {
        self.link.recv(t)
    }

    fn poll_frame(&mut self) -> Result<Option<v1::migrate_frame::Body>, MigrationError> {
        self.link.poll_frame()
    }
}

/// Post-copy whose source fails after the VM resumed at the destination:
/// the destination cannot complete the VM's memory, says so (post-copy
/// lost) within its reply timeout, and its copy can be stopped even while
/// its vCPU waits for a page; the source keeps its copy paused, in doubt.
fn postcopy_source_fails(frozen: bool) {
    let src = boot("web", 1, 32, 20_000, 2048);
    std::thread::sleep(Duration::from_millis(100));
    let opts = MigrateOptions {
        switchover: Switchover::Postcopy,
        reply_timeout: Duration::from_secs(3),
        ..MigrateOptions::default()
    };
    let fp = Fingerprinter::new(2).unwrap();
    let (a, mut b) = links();
    let mut a = SourceFails {
        link: a,
        committed: false,
        after: 3,
        frozen,
        failed: false,
    };
    let started: Mutex<Option<MicroVm>> = Mutex::new(None);
    let t = std::time::Instant::now();
    let (report, incoming) = std::thread::scope(|s| {
        let dst = s.spawn(|| {
            let begin = match b.recv(Some(Duration::from_secs(10))).unwrap() {
                v1::migrate_frame::Body::Begin(b) => b,
                other => panic!("expected begin, got {other:?}"),
            };
            let r = migrate_in(
                &mut b,
                &begin,
                &NoLocalContent,
                &fp,
                &mut |region, state| {
                    let vm = MicroVm::restore(region, &state, begin.dirty_rate)
                        .map_err(|e| e.to_string())?;
                    let p = vm.progress().map_err(|e| e.to_string())?;
                    *started.lock().unwrap() = Some(vm);
                    Ok(p)
                },
            );
            (r, t.elapsed())
        });
        let report = migrate_out(&Src(&src, None), &mut a, &fp, &opts, &mut |_| {});
        (report, dst.join().unwrap())
    });
    let (incoming, gave_up_after) = incoming;
    let err = incoming.unwrap_err();
    eprintln!("destination: {err} after {gave_up_after:?}");
    assert!(
        matches!(err, MigrationError::PostcopyLost(_)),
        "the destination lost its source of pages: {err}"
    );
    assert!(
        gave_up_after < REPLY_TIMEOUT + Duration::from_secs(5),
        "gave up after {gave_up_after:?}"
    );
    let err = report.unwrap_err();
    assert!(
        matches!(err, MigrationError::InDoubt(_)),
        "the source's copy stays paused, in doubt: {err}"
    );
    let p = src.progress().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(src.progress().unwrap(), p, "the source never resumes it");
    // The destination's copy is held (it never runs on after the failure)
    // and stops although frames it waited for never came.
    let dest = started.into_inner().unwrap().expect("it started");
    std::thread::sleep(Duration::from_millis(50));
    let held = dest.progress().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(dest.progress().unwrap(), held, "the failed copy runs on");
    let stopping = std::thread::spawn(move || dest.stop());
    let t = std::time::Instant::now();
    while !stopping.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(5), "the vCPU is stuck");
        std::thread::sleep(Duration::from_millis(10));
    }
    stopping.join().unwrap().unwrap();
    src.stop().unwrap();
}

#[test]
fn a_source_that_dies_during_postcopy_loses_the_vm_without_two_copies() {
    if !needs(
        "a_source_that_dies_during_postcopy_loses_the_vm_without_two_copies",
        &[Need::Kvm],
    ) {
        return;
    }
    postcopy_source_fails(false);
}

#[test]
fn a_source_frozen_during_postcopy_is_given_up_on_within_the_reply_timeout() {
    if !needs(
        "a_source_frozen_during_postcopy_is_given_up_on_within_the_reply_timeout",
        &[Need::Kvm],
    ) {
        return;
    }
    postcopy_source_fails(true);
}

/// A held migration's hold that lets it go at once.
struct GoAtOnce;

impl Hold for GoAtOnce {
    fn needs(&mut self, _: &[PageHash], _: u64) -> Result<(), MigrationError> {
        Ok(())
    }
    fn poll(&mut self) -> HoldPoll {
        HoldPoll::Go
    }
}

/// An intermediary of a scatter-gather job, in the test's memory: pages by
/// content, copied from the source before the move. `dies_after`: it
/// fails once it has given that many pages (its host died mid-gather).
struct Stash {
    pages: std::collections::HashMap<PageHash, Box<Page>>,
    dies_after: Option<usize>,
    given: usize,
}

impl GatherSource for Stash {
    fn fetch(
        &mut self,
        hashes: &[PageHash],
        got: &mut dyn FnMut(PageHash, &Page),
    ) -> Result<(), String> {
        for h in hashes {
            if self.dies_after.is_some_and(|n| self.given >= n) {
                return Err("the intermediary died".into());
            }
            if let Some(p) = self.pages.get(h) {
                got(*h, p);
                self.given += 1;
            }
        }
        Ok(())
    }
}

/// A destination's job that gathers from one [`Stash`] whatever it holds
/// of what the arriving VM still lacks.
struct Gathering(Option<Stash>);

impl SlotEvents for Gathering {
    fn opened(&mut self, _: &std::sync::Arc<IncomingSlot>) {}
    fn closed(&mut self, _: &std::sync::Arc<IncomingSlot>) {}
    fn gather(&mut self, _: &std::sync::Arc<IncomingSlot>, still: &[PageHash]) -> Option<Gather> {
        let stash = self.0.take()?;
        let contents = still
            .iter()
            .filter(|h| stash.pages.contains_key(h))
            .copied()
            .collect();
        Some(Gather {
            contents,
            source: Box::new(stash),
        })
    }
}

/// Every non-zero page of `vm`, by content, read while it is paused.
fn stash_of(vm: &MicroVm, fp: &Fingerprinter) -> std::collections::HashMap<PageHash, Box<Page>> {
    vm.pause().unwrap();
    let f = fp.fingerprint(vm, &ContentKey::CLUSTER, &|_| {});
    let mut pages = std::collections::HashMap::new();
    for (frame, h) in f.hashes.iter().enumerate() {
        if !h.is_zero_page() {
            let mut p = Box::new([0u8; PAGE_SIZE]);
            vm.read_page(frame as u64, &mut p).unwrap();
            pages.insert(*h, p);
        }
    }
    vm.resume();
    pages
}

/// A held move whose destination gathers what it lacks from a stash
/// (`dies_after`: one that fails mid-gather) instead of its source.
fn gathered_move(dies_after: Option<usize>) -> (MigrationReport, IncomingReport, u64) {
    let src = boot("web", 2, 32, 5_000, 512);
    std::thread::sleep(Duration::from_millis(100));
    let fp = Fingerprinter::new(2).unwrap();
    let stash = Stash {
        pages: stash_of(&src, &fp),
        dies_after,
        given: 0,
    };
    let opts = MigrateOptions {
        verify_full: true,
        ..MigrateOptions::default()
    };
    let (mut a, mut b) = links();
    let started: Mutex<Option<MicroVm>> = Mutex::new(None);
    let (report, incoming) = std::thread::scope(|s| {
        let dst = s.spawn(|| {
            let begin = match b.recv(Some(Duration::from_secs(10))).unwrap() {
                v1::migrate_frame::Body::Begin(b) => b,
                other => panic!("expected begin, got {other:?}"),
            };
            let mut events = Gathering(Some(stash));
            migrate_in_job(
                &mut b,
                &begin,
                &NoLocalContent,
                &fp,
                &mut events,
                &mut |region, state| {
                    let vm = MicroVm::restore(region, &state, begin.dirty_rate)
                        .map_err(|e| e.to_string())?;
                    let p = vm.progress().map_err(|e| e.to_string())?;
                    *started.lock().unwrap() = Some(vm);
                    Ok(p)
                },
            )
        });
        let report = migrate_out_held(
            &Src(&src, None),
            &mut a,
            &fp,
            &opts,
            &mut |_| {},
            Some(&mut GoAtOnce),
        );
        (report, dst.join().unwrap())
    });
    let report = report.unwrap();
    let incoming = incoming.unwrap();
    eprintln!("{}", serde_json::to_string(&report).unwrap());
    eprintln!("{}", serde_json::to_string(&incoming).unwrap());
    let dest = started.into_inner().unwrap().expect("it started");
    let p = dest.progress().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(dest.progress().unwrap() > p, "the guest runs on there");
    dest.stop().unwrap();
    let nonzero = report.nonzero_pages;
    src.stop().unwrap();
    (report, incoming, nonzero)
}

/// Scatter-gather's destination side: the contents the destination lacks
/// sit on an intermediary, so it tells the source it will gather them,
/// the move switches over by post-copy (it was offered `auto`), and the
/// destination fills them from there while the VM runs; the source sends
/// only what changed since. Every frame is checked against the source's
/// paused memory (`verify_full`).
#[test]
fn a_destination_gathers_what_it_lacks_from_an_intermediary_after_switching_over() {
    if !needs(
        "a_destination_gathers_what_it_lacks_from_an_intermediary_after_switching_over",
        &[Need::Kvm, Need::Root],
    ) {
        return;
    }
    let (report, incoming, nonzero) = gathered_move(None);
    assert!(
        report.postcopy && incoming.postcopy,
        "switched by post-copy"
    );
    assert!(report.verified && report.verified_full, "{report:?}");
    assert!(
        incoming.postcopy_gathered > nonzero / 2,
        "most frames gathered: {} of {nonzero}",
        incoming.postcopy_gathered
    );
    assert_eq!(incoming.postcopy_gather_lost, 0);
    assert!(
        report.pages_sent < nonzero / 2,
        "the source sent {} pages of {nonzero}",
        report.pages_sent
    );
}

/// An intermediary that dies mid-gather: what it did not give is asked of
/// the source (paused, holding every frame until post-copy ends), and the
/// VM still completes, verified.
#[test]
fn contents_an_intermediary_fails_to_give_are_asked_of_the_source() {
    if !needs(
        "contents_an_intermediary_fails_to_give_are_asked_of_the_source",
        &[Need::Kvm, Need::Root],
    ) {
        return;
    }
    let (report, incoming, nonzero) = gathered_move(Some(300));
    assert!(report.postcopy && incoming.postcopy);
    assert!(report.verified && report.verified_full, "{report:?}");
    assert!(
        incoming.postcopy_gathered >= 300 && incoming.postcopy_gather_lost > 0,
        "some gathered, the rest lost: {incoming:?}"
    );
    assert!(
        incoming.postcopy_gather_error.contains("died"),
        "{:?}",
        incoming.postcopy_gather_error
    );
    assert!(
        report.pages_sent >= incoming.postcopy_gather_lost.min(nonzero),
        "the source sent what was lost: {} pages",
        report.pages_sent
    );
}
