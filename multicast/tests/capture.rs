//! What an eavesdropper on the LAN sees of a cast: a raw packet socket on
//! the loopback interface captures every datagram of a session whose pages
//! all hold a marker string. Encrypted (always, in every build), the marker
//! appears in no captured byte; sent in the clear (a debug-build-only
//! switch), the same capture finds it, which shows the test can fail.
//!
//! The same for the TCP side: migration-sized frames of marked pages
//! through a TLS channel leave no marker in the capture, while the same
//! frames on plain TCP (the control) do.
//!
//! Needs root (a packet socket); says so and skips otherwise. Each half of
//! the cast test runs in a child process, since the switch is read once per
//! process.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pagecast_channel::Role;
use pagecast_channel::ca::Authority;
use pagecast_multicast::*;
use pagecast_pages::{PAGE_SIZE, Page, PageHash};

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

/// A raw packet socket on `lo` that sees every frame sent on it.
struct Capture(libc::c_int);

impl Capture {
    fn open() -> Capture {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the descriptor is owned by the result.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto)) };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a zeroed sockaddr_ll filled for `lo`, passed with its size.
        unsafe {
            let mut sa: libc::sockaddr_ll = std::mem::zeroed();
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_protocol = proto;
            sa.sll_ifindex = libc::if_nametoindex(c"lo".as_ptr()) as i32;
            let r = libc::bind(
                fd,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind to lo: {}", std::io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        set_option(fd, libc::SO_RCVTIMEO, &tv);
        // A large buffer: the capture must not drop frames.
        let size: libc::c_int = 64 << 20;
        set_option(fd, libc::SO_RCVBUFFORCE, &size);
        Capture(fd)
    }

    /// One frame, or `None` after the timeout.
    fn next(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: reads at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        (n > 0).then_some(n as usize)
    }
}

/// Sets a `SOL_SOCKET` option of `fd` to `value`.
fn set_option<T>(fd: libc::c_int, option: libc::c_int, value: &T) {
    // SAFETY: `value` is a live `T` and its size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as u32,
        )
    };
    assert_eq!(
        r,
        0,
        "setsockopt {option}: {}",
        std::io::Error::last_os_error()
    );
}

impl Drop for Capture {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe {
            libc::close(self.0);
        }
    }
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
    cmd.args(["--exact", "capture_child", "--ignored", "--nocapture"])
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

/// Whether this process may open a packet socket; says why not and
/// returns false otherwise (the capture tests then skip).
fn can_capture() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: capturing packets needs root");
        return false;
    }
    // Root without CAP_NET_RAW (some containers): say so and skip.
    // SAFETY: plain socket(2), closed at once.
    let probe = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            libc::c_int::from((libc::ETH_P_ALL as u16).to_be()),
        )
    };
    if probe < 0 {
        eprintln!(
            "skipped: no packet socket here ({})",
            std::io::Error::last_os_error()
        );
        return false;
    }
    // SAFETY: the descriptor opened above, closed once.
    unsafe {
        libc::close(probe);
    }
    true
}

#[test]
fn the_marker_never_crosses_the_wire_in_the_clear() {
    if !can_capture() {
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

/// Captures TCP segments to or from `port` on `lo` while `talk` runs;
/// returns the payload bytes seen and the marker's occurrences.
fn capture_tcp(port: u16, talk: impl FnOnce()) -> (u64, u64) {
    let cap = Capture::open();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut bytes, mut marked) = (0u64, 0u64);
            let mut buf = vec![0u8; 70_000];
            while !stop.load(Ordering::Relaxed) {
                let Some(n) = cap.next(&mut buf) else {
                    continue;
                };
                let f = &buf[..n];
                // Ethernet (14 bytes on lo), IPv4, TCP.
                if n < 14 + 20 + 20 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 6 {
                    continue;
                }
                let ihl = usize::from(f[14] & 0x0f) * 4;
                let t = &f[14 + ihl..];
                let (sport, dport) = (
                    u16::from_be_bytes([t[0], t[1]]),
                    u16::from_be_bytes([t[2], t[3]]),
                );
                if sport != port && dport != port {
                    continue;
                }
                let doff = usize::from(t[12] >> 4) * 4;
                bytes += t.len().saturating_sub(doff) as u64;
                marked += f.windows(MARKER.len()).filter(|w| *w == MARKER).count() as u64;
            }
            (bytes, marked)
        })
    };
    talk();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    seen.join().unwrap()
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
    if !can_capture() {
        return;
    }
    let port = 29_000 + (std::process::id() % 500) as u16 * 2;
    // The control: the same frames on plain TCP show in the capture.
    let (plain_bytes, plain_marked) = capture_tcp(port, || stream_pages(port, false));
    assert!(
        plain_bytes >= u64::from(PAGES) * PAGE_SIZE as u64,
        "{plain_bytes}"
    );
    assert!(
        plain_marked >= u64::from(PAGES) * 100,
        "plain TCP: {plain_marked} markers"
    );
    // Through TLS: as many bytes, no marker.
    let (bytes, marked) = capture_tcp(port + 1, || stream_pages(port + 1, true));
    assert!(bytes >= u64::from(PAGES) * PAGE_SIZE as u64, "{bytes}");
    assert_eq!(marked, 0, "TLS: {marked} markers in {bytes} bytes");
    println!(
        "TLS channel: {bytes} bytes captured, no marker; plain TCP: {plain_bytes} bytes, \
         {plain_marked} markers"
    );
}
