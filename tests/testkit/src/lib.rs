//! What pagecast's tests need from the machine, and what a test does when
//! it is missing.
//!
//! A test that needs something this machine may lack (KVM, root, packet
//! capture, multicast on loopback, network namespaces, nftables, traffic
//! shaping, QEMU with a kernel and busybox, binutils, cgroup v2, tmpfs
//! mounts) starts with
//!
//! ```text
//! if !pagecast_testkit::needs("the_test_name", &[Need::Kvm, Need::Root]) {
//!     return;
//! }
//! ```
//!
//! Where everything is there, the test runs. Where something is missing:
//! - under `PAGECAST_REQUIRE=all` (CI sets it), or with the missing need's
//!   name in `PAGECAST_REQUIRE` (`kvm,qemu`), the test **fails**, naming
//!   what is missing and why;
//! - otherwise it says on stderr that it skips, appends a line to the file
//!   named by `PAGECAST_SKIP_LOG` (the test command counts them in its
//!   summary), and returns `false`.
//!
//! Every probe runs once per process and is cached. `pagecast-testkit`
//! (the binary) prints the same probes as a table, which is how the test
//! command starts.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// Something a test needs from the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Need {
    /// `/dev/kvm` opens read-write and speaks KVM API 12.
    Kvm,
    /// The effective user is root.
    Root,
    /// A raw `AF_PACKET` socket with a forced receive buffer
    /// (`CAP_NET_RAW` and `CAP_NET_ADMIN`).
    PacketCapture,
    /// IPv4 multicast on `lo`: a datagram sent to a 239/8 group through
    /// 127.0.0.1 reaches a socket that joined it there.
    LoopbackMulticast,
    /// Network namespaces with veth pairs and bridges (root, iproute2).
    Namespaces,
    /// nftables tables can be added and removed (root, `nft`).
    Nftables,
    /// `tc` can shape a link with `tbf` (root, iproute2).
    TrafficShaping,
    /// `qemu-system-x86_64`, a readable kernel in `/boot` and a static
    /// busybox for the guests' initramfs.
    Qemu,
    /// GNU `as` and `objcopy` (binutils).
    Binutils,
    /// A cgroup v2 hierarchy this process may create groups in (root).
    Cgroup2,
    /// tmpfs can be mounted (root, `mount`).
    Tmpfs,
    /// The kernel merges same pages (KSM: `/sys/kernel/mm/ksm`).
    Ksm,
    /// A read lease (`F_SETLEASE`) on a file in the temporary directory,
    /// on a local filesystem, with `fs.lease-break-time` of 5 s or more.
    Leases,
    /// libvirt's daemon and client (`libvirtd`, `virsh`), its QEMU driver
    /// and the user it runs QEMU as, plus `unshare` and `nsenter` to run
    /// one daemon per emulated host.
    Libvirt,
}

impl Need {
    /// Every need, in the order the table lists them.
    pub const ALL: [Need; 14] = [
        Need::Kvm,
        Need::Root,
        Need::PacketCapture,
        Need::LoopbackMulticast,
        Need::Namespaces,
        Need::Nftables,
        Need::TrafficShaping,
        Need::Qemu,
        Need::Binutils,
        Need::Cgroup2,
        Need::Tmpfs,
        Need::Ksm,
        Need::Leases,
        Need::Libvirt,
    ];

    /// Its name in `PAGECAST_REQUIRE` and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Need::Kvm => "kvm",
            Need::Root => "root",
            Need::PacketCapture => "capture",
            Need::LoopbackMulticast => "multicast",
            Need::Namespaces => "netns",
            Need::Nftables => "nftables",
            Need::TrafficShaping => "tc",
            Need::Qemu => "qemu",
            Need::Binutils => "binutils",
            Need::Cgroup2 => "cgroup2",
            Need::Tmpfs => "tmpfs",
            Need::Ksm => "ksm",
            Need::Leases => "leases",
            Need::Libvirt => "libvirt",
        }
    }

    /// The need of that name.
    pub fn parse(s: &str) -> Option<Need> {
        Need::ALL.into_iter().find(|n| n.name() == s)
    }

    /// Whether this machine offers it: `Ok` with what was found, or `Err`
    /// with why not. Probed once per process.
    pub fn probe(self) -> Result<String, String> {
        static CACHE: Mutex<Option<HashMap<Need, Result<String, String>>>> = Mutex::new(None);
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get_or_insert_with(HashMap::new)
            .entry(self)
            .or_insert_with(|| probe(self))
            .clone()
    }
}

