//! `pagecast cast send | recv` as operators run them: separate processes,
//! over loopback multicast and (as root) across network namespaces with
//! rate limits and random loss.

use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use pagecast_testkit::{Need, needs};
use pagecast_tests::{Child, pagecast, repo_root};

/// A distinct control port and group per test (tests run in parallel).
fn ports() -> (u16, String) {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // Below the kernel's ephemeral range (32768 and up), where another
    // test's outgoing connection can take a port first.
    let base = 8_000 + (std::process::id() % 500) as u16 * 8 + n * 2;
    (
        base,
        format!(
            "239.72.{}.{}:{}",
            n,
            1 + (std::process::id() % 200),
            base + 4000
        ),
    )
}

fn setup(dir: &Path, memory: &str) {
    let out = pagecast(&[
        "synth",
        "--out",
        dir.to_str().unwrap(),
        "--family",
        "web",
        "--vms",
        "1",
        "--memory",
        memory,
    ]);
    assert!(out.status.success());
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}); stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

struct Session<'a> {
    dir: &'a Path,
    control: String,
    group: String,
    iface: &'a str,
}

impl<'a> Session<'a> {
    /// A session on loopback, its ports and group this test's own.
    fn loopback(dir: &'a Path) -> Self {
        let (port, group) = ports();
        Session {
            dir,
            control: format!("127.0.0.1:{port}"),
            group,
            iface: "127.0.0.1",
        }
    }

