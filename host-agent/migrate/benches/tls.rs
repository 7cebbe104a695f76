//! Live migration through mutual TLS against the same migration on plain
//! TCP, at 1 Gbit/s.
//!
//! One KVM micro-VM (256 MiB of synthetic `web` memory, its guest writing
//! 2,000 pages/s) migrates from this process to a destination thread in it,
//! paced to `PAGECAST_BENCH_RATE` (default 1G). The production link is
//! `ChannelLink` (rustls, TLS 1.3); the baseline is a link written here for
//! the benchmark: the same `[u32 length][protobuf]` frames on a bare TCP
//! socket (agents have no such mode). The two alternate, `RUNS` times each;
//! medians are printed with the ratio TLS/plain of throughput (bytes sent
//! per second of the whole migration) and each side's CPU per GB sent (the
//! migrating thread on the source, the receiving thread on the
//! destination; fingerprinting on the hashing pool is the same in both and
//! left out). Target: TLS at 0.95x or more of plain.
//!
//! Run: `cargo bench -p pagecast-migrate --bench tls`. Needs /dev/kvm (says
//! so and skips otherwise). Knobs: PAGECAST_BENCH_MIB (default 256),
//! PAGECAST_BENCH_RUNS (default 3), PAGECAST_BENCH_RATE (default 1G).

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use pagecast_channel::ca::Authority;
use pagecast_channel::{Channel, FrameDecoder, Role, frame};
use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_memory::kvm::{InitialMemory, MicroVm, MicroVmConfig};
use pagecast_memory::synth::{SynthSpec, SyntheticVm};
use pagecast_migrate::{
    ChannelLink, MigrateOptions, MigrationError, MigrationLink, NoLocalContent, Switchover,
    migrate_in, migrate_out,
};
use pagecast_proto::v1;
use prost::Message;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// CPU seconds the calling thread has used.
fn thread_cpu() -> f64 {
    // SAFETY: getrusage(2) fills the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a live rusage.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// The baseline link: migration frames on a bare TCP socket.
struct PlainLink(TcpStream);

impl MigrationLink for PlainLink {
    fn send(&mut self, body: v1::migrate_frame::Body) -> Result<(), MigrationError> {
        self.0
            .write_all(&frame(&v1::MigrateFrame { body: Some(body) }))
            .map_err(|e| MigrationError::Protocol(e.to_string()))
    }

    fn recv(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<v1::migrate_frame::Body, MigrationError> {
        self.0
            .set_read_timeout(timeout)
            .map_err(|e| MigrationError::Protocol(e.to_string()))?;
        let b = FrameDecoder
            .next(&mut self.0, "plain")
            .map_err(|e| MigrationError::Protocol(e.to_string()))?;
        match v1::MigrateFrame::decode(&b[..]) {
            Ok(v1::MigrateFrame { body: Some(b) }) => Ok(b),
            _ => Err(MigrationError::Protocol("bad frame".into())),
        }
    }
}

/// One migration of a fresh VM over TLS or plain TCP: (Gbit/s, source CPU
/// s/GB, destination CPU s/GB).
fn run(mib: u64, rate: u64, tls: bool, fp: &Fingerprinter) -> (f64, f64, f64) {
    let synth = SyntheticVm::new(SynthSpec::new("web", 0, mib << 20).expect("size")).expect("vm");
    let cfg = MicroVmConfig {
        memory_bytes: mib << 20,
        working_set: std::iter::once(16..16 + 4096).collect(),
        dirty_rate: 2000,
    };
    let vm = MicroVm::boot(&cfg, InitialMemory::Synthetic(&synth)).expect("boot");
    std::thread::sleep(Duration::from_millis(200));
    let ca = Authority::generate().expect("CA");
    let (a, b) = (
        ca.issue("src", Role::Host, 1).expect("cert"),
        ca.issue("dst", Role::Host, 1).expect("cert"),
    );
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let (report, dest_cpu) = std::thread::scope(|s| {
        let dst = s.spawn(move || {
            let sock = l.accept().expect("accept").0;
            let mut link: Box<dyn MigrationLink> = if tls {
                Box::new(ChannelLink::new(Channel::server(sock, &b).expect("TLS")))
            } else {
                Box::new(PlainLink(sock))
            };
            let begin = match link.recv(Some(Duration::from_secs(10))).expect("begin") {
                v1::migrate_frame::Body::Begin(b) => b,
                other => panic!("expected begin, got {other:?}"),
            };
            let fp = Fingerprinter::new(1).expect("pool");
            let cpu = thread_cpu();
            let mut started = None;
            migrate_in(
                &mut *link,
                &begin,
                &NoLocalContent,
                &fp,
                &mut |region, state| {
                    let vm = MicroVm::restore(region, &state, 0).map_err(|e| e.to_string())?;
                    let p = vm.progress().map_err(|e| e.to_string())?;
                    started = Some(vm);
                    Ok(p)
                },
            )
            .expect("incoming");
            let cpu = thread_cpu() - cpu;
            if let Some(vm) = started {
                vm.stop().expect("stop");
            }
            cpu
        });
        let sock = TcpStream::connect(addr).expect("connect");
        let mut link: Box<dyn MigrationLink> = if tls {
            Box::new(ChannelLink::new(Channel::client(sock, &a).expect("TLS")))
        } else {
            Box::new(PlainLink(sock))
        };
        let opts = MigrateOptions {
            bandwidth_bps: Some(rate),
            max_downtime: Duration::from_millis(300),
            // The plain link reports no timeouts, which post-copy's
            // polling needs; this bench measures the link, not the mode.
            switchover: Switchover::Precopy,
            ..MigrateOptions::default()
        };
        let cpu = thread_cpu();
        let r = migrate_out(&vm, &mut *link, fp, &opts, &mut |_| {}).expect("migration");
        let src_cpu = thread_cpu() - cpu;
        ((r, src_cpu), dst.join().expect("destination"))
    });
    let (r, src_cpu) = report;
    vm.stop().expect("stop");
    assert!(r.verified, "unverified migration");
    let gb = r.bytes_sent as f64 / 1e9;
    (
        r.bytes_sent as f64 * 8.0 / (r.total_ms / 1e3) / 1e9,
        src_cpu / gb,
        dest_cpu / gb,
    )
}

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("migrate tls: skipped (needs /dev/kvm for KVM micro-VMs)");
        return;
    }
    let mib: u64 = env_or("PAGECAST_BENCH_MIB", 256);
    let runs: usize = env_or("PAGECAST_BENCH_RUNS", 3usize).max(1);
    let rate_s: String = env_or("PAGECAST_BENCH_RATE", "1G".to_owned());
    let rate = pagecast_pages::units::parse_bits_per_second(&rate_s).expect("a rate");
    let fp = Fingerprinter::new(2).expect("pool");
    let (mut t, mut p, mut ratio) = (vec![], vec![], vec![]);
    let (mut ts, mut td, mut ps, mut pd) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let plain = run(mib, rate, false, &fp);
        let tls = run(mib, rate, true, &fp);
        t.push(tls.0);
        p.push(plain.0);
        ratio.push(tls.0 / plain.0);
        ts.push(tls.1);
        td.push(tls.2);
        ps.push(plain.1);
        pd.push(plain.2);
    }
    println!(
        "migrate tls: {mib} MiB micro-VM (web, 2000 pages/s), paced to {rate_s}bit/s, median of {runs}"
    );
    println!(
        "  TLS   {:.3} Gbit/s  source CPU {:.3} s/GB  destination CPU {:.3} s/GB",
        median(&mut t),
        median(&mut ts),
        median(&mut td)
    );
    println!(
        "  plain {:.3} Gbit/s  source CPU {:.3} s/GB  destination CPU {:.3} s/GB",
        median(&mut p),
        median(&mut ps),
        median(&mut pd)
    );
    println!(
        "  TLS/plain throughput {:.3}x (target >= 0.95x)",
        median(&mut ratio)
    );
}