/// Whether `PAGECAST_REQUIRE` makes `need` mandatory: `all`, or a
/// comma-separated list of need names that includes it.
pub fn required(need: Need) -> bool {
    required_in(&std::env::var("PAGECAST_REQUIRE").unwrap_or_default(), need)
}

fn required_in(spec: &str, need: Need) -> bool {
    spec.split(',')
        .map(str::trim)
        .any(|s| s == "all" || s == need.name())
}

/// The names in `PAGECAST_REQUIRE` that are not needs (a typo there
/// would otherwise require nothing).
pub fn unknown_required() -> Vec<String> {
    std::env::var("PAGECAST_REQUIRE")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != "all" && Need::parse(s).is_none())
        .map(str::to_owned)
        .collect()
}

/// Whether `test` can run its subject here: `true` when every need is
/// met. Otherwise it fails (panics) if `PAGECAST_REQUIRE` requires a
/// missing need, or says it skips, logs the skip and returns `false`.
pub fn needs(test: &str, needs: &[Need]) -> bool {
    let missing: Vec<(Need, String)> = needs
        .iter()
        .filter_map(|&n| n.probe().err().map(|why| (n, why)))
        .collect();
    let spec = std::env::var("PAGECAST_REQUIRE").unwrap_or_default();
    let log = std::env::var_os("PAGECAST_SKIP_LOG").map(PathBuf::from);
    match decide(test, &missing, &spec, log.as_deref()) {
        Ok(run) => run,
        Err(why) => panic!("{why}"),
    }
}

/// What a test does given what is `missing`: `Ok(true)` run, `Ok(false)`
/// skip (said on stderr and appended to `log`), `Err` fail because `spec`
/// (the value of `PAGECAST_REQUIRE`) requires a missing need.
fn decide(
    test: &str,
    missing: &[(Need, String)],
    spec: &str,
    log: Option<&Path>,
) -> Result<bool, String> {
    if missing.is_empty() {
        return Ok(true);
    }
    let list = missing
        .iter()
        .map(|(n, why)| format!("{} ({why})", n.name()))
        .collect::<Vec<_>>()
        .join(", ");
    if missing.iter().any(|(n, _)| required_in(spec, *n)) {
        return Err(format!(
            "{test} cannot run its subject: missing {list}; PAGECAST_REQUIRE={spec} requires it"
        ));
    }
    eprintln!("SKIPPED {test}: missing {list}");
    if let Some(log) = log {
        log_skip(log, test, missing);
    }
    Ok(false)
}

fn log_skip(path: &Path, test: &str, missing: &[(Need, String)]) {
    let names: Vec<&str> = missing.iter().map(|(n, _)| n.name()).collect();
    // One short line written with O_APPEND: lines of concurrent tests do
    // not interleave.
    let line = format!("{test}\t{}\n", names.join(","));
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// The skips a skip log holds: (test, missing needs), in order.
pub fn read_skip_log(path: &Path) -> std::io::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(t, n)| (t.to_owned(), n.to_owned()))
        .collect())
}

