//! What an eavesdropper on the LAN sees: a raw packet socket on the
//! loopback interface (`pagecast_tests::capture`) captures traffic whose
//! pages all hold a marker string.
//!
//! - A cast: encrypted (always, in every build), the marker appears in no
//!   captured byte; sent in the clear (a debug-build-only switch), the same
//!   capture finds it, which shows the test can fail. Each half runs in a
//!   child process (`pagecast-capture-child`), since the switch is read
//!   once per process.
//! - Migration-sized frames of marked pages through a TLS channel leave no
//!   marker, while the same frames on plain TCP (the control) do.
//! - A live migration between two agent processes of a KVM micro-VM whose
//!   memory holds the marker: none in the capture of the destination's
//!   port. (Agents have no cleartext switch; the control above is the same
//!   channel in the clear.)
//!
//! Needs root with a packet socket (`pagecast_testkit`).

use std::net::Ipv4Addr;
use std::process::Command;

use pagecast_channel::Role;
use pagecast_channel::ca::Authority;
use pagecast_pages::PAGE_SIZE;
use pagecast_testkit::{Need, needs};
use pagecast_tests::capture::{MARKER, PAGES, capture_tcp, page};

const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;

fn run_child(cleartext: bool, port: u16) -> (u64, u64, u64) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pagecast-capture-child"));
    cmd.env("CAPTURE_PORT", port.to_string());
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
