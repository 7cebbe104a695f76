//! What keeping the content index current costs, beside its baselines
//! measured in the same run. Everything runs as real processes: three
//! `index serve` replicas (4 shards, raft log synced) and `pagecast agent`s
//! with KVM micro-VMs.
//!
//! 1. Initial publish of a 1 GiB VM: the time from `vm start` returning
//!    (the VM booted and its content map built) until the index has
//!    acknowledged all its holders, beside the time the same machine takes
//!    to fingerprint 1 GiB (the work the agent does anyway). Target: at
//!    most 0.5 s on top.
//! 2. Steady state: a 1 GiB VM dirtying 5,000 pages/s over a 256 MiB working
//!    set (each frame rewritten every 13 s: real content changes, not hot
//!    pages). Agent CPU (vCPU thread excluded) with publishing, beside the
//!    same agent and VM without an index, as a share of one core. Target:
//!    publishing adds at most 2% of a core.
//! 3. Cold start: 16 agents x 4 VMs x 256 MiB (synthetic families) booted
//!    with the index down, then the index started: holder deltas per second
//!    until every agent's ledger is acknowledged, beside raw RocksDB
//!    ingest of as many deltas (the index benchmark's baseline). Target:
//!    at least 0.3x.
//!
//! Run: `cargo build --release -p pagecast-cli && cargo bench -p
//! pagecast-benches --bench publish` (as root with /dev/kvm; says so and
//! exits otherwise). Knobs: PAGECAST_BENCH_AGENTS (16), PAGECAST_BENCH_VMS
//! (4), PAGECAST_BENCH_VM_MIB (256), PAGECAST_BENCH_BIG_MIB (1024),
//! PAGECAST_BENCH_ONLY (1, 2 or 3: one part only).

use std::path::Path;
use std::time::{Duration, Instant};

use pagecast_agent_api::client::AgentClient;
use pagecast_benches::{env_or, raw_rocksdb};
use pagecast_channel::{Role, Tls};
use pagecast_index::holders::HoldingSum;
use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_memory::synth::{SynthSpec, SyntheticVm};
use pagecast_proto::v1::HolderDelta;
use pagecast_tests::cluster::{AgentProc, IndexCluster, start_vm};

const SHARDS: u32 = 4;

fn vm_start(
    dir: &Path,
    agent: &AgentProc,
    name: &str,
    profile: &str,
    mib: u64,
    rate: u64,
    ws: u64,
) {
    let (rate, ws) = (rate.to_string(), ws.to_string());
    let extra = ["--dirty-rate", &rate, "--working-set", &ws];
    start_vm(
        dir,
        &agent.addr,
        name,
        profile,
        &format!("{mib}MiB"),
        &extra,
    );
}

/// Whether the index lists what `agent`'s ledger says it should.
fn published(idx: &IndexCluster, tls: &Tls, agent: &AgentProc) -> bool {
    let Ok(a) = AgentClient::connect(&agent.addr, tls).and_then(|c| c.audit(SHARDS, true)) else {
        return false;
    };
    let mut c = idx.client();
    let Ok(hosts) = c.hosts(false) else {
        return false;
    };
    let Some(h) = hosts.iter().find(|h| h.name == agent.name) else {
        return false;
    };
    (0..SHARDS).all(|s| {
        let want = HoldingSum::decode(&a.desired[s as usize]).unwrap_or_default();
        c.holdings(s, h.index)
            .is_ok_and(|got| got == want && want.distinct > 0)
    })
}