fn probe(need: Need) -> Result<String, String> {
    match need {
        Need::Kvm => kvm(),
        Need::Root => root().map(|()| "effective uid 0".into()),
        Need::PacketCapture => packet_capture(),
        Need::LoopbackMulticast => loopback_multicast(),
        Need::Namespaces => namespaces(),
        Need::Nftables => nftables(),
        Need::TrafficShaping => traffic_shaping(),
        Need::Qemu => qemu().map(|q| {
            format!(
                "{}, kernel {}, busybox {}",
                q.qemu.display(),
                q.kernel.display(),
                q.busybox.display()
            )
        }),
        Need::Binutils => binutils(),
        Need::Cgroup2 => cgroup2().map(|p| format!("cgroup v2 at {}", p.display())),
        Need::Tmpfs => tmpfs(),
        Need::Libvirt => libvirt(),
        Need::Leases => leases(),
        Need::Ksm => {
            if Path::new("/sys/kernel/mm/ksm/run").exists() {
                Ok("KSM at /sys/kernel/mm/ksm".into())
            } else {
                Err("no /sys/kernel/mm/ksm: the kernel has no KSM".into())
            }
        }
    }
}

fn leases() -> Result<String, String> {
    let t: u64 = std::fs::read_to_string("/proc/sys/fs/lease-break-time")
        .map_err(|e| format!("no /proc/sys/fs/lease-break-time: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("fs.lease-break-time: {e}"))?;
    if t < 5 {
        return Err(format!("fs.lease-break-time is {t} s (5 or more wanted)"));
    }
    let dir = std::env::temp_dir();
    let path = dir.join(format!("pagecast-lease-probe-{}", std::process::id()));
    std::fs::write(&path, b"x").map_err(|e| format!("{}: {e}", path.display()))?;
    // The filesystems pagecast-memory's lease.rs leases on.
    const LOCAL: [u32; 6] = [
        0xEF53,
        0x5846_5342,
        0x9123_683E,
        0x0102_1994,
        0x9584_58F6,
        0xF2F5_2010,
    ];
    let leased = std::fs::File::open(&path).map(|f| {
        // SAFETY: fstatfs fills a zeroed struct we own; fcntl works on a
        // descriptor we own, and the lease ends when `f` closes, at the end
        // of this closure.
        unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            if libc::fstatfs(f.as_raw_fd(), &mut st) != 0 {
                return Err(format!("fstatfs: {}", std::io::Error::last_os_error()));
            }
            if !LOCAL.contains(&(st.f_type as u32)) {
                return Err(format!(
                    "filesystem type {:#x} is not one leases are taken on",
                    st.f_type as u32
                ));
            }
            if libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) != 0 {
                return Err(format!("F_SETLEASE: {}", std::io::Error::last_os_error()));
            }
            Ok(())
        }
    });
    let _ = std::fs::remove_file(&path);
    match leased {
        Ok(Ok(())) => Ok(format!(
            "read leases in {}, break time {t} s",
            dir.display()
        )),
        Ok(Err(why)) => Err(format!(
            "no read lease on a file in {}: {why}",
            dir.display()
        )),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn root() -> Result<(), String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        Ok(())
    } else {
        Err("not root".into())
    }
}

fn kvm() -> Result<String, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm does not open: {e}"))?;
    // KVM_GET_API_VERSION: _IO(KVMIO = 0xAE, 0x00).
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    // SAFETY: an ioctl without argument on a descriptor we own.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION) };
    if v == 12 {
        Ok("/dev/kvm opens, API 12".into())
    } else {
        Err(format!("/dev/kvm answers API version {v}, not 12"))
    }
}

fn packet_capture() -> Result<String, String> {
    root()?;
    let proto = libc::c_int::from((libc::ETH_P_ALL as u16).to_be());
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
    if fd < 0 {
        return Err(format!(
            "no packet socket ({})",
            std::io::Error::last_os_error()
        ));
    }
    let size: libc::c_int = 1 << 20;
    // SAFETY: `size` is a live c_int and its size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: the descriptor opened above, closed once.
    unsafe {
        libc::close(fd);
    }
    if r != 0 {
        return Err(format!("SO_RCVBUFFORCE refused ({err})"));
    }
    Ok("AF_PACKET socket with a forced buffer".into())
}

