//! Gang evacuation and cloning, measured end to end on one cluster of real
//! processes: three `index serve` replicas and agents with KVM micro-VMs.
//!
//! Evacuation: 8 VMs of 512 MiB from 4 synthetic families on 2 source
//! hosts (rack r1) move to 3 destinations (rack r2) that already run a VM
//! of three of those families; each source's rate is 1 Gbit/s (paced by
//! the agents), guests dirty 1,000 pages/s. Three strategies in turn, each
//! from the same starting state (every VM stopped and started again):
//! precopy, vmscatter, pagecast. Printed for each: source bytes, core
//! bytes, eviction time, total time, downtime per VM; pagecast as ratios
//! of precopy and of the plan's wire limit (the distinct content no
//! destination holds, sent once, and its time at the source rate).
//! Targets: source bytes at most 1.05x the wire limit; eviction at most
//! 1.25x the wire limit's time; both at most half of precopy's.
//!
//! Clone: one 512 MiB VM to 4 hosts, beside 4 sequential migrations of
//! identical VMs to the same hosts (no reuse, as a user would copy it).
//! Targets: source bytes at most 1.1x one copy; time at most 0.4x of the
//! four migrations.
//!
//! Run: `cargo bench -p pagecast-benches --bench evacuate` (needs
//! /dev/kvm; says so and exits otherwise). Knobs: PAGECAST_BENCH_VM_MIB
//! (512), PAGECAST_BENCH_RATE (1G), PAGECAST_BENCH_STRATEGIES (a comma
//! list; the ratios need precopy and pagecast), PAGECAST_BENCH_NO_CLONE
//! (set: skip the clone), PAGECAST_BENCH_EVACUATE_ARGS (more evacuate
//! flags, e.g. `--release-early`), PAGECAST_BENCH_STEPS (set: print each job's
//! steps with their times, and where the agents' logs are).

use std::path::Path;
use std::time::{Duration, Instant};

use pagecast_benches::env_or;
use pagecast_tests::cluster::{AgentProc, IndexCluster, cli, cli_json};

const FAMILIES: [&str; 4] = ["web", "db", "cache", "batch"];

struct Rig<'a> {
    dir: &'a Path,
    idx: IndexCluster,
    agents: Vec<AgentProc>,
    mib: u64,
}

