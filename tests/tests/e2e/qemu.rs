//! Unmodified QEMU guests migrated through pagecast (`vm adopt`, the
//! stream proxy): real Linux guests under TCG, agents as processes on
//! loopback. Needs QEMU, a kernel and a static busybox (`pagecast_testkit`).

use std::time::{Duration, Instant};

use pagecast_tests::cluster::{AgentProc, cli, cli_json, free_port};
use pagecast_tests::qemu::{Guest, Start, qemu_or_skip};
use serde_json::json;

fn adopt(dir: &std::path::Path, agent: &AgentProc, g: &Guest, incoming: bool) -> serde_json::Value {
    let mut args = vec![
        "vm".to_owned(),
        "adopt".into(),
        "--agent".into(),
        agent.addr.clone(),
        "--name".into(),
        g.name.clone(),
        "--qmp".into(),
        g.qmp.display().to_string(),
        "--memory-file".into(),
        g.ram.display().to_string(),
        "--json".into(),
    ];
    if incoming {
        args.push("--incoming".into());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    cli_json(dir, &a)
}

/// `pagecast migrate` of adopted VM `vm`: the source agent pairs it with
/// the waiting QEMU the destination agent adopted under the same name.
fn migrate(
    dir: &std::path::Path,
    vm: &str,
    from: &AgentProc,
    to: &AgentProc,
) -> std::process::Output {
    cli(
        dir,
        &[
            "migrate", "--vm", vm, "--from", &from.addr, "--to", &to.addr, "--json",
        ],
    )
}

/// `pagecast migrate --switchover postcopy` of adopted VM `vm` is refused
/// by name (its memory travels in QEMU's own stream), before anything
/// moves.
fn postcopy_is_refused(dir: &std::path::Path, vm: &str, from: &AgentProc, to: &AgentProc) {
    let out = cli(
        dir,
        &[
            "migrate",
            "--vm",
            vm,
            "--from",
            &from.addr,
            "--to",
            &to.addr,
            "--switchover",
            "postcopy",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("not offered for adopted QEMU VMs"), "{err}");
}

fn wait_status(g: &Guest, want: &str, within: Duration) -> String {
    let until = Instant::now() + within;
    let mut q = g.qmp();
    loop {
        let s = q.status().unwrap();
        if s == want || Instant::now() > until {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn qemu_guests_migrate_through_pagecast() {
    let Some((qemu, kernel)) = qemu_or_skip("qemu_guests_migrate_through_pagecast") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let a = AgentProc::start(dir, "qa", &[]);
    let b = AgentProc::start(dir, "qb", &[]);

    // One kernel and initramfs for every guest. At b a resident guest of
    // the same image; vm1 goes a -> b through pagecast; vm2, the same
    // image, goes QEMU to QEMU directly; vm3 is killed mid-migration at
    // its destination.
    let direct_port = free_port();
    let direct_addr = format!("127.0.0.1:{direct_port}");
    let resident = Guest::start(dir, "resident", &qemu, &kernel, Start::Boot);
    let vm1 = Guest::start(dir, "vm1", &qemu, &kernel, Start::Boot);
    let vm2 = Guest::start(dir, "vm2", &qemu, &kernel, Start::Boot);
    let vm3 = Guest::start(dir, "vm3", &qemu, &kernel, Start::Boot);
    // vm4 goes as libvirt would move it: its destination QEMU listens on a
    // loopback address of b's host, the migration is started at the
    // source QEMU towards a loopback port of a's agent.
    let route_port = free_port();
    let (route_src, route_dst) = (
        format!("127.0.0.2:{route_port}"),
        format!("127.0.0.3:{route_port}"),
    );
    let vm4 = Guest::start(dir, "vm4", &qemu, &kernel, Start::Boot);
    let vm4_in = Guest::start(dir, "vm4-in", &qemu, &kernel, Start::Listen(&route_dst));
    let mut vm1_in = Guest::start(dir, "vm1-in", &qemu, &kernel, Start::Defer);
    let vm2_in = Guest::start(dir, "vm2-in", &qemu, &kernel, Start::Listen(&direct_addr));
    let mut vm3_in = Guest::start(dir, "vm3-in", &qemu, &kernel, Start::Defer);
    for g in [&resident, &vm1, &vm2, &vm3, &vm4] {
        g.wait_booted(Duration::from_secs(240));
    }

    // Adopt: the resident and the waiting destinations at b, the sources at a.
    let r = adopt(dir, &b, &resident, false);
    assert_eq!(r["kind"], "qemu");
    assert_eq!(r["state"], "running");
    // A waiting QEMU adopted as running, or a running one as incoming: refused.
    let out = cli(
        dir,
        &[
            "vm",
            "adopt",
            "--agent",
            &b.addr,
            "--name",
            "x",
            "--qmp",
            vm1_in.qmp.to_str().unwrap(),
            "--memory-file",
            vm1_in.ram.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--incoming"));
    // Pagecast pairs a source with the waiting QEMU of the same name.
    let rename = |g: &mut Guest, name: &str| g.name = name.to_owned();
    rename(&mut vm1_in, "vm1");
    rename(&mut vm3_in, "vm3");
    let r = adopt(dir, &b, &vm1_in, true);
    assert_eq!(r["state"], "incoming");
    adopt(dir, &b, &vm3_in, true);
    adopt(dir, &a, &vm1, false);
    adopt(dir, &a, &vm3, false);
    let list = cli_json(dir, &["vm", "list", "--agent", &b.addr, "--json"]);
    let kinds: Vec<(String, String)> = list["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().into(),
                v["kind"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("resident".into(), "qemu".into())),
        "{kinds:?}"
    );

    // Direct QEMU to QEMU.
    let mut q2 = vm2.qmp();
    q2.execute("migrate", json!({"uri": format!("tcp:{direct_addr}")}))
        .unwrap();
    let until = Instant::now() + Duration::from_secs(120);
    let direct = loop {
        let (s, m) = q2.migration().unwrap();
        if s == "completed" {
            break m;
        }
        assert!(
            s != "failed" && Instant::now() < until,
            "direct migration {s}: {m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let direct_bytes = direct["ram"]["transferred"].as_u64().unwrap();
    assert_eq!(
        wait_status(&vm2_in, "running", Duration::from_secs(60)),
        "running"
    );

    postcopy_is_refused(dir, "vm1", &a, &b);
    assert_eq!(
        vm1.qmp().status().unwrap(),
        "running",
        "it runs on, untouched"
    );

    // Through pagecast.
    let before = vm1.ticks();
    let out = migrate(dir, "vm1", &a, &b);
    assert!(
        out.status.success(),
        "pagecast migrate failed: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log(),
        b.log()
    );
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        wait_status(&vm1_in, "running", Duration::from_secs(60)),
        "running"
    );
    assert!(
        vm1_in.advances(Duration::from_secs(2)),
        "the migrated guest does not run"
    );
    assert!(
        vm1_in.ticks() > before,
        "the destination's console continues the source's count ({} after {before})",
        vm1_in.ticks()
    );
    assert_eq!(vm1.qmp().status().unwrap(), "postmigrate");
    let bytes = rep["bytes_sent"].as_u64().unwrap();
    let local = rep["pages_local"].as_u64().unwrap();
    let held = rep["contents_local"].as_u64().unwrap();
    eprintln!(
        "direct QEMU: {direct_bytes} bytes; through pagecast: {bytes} bytes, {local} pages ({held} distinct contents) from the resident"
    );
    // The resident holds the kernel and the busybox copies: thousands of pages.
    assert!(
        held > 2000,
        "only {held} contents were found at the destination"
    );
    assert!(local >= held);
    assert!(
        bytes + held * 4096 <= direct_bytes,
        "pagecast sent {bytes} bytes, direct QEMU {direct_bytes}: not below it by the {held} pages the resident holds"
    );
    // The VM is b's now, a's no more.
    let list = cli_json(dir, &["vm", "list", "--agent", &b.addr, "--json"]);
    let vm1_state = list["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "vm1")
        .map(|v| v["state"].clone());
    assert_eq!(vm1_state, Some(json!("running")));
    let list = cli_json(dir, &["vm", "list", "--agent", &a.addr, "--json"]);
    assert!(
        !list["vms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "vm1")
    );

    // A capability the proxy cannot parse is refused up front, by name;
    // the source runs on.
    // (QEMU serves one QMP client at a time: the test lets go of it while
    // the agent needs it.)
    vm3.qmp()
        .execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "multifd", "state": true}]}),
        )
        .unwrap();
    let out = migrate(dir, "vm3", &a, &b);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"multifd\"") && err.contains("turn it off"),
        "{err}"
    );
    // The failure's report names the VM's kind.
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["kind"], "qemu", "{report:#}");
    let mut q3 = vm3.qmp();
    assert_eq!(q3.status().unwrap(), "running");
    q3.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifd", "state": false}]}),
    )
    .unwrap();

    // The destination QEMU dies mid-migration: the source keeps running.
    // QEMU's own bandwidth limit makes the stream last several seconds.
    q3.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 8_000_000}),
    )
    .unwrap();
    drop(q3);
    let mig = std::thread::spawn({
        let dir = dir.to_owned();
        let (from, to) = (a.addr.clone(), b.addr.clone());
        move || {
            cli(
                &dir,
                &[
                    "migrate", "--vm", "vm3", "--from", &from, "--to", &to, "--json",
                ],
            )
        }
    });
    // The stream is under way once the destination's RAM file changes.
    let until = Instant::now() + Duration::from_secs(60);
    let blank = std::fs::read(&vm3_in.ram).unwrap();
    while std::fs::read(&vm3_in.ram).unwrap() == blank {
        assert!(Instant::now() < until, "vm3's migration never started");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(blank);
    std::thread::sleep(Duration::from_secs(1));
    vm3_in.kill();
    let out = mig.join().unwrap();
    assert!(
        !out.status.success(),
        "the migration to a dead QEMU succeeded"
    );
    assert_eq!(
        wait_status(&vm3, "running", Duration::from_secs(20)),
        "running"
    );
    assert!(
        vm3.advances(Duration::from_secs(2)),
        "the source stopped running"
    );
    let list = cli_json(dir, &["vm", "list", "--agent", &a.addr, "--json"]);
    let st = list["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "vm3")
        .map(|v| v["state"].clone());
    assert_eq!(st, Some(json!("running")));
    // Ctrl-C of `pagecast migrate` stops a QEMU migration under way; the
    // source runs on. (The dead destination is forgotten, a new one waits.)
    cli_json(
        dir,
        &["vm", "stop", "--agent", &b.addr, "--name", "vm3", "--json"],
    );
    let mut vm3_again = Guest::start(dir, "vm3-again", &qemu, &kernel, Start::Defer);
    vm3_again.name = "vm3".into();
    adopt(dir, &b, &vm3_again, true);
    let child = std::process::Command::new(pagecast_tests::pagecast_bin())
        .args(["migrate", "--vm", "vm3", "--from", &a.addr, "--to", &b.addr])
        .env("PAGECAST_TLS", pagecast_tests::pki::operator())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    let blank = std::fs::read(&vm3_again.ram).unwrap();
    while std::fs::read(&vm3_again.ram).unwrap() == blank {
        assert!(
            Instant::now() < until,
            "vm3's second migration never started"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(blank);
    // SAFETY: sending SIGINT to our own child process, which is alive.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an interrupted migration succeeded");
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(
        wait_status(&vm3, "running", Duration::from_secs(20)),
        "running"
    );
    assert!(
        vm3.advances(Duration::from_secs(2)),
        "the source stopped after Ctrl-C"
    );

    // The libvirt route: the source agent listens where libvirt's
    // --migrateuri points the source QEMU, the destination agent feeds the
    // QEMU libvirt started listening (not adopted).
    adopt(dir, &a, &vm4, false);
    let out = cli(
        dir,
        &[
            "migrate",
            "--vm",
            "vm4",
            "--from",
            &a.addr,
            "--to",
            &b.addr,
            "--qemu-listen",
            "0.0.0.0:4444",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loopback"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mig = std::thread::spawn({
        let dir = dir.to_owned();
        let (from, to) = (a.addr.clone(), b.addr.clone());
        let (l, c) = (route_src.clone(), route_dst.clone());
        move || {
            cli(
                &dir,
                &[
                    "migrate",
                    "--vm",
                    "vm4",
                    "--from",
                    &from,
                    "--to",
                    &to,
                    "--qemu-listen",
                    &l,
                    "--qemu-connect",
                    &c,
                    "--qemu-wait",
                    "120",
                    "--json",
                ],
            )
        }
    });
    let until = Instant::now() + Duration::from_secs(60);
    while !pagecast_tests::listening("self", route_src.parse().unwrap()) {
        assert!(
            Instant::now() < until,
            "a's agent never listened on {route_src}\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // What libvirt does at the source: QEMU migrates to the URI.
    vm4.qmp()
        .execute("migrate", json!({"uri": format!("tcp:{route_src}")}))
        .unwrap();
    let out = mig.join().unwrap();
    assert!(
        out.status.success(),
        "the libvirt route failed: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log(),
        b.log()
    );
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["kind"], "qemu");
    assert_eq!(
        wait_status(&vm4_in, "running", Duration::from_secs(60)),
        "running"
    );
    assert!(
        vm4_in.advances(Duration::from_secs(2)),
        "the guest moved by the libvirt route does not run"
    );
    assert_eq!(vm4.qmp().status().unwrap(), "postmigrate");
    let bytes = rep["bytes_sent"].as_u64().unwrap();
    let held = rep["contents_local"].as_u64().unwrap();
    eprintln!("libvirt route: {bytes} bytes, {held} distinct contents from b");
    assert!(held > 2000, "only {held} contents were found at b");
    assert!(
        bytes + held * 4096 <= direct_bytes,
        "the libvirt route sent {bytes} bytes, direct QEMU {direct_bytes}"
    );

    // The coordinator sees an adopted VM's content and kind.
    let op = pagecast_tests::pki::tls("operator", pagecast_channel::Role::Operator);
    let c = pagecast_agent_api::client::AgentClient::connect(&a.addr, &op)
        .unwrap()
        .vm_content("vm3", "")
        .unwrap();
    assert_eq!(c.kind, pagecast_proto::v1::VmKind::Qemu);
    assert!(c.hashes.len() > 1000);
    // vm stop only forgets an adopted VM: QEMU runs on.
    cli_json(
        dir,
        &["vm", "stop", "--agent", &a.addr, "--name", "vm3", "--json"],
    );
    assert_eq!(vm3.qmp().status().unwrap(), "running");
}

/// Two QEMU guests of one image evacuated together from one host to two:
/// each goes where its waiting QEMU was adopted, and the contents they
/// share leave the source once, multicast to both destinations. Then one
/// is cloned to two hosts, its contents cast once to both.
#[test]
fn qemu_guests_evacuate_and_clone_with_shared_pages_cast_once() {
    use pagecast_tests::cluster::{IndexCluster, eventually, index_exact};
    let test = "qemu_guests_evacuate_and_clone_with_shared_pages_cast_once";
    if !pagecast_testkit::needs(test, &[pagecast_testkit::Need::LoopbackMulticast]) {
        return;
    }
    let Some((qemu, kernel)) = qemu_or_skip(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let idx = IndexCluster::start(dir, 2);
    let addrs = idx.addrs();
    let agent = |name: &str, rack: &str| {
        AgentProc::start(
            dir,
            name,
            &[
                "--index",
                &addrs,
                "--rack",
                rack,
                "--link",
                "10G",
                "--capacity",
                "1GiB",
            ],
        )
    };
    let a = agent("ga", "r1");
    let b = agent("gb", "r2");
    let c = agent("gc", "r2");
    // vm1 is cloned at the end: it and the QEMUs it goes to have a VM
    // generation ID and a network card.
    let ids = |mac: &str| pagecast_tests::qemu::identity_devices("auto", mac);
    let vm1 = Guest::start_with(
        dir,
        "vm1",
        &qemu,
        &kernel,
        Start::Boot,
        &ids("52:54:00:00:01:01"),
    );
    let vm2 = Guest::start(dir, "vm2", &qemu, &kernel, Start::Boot);
    let mut vm1_in = Guest::start_with(
        dir,
        "vm1-in",
        &qemu,
        &kernel,
        Start::Defer,
        &ids("52:54:00:00:01:02"),
    );
    let mut vm2_in = Guest::start(dir, "vm2-in", &qemu, &kernel, Start::Defer);
    for g in [&vm1, &vm2] {
        g.wait_booted(Duration::from_secs(240));
    }
    adopt(dir, &a, &vm1, false);
    adopt(dir, &a, &vm2, false);
    // vm1 waits at gc, vm2 at gb: the plan must follow the waiting QEMUs.
    vm1_in.name = "vm1".into();
    vm2_in.name = "vm2".into();
    adopt(dir, &c, &vm1_in, true);
    adopt(dir, &b, &vm2_in, true);
    eventually(Duration::from_secs(30), "QEMU VMs published", || {
        let recs = idx.client().vms(false).map_err(|e| e.to_string())?;
        let n = recs
            .iter()
            .filter(|r| r.name == "vm1" || r.name == "vm2")
            .count();
        if n == 2 {
            Ok(())
        } else {
            Err(format!("{n} of 2 listed"))
        }
    });
    let op = pagecast_tests::pki::tls("operator", pagecast_channel::Role::Operator);
    // The index lists exactly what the adopted VMs' scans hold (the
    // agent's audit against the index's holdings, shard by shard).
    let mut ic = idx.client();
    eventually(Duration::from_secs(30), "the index exact for ga", || {
        index_exact(&mut ic, &a, 2)?;
        // Not vacuously: the adopted VMs are listed.
        let hosts = ic.hosts(false).map_err(|e| e.to_string())?;
        let ga = hosts
            .iter()
            .find(|h| h.name == "ga")
            .ok_or("ga not listed")?;
        let listed = ic.holdings(0, ga.index).map_err(|e| e.to_string())?;
        if listed.distinct == 0 {
            return Err("the index lists nothing for ga".into());
        }
        Ok(())
    });
    // What two separate migrations would have to send at the least: each
    // VM's distinct contents.
    let distinct = |vm: &str| {
        pagecast_agent_api::client::AgentClient::connect(&a.addr, &op)
            .unwrap()
            .vm_content(vm, "")
            .unwrap()
            .hashes
    };
    let (h1, h2) = (distinct("vm1"), distinct("vm2"));
    let separate = (h1.len() + h2.len()) as f64 * 4096.0;
    let shared = h1.iter().filter(|h| h2.binary_search(h).is_ok()).count();
    assert!(shared > 2000, "the two guests share only {shared} contents");

    let out = cli(
        dir,
        &[
            "evacuate", "--index", &addrs, "--from", "ga", "--to", "gb,gc", "--json",
        ],
    );
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success() && rep["ok"] == true,
        "evacuate failed: {}\n{rep:#}\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log(),
        b.log(),
        c.log()
    );
    let placed: Vec<(String, String, String)> = rep["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().into(),
                v["to"].as_str().unwrap().into(),
                v["kind"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        placed.contains(&("vm1".into(), "gc".into(), "qemu".into())),
        "{placed:?}"
    );
    assert!(
        placed.contains(&("vm2".into(), "gb".into(), "qemu".into())),
        "{placed:?}"
    );
    for g in [&vm1_in, &vm2_in] {
        assert_eq!(
            wait_status(g, "running", Duration::from_secs(60)),
            "running"
        );
        assert!(
            g.advances(Duration::from_secs(2)),
            "{} does not run",
            g.name
        );
    }
    let multicast = rep["bytes_by_class"]["multicast"].as_f64().unwrap();
    let source = rep["source_bytes"].as_f64().unwrap();
    eprintln!(
        "shared {shared} contents; source sent {source} bytes ({multicast} multicast), separate migrations would send at least {separate}"
    );
    assert!(
        multicast > shared as f64 * 4096.0 * 0.9,
        "the shared contents were not cast: {multicast}"
    );
    // Sending the shared contents once saves most of them (the rest of
    // the difference is the streams' page records and device state).
    assert!(
        source < separate - 0.6 * shared as f64 * 4096.0,
        "the source sent {source} bytes; separate migrations would send {separate}, and {shared} contents are shared"
    );

    a_clone_with_its_sources_generation_id_is_refused(dir, (&qemu, &kernel), &a, &c, &addrs);

    // Clone vm1 (now at gc) to ga, which holds nothing, and gb, which runs
    // vm2 of the same image: waiting QEMUs adopted there under the clone
    // names, each with a VM generation ID of its own. What they lack is
    // cast once; the source runs on.
    let c1 = Guest::start_with(
        dir,
        "vm1-ga",
        &qemu,
        &kernel,
        Start::Defer,
        &ids("52:54:00:00:01:04"),
    );
    let c2 = Guest::start_with(
        dir,
        "vm1-gb",
        &qemu,
        &kernel,
        Start::Defer,
        &ids("52:54:00:00:01:05"),
    );
    adopt(dir, &a, &c1, true);
    adopt(dir, &b, &c2, true);
    let out = cli(
        dir,
        &[
            "clone", "--index", &addrs, "--vm", "vm1", "--to", "ga,gb", "--json",
        ],
    );
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success() && rep["ok"] == true,
        "clone failed: {}\n{rep:#}\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log(),
        b.log(),
        c.log()
    );
    for g in [&c1, &c2] {
        assert_eq!(
            wait_status(g, "running", Duration::from_secs(60)),
            "running"
        );
        assert!(
            g.advances(Duration::from_secs(2)),
            "clone {} does not run",
            g.name
        );
    }
    assert_eq!(
        wait_status(&vm1_in, "running", Duration::from_secs(20)),
        "running"
    );
    assert!(
        vm1_in.advances(Duration::from_secs(2)),
        "the clone's source stopped"
    );
    let source = rep["source_bytes"].as_f64().unwrap();
    let one_copy = h1.len() as f64 * 4096.0;
    eprintln!(
        "clone to 2 hosts: {source} bytes from the source; one copy of vm1's distinct contents is {one_copy}"
    );
    assert!(
        source < 1.5 * one_copy,
        "cloning to two hosts sent {source} bytes, not much less than two copies ({})",
        2.0 * one_copy
    );
    clones_have_their_own_identity(&rep);
}

/// A clone into a QEMU started with its source's (vm1's, listed by `c`)
/// VM generation ID is refused before anything moves: the guest would not
/// know it is a copy. The QEMU waits at `a` under the clone's name, and is
/// forgotten and stopped after.
fn a_clone_with_its_sources_generation_id_is_refused(
    dir: &std::path::Path,
    (qemu, kernel): (&std::path::Path, &std::path::Path),
    a: &AgentProc,
    c: &AgentProc,
    addrs: &str,
) {
    let source_id = vm1_id(dir, c);
    let mut same = Guest::start_with(
        dir,
        "vm1-ga",
        qemu,
        kernel,
        Start::Defer,
        &pagecast_tests::qemu::identity_devices(&source_id, "52:54:00:00:01:03"),
    );
    adopt(dir, a, &same, true);
    let out = cli(
        dir,
        &[
            "clone", "--index", addrs, "--vm", "vm1", "--to", "ga", "--json",
        ],
    );
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("VM generation ID"), "{err}");
    cli_json(
        dir,
        &[
            "vm", "stop", "--agent", &a.addr, "--name", "vm1-ga", "--json",
        ],
    );
    same.kill();
}

/// Each clone of the report `rep` has a VM generation ID of its own (its
/// guest was told), and its network card the MAC its QEMU was started
/// with: the stream carried the source's, so the card was unplugged and
/// plugged again.
fn clones_have_their_own_identity(rep: &serde_json::Value) {
    let source_id = rep["source_identity"].as_str().unwrap().to_owned();
    assert_eq!(source_id.len(), 36, "{rep:#}");
    let mut seen = vec![source_id];
    for c in rep["clones"].as_array().unwrap() {
        let id = c["identity"].as_str().unwrap().to_owned();
        assert!(!seen.contains(&id) && id.len() == 36, "{rep:#}");
        seen.push(id);
        assert_eq!(c["changed"], json!(["vm_generation_id", "mac"]), "{rep:#}");
        assert_eq!(c["kept"], json!([]), "{rep:#}");
    }
}

/// The VM generation ID of vm1 as `agent` lists it.
fn vm1_id(dir: &std::path::Path, agent: &AgentProc) -> String {
    let l = cli_json(dir, &["vm", "list", "--agent", &agent.addr, "--json"]);
    let id = l["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "vm1")
        .map(|v| v["identity"].as_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    assert_eq!(id.len(), 36, "vm1 lists no VM generation ID: {l:#}");
    id
}
