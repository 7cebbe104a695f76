//! The migration engine over an in-memory link and synthetic memory
//! (`pagecast_migrate::mem`): no KVM, no sockets, every machine. These pin
//! what the source and the destination do at each step, and what every
//! failure leaves behind, for any change to the engine.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_memory::kvm::VcpuState;
use pagecast_memory::synth::{SynthSpec, SyntheticMemory, SyntheticVm};
use pagecast_memory::{DirtyBitmap, GuestMemory, Page, Region};
use pagecast_migrate::mem::{MemLink, NoCasts, SyntheticSource, link_pair};
use pagecast_migrate::*;
use pagecast_pages::{ContentKey, PAGE_SIZE, PageHash};
use pagecast_proto::v1;
use pagecast_proto::v1::migrate_frame::Body;

fn memory(family: &str, index: u32, mib: u64) -> SyntheticMemory {
    SyntheticVm::new(SynthSpec::new(family, index, mib << 20).unwrap())
        .unwrap()
        .materialize(None)
        .unwrap()
}

fn fp() -> Fingerprinter {
    Fingerprinter::new(2).unwrap()
}

/// Content held by a resident VM at the destination.
struct Resident {
    mem: SyntheticMemory,
    by_hash: HashMap<PageHash, u64>,
}

impl Resident {
    fn new(mem: SyntheticMemory) -> Self {
        let f = fp().fingerprint(&mem, &ContentKey::CLUSTER, &|_| {});
        let by_hash = f
            .hashes
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_zero_page())
            .map(|(i, h)| (*h, i as u64))
            .collect();
        Resident { mem, by_hash }
    }
}

impl LocalContent for Resident {
    fn copy(&self, key: &ContentKey, h: &PageHash, out: &mut Page) -> bool {
        let Some(&f) = self.by_hash.get(h) else {
            return false;
        };
        self.mem.read_page(f, out).is_ok() && key.hash_page(out) == *h
    }
}

/// A destination's link that dies (drops both directions) when a frame
/// `dies` says so arrives.
struct Dying {
    link: Option<MemLink>,
    dies: Box<dyn FnMut(&Body) -> bool + Send>,
}

impl MigrationLink for Dying {
    fn send(&mut self, body: Body) -> Result<(), MigrationError> {
        match &mut self.link {
            Some(l) => l.send(body),
            None => Err(MigrationError::Protocol("dead".into())),
        }
    }
    fn recv(&mut self, t: Option<Duration>) -> Result<Body, MigrationError> {
        let l = self
            .link
            .as_mut()
            .ok_or(MigrationError::Protocol("dead".into()))?;
        let f = l.recv(t)?;
        if (self.dies)(&f) {
            self.link = None;
            return Err(MigrationError::Protocol("the destination died".into()));
        }
        Ok(f)
    }
}

struct Outcome {
    report: Result<MigrationReport, MigrationError>,
    incoming: Result<IncomingReport, MigrationError>,
    copy: Option<Region>,
}

/// Migrates `src` to a destination holding `local`, whose link is
/// `wrap(link)`; `hold` holds it for a gang job.
fn migrate(
    src: &SyntheticSource,
    local: &(dyn LocalContent + Sync),
    opts: MigrateOptions,
    wrap: impl FnOnce(MemLink) -> Box<dyn MigrationLink> + Send,
    hold: Option<&mut dyn Hold>,
) -> Outcome {
    let (mut a, b) = link_pair();
    let fp = fp();
    let mut copy = None;
    let (report, incoming) = std::thread::scope(|s| {
        let dst = s.spawn(|| {
            let mut b = wrap(b);
            let begin = match b.recv(Some(Duration::from_secs(10)))? {
                Body::Begin(b) => b,
                other => panic!("expected begin, got {other:?}"),
            };
            migrate_in(
                &mut *b,
                &begin,
                local,
                &fp,
                &mut |region, _state: VcpuState| {
                    copy = Some(region);
                    Ok(7)
                },
            )
        });
        let report = migrate_out_held(src, &mut a, &fp, &opts, &mut |_| {}, hold);
        (report, dst.join().unwrap())
    });
    Outcome {
        report,
        incoming,
        copy,
    }
}

fn plain(l: MemLink) -> Box<dyn MigrationLink> {
    Box::new(l)
}

