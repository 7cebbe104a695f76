//! Real libvirt for tests: one `libvirtd` per emulated host, as root, each
//! in its own network, mount and UTS namespaces with its own
//! configuration, state, run, log and cache directories, host UUID and
//! hostname (libvirt refuses to migrate a domain to the host it is on).
//! The hosts sit on a bridge of their own with the test's namespace, which
//! reaches each daemon over TCP (`qemu+tcp://ADDR/system`, no
//! authentication: test only). Each removes what it made when dropped:
//! its domains, its daemon, its namespace; the bridge last.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn run(cmd: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", cmd[0]))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{}`: {}{}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

/// The bridge the hosts hang off, with the test's address on it.
pub struct Bridge {
    name: String,
    /// The first three octets of the subnet (`10.213.7`).
    pub subnet: String,
}

impl Bridge {
    /// Creates bridge `name` with `SUBNET.254/24` in the test's namespace.
    pub fn new(name: &str, subnet: &str) -> Bridge {
        let _ = run(&["ip", "link", "del", name]);
        // Flooding multicast: every host sees every cast (as a switch with
        // snooping off does).
        run(&[
            "ip",
            "link",
            "add",
            name,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])
        .expect("a bridge");
        let b = Bridge {
            name: name.to_owned(),
            subnet: subnet.to_owned(),
        };
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{subnet}.254/24"),
            "dev",
            name,
        ])
        .expect("its address");
        run(&["ip", "link", "set", name, "up"]).expect("bridge up");
        b
    }

    /// The test's own address on the bridge.
    pub fn addr(&self) -> String {
        format!("{}.254", self.subnet)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = run(&["ip", "link", "del", &self.name]);
    }
}

/// One emulated host: a namespace with its libvirtd.
pub struct LibvirtHost {
    /// Its hostname (and the domain of its names).
    pub name: String,
    /// Its address on the bridge.
    pub addr: String,
    ns: String,
    veth: String,
    /// Its directory: configuration, state, logs, and guest RAM (`ram`).
    pub dir: PathBuf,
    daemon: Child,
}

