//! Cast sessions over loopback multicast (127.0.0.1), in one process: the
//! sender and every receiver on their own threads.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::sync::OnceLock;

use pagecast_channel::ca::Authority;
use pagecast_channel::{Role, Tls};
use pagecast_multicast::wire;
use pagecast_multicast::*;
use pagecast_pages::{ContentKey, PAGE_SIZE, Page};
use pagecast_testkit::{Need, needs};

const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;

fn cluster() -> &'static Authority {
    static CA: OnceLock<Authority> = OnceLock::new();
    CA.get_or_init(|| Authority::generate().expect("a CA"))
}

/// A host identity of this test process's cluster, a new host's each call
/// (a sender seats no certificate twice in one session).
fn tls() -> Tls {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    cluster()
        .issue(&format!("host-{n}"), Role::Host, 1)
        .expect("a certificate")
}

/// A distinct control port and multicast group per test.
fn endpoints() -> (SocketAddr, SocketAddrV4) {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // Below the kernel's ephemeral range (32768 and up): a control port
    // there was sometimes taken by another test's outgoing connection
    // ("Address already in use").
    let base = 2_000 + (std::process::id() % 375) as u16 * 16 + n * 4;
    (
        SocketAddr::from((LO, base)),
        SocketAddrV4::new(
            Ipv4Addr::new(239, 71, (n / 200) as u8, (n % 200) as u8 + 1),
            base + 2,
        ),
    )
}

struct Source {
    pages: Vec<Box<Page>>,
    frames: u64,
    /// The dedup domain the pages are named in.
    key: ContentKey,
}

impl Source {
    fn new(n: u32) -> Self {
        let pages = (0..n)
            .map(|i| {
                let mut p = Box::new([0u8; PAGE_SIZE]);
                let mut x = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for w in p.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes());
                }
                p
            })
            .collect();
        Source {
            pages,
            frames: u64::from(n) * 2,
            key: ContentKey::CLUSTER,
        }
    }
}

impl PageSource for Source {
    fn pages(&self) -> u32 {
        self.pages.len() as u32
    }
    fn entry(&self, i: u32) -> PageEntry {
        PageEntry {
            key: u64::from(i) * 2,
            hash: self.key.hash_page(&self.pages[i as usize]),
        }
    }
    fn read(&self, i: u32, out: &mut Page) -> std::io::Result<()> {
        out.copy_from_slice(&self.pages[i as usize][..]);
        Ok(())
    }
    fn frames(&self) -> u64 {
        self.frames
    }
}

#[derive(Default)]
struct Sink {
    got: Vec<(u64, Vec<u8>)>,
    by_key: std::collections::HashMap<u64, usize>,
    finished: bool,
    aborted: bool,
    fail_after: Option<usize>,
}

impl PageSink for Sink {
    fn begin(&mut self, _frames: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn get(&mut self, key: u64, out: &mut Page) -> std::io::Result<()> {
        let i = *self
            .by_key
            .get(&key)
            .ok_or_else(|| std::io::Error::other("no such page"))?;
        out.copy_from_slice(&self.got[i].1);
        Ok(())
    }
    fn put(&mut self, e: &PageEntry, data: &Page) -> std::io::Result<()> {
        if self.fail_after.is_some_and(|n| self.got.len() >= n) {
            return Err(std::io::Error::other("disk full (test)"));
        }
        self.by_key.insert(e.key, self.got.len());
        self.got.push((e.key, data.to_vec()));
        Ok(())
    }
    fn finish(&mut self) -> std::io::Result<()> {
        self.finished = true;
        Ok(())
    }
    fn abort(&mut self) {
        self.aborted = true;
    }
}

fn check_sink(sink: &Sink, src: &Source, pages: &[u32]) {
    assert!(sink.finished && !sink.aborted);
    let mut got = sink.got.clone();
    got.sort();
    let mut want: Vec<(u64, Vec<u8>)> = pages
        .iter()
        .map(|&i| (u64::from(i) * 2, src.pages[i as usize].to_vec()))
        .collect();
    want.sort();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "received pages differ from the source");
}

/// What one run returns: the sender's result and each receiver's.
type Outcome = (
    Result<SendReport, CastError>,
    Vec<(Result<RecvReport, CastError>, Sink)>,
);

fn run(
    cfg: SenderConfig,
    groups: Groups,
    src: &dyn PageSource,
    receivers: Vec<(Tls, Option<usize>)>,
) -> Outcome {
    run_keyed(cfg, groups, src, receivers, &[ContentKey::CLUSTER])
}

/// [`run`], the receivers checking pages under `keys`.
fn run_keyed(
    cfg: SenderConfig,
    groups: Groups,
    src: &dyn PageSource,
    receivers: Vec<(Tls, Option<usize>)>,
    keys: &[ContentKey],
) -> Outcome {
    std::thread::scope(|s| {
        let control = cfg.control;
        let sender = s.spawn(move || send(&cfg, groups, src, &tls(), &|_, _| {}));
        std::thread::sleep(Duration::from_millis(50));
        let handles: Vec<_> = receivers
            .into_iter()
            .enumerate()
            .map(|(i, (sec, fail_after))| {
                s.spawn(move || {
                    let mut sink = Sink {
                        fail_after,
                        ..Sink::default()
                    };
                    let mut cfg = ReceiverConfig::new(control, LO, &format!("r{i}"));
                    cfg.content_keys = keys.to_vec();
                    let r = receive(&cfg, &sec, &mut sink, &|_, _| {});
                    (r, sink)
                })
            })
            .collect();
        let recvs = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (sender.join().unwrap(), recvs)
    })
}