    fn sender(&self, prefix: &[&str], receivers: usize, extra: &[&str]) -> Child {
        let tls = pagecast_tests::pki::node("cast-sender", pagecast_channel::Role::Host);
        let mut args = vec![
            "cast",
            "send",
            "--group",
            &self.group,
            "--iface",
            self.iface,
            "--control",
            &self.control,
            "--tls",
            tls.to_str().unwrap(),
            "--json",
            "--accept-timeout",
            "30",
        ];
        let n = receivers.to_string();
        args.extend(["--receivers", &n]);
        args.extend(extra);
        let image = self.dir.join("web-0.raw");
        args.push(image.to_str().unwrap());
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut c = Child::pagecast(prefix, &refs);
        // Receivers connect once: start them only once the sender listens
        // (it hashes its image first). Seen from the sender's own network
        // namespace, without a probe connection it would take for one.
        let control: std::net::SocketAddrV4 = self.control.parse().unwrap();
        let t = std::time::Instant::now();
        while !pagecast_tests::listening(&c.0.id().to_string(), control) {
            if c.0.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the sender does not listen on {control} after 30 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        c
    }

    fn receiver(&self, prefix: &[&str], iface: &str, out: &str) -> Child {
        let out = self.dir.join(out);
        let name = out.file_name().unwrap().to_str().unwrap();
        let tls = pagecast_tests::pki::node(name, pagecast_channel::Role::Host);
        Child::pagecast(
            prefix,
            &[
                "cast",
                "recv",
                "--control",
                &self.control,
                "--iface",
                iface,
                "--out",
                out.to_str().unwrap(),
                "--tls",
                tls.to_str().unwrap(),
                "--json",
                "--name",
                out.file_name().unwrap().to_str().unwrap(),
            ],
        )
    }
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[test]
fn loopback_multicast_to_four_receivers_is_byte_identical() {
    if !needs(
        "loopback_multicast_to_four_receivers_is_byte_identical",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), "32MiB");
    let s = Session::loopback(dir.path());
    let sender = s.sender(&[], 4, &[]);
    std::thread::sleep(Duration::from_millis(300));
    let rs: Vec<Child> = (0..4)
        .map(|i| s.receiver(&[], "127.0.0.1", &format!("copy{i}.raw")))
        .collect();
    let outs: Vec<_> = rs
        .into_iter()
        .map(|r| r.wait(Duration::from_secs(60)))
        .collect();
    let sent = sender.wait(Duration::from_secs(60));
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let report = json(&sent);
    assert_eq!(report["transport"], "multicast");
    for (i, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "receiver {i}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            same(
                &dir.path().join("web-0.raw"),
                &dir.path().join(format!("copy{i}.raw"))
            ),
            "copy {i} differs"
        );
    }
    for r in report["receivers"].as_array().unwrap() {
        assert_eq!(r["status"], "complete");
        assert!(r["goodput_bps"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn a_killed_receiver_is_reported_and_the_others_complete() {
    if !needs(
        "a_killed_receiver_is_reported_and_the_others_complete",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), "64MiB");
    let s = Session::loopback(dir.path());
    // Paced so the session lasts a few seconds.
    let sender = s.sender(&[], 3, &["--rate", "100M", "--transport", "multicast"]);
    std::thread::sleep(Duration::from_millis(300));
    let mut rs: Vec<Child> = (0..3)
        .map(|i| s.receiver(&[], "127.0.0.1", &format!("copy{i}.raw")))
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    rs[1].kill();
    let outs: Vec<_> = rs
        .into_iter()
        .map(|r| r.wait(Duration::from_secs(60)))
        .collect();
    let sent = sender.wait(Duration::from_secs(60));
    assert_eq!(
        sent.status.code(),
        Some(1),
        "not every receiver completed, so the sender fails"
    );
    let report = json(&sent);
    let statuses: Vec<&str> = report["receivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == "dropped").count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == "complete").count(),
        2,
        "{statuses:?}"
    );
    for i in [0, 2] {
        assert!(outs[i].status.success());
        assert!(same(
            &dir.path().join("web-0.raw"),
            &dir.path().join(format!("copy{i}.raw"))
        ));
    }
    assert!(
        !dir.path().join("copy1.raw").exists(),
        "the killed receiver wrote nothing in place"
    );
}

/// A receiver that hangs (SIGSTOP: its connection stays open) is a failed
/// one: the sender drops it within seconds and returns, and the healthy
/// receivers keep their verified copies.
#[test]
fn a_frozen_receiver_is_dropped_and_the_others_keep_their_copies() {
    if !needs(
        "a_frozen_receiver_is_dropped_and_the_others_keep_their_copies",
        &[Need::LoopbackMulticast],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), "64MiB");
    let s = Session::loopback(dir.path());
    let sender = s.sender(&[], 3, &["--rate", "100M", "--transport", "multicast"]);
    std::thread::sleep(Duration::from_millis(300));
    let rs: Vec<Child> = (0..3)
        .map(|i| s.receiver(&[], "127.0.0.1", &format!("copy{i}.raw")))
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(rs[1].0.id() as libc::pid_t, libc::SIGSTOP);
    }
    let t = std::time::Instant::now();
    let sent = sender.wait(Duration::from_secs(60));
    let took = t.elapsed();
    let mut rs = rs.into_iter();
    let out0 = rs.next().unwrap().wait(Duration::from_secs(30));
    let frozen = rs.next().unwrap();
    let out2 = rs.next().unwrap().wait(Duration::from_secs(30));
    drop(frozen);
    let outs = [out0, out2];
    eprintln!("the sender returned {took:?} after the freeze");
    assert!(
        took < Duration::from_secs(40),
        "the sender returned after {took:?}"
    );
    let report = json(&sent);
    let statuses: Vec<&str> = report["receivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == "dropped").count(),
        1,
        "{statuses:?}"
    );
    for (k, i) in [0, 2].into_iter().enumerate() {
        assert!(
            outs[k].status.success(),
            "receiver {i}: {}",
            String::from_utf8_lossy(&outs[k].stderr)
        );
        assert!(same(
            &dir.path().join("web-0.raw"),
            &dir.path().join(format!("copy{i}.raw"))
        ));
    }
}

/// Bytes process `pid` has written so far (`wchar` of /proc/PID/io: its
/// output file and its sockets).
fn written(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/io: {e}"));
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no wchar in /proc/{pid}/io: {io}"))
}

