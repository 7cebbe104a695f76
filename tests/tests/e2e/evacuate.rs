//! `pagecast evacuate` end to end, as processes on loopback with multicast:
//! three index replicas, agents in two racks, KVM micro-VMs of synthetic
//! families dirtying memory. Each failure of the list is its own
//! test. The tests need KVM and loopback multicast (`pagecast_testkit`).

use std::path::Path;
use std::time::{Duration, Instant};

use pagecast_testkit::{Need, needs};
use pagecast_tests::cluster::{AgentProc, IndexCluster, cli, cli_json, eventually};

const SHARDS: u32 = 4;

/// What every test here needs: agents run KVM micro-VMs, and casts go
/// over loopback multicast.
const RIG: &[Need] = &[Need::Kvm, Need::LoopbackMulticast];

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
    rig_env(extra_agent_args, |_| Vec::new())
}

/// [`rig`], each agent with `env(name)` in its environment.
fn rig_env(
    extra_agent_args: &[&str],
    env: impl Fn(&str) -> Vec<(&'static str, &'static str)>,
) -> Rig {
    let dir = tempfile::tempdir().unwrap();
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
            AgentProc::start_with_env(dir.path(), name, &args, &env(name))
        })
        .collect();
    Rig { dir, idx, agents }
}

/// Every VM of `names` runs on exactly one host, and where.
/// (Asked until it holds, for a while: a destination may list a VM it
/// gave up as `incoming` for a moment after the job ended.)
fn where_each_runs(r: &Rig, names: &[&str]) -> std::collections::BTreeMap<String, String> {
    pagecast_tests::cluster::eventually(Duration::from_secs(15), "every VM settled", || {
        settled(r, names)
    })
}

/// Where each VM of `names` runs, if each runs (state `running`) on
/// exactly one host; otherwise what is not so.
fn settled(r: &Rig, names: &[&str]) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut at = std::collections::BTreeMap::new();
    for a in &r.agents {
        for (n, state) in r.vms_on(&a.name) {
            if names.contains(&n.as_str()) {
                if state != "running" {
                    return Err(format!("{n} on {} is {state}", a.name));
                }
                if let Some(other) = at.insert(n.clone(), a.name.clone()) {
                    return Err(format!("{n} runs on {other} and {}", a.name));
                }
            }
        }
    }
    match names.iter().find(|n| !at.contains_key(**n)) {
        Some(n) => Err(format!("{n} runs nowhere")),
        None => Ok(at),
    }
}

const MOVING: [&str; 4] = ["web1", "db1", "web2", "db2"];

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

/// With `--release-early` each VM goes to its rounds once what it lacks has
/// come, while the job's other casts into its host may still run: every VM
/// still moves verified (before casts held every arriving VM's memory, and
/// a VM released early failed its switchover with "the arriving VM's memory
/// is still shared with a cast").
#[test]
fn release_early_moves_every_vm_verified() {
    if !needs("release_early_moves_every_vm_verified", RIG) {
        return;
    }
    let r = rig(&[]);
    populate(&r);
    let (out, rep) = r.evacuate(&[
        "--from",
        "h1,h2",
        "--to",
        "h4,h5",
        "--max-downtime",
        "300",
        "--release-early",
    ]);
    assert!(
        out.status.success(),
        "{}\n{rep}\n{}",
        String::from_utf8_lossy(&out.stderr),
        r.logs()
    );
    assert_eq!(rep["ok"], true, "{rep}");
    for v in rep["vms"].as_array().unwrap() {
        assert_eq!(v["verified"], true, "{v}");
    }
    assert!(r.vms_on("h1").is_empty() && r.vms_on("h2").is_empty());
}