/// Frames whose contents differ between two regions.
fn differing(a: &Region, b: &dyn GuestMemory) -> Vec<u64> {
    let (mut x, mut y) = (Box::new([0u8; PAGE_SIZE]), Box::new([0u8; PAGE_SIZE]));
    (0..b.page_count())
        .filter(|&f| {
            a.read_page(f, &mut x).unwrap();
            b.read_page(f, &mut y).unwrap();
            x != y
        })
        .collect()
}

#[test]
fn memory_arrives_whole_verified_and_each_content_once() {
    let src = SyntheticSource::new("vm1", memory("web", 1, 8));
    let out = migrate(
        &src,
        &NoLocalContent,
        MigrateOptions::default(),
        plain,
        None,
    );
    let r = out.report.unwrap();
    let i = out.incoming.unwrap();
    assert!(r.verified);
    assert_eq!(i.progress, 7, "the destination's start result comes back");
    let copy = out.copy.expect("the destination started the VM");
    assert_eq!(differing(&copy, &*src), Vec::<u64>::new());
    // Round 0 sends each distinct content once: repeated pages are copied
    // at the destination from the first one received.
    let f = fp().fingerprint(&*src, &ContentKey::CLUSTER, &|_| {});
    let distinct: std::collections::HashSet<_> =
        f.hashes.iter().filter(|h| !h.is_zero_page()).collect();
    assert_eq!(r.rounds[0].pages, distinct.len() as u64, "{:?}", r.rounds);
    assert!(
        distinct.len() < r.nonzero_pages as usize,
        "the VM repeats pages"
    );
    assert!(
        src.is_paused(),
        "a migrated source stays paused for its agent to release"
    );
}

#[test]
fn pages_the_destination_holds_are_filled_there_and_not_sent() {
    let src = SyntheticSource::new("vm1", memory("web", 1, 8));
    let resident = Resident::new(memory("web", 2, 8));
    let out = migrate(&src, &resident, MigrateOptions::default(), plain, None);
    let r = out.report.unwrap();
    assert!(r.pages_local > r.nonzero_pages / 4, "{r:?}");
    assert!(
        r.rounds[0].pages < r.nonzero_pages - r.pages_local / 2,
        "{r:?}"
    );
    assert_eq!(differing(&out.copy.unwrap(), &*src), Vec::<u64>::new());
    // Without local content (as VMScatter and pre-copy do), all is sent.
    let src2 = SyntheticSource::new("vm2", memory("web", 1, 8));
    let opts = MigrateOptions {
        no_local: true,
        ..MigrateOptions::default()
    };
    let r2 = migrate(&src2, &resident, opts, plain, None).report.unwrap();
    assert_eq!(r2.pages_local, 0);
}

#[test]
fn a_dirtying_guest_converges_and_the_copy_is_its_memory_at_the_pause() {
    // 4,000 page writes a second over 512 pages, on a link of 200 Mbit/s
    // (about 6,000 pages a second): rounds shrink until the rest fits.
    let src = SyntheticSource::dirtying("vm1", memory("db", 1, 16), 4000, 16..528);
    std::thread::sleep(Duration::from_millis(100));
    let opts = MigrateOptions {
        bandwidth_bps: Some(200_000_000),
        max_downtime: Duration::from_millis(100),
        ..MigrateOptions::default()
    };
    let out = migrate(&src, &NoLocalContent, opts, plain, None);
    let r = out.report.unwrap();
    assert!(r.rounds.len() >= 2, "pre-copy rounds ran: {:?}", r.rounds);
    assert!(r.verified);
    assert!(src.written() > 0);
    assert!(src.is_paused());
    assert_eq!(differing(&out.copy.unwrap(), &*src), Vec::<u64>::new());
}

