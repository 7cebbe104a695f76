//! What an eavesdropper on the LAN sees: a raw packet socket on the
//! loopback interface (`pagecast_tests::capture`) captures traffic whose
//! pages all hold a marker string.
//!
//! - A cast: encrypted (always, in every build), the marker appears in no
//!   captured byte; sent in the clear (a debug-build-only switch), the same
//!   capture finds it, which shows the test can fail. Each half runs in a
//!   child process, since the switch is read once per process.
//! - Migration-sized frames of marked pages through a TLS channel leave no
//!   marker, while the same frames on plain TCP (the control) do.
//! - A live migration between two agent processes of a KVM micro-VM whose
//!   memory holds the marker: none in the capture of the destination's
//!   port. (Agents have no cleartext switch; the control above is the same
//!   channel in the clear.)
//!
//! Needs root with a packet socket (`pagecast_testkit`).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pagecast_channel::Role;
use pagecast_channel::ca::Authority;
use pagecast_multicast::*;
use pagecast_pages::{PAGE_SIZE, Page, PageHash};
use pagecast_testkit::{Need, needs};
use pagecast_tests::capture::{Capture, capture_tcp};

const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;
const MARKER: &[u8] = b"PAGECAST-CAPTURE-MARKER";
const PAGES: u32 = 400;

struct Marked;

fn page(i: u32) -> Box<Page> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    for (k, c) in p.chunks_mut(MARKER.len() + 4).enumerate() {
        let n = c.len().min(MARKER.len());
        c[..n].copy_from_slice(&MARKER[..n]);
        if c.len() >= MARKER.len() + 4 {
            c[MARKER.len()..].copy_from_slice(&(i ^ k as u32).to_le_bytes());
        }
    }
    p
}

impl PageSource for Marked {
    fn pages(&self) -> u32 {
        PAGES
    }
    fn entry(&self, i: u32) -> PageEntry {
        PageEntry {
            key: u64::from(i),
            hash: PageHash::of_page(&page(i)),
        }
    }
    fn read(&self, i: u32, out: &mut Page) -> std::io::Result<()> {
        out.copy_from_slice(&page(i)[..]);
        Ok(())
    }
    fn frames(&self) -> u64 {
        u64::from(PAGES)
    }
}

#[derive(Default)]
struct Sink(usize);

impl PageSink for Sink {
    fn begin(&mut self, _frames: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn get(&mut self, _key: u64, _out: &mut Page) -> std::io::Result<()> {
        Err(std::io::Error::other("not kept"))
    }
    fn put(&mut self, _e: &PageEntry, data: &Page) -> std::io::Result<()> {
        assert!(data.windows(MARKER.len()).any(|w| w == MARKER));
        self.0 += 1;
        Ok(())
    }
    fn finish(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn abort(&mut self) {}
}

/// The child's work: capture while a session sends the marked pages to
/// one receiver; prints what the capture saw.
#[test]
#[ignore = "run by the_marker_never_crosses_the_wire_in_the_clear in a child process"]
fn capture_child() {
    let port: u16 = std::env::var("CAPTURE_PORT").unwrap().parse().unwrap();
    let control = SocketAddr::from((LO, port));
    let group = SocketAddrV4::new(Ipv4Addr::new(239, 72, 0, 1), port + 2);
    let cap = Capture::open();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut datagrams, mut marked) = (0u64, 0u64); // bytes, occurrences
            let mut buf = vec![0u8; 70_000];
            while !stop.load(Ordering::Relaxed) {
                let Some(n) = cap.next(&mut buf) else {
                    continue;
                };
                let f = &buf[..n];
                // Ethernet (14 bytes on lo), IPv4, UDP to the group's port.
                if n < 14 + 20 + 8 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 17 {
                    continue;
                }
                let ihl = usize::from(f[14] & 0x0f) * 4;
                let dport = u16::from_be_bytes([f[14 + ihl + 2], f[14 + ihl + 3]]);
                if dport != group.port() {
                    continue;
                }
                // Bytes, not datagrams: with UDP segmentation offload a
                // frame on lo carries many datagrams.
                datagrams += (n - 14 - ihl - 8) as u64;
                marked += f.windows(MARKER.len()).filter(|w| *w == MARKER).count() as u64;
            }
            (datagrams, marked)
        })
    };
    let tls = Authority::generate()
        .and_then(|ca| ca.issue("host", Role::Host, 1))
        .expect("a certificate");
    let received = std::thread::scope(|s| {
        let mut cfg = SenderConfig::new(control, LO, 1);
        cfg.transport = TransportChoice::Multicast;
        let tls = &tls;
        let sender = s.spawn(move || send(&cfg, Groups::Single(group), &Marked, tls, &|_, _| {}));
        std::thread::sleep(Duration::from_millis(50));
        let mut sink = Sink::default();
        let r = receive(
            &ReceiverConfig::new(control, LO, "r0"),
            tls,
            &mut sink,
            &|_, _| {},
        );
        sender.join().unwrap().expect("the cast");
        r.expect("the receiver");
        sink.0
    });
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (datagrams, marked) = seen.join().unwrap();
    println!("CAPTURE received={received} bytes={datagrams} marked={marked}");
}

