//! A real libvirt: two `libvirtd` daemons on one machine as two hosts
//! (`pagecast_tests::libvirt`), TCG domains defined from docs/qemu.md's
//! XML, agents inside the hosts' namespaces. libvirt migrates a domain
//! itself (`virsh migrate --live`), once directly and once through
//! pagecast's route, in the same run: the domain runs at its destination
//! according to libvirt, and fewer bytes leave the source through pagecast.

use std::path::Path;
use std::time::{Duration, Instant};

use pagecast_testkit::{Need, needs};
use pagecast_tests::cluster::{AgentProc, cli, cli_json, free_port};
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
/// says: its RAM file under the host's memory_backing_dir, its own QMP.
fn adopt(dir: &Path, host: &LibvirtHost, agent: &AgentProc, name: &str) {
    let ram = host.ram_file(name).display().to_string();
    let qmp = format!("/run/pagecast/{name}.qmp");
    cli_json(
        dir,
        &[
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
        ],
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
    let a = AgentProc::start_in(
        dir,
        "lvh1",
        &format!("{}:{}", h1.addr, free_port()),
        h1.enter(),
        &[],
    );
    let b = AgentProc::start_in(
        dir,
        "lvh2",
        &format!("{}:{}", h2.addr, free_port()),
        h2.enter(),
        &[],
    );
    // A resident of the same image at the destination, adopted there: its
    // pages are what the destination holds.
    boot(dir, &h2, "resident", &kernel);
    adopt(dir, &h2, &b, "resident");
    boot(dir, &h1, "guest", &kernel);

    // libvirt's own migration there and back: the baseline, same domain,
    // same run.
    let direct = virsh_migrate(&h1, &h2, "guest");
    assert_eq!(h2.domstate("guest"), "running");
    virsh_migrate(&h2, &h1, "guest");
    assert_eq!(h1.domstate("guest"), "running");

    // Through pagecast: the source agent takes the stream on a loopback
    // port of h1, the destination agent hands it to the QEMU libvirt
    // starts on h2's loopback. libvirt turns QEMU's return path on.
    adopt(dir, &h1, &a, "guest");
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
    wait_listening(&a);
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
    // The contents the resident holds did not cross.
    println!(
        "libvirt directly: {direct} bytes left h1; through pagecast: {through} ({:.2}x)",
        through as f64 / direct as f64
    );
    assert!(
        (through as f64) < 0.8 * direct as f64,
        "through pagecast {through} bytes, libvirt directly {direct}"
    );
}
