//! A guest that dirties memory faster than its link: `--switchover auto`
//! (pre-copy, then post-copy where the rounds stall) against `precopy`
//! (the same rounds, slowing the guest down until the rest fits the
//! downtime target), measured in the same run.
//!
//! One KVM micro-VM (128 MiB of synthetic `web` memory, its guest writing
//! 50,000 pages/s over a 32 MiB working set) migrates from this process to
//! a destination thread in it over an authenticated loopback connection
//! paced to `PAGECAST_BENCH_RATE` (default 200M). The two modes alternate,
//! `PAGECAST_BENCH_RUNS` times each (default 2); medians are printed:
//! - the migration's time and downtime, the highest throttle, the rounds;
//! - post-copy's cost: the pages the guest touched before they arrived
//!   (faults, each one asked for), how long the pages after the resume
//!   took, and the guest's work rate meanwhile (its progress counter at
//!   the destination) against its rate before the migration;
//! - the guest's work over the whole migration against its rate before
//!   (what the throttle or the faults cost it);
//! - auto/precopy of the migration's time.
//!
//! Run: `cargo bench -p pagecast-migrate --bench postcopy`. Needs /dev/kvm
//! (says so and skips otherwise).

use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pagecast_channel::ca::Authority;
use pagecast_channel::{Channel, Role};
use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_memory::kvm::{InitialMemory, MicroVm, MicroVmConfig};
use pagecast_memory::synth::{SynthSpec, SyntheticVm};
use pagecast_migrate::{
    ChannelLink, MigrateOptions, MigrationLink, MigrationReport, NoLocalContent, Switchover,
    migrate_in, migrate_out,
};
use pagecast_proto::v1;

const MIB: u64 = 128;
const RATE: u64 = 50_000;
const WORKING_SET: u64 = 8192;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One migration's figures.
struct Run {
    report: MigrationReport,
    /// The guest's progress per second before the migration.
    rate_before: f64,
    /// Over the whole migration, against before.
    work_during: f64,
    /// During post-copy (from the resume to the last page), against
    /// before; 0 without post-copy.
    work_postcopy: f64,
}