fn run_child(cleartext: bool, port: u16) -> (u64, u64, u64) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "capture::capture_child",
        "--ignored",
        "--nocapture",
    ])
    .env("CAPTURE_PORT", port.to_string());
    if cleartext {
        cmd.env("PAGECAST_INSECURE_CLEARTEXT_DATAGRAMS", "1");
    } else {
        cmd.env_remove("PAGECAST_INSECURE_CLEARTEXT_DATAGRAMS");
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("CAPTURE "))
        .unwrap_or_else(|| panic!("no CAPTURE line in {stdout}"));
    let field = |k: &str| -> u64 {
        line.split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap()
            .parse()
            .unwrap()
    };
    (field("received"), field("bytes"), field("marked"))
}

#[test]
fn the_marker_never_crosses_the_wire_in_the_clear() {
    if !needs(
        "the_marker_never_crosses_the_wire_in_the_clear",
        &[Need::PacketCapture, Need::LoopbackMulticast],
    ) {
        return;
    }
    let port = 21_000 + (std::process::id() % 1000) as u16 * 8;
    let (received, bytes, marked) = run_child(false, port);
    assert_eq!(received, u64::from(PAGES), "every page arrived");
    assert!(
        bytes >= u64::from(PAGES) * PAGE_SIZE as u64,
        "the capture saw only {bytes} bytes of the session"
    );
    assert_eq!(
        marked, 0,
        "the marker appears {marked} times in the capture"
    );
    if cfg!(debug_assertions) {
        // The same session in the clear: the capture finds the marker.
        let (received, bytes, marked) = run_child(true, port + 4);
        assert_eq!(received, u64::from(PAGES));
        assert!(
            marked >= u64::from(PAGES),
            "in the clear, the marker appears only {marked} times in {bytes} bytes"
        );
    } else {
        eprintln!("release build: the cleartext switch does not exist, half of the test skipped");
    }
}

/// Sends the marked pages as migration-sized frames over `port`, through
/// TLS or (the control) the same framing on plain TCP.
fn stream_pages(port: u16, tls: bool) {
    use pagecast_channel::{Channel, FrameDecoder, frame};
    use std::io::Write;
    let ca = Authority::generate().unwrap();
    let (a, b) = (
        ca.issue("src", Role::Host, 1).unwrap(),
        ca.issue("dst", Role::Host, 1).unwrap(),
    );
    let l = std::net::TcpListener::bind((LO, port)).unwrap();
    let rx = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut got = 0usize;
        if tls {
            let mut ch = Channel::server(s, &b).unwrap();
            for _ in 0..PAGES {
                let m: pagecast_proto::v1::RaftChunk = ch.recv("page").unwrap();
                got += m.data.len();
            }
        } else {
            let mut s = s;
            for _ in 0..PAGES {
                got += FrameDecoder.next(&mut s, "plain").unwrap().len();
            }
        }
        got
    });
    let s = std::net::TcpStream::connect((LO, port)).unwrap();
    let msg = |i: u32| pagecast_proto::v1::RaftChunk {
        shard: i,
        data: page(i).to_vec().into(),
        more: false,
    };
    if tls {
        let mut ch = Channel::client(s, &a).unwrap();
        for i in 0..PAGES {
            ch.send(&msg(i)).unwrap();
        }
    } else {
        let mut s = s;
        for i in 0..PAGES {
            s.write_all(&frame(&msg(i))).unwrap();
        }
    }
    assert!(rx.join().unwrap() >= PAGES as usize * PAGE_SIZE);
}

