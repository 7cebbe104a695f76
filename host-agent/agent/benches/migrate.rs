//! Live migration of a KVM micro-VM between two agents over loopback TCP,
//! paced to a link rate (default 1 Gbit/s), through the agent's own code
//! (`Agent::migrate_out` connecting to a destination `Agent::migrate_in`).
//!
//! Scenarios (each repeated, interleaved, medians printed):
//! - dirty rates 0, 5,000 and 50,000 pages/s into an empty destination:
//!   total time against the wire limit (bytes sent / rate, and the non-zero
//!   pages a QEMU-style pre-copy sends / rate), downtime, bytes sent against
//!   the non-zero pages;
//! - a destination already running a VM that holds half of the source's
//!   frames: bytes sent against the non-zero pages.
//!
//! Environment: PAGECAST_BENCH_MIB (VM memory, default 1024),
//! PAGECAST_BENCH_RATE (bits/s, default 1e9), PAGECAST_BENCH_REPS (3),
//! PAGECAST_BENCH_WS (working-set pages, default 65536).
//!
//! Run: `cargo bench -p pagecast-agent --bench migrate`

use std::fs::OpenOptions;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pagecast_agent::Agent;
use pagecast_channel::ca::Authority;
use pagecast_channel::{Channel, Role};
use pagecast_memory::synth::{SynthSpec, SyntheticVm};
use pagecast_migrate::ChannelLink;
use pagecast_pages::PAGE_SIZE;
use pagecast_proto::v1;
use pagecast_testkit::{Need, needs};

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Serves incoming migrations for `agent` on a loopback port.
fn destination(agent: Arc<Agent>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let agent = agent.clone();
            std::thread::spawn(move || serve(&agent, s));
        }
    });
    addr
}

fn serve(agent: &Agent, s: TcpStream) {
    let mut ch = Channel::server(s, agent.tls()).unwrap();
    let req: v1::AgentRequest = ch.recv("request").unwrap();
    let Some(v1::agent_request::Body::Incoming(i)) = req.body else {
        panic!("expected an incoming migration");
    };
    let mut link = ChannelLink::new(ch);
    if let Err(e) = agent.migrate_in(&mut link, &i.source, &i.job) {
        eprintln!("destination: {e}");
    }
}

