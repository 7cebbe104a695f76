//! Helpers for pagecast's cross-crate tests and benchmarks: finding the
//! `pagecast` binary and running it.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Path of the `pagecast` binary of this build profile (`cargo test
/// --workspace` builds it; benchmarks need `cargo build --release -p
/// pagecast-cli` first).
pub fn pagecast_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // Test binaries live in target/<profile>/deps/.
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("target/<profile>/deps/<test>")
            .to_path_buf();
        let bin = profile_dir.join("pagecast");
        // Cargo holds the build directory while tests and benches run, so
        // building it from here would wait forever: say what to run.
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        assert!(
            bin.exists(),
            "{} is missing: build it first with `cargo build{} -p pagecast-cli --bin pagecast`",
            bin.display(),
            if release { " --release" } else { "" }
        );
        bin
    })
    .clone()
}

/// Runs `pagecast` with `args` and returns its output; the test
/// operator's identity is in `PAGECAST_TLS` (an explicit `--tls` wins).
pub fn pagecast(args: &[&str]) -> Output {
    Command::new(pagecast_bin())
        .args(args)
        .env("PAGECAST_TLS", pki::operator())
        .output()
        .expect("running pagecast")
}

/// Runs `pagecast`, requires success, and parses stdout as JSON.
pub fn pagecast_json(args: &[&str]) -> serde_json::Value {
    let out = pagecast(args);
    assert!(
        out.status.success(),
        "pagecast {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "pagecast {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A child process killed when dropped, so a failing test leaves none.
pub struct Child(pub std::process::Child);

impl Child {
    /// Spawns `pagecast` with `args` (stdout and stderr captured), wrapped
    /// in `prefix` (e.g. `["ip", "netns", "exec", "ns"]`) if given.
    pub fn pagecast(prefix: &[&str], args: &[&str]) -> Child {
        let bin = pagecast_bin();
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.args(args)
            .env("PAGECAST_TLS", pki::operator())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        Child(cmd.spawn().expect("spawning pagecast"))
    }

    /// Waits up to `timeout`, then kills; returns the output either way.
    pub fn wait(mut self, timeout: std::time::Duration) -> Output {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let child = std::mem::replace(
            &mut self.0,
            Command::new("true").spawn().expect("spawning true"),
        );
        child.wait_with_output().expect("collecting output")
    }

    /// Kills the process now (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.0.kill();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The repository root (for scripts).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository root")
        .to_path_buf()
}

pub mod capture;
pub mod cluster;
pub mod flood;
pub mod history;
pub mod host;
pub mod libvirt;
pub mod pki;
pub mod qemu;
pub mod shard_state;

/// Whether a TCP socket listens on IPv4 `at` in the network namespace of
/// process `proc` (a pid, or `self`): `/proc/PROC/net/tcp`, state `0A`,
/// the address as the kernel writes it (host byte order). A child started
/// in another namespace is seen from there once it switched; before, the
/// test's own namespace has no listener at that address.
pub fn listening(proc: &str, at: std::net::SocketAddrV4) -> bool {
    let want = format!("{:08X}:{:04X}", u32::from(*at.ip()).swap_bytes(), at.port());
    std::fs::read_to_string(format!("/proc/{proc}/net/tcp")).is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        })
    })
}