fn run(mode: Switchover, bps: u64, fp: &Fingerprinter) -> Run {
    let synth = SyntheticVm::new(SynthSpec::new("web", 0, MIB << 20).expect("size")).expect("vm");
    let cfg = MicroVmConfig {
        memory_bytes: MIB << 20,
        working_set: std::iter::once(16..16 + WORKING_SET).collect(),
        dirty_rate: RATE,
    };
    let vm = MicroVm::boot(&cfg, InitialMemory::Synthetic(&synth)).expect("boot");
    std::thread::sleep(Duration::from_millis(300));
    let (p0, t0) = (vm.progress().expect("progress"), Instant::now());
    std::thread::sleep(Duration::from_millis(500));
    let rate_before = (vm.progress().expect("progress") - p0) as f64 / t0.elapsed().as_secs_f64();
    let ca = Authority::generate().expect("CA");
    let (a, b) = (
        ca.issue("src", Role::Host, 1).expect("cert"),
        ca.issue("dst", Role::Host, 1).expect("cert"),
    );
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let arrived: Mutex<Option<MicroVm>> = Mutex::new(None);
    let start = vm.progress().expect("progress");
    let began = Instant::now();
    let report = std::thread::scope(|s| {
        let dst = s.spawn(|| {
            let sock = l.accept().expect("accept").0;
            let mut link = ChannelLink::new(Channel::server(sock, &b).expect("TLS"));
            let begin = match link.recv(Some(Duration::from_secs(10))).expect("begin") {
                v1::migrate_frame::Body::Begin(b) => b,
                other => panic!("expected begin, got {other:?}"),
            };
            let fp = Fingerprinter::new(1).expect("pool");
            migrate_in(
                &mut link,
                &begin,
                &NoLocalContent,
                &fp,
                &mut |region, st| {
                    let vm = MicroVm::restore(region, &st, RATE).map_err(|e| e.to_string())?;
                    let p = vm.progress().map_err(|e| e.to_string())?;
                    *arrived.lock().expect("lock") = Some(vm);
                    Ok(p)
                },
            )
            .expect("incoming");
        });
        let sock = TcpStream::connect(addr).expect("connect");
        let mut link = ChannelLink::new(Channel::client(sock, &a).expect("TLS"));
        let opts = MigrateOptions {
            bandwidth_bps: Some(bps),
            max_downtime: Duration::from_millis(100),
            switchover: mode,
            ..MigrateOptions::default()
        };
        let r = migrate_out(&vm, &mut link, fp, &opts, &mut |_| {}).expect("migration");
        dst.join().expect("destination");
        r
    });
    let took = began.elapsed().as_secs_f64();
    let dest = arrived.into_inner().expect("lock").expect("it arrived");
    let end = dest.progress().expect("progress");
    assert!(report.verified, "unverified migration");
    let work_postcopy = if report.postcopy && report.postcopy_ms > 0.0 {
        (end - report.progress_after) as f64 / (report.postcopy_ms / 1e3) / rate_before
    } else {
        0.0
    };
    dest.stop().expect("stop");
    vm.stop().expect("stop");
    Run {
        work_during: (end - start) as f64 / took / rate_before,
        work_postcopy,
        rate_before,
        report,
    }
}

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("migrate postcopy: skipped (needs /dev/kvm for KVM micro-VMs)");
        return;
    }
    let runs: usize = env_or("PAGECAST_BENCH_RUNS", 2usize).max(1);
    let rate_s: String = env_or("PAGECAST_BENCH_RATE", "200M".to_owned());
    let bps = pagecast_pages::units::parse_bits_per_second(&rate_s).expect("a rate");
    let fp = Fingerprinter::new(2).expect("pool");
    let (mut pre, mut auto) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        pre.push(run(Switchover::Precopy, bps, &fp));
        auto.push(run(Switchover::Auto, bps, &fp));
    }
    println!(
        "migrate postcopy: {MIB} MiB micro-VM (web, {RATE} pages/s over {WORKING_SET} pages), \
         paced to {rate_s}bit/s, downtime target 100 ms, median of {runs}"
    );
    let m = |v: &[Run], f: &dyn Fn(&Run) -> f64| median(v.iter().map(f).collect());
    for (name, v) in [("precopy (baseline)", &pre), ("auto", &auto)] {
        println!(
            "  {name:<18} {:>6.2} s, downtime {:>6.1} ms, throttle up to {:>2.0}%, {:>2.0} rounds, \
             post-copy in {} of {runs}",
            m(v, &|r| r.report.total_ms / 1e3),
            m(v, &|r| r.report.downtime_ms),
            m(v, &|r| f64::from(r.report.max_throttle_pct)),
            m(v, &|r| r.report.rounds.len() as f64),
            v.iter().filter(|r| r.report.postcopy).count(),
        );
        println!(
            "  {:<18} guest work during the migration {:.2}x of before ({:.0} progress/s before)",
            "",
            m(v, &|r| r.work_during),
            m(v, &|r| r.rate_before),
        );
    }
    println!(
        "  auto post-copy: {:.0} pages after the resume in {:.0} ms, {:.0} faults asked for, \
         guest work meanwhile {:.2}x of before",
        m(&auto, &|r| r.report.postcopy_pages as f64),
        m(&auto, &|r| r.report.postcopy_ms),
        m(&auto, &|r| r.report.postcopy_requested as f64),
        m(&auto, &|r| r.work_postcopy),
    );
    println!(
        "  auto/precopy migration time {:.3}x, guest work during it {:.3}x",
        m(&auto, &|r| r.report.total_ms) / m(&pre, &|r| r.report.total_ms),
        m(&auto, &|r| r.work_during) / m(&pre, &|r| r.work_during),
    );
}
