//! One-to-many transport benchmark: pagecast's multicast sessions beside
//! TCP unicast fan-out of the same pages, in the same run.
//!
//! For 1, 2 and 4 receivers, over loopback and (as root) over the
//! namespace topology of `scripts/netns.sh` (jumbo MTU, a rate limit, and
//! 0% and 1% random loss at the receivers): goodput per receiver, sender CPU
//! seconds per GB, and bytes leaving the sender per byte delivered to one
//! receiver. Every process (sender, receivers) is this binary re-run in a
//! role, so CPU is measured per process and namespaces apply.
//!
//! Bytes leaving the sender are counted as a wire would carry them: for
//! multicast every UDP payload plus 42 bytes (Ethernet, IPv4, UDP) per
//! datagram, plus control bytes; for TCP every byte written plus 66 bytes
//! (Ethernet, IPv4, TCP with timestamps) per MSS-sized segment. Interface
//! counters are not used: with GSO and TSO a virtual interface counts one
//! set of headers per 64 KiB super-packet.
//!
//! Targets: at 1% loss the sender sends at most 1.05x the data once;
//! multicast goodput per receiver at least 0.8x that of TCP to a single
//! receiver.
//!
//! With PAGECAST_BENCH_CLEAR=1 in a build with debug assertions, each
//! multicast case runs a third time with datagrams in the clear (the
//! debug-only `PAGECAST_INSECURE_CLEARTEXT_DATAGRAMS` switch), and the
//! table adds the encrypted goodput over the clear one (target >= 0.9x):
//! `PAGECAST_BENCH_CLEAR=1 cargo bench --profile dev -p pagecast-benches
//! --bench cast`. Release builds have no such switch and skip it.
//!
//! Run: `cargo bench -p pagecast-benches --bench cast`
//! Knobs: PAGECAST_BENCH_MIB (image size, default 256),
//! PAGECAST_BENCH_RATE (namespace link rate, default 1gbit),
//! PAGECAST_BENCH_CLEAR (see above).

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pagecast_benches::env_or;
use pagecast_channel::Role;
use pagecast_channel::Tls;
use pagecast_channel::ca::Authority;
use pagecast_cli::castio::{ImageSink, ImageSource};
use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_memory::synth::{SynthSpec, SyntheticVm};
use pagecast_multicast::{
    Groups, PageEntry, PageSink, PageSource, ReceiverConfig, SenderConfig, TransportChoice,
};
use pagecast_pages::{PAGE_SIZE, PageHash};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Default, Clone)]
struct SenderOut {
    /// Bytes the sender's protocol put on the wire (application level).
    sent_bytes: u64,
    page_bytes: u64,
    repairs: u64,
}

#[derive(Serialize, Deserialize, Debug, Default, Clone)]
struct ReceiverOut {
    page_bytes: u64,
    seconds: f64,
}

fn role(args: &[String]) -> Option<()> {
    let pos = args.iter().position(|a| a == "--role")?;
    let r = &args[pos + 1..];
    let get = |k: &str| r.iter().position(|a| a == k).map(|i| r[i + 1].clone());
    let tls = Tls::load(Path::new(&get("--tls")?)).expect("a TLS identity");
    let control: SocketAddr = get("--control")?.parse().expect("control address");
    let iface: Ipv4Addr = get("--iface")?.parse().expect("iface");
    let out = match r[0].as_str() {
        "mcast-send" | "tcp-send" => {
            let n: usize = get("--receivers")?.parse().expect("receivers");
            let mtu: u64 = get("--mtu")?.parse().expect("mtu");
            let fp = Fingerprinter::new(1).expect("pool");
            let src = ImageSource::open(Path::new(&get("--image")?), &fp, &|_| {}).expect("image");
            if r[0] == "mcast-send" {
                let mut cfg = SenderConfig::new(control, iface, n);
                cfg.transport = TransportChoice::Multicast;
                let group: SocketAddrV4 = get("--group")?.parse().expect("group");
                let rep =
                    pagecast_multicast::send(&cfg, Groups::Single(group), &src, &tls, &|_, _| {})
                        .expect("cast session");
                assert!(
                    rep.receivers
                        .iter()
                        .all(|p| p.status == pagecast_multicast::PeerStatus::Complete),
                    "{:?}",
                    rep.receivers
                );
                // UDP payloads plus 42 bytes of Ethernet, IPv4 and UDP
                // headers per datagram; TCP bytes (control, unicast repair)
                // as a TCP wire carries them.
                let udp = rep.bytes_first + rep.bytes_repair + rep.bytes_heartbeat;
                let tcp = rep.bytes_unicast + rep.bytes_control;
                serde_json::to_string(&SenderOut {
                    sent_bytes: udp + 42 * rep.datagrams + tcp_wire(tcp, mtu),
                    page_bytes: rep.page_bytes,
                    repairs: rep.repairs,
                })
            } else {
                let mut out = tcp_send(control, n, &src);
                out.sent_bytes = tcp_wire(out.sent_bytes, mtu);
                serde_json::to_string(&out)
            }
        }
        "mcast-recv" => {
            let cfg = ReceiverConfig::new(control, iface, "bench");
            let mut sink = ImageSink::new(Path::new(&get("--out")?));
            let rep =
                pagecast_multicast::receive(&cfg, &tls, &mut sink, &|_, _| {}).expect("receive");
            serde_json::to_string(&ReceiverOut {
                page_bytes: rep.page_bytes,
                seconds: rep.duration_s,
            })
        }
        "tcp-recv" => serde_json::to_string(&tcp_recv(control, Path::new(&get("--out")?))),
        other => panic!("unknown role {other}"),
    };
    println!("{}", out.expect("json"));
    Some(())
}