#[test]
fn a_destination_that_dies_gets_every_dirty_bit_handed_back_and_the_source_runs_on() {
    let src = SyntheticSource::dirtying("vm1", memory("web", 3, 8), 500, 16..64);
    // Frames the guest never writes, dirty before the migration: the
    // engine takes them, and must give them back.
    let pages = src.page_count();
    let mut taken = DirtyBitmap::new(pages);
    for f in (1000..pages).step_by(31) {
        taken.set(f).unwrap();
    }
    src.mark_dirty(&taken).unwrap();
    let mut seen = 0;
    let out = migrate(
        &src,
        &NoLocalContent,
        MigrateOptions::default(),
        |l| {
            Box::new(Dying {
                link: Some(l),
                dies: Box::new(move |_| {
                    seen += 1;
                    seen == 6
                }),
            })
        },
        None,
    );
    assert!(out.report.is_err());
    assert!(out.incoming.is_err());
    assert!(out.copy.is_none(), "nothing started at the destination");
    assert!(!src.is_paused(), "the source runs on");
    let d = src.take_dirty().unwrap();
    let lost: Vec<u64> = taken.iter().filter(|&f| !d.get(f)).collect();
    assert!(lost.is_empty(), "dirty bits lost: {lost:?}");
}

#[test]
fn no_confirmation_after_commit_is_in_doubt_and_the_source_stays_paused() {
    let src = SyntheticSource::new("vm1", memory("web", 4, 4));
    let out = migrate(
        &src,
        &NoLocalContent,
        MigrateOptions {
            reply_timeout: Duration::from_secs(2),
            ..MigrateOptions::default()
        },
        |l| {
            Box::new(Dying {
                link: Some(l),
                dies: Box::new(|b| matches!(b, Body::Commit(_))),
            })
        },
        None,
    );
    match out.report {
        Err(MigrationError::InDoubt(_)) => {}
        other => panic!("expected in doubt, got {other:?}"),
    }
    assert!(src.is_paused(), "never resumed once committed");
    assert_eq!(src.resumes(), 0);
}

#[test]
fn a_destination_that_refuses_is_named_and_the_source_never_pauses() {
    // A VM of a dedup domain the destination has no key for.
    struct NoDomains;
    impl LocalContent for NoDomains {
        fn copy(&self, _: &ContentKey, _: &PageHash, _: &mut Page) -> bool {
            false
        }
        fn domain_key(&self, d: &str) -> Result<ContentKey, String> {
            Err(format!("no key for domain {d}"))
        }
    }
    struct InDomain(std::sync::Arc<SyntheticSource>);
    impl GuestMemory for InDomain {
        fn write_page(&self, f: u64, d: &Page) -> Result<(), pagecast_memory::MemoryError> {
            self.0.write_page(f, d)
        }
        fn take_dirty(&self) -> Result<DirtyBitmap, pagecast_memory::MemoryError> {
            self.0.take_dirty()
        }
        fn mark_dirty(&self, p: &DirtyBitmap) -> Result<(), pagecast_memory::MemoryError> {
            self.0.mark_dirty(p)
        }
        fn region(&self) -> &Region {
            self.0.region()
        }
    }
    impl SourceVm for InDomain {
        fn name(&self) -> &str {
            "vm1"
        }
        fn origin(&self) -> String {
            String::new()
        }
        fn dirty_rate(&self) -> u64 {
            0
        }
        fn pause(&self) -> Result<(), pagecast_memory::kvm::VmError> {
            self.0.pause()
        }
        fn resume(&self) {
            self.0.resume()
        }
        fn vcpu_state(&self) -> Result<VcpuState, pagecast_memory::kvm::VmError> {
            self.0.vcpu_state()
        }
        fn set_throttle(&self, p: u8) {
            self.0.set_throttle(p)
        }
        fn domain(&self) -> &str {
            "tenant-a"
        }
        fn content_key(&self) -> ContentKey {
            ContentKey::keyed([3; 32])
        }
    }
    let src = InDomain(SyntheticSource::new("vm1", memory("web", 5, 4)));
    let (mut a, mut b) = link_pair();
    let fp = fp();
    let (report, _) = std::thread::scope(|s| {
        let dst = s.spawn(|| {
            let begin = match b.recv(Some(Duration::from_secs(10))).unwrap() {
                Body::Begin(b) => b,
                other => panic!("{other:?}"),
            };
            migrate_in(&mut b, &begin, &NoDomains, &fp, &mut |_, _| Ok(0))
        });
        let r = migrate_out(&src, &mut a, &fp, &MigrateOptions::default(), &mut |_| {});
        (r, dst.join().unwrap())
    });
    match report {
        Err(MigrationError::Refused { reason, .. }) => {
            assert!(reason.contains("tenant-a"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!src.0.is_paused());
}

/// A gang job's hold: records what the destination lacked, says go (or
/// abort) after `after`.
struct TimedHold {
    needed: Option<usize>,
    local: u64,
    until: Instant,
    abort: bool,
}

impl TimedHold {
    /// A hold that says go (or, `abort`, abort) `after` from now.
    fn after(after: Duration, abort: bool) -> Self {
        TimedHold {
            needed: None,
            local: 0,
            until: Instant::now() + after,
            abort,
        }
    }
}

impl Hold for TimedHold {
    fn needs(&mut self, needed: &[PageHash], filled_locally: u64) -> Result<(), MigrationError> {
        self.needed = Some(needed.len());
        self.local = filled_locally;
        Ok(())
    }
    fn poll(&mut self) -> HoldPoll {
        if Instant::now() < self.until {
            HoldPoll::Wait
        } else if self.abort {
            HoldPoll::Abort("the job said no".into())
        } else {
            HoldPoll::Go
        }
    }
}

#[test]
fn a_held_migration_outlasts_the_reply_timeout_on_keepalives_then_goes() {
    let src = SyntheticSource::new("vm1", memory("web", 6, 4));
    let opts = MigrateOptions {
        reply_timeout: Duration::from_secs(1),
        ..MigrateOptions::default()
    };
    let mut hold = TimedHold::after(Duration::from_millis(2500), false);
    let t = Instant::now();
    let out = migrate(&src, &NoLocalContent, opts, plain, Some(&mut hold));
    let r = out.report.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(2500), "it held");
    assert!(r.verified);
    assert!(
        hold.needed.is_some_and(|n| n > 0),
        "the hold heard the needs"
    );
    assert_eq!(differing(&out.copy.unwrap(), &*src), Vec::<u64>::new());
}

/// Resident content whose pages `changed` were rewritten after the
/// destination looked them up: the lookup still says held, the copy fails.
struct Changed<'r> {
    resident: &'r Resident,
    changed: std::collections::HashSet<PageHash>,
}

impl LocalContent for Changed<'_> {
    fn copy(&self, key: &ContentKey, h: &PageHash, out: &mut Page) -> bool {
        !self.changed.contains(h) && self.resident.copy(key, h, out)
    }
    fn holds(&self, key: &ContentKey, h: &PageHash) -> bool {
        self.resident.holds(key, h)
    }
}