fn loopback_multicast() -> Result<String, String> {
    let group = Ipv4Addr::new(239, 255, 77, 1);
    let lo = Ipv4Addr::LOCALHOST;
    let rx = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| format!("bind: {e}"))?;
    rx.join_multicast_v4(&group, &lo)
        .map_err(|e| format!("joining {group} on lo: {e}"))?;
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let port = rx.local_addr().map_err(|e| e.to_string())?.port();
    let tx = UdpSocket::bind((lo, 0)).map_err(|e| format!("bind: {e}"))?;
    // Out through lo only, and never past this host.
    let iface = libc::in_addr {
        s_addr: u32::from(lo).to_be(),
    };
    // SAFETY: `iface` is a live in_addr and its size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            tx.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MULTICAST_IF,
            (&iface as *const libc::in_addr).cast(),
            std::mem::size_of::<libc::in_addr>() as u32,
        )
    };
    if r != 0 {
        return Err(format!(
            "IP_MULTICAST_IF 127.0.0.1: {}",
            std::io::Error::last_os_error()
        ));
    }
    tx.set_multicast_ttl_v4(0).map_err(|e| e.to_string())?;
    tx.set_multicast_loop_v4(true).map_err(|e| e.to_string())?;
    let marker = format!("pagecast-probe-{}", std::process::id());
    tx.send_to(marker.as_bytes(), (group, port))
        .map_err(|e| format!("sending to {group} on lo: {e}"))?;
    let mut buf = [0u8; 64];
    loop {
        match rx.recv_from(&mut buf) {
            Ok((n, _)) if &buf[..n] == marker.as_bytes() => {
                return Ok(format!("{group} on lo comes back"));
            }
            Ok(_) => continue,
            Err(e) => return Err(format!("a datagram to {group} on lo never came back ({e})")),
        }
    }
}

/// Runs a command; `Err` names it with its stderr.
fn run(cmd: &[&str]) -> Result<(), String> {
    let (first, rest) = cmd.split_first().expect("a command");
    let out = Command::new(first)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{first}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace for a probe, deleted when dropped.
struct ProbeNs(String);

impl ProbeNs {
    fn new(what: &str) -> Result<ProbeNs, String> {
        root()?;
        let name = format!("pctk-{what}-{}", std::process::id());
        run(&["ip", "netns", "add", &name])?;
        Ok(ProbeNs(name))
    }
}

impl Drop for ProbeNs {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.0]);
    }
}

fn namespaces() -> Result<String, String> {
    let ns = ProbeNs::new("ns")?;
    let n = ns.0.as_str();
    run(&[
        "ip", "-n", n, "link", "add", "pctk0", "type", "veth", "peer", "name", "pctk1",
    ])?;
    run(&["ip", "-n", n, "link", "add", "pctkbr", "type", "bridge"])?;
    Ok("ip netns, veth and bridges".into())
}

fn traffic_shaping() -> Result<String, String> {
    let ns = ProbeNs::new("tc")?;
    let n = ns.0.as_str();
    run(&[
        "ip", "-n", n, "link", "add", "pctk0", "type", "veth", "peer", "name", "pctk1",
    ])?;
    run(&[
        "ip", "netns", "exec", n, "tc", "qdisc", "add", "dev", "pctk0", "root", "tbf", "rate",
        "100mbit", "burst", "64kb", "latency", "50ms",
    ])?;
    Ok("tc tbf".into())
}

fn nftables() -> Result<String, String> {
    let ns = ProbeNs::new("nft")?;
    run(&[
        "ip", "netns", "exec", &ns.0, "nft", "add", "table", "inet", "pctk",
    ])?;
    Ok("nft tables".into())
}

fn libvirt() -> Result<String, String> {
    root()?;
    run(&["libvirtd", "--version"])
        .map_err(|e| format!("libvirtd (package libvirt-daemon): {e}"))?;
    run(&["virsh", "--version"]).map_err(|e| format!("virsh (package libvirt-clients): {e}"))?;
    let driver = Path::new("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver");
    if driver.is_dir()
        && !std::fs::read_dir(driver)
            .map_err(|e| format!("{}: {e}", driver.display()))?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains("qemu"))
    {
        return Err("libvirt's QEMU driver (package libvirt-daemon-driver-qemu)".into());
    }
    run(&["getent", "passwd", "libvirt-qemu"]).map_err(|_| {
        "the user libvirt's QEMU driver expects, libvirt-qemu (scripts/setup.sh adds it)".to_owned()
    })?;
    run(&["unshare", "--version"]).map_err(|e| format!("unshare: {e}"))?;
    run(&["nsenter", "--version"]).map_err(|e| format!("nsenter: {e}"))?;
    Ok("libvirtd, virsh and its QEMU driver".into())
}

