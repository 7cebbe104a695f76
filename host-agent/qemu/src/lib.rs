//! Unmodified QEMU guests for pagecast.
//!
//! - [`qmp`]: a small blocking client of QEMU's machine protocol (QMP),
//!   with a deadline on every exchange.
//! - [`stream`]: a parser of QEMU's migration stream (the savevm format,
//!   version 3, as QEMU 7.2 writes it for precopy) that hands RAM pages to
//!   a sink one by one and everything else through byte for byte, and
//!   refuses, by name, the stream features it does not parse.
//! - [`return_path`]: the messages a destination QEMU sends back during a
//!   pre-copy migration (`return-path`), checked before the source QEMU
//!   reads them.
//! - [`capabilities`]: which QEMU migration capabilities the proxy
//!   refuses, checked over QMP before a migration starts.

pub mod qmp;
pub mod return_path;
pub mod stream;

pub use qmp::{Qmp, QmpError};
pub use stream::{PAGE, Sink, StreamError, StreamStats, proxy};

/// Migration capabilities that change the stream in ways the proxy does not
/// parse, with what each does: a migration with any of them on is refused
/// before it starts, naming the capability to turn off.
pub const REFUSED_CAPABILITIES: &[(&str, &str)] = &[
    ("multifd", "sends pages over extra connections"),
    ("xbzrle", "sends pages as deltas"),
    ("compress", "sends compressed pages"),
    ("postcopy-ram", "moves pages after the switchover"),
    ("postcopy-preempt", "moves pages after the switchover"),
    ("x-colo", "keeps a secondary VM in lockstep"),
    ("rdma-pin-all", "is RDMA migration"),
    ("block", "migrates disks inside the stream"),
    ("dirty-bitmaps", "adds block dirty bitmaps to the stream"),
    ("x-ignore-shared", "leaves shared RAM out of the stream"),
    ("background-snapshot", "is a snapshot, not a migration"),
    ("zero-copy-send", "goes with multifd"),
    ("mapped-ram", "writes RAM at fixed file offsets"),
    (
        "return-path",
        "makes the source QEMU wait for its destination's word and, without it, fail the migration and run the guest again while the destination may run it too; pagecast carries it only when libvirt runs the migration (libvirt's destination QEMU waits paused until libvirt says)",
    ),
];

/// The one refused capability the libvirt route carries (libvirt turns it
/// on, and libvirt's destination QEMU starts paused until libvirt knows the
/// source completed).
pub const RETURN_PATH: &str = "return-path";

/// The first refused capability that `caps` (QMP's
/// `query-migrate-capabilities` answer) has on, with why it is refused;
/// those in `allowed` pass.
pub fn refused_capability(
    caps: &serde_json::Value,
    allowed: &[&str],
) -> Option<(String, &'static str)> {
    let list = caps.as_array()?;
    for c in list {
        let name = c["capability"].as_str().unwrap_or("");
        if c["state"] == true
            && !allowed.contains(&name)
            && let Some((n, why)) = REFUSED_CAPABILITIES.iter().find(|(n, _)| *n == name)
        {
            return Some(((*n).to_owned(), why));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::refused_capability;

    #[test]
    fn a_refused_capability_is_named_and_others_pass() {
        let off = serde_json::json!([
            {"capability": "multifd", "state": false},
            {"capability": "auto-converge", "state": true},
            {"capability": "events", "state": true},
        ]);
        assert_eq!(refused_capability(&off, &[]), None);
        let on = serde_json::json!([
            {"capability": "auto-converge", "state": true},
            {"capability": "multifd", "state": true},
        ]);
        assert_eq!(refused_capability(&on, &[]).unwrap().0, "multifd");
        // The return path passes where the caller carries it.
        let rp = serde_json::json!([{"capability": "return-path", "state": true}]);
        assert_eq!(refused_capability(&rp, &[]).unwrap().0, "return-path");
        assert_eq!(refused_capability(&rp, &[super::RETURN_PATH]), None);
    }
}
