//! Real QEMU guests for tests: a busybox initramfs built here, the host's
//! Debian kernel, QEMU under TCG (a full kernel boot under nested KVM hangs
//! on some hosts), RAM in a shared file and a QMP socket, as docs/qemu.md
//! tells operators to start them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pagecast_qemu::Qmp;
use pagecast_testkit::{Need, needs};

/// Guest memory.
pub const GUEST_MIB: u64 = 128;

/// QEMU and a kernel for `test`, or `None` where the machine lacks them
/// (`pagecast_testkit::needs`: the test skips, saying so, or fails under
/// `PAGECAST_REQUIRE`).
pub fn qemu_or_skip(test: &str) -> Option<(PathBuf, PathBuf)> {
    if !needs(test, &[Need::Qemu]) {
        return None;
    }
    let q = pagecast_testkit::qemu().expect("probed above");
    Some((q.qemu, q.kernel))
}

/// The guest's init: fills a tmpfs with eight copies of busybox (content
/// that identical guests share), then writes `tick N` to the console five
/// times a second.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /tmp
i=0; while [ $i -lt 8 ]; do cat /bin/busybox > /tmp/b$i; i=$((i+1)); done
n=0
while true; do n=$((n+1)); echo "tick $n" > /dev/ttyS0; sleep 0.2; done
"#;

fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let namesize = name.len() + 1;
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        namesize as u32,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Writes the guests' initramfs (newc cpio) to `path`.
pub fn initramfs(path: &Path) {
    let bb = std::fs::read(
        pagecast_testkit::qemu()
            .expect("QEMU, a kernel and busybox")
            .busybox,
    )
    .expect("reading busybox");
    let mut out = Vec::new();
    let mut ino = 1;
    for d in [".", "bin", "proc", "tmp", "dev"] {
        cpio_entry(&mut out, ino, d, 0o040755, &[]);
        ino += 1;
    }
    cpio_entry(&mut out, ino, "bin/busybox", 0o100755, &bb);
    cpio_entry(&mut out, ino + 1, "init", 0o100755, INIT.as_bytes());
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(&out))
        .expect("writing the initramfs");
}

/// A QEMU process, killed when dropped.
pub struct Guest {
    /// Its name.
    pub name: String,
    child: std::process::Child,
    /// Its QMP socket.
    pub qmp: PathBuf,
    /// Its RAM file.
    pub ram: PathBuf,
    /// Its console output.
    pub serial: PathBuf,
    /// QEMU's own output (why it exited, when it did).
    pub log: PathBuf,
}

/// How a guest starts.
pub enum Start<'a> {
    /// Boots the kernel.
    Boot,
    /// Waits for a migration (`-incoming defer`).
    Defer,
    /// Listens for a migration on this TCP address (`-incoming tcp:...`).
    Listen(&'a str),
}

/// Devices that set a guest apart (for clones): a VM generation ID device
/// with a GUID of its own (`guid`, or `auto`) and a virtio network card
/// `nic0` with MAC `mac`, on a hub with no other port (it reaches nothing).
pub fn identity_devices(guid: &str, mac: &str) -> Vec<String> {
    vec![
        "-device".into(),
        format!("vmgenid,id=vmgenid0,guid={guid}"),
        "-netdev".into(),
        "hubport,id=n0,hubid=0".into(),
        "-device".into(),
        format!("virtio-net-pci,id=nic0,netdev=n0,mac={mac}"),
    ]
}

impl Guest {
    /// Starts guest `name` in `dir`.
    pub fn start(dir: &Path, name: &str, qemu: &Path, kernel: &Path, how: Start<'_>) -> Guest {
        Self::start_with(dir, name, qemu, kernel, how, &[])
    }

    /// As [`Guest::start`], with more arguments for QEMU (`extra`, such as
    /// [`identity_devices`]).
    pub fn start_with(
        dir: &Path,
        name: &str,
        qemu: &Path,
        kernel: &Path,
        how: Start<'_>,
        extra: &[String],
    ) -> Guest {
        let qmp = dir.join(format!("{name}.qmp"));
        let ram = dir.join(format!("{name}.ram"));
        let serial = dir.join(format!("{name}.serial"));
        let log_path = dir.join(format!("{name}.qemu.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(qemu);
        cmd.args(["-accel", "tcg", "-m", &format!("{GUEST_MIB}M")])
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=mem,size={GUEST_MIB}M,mem-path={},share=on",
                ram.display()
            ))
            .args(["-machine", "pc,memory-backend=mem", "-kernel"])
            .arg(kernel)
            .arg("-initrd")
            .arg(dir.join("initrd.cpio"))
            .args(["-append", "console=ttyS0 quiet panic=-1 no_timer_check"])
            .args(["-display", "none", "-nodefaults", "-no-reboot", "-serial"])
            .arg(format!("file:{}", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(extra);
        match how {
            Start::Boot => {}
            Start::Defer => {
                cmd.args(["-incoming", "defer"]);
            }
            Start::Listen(a) => {
                cmd.args(["-incoming", &format!("tcp:{a}")]);
            }
        }
        if !dir.join("initrd.cpio").exists() {
            initramfs(&dir.join("initrd.cpio"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting QEMU");
        let g = Guest {
            name: name.to_owned(),
            child,
            qmp,
            ram,
            serial,
            log: log_path,
        };
        let until = Instant::now() + Duration::from_secs(20);
        while !g.qmp.exists() {
            assert!(Instant::now() < until, "QEMU {name} made no QMP socket");
            std::thread::sleep(Duration::from_millis(50));
        }
        g
    }

    /// A QMP connection.
    pub fn qmp(&self) -> Qmp {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            match Qmp::connect(&self.qmp) {
                Ok(q) => return q,
                Err(e) if Instant::now() > until => panic!(
                    "QMP of {}: {e}; its QEMU said: {}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The last `tick N` its console shows.
    pub fn ticks(&self) -> u64 {
        std::fs::read_to_string(&self.serial)
            .unwrap_or_default()
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("tick ")?.parse().ok())
            .unwrap_or(0)
    }

    /// Waits until the guest has booted (its console ticks).
    pub fn wait_booted(&self, within: Duration) {
        let until = Instant::now() + within;
        while self.ticks() < 3 {
            assert!(
                Instant::now() < until,
                "guest {} did not boot within {within:?}; console: {}",
                self.name,
                std::fs::read_to_string(&self.serial).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Whether its ticks advance over `d` (the guest runs).
    pub fn advances(&self, d: Duration) -> bool {
        let t0 = self.ticks();
        std::thread::sleep(d);
        self.ticks() > t0
    }

    /// Kills QEMU.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}
