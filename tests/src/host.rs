//! Host-wide fixtures for fault tests, all as root: a cgroup v2 group per
//! process (so nftables can tell its sockets apart on loopback), an
//! nftables table that cuts a process off the network while its
//! connections stay open, and a small tmpfs that can be filled to the last
//! byte. Each removes what it made when dropped. The tests that use them
//! run one at a time (`.config/nextest.toml`, group `host-wide`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .map_err(|e| format!("{}: {e}", cmd[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}`: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A cgroup v2 group that processes are started in.
pub struct Group {
    dir: PathBuf,
    /// The path nftables resolves (relative to /sys/fs/cgroup).
    nft_path: String,
}

impl Group {
    /// Creates the group `name` at the top of the cgroup v2 hierarchy.
    pub fn new(name: &str) -> Group {
        let root = pagecast_testkit::cgroup2().expect("cgroup v2 (the test asked for it)");
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("creating a cgroup");
        let nft_path = dir
            .strip_prefix("/sys/fs/cgroup")
            .expect("nftables finds cgroups under /sys/fs/cgroup")
            .display()
            .to_string();
        Group { dir, nft_path }
    }

    /// Its `cgroup.procs`: a process that writes its pid there joins it.
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// `program args...` as a command that joins this group before it
    /// becomes `program` (so every socket it opens belongs to the group).
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(self.procs())
            .arg(program);
        c
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Empty once its processes are gone; they may take a moment.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// An nftables table whose rules drop packets on loopback, as a network
/// partition does: connections stay open, nothing crosses them.
pub struct Partition {
    table: String,
}

impl Partition {
    /// An empty table (nothing dropped yet).
    pub fn new() -> Partition {
        let table = format!("pagecast_part_{}", std::process::id());
        run(&["nft", &format!("add table inet {table}")]).expect("nft add table");
        run(&[
            "nft",
            &format!(
                "add chain inet {table} out {{ type filter hook output priority 0 ; policy accept ; }}"
            ),
        ])
        .expect("nft add chain");
        Partition { table }
    }

    /// Cuts off the process in `group` that listens on `port`: every packet
    /// its sockets send, and every packet anyone sends to or from `port`.
    pub fn cut(&self, group: &Group, port: u16) {
        self.add(&[
            format!("socket cgroupv2 level 1 \"{}\" drop", group.nft_path),
            format!("tcp dport {port} drop"),
            format!("tcp sport {port} drop"),
        ]);
    }

    /// Cuts the process in `group` listening on `port` off its `peers`
    /// (each a group and the port its process listens on), both ways,
    /// while everyone else (clients) still reaches all of them.
    pub fn cut_between(&self, group: &Group, port: u16, peers: &[(&Group, u16)]) {
        let mut rules = Vec::new();
        for (g, p) in peers {
            // Its connections to the peer, and the peer's to it.
            rules.push(format!(
                "socket cgroupv2 level 1 \"{}\" tcp dport {p} drop",
                group.nft_path
            ));
            rules.push(format!(
                "socket cgroupv2 level 1 \"{}\" tcp dport {port} drop",
                g.nft_path
            ));
        }
        self.add(&rules);
    }

    fn add(&self, rules: &[String]) {
        for r in rules {
            run(&["nft", &format!("add rule inet {} out {r}", self.table)]).expect("nft add rule");
        }
    }

    /// Drops every rule: the network heals.
    pub fn heal(&self) {
        run(&["nft", &format!("flush chain inet {} out", self.table)]).expect("nft flush");
    }
}

impl Default for Partition {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = run(&["nft", "delete", "table", "inet", &self.table]);
    }
}

/// A tmpfs of a few MiB mounted for one test.
pub struct Tmpfs {
    at: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB at `at` (created).
    pub fn mount(at: &Path, mib: u64) -> Tmpfs {
        Self::mount_with(at, mib, None)
    }

    /// As [`Tmpfs::mount`], with at most `inodes` files and directories.
    pub fn mount_with(at: &Path, mib: u64, inodes: Option<u64>) -> Tmpfs {
        std::fs::create_dir_all(at).expect("a mount point");
        let mut opts = format!("size={mib}m");
        if let Some(n) = inodes {
            opts.push_str(&format!(",nr_inodes={n}"));
        }
        run(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &opts,
            "tmpfs",
            &at.display().to_string(),
        ])
        .expect("mount tmpfs");
        Tmpfs { at: at.to_owned() }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.at
    }

    fn filler(&self) -> PathBuf {
        self.at.join("filler")
    }

    /// Fills it to the last byte with a file; returns the bytes written.
    pub fn fill(&self) -> u64 {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.filler())
            .expect("the filler file");
        let block = vec![0u8; 64 << 10];
        let mut n = 0u64;
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(k) => n += k as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", self.at.display()),
            }
        }
        // Smaller writes take what is left.
        for size in [4096usize, 512, 1] {
            while f.write(&block[..size]).is_ok_and(|k| k > 0) {
                n += size as u64;
            }
        }
        let _ = f.sync_all();
        // And every inode (when the mount has few): empty files.
        for i in 0..100_000 {
            if std::fs::File::create(self.at.join(format!("filler-{i}"))).is_err() {
                break;
            }
        }
        n
    }

    /// Bytes free on it.
    pub fn free(&self) -> u64 {
        let c = std::ffi::CString::new(self.at.as_os_str().as_encoded_bytes()).expect("a path");
        // SAFETY: statvfs(3) fills the zeroed struct we pass; the path is a
        // NUL-terminated string that outlives the call.
        unsafe {
            let mut s: libc::statvfs = std::mem::zeroed();
            if libc::statvfs(c.as_ptr(), &mut s) != 0 {
                return 0;
            }
            s.f_bavail * s.f_frsize
        }
    }

    /// Removes the filler: the space returns.
    pub fn empty(&self) {
        let _ = std::fs::remove_file(self.filler());
        for i in 0..100_000 {
            if std::fs::remove_file(self.at.join(format!("filler-{i}"))).is_err() {
                break;
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run(&["umount", "-l", &self.at.display().to_string()]);
    }
}
