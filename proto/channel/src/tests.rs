use super::*;
use std::net::TcpListener;
use std::time::SystemTime;

use pagecast_proto::v1;

use crate::ca::Authority;

fn pair(server: Tls, client: Tls) -> (Result<Channel, AuthError>, Result<Channel, AuthError>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        Channel::server(s, &server)
    });
    let c = Channel::client(TcpStream::connect(addr).unwrap(), &client);
    (t.join().unwrap(), c)
}

#[test]
fn frames_flow_both_ways_and_each_side_knows_the_other() {
    let ca = Authority::generate().unwrap();
    let (srv, cli) = pair(
        ca.issue("host-a", Role::Host, 1).unwrap(),
        ca.issue("ops", Role::Operator, 1).unwrap(),
    );
    let (mut srv, mut cli) = (srv.unwrap(), cli.unwrap());
    assert_eq!(
        srv.identity(),
        &Identity {
            name: "ops".into(),
            role: Role::Operator
        }
    );
    assert_eq!(cli.peer_name(), "host-a");
    assert_eq!(cli.identity().role, Role::Host);
    let m = v1::CastProgress {
        group: 1,
        contiguous: 2,
        held: 3,
        chain_refused: String::new(),
        chain_next_lost: String::new(),
    };
    cli.send(&m).unwrap();
    assert_eq!(srv.recv::<v1::CastProgress>("progress").unwrap(), m);
    // A frame larger than a TLS record, then a burst, through split halves.
    let (mut r, mut w) = srv.split().unwrap();
    let big = v1::CastProbe { nonce: 0x0123_4567 };
    let t = std::thread::spawn(move || {
        for _ in 0..1000 {
            w.send(&big).unwrap();
        }
        w.send(&v1::VmInfo {
            name: "x".repeat(100_000),
            ..Default::default()
        })
        .unwrap();
        w.sent_bytes()
    });
    for _ in 0..1000 {
        assert_eq!(cli.recv::<v1::CastProbe>("probe").unwrap(), big);
    }
    assert_eq!(cli.recv::<v1::VmInfo>("vm").unwrap().name.len(), 100_000);
    let sent = t.join().unwrap();
    assert!(sent > 100_000 + 1000 * 10, "{sent}");
    cli.send(&m).unwrap();
    assert_eq!(r.recv::<v1::CastProgress>("progress").unwrap(), m);
}

/// A writer's drain returns once the peer has taken every byte, and fails
/// as stalled when the peer reads nothing within the time it is given.
#[test]
fn a_drain_waits_for_the_peer_and_fails_on_one_that_reads_nothing() {
    let ca = Authority::generate().unwrap();
    let (srv, cli) = pair(
        ca.issue("host-a", Role::Host, 1).unwrap(),
        ca.issue("host-b", Role::Host, 1).unwrap(),
    );
    let (mut srv, mut cli) = (srv.unwrap(), cli.unwrap());
    srv.set_write_limit(Duration::from_millis(500)).unwrap();
    let (r, mut w) = srv.split().unwrap();
    // Small frames the peer's kernel takes whole: acknowledged at once.
    w.send(&v1::CastProbe { nonce: 1 }).unwrap();
    w.drain(Duration::from_millis(500)).unwrap();
    assert_eq!(w.unacked_bytes().unwrap(), 0);
    assert_eq!(cli.recv::<v1::CastProbe>("probe").unwrap().nonce, 1);
    // More than the peer's buffers hold, while it reads nothing: bytes
    // stay unacknowledged, and the drain gives up at the limit.
    let big = v1::VmInfo {
        name: "x".repeat(1 << 20),
        ..Default::default()
    };
    let mut sent = 0;
    while sent < 64 && w.send(&big).is_ok() {
        sent += 1;
    }
    let t = std::time::Instant::now();
    let err = w.drain(Duration::from_millis(500)).unwrap_err();
    assert!(matches!(err, AuthError::Stalled { .. }), "{err}");
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert!(w.unacked_bytes().unwrap() > 0);
    drop((r, cli));
}

/// A writer whose peer's kernel takes what its process reads: `chunk`
/// bytes every `every`, read below TLS, until told to stop. Small fixed
/// buffers on both sides (no autotuning), so what the peer has not read
/// soon holds a send up.
struct PacedPeer {
    w: ChannelWriter,
    reading: Arc<std::sync::atomic::AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
    _kept: (ChannelReader, Channel),
}