/// A receiver in the middle of a chain frozen (SIGSTOP) mid-stream, the
/// receivers and sender real processes: the receiver before it gives it
/// up after its relay wait and takes every page from the chain, the one
/// after it is sent the rest by unicast, the sender drops the frozen one,
/// and both others end with the image. Before, the receiver before it
/// starved behind its write to the frozen one and failed (`silent for
/// 2s` in the loopback test of the same case).
#[test]
fn a_chain_receiver_frozen_mid_stream_holds_up_only_those_after_it() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), "128MiB");
    let s = Session::loopback(dir.path());
    let names = ["copy0.raw", "copy1.raw", "copy2.raw"];
    let expect = names.join(",");
    let sender = s.sender(&[], 3, &["--transport", "chain", "--expect", &expect]);
    std::thread::sleep(Duration::from_millis(300));
    let rs: Vec<Child> = names
        .iter()
        .map(|n| s.receiver(&[], "127.0.0.1", n))
        .collect();
    // Mid-stream: once the middle receiver has written 8 MiB (pages into
    // its file and on to the last receiver) of the image's 128.
    let middle = rs[1].0.id();
    let t = std::time::Instant::now();
    while written(middle) < 8 << 20 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the middle receiver wrote {} bytes in 60 s",
            written(middle)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(middle as libc::pid_t, libc::SIGSTOP);
    }
    let at = written(middle);
    // Its file and its relay to the last receiver: under 2 x 128 MiB
    // once the stream is done; well under it is mid-stream.
    assert!(at < 128 << 20, "frozen only after it wrote {at} bytes");
    let sent = sender.wait(Duration::from_secs(60));
    let mut rs = rs.into_iter();
    let out0 = rs.next().unwrap().wait(Duration::from_secs(30));
    let frozen = rs.next().unwrap();
    let out2 = rs.next().unwrap().wait(Duration::from_secs(30));
    drop(frozen);
    eprintln!("frozen after it wrote {at} bytes");
    let report = json(&sent);
    let status = |n: &str| {
        report["receivers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == n)
            .map(|r| r["status"].as_str().unwrap().to_owned())
            .unwrap()
    };
    assert_eq!(report["transport"], "chain", "{report}");
    assert_eq!(status("copy0.raw"), "complete", "{report}");
    assert_eq!(status("copy1.raw"), "dropped", "{report}");
    assert_eq!(status("copy2.raw"), "unicast", "{report}");
    for (i, out) in [(0, &out0), (2, &out2)] {
        assert!(
            out.status.success(),
            "receiver {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(same(
            &dir.path().join("web-0.raw"),
            &dir.path().join(format!("copy{i}.raw"))
        ));
    }
    let head = json(&out0);
    assert_eq!(head["pages_unicast"], 0, "{head}");
    assert!(
        head["chain_broken"]
            .as_str()
            .is_some_and(|b| b.contains("the next receiver took nothing")),
        "{head}"
    );
}

#[test]
fn the_chain_delivers_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), "16MiB");
    let s = Session::loopback(dir.path());
    let sender = s.sender(&[], 3, &["--transport", "chain"]);
    std::thread::sleep(Duration::from_millis(300));
    let rs: Vec<Child> = (0..3)
        .map(|i| s.receiver(&[], "127.0.0.1", &format!("copy{i}.raw")))
        .collect();
    let outs: Vec<_> = rs
        .into_iter()
        .map(|r| r.wait(Duration::from_secs(60)))
        .collect();
    let sent = sender.wait(Duration::from_secs(60));
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert_eq!(json(&sent)["transport"], "chain");
    for (i, o) in outs.iter().enumerate() {
        assert!(o.status.success());
        assert_eq!(json(o)["transport"], "chain");
        assert!(same(
            &dir.path().join("web-0.raw"),
            &dir.path().join(format!("copy{i}.raw"))
        ));
    }
}

/// Brings a namespace topology up and down (as root).
struct Topology(String);