fn binutils() -> Result<String, String> {
    run(&["as", "--version"]).map_err(|e| format!("GNU as: {e}"))?;
    run(&["objcopy", "--version"]).map_err(|e| format!("objcopy: {e}"))?;
    Ok("as and objcopy".into())
}

/// QEMU, the kernel it boots and the busybox of the guests' initramfs.
#[derive(Clone, Debug)]
pub struct QemuParts {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// The newest `/boot/vmlinuz-*`.
    pub kernel: PathBuf,
    /// A statically linked busybox.
    pub busybox: PathBuf,
}

/// Finds QEMU, a readable kernel and a static busybox, or says what is
/// missing (`scripts/setup.sh` installs all three).
pub fn qemu() -> Result<QemuParts, String> {
    let mut missing = Vec::new();
    let qemu = [
        "/usr/bin/qemu-system-x86_64",
        "/usr/local/bin/qemu-system-x86_64",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    if qemu.is_none() {
        missing.push("qemu-system-x86_64 (package qemu-system-x86)".to_owned());
    }
    let kernel = newest_kernel();
    match &kernel {
        None => missing.push("a kernel in /boot (package linux-image-amd64)".into()),
        Some(k) => {
            if let Err(e) = std::fs::File::open(k).and_then(|mut f| f.read(&mut [0u8; 1])) {
                missing.push(format!("a readable kernel ({}: {e})", k.display()));
            }
        }
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    match &busybox {
        None => missing.push("busybox (package busybox-static)".into()),
        Some(b) if !is_static_elf(b) => missing.push(format!(
            "a static busybox ({} is dynamically linked; package busybox-static)",
            b.display()
        )),
        Some(_) => {}
    }
    match (qemu, kernel, busybox) {
        (Some(qemu), Some(kernel), Some(busybox)) if missing.is_empty() => Ok(QemuParts {
            qemu,
            kernel,
            busybox,
        }),
        _ => Err(format!("missing {}", missing.join(", "))),
    }
}

fn newest_kernel() -> Option<PathBuf> {
    let mut k: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    k.sort();
    k.pop()
}

/// Whether `path` is a 64-bit little-endian ELF without an interpreter
/// (`PT_INTERP`): statically linked.
fn is_static_elf(path: &Path) -> bool {
    let Ok(b) = std::fs::read(path) else {
        return false;
    };
    elf_is_static(&b).unwrap_or(false)
}

fn elf_is_static(b: &[u8]) -> Option<bool> {
    if b.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        if u32_at(phoff.checked_add(i.checked_mul(phentsize)?)?)? == PT_INTERP {
            return Some(false);
        }
    }
    Some(true)
}

/// The cgroup v2 hierarchy's mount point, where this process (as root)
/// can create a group.
pub fn cgroup2() -> Result<PathBuf, String> {
    root()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(|e| e.to_string())?;
    let at = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(at))
        })
        .next()
        .ok_or("no cgroup2 hierarchy is mounted")?;
    let probe = at.join(format!("pctk-probe-{}", std::process::id()));
    std::fs::create_dir(&probe)
        .map_err(|e| format!("cannot create a group in {}: {e}", at.display()))?;
    let _ = std::fs::remove_dir(&probe);
    Ok(at)
}