impl PacedPeer {
    fn new(chunk: usize, every: Duration) -> Self {
        let ca = Authority::generate().unwrap();
        let (server, client) = (
            ca.issue("host-a", Role::Host, 1).unwrap(),
            ca.issue("host-b", Role::Host, 1).unwrap(),
        );
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let raw = s.try_clone().unwrap();
            (Channel::server(s, &server).unwrap(), raw)
        });
        let stream = TcpStream::connect(addr).unwrap();
        let cli = Channel::client(stream, &client).unwrap();
        let (srv, mut raw) = t.join().unwrap();
        small_buffers(&raw, libc::SO_RCVBUF);
        let (r, w) = cli.split().unwrap();
        small_buffers(&w.sock, libc::SO_SNDBUF);
        let reading = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let reader = {
            let reading = reading.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; chunk];
                while reading.load(std::sync::atomic::Ordering::Relaxed) {
                    if std::io::Read::read(&mut raw, &mut buf).unwrap_or(0) == 0 {
                        return;
                    }
                    std::thread::sleep(every);
                }
            })
        };
        PacedPeer {
            w,
            reading,
            reader: Some(reader),
            _kept: (r, srv),
        }
    }

    fn stop_reading(&mut self) {
        self.reading
            .store(false, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.reader.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for PacedPeer {
    fn drop(&mut self) {
        self.reading
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One frame of `mib` MiB.
fn frame_of_mib(mib: usize) -> v1::VmInfo {
    v1::VmInfo {
        name: "x".repeat(mib << 20),
        ..Default::default()
    }
}

/// A send watched for stalls takes as long as a peer that reads slowly
/// needs, and gives up one that reads nothing once nothing moved for the
/// stall limit; the writer's own limit holds for the next plain send.
#[test]
fn a_watched_send_waits_on_a_slow_reader_and_gives_up_a_deaf_one() {
    // 32 KiB every 20 ms: about 1.6 MB/s.
    let mut peer = PacedPeer::new(32 << 10, Duration::from_millis(20));
    let stall = Duration::from_secs(1);
    // 6 MiB at that pace, past what the socket buffers hold (about 1 MiB
    // in all), outlasts the stall limit.
    let big = frame_of_mib(6);
    let t = std::time::Instant::now();
    peer.w.send_unless_stalled(&big, stall).unwrap();
    assert!(
        t.elapsed() > 2 * stall,
        "{:?}: not slow enough",
        t.elapsed()
    );
    // Now it reads nothing: given up once nothing moved for the limit.
    peer.stop_reading();
    let err = loop {
        if let Err(e) = peer.w.send_unless_stalled(&big, stall) {
            break e;
        }
    };
    assert!(
        matches!(err, AuthError::Stalled { after, .. } if after == stall),
        "{err}"
    );
    // The writer's own limit is back on the socket for a plain send.
    assert_eq!(peer.w.sock.write_timeout().unwrap(), Some(WRITE_TIMEOUT));
}

/// A send that asks a pace of its peer takes as long as a peer at that
/// pace needs, and gives up one that takes less over a window of waiting
/// though it takes something all along (so it never stalls). Only watched
/// for stalls, as every send was before, the trickling peer held the send
/// until the writer's own limit.
#[test]
fn a_send_that_asks_a_pace_gives_up_a_trickling_reader() {
    let (window, least) = (Duration::from_secs(1), 1 << 20);
    // About 3.2 MB/s, above 1 MiB a second: 6 MiB outlasts the window.
    let mut fast = PacedPeer::new(64 << 10, Duration::from_millis(20));
    let t = std::time::Instant::now();
    fast.w
        .send_unless_slow(&frame_of_mib(6), window, least)
        .unwrap();
    assert!(t.elapsed() > window, "{:?}: not slow enough", t.elapsed());
    // What its kernel took during the send, which waited, is counted:
    // about the whole frame.
    let acked = fast.w.acked_while_waiting();
    assert!(
        acked > 4 << 20 && acked <= fast.w.sent_bytes(),
        "{acked} of {}",
        fast.w.sent_bytes()
    );
    drop(fast);
    // 64 KiB every 200 ms, about 330 KB a second: something moves in every
    // window (the peer's kernel opens its window a loopback segment, 64
    // KiB, at a time, once that much is free), under a third of what is
    // asked.
    let mut slow = PacedPeer::new(64 << 10, Duration::from_millis(200));
    let t = std::time::Instant::now();
    let err = slow
        .w
        .send_unless_slow(&frame_of_mib(6), window, least)
        .unwrap_err();
    let waited = t.elapsed();
    assert!(
        matches!(&err, AuthError::Slow { over, least: l, took, .. }
            if *over == window && *l == least && *took > 0 && *took < least),
        "{err}"
    );
    assert!(waited < 3 * window, "given up after {waited:?}");
    // Only watched for stalls (none for 2 s), the same peer holds a send
    // to the writer's limit.
    slow.w.limit = 4 * window;
    let t = std::time::Instant::now();
    let err = slow
        .w
        .send_unless_stalled(&frame_of_mib(6), 2 * window)
        .unwrap_err();
    assert!(
        matches!(err, AuthError::Stalled { after, .. } if after == 4 * window),
        "{err}"
    );
    assert!(t.elapsed() >= 4 * window, "{:?}", t.elapsed());
}

/// Sets `sock`'s `which` buffer (SO_SNDBUF or SO_RCVBUF) to 256 KiB.
fn small_buffers(sock: &TcpStream, which: libc::c_int) {
    let n: libc::c_int = 256 << 10;
    // SAFETY: setsockopt reads one c_int from `n`, live for the call,
    // whose size is passed; the descriptor is `sock`'s, open while the
    // borrow lives.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(sock),
            libc::SOL_SOCKET,
            which,
            (&n as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
}

fn refused(server: Tls, client: Tls) -> (String, String) {
    let (s, c) = pair(server, client);
    let s = s.map(|_| ()).unwrap_err().to_string();
    // A client may only learn of the refusal at its first read.
    let c = match c {
        Err(e) => e.to_string(),
        Ok(mut c) => c.recv::<v1::CastProbe>("probe").unwrap_err().to_string(),
    };
    (s, c)
}

#[test]
fn another_ca_and_an_expired_certificate_are_refused() {
    let ca = Authority::generate().unwrap();
    let other = Authority::generate().unwrap();
    // A client that trusts the cluster CA but holds a certificate from
    // another CA.
    let now = SystemTime::now();
    let (cert, key) = other
        .sign(
            "intruder",
            Role::Operator,
            now,
            now + Duration::from_secs(3600),
        )
        .unwrap();
    let intruder = Tls::from_pem(ca.cert_pem(), &cert, &key).unwrap();
    let (s, c) = refused(ca.issue("host-a", Role::Host, 1).unwrap(), intruder);
    assert!(s.contains("TLS") && s.contains("UnknownIssuer"), "{s}");
    assert!(c.contains("TLS") || c.contains("closed"), "{c}");
    // The other way round: a server the client's CA did not sign.
    let (_, c) = refused(
        other.issue("fake-host", Role::Host, 1).unwrap(),
        ca.issue("ops", Role::Operator, 1).unwrap(),
    );
    assert!(c.contains("UnknownIssuer"), "{c}");

    let dir = tempfile::tempdir().unwrap();
    let day = Duration::from_secs(86_400);
    ca.write_node("old", Role::Operator, now - 3 * day, now - day, dir.path())
        .unwrap();
    let expired = Tls::load(dir.path()).unwrap();
    let (s, _) = refused(ca.issue("host-a", Role::Host, 1).unwrap(), expired);
    assert!(s.contains("certificate expired"), "{s}");
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let ca = Authority::generate().unwrap();
    let server = ca.issue("host-a", Role::Host, 1).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        Channel::server(s, &server).map(|_| ())
    });
    // A client trusting the CA but presenting no certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(verify::ClusterServerVerifier::new(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )))
    .with_no_client_auth();
    let conn = rustls::ClientConnection::new(
        Arc::new(cfg),
        rustls::pki_types::ServerName::try_from("pagecast.invalid").unwrap(),
    )
    .unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    let _ = TlsStream::handshake(rustls::Connection::Client(conn), sock, "srv".into());
    let e = t.join().unwrap().unwrap_err().to_string();
    assert!(e.contains("peer sent no certificates"), "{e}");
}

#[test]
fn silence_and_garbage_during_the_handshake_fail_cleanly() {
    let ca = Authority::generate().unwrap();
    let server = ca.issue("host-a", Role::Host, 1).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let a = Channel::server(s, &server).map(|_| ());
        let (s, _) = l.accept().unwrap();
        let started = std::time::Instant::now();
        let b = Channel::server(s, &server).map(|_| ());
        (a, b, started.elapsed())
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    let _silent = {
        // Wait for the first to be refused, then connect and say nothing.
        std::thread::sleep(Duration::from_millis(200));
        TcpStream::connect(addr).unwrap()
    };
    let (a, b, took) = t.join().unwrap();
    let a = a.unwrap_err().to_string();
    assert!(a.contains("TLS") || a.contains("closed"), "{a}");
    let b = b.unwrap_err().to_string();
    assert!(
        b.contains("timed out")
            || b.contains("too long")
            || b.contains("Resource temporarily unavailable"),
        "{b}"
    );
    assert!(
        took <= HANDSHAKE_TIMEOUT + Duration::from_secs(2),
        "{took:?}"
    );
}

/// Sends `plaintext` as TLS records from a client (the last byte but two
/// of the ciphertext flipped if `tamper`) and returns the server's error.
fn server_error_on(plaintext: &[u8], tamper: bool) -> String {
    let ca = Authority::generate().unwrap();
    let (srv, cli) = pair(
        ca.issue("host-a", Role::Host, 1).unwrap(),
        ca.issue("ops", Role::Operator, 1).unwrap(),
    );
    let (mut srv, cli) = (srv.unwrap(), cli.unwrap());
    let (_, w) = cli.split().unwrap();
    let mut out = records(&w, plaintext);
    if tamper {
        let n = out.len();
        out[n - 3] ^= 1;
    }
    (&w.sock).write_all(&out).unwrap();
    srv.recv::<v1::CastProbe>("probe").unwrap_err().to_string()
}

/// `plaintext` sealed by the writer `w` as TLS records, bypassing its
/// framing (the test owns the writer).
fn records(w: &ChannelWriter, plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut c = lock(&w.shared);
    c.writer().write_all(plaintext).unwrap();
    while c.wants_write() {
        c.write_tls(&mut out).unwrap();
    }
    out
}

/// Sends `bytes` one TLS record each, `every` apart, from the writer `w`
/// (which a test owns: the records bypass its framing).
fn trickle(w: &mut ChannelWriter, bytes: &[u8], every: Duration) {
    for b in bytes {
        let out = records(w, std::slice::from_ref(b));
        if w.sock.write_all(&out).is_err() {
            return;
        }
        std::thread::sleep(every);
    }
}

/// A peer that sends a frame a byte at a time, each byte well within the
/// read timeout, cannot hold a receive past the frame's deadline (the
/// read timeout from its head's arrival, plus a second for every 64 KiB);
/// what arrived is kept, and a receive given longer returns the frame
/// whole. Before, each read waited anew, and the trickled frame was taken
/// whole after 3 s where the read timeout was 1 s.
#[test]
fn a_frame_trickled_a_byte_at_a_time_fails_at_its_deadline_and_loses_nothing() {
    let ca = Authority::generate().unwrap();
    let (srv, cli) = pair(
        ca.issue("host-a", Role::Host, 1).unwrap(),
        ca.issue("host-b", Role::Host, 1).unwrap(),
    );
    let (mut srv, cli) = (srv.unwrap(), cli.unwrap());
    let (_, mut w) = cli.split().unwrap();
    let m = v1::VmInfo {
        name: "trickled".into(),
        ..Default::default()
    };
    let bytes = frame(&m);
    let every = Duration::from_millis(250);
    // The head's last byte comes after three waits, the frame's after
    // many more than the read timeout's worth.
    assert!(bytes.len() >= 12, "{}", bytes.len());
    let t = std::thread::spawn(move || {
        trickle(&mut w, &bytes, every);
        w
    });
    let timeout = Duration::from_secs(1);
    srv.set_read_timeout(Some(timeout)).unwrap();
    let started = std::time::Instant::now();
    let e = srv.recv::<v1::VmInfo>("vm").unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(&e, AuthError::Io { source, .. } if source.kind() == std::io::ErrorKind::WouldBlock),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(text.contains("did not arrive within"), "{text}");
    // The head at about 0.75 s (within the read timeout), then the read
    // timeout again.
    assert!(
        took >= 3 * every + timeout - Duration::from_millis(100)
            && took < 3 * every + timeout + Duration::from_millis(1000),
        "{took:?}"
    );
    // The rest arrives; a receive given the time takes the frame whole.
    srv.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(srv.recv::<v1::VmInfo>("vm").unwrap(), m);
    let _w = t.join().unwrap();
}

#[test]
fn an_oversized_frame_or_tampered_record_ends_the_connection() {
    let e = server_error_on(&u32::MAX.to_be_bytes(), false);
    assert!(e.contains("exceeds"), "{e}");
    let e = server_error_on(&frame(&v1::CastProbe { nonce: 9 }), true);
    assert!(e.contains("TLS") && e.contains("cannot decrypt"), "{e}");
}

#[test]
fn hosts_and_only_hosts_get_the_domain_secret() {
    use crate::ca::{DOMAINS_KEY, read_domains_secret};
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = Authority::init(&ca_dir).unwrap();
    let secret = read_domains_secret(&ca_dir.join(DOMAINS_KEY)).unwrap();
    ca.issue_to("h1", Role::Host, 30, &dir.path().join("h1"))
        .unwrap();
    ca.issue_to("op", Role::Operator, 30, &dir.path().join("op"))
        .unwrap();
    assert_eq!(
        read_domains_secret(&dir.path().join("h1").join(DOMAINS_KEY)).unwrap(),
        secret
    );
    assert!(!dir.path().join("op").join(DOMAINS_KEY).exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in [
            ca_dir.join(DOMAINS_KEY),
            dir.path().join("h1").join(DOMAINS_KEY),
        ] {
            let mode = std::fs::metadata(&f).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} is the owner's only", f.display());
        }
    }
    // A CA made before domains gets a secret on load, then keeps it.
    std::fs::remove_file(ca_dir.join(DOMAINS_KEY)).unwrap();
    Authority::load(&ca_dir).unwrap();
    let fresh = read_domains_secret(&ca_dir.join(DOMAINS_KEY)).unwrap();
    assert_ne!(fresh, secret);
    Authority::load(&ca_dir).unwrap();
    assert_eq!(
        read_domains_secret(&ca_dir.join(DOMAINS_KEY)).unwrap(),
        fresh
    );
    // A damaged secret is named, not used.
    std::fs::write(ca_dir.join(DOMAINS_KEY), "zz").unwrap();
    let e = Authority::load(&ca_dir).unwrap_err().to_string();
    assert!(
        e.contains("domains.key") && e.contains("64 hex digits"),
        "{e}"
    );
}

#[test]
fn ca_files_round_trip_and_are_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    Authority::init(&ca_dir).unwrap();
    let e = Authority::init(&ca_dir).unwrap_err().to_string();
    assert!(e.contains("already holds a CA"), "{e}");
    let ca = Authority::load(&ca_dir).unwrap();
    let node = dir.path().join("h1");
    ca.issue_to("h1", Role::Reader, 30, &node).unwrap();
    let tls = Tls::load(&node).unwrap();
    assert_eq!(
        tls.identity(),
        &Identity {
            name: "h1".into(),
            role: Role::Reader
        }
    );
    let e = ca
        .issue_to("h1", Role::Host, 30, &node)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already holds a node key"), "{e}");
    let e = ca
        .issue_to("bad name", Role::Host, 30, &dir.path().join("x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("may hold letters"), "{e}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(node.join(NODE_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is the owner's only");
    }
    std::fs::write(node.join(NODE_KEY), "not a key").unwrap();
    let e = Tls::load(&node).unwrap_err().to_string();
    assert!(e.contains("no private key"), "{e}");
    let e = Tls::load(&dir.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a directory"), "{e}");
}

proptest::proptest! {
    #[test]
    fn the_frame_decoder_accepts_exactly_what_was_framed(
        payloads in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 1..5),
        cut in proptest::option::of(0usize..400),
    ) {
        let mut stream = Vec::new();
        for p in &payloads {
            stream.extend(frame(&v1::CastFrame { body: None }).iter().take(0));
            stream.extend_from_slice(&(p.len() as u32).to_be_bytes());
            stream.extend_from_slice(p);
        }
        let whole = stream.len();
        if let Some(c) = cut { stream.truncate(c.min(whole)); }
        let mut input = &stream[..];
        let mut d = FrameDecoder;
        for p in &payloads {
            match d.next(&mut input, "t") {
                Ok(got) => proptest::prop_assert_eq!(&got, p),
                Err(e) => {
                    proptest::prop_assert!(stream.len() < whole);
                    proptest::prop_assert!(matches!(e, AuthError::Closed { .. }), "{e}");
                    break;
                }
            }
        }
    }

    #[test]
    fn any_length_head_is_checked_before_allocating(head in proptest::prelude::any::<[u8; 4]>()) {
        let len = u32::from_be_bytes(head) as usize;
        proptest::prop_assert_eq!(frame_len(head, "t").is_ok(), len <= MAX_CONTROL_FRAME_BYTES);
    }
}