#[test]
fn a_held_migration_copies_locally_while_held_and_takes_what_changed_meanwhile_from_its_source() {
    let resident = Resident::new(memory("web", 2, 8));
    let hold = || TimedHold::after(Duration::from_millis(300), false);
    let src = SyntheticSource::new("vm1", memory("web", 1, 8));
    let mut steady = hold();
    let a = migrate(
        &src,
        &resident,
        MigrateOptions::default(),
        plain,
        Some(&mut steady),
    );
    let ra = a.report.unwrap();
    assert!(ra.verified && ra.pages_local > 0, "{ra:?}");
    assert_eq!(
        steady.local, ra.pages_local,
        "the needs count the frames about to be copied"
    );
    // Twenty contents both hold change at the destination after its lookup.
    let shared: std::collections::HashSet<PageHash> = fp()
        .fingerprint(&*src, &ContentKey::CLUSTER, &|_| {})
        .hashes
        .into_iter()
        .filter(|h| resident.by_hash.contains_key(h))
        .collect();
    let changed: std::collections::HashSet<PageHash> = shared.iter().take(20).copied().collect();
    assert_eq!(changed.len(), 20);
    let src = SyntheticSource::new("vm2", memory("web", 1, 8));
    let mut fickle = hold();
    let b = migrate(
        &src,
        &Changed {
            resident: &resident,
            changed: changed.clone(),
        },
        MigrateOptions::default(),
        plain,
        Some(&mut fickle),
    );
    let rb = b.report.unwrap();
    assert!(rb.verified, "{rb:?}");
    assert_eq!(differing(&b.copy.unwrap(), &*src), Vec::<u64>::new());
    assert_eq!(
        fickle.needed, steady.needed,
        "the first needs come from lookups"
    );
    assert!(rb.pages_local <= ra.pages_local - 20, "{rb:?}");
    assert_eq!(
        rb.rounds[0].pages,
        ra.rounds[0].pages + 20,
        "what could not be copied came in round 0"
    );
}