impl Rig<'_> {
    fn addr(&self, host: &str) -> String {
        self.agents
            .iter()
            .find(|a| a.name == host)
            .expect("an agent")
            .addr
            .clone()
    }

    fn start(&self, host: &str, name: &str, profile: &str, rate: u64) {
        let out = cli(
            self.dir,
            &[
                "vm",
                "start",
                "--agent",
                &self.addr(host),
                "--name",
                name,
                "--synthetic",
                profile,
                "--memory",
                &format!("{}MiB", self.mib),
                "--dirty-rate",
                &rate.to_string(),
                "--working-set",
                "4096",
            ],
        );
        assert!(
            out.status.success(),
            "vm start {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops every VM on every agent.
    fn clear(&self) {
        for a in &self.agents {
            let l = cli_json(self.dir, &["vm", "list", "--agent", &a.addr, "--json"]);
            for v in l["vms"].as_array().unwrap() {
                let _ = cli(
                    self.dir,
                    &[
                        "vm",
                        "stop",
                        "--agent",
                        &a.addr,
                        "--name",
                        v["name"].as_str().unwrap(),
                    ],
                );
            }
        }
    }

    fn wait_listed(&self, n: usize) {
        let t = Instant::now();
        loop {
            let recs = self.idx.client().vms(false).map(|v| v.len()).unwrap_or(0);
            if recs == n {
                // And the holders acknowledged: give the publishers a moment.
                std::thread::sleep(Duration::from_secs(3));
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(120), "VMs not listed");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The starting state: 8 VMs on the sources, residents on the
    /// destinations.
    fn populate(&self) {
        self.clear();
        for i in 0..8 {
            let host = if i < 4 { "s1" } else { "s2" };
            let fam = FAMILIES[i % 4];
            self.start(
                host,
                &format!("vm{i}"),
                &format!("{fam}:index={}", i + 1),
                1000,
            );
        }
        for (d, fam) in [("d1", "web"), ("d2", "db"), ("d3", "cache")] {
            self.start(d, &format!("res-{fam}"), &format!("{fam}:index=0"), 0);
        }
        self.wait_listed(11);
    }
}

fn mib(b: f64) -> String {
    format!("{:.0} MiB", b / (1 << 20) as f64)
}

fn main() {
    if !Path::new("/dev/kvm").exists() {
        println!("evacuate: skipped (needs /dev/kvm for KVM micro-VMs)");
        return;
    }
    let vm_mib: u64 = env_or("PAGECAST_BENCH_VM_MIB", 512);
    let rate: String = env_or("PAGECAST_BENCH_RATE", "1G".to_owned());
    let rate_bps = pagecast_pages::units::parse_bits_per_second(&rate).expect("a rate");
    let mut root = tempfile::tempdir().unwrap();
    if std::env::var_os("PAGECAST_BENCH_STEPS").is_some() {
        root.disable_cleanup(true);
        println!("logs kept in {}", root.path().display());
    }
    let dir = root.path();
    let idx = IndexCluster::start(dir, 4);
    let addrs = idx.addrs();
    let hosts = [
        ("s1", "r1"),
        ("s2", "r1"),
        ("d1", "r2"),
        ("d2", "r2"),
        ("d3", "r2"),
    ];
    let agents = hosts
        .iter()
        .map(|(h, r)| {
            AgentProc::start(
                dir,
                h,
                &[
                    "--index",
                    &addrs,
                    "--rack",
                    r,
                    "--link",
                    &rate,
                    "--capacity",
                    "8GiB",
                ],
            )
        })
        .collect();
    let rig = Rig {
        dir,
        idx,
        agents,
        mib: vm_mib,
    };
    println!(
        "evacuate: 8 VMs x {vm_mib} MiB (4 families) on 2 sources, 3 destinations running 3 of the families, {rate}bit/s per source, guests dirtying 1,000 pages/s"
    );
    println!(
        "{:<10} {:>11} {:>11} {:>10} {:>9} {:>22}  ok",
        "strategy", "source", "core", "eviction", "total", "downtime min/med/max"
    );
    let strategies: String = env_or(
        "PAGECAST_BENCH_STRATEGIES",
        "precopy,vmscatter,pagecast".to_owned(),
    );
    let show_steps = std::env::var_os("PAGECAST_BENCH_STEPS").is_some();
    // More evacuate flags, e.g. PAGECAST_BENCH_EVACUATE_ARGS=--release-early.
    let extra: Vec<String> = std::env::var("PAGECAST_BENCH_EVACUATE_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let mut rows = Vec::new();
    for strategy in strategies.split(',') {
        rig.populate();
        let out = cli(
            dir,
            &[
                "evacuate",
                "--index",
                &addrs,
                "--from",
                "s1,s2",
                "--to",
                "d1,d2,d3",
                "--strategy",
                strategy,
                "--max-downtime",
                "300",
                "--json",
                "--no-progress",
            ]
            .into_iter()
            .chain(extra.iter().map(String::as_str))
            .collect::<Vec<_>>(),
        );
        if show_steps {
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }
        let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{strategy}: no report ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let mut downs: Vec<f64> = rep["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["downtime_ms"].as_f64().unwrap_or(0.0))
            .collect();
        downs.sort_by(f64::total_cmp);
        let src = rep["source_bytes"].as_f64().unwrap();
        let core = rep["core_bytes"].as_f64().unwrap();
        let ev = rep["eviction_s"].as_f64().unwrap();
        let total = rep["total_s"].as_f64().unwrap();
        println!(
            "{:<10} {:>11} {:>11} {:>9.2}s {:>8.2}s {:>6.1}/{:>5.1}/{:>6.1} ms  {}",
            strategy,
            mib(src),
            mib(core),
            ev,
            total,
            downs.first().copied().unwrap_or(0.0),
            downs.get(downs.len() / 2).copied().unwrap_or(0.0),
            downs.last().copied().unwrap_or(0.0),
            rep["ok"]
        );
        for v in rep["vms"].as_array().unwrap() {
            if v["ok"] != true || v["verified"] != true {
                println!("  {} did not move: {}", v["name"], v["error"]);
            }
        }
        rows.push((strategy, src, ev, rep));
    }
    let find = |name: &str| rows.iter().find(|r| r.0 == name);
    if let (Some((_, pre_src, pre_ev, _)), Some((_, pc_src, pc_ev, pc))) =
        (find("precopy"), find("pagecast"))
    {
        let wire = pc["predicted"]["source_bytes"].as_f64().unwrap();
        let wire_s = wire * 8.0 / rate_bps as f64;
        println!(
            "pagecast: source bytes {:.2}x the wire limit ({}; target <= 1.05x), {:.2}x precopy (target <= 0.5x)",
            pc_src / wire,
            mib(wire),
            pc_src / pre_src
        );
        println!(
            "pagecast: eviction {:.2}x the wire limit's time ({wire_s:.2} s at {rate}bit/s; target <= 1.25x), {:.2}x precopy (target <= 0.5x)",
            pc_ev / wire_s,
            pc_ev / pre_ev
        );
    }
    if std::env::var_os("PAGECAST_BENCH_NO_CLONE").is_some() {
        return;
    }

    // Clone to 4 hosts beside 4 sequential migrations.
    rig.clear();
    rig.start("s1", "tmpl", "web:index=5", 1000);
    for i in 0..4 {
        rig.start("s1", &format!("copy{i}"), "web:index=5", 1000);
    }
    rig.wait_listed(5);
    let t = Instant::now();
    let out = cli(
        dir,
        &[
            "clone",
            "--index",
            &addrs,
            "--vm",
            "tmpl",
            "--to",
            "d1,d2,d3,s2",
            "--bandwidth",
            &rate,
            "--max-downtime",
            "300",
            "--json",
            "--no-progress",
        ],
    );
    let clone_s = t.elapsed().as_secs_f64();
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "clone: no report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let one_copy = {
        let l = cli_json(dir, &["vm", "list", "--agent", &rig.addr("s1"), "--json"]);
        let _ = l;
        // Non-zero pages of the template, from the index's record.
        let recs = rig.idx.client().vms(false).unwrap();
        recs.iter()
            .find(|r| r.name == "tmpl")
            .map_or(0.0, |r| r.nonzero_frames as f64 * 4096.0)
    };
    let t = Instant::now();
    for (i, d) in ["d1", "d2", "d3", "s2"].iter().enumerate() {
        let vm = format!("copy{i}");
        let from = rig.addr("s1");
        let to = rig.addr(d);
        let out = cli(
            dir,
            &[
                "migrate",
                "--vm",
                &vm,
                "--from",
                &from,
                "--to",
                &to,
                "--bandwidth",
                &rate,
                "--max-downtime",
                "300",
                "--json",
                "--quiet",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let seq_s = t.elapsed().as_secs_f64();
    let sent = c["source_bytes"].as_f64().unwrap();
    println!(
        "clone: {vm_mib} MiB VM to 4 hosts in {clone_s:.2} s (4 sequential migrations: {seq_s:.2} s, ratio {:.2}x; target <= 0.4x), source bytes {} = {:.2}x one copy ({}; target <= 1.1x), source paused {:.1} ms, ok {}",
        clone_s / seq_s,
        mib(sent),
        sent / one_copy,
        mib(one_copy),
        c["source_downtime_ms"].as_f64().unwrap_or(0.0),
        c["ok"]
    );
}