impl Topology {
    /// Builds the topology (the caller checked that namespaces, shaping
    /// and nftables are there); one that does not come up fails the test.
    fn up(prefix: &str, hosts: usize, args: &[&str]) -> Topology {
        let script = repo_root().join("scripts/netns.sh");
        let mut cmd = std::process::Command::new(&script);
        cmd.args(["up", &hosts.to_string(), "--prefix", prefix])
            .args(args);
        let out = cmd.output().expect("running scripts/netns.sh");
        assert!(
            out.status.success(),
            "the namespace topology did not come up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Topology(prefix.to_owned())
    }

    fn loss(&self, pct: u32) {
        let script = repo_root().join("scripts/netns.sh");
        let out = std::process::Command::new(script)
            .args(["loss", &pct.to_string(), "--prefix", &self.0])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let script = repo_root().join("scripts/netns.sh");
        let _ = std::process::Command::new(script)
            .args(["down", "--prefix", &self.0])
            .output();
    }
}

/// One sender (host 0) and three receivers across namespaces; returns the
/// sender's report after checking every copy.
fn namespace_session(prefix: &str, dir: &Path, tag: &str) -> serde_json::Value {
    let s = Session {
        dir,
        control: "10.77.0.1:7100".into(),
        group: "239.77.0.1:7000".into(),
        iface: "10.77.0.1",
    };
    let h0 = format!("{prefix}-h0");
    let sender = s.sender(
        &["ip", "netns", "exec", &h0],
        3,
        &["--transport", "multicast"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let rs: Vec<Child> = (1..4)
        .map(|i| {
            let ns = format!("{prefix}-h{i}");
            s.receiver(
                &["ip", "netns", "exec", &ns],
                &format!("10.77.0.{}", i + 1),
                &format!("{tag}-{i}.raw"),
            )
        })
        .collect();
    let outs: Vec<_> = rs
        .into_iter()
        .map(|r| r.wait(Duration::from_secs(120)))
        .collect();
    let sent = sender.wait(Duration::from_secs(120));
    assert!(
        sent.status.success(),
        "{tag}: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    for (i, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "{tag} receiver {i}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            same(
                &dir.join("web-0.raw"),
                &dir.join(format!("{tag}-{}.raw", i + 1))
            ),
            "{tag}: copy {i} differs"
        );
    }
    json(&sent)
}

#[test]
fn across_namespaces_with_loss_every_copy_is_byte_identical() {
    if !needs(
        "across_namespaces_with_loss_every_copy_is_byte_identical",
        &[
            Need::Root,
            Need::Namespaces,
            Need::TrafficShaping,
            Need::Nftables,
        ],
    ) {
        return;
    }
    let prefix = format!("pct{}", std::process::id() % 10_000);
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), "32MiB");
    {
        let topo = Topology::up(&prefix, 4, &["--mtu", "9000", "--rate", "800mbit"]);
        for loss in [1, 5] {
            topo.loss(loss);
            let report = namespace_session(&prefix, dir.path(), &format!("loss{loss}"));
            assert_eq!(report["fragments"], 1);
            assert!(
                report["repairs"].as_u64().unwrap() > 0,
                "at {loss}% loss something was repaired"
            );
            assert!(report["nacks"].as_u64().unwrap() > 0);
            if loss == 5 {
                assert!(
                    report["coded_repairs"].as_u64().unwrap() > 0,
                    "receivers losing different pages share XOR repairs"
                );
            }
        }
    }
    // A 1500-byte MTU: pages travel as three fragments each.
    let topo = Topology::up(&prefix, 4, &["--mtu", "1500", "--rate", "800mbit"]);
    topo.loss(1);
    let report = namespace_session(&prefix, dir.path(), "mtu1500");
    assert_eq!(report["fragments"], 3);
    assert!(report["repairs"].as_u64().unwrap() > 0);
}