/// Resident content that is slow to copy (a busy host).
struct Slow<'r> {
    resident: &'r Resident,
    per_copy: Duration,
}

impl LocalContent for Slow<'_> {
    fn copy(&self, key: &ContentKey, h: &PageHash, out: &mut Page) -> bool {
        std::thread::sleep(self.per_copy);
        self.resident.copy(key, h, out)
    }
    fn holds(&self, key: &ContentKey, h: &PageHash) -> bool {
        self.resident.holds(key, h)
    }
}

/// Without a hold, a destination sends its list of needed pages only once
/// its copies from pages it holds are done: it tells the source meanwhile
/// that it lives, so copies that outlast the reply timeout keep the source
/// waiting. Before, the source gave up on the destination after its reply
/// timeout (1 s here).
#[test]
fn local_copies_that_outlast_the_reply_timeout_before_the_needs_keep_the_source_waiting() {
    let resident = Resident::new(memory("web", 2, 8));
    let src = SyntheticSource::new("vm1", memory("web", 1, 8));
    let opts = MigrateOptions {
        reply_timeout: Duration::from_secs(1),
        ..MigrateOptions::default()
    };
    let slow = Slow {
        resident: &resident,
        per_copy: Duration::from_millis(8),
    };
    let t = Instant::now();
    let out = migrate(&src, &slow, opts, plain, None);
    let r = out.report.unwrap();
    assert!(
        t.elapsed() > Duration::from_millis(1500),
        "the copies outlasted the reply timeout ({:?}, {} frames)",
        t.elapsed(),
        r.pages_local
    );
    assert!(r.verified && r.pages_local > 0, "{r:?}");
    assert_eq!(differing(&out.copy.unwrap(), &*src), Vec::<u64>::new());
}

#[test]
fn local_copies_that_outlast_the_reply_timeout_after_the_refill_keep_the_source_waiting() {
    let resident = Resident::new(memory("web", 2, 8));
    let src = SyntheticSource::new("vm1", memory("web", 1, 8));
    let opts = MigrateOptions {
        reply_timeout: Duration::from_secs(1),
        ..MigrateOptions::default()
    };
    let mut hold = TimedHold::after(Duration::from_millis(200), false);
    let slow = Slow {
        resident: &resident,
        per_copy: Duration::from_millis(8),
    };
    let t = Instant::now();
    let out = migrate(&src, &slow, opts, plain, Some(&mut hold));
    let r = out.report.unwrap();
    assert!(
        t.elapsed() > Duration::from_millis(2200),
        "the copies outlasted the hold and the reply timeout ({:?}, {} frames)",
        t.elapsed(),
        r.pages_local
    );
    assert!(r.verified && r.pages_local > 0, "{r:?}");
    assert_eq!(differing(&out.copy.unwrap(), &*src), Vec::<u64>::new());
}

#[test]
fn an_aborted_hold_is_a_cancel_and_the_source_runs_on() {
    let src = SyntheticSource::new("vm1", memory("web", 7, 4));
    let mut hold = TimedHold::after(Duration::from_millis(300), true);
    let out = migrate(
        &src,
        &NoLocalContent,
        MigrateOptions::default(),
        plain,
        Some(&mut hold),
    );
    assert!(matches!(out.report, Err(MigrationError::Cancelled(_))));
    assert!(out.copy.is_none());
    assert!(!src.is_paused());
}

