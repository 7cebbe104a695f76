//! Helpers for pagecast's cross-crate tests: finding (or building) the
//! `pagecast` binary and running it.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Path of the `pagecast` binary of this build profile, built on first use
/// if the test run did not build it already.
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
        if !bin.exists() {
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cargo.args(["build", "-p", "pagecast-agent", "--bin", "pagecast"]);
            if release {
                cargo.arg("--release");
            }
            let status = cargo.status().expect("running cargo build");
            assert!(status.success(), "cargo build of pagecast failed");
        }
        bin
    })
    .clone()
}

/// Runs `pagecast` with `args` and returns its output.
pub fn pagecast(args: &[&str]) -> Output {
    Command::new(pagecast_bin())
        .args(args)
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
