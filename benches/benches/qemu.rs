//! Unmodified QEMU guests: direct QEMU-to-QEMU migration against migration
//! through pagecast's stream proxy, the same guests in the same run.
//!
//! Each run boots, from one kernel and initramfs under TCG: a guest
//! migrated directly (QEMU `migrate tcp:` into `-incoming tcp:`), a guest
//! migrated through pagecast to an agent that holds nothing, and a guest
//! migrated through pagecast to an agent whose host runs a guest of the
//! same image (adopted). It prints, per run and as medians, the wall time
//! from the migrate command to the destination running and the bytes
//! between the hosts (QEMU's `transferred`; pagecast's frames between the
//! agents, TLS records included), with ratios to direct QEMU and the
//! targets: empty destination time <= 1.1x and bytes <= 1.02x; destination
//! with a same-image guest bytes <= 0.6x.
//!
//!   cargo build --release -p pagecast-cli && cargo bench -p pagecast-benches --bench qemu
//!
//! PAGECAST_BENCH_RUNS sets the number of runs (default 3);
//! PAGECAST_BENCH_KEEP=1 keeps each run's directory (agent and QEMU logs).

use std::path::Path;
use std::time::{Duration, Instant};

use pagecast_tests::cluster::{AgentProc, cli, free_port};
use pagecast_tests::qemu::{Guest, Start, qemu_or_skip};
use serde_json::json;

struct Run {
    direct_s: f64,
    direct_bytes: f64,
    empty_s: f64,
    empty_bytes: f64,
    resident_s: f64,
    resident_bytes: f64,
}

fn adopt(dir: &Path, agent: &AgentProc, g: &Guest, name: &str, incoming: bool) {
    let mut args = vec![
        "vm",
        "adopt",
        "--agent",
        &agent.addr,
        "--name",
        name,
        "--qmp",
        g.qmp.to_str().unwrap(),
        "--memory-file",
        g.ram.to_str().unwrap(),
    ];
    if incoming {
        args.push("--incoming");
    }
    let out = cli(dir, &args);
    assert!(
        out.status.success(),
        "adopting {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_running(g: &Guest) {
    let until = Instant::now() + Duration::from_secs(120);
    let mut q = g.qmp();
    while q.status().unwrap() != "running" {
        assert!(Instant::now() < until, "{} never ran", g.name);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Migrates `vm` through pagecast; returns (wall seconds, bytes).
fn through_pagecast(dir: &Path, vm: &str, from: &AgentProc, to: &AgentProc) -> (f64, f64) {
    let t = Instant::now();
    let out = cli(
        dir,
        &[
            "migrate", "--vm", vm, "--from", &from.addr, "--to", &to.addr, "--json",
        ],
    );
    let s = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "pagecast migrate {vm}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (s, r["bytes_sent"].as_f64().unwrap())
}

fn one_run(dir: &Path, qemu: &Path, kernel: &Path) -> Run {
    let a = AgentProc::start(dir, "qa", &[]);
    let b_empty = AgentProc::start(dir, "qb", &[]);
    let b_res = AgentProc::start(dir, "qc", &[]);
    let addr = format!("127.0.0.1:{}", free_port());
    let start = |name: &str, how| Guest::start(dir, name, qemu, kernel, how);
    let direct = start("direct", Start::Boot);
    let direct_in = start("direct-in", Start::Listen(&addr));
    let empty = start("empty", Start::Boot);
    let empty_in = start("empty-in", Start::Defer);
    let shared = start("shared", Start::Boot);
    let shared_in = start("shared-in", Start::Defer);
    let resident = start("resident", Start::Boot);
    for g in [&direct, &empty, &shared, &resident] {
        g.wait_booted(Duration::from_secs(300));
    }
    adopt(dir, &a, &empty, "empty", false);
    adopt(dir, &a, &shared, "shared", false);
    adopt(dir, &b_empty, &empty_in, "empty", true);
    adopt(dir, &b_res, &resident, "resident", false);
    adopt(dir, &b_res, &shared_in, "shared", true);

    let t = Instant::now();
    let mut q = direct.qmp();
    q.execute("migrate", json!({ "uri": format!("tcp:{addr}") }))
        .unwrap();
    let m = loop {
        let (s, m) = q.migration().unwrap();
        if s == "completed" {
            break m;
        }
        assert!(s != "failed", "direct migration failed: {m}");
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(q);
    wait_running(&direct_in);
    let direct_s = t.elapsed().as_secs_f64();
    let direct_bytes = m["ram"]["transferred"].as_f64().unwrap();

    let (empty_s, empty_bytes) = through_pagecast(dir, "empty", &a, &b_empty);
    wait_running(&empty_in);
    let (resident_s, resident_bytes) = through_pagecast(dir, "shared", &a, &b_res);
    wait_running(&shared_in);
    Run {
        direct_s,
        direct_bytes,
        empty_s,
        empty_bytes,
        resident_s,
        resident_bytes,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some((qemu, kernel)) = qemu_or_skip("qemu benchmark") else {
        return;
    };
    let runs: usize = std::env::var("PAGECAST_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    println!(
        "QEMU migration, {} MiB guests under TCG, direct vs through pagecast ({runs} runs)",
        pagecast_tests::qemu::GUEST_MIB
    );
    let mut all = Vec::new();
    for i in 0..runs {
        let tmp = tempfile::tempdir().unwrap();
        let r = one_run(tmp.path(), &qemu, &kernel);
        if std::env::var_os("PAGECAST_BENCH_KEEP").is_some() {
            println!("logs kept in {}", tmp.keep().display());
        }
        println!(
            "run {}: direct {:.2} s {:.1} MB | empty destination {:.2} s ({:.2}x) {:.1} MB ({:.3}x) | same-image guest at destination {:.2} s ({:.2}x) {:.1} MB ({:.3}x)",
            i + 1,
            r.direct_s,
            r.direct_bytes / 1e6,
            r.empty_s,
            r.empty_s / r.direct_s,
            r.empty_bytes / 1e6,
            r.empty_bytes / r.direct_bytes,
            r.resident_s,
            r.resident_s / r.direct_s,
            r.resident_bytes / 1e6,
            r.resident_bytes / r.direct_bytes,
        );
        all.push(r);
    }
    let m = |f: fn(&Run) -> f64| median(all.iter().map(f).collect());
    let (ds, db) = (m(|r| r.direct_s), m(|r| r.direct_bytes));
    let (es, eb) = (m(|r| r.empty_s), m(|r| r.empty_bytes));
    let rb = m(|r| r.resident_bytes);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("medians: direct QEMU {ds:.2} s, {:.1} MB", db / 1e6);
    println!(
        "  empty destination:   time {:.3}x (target <= 1.1x, {}), bytes {:.3}x (target <= 1.02x, {})",
        es / ds,
        verdict(es / ds <= 1.1),
        eb / db,
        verdict(eb / db <= 1.02)
    );
    println!(
        "  same-image guest:    bytes {:.3}x (target <= 0.6x, {})",
        rb / db,
        verdict(rb / db <= 0.6)
    );
}