#[test]
fn a_clone_reaches_every_destination_identically_and_the_source_runs_on() {
    let src = SyntheticSource::dirtying("tmpl", memory("web", 8, 8), 1000, 16..128);
    let fp = fp();
    let mut copies: Vec<Option<Region>> = (0..3).map(|_| None).collect();
    let report = std::thread::scope(|s| {
        let mut targets = Vec::new();
        let mut dests = Vec::new();
        for (i, slot) in copies.iter_mut().enumerate() {
            let (a, mut b) = link_pair();
            targets.push(CloneTarget {
                name: format!("copy{i}"),
                host: format!("h{i}"),
                link: Box::new(a),
            });
            let fp = &fp;
            dests.push(s.spawn(move || {
                let begin = match b.recv(Some(Duration::from_secs(10))).unwrap() {
                    Body::Begin(b) => b,
                    other => panic!("{other:?}"),
                };
                assert_eq!(begin.vm, format!("copy{i}"));
                migrate_in(&mut b, &begin, &NoLocalContent, fp, &mut |region, _| {
                    *slot = Some(region);
                    Ok(0)
                })
            }));
        }
        let r = clone_out(
            &*src,
            targets,
            &mut NoCasts,
            &fp,
            &MigrateOptions::default(),
            &mut |_| {},
            None,
            How::Rounds,
        );
        for d in dests {
            d.join().unwrap().unwrap();
        }
        r
    });
    assert!(
        report.clones.iter().all(|c| c.ok && c.verified),
        "{:?}",
        report.clones
    );
    assert!(!src.is_paused(), "the source runs on after a clone");
    // Each copy is the source as it was at the pause; the guest has run
    // since, so compare the copies with each other and with a hash table
    // of the source taken before it resumed: identical copies.
    let first = copies[0].take().unwrap();
    for c in copies.iter().skip(1) {
        let c = c.as_ref().unwrap();
        let mut x = Box::new([0u8; PAGE_SIZE]);
        let mut y = Box::new([0u8; PAGE_SIZE]);
        for f in 0..src.page_count() {
            first.read_page(f, &mut x).unwrap();
            c.read_page(f, &mut y).unwrap();
            assert_eq!(x, y, "frame {f} differs between copies");
        }
    }
    let _ = v1::RefusalCode::Unspecified;
}

/// A clone target as its source sees it once it froze: after the source
/// sent it a frame that `at` matches, nothing more comes from it, and
/// each read waits out its timeout.
struct FrozenAfter {
    link: MemLink,
    at: fn(&Body) -> bool,
    frozen: bool,
}

impl FrozenAfter {
    fn boxed(link: MemLink, at: fn(&Body) -> bool) -> Box<dyn MigrationLink> {
        Box::new(FrozenAfter {
            link,
            at,
            frozen: false,
        })
    }
}

impl MigrationLink for FrozenAfter {
    fn send(&mut self, body: Body) -> Result<(), MigrationError> {
        self.frozen |= (self.at)(&body);
        self.link.send(body)
    }
    fn recv(&mut self, t: Option<Duration>) -> Result<Body, MigrationError> {
        if !self.frozen {
            return self.link.recv(t);
        }
        let after = t.unwrap_or(Duration::from_secs(3600));
        std::thread::sleep(after);
        Err(MigrationError::Timeout {
            peer: "frozen".into(),
            what: "anything",
            after,
        })
    }
}

/// A link whose source is slow to send the Commit (by `delay`), as a
/// source on a busy host may be once it gave up a frozen destination.
struct SlowCommit {
    link: MemLink,
    delay: Duration,
}

impl MigrationLink for SlowCommit {
    fn send(&mut self, body: Body) -> Result<(), MigrationError> {
        if matches!(body, Body::Commit(_)) {
            std::thread::sleep(self.delay);
        }
        self.link.send(body)
    }
    fn recv(&mut self, t: Option<Duration>) -> Result<Body, MigrationError> {
        self.link.recv(t)
    }
}

/// What [`clone_through`] saw: the source's report, each target's own
/// result, and how long the clone took at the source.
struct Cloned {
    report: CloneReportAll,
    targets: Vec<bool>,
    took: Duration,
}

/// Clones an 8 MiB dirtying VM to one target per entry of `links`, each
/// given the source's end of its link (to wrap), each target running
/// `migrate_in` at the other end.
fn clone_through(
    opts: &MigrateOptions,
    links: &[&dyn Fn(MemLink) -> Box<dyn MigrationLink>],
) -> Cloned {
    let src = SyntheticSource::dirtying("tmpl", memory("web", 8, 8), 1000, 16..128);
    let fp = fp();
    let started = Instant::now();
    let cloned = std::thread::scope(|s| {
        let mut targets = Vec::new();
        let mut dests = Vec::new();
        for (i, wrap) in links.iter().enumerate() {
            let (a, mut b) = link_pair();
            targets.push(CloneTarget {
                name: format!("copy{i}"),
                host: format!("h{i}"),
                link: wrap(a),
            });
            let fp = &fp;
            dests.push(s.spawn(move || {
                let begin = match b.recv(Some(Duration::from_secs(10))).unwrap() {
                    Body::Begin(b) => b,
                    other => panic!("{other:?}"),
                };
                migrate_in(&mut b, &begin, &NoLocalContent, fp, &mut |_, _| Ok(0))
            }));
        }
        let report = clone_out(
            &*src,
            targets,
            &mut NoCasts,
            &fp,
            opts,
            &mut |_| {},
            None,
            How::Rounds,
        );
        let took = started.elapsed();
        let targets = dests
            .into_iter()
            .map(|d| d.join().unwrap().is_ok())
            .collect();
        Cloned {
            report,
            targets,
            took,
        }
    });
    assert!(!src.is_paused(), "the source runs on after a clone");
    cloned
}