fn tmpfs() -> Result<String, String> {
    root()?;
    let dir = std::env::temp_dir().join(format!("pctk-tmpfs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let d = dir.to_string_lossy().into_owned();
    let r = run(&["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", &d]);
    if r.is_ok() {
        let _ = run(&["umount", &d]);
    }
    let _ = std::fs::remove_dir(&dir);
    r.map(|()| "tmpfs mounts".into())
}

/// Free space a run of the suite needs where it writes, checked before
/// anything is built: a cold build of the workspace and the fuzz targets
/// takes about 3 GiB without incremental data, and a full disk shows up
/// minutes later as a linker or compiler crash that names no cause.
pub const MIN_FREE_GIB: u64 = 6;

/// Bytes an unprivileged writer may still use on the filesystem that holds
/// `path`, or that would hold it (the nearest existing ancestor).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let mut at = path;
    while !at.exists() {
        at = at.parent().unwrap_or(Path::new("/"));
    }
    let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `st` is plain old data that statvfs(3) fills; `c` is a
    // NUL-terminated path that outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Whether `free` bytes at `path` (used for `what`) meet `min_gib`: `Ok`
/// with a line to print, or `Err` with what to do.
pub fn disk_verdict(what: &str, path: &Path, free: u64, min_gib: u64) -> Result<String, String> {
    let gib = free as f64 / f64::from(1u32 << 30);
    if free >= min_gib << 30 {
        Ok(format!("{gib:.1} GiB free for {what} ({})", path.display()))
    } else {
        Err(format!(
            "only {gib:.1} GiB free for {what} ({}), at least {min_gib} GiB needed: \
             free space there (old target directories, leftover temporary \
             directories) or set PAGECAST_MIN_FREE_GIB",
            path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_lists_name_needs_and_all_names_every_one() {
        assert!(required_in("all", Need::Qemu));
        assert!(required_in("kvm, qemu", Need::Qemu));
        assert!(!required_in("kvm", Need::Qemu));
        assert!(!required_in("", Need::Kvm));
        for n in Need::ALL {
            assert_eq!(Need::parse(n.name()), Some(n));
        }
    }

    #[test]
    fn a_static_elf_is_told_from_a_dynamic_one() {
        // This test binary is dynamically linked (it has an interpreter).
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me));
        // A hand-made ELF header with no program headers has none.
        let mut h = vec![0u8; 64];
        h[..6].copy_from_slice(b"\x7fELF\x02\x01");
        assert_eq!(elf_is_static(&h), Some(true));
        // One PT_INTERP program header makes it dynamic.
        h[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        h[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        h[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        h.extend_from_slice(&3u32.to_le_bytes());
        h.resize(64 + 56, 0);
        assert_eq!(elf_is_static(&h), Some(false));
        assert_eq!(elf_is_static(b"not an elf"), None);
    }

    #[test]
    fn a_skip_is_logged_and_a_required_need_fails() {
        let dir = std::env::temp_dir().join(format!("pctk-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips");
        let missing = [(Need::Qemu, "no qemu".to_owned())];
        assert_eq!(decide("t0", &[], "all", Some(&log)), Ok(true));
        assert_eq!(decide("t1", &missing, "", Some(&log)), Ok(false));
        assert_eq!(decide("t2", &missing, "kvm", Some(&log)), Ok(false));
        let e = decide("t3", &missing, "all", Some(&log)).unwrap_err();
        assert!(e.contains("t3") && e.contains("qemu (no qemu)"), "{e}");
        assert!(decide("t4", &missing, "kvm,qemu", Some(&log)).is_err());
        assert_eq!(
            read_skip_log(&log).unwrap(),
            vec![
                ("t1".to_owned(), "qemu".to_owned()),
                ("t2".to_owned(), "qemu".to_owned())
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn short_disk_space_fails_with_what_to_do() {
        let p = Path::new("/x/target");
        let ok = disk_verdict("the build", p, 7 << 30, 6).unwrap();
        assert!(ok.starts_with("7.0 GiB free for the build"), "{ok}");
        let e = disk_verdict("the build", p, (6 << 30) - 1, 6).unwrap_err();
        assert!(
            e.contains("only 6.0 GiB") && e.contains("at least 6 GiB"),
            "{e}"
        );
        // A path not yet created is measured on its nearest ancestor.
        let free = free_bytes(&std::env::temp_dir().join("pctk-none/a/b")).unwrap();
        assert!(free > 0);
    }
}
