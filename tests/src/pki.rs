//! The test cluster's certificates: one CA under the build's target
//! directory (`target/<profile>/test-pki`), made once and shared by every
//! test process, and a node directory per name and role, issued on first
//! use. Each is written to a temporary directory and renamed into place, so
//! test processes running at once never see half a directory.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pagecast_channel::ca::Authority;
use pagecast_channel::{Role, Tls};

/// Days the test certificates are valid.
const DAYS: u32 = 3650;

fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = crate::pagecast_bin()
            .parent()
            .expect("the binary's directory")
            .join("test-pki");
        std::fs::create_dir_all(&root).expect("the test PKI directory");
        let ca = root.join("ca");
        if !ca.join("ca.key").exists() {
            let tmp = tempfile::tempdir_in(&root).expect("a temporary directory");
            let staged = tmp.path().join("ca");
            Authority::init(&staged).expect("a test CA");
            // Another process may have won the race: then use its CA.
            let _ = std::fs::rename(&staged, &ca);
        }
        root
    })
}

fn authority() -> &'static Authority {
    static CA: OnceLock<Authority> = OnceLock::new();
    CA.get_or_init(|| Authority::load(&root().join("ca")).expect("the test CA"))
}

/// The node directory of `name` with `role` (issued if missing; a host's
/// holds the cluster's dedup-domain secret, `domains.key`).
pub fn node(name: &str, role: Role) -> PathBuf {
    let dir = root().join(format!("{role}-{name}"));
    if !dir.join("node.key").exists() {
        let tmp = tempfile::tempdir_in(root()).expect("a temporary directory");
        let staged = tmp.path().join("node");
        authority()
            .issue_to(name, role, DAYS, &staged)
            .expect("a test certificate");
        let _ = std::fs::rename(&staged, &dir);
    }
    dir
}

/// The identity of `name` with `role`, loaded.
pub fn tls(name: &str, role: Role) -> Tls {
    Tls::load(&node(name, role)).expect("a test identity")
}

/// The operator directory the CLI uses in tests (`PAGECAST_TLS`).
pub fn operator() -> PathBuf {
    node("operator", Role::Operator)
}

/// The CA directory (for tests of `pagecast ca issue`).
pub fn ca_dir() -> PathBuf {
    root().join("ca")
}