#[test]
fn the_marker_never_crosses_a_tls_channel_in_the_clear() {
    if !needs(
        "the_marker_never_crosses_a_tls_channel_in_the_clear",
        &[Need::PacketCapture],
    ) {
        return;
    }
    let port = 29_000 + (std::process::id() % 500) as u16 * 2;
    // The control: the same frames on plain TCP show in the capture.
    let (plain_bytes, plain_marked) = capture_tcp(port, MARKER, || stream_pages(port, false));
    assert!(
        plain_bytes >= u64::from(PAGES) * PAGE_SIZE as u64,
        "{plain_bytes}"
    );
    assert!(
        plain_marked >= u64::from(PAGES) * 100,
        "plain TCP: {plain_marked} markers"
    );
    // Through TLS: as many bytes, no marker.
    let (bytes, marked) = capture_tcp(port + 1, MARKER, || stream_pages(port + 1, true));
    assert!(bytes >= u64::from(PAGES) * PAGE_SIZE as u64, "{bytes}");
    assert_eq!(marked, 0, "TLS: {marked} markers in {bytes} bytes");
    println!(
        "TLS channel: {bytes} bytes captured, no marker; plain TCP: {plain_bytes} bytes, \
         {plain_marked} markers"
    );
}

#[test]
fn a_live_migration_between_agents_shows_no_marker() {
    use pagecast_tests::cluster::{AgentProc, cli_json};
    if !needs(
        "a_live_migration_between_agents_shows_no_marker",
        &[Need::PacketCapture, Need::Kvm],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 16 MiB of memory: frames from 64 up each hold the marker (and their
    // number, so every page is distinct and travels).
    let frames = 4096u32;
    let mut image = vec![0u8; frames as usize * PAGE_SIZE];
    for f in 64..frames {
        image[f as usize * PAGE_SIZE..(f as usize + 1) * PAGE_SIZE].copy_from_slice(&page(f)[..]);
    }
    let path = dir.path().join("marked.raw");
    std::fs::write(&path, &image).unwrap();
    let h1 = AgentProc::start(dir.path(), "h1", &[]);
    let h2 = AgentProc::start(dir.path(), "h2", &[]);
    let started = cli_json(
        dir.path(),
        &[
            "vm",
            "start",
            "--agent",
            &h1.addr,
            "--name",
            "marked",
            "--image",
            path.to_str().unwrap(),
            "--dirty-rate",
            "200",
            "--json",
        ],
    );
    assert_eq!(started["name"], "marked", "{started}");
    let port: u16 = h2.addr.rsplit(':').next().unwrap().parse().unwrap();
    let mut report = serde_json::Value::Null;
    let (bytes, marked) = capture_tcp(port, MARKER, || {
        report = cli_json(
            dir.path(),
            &[
                "migrate", "--vm", "marked", "--from", &h1.addr, "--to", &h2.addr, "--json",
            ],
        );
    });
    assert_eq!(report["ok"], true, "{report}");
    let sent = report["pages_sent"].as_u64().unwrap();
    assert!(sent >= u64::from(frames - 64), "{report}");
    assert!(
        bytes >= sent * PAGE_SIZE as u64,
        "the capture saw {bytes} bytes of {sent} pages"
    );
    assert_eq!(marked, 0, "{marked} markers in {bytes} captured bytes");
    println!("agent migration: {sent} pages, {bytes} bytes captured, no marker");
}
