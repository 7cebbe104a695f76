//! A real libvirt: two `libvirtd` daemons on one machine as two hosts
//! (`pagecast_tests::libvirt`), TCG domains defined from docs/qemu.md's
//! XML, agents inside the hosts' namespaces, the index in the test's.
//! libvirt migrates a domain itself (`virsh migrate --live`), once directly
//! and once through pagecast's route, in the same run: the domain runs at
//! its destination according to libvirt, and fewer bytes leave the source
//! through pagecast. Then `pagecast evacuate` empties a host running two
//! libvirt domains: its agent has libvirt move each, through pagecast.

use std::path::Path;
use std::time::{Duration, Instant};

use pagecast_testkit::{Need, needs};
use pagecast_tests::cluster::{
    AgentProc, IndexCluster, ReplicaOpts, cli, cli_json, eventually, free_port,
};
use pagecast_tests::libvirt::{Bridge, LibvirtHost, domain_xml, ticks};

/// Guest memory of each domain.
const MIB: u64 = 128;

/// Defines and starts domain `name` on `host`, console in `dir`, and waits
/// until it boots.
fn boot(dir: &Path, host: &LibvirtHost, name: &str, kernel: &Path) {
    let xml = dir.join(format!("{name}.xml"));
    let serial = dir.join(format!("{name}.serial"));
    std::fs::write(
        &xml,
        domain_xml(name, MIB, kernel, &dir.join("initrd.cpio"), &serial),
    )
    .unwrap();
    host.virsh(&["create", &xml.display().to_string()])
        .unwrap_or_else(|e| panic!("starting {name} on {}: {e}", host.name));
    let until = Instant::now() + Duration::from_secs(90);
    while ticks(&serial) < 3 {
        assert!(
            Instant::now() < until,
            "{name} did not boot within 90 s: {}",
            std::fs::read_to_string(&serial).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Adopts libvirt's domain `name` on `host` into `agent`, as docs/qemu.md
/// says: its RAM file under the host's memory_backing_dir, its own QMP;
/// `domain`: as a libvirt domain that evacuations move through libvirt.
fn adopt(dir: &Path, host: &LibvirtHost, agent: &AgentProc, name: &str, domain: bool) {
    let ram = host.ram_file(name).display().to_string();
    let qmp = format!("/run/pagecast/{name}.qmp");
    let mut args = vec![
        "vm",
        "adopt",
        "--agent",
        &agent.addr,
        "--name",
        name,
        "--qmp",
        &qmp,
        "--memory-file",
        &ram,
        "--json",
    ];
    if domain {
        args.extend(["--libvirt-domain", name]);
    }
    let v = cli_json(dir, &args);
    assert_eq!(
        v["libvirt_domain"].as_str().unwrap_or(""),
        if domain { name } else { "" }
    );
}

/// libvirt's own live migration of `name` from `from` to `to` (QEMU to
/// QEMU); the bytes that left `from`.
fn virsh_migrate(from: &LibvirtHost, to: &LibvirtHost, name: &str) -> u64 {
    let before = from.sent_bytes();
    from.virsh(&[
        "migrate",
        "--live",
        name,
        &to.uri(),
        "--migrateuri",
        &format!("tcp:{}", to.addr),
    ])
    .unwrap_or_else(|e| panic!("libvirt's migration of {name}: {e}"));
    from.sent_bytes() - before
}

/// Waits until `agent` logs that it waits for QEMU's stream.
fn wait_listening(agent: &AgentProc) {
    let until = Instant::now() + Duration::from_secs(60);
    while !agent.log().contains("for its QEMU to migrate to tcp:") {
        assert!(
            Instant::now() < until,
            "the source agent never listened:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn libvirt_migrates_a_domain_through_pagecast_with_fewer_bytes_than_its_own() {
    if !needs(
        "libvirt::libvirt_migrates_a_domain_through_pagecast_with_fewer_bytes_than_its_own",
        &[Need::Libvirt, Need::Qemu, Need::Namespaces],
    ) {
        return;
    }
    let kernel = pagecast_testkit::qemu().expect("probed").kernel;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pagecast_tests::qemu::initramfs(&dir.join("initrd.cpio"));
    let bridge = Bridge::new("pclbr0", "10.213.7");
    let h1 = LibvirtHost::start(&bridge, dir, "lvh1", 1);
    let h2 = LibvirtHost::start(&bridge, dir, "lvh2", 2);
    let (idx, a, b) = cluster(dir, &bridge, &h1, &h2);
    let addrs = idx.addrs();
    // A resident of the same image at the destination, adopted there: its
    // pages are what the destination holds.
    boot(dir, &h2, "resident", &kernel);
    adopt(dir, &h2, &b, "resident", false);
    boot(dir, &h1, "guest", &kernel);

    // libvirt's own migration there and back: the baseline, same domain,
    // same run.
    let direct = virsh_migrate(&h1, &h2, "guest");
    let settle = Duration::from_secs(10);
    assert_eq!(h2.domstate_within("guest", "running", settle), "running");
    virsh_migrate(&h2, &h1, "guest");
    assert_eq!(h1.domstate_within("guest", "running", settle), "running");

    let through = through_pagecast(dir, (&h1, &h2), (&a, &b));
    // The contents the resident holds did not cross.
    println!(
        "libvirt directly: {direct} bytes left h1; through pagecast: {through} ({:.2}x)",
        through as f64 / direct as f64
    );
    assert!(
        (through as f64) < 0.8 * direct as f64,
        "through pagecast {through} bytes, libvirt directly {direct}"
    );

    evacuate_two_domains(dir, &kernel, &h1, &h2, (&a, &b), &addrs, direct);
}

/// The index, on the hosts' bridge, and an agent inside each host naming
/// its libvirt.
fn cluster(
    dir: &Path,
    bridge: &Bridge,
    h1: &LibvirtHost,
    h2: &LibvirtHost,
) -> (IndexCluster, AgentProc, AgentProc) {
    // The index where both hosts reach it: on the bridge.
    let idx = IndexCluster::start_with(
        &dir.join("index"),
        2,
        vec![
            ReplicaOpts {
                ip: Some(bridge.addr()),
                ..ReplicaOpts::default()
            };
            3
        ],
    );
    let addrs = idx.addrs();
    let agent = |h: &LibvirtHost, rack: &str| {
        AgentProc::start_in(
            dir,
            &h.name,
            &format!("{}:{}", h.addr, free_port()),
            h.enter(),
            &[
                "--index",
                &addrs,
                "--rack",
                rack,
                "--link",
                "10G",
                "--libvirt",
                &h.uri(),
            ],
        )
    };
    let (a, b) = (agent(h1, "r1"), agent(h2, "r2"));
    (idx, a, b)
}

/// The domain `guest` migrated by libvirt from `h1` to `h2` through
/// pagecast's route: the source agent takes the stream on a loopback port
/// of h1, the destination agent hands it to the QEMU libvirt starts on
/// h2's loopback (libvirt turns QEMU's return path on). It runs at h2,
/// libvirt says so, and its console goes on; the bytes that left h1.
fn through_pagecast(
    dir: &Path,
    (h1, h2): (&LibvirtHost, &LibvirtHost),
    (a, b): (&AgentProc, &AgentProc),
) -> u64 {
    adopt(dir, h1, a, "guest", false);
    let port = free_port();
    let route = format!("127.0.0.1:{port}");
    let before = h1.sent_bytes();
    let mig = std::thread::spawn({
        let dir = dir.to_owned();
        let (from, to, route) = (a.addr.clone(), b.addr.clone(), route.clone());
        move || {
            cli(
                &dir,
                &[
                    "migrate",
                    "--vm",
                    "guest",
                    "--from",
                    &from,
                    "--to",
                    &to,
                    "--qemu-listen",
                    &route,
                    "--qemu-wait",
                    "120",
                    "--json",
                ],
            )
        }
    });
    wait_listening(a);
    let ticks_before = ticks(&dir.join("guest.serial"));
    let virsh = h1.virsh(&[
        "migrate",
        "--live",
        "guest",
        &h2.uri(),
        "--migrateuri",
        &format!("tcp:{route}"),
        "--listen-address",
        "127.0.0.1",
    ]);
    let out = mig.join().unwrap();
    let through = h1.sent_bytes() - before;
    assert!(
        virsh.is_ok() && out.status.success(),
        "libvirt through pagecast: virsh {virsh:?}; pagecast {}\n{}\nsource agent:\n{}\ndestination agent:\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
        a.log(),
        b.log()
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["kind"], "qemu", "{report}");
    // libvirt says where it runs.
    assert_eq!(h2.domstate("guest"), "running");
    assert!(
        h1.domstate("guest").contains("failed to get domain"),
        "still at the source: {}",
        h1.domstate("guest")
    );
    // And it runs: its console goes on from where it was.
    let until = Instant::now() + Duration::from_secs(30);
    while ticks(&dir.join("guest.serial")) <= ticks_before + 5 {
        assert!(Instant::now() < until, "the guest does not run at h2");
        std::thread::sleep(Duration::from_millis(200));
    }
    through
}

/// `pagecast evacuate` of `h1` running two libvirt domains of the image,
/// adopted as such: the planner places them, `h1`'s agent has libvirt
/// migrate each to `h2`, held in the job, their streams through pagecast
/// with what `h2` holds as hashes. libvirt reports both running at `h2`;
/// less leaves `h1` than libvirt's own migration of one domain (`direct`)
/// for each.
fn evacuate_two_domains(
    dir: &Path,
    kernel: &Path,
    h1: &LibvirtHost,
    h2: &LibvirtHost,
    (a, b): (&AgentProc, &AgentProc),
    addrs: &str,
    direct: u64,
) {
    let names = ["e1", "e2"];
    for n in names {
        boot(dir, h1, n, kernel);
        adopt(dir, h1, a, n, true);
    }
    eventually(Duration::from_secs(30), "the domains published", || {
        let out = cli(dir, &["hosts", "--index", addrs, "--json"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if names.iter().all(|n| text.contains(&format!("\"{n}\""))) {
            Ok(())
        } else {
            Err(text)
        }
    });
    a_uri_that_runs_a_program_is_refused(dir, h1, a, b, "e1");
    let before = h1.sent_bytes();
    let out = cli(
        dir,
        &[
            "evacuate", "--index", addrs, "--from", "lvh1", "--to", "lvh2", "--json",
        ],
    );
    let sent = h1.sent_bytes() - before;
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success() && rep["ok"] == true,
        "evacuate failed: {}\n{rep:#}\nsource agent:\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log()
    );
    for n in names {
        assert_eq!(h2.domstate(n), "running", "{n} at lvh2");
        assert!(
            h1.domstate(n).contains("failed to get domain"),
            "{n} still at lvh1: {}",
            h1.domstate(n)
        );
    }
    println!(
        "evacuating two domains: {sent} bytes left lvh1 ({:.2}x libvirt's own migration of one); by class {}",
        sent as f64 / direct as f64,
        rep["bytes_by_class"]
    );
    let kinds: Vec<&str> = rep["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds, ["qemu", "qemu"], "{rep:#}");
    assert!(
        (sent as f64) < 2.0 * 0.8 * direct as f64,
        "evacuating two domains sent {sent} bytes; libvirt sends {direct} for one"
    );
}

/// The attacker: a destination host that names, as its libvirt, a URI that
/// would have the source's virsh run a program (`qemu+ext://...?command=`).
/// The test does what a coordinator does on that word, with an operator's
/// certificate over the wire: it opens a job at both agents (the
/// destination's naming the QEMU port) and asks the source agent to have
/// libvirt migrate the domain there. The source refuses before virsh runs:
/// the program never runs, and the domain stays where it is.
fn a_uri_that_runs_a_program_is_refused(
    dir: &Path,
    h1: &LibvirtHost,
    a: &AgentProc,
    b: &AgentProc,
    vm: &str,
) {
    use pagecast_agent_api::client::{AgentClient, MigrationEvent};
    use pagecast_proto::v1;
    let marker = dir.join("ran");
    let program = dir.join("program.sh");
    std::fs::write(
        &program,
        format!("#!/bin/sh\ntouch {}\nexit 1\n", marker.display()),
    )
    .unwrap();
    std::fs::set_permissions(
        &program,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let op = pagecast_tests::pki::tls("operator", pagecast_channel::Role::Operator);
    let port = 47_990;
    let job = "attack";
    let open = |at: &str, peer: &str, role: v1::JobRole, vms: Vec<String>, qemu: Vec<String>| {
        AgentClient::connect(at, &op)
            .and_then(|c| {
                c.open_job(v1::JobOpen {
                    job: job.into(),
                    peers: vec![v1::JobPeer {
                        host: peer.into(),
                        role: role as i32,
                        vms,
                    }],
                    deadline_ms: 120_000,
                    qemu_connect: qemu,
                })
            })
            .unwrap_or_else(|e| panic!("opening the job at {at}: {e}"));
    };
    open(
        &b.addr,
        &a.name,
        v1::JobRole::Source,
        vec![vm.into()],
        vec![format!("127.0.0.1:{port}")],
    );
    open(&a.addr, &b.name, v1::JobRole::Destination, vec![], vec![]);
    let r = v1::MigrateRequest {
        vm: vm.into(),
        to: b.addr.clone(),
        job: job.into(),
        qemu_listen: format!("127.0.0.1:{port}"),
        qemu_connect: format!("127.0.0.1:{port}"),
        qemu_wait_s: 10,
        libvirt_to: format!("qemu+ext:///system?command={}", program.display()),
        ..Default::default()
    };
    let outcome = AgentClient::connect(&a.addr, &op)
        .and_then(|c| c.start_migrate(r))
        .and_then(|mut m| {
            loop {
                match m.next_event()? {
                    MigrationEvent::Result(r) => break Ok(r),
                    _ => continue,
                }
            }
        });
    let said = match outcome {
        Ok(r) => {
            assert!(!r.ok, "a migration to that URI went: {r:?}");
            format!("{r:?}")
        }
        Err(e) => e.to_string(),
    };
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !marker.exists(),
        "virsh ran the destination's program: {said}"
    );
    assert!(said.contains("not a libvirt URI"), "{said}");
    assert_eq!(h1.domstate(vm), "running");
    for at in [&a.addr, &b.addr] {
        let _ = AgentClient::connect(at, &op).and_then(|c| c.close_job(job));
    }
}