#[test]
fn pages_of_a_dedup_domain_are_checked_under_its_key() {
    if !needs(
        "pages_of_a_dedup_domain_are_checked_under_its_key",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    let (control, group) = endpoints();
    let mut src = Source::new(600);
    src.key = ContentKey::keyed([7; 32]);
    let cfg = SenderConfig::new(control, LO, 2);
    // A receiver filling VMs of two domains checks each page under both
    // keys; the keyed pages match the second.
    let (sent, recvs) = run_keyed(
        cfg,
        Groups::Single(group),
        &src,
        vec![(tls(), None), (tls(), None)],
        &[ContentKey::CLUSTER, ContentKey::keyed([7; 32])],
    );
    sent.unwrap();
    let all: Vec<u32> = (0..600).collect();
    for (r, sink) in &recvs {
        let r = r.as_ref().unwrap();
        assert_eq!((r.pages, r.counters.bad_hash), (600, 0));
        check_sink(sink, &src, &all);
    }
}

#[test]
fn four_receivers_get_identical_copies_over_loopback_multicast() {
    if !needs(
        "four_receivers_get_identical_copies_over_loopback_multicast",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    let (control, group) = endpoints();
    let src = Source::new(3000);
    let mut cfg = SenderConfig::new(control, LO, 4);
    cfg.transport = TransportChoice::Auto;
    let (sent, recvs) = run(
        cfg,
        Groups::Single(group),
        &src,
        (0..4).map(|_| (tls(), None)).collect(),
    );
    let report = sent.unwrap();
    assert_eq!(
        report.transport,
        Transport::Multicast,
        "loopback multicast works"
    );
    let all: Vec<u32> = (0..3000).collect();
    for (r, sink) in &recvs {
        let r = r.as_ref().unwrap();
        assert_eq!(r.pages, 3000);
        check_sink(sink, &src, &all);
    }
    assert_eq!(report.receivers.len(), 4);
    for p in &report.receivers {
        assert_eq!(p.status, PeerStatus::Complete, "{p:?}");
        assert_eq!((p.joins, p.leaves), (1, 1));
    }
    // Each page crossed the sender's link once (plus whatever was repaired).
    // Loopback's MTU fits two pages per datagram: 1,500 datagrams, each
    // with its MAC and a tag per receiver.
    assert_eq!(report.pages_per_datagram, 2);
    let once = 1500
        * (wire::HEADER_LEN
            + wire::DATA_HEAD
            + 2 * (wire::DATA_ENTRY + PAGE_SIZE)
            + 16
            + 4 * wire::TAG_LEN) as u64;
    assert_eq!(report.bytes_first, once);
    assert!(
        report.bytes_repair <= once / 2,
        "repairs {}",
        report.bytes_repair
    );
}

/// A source that reads its pages while the session runs, as an agent's
/// cast does: `step` more pages are ready every `every` from its start,
/// and every page `i` with `i % 7 == 3` is withdrawn (its content was gone
/// when the source came to read it; unless made with
/// [`Trickling::keeping_all`]). Reading a page before it is ready, or a
/// withdrawn one, fails the sender.
struct Trickling {
    inner: Source,
    started: std::time::Instant,
    step: u32,
    every: Duration,
    withdraws: bool,
}

impl Trickling {
    fn new(pages: u32, step: u32, every: Duration) -> Self {
        Trickling {
            inner: Source::new(pages),
            started: std::time::Instant::now(),
            step,
            every,
            withdraws: true,
        }
    }
    /// As [`Trickling::new`], withdrawing nothing.
    fn keeping_all(pages: u32, step: u32, every: Duration) -> Self {
        Trickling {
            withdraws: false,
            ..Trickling::new(pages, step, every)
        }
    }
    fn kept(&self) -> Vec<u32> {
        (0..self.pages()).filter(|&i| !self.withdrawn(i)).collect()
    }
}

impl PageSource for Trickling {
    fn pages(&self) -> u32 {
        self.inner.pages()
    }
    fn entry(&self, i: u32) -> PageEntry {
        self.inner.entry(i)
    }
    fn read(&self, i: u32, out: &mut Page) -> std::io::Result<()> {
        if i >= self.ready() || self.withdrawn(i) {
            return Err(std::io::Error::other(format!(
                "page {i} read before it was ready, or withdrawn"
            )));
        }
        self.inner.read(i, out)
    }
    fn frames(&self) -> u64 {
        self.inner.frames()
    }
    fn ready(&self) -> u32 {
        let steps = self.started.elapsed().as_nanos() / self.every.as_nanos();
        (steps as u64 * u64::from(self.step)).min(u64::from(self.pages())) as u32
    }
    fn withdrawn(&self, i: u32) -> bool {
        self.withdraws && i % 7 == 3
    }
}

/// A sender whose source reads its pages while the session runs sends
/// each page once it is ready, never before, and tells its receivers of
/// the pages the source withdrew: they settle those without data (their
/// sinks never see them) and complete, over multicast and over the chain.
#[test]
fn pages_go_as_their_source_reads_them_and_withdrawn_ones_settle_without_data() {
    if !needs(
        "pages_go_as_their_source_reads_them_and_withdrawn_ones_settle_without_data",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    for transport in [TransportChoice::Multicast, TransportChoice::Chain] {
        let (control, group) = endpoints();
        let mut cfg = SenderConfig::new(control, LO, 2);
        cfg.transport = transport;
        let src = Trickling::new(700, 50, Duration::from_millis(20));
        let (sent, recvs) = run(
            cfg,
            Groups::Single(group),
            &src,
            (0..2).map(|_| (tls(), None)).collect(),
        );
        let report = sent.unwrap_or_else(|e| panic!("{transport:?}: {e}"));
        let kept = src.kept();
        assert_eq!(report.withdrawn, 100, "{transport:?}");
        for p in &report.receivers {
            assert_eq!(p.status, PeerStatus::Complete, "{transport:?}: {p:?}");
        }
        for (r, sink) in &recvs {
            let r = r.as_ref().unwrap_or_else(|e| panic!("{transport:?}: {e}"));
            assert_eq!((r.pages, r.withdrawn), (600, 100), "{transport:?}");
            check_sink(sink, &src.inner, &kept);
        }
    }
}

/// A member that asks again for a withdrawn page (it lost the datagram
/// that told it) is told again that the page is withdrawn, in a datagram
/// of its own, never sent a page the source could not read: the member
/// speaks the wire protocol itself, joining with a real host certificate
/// and NACKing every page of its group once the sender has passed them.
#[test]
fn a_withdrawn_page_asked_for_again_is_told_withdrawn_again() {
    if !needs(
        "a_withdrawn_page_asked_for_again_is_told_withdrawn_again",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    let (control, group) = endpoints();
    let mut cfg = SenderConfig::new(control, LO, 1);
    cfg.transport = TransportChoice::Multicast;
    cfg.silent_after = Duration::from_secs(3);
    let src = Trickling::new(70, 70, Duration::from_millis(1));
    let member = cluster().issue("asker", Role::Host, 1).unwrap();
    std::thread::scope(|s| {
        let sender = s.spawn(|| send(&cfg, Groups::Single(group), &src, &tls(), &|_, _| {}));
        std::thread::sleep(Duration::from_millis(50));
        let sock =
            pagecast_multicast::socket::group_socket(group.port(), &[*group.ip()], LO, 1).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let (ch, w, _) = hostile_join(control, &member, ("hostile", "127.0.0.1:1"), None);
        let keys = hostile_keys(&w);
        let out = pagecast_multicast::socket::sender_socket(LO, 1).unwrap();
        // Times page 3 (withdrawn) was told withdrawn, before and after
        // the NACK; pages sent as data.
        let (mut told, mut data, mut asked) = ([0u32; 2], 0u32, false);
        let began = std::time::Instant::now();
        let mut buf = [0u8; 9000];
        while began.elapsed() < Duration::from_secs(3) && told[1] == 0 {
            if let Ok(n) = sock.recv(&mut buf) {
                let key = wire::GroupKey::new(keys[1]);
                let b = &mut buf[..n];
                let opened = wire::decode(b, w.session_id, |_, _| {
                    Some(wire::Opening {
                        key: &key,
                        tag: None,
                    })
                });
                match opened.map(|d| d.body) {
                    Ok(wire::Body::Withdrawn { index, count, .. })
                        if (index..index + count).contains(&3) =>
                    {
                        told[usize::from(asked)] += 1
                    }
                    Ok(wire::Body::Data { .. }) => data += 1,
                    _ => {}
                }
            }
            if !asked && data >= 30 && began.elapsed() > Duration::from_millis(300) {
                let b = hostile_nack(&w, &keys, 0, w.receiver_id, 1);
                out.send_to(&b, SocketAddrV4::new(*group.ip(), group.port() + 1))
                    .unwrap();
                asked = true;
            }
        }
        drop(ch);
        let report = sender.join().unwrap();
        let report = report.unwrap_or_else(|e| panic!("the sender failed: {e}"));
        assert!(asked, "the member saw {data} data datagrams");
        assert_eq!(
            told,
            [1, 1],
            "page 3 told withdrawn (before, after the NACK)"
        );
        assert!(report.nacks >= 1, "{report:?}");
    });
}

#[test]
fn small_mtu_fragments_pages_and_still_delivers() {
    if !needs(
        "small_mtu_fragments_pages_and_still_delivers",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    let (control, group) = endpoints();
    let src = Source::new(500);
    let mut cfg = SenderConfig::new(control, LO, 2);
    cfg.transport = TransportChoice::Multicast;
    cfg.mtu = Some(1500);
    let (sent, recvs) = run(
        cfg,
        Groups::Single(group),
        &src,
        (0..2).map(|_| (tls(), None)).collect(),
    );
    let report = sent.unwrap();
    assert_eq!(report.fragments, 3);
    let all: Vec<u32> = (0..500).collect();
    for (r, sink) in &recvs {
        r.as_ref().unwrap();
        check_sink(sink, &src, &all);
    }
}

#[test]
fn chain_delivers_the_same_as_multicast() {
    let (control, _) = endpoints();
    let src = Source::new(1500);
    let mut cfg = SenderConfig::new(control, LO, 3);
    cfg.transport = TransportChoice::Chain;
    let group = SocketAddrV4::new(Ipv4Addr::new(239, 71, 250, 1), 29_000);
    let (sent, recvs) = run(
        cfg,
        Groups::Single(group),
        &src,
        (0..3).map(|_| (tls(), None)).collect(),
    );
    let report = sent.unwrap();
    assert_eq!(report.transport, Transport::Chain);
    // The sender sends each page once, into the first link.
    assert!(report.bytes_first < 1500 * (PAGE_SIZE as u64 + 64));
    let all: Vec<u32> = (0..1500).collect();
    for (r, sink) in &recvs {
        let r = r.as_ref().unwrap();
        assert_eq!(r.transport, Transport::Chain);
        check_sink(sink, &src, &all);
    }
}

#[test]
fn a_receiver_that_dies_is_reported_and_the_others_complete() {
    if !needs(
        "a_receiver_that_dies_is_reported_and_the_others_complete",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    let (control, group) = endpoints();
    let src = Source::new(4000);
    let mut cfg = SenderConfig::new(control, LO, 3);
    cfg.transport = TransportChoice::Multicast;
    cfg.rate_bps = Some(400_000_000);
    cfg.silent_after = Duration::from_secs(2);
    let receivers = vec![(tls(), None), (tls(), Some(500)), (tls(), None)];
    let (sent, recvs) = run(cfg, Groups::Single(group), &src, receivers);
    let report = sent.unwrap();
    let all: Vec<u32> = (0..4000).collect();
    let dead = report
        .receivers
        .iter()
        .filter(|p| matches!(p.status, PeerStatus::Dropped { .. }))
        .count();
    assert_eq!(dead, 1, "{:?}", report.receivers);
    let mut ok = 0;
    for (r, sink) in &recvs {
        if r.is_ok() {
            check_sink(sink, &src, &all);
            ok += 1;
        } else {
            assert!(
                sink.aborted && !sink.finished,
                "the failed receiver keeps nothing"
            );
        }
    }
    assert_eq!(ok, 2);
}

#[test]
fn groups_of_a_plan_reach_only_their_members() {
    if !needs(
        "groups_of_a_plan_reach_only_their_members",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    let (control, g0) = endpoints();
    let g1 = SocketAddrV4::new(
        Ipv4Addr::new(
            g0.ip().octets()[0],
            g0.ip().octets()[1],
            g0.ip().octets()[2],
            g0.ip().octets()[3] + 100,
        ),
        g0.port(),
    );
    let src = Source::new(900);
    let mut cfg = SenderConfig::new(control, LO, 3);
    cfg.transport = TransportChoice::Multicast;
    // Group 0: receivers 0 and 1 get pages 0..300; group 1: receivers 1 and
    // 2 get 300..900.
    let plan = vec![
        GroupPlan {
            addr: g0,
            members: vec![0, 1],
            pages: (0..300).collect(),
        },
        GroupPlan {
            addr: g1,
            members: vec![1, 2],
            pages: (300..900).collect(),
        },
    ];
    let (sent, recvs) = run(
        cfg,
        Groups::Plan(plan),
        &src,
        (0..3).map(|_| (tls(), None)).collect(),
    );
    let report = sent.unwrap();
    let want: Vec<Vec<u32>> = vec![(0..300).collect(), (0..900).collect(), (300..900).collect()];
    // Receivers connect in an order the test does not control: match by name.
    for p in &report.receivers {
        assert_eq!(p.status, PeerStatus::Complete);
    }
    let mut seen: Vec<usize> = recvs
        .iter()
        .map(|(r, _)| r.as_ref().unwrap().pages as usize)
        .collect();
    seen.sort();
    assert_eq!(seen, vec![300, 600, 900]);
    for (r, sink) in &recvs {
        let id = r.as_ref().unwrap().id as usize - 1;
        check_sink(sink, &src, &want[id]);
    }
    let joins: u32 = report.receivers.iter().map(|p| p.joins).sum();
    assert_eq!(joins, 4);
}

#[test]
fn receivers_of_another_ca_or_without_the_host_role_are_refused() {
    if !needs(
        "receivers_of_another_ca_or_without_the_host_role_are_refused",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    let (control, group) = endpoints();
    let src = Source::new(200);
    let mut cfg = SenderConfig::new(control, LO, 1);
    cfg.transport = TransportChoice::Multicast;
    std::thread::scope(|s| {
        let sender = s.spawn(|| send(&cfg, Groups::Single(group), &src, &tls(), &|_, _| {}));
        std::thread::sleep(Duration::from_millis(50));
        // First a receiver whose certificate another CA signed: refused,
        // and the session still waits for a real one.
        let other = Authority::generate().unwrap();
        let now = std::time::SystemTime::now();
        let (cert, key) = other
            .sign("intruder", Role::Host, now, now + Duration::from_secs(600))
            .unwrap();
        let intruder = Tls::from_pem(cluster().cert_pem(), &cert, &key).unwrap();
        let rc = ReceiverConfig::new(control, LO, "intruder");
        let mut sink = Sink::default();
        let err = receive(&rc, &intruder, &mut sink, &|_, _| {}).unwrap_err();
        assert!(
            err.to_string().contains("UnknownCA") || err.to_string().contains("closed"),
            "{err}"
        );
        assert!(sink.aborted && sink.got.is_empty());
        // Then a reader of this cluster: not a host, refused.
        let reader = cluster().issue("curious", Role::Reader, 1).unwrap();
        let rc = ReceiverConfig::new(control, LO, "curious");
        let mut sink = Sink::default();
        receive(&rc, &reader, &mut sink, &|_, _| {}).unwrap_err();
        assert!(sink.aborted && sink.got.is_empty());
        let rc = ReceiverConfig::new(control, LO, "member");
        let mut sink = Sink::default();
        receive(&rc, &tls(), &mut sink, &|_, _| {}).unwrap();
        check_sink(&sink, &src, &(0..200).collect::<Vec<_>>());
        let report = sender.join().unwrap().unwrap();
        assert_eq!(report.refused, 2);
        assert_eq!(report.receivers.len(), 1);
        assert_eq!(report.receivers[0].name, "member");
    });
}

/// A session belongs to one job: a host whose hello names another job
/// (or none) is refused, however real its certificate.
#[test]
fn receivers_of_another_job_are_refused() {
    if !needs(
        "receivers_of_another_job_are_refused",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    let (control, group) = endpoints();
    let src = Source::new(100);
    let mut cfg = SenderConfig::new(control, LO, 1);
    cfg.transport = TransportChoice::Multicast;
    cfg.job = "job-a".into();
    std::thread::scope(|s| {
        let sender = s.spawn(|| send(&cfg, Groups::Single(group), &src, &tls(), &|_, _| {}));
        std::thread::sleep(Duration::from_millis(50));
        for job in ["job-b", ""] {
            let mut rc = ReceiverConfig::new(control, LO, "member");
            rc.job = job.into();
            let mut sink = Sink::default();
            receive(&rc, &tls(), &mut sink, &|_, _| {}).unwrap_err();
            assert!(sink.got.is_empty(), "a receiver of job {job:?} got pages");
        }
        let mut rc = ReceiverConfig::new(control, LO, "member");
        rc.job = "job-a".into();
        let mut sink = Sink::default();
        receive(&rc, &tls(), &mut sink, &|_, _| {}).unwrap();
        check_sink(&sink, &src, &(0..100).collect::<Vec<_>>());
        let report = sender.join().unwrap().unwrap();
        assert_eq!(report.refused, 2);
        assert_eq!(report.receivers.len(), 1);
    });
}

#[test]
fn forged_replayed_and_truncated_datagrams_are_dropped_and_counted() {
    if !needs(
        "forged_replayed_and_truncated_datagrams_are_dropped_and_counted",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    let (control, group) = endpoints();
    let src = Source::new(3000);
    let mut cfg = SenderConfig::new(control, LO, 1);
    cfg.transport = TransportChoice::Multicast;
    cfg.rate_bps = Some(200_000_000);
    let stop = Arc::new(Mutex::new(false));
    let attacker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Capture real datagrams from the group, then replay them and
            // send forgeries with a flipped byte and truncated copies.
            let spy = pagecast_multicast::socket::group_socket(group.port(), &[*group.ip()], LO, 1)
                .unwrap();
            spy.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let out = pagecast_multicast::socket::sender_socket(LO, 1).unwrap();
            let mut buf = [0u8; 9000];
            let (mut replays, mut forgeries) = (0, 0);
            while !*stop.lock().unwrap() {
                if let Ok(n) = spy.recv(&mut buf) {
                    out.send_to(&buf[..n], group).unwrap();
                    replays += 1;
                    let mut f = buf[..n].to_vec();
                    let at = f.len() / 2;
                    f[at] ^= 0x55;
                    out.send_to(&f, group).unwrap();
                    // And a truncated copy (counted with the forgeries: it
                    // does not open either).
                    out.send_to(&buf[..n - n.min(7)], group).unwrap();
                    forgeries += 1;
                }
            }
            (replays, forgeries)
        })
    };
    let (sent, recvs) = run(cfg, Groups::Single(group), &src, vec![(tls(), None)]);
    *stop.lock().unwrap() = true;
    let (replays, forgeries) = attacker.join().unwrap();
    sent.unwrap();
    let (r, sink) = &recvs[0];
    let r = r.as_ref().unwrap();
    check_sink(sink, &src, &(0..3000).collect::<Vec<_>>());
    assert!(
        replays > 100 && forgeries > 100,
        "attacker sent {replays} replays, {forgeries} forgeries"
    );
    assert!(r.counters.forged >= 2, "{:?}", r.counters);
    assert!(r.counters.replayed > 0, "{:?}", r.counters);
    assert_eq!(r.counters.bad_hash, 0);
}

#[test]
fn a_peer_that_connects_and_says_nothing_holds_up_no_one() {
    if !needs(
        "a_peer_that_connects_and_says_nothing_holds_up_no_one",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    let (control, group) = endpoints();
    let src = Source::new(200);
    let mut cfg = SenderConfig::new(control, LO, 1);
    cfg.transport = TransportChoice::Multicast;
    std::thread::scope(|s| {
        let sender = s.spawn(|| send(&cfg, Groups::Single(group), &src, &tls(), &|_, _| {}));
        std::thread::sleep(Duration::from_millis(50));
        // Connect, never start TLS: more of them than handshakes may run
        // at once (before, the 65th and later, the member among them, were
        // refused until the silent ones timed out).
        let _silent: Vec<_> = (0..80)
            .map(|_| std::net::TcpStream::connect(control).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let t = std::time::Instant::now();
        let rc = ReceiverConfig::new(control, LO, "member");
        let mut sink = Sink::default();
        receive(&rc, &tls(), &mut sink, &|_, _| {}).unwrap();
        // The handshake timeout is 5 s: a member served behind the silent
        // peer would have waited that long.
        assert!(
            t.elapsed() < pagecast_channel::HANDSHAKE_TIMEOUT - Duration::from_secs(1),
            "the member waited {:?}",
            t.elapsed()
        );
        check_sink(&sink, &src, &(0..200).collect::<Vec<_>>());
        sender.join().unwrap().unwrap();
    });
}

/// A named receiver's slot is its certificate's: a member holding a real
/// host certificate cannot take another member's slot (and so its groups
/// and pages) by saying the other's name in its hello, nor take a slot at
/// all under a name the sender does not expect.
#[test]
fn a_receiver_takes_the_slot_of_its_certificate_not_of_the_name_it_says() {
    if !needs(
        "a_receiver_takes_the_slot_of_its_certificate_not_of_the_name_it_says",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    let (control, group) = endpoints();
    let src = Source::new(100);
    let mut cfg = SenderConfig::new(control, LO, 1);
    cfg.transport = TransportChoice::Multicast;
    cfg.expected = vec!["victim".into()];
    let victim = cluster().issue("victim", Role::Host, 1).unwrap();
    let thief = cluster().issue("thief", Role::Host, 1).unwrap();
    std::thread::scope(|s| {
        let sender = s.spawn(|| send(&cfg, Groups::Single(group), &src, &tls(), &|_, _| {}));
        std::thread::sleep(Duration::from_millis(50));
        // The thief says it is the victim, then says its own name.
        for says in ["victim", "thief"] {
            let rc = ReceiverConfig::new(control, LO, says);
            let mut sink = Sink::default();
            receive(&rc, &thief, &mut sink, &|_, _| {}).unwrap_err();
            assert!(sink.got.is_empty(), "the thief saying {says:?} got pages");
        }
        let rc = ReceiverConfig::new(control, LO, "victim");
        let mut sink = Sink::default();
        receive(&rc, &victim, &mut sink, &|_, _| {}).unwrap();
        check_sink(&sink, &src, &(0..100).collect::<Vec<_>>());
        let report = sender.join().unwrap().unwrap();
        assert_eq!(report.refused, 2);
        assert_eq!(report.receivers[0].name, "victim");
    });
}

/// Where the caller names no receivers (`pagecast cast send` without
/// `--expect`), one certificate takes one slot: a member holding a real
/// host certificate, speaking the protocol itself, that says hello on a
/// second connection while its first is seated is refused before any
/// welcome. Two slots could put it on both sides of an honest receiver on
/// the chain. Before, the second connection was seated too, and took the
/// slot the honest receiver then found full. Also: a chain member whose
/// predecessor never connects ends with its session.
#[test]
fn a_certificate_takes_one_slot_of_a_session() {
    if !needs(
        "a_certificate_takes_one_slot_of_a_session",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    use pagecast_proto::v1;
    let (control, group) = endpoints();
    let src = Source::new(200);
    let mut cfg = SenderConfig::new(control, LO, 2);
    cfg.transport = TransportChoice::Chain;
    cfg.silent_after = Duration::from_secs(3);
    let hostile = cluster().issue("hostile", Role::Host, 1).unwrap();
    let victim = cluster().issue("victim", Role::Host, 1).unwrap();
    std::thread::scope(|s| {
        let sender = s.spawn(|| send(&cfg, Groups::Single(group), &src, &tls(), &|_, _| {}));
        std::thread::sleep(Duration::from_millis(50));
        // Its first connection is seated.
        let mut first = hostile_seated(control, &hostile, ("hostile", "127.0.0.1:1"));
        // Its second, under another name, is closed without a welcome.
        let mut second = hostile_hello(control, &hostile, ("hostile-2", "127.0.0.1:2"));
        second
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        match second.recv::<v1::CastFrame>("welcome") {
            Err(pagecast_channel::AuthError::Closed { .. }) => {}
            other => panic!("a certificate's second connection was not refused: {other:?}"),
        }
        // So is a real receiver with that certificate, and it says why.
        let rc = ReceiverConfig::new(control, LO, "hostile-3");
        let mut sink = Sink::default();
        let e = receive(&rc, &hostile, &mut sink, &|_, _| {}).unwrap_err();
        assert!(e.to_string().contains("refused it"), "{e}");
        assert!(sink.got.is_empty() && sink.aborted);
        // The honest receiver takes the other slot; the first connection
        // joins and then leaves, and the sender drops it.
        let hostile_rest = s.spawn(move || {
            hostile_welcome_to_start(&mut first);
            drop(first);
        });
        // Its predecessor never connects, and it does not wait for one
        // once its pages came by unicast (before, it waited its whole
        // silence limit after the session ended).
        let mut rc = ReceiverConfig::new(control, LO, "victim");
        rc.silent_after = Duration::from_secs(30);
        let mut sink = Sink::default();
        let t = std::time::Instant::now();
        receive(&rc, &victim, &mut sink, &|_, _| {}).unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the victim waited {:?} for a predecessor",
            t.elapsed()
        );
        check_sink(&sink, &src, &(0..200).collect::<Vec<_>>());
        hostile_rest.join().unwrap();
        let report = sender.join().unwrap().unwrap();
        assert_eq!(report.refused, 2);
        let names: Vec<&str> = report.receivers.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["hostile", "victim"]);
        // The hostile head left, so the victim took its pages by unicast.
        assert!(
            matches!(report.receivers[1].status, PeerStatus::Unicast { .. }),
            "{:?}",
            report.receivers[1].status
        );
    });
}

/// A member that freezes before it connects, after it connects but before
/// its handshake, or after its handshake but before its hello holds no one
/// up: the session goes on with the others once they have joined and
/// waited the join grace, and reports it dropped; the others, told each
/// second that the sender is waiting, do not give it up though their own
/// silence limit is shorter than the wait. Before, the sender waited out
/// its accept timeout and the healthy receivers gave up, keeping nothing.
#[test]
fn a_member_frozen_before_or_during_its_join_holds_no_one_up() {
    if !needs(
        "a_member_frozen_before_or_during_its_join_holds_no_one_up",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    let (a, b) = (
        cluster().issue("r-a", Role::Host, 1).unwrap(),
        cluster().issue("r-b", Role::Host, 1).unwrap(),
    );
    let frozen_tls = cluster().issue("r-frozen", Role::Host, 1).unwrap();
    for phase in [
        "before connecting",
        "before its handshake",
        "before its hello",
    ] {
        let (control, group) = endpoints();
        let src = Source::new(300);
        let mut cfg = SenderConfig::new(control, LO, 3);
        cfg.transport = TransportChoice::Multicast;
        cfg.expected = vec!["r-a".into(), "r-b".into(), "r-frozen".into()];
        cfg.accept_timeout = Duration::from_secs(120);
        cfg.join_grace = Duration::from_secs(4);
        std::thread::scope(|s| {
            let sender = s.spawn(|| send(&cfg, Groups::Single(group), &src, &tls(), &|_, _| {}));
            std::thread::sleep(Duration::from_millis(50));
            // The frozen member: held open (or never made) for the session.
            let _frozen = match phase {
                "before connecting" => None,
                "before its handshake" => {
                    Some((Some(std::net::TcpStream::connect(control).unwrap()), None))
                }
                _ => {
                    let t = std::net::TcpStream::connect(control).unwrap();
                    Some((
                        None,
                        Some(pagecast_channel::Channel::client(t, &frozen_tls).unwrap()),
                    ))
                }
            };
            let t0 = std::time::Instant::now();
            let healthy: Vec<_> = [("r-a", &a), ("r-b", &b)]
                .into_iter()
                .map(|(name, tls)| {
                    s.spawn(move || {
                        let mut rc = ReceiverConfig::new(control, LO, name);
                        rc.silent_after = Duration::from_secs(2);
                        let mut sink = Sink::default();
                        receive(&rc, tls, &mut sink, &|_, _| {}).map(|_| sink)
                    })
                })
                .collect();
            for h in healthy {
                let sink = h.join().unwrap().unwrap_or_else(|e| panic!("{phase}: {e}"));
                check_sink(&sink, &src, &(0..300).collect::<Vec<_>>());
            }
            let report = sender.join().unwrap().unwrap();
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{phase}: the session waited {:?}",
                t0.elapsed()
            );
            let by_name = |n: &str| report.receivers.iter().find(|r| r.name == n).unwrap();
            for n in ["r-a", "r-b"] {
                assert_eq!(by_name(n).status, PeerStatus::Complete, "{phase}: {n}");
            }
            assert!(
                matches!(&by_name("r-frozen").status, PeerStatus::Dropped { reason } if reason.contains("did not join")),
                "{phase}: {:?}",
                by_name("r-frozen").status
            );
        });
    }
}

/// What the hostile member of [`a_member_cannot_read_other_groups_or_speak_for_the_sender_or_others`]
/// learnt and did.
#[derive(Debug, Default)]
struct Hostile {
    /// Datagrams of a group it is not in that it captured, and opened with
    /// a key it was given.
    opened_foreign: u32,
    captured_foreign: u32,
    forged_data: u32,
    forged_nacks: u32,
}

/// The hostile member: joins with its real host certificate, speaking the
/// control protocol itself; then, while the session runs, captures group
/// `foreign` (not its own) and tries every key its welcome gave it, sends
/// data datagrams as the sender (wrong pages under their right frames,
/// checks matching the wrong pages, and one with the highest sequence
/// number) to its own group, which it shares with the victim, and sends
/// NACKs for every page as each other member.
fn hostile_member(
    control: SocketAddr,
    tls: &Tls,
    foreign: SocketAddrV4,
    stop: &Mutex<bool>,
) -> Hostile {
    let spy =
        pagecast_multicast::socket::group_socket(foreign.port(), &[*foreign.ip()], LO, 1).unwrap();
    spy.set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    // Held until the flood ends: then it leaves.
    let (_ch, w, _) = hostile_join(control, tls, ("hostile", "127.0.0.1:1"), None);
    let own = w.groups.iter().position(|g| g.member).unwrap();
    let own_addr: SocketAddrV4 = w.groups[own].addr.parse().unwrap();
    let keys = hostile_keys(&w);
    let out = pagecast_multicast::socket::sender_socket(LO, 1).unwrap();
    let mut h = Hostile::default();
    let mut buf = [0u8; 9000];
    let mut seq = 1u64 << 40;
    let first = w.groups[own].page_ranges[0];
    // From the start, until it has seen a share of the foreign group's
    // traffic (the session lasts longer), then it leaves (dropping `_ch`),
    // so the sender need not wait out its silence.
    let began = std::time::Instant::now();
    let enough = |h: &Hostile| {
        h.captured_foreign >= 200 && began.elapsed() >= Duration::from_secs(1)
            || began.elapsed() >= Duration::from_secs(10)
    };
    while !*stop.lock().unwrap() && !enough(&h) {
        if let Ok(n) = spy.recv(&mut buf) {
            h.captured_foreign += 1;
            let opened = keys.iter().any(|k| {
                let mut b = buf[..n].to_vec();
                hostile_open(&mut b, k, w.session_id)
            });
            h.opened_foreign += u32::from(opened);
        }
        // A wrong page, named as page `first + i` of the group (frame
        // 2 x page), its check matching the wrong bytes.
        let wrong = [0xA5u8; PAGE_SIZE];
        let check = wire::check_of(&ContentKey::CLUSTER.hash_page(&wrong));
        for i in 0..4u32 {
            seq += 1;
            let b = hostile_data(
                &w,
                &keys,
                own,
                i,
                u64::from(first + i) * 2,
                check,
                &wrong,
                seq,
            );
            out.send_to(&b, own_addr).unwrap();
            h.forged_data += 1;
        }
        let b = hostile_data(
            &w,
            &keys,
            own,
            0,
            u64::from(first) * 2,
            check,
            &wrong,
            u64::MAX,
        );
        out.send_to(&b, own_addr).unwrap();
        h.forged_data += 1;
        for as_member in (1..=3).filter(|&m| m != w.receiver_id) {
            seq += 1;
            let b = hostile_nack(&w, &keys, own, as_member, seq);
            out.send_to(&b, SocketAddrV4::new(*own_addr.ip(), own_addr.port() + 1))
                .unwrap();
            h.forged_nacks += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    h
}

/// A hostile member's join, the control protocol spoken directly: hello
/// (under `name`, giving `chain_addr`; `joined` hears once it is sent),
/// welcome, ready, then the start. Returns its connection, welcome and
/// start.
fn hostile_join(
    control: SocketAddr,
    tls: &Tls,
    (name, chain_addr): (&str, &str),
    joined: Option<&std::sync::mpsc::Sender<()>>,
) -> (
    pagecast_channel::Channel,
    pagecast_proto::v1::CastWelcome,
    pagecast_proto::v1::CastStart,
) {
    let mut ch = hostile_hello(control, tls, (name, chain_addr));
    if let Some(j) = joined {
        j.send(()).unwrap();
    }
    let (w, start) = hostile_welcome_to_start(&mut ch);
    (ch, w, start)
}

/// A hostile member's connection and hello (under `name`, giving
/// `chain_addr`), the control protocol spoken directly.
fn hostile_hello(
    control: SocketAddr,
    tls: &Tls,
    (name, chain_addr): (&str, &str),
) -> pagecast_channel::Channel {
    use pagecast_proto::v1;
    let mut ch =
        pagecast_channel::Channel::client(std::net::TcpStream::connect(control).unwrap(), tls)
            .unwrap();
    ch.send(&v1::CastFrame {
        body: Some(v1::cast_frame::Body::Hello(v1::CastHello {
            version: pagecast_proto::CAST_WIRE_VERSION as i32,
            name: name.into(),
            chain_addr: chain_addr.into(),
            rcvbuf_bytes: 1 << 20,
            job: String::new(),
        })),
    })
    .unwrap();
    ch
}

/// A hostile member's connection and hello, seated first in its session:
/// the sender says it waits for the others, one receiver having joined.
fn hostile_seated(
    control: SocketAddr,
    tls: &Tls,
    (name, chain_addr): (&str, &str),
) -> pagecast_channel::Channel {
    use pagecast_proto::v1;
    let mut ch = hostile_hello(control, tls, (name, chain_addr));
    ch.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match ch.recv::<v1::CastFrame>("waiting").unwrap().body {
        Some(v1::cast_frame::Body::Waiting(w)) => assert_eq!(w.joined, 1),
        other => panic!("expected the sender to wait, got {other:?}"),
    }
    ch
}

/// A hostile member's join after its hello: the welcome, its ready, then
/// the start.
fn hostile_welcome_to_start(
    ch: &mut pagecast_channel::Channel,
) -> (
    pagecast_proto::v1::CastWelcome,
    pagecast_proto::v1::CastStart,
) {
    use pagecast_proto::v1;
    use v1::cast_frame::Body as F;
    let w = loop {
        match ch.recv::<v1::CastFrame>("welcome").unwrap().body {
            Some(F::Welcome(w)) => break w,
            Some(F::Waiting(_)) => continue,
            other => panic!("expected a welcome, got {other:?}"),
        }
    };
    ch.send(&v1::CastFrame {
        body: Some(F::Ready(v1::CastReady { joined: 1 })),
    })
    .unwrap();
    let start = loop {
        match ch.recv::<v1::CastFrame>("start").unwrap().body {
            Some(F::Start(s)) => break s,
            Some(F::Waiting(_)) => continue,
            other => panic!("expected the start, got {other:?}"),
        }
    };
    (w, start)
}

/// A hostile member's chain link from its predecessor: the first
/// connection to `listener`, mutual TLS done.
fn hostile_predecessor(listener: &std::net::TcpListener, tls: &Tls) -> pagecast_channel::Channel {
    let (from, _) = listener.accept().unwrap();
    pagecast_channel::Channel::server(from, tls).unwrap()
}

/// A hostile member's chain link to the next receiver at `next`.
fn hostile_successor(next: &str, tls: &Tls) -> pagecast_channel::Channel {
    pagecast_channel::Channel::client(std::net::TcpStream::connect(next).unwrap(), tls).unwrap()
}

/// Every key a welcome hands its receiver: its own, and its groups'.
fn hostile_keys(w: &pagecast_proto::v1::CastWelcome) -> Vec<wire::CastKey> {
    let mut keys = vec![w.member_key.as_ref().try_into().unwrap()];
    keys.extend(
        w.groups
            .iter()
            .filter(|g| g.member)
            .map(|g| <wire::CastKey>::try_from(g.key.as_ref()).unwrap()),
    );
    keys
}

/// Whether a captured datagram opens under `key` (as a group key, no tag
/// checked).
fn hostile_open(b: &mut [u8], key: &wire::CastKey, session: u64) -> bool {
    let key = wire::GroupKey::new(*key);
    wire::decode(b, session, |_, _| {
        Some(wire::Opening {
            key: &key,
            tag: None,
        })
    })
    .is_ok()
}

/// Seals as the hostile member can: under its group's key (`keys[1]`),
/// with tags under every key it holds for every place of a group of
/// three.
fn hostile_seal(keys: &[wire::CastKey], d: &wire::Datagram) -> Vec<u8> {
    let tags = [keys[0]; 3];
    let mut b = Vec::new();
    d.encode(
        &wire::Sealing {
            key: &wire::GroupKey::new(keys[1]),
            tags: &tags,
        },
        &mut b,
    );
    b
}

/// A data datagram "from the sender" of page `index` of group `g`.
#[allow(clippy::too_many_arguments)]
fn hostile_data(
    w: &pagecast_proto::v1::CastWelcome,
    keys: &[wire::CastKey],
    g: usize,
    index: u32,
    frame: u64,
    check: wire::Check,
    page: &Page,
    seq: u64,
) -> Vec<u8> {
    hostile_seal(
        keys,
        &wire::Datagram {
            session: w.session_id,
            seq,
            from: 0,
            body: wire::Body::Data {
                group: g as u32,
                index,
                fragment: 0,
                fragments: 1,
                pages: vec![(frame, check)],
                payload: page,
            },
        },
    )
}

/// A NACK of every page of group `g`, "from" receiver `as_member`.
fn hostile_nack(
    w: &pagecast_proto::v1::CastWelcome,
    keys: &[wire::CastKey],
    g: usize,
    as_member: u32,
    seq: u64,
) -> Vec<u8> {
    hostile_seal(
        keys,
        &wire::Datagram {
            session: w.session_id,
            seq,
            from: as_member,
            body: wire::Body::Nack {
                group: g as u32,
                seen_through: 0,
                ranges: vec![(0, w.groups[g].len)],
            },
        },
    )
}

/// A member holding a real host certificate, speaking the protocol itself,
/// reads only its own groups, cannot pass for the sender, and cannot pass
/// for another member: the victim, which shares a group with it, keeps the
/// sender's pages (not the member's wrong ones, not shut out by a highest
/// sequence number), the group it is not in stays closed to it, and the
/// sender ignores the NACKs it sends as others. Before, one session key
/// opened every group and sealed every member's datagrams.
#[test]
fn a_member_cannot_read_other_groups_or_speak_for_the_sender_or_others() {
    if !needs(
        "a_member_cannot_read_other_groups_or_speak_for_the_sender_or_others",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    let (control, g0) = endpoints();
    let o = g0.ip().octets();
    let g1 = SocketAddrV4::new(Ipv4Addr::new(o[0], o[1], o[2], o[3] + 100), g0.port());
    let src = Source::new(3000);
    let mut cfg = SenderConfig::new(control, LO, 3);
    cfg.transport = TransportChoice::Multicast;
    cfg.rate_bps = Some(40_000_000);
    cfg.expected = vec!["victim".into(), "hostile".into(), "other".into()];
    // Group 0: the victim and the hostile member; group 1: the victim and
    // another.
    let plan = vec![
        GroupPlan {
            addr: g0,
            members: vec![0, 1],
            pages: (0..1000).collect(),
        },
        GroupPlan {
            addr: g1,
            members: vec![0, 2],
            pages: (1000..3000).collect(),
        },
    ];
    let victim = cluster().issue("victim", Role::Host, 1).unwrap();
    let other = cluster().issue("other", Role::Host, 1).unwrap();
    let hostile = cluster().issue("hostile", Role::Host, 1).unwrap();
    let stop = Mutex::new(false);
    std::thread::scope(|s| {
        let sender = s.spawn(|| send(&cfg, Groups::Plan(plan), &src, &tls(), &|_, _| {}));
        std::thread::sleep(Duration::from_millis(50));
        let h = s.spawn(|| hostile_member(control, &hostile, g1, &stop));
        let honest: Vec<_> = [("victim", &victim), ("other", &other)]
            .into_iter()
            .map(|(name, tls)| {
                s.spawn(move || {
                    let rc = ReceiverConfig::new(control, LO, name);
                    let mut sink = Sink::default();
                    let r = receive(&rc, tls, &mut sink, &|_, _| {});
                    (r, sink)
                })
            })
            .collect();
        let mut got: Vec<_> = honest.into_iter().map(|h| h.join().unwrap()).collect();
        *stop.lock().unwrap() = true;
        let h = h.join().unwrap();
        let report = sender.join().unwrap().unwrap();
        let (other_r, other_sink) = got.pop().unwrap();
        let (victim_r, victim_sink) = got.pop().unwrap();
        let victim_r = victim_r.unwrap_or_else(|e| panic!("the victim failed: {e}"));
        other_r.unwrap();
        check_sink(&victim_sink, &src, &(0..3000).collect::<Vec<_>>());
        check_sink(&other_sink, &src, &(1000..3000).collect::<Vec<_>>());
        eprintln!(
            "hostile: {h:?}; victim: {victim_r:?}; sender nacks {}",
            report.nacks
        );
        assert!(h.forged_data > 100 && h.forged_nacks > 50, "{h:?}");
        assert!(h.captured_foreign > 100, "{h:?}");
        assert_eq!(h.opened_foreign, 0, "the member read a group it is not in");
        assert!(
            victim_r.counters.forged >= u64::from(h.forged_data) / 2,
            "the victim took the member's datagrams as the sender's: {:?}",
            victim_r.counters
        );
        assert_eq!(victim_r.pages_unicast, 0, "{victim_r:?}");
        assert!(
            report.nacks < u64::from(h.forged_nacks) / 4,
            "the sender heard {} NACKs; the member sent {} as others",
            report.nacks,
            h.forged_nacks
        );
    });
}

/// What the hostile chain member of
/// [`a_chain_member_cannot_pass_pages_of_its_own_down_the_chain`] did.
#[derive(Debug, Default)]
struct Relayed {
    forwarded: u32,
    forged: u32,
    withheld: u32,
    replayed: u32,
}

/// What the hostile chain member does with the pages it relays.
#[derive(Clone, Copy, PartialEq)]
enum Relay {
    /// Every third replaced by one of its own.
    Forge,
    /// None passed on; the link kept busy with withdrawals.
    Withhold,
    /// The first passed on, then sent again and again, the rest kept.
    Replay,
}

/// A chain member speaking the protocol itself with its real host
/// certificate: joins first (so it heads the chain) and takes the sender's
/// pages on its chain link. With `forge`, it passes them on to the receiver after it, every third one
/// replaced by a page of its own making (its hash that of its bytes, the
/// frame and the sender's tags kept), then stays connected and silent
/// until `stop`, so the sender gives it up at its silence limit. With
/// `Withhold` it passes none on, but keeps its link to the next receiver
/// busy (a withdrawal every 100 ms, which a receiver takes only from the
/// sender); with `Replay` it passes the first page on and then that same
/// genuine, tagged page every 100 ms. Either way it tells the sender every
/// 300 ms how few pages it holds, so that neither link nor control
/// connection ever goes quiet.
fn hostile_chain_member(
    control: SocketAddr,
    tls: &Tls,
    (joined, relay): (std::sync::mpsc::Sender<()>, Relay),
    stop: &Mutex<bool>,
) -> Relayed {
    let forge = relay == Relay::Forge;
    use pagecast_proto::v1;
    use std::time::Instant;
    use v1::cast_frame::Body as F;
    let frame = |b| v1::CastFrame { body: Some(b) };
    let listener = std::net::TcpListener::bind((LO, 0)).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (mut ch, _, start) = hostile_join(control, tls, ("hostile", &addr), Some(&joined));
    assert_eq!(start.transport, v1::CastTransport::Chain as i32);
    let mut prev = hostile_predecessor(&listener, tls);
    let mut next = hostile_successor(&start.chain_next, tls);
    let mut junk = frame(F::Page(v1::CastPage {
        withdrawn: true,
        ..Default::default()
    }));
    let (mut r, mut open, mut busy, mut told) =
        (Relayed::default(), true, Instant::now(), Instant::now());
    let mut keep_busy = |next: &mut pagecast_channel::Channel,
                         ch: &mut pagecast_channel::Channel,
                         junk: &v1::CastFrame| {
        if busy.elapsed() >= Duration::from_millis(100) {
            let _ = next.send(junk);
            busy = Instant::now();
        }
        if told.elapsed() >= Duration::from_millis(300) {
            let _ = ch.send(&frame(F::Progress(v1::CastProgress::default())));
            told = Instant::now();
        }
    };
    loop {
        let mut f: v1::CastFrame = prev.recv("chain page").unwrap();
        let end = matches!(f.body, Some(F::Finish(_)));
        if relay == Relay::Replay && r.forwarded == 0 && matches!(f.body, Some(F::Page(_))) {
            // The sender's own first page, passed on, then kept to send
            // again.
            let _ = next.send(&f);
            r.forwarded += 1;
            junk = f.clone();
        } else if !forge {
            r.withheld += 1;
            r.replayed += u32::from(relay == Relay::Replay);
            keep_busy(&mut next, &mut ch, &junk);
        } else if open {
            if let Some(F::Page(p)) = &mut f.body
                && !p.withdrawn
                && p.page % 3 == 0
            {
                let mine = [(p.page % 251) as u8 ^ 0x5A; PAGE_SIZE];
                p.data = mine.to_vec().into();
                p.hash = ContentKey::CLUSTER
                    .hash_page(&mine)
                    .as_bytes()
                    .to_vec()
                    .into();
                r.forged += 1;
            }
            // The receiver after it may have let the link go.
            open = next.send(&f).is_ok();
            r.forwarded += u32::from(open);
        }
        if end {
            break;
        }
    }
    while !*stop.lock().unwrap() {
        if !forge {
            keep_busy(&mut next, &mut ch, &junk);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop((ch, next));
    r
}

/// A chain member holding a real host certificate, speaking the protocol
/// itself, cannot pass pages of its own making down the chain as the
/// sender's: the receiver after it takes none of them (each carries the
/// sender's tag for the sender's page, not for this one), tells the sender
/// at once, and takes the rest from the sender by unicast while the feed
/// still runs, so it ends with exactly the sender's pages. Before, it took
/// the member's pages as the session's, dropped the sender's as
/// duplicates, and failed at the end (its digest did not match); and a
/// receiver that gave its link up heard nothing until the feed ended.
#[test]
fn a_chain_member_cannot_pass_pages_of_its_own_down_the_chain() {
    let (control, group) = endpoints();
    // The source reads 20 pages every 100 ms: the feed lasts 3 s, longer
    // than the victim's 2 s silence limit, and no withdrawal is told over
    // the control connections meanwhile.
    let src = Trickling::keeping_all(600, 20, Duration::from_millis(100));
    let mut cfg = SenderConfig::new(control, LO, 2);
    cfg.transport = TransportChoice::Chain;
    cfg.silent_after = Duration::from_secs(3);
    let hostile = cluster().issue("hostile", Role::Host, 1).unwrap();
    let victim = cluster().issue("victim", Role::Host, 1).unwrap();
    let stop = Mutex::new(false);
    std::thread::scope(|s| {
        let sender = s.spawn(|| send(&cfg, Groups::Single(group), &src, &tls(), &|_, _| {}));
        std::thread::sleep(Duration::from_millis(50));
        let (joined, hello_sent) = std::sync::mpsc::channel();
        let h = s.spawn(|| hostile_chain_member(control, &hostile, (joined, Relay::Forge), &stop));
        hello_sent.recv().unwrap();
        let v = s.spawn(|| {
            let mut rc = ReceiverConfig::new(control, LO, "victim");
            rc.silent_after = Duration::from_secs(2);
            let mut sink = Sink::default();
            let r = receive(&rc, &victim, &mut sink, &|_, _| {});
            (r, sink)
        });
        let (victim_r, victim_sink) = v.join().unwrap();
        *stop.lock().unwrap() = true;
        let h = h.join().unwrap();
        let report = sender.join().unwrap().unwrap();
        let victim_r = victim_r.unwrap_or_else(|e| panic!("the victim failed: {e}"));
        eprintln!("hostile: {h:?}; victim: {victim_r:?}");
        assert_eq!(report.transport, Transport::Chain);
        assert!(h.forged > 0, "{h:?}");
        check_sink(&victim_sink, &src.inner, &(0..600).collect::<Vec<_>>());
        assert!(victim_r.counters.forged >= 1, "{:?}", victim_r.counters);
        assert!(victim_r.pages_unicast > 0, "{victim_r:?}");
        let v = report
            .receivers
            .iter()
            .find(|r| r.name == "victim")
            .unwrap();
        assert!(
            matches!(&v.status, PeerStatus::Unicast { reason } if reason.contains("tag that is not the sender's")),
            "{:?}",
            v.status
        );
    });
}

/// A chain member that takes the sender's pages and passes none on,
/// keeping its link to the next receiver busy with frames that are not the
/// sender's pages (or with the sender's first page, again and again) and
/// its control connection alive, holds that receiver up for at most half
/// its silence limit: the receiver gives the link up, tells the sender,
/// and takes every page by unicast; once they are verified and reported
/// it ends, while the sender still waits on the member (within the bounds
/// `a_member_that_never_says_it_is_done_holds_the_sender_for_a_silence_limit`
/// checks). Before, it waited as long as such
/// frames came (each one counted as hearing from the sender), and with a
/// quiet link until its own silence limit, then failed.
#[test]
fn a_chain_member_that_withholds_pages_costs_half_a_silence_limit() {
    for relay in [Relay::Withhold, Relay::Replay] {
        withheld_by(relay);
    }
}

/// [`a_chain_member_that_withholds_pages_costs_half_a_silence_limit`]
/// with the member relaying as `relay`.
fn withheld_by(relay: Relay) {
    let (control, group) = endpoints();
    let src = Source::new(600);
    let mut cfg = SenderConfig::new(control, LO, 2);
    cfg.transport = TransportChoice::Chain;
    cfg.silent_after = Duration::from_secs(30);
    let hostile = cluster().issue("hostile", Role::Host, 1).unwrap();
    let victim = cluster().issue("victim", Role::Host, 1).unwrap();
    let stop = Mutex::new(false);
    std::thread::scope(|s| {
        let sender = s.spawn(|| send(&cfg, Groups::Single(group), &src, &tls(), &|_, _| {}));
        std::thread::sleep(Duration::from_millis(50));
        let (joined, hello_sent) = std::sync::mpsc::channel();
        let h = s.spawn(|| hostile_chain_member(control, &hostile, (joined, relay), &stop));
        hello_sent.recv().unwrap();
        let (t0, victim) = (std::time::Instant::now(), &victim);
        let v = s.spawn(move || {
            let mut rc = ReceiverConfig::new(control, LO, "victim");
            rc.silent_after = Duration::from_secs(2);
            let mut sink = Sink::default();
            let r = receive(&rc, victim, &mut sink, &|_, _| {});
            (r, sink, t0.elapsed())
        });
        // The victim is done once its pages are verified; the sender
        // waits for the member too (30 s silence limit here), which the
        // test then tells to stop.
        let (victim_r, victim_sink, took) = v.join().unwrap();
        *stop.lock().unwrap() = true;
        let h = h.join().unwrap();
        let report = sender.join();
        let victim_r = victim_r.unwrap_or_else(|e| panic!("the victim failed: {e}"));
        eprintln!("hostile: {h:?}; victim: {victim_r:?} in {took:?}; sender: {report:?}");
        match relay {
            Relay::Withhold => assert!(h.withheld > 0 && h.forwarded == 0, "{h:?}"),
            _ => assert!(h.forwarded == 1 && h.replayed > 0, "{h:?}"),
        }
        check_sink(&victim_sink, &src, &(0..600).collect::<Vec<_>>());
        // All by unicast, but for the first page where it was replayed.
        assert!(victim_r.pages_unicast >= 599, "{victim_r:?}");
        assert!(victim_r.chain_broken.is_some(), "{victim_r:?}");
        let report = report.unwrap().unwrap();
        let v = report
            .receivers
            .iter()
            .find(|r| r.name == "victim")
            .unwrap();
        // The receiver's own reason, not the sender's limit after the feed.
        let why = match relay {
            Relay::Withhold => "passed on no page of the sender's",
            _ => "came down it again, or out of order",
        };
        assert!(
            matches!(&v.status, PeerStatus::Unicast { reason }
                if reason.contains("gave up its chain link") && reason.contains(why)),
            "{:?}",
            v.status
        );
    });
}

/// How the member that never says it is done behaves.
#[derive(Clone, Copy, Debug)]
struct NeverDone {
    /// It reports every group held (else it reports holding nothing, and
    /// is sent everything by unicast).
    claims_all: bool,
    /// How it reads its control connection and its chain link.
    reads: Reads,
}

/// How a member reads what it is sent.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Reads {
    All,
    /// Nothing on its control connection (unicast repair included).
    Nothing,
    /// A frame every 20 ms (about 200 KiB/s), on its control connection
    /// and its chain link: each send to it ends well within a frame's
    /// write limit.
    Slowly,
}

/// A member speaking the protocol itself with its real host certificate
/// that never says it is done: it reports every 300 ms (so it is never
/// silent), every group held or nothing, reads its control connection or
/// chain link (all of it, none, or slowly), and on a chain passes on every
/// frame faithfully. Returns the
/// frames it took on its control connection once told to stop.
fn never_done_member(
    control: SocketAddr,
    tls: &Tls,
    (joined, how): (std::sync::mpsc::Sender<()>, NeverDone),
    stop: &Mutex<bool>,
) -> u64 {
    use pagecast_proto::v1;
    use v1::cast_frame::Body as F;
    let frame = |b| v1::CastFrame { body: Some(b) };
    let listener = std::net::TcpListener::bind((LO, 0)).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (ch, _, start) = hostile_join(control, tls, ("never-done", &addr), Some(&joined));
    let (mut rd, mut wr) = ch.split().unwrap();
    let drained = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        if how.reads != Reads::Nothing {
            s.spawn(|| {
                while rd.recv::<v1::CastFrame>("a frame").is_ok() {
                    drained.fetch_add(1, Ordering::Relaxed);
                    if how.reads == Reads::Slowly {
                        if *stop.lock().unwrap() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            });
        }
        if start.transport == v1::CastTransport::Chain as i32 {
            s.spawn(|| {
                let mut prev = hostile_predecessor(&listener, tls);
                let mut next = (!start.chain_next.is_empty())
                    .then(|| hostile_successor(&start.chain_next, tls));
                while let Ok(f) = prev.recv::<v1::CastFrame>("chain page") {
                    if let Some(n) = next.as_mut() {
                        let _ = n.send(&f);
                    }
                    if how.reads == Reads::Slowly {
                        if *stop.lock().unwrap() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            });
        }
        let report = frame(F::Progress(if how.claims_all {
            v1::CastProgress {
                group: u32::MAX,
                ..Default::default()
            }
        } else {
            v1::CastProgress::default()
        }));
        while !*stop.lock().unwrap() {
            let _ = wr.send(&report);
            std::thread::sleep(Duration::from_millis(300));
        }
        wr.shutdown();
    });
    drained.into_inner()
}

/// A member that never says it is done, though it keeps reporting, holds
/// the sender for about a silence limit once it has had every page: over
/// multicast from its report of the last group held, or from the end of
/// its unicast repair (which ends once the member's kernel acknowledged
/// the pages, on the chain and after a multicast member held the window
/// back); a member that takes nothing on its control connection stalls
/// its repair, which then closes the connection; one that takes a frame
/// now and then (at the chain's head) is given up at under 1 MiB/s, the
/// feed once the sends to it waited a silence limit and 15 s, then its
/// repair once they waited a silence limit.
/// The sender ends its session, the honest receiver verified. Before, the
/// sender waited for the member's Done until the job's deadline, a repair
/// that failed left the connection open, so the member's reports kept the
/// sender waiting, and a slow reader held the feed for as long as it
/// read a frame within each frame's write limit.
#[test]
fn a_member_that_never_says_it_is_done_holds_the_sender_for_a_silence_limit() {
    if !needs(
        "a_member_that_never_says_it_is_done_holds_the_sender_for_a_silence_limit",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    let how = |claims_all, reads| NeverDone { claims_all, reads };
    let (all, nothing) = (how(true, Reads::All), how(false, Reads::All));
    let (deaf, slow) = (how(false, Reads::Nothing), how(false, Reads::Slowly));
    for (transport, how, pages, why) in [
        (
            TransportChoice::Multicast,
            all,
            600,
            "did not say it was done",
        ),
        (
            TransportChoice::Multicast,
            nothing,
            600,
            "did not say it was done",
        ),
        (
            TransportChoice::Chain,
            nothing,
            600,
            "did not say it was done",
        ),
        // More than the socket buffers take, so the repair stalls.
        (
            TransportChoice::Chain,
            deaf,
            12_000,
            "unicast repair given up",
        ),
        // At the head of the chain (it joins first), taking the feed and
        // then its repair a frame every 20 ms: both are given up.
        (
            TransportChoice::Chain,
            slow,
            12_000,
            "unicast repair given up: took",
        ),
    ] {
        never_done_with(transport, how, pages, why);
    }
}

/// [`a_member_that_never_says_it_is_done_holds_the_sender_for_a_silence_limit`]
/// over `transport`, the member behaving as `how`, with `pages` pages; the
/// member must be dropped for `why`.
fn never_done_with(transport: TransportChoice, how: NeverDone, pages: u32, why: &str) {
    let (control, group) = endpoints();
    let src = Source::new(pages);
    let mut cfg = SenderConfig::new(control, LO, 2);
    cfg.transport = transport;
    cfg.silent_after = Duration::from_secs(3);
    let hostile = cluster().issue("never-done", Role::Host, 1).unwrap();
    let honest = cluster().issue("honest", Role::Host, 1).unwrap();
    let stop = Mutex::new(false);
    let t0 = std::time::Instant::now();
    std::thread::scope(|s| {
        let (ended, sender_ended) = std::sync::mpsc::channel();
        let (src, cfg) = (&src, &cfg);
        s.spawn(move || {
            let r = send(cfg, Groups::Single(group), src, &tls(), &|_, _| {});
            let _ = ended.send(r);
        });
        std::thread::sleep(Duration::from_millis(50));
        let (joined, hello_sent) = std::sync::mpsc::channel();
        let h = s.spawn(|| never_done_member(control, &hostile, (joined, how), &stop));
        hello_sent.recv().unwrap();
        let v = s.spawn(|| {
            let rc = ReceiverConfig::new(control, LO, "honest");
            let mut sink = Sink::default();
            let r = receive(&rc, &honest, &mut sink, &|_, _| {});
            (r, sink)
        });
        let (honest_r, honest_sink) = v.join().unwrap();
        // The silence limit, the chain's half limit after its feed, a
        // stalled repair's 10 s, the feed's 15 s of slack, and
        // time for a busy machine; before, it waited for the stop (a slow
        // head: about 240 s).
        let report = sender_ended.recv_timeout(Duration::from_secs(60));
        let took = t0.elapsed();
        *stop.lock().unwrap() = true;
        let drained = h.join().unwrap();
        let report = report
            .unwrap_or_else(|_| panic!("{transport:?} {how:?}: the sender still waits"))
            .unwrap();
        let honest_r = honest_r.unwrap_or_else(|e| panic!("the honest receiver failed: {e}"));
        eprintln!(
            "{transport:?} {how:?}: sender ended after {took:.1?}, member took {drained} frames; \
             {honest_r:?}"
        );
        check_sink(&honest_sink, src, &(0..pages).collect::<Vec<_>>());
        what_the_sender_saw(&report, how, why, (pages, drained));
    });
}

/// What [`never_done_with`] asks of the sender's report: the member
/// dropped for `why` (a member that reads nothing, once one send waited the
/// silence limit), the honest receiver verified, and a slow head's feed
/// given up by the feed's guard after it took under half the `pages`.
fn what_the_sender_saw(
    report: &SendReport,
    how: NeverDone,
    why: &str,
    (pages, drained): (u32, u64),
) {
    let transport = report.transport;
    let m = report
        .receivers
        .iter()
        .find(|r| r.name == "never-done")
        .unwrap();
    assert!(
        matches!(&m.status, PeerStatus::Dropped { reason } if reason.contains(why)),
        "{transport:?} {how:?}: {:?}",
        m.status
    );
    let h = report
        .receivers
        .iter()
        .find(|r| r.name == "honest")
        .unwrap();
    assert!(
        matches!(h.status, PeerStatus::Complete | PeerStatus::Unicast { .. }),
        "{:?}",
        h.status
    );
    if how.reads == Reads::Nothing {
        // Given up once one send waited the silence limit, not when
        // that send failed at its 10 s write limit.
        assert!(
            matches!(&m.status, PeerStatus::Dropped { reason }
                if reason.contains("one send waited that long")),
            "{:?}",
            m.status
        );
    }
    if how.reads == Reads::Slowly {
        // The feed's guard moved it, not a limit after the feed (the
        // member joined first, so it heads the chain); the member took
        // a small part of the pages.
        assert!(
            matches!(&h.status, PeerStatus::Unicast { reason }
                if reason.contains("the chain's first receiver took")),
            "{:?}",
            h.status
        );
        assert!(drained < u64::from(pages) / 2, "{drained}");
    }
}

/// Where the chain member of
/// [`a_chain_member_frozen_at_any_phase_holds_up_only_those_after_it`]
/// freezes, or that it trickles
/// ([`a_chain_member_that_takes_pages_slowly_holds_up_only_those_after_it`]).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stuck {
    /// Its predecessor's connection accepted (by the kernel), no TLS.
    BeforeItsHandshake,
    /// The first bytes of its predecessor's handshake read, no answer.
    DuringItsHandshake,
    /// The link's handshake done, no frame read, its successor never
    /// reached.
    AfterItsHandshake,
    /// 200 frames relayed to its successor, then nothing more read,
    /// written or reported.
    MidStream,
    /// Every frame relayed, one every 20 ms (about 200 KiB/s, each well
    /// within any wait), an empty progress report to the sender every
    /// 300 ms.
    Trickling,
}

/// A chain member speaking the protocol itself with its real host
/// certificate that freezes at `at` (as a SIGSTOPped process would: every
/// connection held open, nothing read or written), or trickles, until
/// `stop`.
fn stuck_chain_member(control: SocketAddr, tls: &Tls, at: Stuck, stop: &Mutex<bool>) {
    use std::io::Read;
    let listener = std::net::TcpListener::bind((LO, 0)).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (mut ch, _, start) = hostile_join(control, tls, ("frozen", &addr), None);
    if at == Stuck::Trickling {
        trickle(&listener, tls, (&mut ch, &start.chain_next), stop);
    }
    let mut held: Vec<Box<dyn std::any::Any>> = vec![Box::new(ch)];
    if !matches!(at, Stuck::BeforeItsHandshake | Stuck::Trickling) {
        let (mut from_prev, _) = listener.accept().unwrap();
        if at == Stuck::DuringItsHandshake {
            let mut hello = [0u8; 5];
            from_prev.read_exact(&mut hello).unwrap();
            held.push(Box::new(from_prev));
        } else {
            let mut prev = pagecast_channel::Channel::server(from_prev, tls).unwrap();
            if at == Stuck::MidStream {
                let mut next = hostile_successor(&start.chain_next, tls);
                for _ in 0..200 {
                    let f: pagecast_proto::v1::CastFrame = prev.recv("chain page").unwrap();
                    next.send(&f).unwrap();
                }
                held.push(Box::new(next));
            }
            held.push(Box::new(prev));
        }
    }
    while !*stop.lock().unwrap() {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop((held, listener));
}

/// [`Stuck::Trickling`]: relays a frame every 20 ms, reporting to the
/// sender every 300 ms, until its predecessor lets it go (or `stop`).
fn trickle(
    listener: &std::net::TcpListener,
    tls: &Tls,
    (ch, next): (&mut pagecast_channel::Channel, &str),
    stop: &Mutex<bool>,
) {
    use pagecast_proto::v1;
    let mut prev = hostile_predecessor(listener, tls);
    let mut next = hostile_successor(next, tls);
    let mut told = std::time::Instant::now();
    while !*stop.lock().unwrap() {
        let Ok(f) = prev.recv::<v1::CastFrame>("chain page") else {
            return;
        };
        let _ = next.send(&f);
        if told.elapsed() >= Duration::from_millis(300) {
            let progress = v1::cast_frame::Body::Progress(v1::CastProgress::default());
            let _ = ch.send(&v1::CastFrame {
                body: Some(progress),
            });
            told = std::time::Instant::now();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A source whose first pages were all withdrawn (their content left the
/// source before it was read: a busy VM wrote over them), then pages of
/// one content, genuine.
struct MostlyWithdrawn {
    withdrawn: u32,
    genuine: u32,
    hash: pagecast_pages::PageHash,
}

impl MostlyWithdrawn {
    const BYTE: u8 = 0x5a;

    fn new(withdrawn: u32, genuine: u32) -> Self {
        MostlyWithdrawn {
            withdrawn,
            genuine,
            hash: ContentKey::CLUSTER.hash_page(&[Self::BYTE; PAGE_SIZE]),
        }
    }
}

impl PageSource for MostlyWithdrawn {
    fn pages(&self) -> u32 {
        self.withdrawn + self.genuine
    }
    fn entry(&self, i: u32) -> PageEntry {
        PageEntry {
            key: u64::from(i),
            hash: self.hash,
        }
    }
    fn read(&self, _i: u32, out: &mut Page) -> std::io::Result<()> {
        out.fill(Self::BYTE);
        Ok(())
    }
    fn frames(&self) -> u64 {
        u64::from(self.pages())
    }
    fn withdrawn(&self, i: u32) -> bool {
        i < self.withdrawn
    }
}

/// The sender tells every live receiver of each withdrawn page over its
/// control connection while it feeds the chain. A member holding a real
/// host certificate, speaking the protocol itself, that heads the chain
/// and then reads nothing, neither its control connection nor its link,
/// holds the feed up for about a second once its buffers are full: it is
/// dropped and its connection closed, the feed leaves its link, and the
/// honest receiver after it settles every withdrawn page and takes the
/// genuine ones by unicast. Before, the feed waited the 10 s write limit
/// on it, and the goodbye to it another 10 s, and the honest receiver gave
/// the sender up as silent.
#[test]
fn a_member_that_stops_reading_withdrawals_holds_the_feed_for_a_second() {
    if !needs(
        "a_member_that_stops_reading_withdrawals_holds_the_feed_for_a_second",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    withdrawals_past_a_hostile_head(
        |_, stop| {
            while !*stop.lock().unwrap() {
                std::thread::sleep(Duration::from_millis(20));
            }
        },
        "took no data for 1s",
    );
}

/// As above, with a member that reads its control connection, but slowly:
/// about 2,000 withdrawals (160 KB) a second, so its kernel acknowledges
/// something every fraction of a second and it never stalls. It is dropped
/// once it took under 1 MiB a second over a second of the feed's waiting on
/// it. Before, each word to it waited until a third of the send buffer
/// had drained (megabytes, seconds at that pace), and the feed crawled at
/// its pace.
#[test]
fn a_member_that_reads_withdrawals_slowly_is_dropped_for_its_pace() {
    if !needs(
        "a_member_that_reads_withdrawals_slowly_is_dropped_for_its_pace",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    withdrawals_past_a_hostile_head(
        |ch, stop| {
            let _ = ch.set_read_timeout(Some(Duration::from_millis(100)));
            while !*stop.lock().unwrap() {
                for _ in 0..20 {
                    if ch.recv::<pagecast_proto::v1::CastFrame>("word").is_err() {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        },
        "asked",
    );
}

/// A chain whose head is a hostile member that takes and holds its link,
/// reads its control connection as `reads` does until told to stop, and
/// the honest receiver after it; 300,000 withdrawn pages, then 4,000
/// genuine ones. The hostile member must be dropped for a reason that
/// contains `dropped_for`, and the honest receiver must settle every page
/// within 15 s.
fn withdrawals_past_a_hostile_head(
    reads: impl FnOnce(&mut pagecast_channel::Channel, &Mutex<bool>) + Send,
    dropped_for: &str,
) {
    let (control, group) = endpoints();
    // Far more withdrawals than a connection's buffers hold (each is a
    // frame of about 80 bytes on the wire), then more genuine pages than
    // the link's buffers hold.
    let src = MostlyWithdrawn::new(300_000, 4_000);
    let mut cfg = SenderConfig::new(control, LO, 2);
    cfg.transport = TransportChoice::Chain;
    // The honest receiver's repair, mostly withdrawals, is judged for
    // pace over this long: room for a loaded machine.
    cfg.silent_after = Duration::from_secs(10);
    let hostile = &cluster().issue("hostile", Role::Host, 1).unwrap();
    let honest = cluster().issue("honest", Role::Host, 1).unwrap();
    let listener = &std::net::TcpListener::bind((LO, 0)).unwrap();
    let addr = &listener.local_addr().unwrap().to_string();
    let stop = &Mutex::new(false);
    std::thread::scope(|s| {
        let sender = s.spawn(|| send(&cfg, Groups::Single(group), &src, &tls(), &|_, _| {}));
        std::thread::sleep(Duration::from_millis(50));
        // It joins first, so it heads the chain.
        let mut ch = hostile_seated(control, hostile, ("hostile", addr));
        s.spawn(move || {
            hostile_welcome_to_start(&mut ch);
            // The sender's link to it, taken and held; nothing read on it.
            let _link = hostile_predecessor(listener, hostile);
            reads(&mut ch, stop);
            drop(ch);
        });
        let t = std::time::Instant::now();
        let rc = ReceiverConfig::new(control, LO, "honest");
        let mut sink = Sink::default();
        let got = receive(&rc, &honest, &mut sink, &|_, _| {});
        let took = t.elapsed();
        let report = sender.join().unwrap();
        *stop.lock().unwrap() = true;
        let (got, report) = (got.unwrap(), report.unwrap());
        assert_eq!(got.withdrawn, 300_000);
        assert!(sink.finished);
        assert_eq!(sink.got.len(), 4_000);
        assert!(
            sink.got
                .iter()
                .all(|(_, d)| d.iter().all(|&b| b == MostlyWithdrawn::BYTE))
        );
        let names: Vec<&str> = report.receivers.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["hostile", "honest"]);
        match &report.receivers[0].status {
            PeerStatus::Dropped { reason } => {
                assert!(reason.contains(dropped_for), "dropped for {reason:?}")
            }
            other => panic!("the hostile member was not dropped: {other:?}"),
        }
        assert!(
            matches!(report.receivers[1].status, PeerStatus::Unicast { .. }),
            "{:?}",
            report.receivers[1].status
        );
        assert!(
            took < Duration::from_secs(15),
            "the honest receiver took {took:?}"
        );
    });
}

/// A chain member that freezes (its connections held open) before, during
/// or after its link's handshake, or mid-stream, holds up only the
/// receivers after it: the receiver before it gives it up once it took
/// nothing for that receiver's relay wait (what the sender named, 1.5 s
/// here) and takes every page from the chain; the receiver after it gives
/// its own link up within half its silence limit and takes the rest by
/// unicast; the sender drops the frozen member at its silence limit, and
/// ends then. Before, the sender ended only once the unicast repair it had
/// begun to the frozen member failed at the write limit (10 s), and the
/// receiver before it wrote each page to it before taking the
/// page itself, so it starved (for the 10 s write limit, or the 5 s of a
/// handshake), gave its link up, and took its pages by unicast too.
#[test]
fn a_chain_member_frozen_at_any_phase_holds_up_only_those_after_it() {
    for at in [
        Stuck::BeforeItsHandshake,
        Stuck::DuringItsHandshake,
        Stuck::AfterItsHandshake,
        Stuck::MidStream,
    ] {
        stuck_in_the_chain(at);
    }
}

/// A chain member that takes its pages a frame every 20 ms (about
/// 200 KiB/s) and passes them on holds up only the receivers after it
/// (the tail, which the sender moves to unicast once the receiver before
/// the member says it gave the member up; before that report, it waited
/// until half a silence limit after the feed): the receiver before it
/// gives it up once its relay's
/// write took nothing for the relay wait (the kernel wakes a write
/// blocked on a full socket only once about a third of the send buffer
/// has drained, megabytes here), and takes every page from the chain.
/// Before, the receiver before it failed (`silent for 2s`): its link
/// wrote each page to the member before taking it, and heard nothing while
/// that write waited.
#[test]
fn a_chain_member_that_takes_pages_slowly_holds_up_only_those_after_it() {
    stuck_in_the_chain(Stuck::Trickling);
}

/// A chain of head, a member stuck `at`, and tail: the head takes every
/// page from the chain, the tail is verified by unicast.
fn stuck_in_the_chain(at: Stuck) {
    let [head, frozen, tail] =
        ["head", "frozen", "tail"].map(|n| cluster().issue(n, Role::Host, 1).unwrap());
    // Enough pages (48 MB) to fill every buffer between the head and the
    // frozen member many times over.
    let src = Source::new(12_000);
    let all: Vec<u32> = (0..12_000).collect();
    {
        let (control, group) = endpoints();
        let mut cfg = SenderConfig::new(control, LO, 3);
        cfg.transport = TransportChoice::Chain;
        cfg.silent_after = Duration::from_secs(3);
        // Slots in this order: the chain runs head, frozen, tail.
        cfg.expected = ["head", "frozen", "tail"].map(String::from).to_vec();
        let stop = Mutex::new(false);
        std::thread::scope(|s| {
            let sender = s.spawn(|| send(&cfg, Groups::Single(group), &src, &tls(), &|_, _| {}));
            std::thread::sleep(Duration::from_millis(50));
            let f = s.spawn(|| stuck_chain_member(control, &frozen, at, &stop));
            let t0 = std::time::Instant::now();
            let real: Vec<_> = [("head", &head), ("tail", &tail)]
                .into_iter()
                .map(|(name, tls)| {
                    s.spawn(move || {
                        let mut rc = ReceiverConfig::new(control, LO, name);
                        rc.silent_after = Duration::from_secs(2);
                        let mut sink = Sink::default();
                        let r = receive(&rc, tls, &mut sink, &|_, _| {});
                        (r, sink, t0.elapsed())
                    })
                })
                .collect();
            let mut real = real.into_iter().map(|h| h.join().unwrap());
            let (head_r, head_sink, head_took) = real.next().unwrap();
            let (tail_r, tail_sink, tail_took) = real.next().unwrap();
            let report = sender.join().unwrap();
            let sender_took = t0.elapsed();
            *stop.lock().unwrap() = true;
            f.join().unwrap();
            let head_r = head_r.unwrap_or_else(|e| panic!("{at:?}: the head failed: {e}"));
            let tail_r = tail_r.unwrap_or_else(|e| panic!("{at:?}: the tail failed: {e}"));
            let report = report.unwrap();
            eprintln!(
                "{at:?}: head in {head_took:?} ({} by unicast, {:?}); tail in {tail_took:?} \
                 ({} by unicast); sender in {sender_took:?}",
                head_r.pages_unicast, head_r.chain_broken, tail_r.pages_unicast
            );
            assert_eq!(report.transport, Transport::Chain);
            check_sink(&head_sink, &src, &all);
            check_sink(&tail_sink, &src, &all);
            let by_name = |n: &str| report.receivers.iter().find(|r| r.name == n).unwrap();
            // The head took every page from the chain and gave the frozen
            // member up itself.
            assert_eq!(head_r.pages_unicast, 0, "{at:?}: {head_r:?}");
            assert_eq!(by_name("head").status, PeerStatus::Complete, "{at:?}");
            assert!(
                head_r
                    .chain_broken
                    .as_deref()
                    .is_some_and(|b| b.contains("the next receiver")),
                "{at:?}: {:?}",
                head_r.chain_broken
            );
            assert!(tail_r.pages_unicast > 0, "{at:?}: {tail_r:?}");
            assert!(
                matches!(&by_name("tail").status, PeerStatus::Unicast { .. }),
                "{at:?}: {:?}",
                by_name("tail").status
            );
            // A trickled tail keeps taking the sender's pages: only the
            // head's word moves it early.
            if at == Stuck::Trickling {
                assert!(
                    matches!(&by_name("tail").status, PeerStatus::Unicast { reason }
                        if reason.contains("gave up passing pages to the next receiver")),
                    "{:?}",
                    by_name("tail").status
                );
            }
            assert!(
                matches!(&by_name("frozen").status, PeerStatus::Dropped { .. }),
                "{at:?}: {:?}",
                by_name("frozen").status
            );
            // Dropped at its silence limit (3 s), the frozen member holds
            // the sender no longer: a repair sent to it is cut off then,
            // not at its write limit.
            assert!(
                at == Stuck::Trickling || sender_took < pagecast_channel::WRITE_TIMEOUT,
                "{at:?}: the sender ended after {sender_took:?}"
            );
        });
    }
}