#[test]
fn a_rack_evacuates_verified_with_shared_pages_sent_once() {
    if !needs("a_rack_evacuates_verified_with_shared_pages_sent_once", RIG) {
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
    // A calm VM switches over by pre-copy, unless its destination gathers
    // some of its pages from an intermediary (h6: scatter is on by default).
    for v in rep["vms"].as_array().unwrap() {
        assert_eq!(v["verified"], true, "{v}");
        let gathers = v["pages_gathered"].as_u64().unwrap() > 0;
        let how = if gathers { "postcopy" } else { "precopy" };
        assert_eq!(v["switchover"], how, "{v}");
    }
    // Each source evicted when its last VM left; the job when the last did.
    let eviction = rep["eviction_s"].as_f64().unwrap();
    let evicted = rep["evicted_s"].as_object().unwrap();
    assert_eq!(evicted.len(), 2, "{rep}");
    for (src, at) in evicted {
        let at = at
            .as_f64()
            .unwrap_or_else(|| panic!("{src} not evicted: {rep}"));
        assert!(at > 0.0 && at <= eviction, "{src} at {at}, job {eviction}");
        // No source leaves sooner than the pages only it holds take over
        // its link.
        let only = rep["predicted"]["only_at_source_bytes"][src].as_u64();
        assert!(only.is_some_and(|b| b > 0), "{src}: {rep}");
        let bound = rep["predicted"]["lower_bound_s"][src]
            .as_f64()
            .unwrap_or_else(|| panic!("{src}: no lower bound (links are known): {rep}"));
        assert!(
            at >= bound,
            "{src} evicted at {at} s, under its bound {bound} s"
        );
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
    // Every arrival's record reached the index: a destination's put that
    // raced its source's move of the record is tried again, not dropped.
    let logs = r.logs();
    assert!(!logs.contains("refused a VM record change"), "{logs}");
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
    if !needs("a_vm_clones_live_to_three_hosts_and_runs_on", RIG) {
        return;
    }
    let r = rig(&[]);
    r.vm_start("h1", "tmpl", "web:index=3", 64, 2000);
    r.vm_start("h4", "web0", "web:index=0", 48, 0);
    r.wait_published(&["tmpl", "web0"]);
    let addrs = r.idx.addrs();
    // Post-copy is refused by name for a clone: its source runs on.
    let out = cli(
        r.d(),
        &[
            "clone",
            "--index",
            &addrs,
            "--vm",
            "tmpl",
            "--to",
            "h4",
            "--switchover",
            "postcopy",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("post-copy is for moves"), "{err}");
    assert!(
        r.vms_on("h4").iter().all(|(n, _)| n == "web0"),
        "nothing cloned"
    );
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
    fresh_identities(&r, &rep);
    // Each page left the source about once: far less than three copies.
    let one_copy = 64u64 << 20;
    let sent = rep["source_bytes"].as_u64().unwrap();
    assert!(
        sent < 2 * one_copy,
        "sent {sent} bytes for three clones of {one_copy}"
    );
}

/// No clone of `tmpl` (on h1) shares its source's identity, nor another
/// clone's; the source keeps its own.
fn fresh_identities(r: &Rig, rep: &serde_json::Value) {
    let source_id = rep["source_identity"].as_str().unwrap().to_owned();
    assert_eq!(source_id.len(), 32, "{rep}");
    let listed = cli_json(
        r.d(),
        &["vm", "list", "--agent", &r.agent("h1").addr, "--json"],
    );
    let tmpl = listed["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "tmpl")
        .unwrap()
        .clone();
    assert_eq!(
        tmpl["identity"],
        source_id.as_str(),
        "the source's identity stays"
    );
    let mut ids = std::collections::BTreeSet::new();
    for c in rep["clones"].as_array().unwrap() {
        let id = c["identity"].as_str().unwrap();
        assert_eq!(id.len(), 32, "{c}");
        assert_ne!(id, source_id, "{c}");
        assert!(ids.insert(id.to_owned()), "two clones share {id}");
        assert_eq!(c["changed"], serde_json::json!(["identity"]), "{c}");
    }
}

#[test]
fn bad_requests_are_refused_before_anything_moves() {
    if !needs("bad_requests_are_refused_before_anything_moves", RIG) {
        return;
    }
    let r = rig(&[]);
    populate(&r);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--from", "nope"], "unknown host nope"),
        (
            vec!["--from", "h1", "--to", "h1,h4"],
            "which is being evacuated",
        ),
        (vec!["--from", "h1", "--to", "zz"], "unknown host zz"),
    ];
    for (args, want) in cases {
        let (out, _) = r.evacuate(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(err.contains("nothing was moved"), "{err}");
    }
    // A destination without room: h6 holds 48 MiB of 512; fill it up.
    for i in 0..9 {
        r.vm_start("h6", &format!("filler{i}"), "cache", 48, 0);
    }
    let fillers: Vec<String> = (0..9).map(|i| format!("filler{i}")).collect();
    let names: Vec<&str> = fillers.iter().map(String::as_str).collect();
    r.wait_published(&names);
    let (out, _) = r.evacuate(&["--from", "h1,h2", "--to", "h6"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("fits on no destination"), "{err}");
    // Sent there anyway, past any planner: h6's agent refuses it before
    // anything moves (480 of its 512 MiB are taken), and it runs on at h1.
    let out = cli(
        r.d(),
        &[
            "migrate",
            "--vm",
            "web1",
            "--from",
            &r.agent("h1").addr,
            "--to",
            &r.agent("h6").addr,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no room for VM \"web1\"") && err.contains("32 MiB of 512 MiB are free"),
        "{err}"
    );
    assert!(
        r.vms_on("h1")
            .iter()
            .any(|(n, s)| n == "web1" && s == "running")
    );
    // A VM the index lists but its agent no longer runs.
    let mut c = r.idx.client();
    let host = c
        .hosts(false)
        .unwrap()
        .into_iter()
        .find(|h| h.name == "h1")
        .unwrap();
    let ghost = pagecast_index::client::VmContent::from_frames("ghost", "test", &[]).record("");
    c.write(
        0,
        pagecast_proto::v1::IndexCommand {
            client: 0,
            seq: 0,
            op: Some(pagecast_proto::v1::index_command::Op::PutVm(
                pagecast_proto::v1::PutVm {
                    vm: Some(pagecast_proto::v1::VmRecord {
                        host: host.index,
                        ..ghost
                    }),
                },
            )),
        },
    )
    .unwrap();
    let (out, _) = r.evacuate(&["--from", "h1", "--to", "h4"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("ghost is not on h1"), "{err}");
    // Nothing moved in any of these.
    where_each_runs(&r, &MOVING);
    assert_eq!(r.vms_on("h1").len(), 2);
    assert_eq!(r.vms_on("h2").len(), 2);
}

/// Runs an evacuation in the background, slowed so failures can be
/// injected while it runs.
fn evacuate_bg(r: &Rig, extra: &[&str]) -> pagecast_tests::Child {
    let addrs = r.idx.addrs();
    let mut args = vec![
        "evacuate",
        "--index",
        &addrs,
        "--from",
        "h1,h2",
        "--to",
        "h4,h5",
        "--json",
        "--max-downtime",
        "300",
    ];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    pagecast_tests::Child::pagecast(&[], &refs)
}

fn report_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no report ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A destination that dies mid-job: its VMs stay at their sources, the
/// others arrive verified.
#[test]
fn a_dead_destination_leaves_its_vms_at_their_sources() {
    if !needs("a_dead_destination_leaves_its_vms_at_their_sources", RIG) {
        return;
    }
    let mut r = rig(&[]);
    populate(&r);
    let job = evacuate_bg(&r, &["--bandwidth", "100M"]);
    std::thread::sleep(Duration::from_millis(2500));
    let i = r.agents.iter().position(|a| a.name == "h5").unwrap();
    r.agents[i].kill();
    let out = job.wait(Duration::from_secs(120));
    let rep = report_of(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a VM could not move: exit status 2 (the job ran, not everything moved)"
    );
    let alive: Vec<&str> = MOVING.to_vec();
    let mut at = std::collections::BTreeMap::new();
    for a in r.agents.iter().filter(|a| a.name != "h5") {
        for (n, state) in r.vms_on(&a.name) {
            if alive.contains(&n.as_str()) {
                assert_eq!(state, "running", "{n} on {}", a.name);
                assert!(at.insert(n.clone(), a.name.clone()).is_none(), "{n} twice");
            }
        }
    }
    for v in rep["vms"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        if v["to"] == "h5" {
            assert_eq!(v["ok"], false, "{v}");
            assert_eq!(
                at[name],
                v["from"].as_str().unwrap(),
                "{name} stays at its source"
            );
        } else {
            assert_eq!(v["verified"], true, "{v}");
            assert_eq!(at[name], "h4");
        }
    }
    // `--retry` with the report moves only what did not move: the dead
    // host is down, so onto the others (h5 is no destination any more).
    let report = r.d().join("first.json");
    std::fs::write(&report, &out.stdout).unwrap();
    let failed: Vec<String> = rep["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["ok"] != true)
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(!failed.is_empty());
    let (out, again) = r.evacuate(&["--retry", report.to_str().unwrap(), "--to", "h4,h6"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut retried: Vec<String> = again["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            assert_eq!(v["verified"], true, "{v}");
            v["name"].as_str().unwrap().to_owned()
        })
        .collect();
    retried.sort();
    let mut want = failed.clone();
    want.sort();
    assert_eq!(retried, want, "only the VMs that had not moved");
}

/// A destination that hangs (SIGSTOP, connections open) is a failed one,
/// detected within seconds on every channel.
#[test]
fn a_frozen_destination_is_treated_as_failed() {
    if !needs("a_frozen_destination_is_treated_as_failed", RIG) {
        return;
    }
    let r = rig(&[]);
    populate(&r);
    let t = Instant::now();
    let job = evacuate_bg(&r, &["--bandwidth", "100M"]);
    std::thread::sleep(Duration::from_millis(2500));
    r.agent("h5").freeze();
    let out = job.wait(Duration::from_secs(120));
    let took = t.elapsed();
    r.agent("h5").thaw();
    let rep = report_of(&out);
    eprintln!("the job ended {took:?} after it started");
    assert!(took < Duration::from_secs(60), "the job took {took:?}");
    assert!(!out.status.success());
    for v in rep["vms"].as_array().unwrap() {
        if v["to"] == "h5" {
            assert_eq!(v["ok"], false, "{v}");
            assert_eq!(v["in_doubt"], false, "{v}");
        } else {
            assert_eq!(v["verified"], true, "{v}");
        }
    }
    // Thawed, h5 keeps nothing of them; each VM runs on one host.
    settled_around(&r, rep["vms"].as_array().unwrap(), &MOVING, "h5");
}

/// Once `frozen` is thawed: each VM of `names` runs on exactly one host,
/// at its source if the report's move took it to `frozen`, at its
/// destination otherwise.
fn settled_around(r: &Rig, vms: &[serde_json::Value], names: &[&str], frozen: &str) {
    std::thread::sleep(Duration::from_secs(2));
    let at = where_each_runs(r, names);
    for v in vms {
        let want = if v["to"] == frozen {
            &v["from"]
        } else {
            &v["to"]
        };
        assert_eq!(at[v["name"].as_str().unwrap()], want.as_str().unwrap());
    }
}

/// One index replica down, the one leading the most shards, changes
/// nothing.
#[test]
fn one_index_replica_down_changes_nothing() {
    if !needs("one_index_replica_down_changes_nothing", RIG) {
        return;
    }
    let mut r = rig(&[]);
    populate(&r);
    // The replica that leads the most shards goes: the agents and the
    // coordinator must find the new leaders of its shards.
    let led = |i: usize| {
        (0..SHARDS)
            .filter(|&s| r.idx.leader_of(s) == Some(i))
            .count()
    };
    let victim = (0..3).max_by_key(|&i| led(i)).unwrap();
    let its: Vec<u32> = (0..SHARDS)
        .filter(|&s| r.idx.leader_of(s) == Some(victim))
        .collect();
    assert!(!its.is_empty(), "replica {victim} leads no shard");
    r.idx.kill(victim);
    let (out, rep) = r.evacuate(&["--from", "h1,h2", "--to", "h4,h5"]);
    assert!(
        out.status.success(),
        "{}\n{rep}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(rep["ok"], true);
    let at = where_each_runs(&r, &MOVING);
    assert!(at.values().all(|h| h == "h4" || h == "h5"), "{at:?}");
    // Its shards are led elsewhere now. Leadership among the two survivors
    // may still be settling (one of them can start an election of its own
    // after the other won one), so this waits for it rather than sampling
    // one instant; the job above has already succeeded without the victim.
    for s in its {
        eventually(
            Duration::from_secs(10),
            &format!("shard {s} led by a survivor of replica {victim}"),
            || match r.idx.leader_of(s) {
                Some(l) if l != victim => Ok(()),
                l => Err(format!("shard {s}: leader {l:?}")),
            },
        );
    }
}

/// The coordinator killed mid-job: every VM runs on exactly one host, and
/// the same command run again finishes the job.
#[test]
fn a_killed_coordinator_leaves_one_copy_and_a_rerun_finishes() {
    if !needs(
        "a_killed_coordinator_leaves_one_copy_and_a_rerun_finishes",
        RIG,
    ) {
        return;
    }
    let r = rig(&[]);
    populate(&r);
    let mut job = evacuate_bg(&r, &["--bandwidth", "100M"]);
    // The coordinator dies while migrations are under way: a source's VM
    // is migrating out when it is killed.
    let under_way = eventually(Duration::from_secs(60), "a migration under way", || {
        let out: Vec<String> = ["h1", "h2"]
            .iter()
            .flat_map(|h| r.vms_on(h))
            .filter(|(_, s)| s == "migrating-out")
            .map(|(n, _)| n)
            .collect();
        if out.is_empty() {
            Err("no VM is migrating out yet".into())
        } else {
            Ok(out)
        }
    });
    job.kill();
    drop(job);
    eprintln!("killed the coordinator while {under_way:?} migrated out");
    // Held migrations are abandoned by their agents, running ones finish:
    // soon every VM runs on exactly one host.
    let at = eventually(
        Duration::from_secs(60),
        "every VM settled on one host",
        || settled(&r, &MOVING),
    );
    eprintln!("after the kill: {at:?}");
    r.wait_published(&MOVING);
    // The index may still be catching up; the rerun retries until planned.
    let out = eventually(Duration::from_secs(60), "a rerun", || {
        let (out, rep) = r.evacuate(&["--from", "h1,h2", "--to", "h4,h5"]);
        if out.status.success() {
            Ok(rep)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    assert_eq!(out["ok"], true);
    let at = where_each_runs(&r, &MOVING);
    assert!(at.values().all(|h| h == "h4" || h == "h5"), "{at:?}");
}

/// A source agent killed mid-evacuation (its VMs die with it): they are
/// reported failed, not in doubt; nothing of them is left arriving at a
/// destination; the other source's VMs arrive verified; and once the
/// source is back (empty) the same command completes.
#[test]
fn a_source_killed_mid_evacuation_fails_its_vms_and_the_others_finish() {
    if !needs(
        "a_source_killed_mid_evacuation_fails_its_vms_and_the_others_finish",
        RIG,
    ) {
        return;
    }
    let mut r = rig(&[]);
    populate(&r);
    let job = evacuate_bg(&r, &["--bandwidth", "100M"]);
    eventually(Duration::from_secs(60), "h1 migrating out", || {
        let v = r.vms_on("h1");
        if v.iter().any(|(_, s)| s == "migrating-out") {
            Ok(())
        } else {
            Err(format!("h1: {v:?}"))
        }
    });
    let i = r.agents.iter().position(|a| a.name == "h1").unwrap();
    r.agents[i].kill();
    let out = job.wait(Duration::from_secs(120));
    let rep = report_of(&out);
    assert!(!out.status.success(), "h1's VMs did not move: {rep}");
    let mut lost = Vec::new();
    for v in rep["vms"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap().to_owned();
        assert_eq!(v["in_doubt"], false, "{v}");
        if v["from"] == "h1" && v["ok"] == false {
            lost.push(name);
        } else {
            assert_eq!(v["verified"], true, "{v}");
        }
    }
    assert!(
        !lost.is_empty(),
        "h1 died before any of its VMs moved: {rep}"
    );
    // The destinations keep nothing of the lost VMs, not even a reservation.
    eventually(Duration::from_secs(30), "no trace of h1's lost VMs", || {
        let left: Vec<(String, String, String)> = ["h4", "h5", "h6"]
            .iter()
            .flat_map(|h| {
                r.vms_on(h)
                    .into_iter()
                    .filter(|(n, _)| lost.contains(n))
                    .map(|(n, s)| (h.to_string(), n, s))
            })
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
    let moved: Vec<&str> = MOVING
        .iter()
        .copied()
        .filter(|m| !lost.iter().any(|l| l == m))
        .collect();
    // The source comes back empty; the same command completes.
    r.agents[i].restart();
    assert!(r.vms_on("h1").is_empty());
    let at = where_each_runs(&r, &moved);
    assert!(at.values().all(|h| h == "h4" || h == "h5"), "{at:?}");
    let rep = eventually(Duration::from_secs(60), "a rerun", || {
        let (out, rep) = r.evacuate(&["--from", "h1,h2", "--to", "h4,h5"]);
        if out.status.success() {
            Ok(rep)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    assert_eq!(rep["ok"], true, "{rep}");
    assert!(r.vms_on("h1").is_empty() && r.vms_on("h2").is_empty());
    where_each_runs(&r, &moved);
}

/// The VMs the report says are in doubt: (name, source), each bound for
/// `to`.
fn in_doubt(rep: &serde_json::Value, to: &str) -> Vec<(String, String)> {
    let vms: Vec<(String, String)> = rep["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["in_doubt"] == true)
        .map(|v| {
            assert_eq!(v["to"], to, "{v}");
            assert_eq!(v["ok"], false, "{v}");
            (
                v["name"].as_str().unwrap().to_owned(),
                v["from"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(!vms.is_empty(), "no VM in doubt: {rep}");
    vms
}

/// A destination killed at the switchover point (Commit received, the VM
/// not started: `PAGECAST_FAILPOINT=dest-commit:exit`): the report says
/// the VM is in doubt and its source keeps it paused; when the destination
/// is back, without it, the source asks it and resumes its own copy.
/// Exactly one copy runs, at the source.
#[test]
fn a_kill_at_switchover_is_in_doubt_until_the_source_resumes_its_copy() {
    if !needs(
        "a_kill_at_switchover_is_in_doubt_until_the_source_resumes_its_copy",
        RIG,
    ) {
        return;
    }
    let mut r = rig_env(&[], |name| {
        if name == "h5" {
            vec![("PAGECAST_FAILPOINT", "dest-commit:exit")]
        } else {
            Vec::new()
        }
    });
    populate(&r);
    let (out, rep) = r.evacuate(&["--from", "h1,h2", "--to", "h4,h5"]);
    assert!(!out.status.success(), "a VM did not move, so the job fails");
    let doubtful = in_doubt(&rep, "h5");
    let i = r.agents.iter().position(|a| a.name == "h5").unwrap();
    let status = r.agents[i].wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(137),
        "h5 died at the switchover point"
    );
    // Paused at its source, in doubt, while the destination is gone.
    std::thread::sleep(Duration::from_secs(2));
    for (name, from) in &doubtful {
        let state = r.vms_on(from).into_iter().find(|(n, _)| n == name);
        assert_eq!(
            state.map(|(_, s)| s).as_deref(),
            Some("in-doubt"),
            "{name} on {from}"
        );
    }
    // The destination comes back without the VM: the source resumes it.
    r.agents[i].restart_with_env(&[]);
    let at = eventually(
        Duration::from_secs(30),
        "every VM settled on one host",
        || settled(&r, &MOVING),
    );
    for (name, from) in &doubtful {
        assert_eq!(&at[name], from, "{name} runs again at its source");
    }
    assert!(r.agent(&doubtful[0].1).log().contains("resumed here"));
}

/// The link breaks at the switchover point after the destination started
/// the VM (`PAGECAST_FAILPOINT=dest-resumed:drop`): the source never hears
/// `Resumed`, so the VM is in doubt; the source asks the destination, hears
/// the VM runs there, and releases its copy. Exactly one copy runs, at the
/// destination.
#[test]
fn a_lost_confirmation_is_in_doubt_until_the_source_releases_its_copy() {
    if !needs(
        "a_lost_confirmation_is_in_doubt_until_the_source_releases_its_copy",
        RIG,
    ) {
        return;
    }
    let r = rig_env(&[], |name| {
        if name == "h5" {
            vec![("PAGECAST_FAILPOINT", "dest-resumed:drop")]
        } else {
            Vec::new()
        }
    });
    populate(&r);
    // Pre-copy's switchover: without scatter, no VM switches over by
    // post-copy to gather.
    let (out, rep) = r.evacuate(&["--from", "h1,h2", "--to", "h4,h5", "--no-scatter"]);
    assert!(!out.status.success(), "a VM's move went unconfirmed");
    let doubtful = in_doubt(&rep, "h5");
    let at = eventually(
        Duration::from_secs(30),
        "every VM settled on one host",
        || settled(&r, &MOVING),
    );
    for (name, _) in &doubtful {
        assert_eq!(at[name], "h5", "{name} runs at its destination");
    }
    assert!(r.agent(&doubtful[0].1).log().contains("released here"));
}

/// `pagecast cancel JOB` stops the job: VMs not switched over stay.
#[test]
fn cancel_stops_the_job_and_vms_stay() {
    if !needs("cancel_stops_the_job_and_vms_stay", RIG) {
        return;
    }
    let r = rig(&[]);
    populate(&r);
    let job = evacuate_bg(&r, &["--bandwidth", "50M", "--job", "ev-test"]);
    std::thread::sleep(Duration::from_millis(1500));
    let addrs = r.idx.addrs();
    let out = cli(r.d(), &["cancel", "--index", &addrs, "ev-test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = job.wait(Duration::from_secs(60));
    assert!(!out.status.success(), "a cancelled job fails");
    let rep = report_of(&out);
    let moved = rep["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["ok"] == true)
        .count();
    assert!(
        moved < MOVING.len(),
        "the cancel came too late to test anything"
    );
    where_each_runs(&r, &MOVING);
}

/// `pagecast cancel` tells every agent at once: two frozen agents (SIGSTOP,
/// connections open) cost it one handshake deadline (5 s), not one each,
/// and it names both; the others are told. Before, it told the agents one
/// after another, each answer allowed 300 s.
#[test]
fn cancel_reaches_every_agent_at_once_past_frozen_ones() {
    if !needs("cancel_reaches_every_agent_at_once_past_frozen_ones", RIG) {
        return;
    }
    let r = rig(&[]);
    // Every host has a VM, so the index lists all five.
    populate(&r);
    r.agent("h5").freeze();
    r.agent("h6").freeze();
    let t = std::time::Instant::now();
    let out = cli(r.d(), &["cancel", "--index", &r.idx.addrs(), "ev-none"]);
    let took = t.elapsed();
    r.agent("h5").thaw();
    r.agent("h6").thaw();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("on 3 agent(s)"), "{stdout} / {stderr}");
    assert!(
        stderr.contains("h5:") && stderr.contains("h6:"),
        "the frozen agents are not named: {stderr} / {stdout}"
    );
    assert!(took < Duration::from_secs(9), "cancelling took {took:?}");
}

/// The report's bytes add up to what the source agents counted sending.
#[test]
fn the_report_adds_up_to_the_agents_counters() {
    if !needs("the_report_adds_up_to_the_agents_counters", RIG) {
        return;
    }
    let r = rig(&[]);
    populate(&r);
    let before: f64 = ["h1", "h2"]
        .iter()
        .map(|h| r.agent(h).metric("pagecast_agent_bytes_sent_total"))
        .sum();
    let (out, rep) = r.evacuate(&["--from", "h1,h2", "--to", "h4,h5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after: f64 = ["h1", "h2"]
        .iter()
        .map(|h| r.agent(h).metric("pagecast_agent_bytes_sent_total"))
        .sum();
    let counted = (after - before) as u64;
    let reported = rep["source_bytes"].as_u64().unwrap();
    eprintln!("reported {reported}, the agents counted {counted}");
    assert_eq!(reported, counted);
    let by = &rep["bytes_by_class"];
    let classes = ["multicast", "unicast", "repair"]
        .iter()
        .map(|k| by[k].as_u64().unwrap())
        .sum::<u64>();
    // Classes count payloads; the source total adds cast control frames.
    assert!(
        classes <= reported && classes as f64 >= reported as f64 * 0.95,
        "{classes} vs {reported}"
    );
}

/// The baselines move the same VMs, verified: VMScatter (no reuse of what
/// destinations hold) and per-VM pre-copy (every non-zero page).
#[test]
fn the_baselines_move_every_vm_verified() {
    if !needs("the_baselines_move_every_vm_verified", RIG) {
        return;
    }
    let r = rig(&[]);
    populate(&r);
    let (out, rep) = r.evacuate(&["--from", "h1", "--to", "h4,h5", "--strategy", "vmscatter"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for v in rep["vms"].as_array().unwrap() {
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(v["pages_local"], 0, "vmscatter reuses nothing: {v}");
    }
    let (out, rep) = r.evacuate(&["--from", "h2", "--to", "h4,h5", "--strategy", "precopy"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for v in rep["vms"].as_array().unwrap() {
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(v["pages_local"], 0, "precopy reuses nothing: {v}");
    }
    assert_eq!(rep["bytes_by_class"]["multicast"], 0);
    where_each_runs(&r, &MOVING);
    assert!(r.vms_on("h1").is_empty() && r.vms_on("h2").is_empty());
}

/// A VM dirtying 50,000 pages/s, faster than its share of a 200 Mbit/s
/// limit can carry: under `auto` (the default) it is slowed to half speed
/// at most once, then resumes at its destination by post-copy instead of
/// holding the job, verified, and the report says so with what post-copy
/// cost.
#[test]
fn auto_moves_a_vm_that_outruns_its_link_by_postcopy_verified() {
    if !needs(
        "auto_moves_a_vm_that_outruns_its_link_by_postcopy_verified",
        RIG,
    ) {
        return;
    }
    let r = rig(&[]);
    r.vm_start("h1", "hot1", "web:index=5", 48, 50_000);
    r.vm_start("h1", "db1", "db:index=1", 48, 0);
    r.vm_start("h4", "web0", "web:index=0", 48, 0);
    r.wait_published(&["hot1", "db1", "web0"]);
    let (out, rep) = r.evacuate(&[
        "--from",
        "h1",
        "--to",
        "h4,h5",
        "--bandwidth",
        "200M",
        "--max-downtime",
        "100",
    ]);
    eprintln!("{}", serde_json::to_string_pretty(&rep).unwrap());
    assert!(
        out.status.success(),
        "{}\n{rep}\n{}",
        String::from_utf8_lossy(&out.stderr),
        r.logs()
    );
    assert_eq!(rep["ok"], true);
    let vms = rep["vms"].as_array().unwrap();
    for v in vms {
        assert_eq!(v["verified"], true, "{v}");
    }
    let hot = vms.iter().find(|v| v["name"] == "hot1").unwrap();
    assert_eq!(hot["switchover"], "postcopy", "{hot}");
    assert!(
        hot["max_throttle_pct"].as_u64().is_some_and(|t| t <= 50),
        "slowed at most once, to half speed: {hot}"
    );
    assert!(hot["postcopy_s"].as_f64().unwrap() > 0.0, "{hot}");
    let at = where_each_runs(&r, &["hot1", "db1"]);
    assert!(at.values().all(|h| h == "h4" || h == "h5"), "{at:?}");
    assert!(r.vms_on("h1").is_empty());
}

/// A cordoned host takes no VM: `hosts` shows it, `evacuate` leaves it out
/// and refuses it by name, and its agent refuses to start a VM unless
/// forced; an evacuation cordons its sources and lifts that at its end.
#[test]
fn a_cordoned_host_takes_no_vm() {
    if !needs("a_cordoned_host_takes_no_vm", RIG) {
        return;
    }
    let r = rig(&[]);
    populate(&r);
    let addrs = r.idx.addrs();
    let ok = |args: &[&str]| {
        let out = cli(r.d(), args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = ok(&["cordon", "h4", "--reason", "firmware", "--index", &addrs]);
    assert!(said.contains("h4 is cordoned"), "{said}");
    let cordon_of = |host: &str| -> (bool, String) {
        let v = cli_json(r.d(), &["hosts", "--index", &addrs, "--json"]);
        let h = v["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == host)
            .unwrap()
            .clone();
        (
            h["cordoned"].as_bool().unwrap(),
            h["cordon_reason"].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(cordon_of("h4"), (true, "firmware".to_owned()));
    // Named as a destination: refused before anything moves.
    let (out, _) = r.evacuate(&["--from", "h1", "--to", "h4"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("h4, which is cordoned"), "{err}");
    // The agent asks the index at each start: refused at once, not only
    // after its next report.
    let start = |name: &str, force: bool| {
        let mut a = vec![
            "vm",
            "start",
            "--agent",
            &r.agent("h4").addr,
            "--name",
            name,
            "--synthetic",
            "web:index=7",
            "--memory",
            "16MiB",
        ];
        if force {
            a.push("--force");
        }
        cli(r.d(), &a)
    };
    let out = start("late", false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a VM started on a cordoned host");
    assert!(
        err.contains("h4 is cordoned (firmware)") && err.contains("--force"),
        "{err}"
    );
    assert!(start("forced", true).status.success());
    // Without --to, the plan leaves h4 out; the job's own cordon of its
    // source (its order checked over the in-memory cluster,
    // cordons_keep_vms_off_hosts_and_the_job_cordons_its_sources) is lifted
    // after it.
    let (out, rep) = r.evacuate(&["--from", "h1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for v in rep["vms"].as_array().unwrap() {
        assert_ne!(v["to"], "h4", "{v}");
    }
    assert_eq!(cordon_of("h1"), (false, String::new()));
    assert!(cordon_of("h4").0);
    ok(&["uncordon", "h4", "--index", &addrs]);
    assert_eq!(cordon_of("h4"), (false, String::new()));
    // Lifted a moment ago: a start goes through at once (an agent going by
    // its last report refused it for up to 5 s).
    let out = start("after", false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--max-incoming 1`: with real agents, no two VMs are under way into one
/// destination at once (each VM's phases, from its first to `done`, do not
/// overlap another's bound for the same host), and every VM moves verified.
#[test]
fn max_incoming_keeps_one_vm_arriving_per_host() {
    if !needs("max_incoming_keeps_one_vm_arriving_per_host", RIG) {
        return;
    }
    let r = rig(&[]);
    populate(&r);
    let (out, rep) = r.evacuate(&["--from", "h1,h2", "--to", "h4,h5", "--max-incoming", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut spans: Vec<(String, f64, f64)> = Vec::new();
    for v in rep["vms"].as_array().unwrap() {
        assert_eq!(v["verified"], true, "{v}");
        let name = v["name"].as_str().unwrap();
        let phases = rep["phases"][name].as_array().unwrap();
        let at = |p: &serde_json::Value| p["at_s"].as_f64().unwrap();
        spans.push((
            v["to"].as_str().unwrap().to_owned(),
            at(&phases[0]),
            at(phases.last().unwrap()),
        ));
    }
    assert_eq!(spans.len(), 4);
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            if a.0 == b.0 {
                assert!(
                    a.2 <= b.1 || b.2 <= a.1,
                    "two VMs arriving at {} at once: {a:?} {b:?}",
                    a.0
                );
            }
        }
    }
}

/// Only an operator cordons: a client holding a host's real certificate,
/// asking through the CLI's wire protocol, is refused.
#[test]
fn a_host_certificate_cannot_cordon() {
    if !needs("a_host_certificate_cannot_cordon", RIG) {
        return;
    }
    let r = rig(&[]);
    let addrs = r.idx.addrs();
    let host_tls = pagecast_tests::pki::node("h5", pagecast_channel::Role::Host);
    let out = cli(
        r.d(),
        &[
            "cordon",
            "h6",
            "--index",
            &addrs,
            "--tls",
            host_tls.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("may not cordon"), "{err}");
}

/// Scatter-gather's rig: h1 (rack r1, 1 Gbit/s) is evacuated to h4 (rack
/// r2, a tenth of that), and h7 (rack r3, 1 Gbit/s) takes no other part:
/// the intermediary, started with `inter_env`. Two VMs on h1, dirtying.
fn scatter_rig(inter_env: &[(&'static str, &'static str)]) -> Rig {
    scatter_rig_of(&SCATTER_HOSTS, inter_env)
}

/// [`scatter_rig`]'s hosts: name, rack, link, capacity.
const SCATTER_HOSTS: [(&str, &str, &str, &str); 3] = [
    ("h1", "r1", "1G", "512MiB"),
    ("h4", "r2", "100M", "512MiB"),
    ("h7", "r3", "1G", "512MiB"),
];

/// [`scatter_rig`] with `hosts` (name, rack, link, capacity); h7 is the
/// intermediary.
fn scatter_rig_of(
    hosts: &[(&str, &str, &str, &str)],
    inter_env: &[(&'static str, &'static str)],
) -> Rig {
    scatter_rig_env(hosts, &|name| {
        if name == "h7" {
            inter_env.to_vec()
        } else {
            Vec::new()
        }
    })
}

/// [`scatter_rig_of`], each agent with `env(name)` in its environment.
fn scatter_rig_env(
    hosts: &[(&str, &str, &str, &str)],
    env: &dyn Fn(&str) -> Vec<(&'static str, &'static str)>,
) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let idx = IndexCluster::start(dir.path(), SHARDS);
    let addrs = idx.addrs();
    let agents = hosts
        .iter()
        .map(|(name, rack, link, capacity)| {
            let args = [
                "--index",
                &addrs,
                "--rack",
                rack,
                "--link",
                link,
                "--capacity",
                capacity,
            ];
            AgentProc::start_with_env(dir.path(), name, &args, &env(name))
        })
        .collect();
    let r = Rig { dir, idx, agents };
    r.vm_start("h1", "web1", "web:index=1", 48, 2000);
    r.vm_start("h1", "db1", "db:index=1", 48, 500);
    r.wait_published(&["web1", "db1"]);
    r
}

/// Contents the index lists at `host`, over every shard.
fn listed_at(c: &mut pagecast_index::client::IndexClient, host: &str) -> Result<u64, String> {
    let hosts = c.hosts(false).map_err(|e| e.to_string())?;
    let Some(h) = hosts.iter().find(|h| h.name == host) else {
        return Err(format!("{host} is not in the index"));
    };
    let mut n = 0;
    for s in 0..SHARDS {
        n += c.holdings(s, h.index).map_err(|e| e.to_string())?.distinct;
    }
    Ok(n)
}

/// Pages h4 gathered from intermediaries, and those asked of the source
/// instead, as its log says for each VM.
fn gathered_at(r: &Rig, host: &str) -> (u64, u64) {
    let log = r.agent(host).log();
    let mut out = (0, 0);
    for line in log
        .lines()
        .filter(|l| l.contains("gathered from intermediaries"))
    {
        // "...: G pages gathered from intermediaries, L asked of ..."
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = |w: &str| {
            words
                .iter()
                .position(|x| *x == w)
                .and_then(|i| words.get(i - 1))
                .and_then(|n| n.parse::<u64>().ok())
        };
        let (Some(g), Some(l)) = (at("pages"), at("asked")) else {
            panic!("a gathering line without its counts: {line}");
        };
        out.0 += g;
        out.1 += l;
    }
    out
}

/// `evacuate --scatter` with a destination whose link is a tenth of the
/// source's: what it cannot take in the source's time goes to the
/// intermediary h7, which fetches it from h1; the VMs switch over by
/// post-copy and h4 gathers the rest from h7 while they run. Every VM
/// arrives verified, and the source's migrations did not carry what was
/// gathered.
#[test]
fn scatter_sheds_the_source_through_an_intermediary_and_the_destination_gathers() {
    let name = "scatter_sheds_the_source_through_an_intermediary_and_the_destination_gathers";
    if !needs(name, &[Need::Kvm, Need::LoopbackMulticast, Need::Root]) {
        return;
    }
    let r = scatter_rig(&[]);
    // h7 runs no VM: what the index lists there while the job runs is what
    // it keeps for the job.
    let mut c = r.idx.client();
    assert_eq!(listed_at(&mut c, "h7"), Ok(0));
    let running = std::sync::atomic::AtomicBool::new(true);
    let (most, (out, rep)) = std::thread::scope(|s| {
        let watch = s.spawn(|| {
            let mut most = 0;
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(listed_at(&mut c, "h7").unwrap_or(0));
                std::thread::sleep(Duration::from_millis(20));
            }
            most
        });
        let done = r.evacuate(&["--from", "h1", "--to", "h4", "--scatter"]);
        running.store(false, std::sync::atomic::Ordering::Relaxed);
        (watch.join().unwrap(), done)
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}\n{}", r.logs());
    assert!(err.contains("to 1 intermediaries (h7)"), "{err}");
    assert!(most > 0, "the index never listed what h7 kept");
    let mut c = r.idx.client();
    eventually(
        Duration::from_secs(10),
        "h7's listing empty again",
        || match listed_at(&mut c, "h7")? {
            0 => Ok(()),
            n => Err(format!("{n} contents listed")),
        },
    );
    eprintln!("the index listed up to {most} contents at h7");
    for v in rep["vms"].as_array().unwrap() {
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(
            v["switchover"],
            "postcopy",
            "gathering needs post-copy: {v}\n{err}\n{}",
            r.logs()
        );
    }
    assert!(
        r.agent("h7")
            .log()
            .contains("pages for destinations to gather")
    );
    let (gathered, lost) = gathered_at(&r, "h4");
    assert!(
        gathered > 1_000 && lost == 0,
        "gathered {gathered}, lost {lost}\n{}",
        r.logs()
    );
    let said: u64 = rep["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["pages_gathered"].as_u64().unwrap())
        .sum();
    // The report counts the frames the destination said it would gather;
    // those the guest dirtied since came from the source instead.
    assert!(said >= gathered, "reported {said}, gathered {gathered}");
    let sent: u64 = rep["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["bytes_sent"].as_u64().unwrap())
        .sum();
    // What the source's migrations carried and what was gathered fit in
    // the VMs' 96 MiB (and the manifests and dirty rounds): nothing
    // gathered was also sent.
    assert!(
        sent + gathered * 4096 < (96 << 20) + (8 << 20),
        "the migrations sent {sent} bytes, {gathered} pages were gathered"
    );
    let at = where_each_runs(&r, &["web1", "db1"]);
    assert!(at.values().all(|h| h == "h4"), "{at:?}");
    assert!(rep["evicted_s"]["h1"].as_f64().is_some(), "{rep}");
}

/// An intermediary that dies once it has given h4 its first stashed pages
/// (a failpoint: a kill from outside cannot be timed mid-gather): h4 asks
/// the paused source for the rest, and every VM still arrives verified.
#[test]
fn an_intermediary_killed_mid_gather_leaves_the_rest_to_the_source() {
    let name = "an_intermediary_killed_mid_gather_leaves_the_rest_to_the_source";
    if !needs(name, &[Need::Kvm, Need::LoopbackMulticast, Need::Root]) {
        return;
    }
    let mut r = scatter_rig(&[("PAGECAST_FAILPOINT", "gather-served:exit")]);
    let (out, rep) = r.evacuate(&["--from", "h1", "--to", "h4", "--scatter"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}\n{}", r.logs());
    for v in rep["vms"].as_array().unwrap() {
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(v["switchover"], "postcopy", "{v}");
    }
    let h7 = r.agents.iter_mut().find(|a| a.name == "h7").unwrap();
    let status = h7.wait_exit(Duration::from_secs(5));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(137),
        "the intermediary died at the failpoint"
    );
    let (gathered, lost) = gathered_at(&r, "h4");
    assert!(lost > 0, "gathered {gathered}, lost {lost}\n{}", r.logs());
    // h7 is gone: each VM runs at h4 and no longer at h1.
    let at_h4 = r.vms_on("h4");
    for vm in ["web1", "db1"] {
        assert!(
            at_h4.iter().any(|(n, s)| n == vm && s == "running"),
            "{vm}: {at_h4:?}"
        );
    }
    assert!(r.vms_on("h1").is_empty(), "{:?}", r.vms_on("h1"));
}

/// Scatter with one destination frozen (SIGSTOP) before the job starts: its
/// VM fails and runs on at the source, the job's other VM moves by
/// post-copy, gathering from the intermediary, and the job ends well
/// within a minute.
#[test]
fn scatter_goes_on_around_a_frozen_destination() {
    let name = "scatter_goes_on_around_a_frozen_destination";
    if !needs(name, &[Need::Kvm, Need::LoopbackMulticast, Need::Root]) {
        return;
    }
    // Each destination has room for one VM.
    let hosts = [
        ("h1", "r1", "1G", "512MiB"),
        ("h4", "r2", "100M", "64MiB"),
        ("h5", "r2", "100M", "64MiB"),
        ("h7", "r3", "1G", "512MiB"),
    ];
    let r = scatter_rig_of(&hosts, &[]);
    r.agent("h5").freeze();
    let t = Instant::now();
    let (out, rep) = r.evacuate(&["--from", "h1", "--to", "h4,h5", "--scatter"]);
    let took = t.elapsed();
    r.agent("h5").thaw();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("the job took {took:?}");
    assert!(
        took < Duration::from_secs(60),
        "the job took {took:?}\n{err}"
    );
    assert_eq!(out.status.code(), Some(2), "some VMs did not move: {err}");
    let vms = rep["vms"].as_array().expect("a report");
    assert_eq!(vms.len(), 2, "{rep}");
    for v in vms {
        if v["to"] == "h5" {
            assert_eq!(v["ok"], false, "{v}");
            assert_eq!(v["in_doubt"], false, "{v}");
        } else {
            assert_eq!(v["verified"], true, "{v}\n{err}");
            assert_eq!(v["switchover"], "postcopy", "{v}");
            assert!(v["pages_gathered"].as_u64().unwrap() > 0, "{v}\n{err}");
        }
    }
    // Thawed, h5 keeps nothing: each VM runs on one host.
    settled_around(&r, vms, &["web1", "db1"], "h5");
}

/// An intermediary that freezes (SIGSTOP, raised by a failpoint so that
/// it happens mid-gather) once it has given h4 its first stashed pages:
/// h4 gives it up within its reply timeout, asks the paused source for
/// the rest, and every VM arrives verified; the job does not wait for the
/// frozen host.
#[test]
fn an_intermediary_frozen_mid_gather_is_given_up_and_the_source_sends_the_rest() {
    let name = "an_intermediary_frozen_mid_gather_is_given_up_and_the_source_sends_the_rest";
    if !needs(name, &[Need::Kvm, Need::LoopbackMulticast, Need::Root]) {
        return;
    }
    let r = scatter_rig(&[("PAGECAST_FAILPOINT", "gather-served:stop")]);
    let t = Instant::now();
    let (out, rep) = r.evacuate(&["--from", "h1", "--to", "h4", "--scatter"]);
    let took = t.elapsed();
    r.agent("h7").thaw();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("the job took {took:?}");
    assert!(out.status.success(), "{err}\n{}", r.logs());
    assert!(took < Duration::from_secs(60), "the job took {took:?}");
    for v in rep["vms"].as_array().unwrap() {
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(v["switchover"], "postcopy", "{v}");
    }
    let (gathered, lost) = gathered_at(&r, "h4");
    assert!(lost > 0, "gathered {gathered}, lost {lost}\n{}", r.logs());
    let h4 = r.agent("h4").log();
    assert!(
        h4.contains("gathering stopped") || h4.contains("gathering: connection"),
        "{h4}"
    );
    let at = where_each_runs(&r, &["web1", "db1"]);
    assert!(at.values().all(|h| h == "h4"), "{at:?}");
}

/// An intermediary frozen (SIGSTOP) before the job: the coordinator
/// cannot open the job there, so nothing is stashed on it and its share
/// is cast from the source after all; every VM arrives verified, and the
/// job waits for the frozen host no longer than one request's deadline.
#[test]
fn an_intermediary_frozen_before_the_job_is_passed_over() {
    let name = "an_intermediary_frozen_before_the_job_is_passed_over";
    if !needs(name, &[Need::Kvm, Need::LoopbackMulticast, Need::Root]) {
        return;
    }
    let r = scatter_rig(&[]);
    r.agent("h7").freeze();
    share_cast_around_frozen_h7(&r, "scatter to h7", Duration::from_secs(30));
}

/// Evacuates h1 onto h4 while the scatter rig's intermediary h7 is frozen
/// (before or during the job), then thaws it: the progress says the
/// stash `failed` and shows the direct share's cast and then h7's share's;
/// nothing is gathered, every VM arrives verified at h4, and the job ends
/// within `bound`.
fn share_cast_around_frozen_h7(r: &Rig, failed: &str, bound: Duration) {
    let t = Instant::now();
    let (out, rep) = r.evacuate(&["--from", "h1", "--to", "h4"]);
    let took = t.elapsed();
    r.agent("h7").thaw();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}\nthe job took {took:?}");
    assert!(out.status.success(), "{err}\n{}", r.logs());
    assert!(err.contains(failed), "{err}");
    assert!(err.matches("h1: casting").count() >= 2, "{err}");
    for v in rep["vms"].as_array().unwrap() {
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(v["pages_gathered"], 0, "{v}");
    }
    let at = where_each_runs(r, &["web1", "db1"]);
    assert!(at.values().all(|h| h == "h4"), "{at:?}");
    assert!(took < bound, "the job took {took:?}");
}

/// An intermediary that freezes (SIGSTOP, raised by a failpoint) once it
/// has kept its first 1,024 pages from the source: the coordinator gives
/// its fetch up at the stash's deadline (seconds, from the links) and
/// casts the share from the source after all; nothing is gathered, every
/// VM arrives verified.
#[test]
fn an_intermediary_frozen_mid_stash_is_given_up_and_its_share_cast() {
    let name = "an_intermediary_frozen_mid_stash_is_given_up_and_its_share_cast";
    if !needs(name, &[Need::Kvm, Need::LoopbackMulticast, Need::Root]) {
        return;
    }
    let r = scatter_rig(&[("PAGECAST_FAILPOINT", "stash-kept:stop")]);
    share_cast_around_frozen_h7(&r, "scatter from h1 to h7", Duration::from_secs(40));
}

/// The link breaks at the switchover point of a post-copy move, after the
/// destination started the VM (`PAGECAST_FAILPOINT=dest-resumed:drop` at
/// h4; scatter makes the moves post-copy): the destination cannot have
/// the pages it lacks, so its copy must not run on; the source never
/// heard `Resumed`. Each VM ends up running on exactly one host, and that
/// is its source, whose memory is whole.
#[test]
fn a_postcopy_move_whose_link_breaks_at_resume_runs_on_at_its_source() {
    let name = "a_postcopy_move_whose_link_breaks_at_resume_runs_on_at_its_source";
    if !needs(name, &[Need::Kvm, Need::LoopbackMulticast, Need::Root]) {
        return;
    }
    let r = scatter_rig_env(&SCATTER_HOSTS, &|name| {
        if name == "h4" {
            vec![("PAGECAST_FAILPOINT", "dest-resumed:drop")]
        } else {
            Vec::new()
        }
    });
    let (out, rep) = r.evacuate(&["--from", "h1", "--to", "h4"]);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "{err}\n{}",
        serde_json::to_string_pretty(&rep).unwrap_or_default()
    );
    assert!(!out.status.success(), "the moves went unconfirmed");
    let at = eventually(
        Duration::from_secs(30),
        "every VM settled on one host",
        || settled(&r, &["web1", "db1"]),
    );
    assert!(at.values().all(|h| h == "h1"), "{at:?}\n{}", r.logs());
    // The destination's copy ran on post-copy, and was stopped.
    let h4 = r.agent("h4").log();
    assert!(
        h4.contains("post-copy failed: stopping the arrived VM"),
        "{h4}"
    );
}