/// How long a TCP cast (the chain) of `small` from host 0 to host 1 takes
/// while a multicast cast of `big` from host 0 to host 1 runs at the rate
/// of host 1's shaped link (`extra`: the multicast sender's own options),
/// and how often the cast cut its rate. Both copies are checked.
fn chain_beside_a_cast(prefix: &str, big: &Path, small: &Path, extra: &[&str]) -> (f64, u64) {
    let (c1, g1) = ports();
    let (c2, g2) = ports();
    let cast = Session {
        dir: big,
        control: format!("10.77.0.1:{c1}"),
        group: g1,
        iface: "10.77.0.1",
    };
    let chain = Session {
        dir: small,
        control: format!("10.77.0.1:{c2}"),
        group: g2,
        iface: "10.77.0.1",
    };
    let h = |i: usize| format!("{prefix}-h{i}");
    let (h0, h1) = (h(0), h(1));
    let mut args = vec!["--transport", "multicast", "--rate", "400M"];
    args.extend(extra);
    let sender = cast.sender(&["ip", "netns", "exec", &h0], 1, &args);
    std::thread::sleep(Duration::from_millis(300));
    let receiver = cast.receiver(&["ip", "netns", "exec", &h1], "10.77.0.2", "cast.raw");
    // The chain starts once the cast is well under way.
    std::thread::sleep(Duration::from_millis(600));
    let tcp = chain.sender(&["ip", "netns", "exec", &h0], 1, &["--transport", "chain"]);
    std::thread::sleep(Duration::from_millis(300));
    let tcp_in = chain.receiver(&["ip", "netns", "exec", &h1], "10.77.0.2", "chain.raw");
    let tcp_in = tcp_in.wait(Duration::from_secs(120));
    let tcp = tcp.wait(Duration::from_secs(120));
    let received = receiver.wait(Duration::from_secs(120));
    let sent = sender.wait(Duration::from_secs(120));
    for (what, o) in [
        ("chain sender", &tcp),
        ("chain receiver", &tcp_in),
        ("cast sender", &sent),
        ("cast receiver", &received),
    ] {
        assert!(
            o.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert!(same(&big.join("web-0.raw"), &big.join("cast.raw")));
    assert!(same(&small.join("web-0.raw"), &small.join("chain.raw")));
    let rep = json(&sent);
    (
        json(&tcp)["duration_s"].as_f64().unwrap(),
        rep["rate_cuts"].as_u64().unwrap(),
    )
}

/// A cast paced at its link's whole rate shares the link when TCP crosses
/// it too: losing datagrams, it cuts its rate, and the TCP transfer beside
/// it takes a fraction of the time it takes beside a cast that holds its
/// rate (measured in the same run), which starves it.
#[test]
fn across_namespaces_casts_share_a_full_link_with_tcp_and_with_each_other() {
    if !needs(
        "across_namespaces_casts_share_a_full_link_with_tcp_and_with_each_other",
        &[Need::Root, Need::Namespaces, Need::TrafficShaping],
    ) {
        return;
    }
    let prefix = format!("pcs{}", std::process::id() % 10_000);
    let big = tempfile::tempdir().unwrap();
    let small = tempfile::tempdir().unwrap();
    let mid = tempfile::tempdir().unwrap();
    setup(big.path(), "160MiB");
    setup(small.path(), "16MiB");
    setup(mid.path(), "64MiB");
    // Host 1's link is the bottleneck, in the network (where datagrams
    // are dropped, as at a switch), not in the sender's own queue (which
    // holds a UDP sender back instead).
    let _topo = Topology::up(&prefix, 3, &["--mtu", "9000"]);
    let br = format!("{prefix}-br");
    let shaped = std::process::Command::new("ip")
        .args([
            "netns", "exec", &br, "tc", "qdisc", "add", "dev", "vh1", "root",
        ])
        .args([
            "tbf", "rate", "400mbit", "burst", "576000", "latency", "20ms",
        ])
        .status()
        .unwrap();
    assert!(shaped.success(), "shaping host 1's link");
    // Alone on the machine the sharing cast leaves TCP 0.79-0.81 s against
    // 1.9-2.5 s; beside other tests (two run at once) 1.28 s was seen, and
    // once 1.78 s against 1.91 s (the transfer bound by the two cores, not
    // the link), so a pair that misses the bound is measured once more:
    // a cast that does not share misses it in both. The repairs below are
    // the firm check.
    let mut tries = Vec::new();
    for _ in 0..2 {
        let (held, held_cuts) =
            chain_beside_a_cast(&prefix, big.path(), small.path(), &["--no-loss-control"]);
        let (shared, cuts) = chain_beside_a_cast(&prefix, big.path(), small.path(), &[]);
        println!(
            "16 MiB over TCP beside a cast at the link's rate: {held:.2} s when the cast holds its rate, {shared:.2} s when it shares ({cuts} cuts)"
        );
        assert_eq!(held_cuts, 0, "--no-loss-control cut the rate");
        assert!(cuts > 0, "the cast never cut its rate");
        tries.push((shared, held));
        if shared < 0.85 * held {
            break;
        }
    }
    assert!(
        tries.iter().any(|&(shared, held)| shared < 0.85 * held),
        "TCP beside a sharing cast, then beside one that holds its rate (s): {tries:.2?}"
    );

    // Two casts from two hosts (two jobs' sources) into host 1 at once,
    // each at the whole link's rate: holding their rates, they drown each
    // other in repairs; sharing, they repair a fraction of that, and
    // finish together.
    let (held_repairs, _) = two_casts(&prefix, mid.path(), &["--no-loss-control"]);
    let (repairs, times) = two_casts(&prefix, mid.path(), &[]);
    println!(
        "two casts into one link: {held_repairs} repair bytes holding their rates, {repairs} sharing; {:.2} s and {:.2} s",
        times[0], times[1]
    );
    assert!(
        (repairs as f64) < 0.3 * held_repairs as f64,
        "sharing casts repaired {repairs} bytes, casts holding their rates {held_repairs}"
    );
    let (a, b) = (times[0], times[1]);
    assert!(
        a.max(b) < 1.8 * a.min(b),
        "one cast took {a:.2} s, the other {b:.2} s"
    );
}

/// Casts of `image` from hosts 0 and 2 to host 1 at once, each at 400
/// Mbit/s (`extra`: the senders' own options): the repair bytes they sent
/// together, and each one's duration. Both copies are checked.
fn two_casts(prefix: &str, image: &Path, extra: &[&str]) -> (u64, Vec<f64>) {
    let mut args = vec!["--transport", "multicast", "--rate", "400M"];
    args.extend(extra);
    let mut runs = Vec::new();
    for (k, host) in [(0, 1), (1, 3)] {
        let (c, g) = ports();
        let s = Session {
            dir: image,
            control: format!("10.77.0.{host}:{c}"),
            group: g,
            iface: if host == 1 { "10.77.0.1" } else { "10.77.0.3" },
        };
        let ns = format!("{prefix}-h{}", host - 1);
        runs.push((k, s, ns));
    }
    let senders: Vec<Child> = runs
        .iter()
        .map(|(_, s, ns)| s.sender(&["ip", "netns", "exec", ns], 1, &args))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let h1 = format!("{prefix}-h1");
    let receivers: Vec<Child> = runs
        .iter()
        .map(|(k, s, _)| {
            s.receiver(
                &["ip", "netns", "exec", &h1],
                "10.77.0.2",
                &format!("two{k}.raw"),
            )
        })
        .collect();
    let got: Vec<_> = receivers
        .into_iter()
        .map(|r| r.wait(Duration::from_secs(120)))
        .collect();
    let sent: Vec<_> = senders
        .into_iter()
        .map(|s| s.wait(Duration::from_secs(120)))
        .collect();
    let mut repairs = 0;
    let mut times = Vec::new();
    for (k, (g, s)) in got.iter().zip(&sent).enumerate() {
        assert!(
            s.status.success(),
            "sender {k}: {}",
            String::from_utf8_lossy(&s.stderr)
        );
        assert!(
            g.status.success(),
            "receiver {k}: {}",
            String::from_utf8_lossy(&g.stderr)
        );
        assert!(same(
            &image.join("web-0.raw"),
            &image.join(format!("two{k}.raw"))
        ));
        let r = json(s);
        repairs += r["bytes_repair"].as_u64().unwrap() + r["bytes_unicast"].as_u64().unwrap();
        times.push(r["duration_s"].as_f64().unwrap());
    }
    (repairs, times)
}