/// Which clones of `r` run, verified.
fn verified(r: &CloneReportAll) -> Vec<bool> {
    r.clones.iter().map(|c| c.ok && c.verified).collect()
}

/// Of three targets, only the last runs its clone, verified, by its own
/// account and the source's.
fn only_the_last_runs(c: &Cloned) {
    assert_eq!(c.targets, [false, false, true]);
    assert_eq!(
        verified(&c.report),
        [false, false, true],
        "{:?}",
        c.report.clones
    );
}

/// The source was paused for at least `timeout` and less than `slack`
/// more.
fn paused_about(c: &Cloned, timeout: Duration, slack: Duration) {
    let paused = Duration::from_secs_f64(c.report.downtime_ms / 1e3);
    assert!(paused >= timeout, "paused {paused:?}");
    assert!(paused < timeout + slack, "the source was paused {paused:?}");
}

fn at_digest(b: &Body) -> bool {
    matches!(b, Body::Digest(_))
}

fn at_manifest(b: &Body) -> bool {
    matches!(b, Body::ManifestHeader(_))
}

/// Two of a clone's three targets freeze when asked to verify, while the
/// source is paused: the source gives both up within one reply timeout of
/// asking (their answers are owed from the same moment), and the third
/// target's clone completes, verified. Before, the source read them one
/// after another, a reply timeout each: two here, the source paused all
/// that time.
#[test]
fn clone_targets_frozen_together_cost_the_paused_source_one_reply_timeout() {
    let opts = MigrateOptions {
        reply_timeout: Duration::from_secs(2),
        ..MigrateOptions::default()
    };
    let frozen = |l| FrozenAfter::boxed(l, at_digest);
    let c = clone_through(&opts, &[&frozen, &frozen, &plain]);
    only_the_last_runs(&c);
    paused_about(&c, opts.reply_timeout, Duration::from_millis(1500));
}

/// A clone target that answered its verification waits for the Commit on
/// its own reply timeout (10 s), while the source waits out another
/// target frozen at verification for the same 10 s: the source keeps the
/// one that answered alive meanwhile, so a Commit that comes a little
/// late (1.5 s here) still finds it, and its clone runs, verified.
/// Before, it gave up just before the Commit came, and both clones failed.
#[test]
fn a_target_that_answered_outlives_another_frozen_at_verification() {
    let opts = MigrateOptions {
        reply_timeout: REPLY_TIMEOUT,
        ..MigrateOptions::default()
    };
    let frozen = |l| FrozenAfter::boxed(l, at_digest);
    let late = |link| -> Box<dyn MigrationLink> {
        Box::new(SlowCommit {
            link,
            delay: Duration::from_millis(1500),
        })
    };
    let c = clone_through(&opts, &[&frozen, &late]);
    assert_eq!(c.targets, [false, true]);
    assert_eq!(verified(&c.report), [false, true], "{:?}", c.report.clones);
}

/// A target frozen at verification whose socket buffers are full: every
/// send to it waits out a send deadline (8 s), and one sent only if
/// nothing is on its way is not sent.
struct Stuffed {
    link: FrozenAfter,
}

impl MigrationLink for Stuffed {
    fn send(&mut self, body: Body) -> Result<(), MigrationError> {
        if self.link.frozen {
            std::thread::sleep(Duration::from_secs(8));
            return Ok(());
        }
        self.link.send(body)
    }
    fn send_if_idle(&mut self, body: Body) -> Result<bool, MigrationError> {
        if self.link.frozen {
            return Ok(false);
        }
        self.link.send(body)?;
        Ok(true)
    }
    fn recv(&mut self, t: Option<Duration>) -> Result<Body, MigrationError> {
        self.link.recv(t)
    }
}