impl LibvirtHost {
    /// Starts host number `n` (1..253) called `name` on `bridge`, its
    /// files under `dir/name`; waits until its daemon answers.
    pub fn start(bridge: &Bridge, dir: &Path, name: &str, n: u8) -> LibvirtHost {
        let ns = format!("pcl-{name}");
        let veth = format!("pcl{n}h");
        let addr = format!("{}.{n}", bridge.subnet);
        Self::network(bridge, &ns, &veth, &addr, n);
        let hdir = dir.join(name);
        Self::configure(&hdir, &addr, n);
        let daemon = Self::daemon(&ns, &hdir, name);
        let host = LibvirtHost {
            name: name.to_owned(),
            addr,
            ns,
            veth,
            dir: hdir,
            daemon,
        };
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            match host.virsh(&["hostname"]) {
                Ok(h) if h.trim() == name => break,
                r => assert!(
                    Instant::now() < until,
                    "libvirtd of {name} did not answer within 30 s: {r:?}; it said: {}",
                    std::fs::read_to_string(host.dir.join("libvirtd.out")).unwrap_or_default()
                ),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        host
    }

    /// Namespace `ns` on `bridge` through veth `veth`, at `addr`, with a
    /// route for multicast.
    fn network(bridge: &Bridge, ns: &str, veth: &str, addr: &str, n: u8) {
        let _ = run(&["ip", "netns", "del", ns]);
        let _ = run(&["ip", "link", "del", veth]);
        run(&["ip", "netns", "add", ns]).expect("a namespace");
        let inner = format!("pcl{n}n");
        run(&[
            "ip", "link", "add", veth, "type", "veth", "peer", "name", &inner,
        ])
        .expect("a veth pair");
        run(&["ip", "link", "set", &inner, "netns", ns]).expect("veth into the namespace");
        run(&["ip", "link", "set", veth, "master", &bridge.name]).expect("veth on the bridge");
        run(&["ip", "link", "set", veth, "up"]).expect("veth up");
        for c in [
            vec!["ip", "-n", ns, "link", "set", "lo", "up"],
            vec!["ip", "-n", ns, "link", "set", &inner, "up"],
            vec![
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &inner,
            ],
        ] {
            run(&c).expect("namespace network");
        }
    }

    /// The host's directories under `hdir` and libvirt's configuration.
    fn configure(hdir: &Path, addr: &str, n: u8) {
        for d in ["etc", "lib", "log", "cache", "ram"] {
            std::fs::create_dir_all(hdir.join(d)).expect("host directories");
        }
        // The mount points libvirt's system daemon uses must exist.
        for d in [
            "/etc/libvirt",
            "/var/lib/libvirt",
            "/var/log/libvirt",
            "/var/cache/libvirt",
        ] {
            std::fs::create_dir_all(d).expect("libvirt's mount points");
        }
        std::fs::write(
            hdir.join("etc/libvirtd.conf"),
            format!(
                "listen_tls = 0\nlisten_tcp = 1\nlisten_addr = \"{addr}\"\nauth_tcp = \"none\"\n\
                 auth_unix_rw = \"none\"\nhost_uuid = \"6a1e0000-0000-4000-8000-0000000000{n:02x}\"\n\
                 log_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"\n"
            ),
        )
        .expect("libvirtd.conf");
        // QEMU as root with no cgroups, namespaces or labels (the test
        // machine need not have systemd or AppArmor); its output to files
        // (no virtlogd); guest RAM in a file the agent maps.
        std::fs::write(
            hdir.join("etc/qemu.conf"),
            format!(
                "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\n\
                 security_driver = \"none\"\ncgroup_controllers = [ ]\nnamespaces = [ ]\n\
                 stdio_handler = \"file\"\nmemory_backing_dir = \"{}\"\n",
                hdir.join("ram").display()
            ),
        )
        .expect("qemu.conf");
    }

    /// libvirtd in namespace `ns`, in mount and UTS namespaces of its own
    /// over `hdir`'s directories, named `name`.
    fn daemon(ns: &str, hdir: &Path, name: &str) -> Child {
        let script = format!(
            "set -e; mount -t tmpfs tmpfs /run; mkdir -p /run/libvirt /run/lock /run/pagecast; \
             mount --bind {d}/etc /etc/libvirt; mount --bind {d}/lib /var/lib/libvirt; \
             mount --bind {d}/log /var/log/libvirt; mount --bind {d}/cache /var/cache/libvirt; \
             hostname {name}; exec libvirtd --listen",
            d = hdir.display()
        );
        let out = std::fs::File::create(hdir.join("libvirtd.out")).expect("daemon output");
        Command::new("ip")
            .args(["netns", "exec", ns, "unshare", "-m", "-u"])
            .args(["--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("starting libvirtd")
    }

    /// Its daemon's URI as other hosts reach it.
    pub fn uri(&self) -> String {
        format!("qemu+tcp://{}/system", self.addr)
    }

    /// `virsh -c URI args...`, from the test's namespace.
    pub fn virsh(&self, args: &[&str]) -> Result<String, String> {
        let uri = self.uri();
        let mut cmd = vec!["virsh", "-c", &uri];
        cmd.extend_from_slice(args);
        run(&cmd)
    }

    /// The command prefix that runs a program inside this host: its
    /// network, mount and UTS namespaces, those of its daemon.
    pub fn enter(&self) -> Vec<String> {
        vec![
            "nsenter".into(),
            "-t".into(),
            self.daemon.id().to_string(),
            "-m".into(),
            "-n".into(),
            "-u".into(),
            "--".into(),
        ]
    }

    /// Bytes this host has sent out of its namespace so far.
    pub fn sent_bytes(&self) -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{}/statistics/rx_bytes", self.veth))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .expect("the host's veth counters")
    }

    /// The RAM file of domain `name` running here (libvirt names it by
    /// the domain's id).
    pub fn ram_file(&self, name: &str) -> PathBuf {
        let qemu = self.dir.join("ram/libvirt/qemu");
        std::fs::read_dir(&qemu)
            .expect("libvirt's RAM directory")
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|f| f.to_str())
                    .and_then(|f| f.split_once('-'))
                    .is_some_and(|(_, n)| n == name)
            })
            .map(|p| p.join("pc.ram"))
            .unwrap_or_else(|| panic!("no RAM file of {name} under {}", qemu.display()))
    }

    /// The domain's state once it reads `want`, or the last one read when
    /// `within` has passed. Once, under the whole suite's load, the state
    /// read right after libvirt's own migration back said the domain that
    /// had just arrived was not found (the test passed alone).
    pub fn domstate_within(&self, name: &str, want: &str, within: std::time::Duration) -> String {
        let until = std::time::Instant::now() + within;
        loop {
            let s = self.domstate(name);
            if s == want || std::time::Instant::now() >= until {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Domain `name`'s state as libvirt here reports it (`running`, or
    /// the error when it has no such domain).
    pub fn domstate(&self, name: &str) -> String {
        match self.virsh(&["domstate", name]) {
            Ok(s) => s.trim().to_owned(),
            Err(e) => e,
        }
    }
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        if let Ok(list) = self.virsh(&["list", "--name"]) {
            for d in list.lines().filter(|l| !l.trim().is_empty()) {
                let _ = self.virsh(&["destroy", d.trim()]);
            }
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let _ = run(&["ip", "netns", "del", &self.ns]);
        let _ = run(&["ip", "link", "del", &self.veth]);
    }
}

/// A TCG domain as `docs/qemu.md` describes one for pagecast: RAM in a
/// shared file, a second QMP socket for the agent at
/// `/run/pagecast/NAME.qmp` (each host has its own `/run`), the test
/// guest's kernel and initramfs, its console appended to `serial`.
pub fn domain_xml(name: &str, mib: u64, kernel: &Path, initrd: &Path, serial: &Path) -> String {
    format!(
        r#"<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 no_timer_check</cmdline>
  </os>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <on_reboot>destroy</on_reboot>
  <devices>
    <serial type='file'><source path='{serial}' append='on'/></serial>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:/run/pagecast/{name}.qmp,server=on,wait=off'/>
  </qemu:commandline>
</domain>
"#,
        kernel = kernel.display(),
        initrd = initrd.display(),
        serial = serial.display(),
    )
}

/// The last `tick N` a console file shows.
pub fn ticks(serial: &Path) -> u64 {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("tick ")?.parse().ok())
        .unwrap_or(0)
}
