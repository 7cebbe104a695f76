//! Pages kept shared after they land: what the kernel's same-page merging
//! (KSM) reclaims on a destination after VMs arrived there, against the
//! pages the destination filled from content its own VMs already held.
//!
//! Real processes: two `pagecast agent`s with KVM micro-VMs. The
//! destination runs VMs of two families (`web:index=0`, `db:index=0`); two
//! VMs of the same families (`web:index=1`, `db:index=1`) migrate to it from
//! the source, and the destination fills every frame whose content it
//! holds from its residents. Then KSM scans (run 1, 20,000 pages per 5 ms,
//! zero pages counted apart: `use_zero_pages` 1) until three full scans
//! have passed, and `pages_sharing` is read: pages that now map a page
//! another mapping holds too.
//!
//! Run twice, each on fresh agents: with guest memory offered to KSM (the
//! agents' default) and with `--no-ksm` (the baseline, the same
//! migrations, memory not offered). Reported: pages filled locally,
//! `pages_sharing` and the ratio. The host's KSM settings are restored at
//! the end (and every merged page unmerged: `run` 2, then its old value).
//!
//! Run: `cargo build --release -p pagecast-cli && cargo bench -p
//! pagecast-benches --bench ksm` (root, /dev/kvm and KSM; says so and exits
//! otherwise). PAGECAST_BENCH_KSM_MIB sets each VM's size (64).

use std::path::Path;
use std::time::{Duration, Instant};

use pagecast_benches::env_or;
use pagecast_tests::cluster::{AgentProc, cli_json, start_vm};

const KSM: &str = "/sys/kernel/mm/ksm";

fn ksm_read(name: &str) -> u64 {
    std::fs::read_to_string(format!("{KSM}/{name}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn ksm_write(name: &str, v: u64) {
    std::fs::write(format!("{KSM}/{name}"), v.to_string())
        .unwrap_or_else(|e| panic!("writing {KSM}/{name}: {e}"));
}

/// KSM's settings as found, put back on drop (after unmerging everything).
struct Saved(Vec<(&'static str, u64)>);

impl Saved {
    fn take() -> Saved {
        Saved(
            ["run", "pages_to_scan", "sleep_millisecs", "use_zero_pages"]
                .into_iter()
                .map(|n| (n, ksm_read(n)))
                .collect(),
        )
    }
}

impl Drop for Saved {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("{KSM}/run"), "2");
        for (n, v) in self.0.iter().rev() {
            let _ = std::fs::write(format!("{KSM}/{n}"), v.to_string());
        }
    }
}

/// What one run measured.
struct Merged {
    /// Bytes of the destination agent's mappings offered to KSM.
    offered: u64,
    filled_locally: u64,
    pages_sharing: u64,
    zero_pages: u64,
    scan_s: f64,
}

/// Bytes of process `pid`'s mappings marked mergeable (`mg` in smaps).
fn mergeable_bytes(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut size = 0;
    let mut total = 0;
    for l in smaps.lines() {
        if let Some(kb) = l.strip_prefix("Size:") {
            size = kb
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
                * 1024;
        } else if let Some(f) = l.strip_prefix("VmFlags:")
            && f.split_whitespace().any(|x| x == "mg")
        {
            total += size;
        }
    }
    total
}

/// Residents on `dst`, two VMs migrated in from `src`, then KSM's count.
fn run(mib: u64, agent_args: &[&str]) -> Merged {
    let root = tempfile::tempdir().unwrap();
    let d = root.path();
    let src = AgentProc::start(d, "src", agent_args);
    let dst = AgentProc::start(d, "dst", agent_args);
    let memory = format!("{mib}MiB");
    start_vm(d, &dst.addr, "web0", "web:index=0", &memory, &[]);
    start_vm(d, &dst.addr, "db0", "db:index=0", &memory, &[]);
    start_vm(d, &src.addr, "web1", "web:index=1", &memory, &[]);
    start_vm(d, &src.addr, "db1", "db:index=1", &memory, &[]);
    let mut filled_locally = 0;
    for vm in ["web1", "db1"] {
        let r = cli_json(
            d,
            &[
                "migrate", "--vm", vm, "--from", &src.addr, "--to", &dst.addr, "--json",
            ],
        );
        assert_eq!(r["ok"], true, "{r}");
        filled_locally += r["pages_local"].as_u64().unwrap();
    }
    let offered = mergeable_bytes(dst.pid());
    // Unmerge whatever an earlier run left, then scan fast.
    ksm_write("run", 2);
    ksm_write("use_zero_pages", 1);
    ksm_write("pages_to_scan", 20_000);
    ksm_write("sleep_millisecs", 5);
    ksm_write("run", 1);
    let t = Instant::now();
    let scans = ksm_read("full_scans");
    // ksmd scans only while some process offers memory.
    while offered > 0 && ksm_read("full_scans") < scans + 3 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "KSM made no full scans of the {offered} bytes offered ({} scans, {} pages scanned)",
            ksm_read("full_scans"),
            ksm_read("pages_scanned")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = Merged {
        offered,
        filled_locally,
        pages_sharing: ksm_read("pages_sharing"),
        zero_pages: ksm_read("ksm_zero_pages"),
        scan_s: t.elapsed().as_secs_f64(),
    };
    ksm_write("run", 2);
    drop((src, dst));
    m
}

fn main() {
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/dev/kvm").exists() || !Path::new(KSM).join("run").exists() {
        println!("ksm: needs root, /dev/kvm and KSM (/sys/kernel/mm/ksm); skipped");
        return;
    }
    let mib: u64 = env_or("PAGECAST_BENCH_KSM_MIB", 64);
    let _saved = Saved::take();
    println!(
        "KSM after migrating 2 VMs of {mib} MiB onto a host running 2 of their families \
         ({} pages of guest memory there)",
        4 * mib * 256
    );
    let on = run(mib, &[]);
    let off = run(mib, &["--no-ksm"]);
    for (label, m) in [
        ("offered to KSM (default)", &on),
        ("--no-ksm (baseline)", &off),
    ] {
        println!(
            "  {label:<26} {:.0} MiB offered, filled locally {:>7} pages, KSM pages_sharing {:>7} ({:.2}x of filled \
             locally, {:.1} MiB reclaimed), zero pages merged {:>7}, 3 scans in {:.1} s",
            m.offered as f64 / f64::from(1 << 20),
            m.filled_locally,
            m.pages_sharing,
            m.pages_sharing as f64 / m.filled_locally.max(1) as f64,
            m.pages_sharing as f64 * 4096.0 / f64::from(1 << 20),
            m.zero_pages,
            m.scan_s
        );
    }
}