fn wait_published(
    idx: &IndexCluster,
    tls: &Tls,
    agents: &[AgentProc],
    limit: Duration,
) -> Duration {
    let t = Instant::now();
    let mut done = vec![false; agents.len()];
    while done.iter().any(|d| !d) {
        assert!(t.elapsed() < limit, "not published within {limit:?}");
        for (i, a) in agents.iter().enumerate() {
            if !done[i] {
                done[i] = published(idx, tls, a);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

/// CPU seconds of process `pid`, its threads named `skip` left out.
fn cpu_seconds(pid: u32, skip: &str) -> f64 {
    let tick = 100.0; // USER_HZ
    let mut total = 0.0;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    for t in tasks.flatten() {
        let p = t.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if comm.trim() == skip {
            continue;
        }
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        // Fields after the command name (which is in parentheses).
        let Some(rest) = stat.rsplit(')').next() else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 12 {
            let ut: f64 = f[11].parse().unwrap_or(0.0);
            let st: f64 = f[12].parse().unwrap_or(0.0);
            total += (ut + st) / tick;
        }
    }
    total
}

fn steady_cpu(dir: &Path, idx: Option<&IndexCluster>, big: u64, secs: u64) -> f64 {
    let name = if idx.is_some() {
        "steady-pub"
    } else {
        "steady-off"
    };
    let args: Vec<String> = idx
        .map(|i| vec!["--index".to_owned(), i.addrs()])
        .unwrap_or_default();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = AgentProc::start(dir, name, &argv);
    vm_start(dir, &agent, "steady", "web:index=7", big, 5000, 65_536);
    // Let the initial publication and the first refreshes pass.
    std::thread::sleep(Duration::from_secs(8));
    let pid = agent.pid();
    let c0 = cpu_seconds(pid, "pagecast-vcpu");
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let c1 = cpu_seconds(pid, "pagecast-vcpu");
    (c1 - c0) / t.elapsed().as_secs_f64()
}

fn main() {
    if !pagecast_tests::is_root() || !Path::new("/dev/kvm").exists() {
        println!("publish: skipped (needs root and /dev/kvm for KVM micro-VMs)");
        return;
    }
    let big: u64 = env_or("PAGECAST_BENCH_BIG_MIB", 1024);
    let agents_n: usize = env_or("PAGECAST_BENCH_AGENTS", 16);
    let vms_n: usize = env_or("PAGECAST_BENCH_VMS", 4);
    let vm_mib: u64 = env_or("PAGECAST_BENCH_VM_MIB", 256);
    let only: u32 = env_or("PAGECAST_BENCH_ONLY", 0);
    let run = |part: u32| only == 0 || only == part;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let tls = pagecast_tests::pki::tls("operator", Role::Operator);

    let idx = IndexCluster::start(&dir.join("ix1"), SHARDS);
    if run(1) {
        // 1. Initial publish of one big VM.
        let synth = SyntheticVm::new(SynthSpec::new("web", 9, big << 20).unwrap()).unwrap();
        let mem = synth.materialize(None).unwrap();
        let fp = Fingerprinter::new(2).unwrap();
        let t = Instant::now();
        let f = fp.fingerprint(&mem, &pagecast_pages::ContentKey::CLUSTER, &|_| {});
        let fp_s = t.elapsed().as_secs_f64();
        drop(mem);
        let agent = AgentProc::start(dir, "big", &["--index", &idx.addrs()]);
        // The agent registers its host first.
        std::thread::sleep(Duration::from_secs(1));
        vm_start(dir, &agent, "big", "web:index=9", big, 0, 1024);
        let t = Instant::now();
        // Cheap polling first (the index's per-shard counts for the host near
        // the VM's distinct contents: this VM is the bench's memory above),
        // then the full comparison with what the agent's ledger intends.
        let want = f.distinct().len() as u64;
        let mut c = idx.client();
        loop {
            assert!(t.elapsed() < Duration::from_secs(300), "not published");
            let host = c
                .hosts(false)
                .ok()
                .and_then(|hs| hs.into_iter().find(|h| h.name == "big"));
            if let Some(h) = host {
                let got: u64 = (0..SHARDS)
                    .filter_map(|s| c.holdings(s, h.index).ok())
                    .map(|sum| sum.distinct)
                    .sum();
                // The guest's program shares a few pages with the memory.
                if got + 64 >= want && published(&idx, &tls, &agent) {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let pub_s = t.elapsed().as_secs_f64();
        println!(
            "publish: initial publish of a {big} MiB VM ({} distinct contents)",
            f.distinct().len()
        );
        println!(
            "  fingerprint {fp_s:.2} s (2 threads, the agent's own work)   publish on top {pub_s:.2} s   ratio {:.2}x   (target: at most 0.5 s on top)",
            pub_s / fp_s
        );
        drop(agent);
    }

    if run(2) {
        // 2. Steady state.
        let secs = 15;
        let off = steady_cpu(dir, None, big, secs);
        let on = steady_cpu(dir, Some(&idx), big, secs);
        println!(
            "publish: steady state, {big} MiB VM dirtying 5,000 pages/s over 65,536 pages, {secs} s"
        );
        println!(
            "  agent CPU without index {:.2}% of a core   with publishing {:.2}%   publishing adds {:.2}%   (target: at most 2%)",
            off * 100.0,
            on * 100.0,
            (on - off) * 100.0
        );
    }
    drop(idx);

    if run(3) {
        // 3. Cold start of many agents into a fresh index.
        let mut idx = IndexCluster::start(&dir.join("ix3"), SHARDS);
        let addrs = idx.addrs();
        for i in 0..3 {
            idx.kill(i);
        }
        let fams = ["web", "db", "cache", "batch"];
        let agents: Vec<AgentProc> = (0..agents_n)
            .map(|i| AgentProc::start_with_metrics(dir, &format!("cold{i}"), &["--index", &addrs]))
            .collect();
        for (i, a) in agents.iter().enumerate() {
            for v in 0..vms_n {
                let fam = fams[(i + v) % fams.len()];
                vm_start(
                    dir,
                    a,
                    &format!("c{i}v{v}"),
                    &format!("{fam}:index={}", i * vms_n + v),
                    vm_mib,
                    0,
                    1024,
                );
            }
        }
        for i in 0..3 {
            idx.spawn(i);
        }
        idx.wait_leaders();
        let t = Instant::now();
        wait_published(&idx, &tls, &agents, Duration::from_secs(900));
        let secs = t.elapsed().as_secs_f64();
        // Deltas the index had to take: one per (content, host), what the
        // agents' ledgers list; batches sent again after a timeout are
        // counted apart, not as throughput.
        let needed: u64 = agents
            .iter()
            .map(|a| {
                let audit = AgentClient::connect(&a.addr, &tls)
                    .and_then(|c| c.audit(SHARDS, true))
                    .expect("audit");
                audit
                    .desired
                    .iter()
                    .map(|d| HoldingSum::decode(d).unwrap_or_default().distinct)
                    .sum::<u64>()
            })
            .sum();
        let sent: f64 = agents
            .iter()
            .map(|a| a.metric("pagecast_agent_index_deltas_total"))
            .sum();
        let deltas = needed as f64;
        drop(agents);
        drop(idx);
        // The baseline: as many deltas straight into RocksDB, 4 writers.
        let n = deltas as u64;
        let all: Vec<Vec<HolderDelta>> = (0..4u64)
            .map(|w| {
                (0..n / 4)
                    .map(|i| HolderDelta {
                        hash: blake3::hash(&(w << 40 | i).to_le_bytes())
                            .as_bytes()
                            .to_vec()
                            .into(),
                        host: 1 + (i % 16) as u32,
                        frames: 1,
                        before: 0,
                    })
                    .collect()
            })
            .collect();
        let raw = raw_rocksdb(&all, 8192);
        let rate = deltas / secs;
        println!(
            "publish: cold start, {agents_n} agents x {vms_n} VMs x {vm_mib} MiB into 3 replicas ({SHARDS} shards)"
        );
        println!(
            "  {deltas:.0} deltas in {secs:.1} s = {rate:.0} deltas/s   raw RocksDB {raw:.0} deltas/s   ratio {:.2}x   (target: at least 0.3x)",
            rate / raw
        );
        println!(
            "  the agents sent {sent:.0} deltas ({:.2}x: batches sent again after an attempt timed out)",
            sent / deltas.max(1.0)
        );
    }
}