/// Bytes on the wire for `bytes` of TCP payload at `mtu`.
fn tcp_wire(bytes: u64, mtu: u64) -> u64 {
    let mss = mtu - 52;
    bytes + bytes.div_ceil(mss) * 66
}

/// TCP fan-out: one connection per receiver, each sent every page (with
/// its frame and hash), on its own thread.
fn tcp_send(control: SocketAddr, n: usize, src: &ImageSource) -> SenderOut {
    let l = TcpListener::bind(control).expect("listen");
    let conns: Vec<TcpStream> = (0..n).map(|_| l.accept().expect("accept").0).collect();
    let pages = src.pages();
    let bytes = std::thread::scope(|s| {
        let hs: Vec<_> = conns
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let mut w = BufWriter::with_capacity(1 << 20, c);
                    w.write_all(&u64::from(pages).to_be_bytes()).unwrap();
                    w.write_all(&src.frames().to_be_bytes()).unwrap();
                    let mut page = [0u8; PAGE_SIZE];
                    let mut sent = 16u64;
                    for i in 0..pages {
                        let e = src.entry(i);
                        src.read(i, &mut page).unwrap();
                        w.write_all(&e.key.to_be_bytes()).unwrap();
                        w.write_all(e.hash.as_bytes()).unwrap();
                        w.write_all(&page).unwrap();
                        sent += 8 + 32 + PAGE_SIZE as u64;
                    }
                    w.flush().unwrap();
                    let mut ack = [0u8; 1];
                    w.get_mut().read_exact(&mut ack).unwrap();
                    sent
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum::<u64>()
    });
    SenderOut {
        sent_bytes: bytes,
        page_bytes: u64::from(pages) * PAGE_SIZE as u64,
        repairs: 0,
    }
}

fn tcp_recv(control: SocketAddr, out: &Path) -> ReceiverOut {
    let c = TcpStream::connect(control).expect("connect");
    let mut r = BufReader::with_capacity(1 << 20, c.try_clone().unwrap());
    let mut head = [0u8; 16];
    r.read_exact(&mut head).unwrap();
    let pages = u64::from_be_bytes(head[..8].try_into().unwrap());
    let frames = u64::from_be_bytes(head[8..].try_into().unwrap());
    let mut sink = ImageSink::new(out);
    sink.begin(frames).unwrap();
    let mut t0 = None;
    let mut page = [0u8; PAGE_SIZE];
    let mut meta = [0u8; 40];
    for _ in 0..pages {
        r.read_exact(&mut meta).unwrap();
        t0.get_or_insert_with(Instant::now);
        r.read_exact(&mut page).unwrap();
        let key = u64::from_be_bytes(meta[..8].try_into().unwrap());
        let hash = PageHash::try_from(&meta[8..]).unwrap();
        assert_eq!(PageHash::of_page(&page), hash, "page {key} corrupt");
        sink.put(&PageEntry { key, hash }, &page).unwrap();
    }
    let seconds = t0.map_or(0.0, |t| t.elapsed().as_secs_f64());
    sink.finish().unwrap();
    (&c).write_all(&[1]).unwrap();
    ReceiverOut {
        page_bytes: pages * PAGE_SIZE as u64,
        seconds,
    }
}

/// Runs `exe --role ...` (inside a namespace if `ns` is given), its
/// datagrams in the clear if `clear` (debug builds only).
fn spawn(ns: Option<&str>, args: &[String], clear: bool) -> std::process::Child {
    let exe = std::env::current_exe().unwrap();
    let mut c = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    c.arg("--role")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if clear {
        c.env("PAGECAST_INSECURE_CLEARTEXT_DATAGRAMS", "1");
    } else {
        c.env_remove("PAGECAST_INSECURE_CLEARTEXT_DATAGRAMS");
    }
    c.spawn().expect("spawn role")
}

