//! `pagecast evacuate` end to end, as processes on loopback with multicast:
//! three index replicas, agents in two racks, KVM micro-VMs of synthetic
//! families dirtying memory. Each failure of the list is its own
//! test. The tests say they skip where /dev/kvm is missing.

use std::path::Path;
use std::time::{Duration, Instant};

use pagecast_memory::kvm::kvm_or_skip;
use pagecast_tests::cluster::{AgentProc, IndexCluster, cli, cli_json, eventually, make_secret};

const SHARDS: u32 = 4;

struct Rig {
    dir: tempfile::TempDir,
    idx: IndexCluster,
    agents: Vec<AgentProc>,
}

impl Rig {
    fn d(&self) -> &Path {
        self.dir.path()
    }

    fn agent(&self, name: &str) -> &AgentProc {
        self.agents
            .iter()
            .find(|a| a.name == name)
            .expect("an agent of that name")
    }

    fn vm_start(&self, host: &str, name: &str, profile: &str, mib: u64, rate: u64) {
        let out = cli(
            self.d(),
            &[
                "vm",
                "start",
                "--agent",
                &self.agent(host).addr,
                "--name",
                name,
                "--synthetic",
                profile,
                "--memory",
                &format!("{mib}MiB"),
                "--dirty-rate",
                &rate.to_string(),
                "--working-set",
                "2000",
            ],
        );
        assert!(
            out.status.success(),
            "vm start {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// VM names on an agent, with their states.
    fn vms_on(&self, host: &str) -> Vec<(String, String)> {
        let l = cli_json(
            self.d(),
            &["vm", "list", "--agent", &self.agent(host).addr, "--json"],
        );
        l["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap().to_owned(),
                    v["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// Waits until the index lists every VM the agents run (so planning
    /// sees them).
    fn wait_published(&self, vms: &[&str]) {
        eventually(Duration::from_secs(30), "VMs published", || {
            let mut c = self.idx.client();
            let recs = c.vms(false).map_err(|e| e.to_string())?;
            let missing: Vec<&&str> = vms
                .iter()
                .filter(|v| !recs.iter().any(|r| r.name == **v))
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("not yet listed: {missing:?}"))
            }
        });
    }

    fn evacuate(&self, args: &[&str]) -> (std::process::Output, serde_json::Value) {
        let addrs = self.idx.addrs();
        let mut a = vec!["evacuate", "--index", &addrs];
        a.extend_from_slice(args);
        a.push("--json");
        let out = cli(self.d(), &a);
        let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (out, v)
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for a in &self.agents {
            s.push_str(&format!("--- {}:\n{}\n", a.name, a.log()));
        }
        s
    }
}

/// Two racks: r1 = h1, h2 (the sources); r2 = h4, h5 (destinations) and h6
/// (a rack-mate of theirs that receives nothing).
fn rig(extra_agent_args: &[&str]) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    make_secret(dir.path());
    let idx = IndexCluster::start(dir.path(), SHARDS);
    let addrs = idx.addrs();
    let hosts = [
        ("h1", "r1"),
        ("h2", "r1"),
        ("h4", "r2"),
        ("h5", "r2"),
        ("h6", "r2"),
    ];
    let agents = hosts
        .iter()
        .map(|(name, rack)| {
            let mut args = vec![
                "--index",
                &addrs,
                "--rack",
                rack,
                "--link",
                "10G",
                "--capacity",
                "512MiB",
            ];
            args.extend_from_slice(extra_agent_args);
            AgentProc::start(dir.path(), name, &args)
        })
        .collect();
    Rig { dir, idx, agents }
}

fn populate(r: &Rig) -> Vec<&'static str> {
    // Moving: two web and two db VMs on h1, h2, dirtying memory.
    r.vm_start("h1", "web1", "web:index=1", 48, 2000);
    r.vm_start("h1", "db1", "db:index=1", 48, 1000);
    r.vm_start("h2", "web2", "web:index=2", 48, 2000);
    r.vm_start("h2", "db2", "db:index=2", 48, 0);
    // Destinations already run VMs of those families; h6 (a rack-mate of
    // the destinations, not one itself) runs another.
    r.vm_start("h4", "web0", "web:index=0", 48, 0);
    r.vm_start("h5", "db0", "db:index=0", 48, 0);
    r.vm_start("h6", "web9", "web:index=9", 48, 0);
    let all = vec!["web1", "db1", "web2", "db2", "web0", "db0", "web9"];
    r.wait_published(&all);
    all
}

#[test]
fn a_rack_evacuates_verified_with_shared_pages_sent_once() {
    if !kvm_or_skip("a_rack_evacuates_verified_with_shared_pages_sent_once") {
        return;
    }
    let r = rig(&[]);
    populate(&r);
    // The plan first.
    let (out, plan) = r.evacuate(&["--from", "h1,h2", "--to", "h4,h5", "--dry-run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["predicted"]["placement"].as_object().unwrap().len(), 4);
    // Nothing moved.
    assert_eq!(r.vms_on("h1").len(), 2);

    let t = Instant::now();
    let (out, rep) = r.evacuate(&["--from", "h1,h2", "--to", "h4,h5", "--max-downtime", "300"]);
    eprintln!("{}", serde_json::to_string_pretty(&rep).unwrap());
    assert!(
        out.status.success(),
        "evacuate failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        r.logs()
    );
    eprintln!("evacuated in {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(rep["ok"], true);
    for v in rep["vms"].as_array().unwrap() {
        assert_eq!(v["verified"], true, "{v}");
    }
    // None at the sources, all at their destinations, running.
    assert!(r.vms_on("h1").is_empty() && r.vms_on("h2").is_empty());
    let placement = rep["predicted"]["placement"].as_object().unwrap();
    for (vm, host) in placement {
        let on = r.vms_on(host.as_str().unwrap());
        assert!(
            on.iter().any(|(n, s)| n == vm && s == "running"),
            "{vm} runs on {host}: {on:?}"
        );
    }
    // Shared pages went out once: the sources sent less than the VMs'
    // non-zero pages, and multicast carried some of it.
    let by = &rep["bytes_by_class"];
    let total = by["multicast"].as_u64().unwrap()
        + by["unicast"].as_u64().unwrap()
        + by["repair"].as_u64().unwrap();
    assert!(total > 0);
    assert!(
        rep["source_bytes"].as_u64().unwrap()
            < rep["predicted"]["precopy_source_bytes"].as_u64().unwrap(),
        "{rep}"
    );
}

#[test]
fn a_vm_clones_live_to_three_hosts_and_runs_on() {
    if !kvm_or_skip("a_vm_clones_live_to_three_hosts_and_runs_on") {
        return;
    }
    let r = rig(&[]);
    r.vm_start("h1", "tmpl", "web:index=3", 64, 2000);
    r.vm_start("h4", "web0", "web:index=0", 48, 0);
    r.wait_published(&["tmpl", "web0"]);
    let addrs = r.idx.addrs();
    let t = Instant::now();
    let out = cli(
        r.d(),
        &[
            "clone",
            "--index",
            &addrs,
            "--vm",
            "tmpl",
            "--to",
            "h4,h5,h6",
            "--max-downtime",
            "300",
            "--json",
        ],
    );
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    eprintln!(
        "{}\ncloned in {:.1} s",
        serde_json::to_string_pretty(&rep).unwrap(),
        t.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "clone failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        r.logs()
    );
    assert_eq!(rep["clones"].as_array().unwrap().len(), 3);
    for c in rep["clones"].as_array().unwrap() {
        assert_eq!(c["verified"], true, "{c}");
        let host = c["host"].as_str().unwrap();
        let name = c["name"].as_str().unwrap();
        assert!(
            r.vms_on(host)
                .iter()
                .any(|(n, s)| n == name && s == "running"),
            "{name} runs on {host}"
        );
    }
    // The source still runs its VM.
    assert!(
        r.vms_on("h1")
            .iter()
            .any(|(n, s)| n == "tmpl" && s == "running")
    );
    // Each page left the source about once: far less than three copies.
    let one_copy = 64u64 << 20;
    let sent = rep["source_bytes"].as_u64().unwrap();
    assert!(
        sent < 2 * one_copy,
        "sent {sent} bytes for three clones of {one_copy}"
    );
}