fn start(agent: &Agent, name: &str, image: &Path, rate: u64, ws: u64) {
    agent
        .vm_start(&v1::VmStartRequest {
            name: name.into(),
            image: image.display().to_string(),
            synthetic: String::new(),
            memory_bytes: 0,
            dirty_rate: rate,
            working_set_pages: ws,
            domain: String::new(),
            force: false,
        })
        .unwrap();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let mib: u64 = env_or("PAGECAST_BENCH_MIB", 1024);
    let bps: u64 = env_or("PAGECAST_BENCH_RATE", 1_000_000_000);
    let reps: usize = env_or("PAGECAST_BENCH_REPS", 3);
    let ws: u64 = env_or("PAGECAST_BENCH_WS", 65_536);
    let settle: u64 = env_or("PAGECAST_BENCH_SETTLE_MS", 500);
    if !needs("the migration benchmark", &[Need::Kvm]) {
        return;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    // The source image: a synthetic VM (25% zero pages by default).
    let image = dir.path().join("vm.raw");
    SyntheticVm::new(SynthSpec::new("web", 0, mib << 20).unwrap())
        .unwrap()
        .write_image(&image, &|_| {})
        .unwrap();
    // The destination's resident VM: the source's first half, zero above.
    let half = dir.path().join("half.raw");
    std::fs::copy(&image, &half).unwrap();
    {
        let f = OpenOptions::new().write(true).open(&half).unwrap();
        f.set_len((mib << 20) / 2).unwrap();
        f.set_len(mib << 20).unwrap();
    }
    let ca = Authority::generate().unwrap();
    let host = |n: &str| ca.issue(n, Role::Host, 1).unwrap();
    let src = Agent::new("bench-src", host("bench-src"), None, threads).unwrap();
    let dst = Arc::new(Agent::new("bench-dst", host("bench-dst"), None, threads).unwrap());
    let to = destination(dst.clone());
    // Every arrival belongs to a job the destination knows, which lists
    // the source and the VM it sends (opened again for each VM).
    let operator = pagecast_channel::Identity {
        name: "bench".into(),
        role: Role::Operator,
    };
    let expect = |vm: &str| {
        dst.open_job(
            &v1::JobOpen {
                job: "bench".into(),
                deadline_ms: 24 * 3600 * 1000,
                peers: vec![v1::JobPeer {
                    host: "bench-src".into(),
                    role: v1::JobRole::Source as i32,
                    vms: vec![vm.to_owned()],
                }],
                ..Default::default()
            },
            &operator,
        )
        .unwrap();
    };

    println!(
        "migration of a {mib} MiB micro-VM over loopback paced to {:.2} Gbit/s, working set {ws} pages, {reps} reps (medians)",
        bps as f64 / 1e9
    );
    let scenarios: [(&str, u64, bool); 4] = [
        ("dirty 0/s", 0, false),
        ("dirty 5000/s", 5000, false),
        ("dirty 50000/s", 50_000, false),
        ("dest holds half, dirty 0/s", 0, true),
    ];
    let mut runs: Vec<Vec<v1::MigrateResult>> = (0..scenarios.len()).map(|_| Vec::new()).collect();
    for n in 0..reps {
        for (i, &(label, rate, holds_half)) in scenarios.iter().enumerate() {
            let name = format!("vm{i}-{n}");
            if holds_half {
                start(&dst, "resident", &half, 0, 1);
            }
            start(&src, &name, &image, rate, ws);
            expect(&name);
            // Let the guest reach its pace.
            std::thread::sleep(Duration::from_millis(settle));
            let req = v1::MigrateRequest {
                vm: name.clone(),
                to: to.clone(),
                bandwidth_bps: bps,
                max_downtime_ms: 50,
                verify_full: false,
                job: "bench".into(),
                ..Default::default()
            };
            let t0 = std::time::Instant::now();
            let mut phases: Vec<(&'static str, u128)> = Vec::new();
            let rep = src
                .migrate_out(&req, &mut |p| {
                    let phase = pagecast_proto::names::phase(p.phase);
                    if phases.last().is_none_or(|l| l.0 != phase) {
                        phases.push((phase, t0.elapsed().as_millis()));
                    }
                })
                .unwrap();
            eprintln!(
                "  {label:<28} rep {n}: total {:.0} ms, downtime {:.1} ms, {} rounds, sent {} pages, {} local, throttle {}%",
                rep.total_ms,
                rep.downtime_ms,
                rep.rounds.len(),
                rep.pages_sent,
                rep.pages_local,
                rep.max_throttle_pct,
            );
            if std::env::var_os("PAGECAST_BENCH_PHASES").is_some() {
                eprintln!("    phases (ms from start): {phases:?}");
            }
            assert!(rep.verified);
            dst.vm_stop(&name).unwrap();
            if holds_half {
                dst.vm_stop("resident").unwrap();
            }
            runs[i].push(rep);
        }
    }

    let rate_bytes = bps as f64 / 8.0;
    println!(
        "{:<28} {:>9} {:>10} {:>10} {:>7} {:>10} {:>7} {:>10} {:>9} {:>9}",
        "scenario",
        "total ms",
        "wire ms",
        "ratio",
        "qemu ms",
        "ratio",
        "down ms",
        "bytes/nz",
        "rounds",
        "throttle"
    );
    for (i, &(label, _, _)) in scenarios.iter().enumerate() {
        let r = &runs[i];
        let total = median(r.iter().map(|x| x.total_ms).collect());
        let wire = median(
            r.iter()
                .map(|x| x.bytes_sent as f64 / rate_bytes * 1e3)
                .collect(),
        );
        let nz = r[0].nonzero_pages as f64 * PAGE_SIZE as f64;
        let qemu = nz / rate_bytes * 1e3;
        let down = median(r.iter().map(|x| x.downtime_ms).collect());
        let bytes = median(r.iter().map(|x| x.bytes_sent as f64 / nz).collect());
        let rounds = median(r.iter().map(|x| x.rounds.len() as f64).collect());
        let thr = median(r.iter().map(|x| f64::from(x.max_throttle_pct)).collect());
        println!(
            "{label:<28} {total:>9.0} {wire:>10.0} {:>9.2}x {qemu:>7.0} {:>9.2}x {down:>7.1} {bytes:>9.3}x {rounds:>9.0} {thr:>8.0}%",
            total / wire,
            total / qemu,
        );
    }
    println!(
        "wire ms: bytes sent / rate; qemu ms: non-zero pages / rate (what a pre-copy without reuse sends once)"
    );
    println!(
        "targets: downtime <= 50 ms at 5000/s; total <= 1.2x wire at 0/s; bytes <= 0.55x non-zero when the destination holds half"
    );
}