fn wait_cpu(mut child: std::process::Child) -> (String, f64) {
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our
    // own child, whose pid we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting on our own child with valid pointers.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert!(pid > 0, "wait4 failed");
    assert!(status == 0, "role exited with status {status}: {out}");
    let cpu = ru.ru_utime.tv_sec as f64
        + ru.ru_utime.tv_usec as f64 / 1e6
        + ru.ru_stime.tv_sec as f64
        + ru.ru_stime.tv_usec as f64 / 1e6;
    (out, cpu)
}

struct Net {
    name: &'static str,
    mtu: u64,
    /// Namespace of the sender and of each receiver (None: loopback).
    ns: Option<String>,
    iface: fn(usize) -> String,
}

struct Outcome {
    goodput_gbps: f64,
    cpu_per_gb: f64,
    tx_per_delivered: f64,
    repairs: u64,
}

#[allow(clippy::too_many_arguments)]
fn run(
    net: &Net,
    mcast: bool,
    clear: bool,
    n: usize,
    image: &Path,
    tls: &Path,
    dir: &Path,
    port: u16,
) -> Outcome {
    let control = format!("{}:{port}", (net.iface)(0));
    let group = format!("239.88.0.1:{}", port + 1);
    let ns_of = |i: usize| net.ns.as_ref().map(|p| format!("{p}-h{i}"));
    let (send_role, recv_role) = if mcast {
        ("mcast-send", "mcast-recv")
    } else {
        ("tcp-send", "tcp-recv")
    };
    let sender = spawn(
        ns_of(0).as_deref(),
        &[
            send_role,
            "--control",
            &control,
            "--iface",
            &(net.iface)(0),
            "--receivers",
            &n.to_string(),
            "--group",
            &group,
            "--image",
            image.to_str().unwrap(),
            "--tls",
            tls.join("sender").to_str().unwrap(),
            "--mtu",
            &net.mtu.to_string(),
        ]
        .map(String::from),
        clear,
    );
    // The sender hashes the image before it listens: far slower in a debug
    // build (PAGECAST_BENCH_CLEAR runs one).
    std::thread::sleep(Duration::from_millis(if cfg!(debug_assertions) {
        4000
    } else {
        400
    }));
    let receivers: Vec<_> = (1..=n)
        .map(|i| {
            let out = dir.join(format!("out{i}.raw"));
            spawn(
                ns_of(i).as_deref(),
                &[
                    recv_role,
                    "--control",
                    &control,
                    "--iface",
                    &(net.iface)(i),
                    "--out",
                    out.to_str().unwrap(),
                    "--tls",
                    tls.join(format!("receiver-{i}")).to_str().unwrap(),
                ]
                .map(String::from),
                clear,
            )
        })
        .collect();
    let routs: Vec<ReceiverOut> = receivers
        .into_iter()
        .map(|c| serde_json::from_str(&wait_cpu(c).0).expect("receiver json"))
        .collect();
    let (sout, cpu) = wait_cpu(sender);
    let sout: SenderOut = serde_json::from_str(&sout).expect("sender json");
    let tx = sout.sent_bytes;
    if std::env::var("PAGECAST_BENCH_DEBUG").is_ok() {
        for i in 1..=n {
            if let Some(ns) = ns_of(i) {
                let o = Command::new("ip")
                    .args(["netns", "exec", &ns, "nstat"])
                    .output()
                    .unwrap();
                let s = String::from_utf8_lossy(&o.stdout);
                let drops: Vec<&str> = s
                    .lines()
                    .filter(|l| {
                        l.contains("Rcvbuf")
                            || l.contains("InErrors")
                            || l.contains("UdpInDatagrams")
                    })
                    .collect();
                eprintln!(
                    "{} n={n} receiver {i}: {drops:?}",
                    if mcast { "mcast" } else { "tcp" }
                );
            }
        }
    }
    let original = std::fs::read(image).unwrap();
    for i in 1..=n {
        let copy = dir.join(format!("out{i}.raw"));
        assert!(
            std::fs::read(&copy).unwrap() == original,
            "receiver {i}'s copy differs"
        );
        std::fs::remove_file(copy).unwrap();
    }
    let goodput = routs
        .iter()
        .map(|r| r.page_bytes as f64 * 8.0 / r.seconds.max(1e-9) / 1e9)
        .sum::<f64>()
        / n as f64;
    Outcome {
        goodput_gbps: goodput,
        cpu_per_gb: cpu / (sout.page_bytes as f64 / 1e9),
        tx_per_delivered: tx as f64 / sout.page_bytes as f64,
        repairs: sout.repairs,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if role(&args).is_some() {
        return;
    }
    let mib: u64 = env_or("PAGECAST_BENCH_MIB", 256);
    let rate: String = env_or("PAGECAST_BENCH_RATE", "1gbit".to_string());
    let clear = std::env::var_os("PAGECAST_BENCH_CLEAR").is_some();
    if clear && !cfg!(debug_assertions) {
        println!(
            "(PAGECAST_BENCH_CLEAR: a release build has no cleartext switch; run with --profile dev)"
        );
    }
    let clear = clear && cfg!(debug_assertions);
    // Copies land on tmpfs where there is one: the transports are measured,
    // not the disk's writeback of the previous run's copies.
    let dir = if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let image = dir.path().join("vm.raw");
    let mut spec = SynthSpec::new("web", 0, mib << 20).unwrap();
    spec.profile.zero = 0.0;
    SyntheticVm::new(spec)
        .unwrap()
        .write_image(&image, &|_| {})
        .unwrap();
    // Host identities for the sender and every receiver, of one CA.
    let tls = dir.path().join("tls");
    let ca = Authority::generate().unwrap();
    ca.issue_to("sender", Role::Host, 1, &tls.join("sender"))
        .unwrap();
    for i in 1..=8 {
        let name = format!("receiver-{i}");
        ca.issue_to(&name, Role::Host, 1, &tls.join(&name)).unwrap();
    }

    let mut nets = vec![(
        Net {
            name: "loopback",
            mtu: 65536,
            ns: None,
            iface: |_| "127.0.0.1".into(),
        },
        0,
    )];
    let is_root = unsafe_is_root();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/netns.sh");
    let prefix = "pcb";
    if is_root {
        let up = Command::new(&script)
            .args([
                "up", "5", "--prefix", prefix, "--mtu", "9000", "--rate", &rate,
            ])
            .status();
        if up.is_ok_and(|s| s.success()) {
            for loss in [0, 1] {
                nets.push((
                    Net {
                        name: "namespaces",
                        mtu: 9000,
                        ns: Some(prefix.into()),
                        iface: |i| format!("10.77.0.{}", i + 1),
                    },
                    loss,
                ));
            }
        }
    } else {
        println!("(not root: skipping the namespace topology)");
    }
    let mut port = 41_000;
    for (net, loss) in &nets {
        if net.ns.is_some() {
            let _ = Command::new(&script)
                .args(["loss", &loss.to_string(), "--prefix", prefix])
                .status();
        }
        println!(
            "\n{} MiB image over {}{}: TCP fan-out vs pagecast multicast",
            mib,
            net.name,
            if net.ns.is_some() {
                format!(" (mtu 9000, {rate} per link, {loss}% loss at receivers)")
            } else {
                String::new()
            }
        );
        println!(
            "{:>9}  {:>22}  {:>18}  {:>22}  {:>10}  {:>9}",
            "receivers",
            "goodput/rcv tcp  mcast",
            "cpu s/GB tcp mcast",
            "tx/delivered tcp  mcast",
            "repairs",
            "vs tcp(1)"
        );
        let mut tcp1 = None;
        for n in [1usize, 2, 4] {
            port += 4;
            let t = run(net, false, false, n, &image, &tls, dir.path(), port);
            port += 4;
            let m = run(net, true, false, n, &image, &tls, dir.path(), port);
            if clear {
                port += 4;
                let c = run(net, true, true, n, &image, &tls, dir.path(), port);
                println!(
                    "{:>9}  in the clear {:.2} Gbit/s, cpu {:.2} s/GB: encrypted/clear goodput {:.2}x (target >= 0.90)",
                    n,
                    c.goodput_gbps,
                    c.cpu_per_gb,
                    m.goodput_gbps / c.goodput_gbps
                );
            }
            let base = *tcp1.get_or_insert(t.goodput_gbps);
            println!(
                "{:>9}  {:>7.2} {:>7.2} Gbit/s  {:>8.2} {:>8.2}  {:>12.3} {:>8.3}  {:>10}  {:>8.2}x",
                n,
                t.goodput_gbps,
                m.goodput_gbps,
                t.cpu_per_gb,
                m.cpu_per_gb,
                t.tx_per_delivered,
                m.tx_per_delivered,
                m.repairs,
                m.goodput_gbps / base
            );
        }
    }
    if is_root {
        let _ = Command::new(&script)
            .args(["down", "--prefix", prefix])
            .status();
    }
    println!(
        "\ntx/delivered: bytes leaving the sender on the wire (payloads plus per-packet headers,"
    );
    println!(
        "control included) per byte of pages delivered to one receiver; target at 1% loss: multicast <= 1.05"
    );
    println!(
        "vs tcp(1): multicast goodput per receiver over TCP's to a single receiver; target >= 0.80"
    );
}

fn unsafe_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