/// While the paused source waits out one target frozen at verification,
/// its keep-alives to the others do not wait on a second frozen target
/// whose buffers are full (none goes to it), and the source is paused
/// about a reply timeout. Before, each keep-alive to it waited out a whole
/// send (8 s).
#[test]
fn keep_alives_do_not_wait_on_a_frozen_target_with_full_buffers() {
    let opts = MigrateOptions {
        reply_timeout: Duration::from_secs(3),
        ..MigrateOptions::default()
    };
    let frozen = |l| FrozenAfter::boxed(l, at_digest);
    let stuffed = |link| -> Box<dyn MigrationLink> {
        Box::new(Stuffed {
            link: FrozenAfter {
                link,
                at: at_digest,
                frozen: false,
            },
        })
    };
    let c = clone_through(&opts, &[&frozen, &stuffed, &plain]);
    only_the_last_runs(&c);
    paused_about(&c, opts.reply_timeout, Duration::from_millis(2500));
}

/// Two of a clone's three targets freeze on taking their manifests: the
/// source gives both up within one reply timeout of sending the
/// manifests (every list of needed pages is owed from then), and the
/// third target's clone completes, verified. Before, it read the lists one
/// after another, a reply timeout for each frozen target.
#[test]
fn targets_frozen_before_their_needs_cost_one_reply_timeout_not_one_each() {
    let opts = MigrateOptions {
        reply_timeout: Duration::from_secs(3),
        ..MigrateOptions::default()
    };
    let frozen = |l| FrozenAfter::boxed(l, at_manifest);
    let c = clone_through(&opts, &[&frozen, &frozen, &plain]);
    only_the_last_runs(&c);
    for clone in &c.report.clones[..2] {
        let e = clone.error.as_ref().map_or("", |e| e.message.as_str());
        assert!(e.contains("list of needed pages"), "{e}");
    }
    assert!(c.took >= opts.reply_timeout, "{:?}", c.took);
    assert!(
        c.took < 2 * opts.reply_timeout - Duration::from_millis(500),
        "the clone took {:?}",
        c.took
    );
}

/// A destination that cannot catch missing-page faults (no userfaultfd
/// there) says so in its answer: `--switchover postcopy` is refused at
/// once, naming the setting, and the source never pauses; `auto` moves by
/// pre-copy.
#[test]
fn a_destination_without_userfaultfd_refuses_postcopy_and_auto_precopies() {
    /// The destination's answers, saying it cannot take post-copy.
    struct NoUserfault(MemLink);
    impl MigrationLink for NoUserfault {
        fn send(&mut self, body: Body) -> Result<(), MigrationError> {
            self.0.send(match body {
                Body::Accept(a) => Body::Accept(v1::MigrateAccept {
                    postcopy: false,
                    ..a
                }),
                b => b,
            })
        }
        fn recv(&mut self, t: Option<Duration>) -> Result<Body, MigrationError> {
            self.0.recv(t)
        }
    }
    let wrap = |l: MemLink| Box::new(NoUserfault(l)) as Box<dyn MigrationLink>;
    let src = SyntheticSource::new("vm1", memory("web", 7, 4));
    let opts = MigrateOptions {
        switchover: Switchover::Postcopy,
        ..MigrateOptions::default()
    };
    let out = migrate(&src, &NoLocalContent, opts, wrap, None);
    match out.report {
        Err(MigrationError::Refused { reason, .. }) => {
            assert!(reason.contains("vm.unprivileged_userfaultfd"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(out.copy.is_none(), "nothing started there");
    assert!(!src.is_paused());
    // A guest that outruns its link: `auto` would switch it to post-copy
    // at the round limit; this destination cannot take it, so it stops
    // and copies instead.
    let busy = SyntheticSource::dirtying("vm2", memory("web", 7, 4), 20_000, 16..1000);
    let opts = MigrateOptions {
        bandwidth_bps: Some(40_000_000),
        max_rounds: 3,
        ..MigrateOptions::default()
    };
    let out = migrate(&busy, &NoLocalContent, opts, wrap, None);
    let report = out.report.unwrap();
    assert!(report.verified && !report.postcopy, "{report:?}");
    assert!(
        report.rounds.len() > 3 && report.max_throttle_pct > 0,
        "the rounds stalled until the limit: {report:?}"
    );
}
