//! Wire messages of pagecast.
//!
//! The messages are defined in `proto/pagecast/v1/*.proto` and compiled at
//! build time by [protox](https://docs.rs/protox) and prost-build, so building
//! needs no system `protoc`. This crate holds no logic beyond the constants
//! every decoder must enforce: the protocol version and the size caps.
//! Validation of a message's meaning (for example that a manifest's chunks
//! cover every frame once) lives with the crate that owns the concept.

/// Generated types of the `pagecast.v1` protobuf package.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/pagecast.v1.rs"));
}

/// The wire protocol version this build speaks (manifests).
pub const WIRE_VERSION: v1::WireVersion = v1::WireVersion::WireVersion1;
/// The version a cast's hello and welcome carry: 3 since pages sent down
/// a TCP chain carry the sender's tag for each receiver and a receiver
/// says when it gave its chain link up (2: a sender may withdraw a page
/// mid-session). Each side refuses any other.
pub const CAST_WIRE_VERSION: v1::WireVersion = v1::WireVersion::WireVersion3;
/// The version a migration's first frame ([`v1::MigrateBegin`]) carries:
/// 2 since the VM's kind travels there and QEMU streams are migration
/// frames. A destination refuses any other.
pub const MIGRATE_WIRE_VERSION: v1::WireVersion = v1::WireVersion::WireVersion3;

/// Length of a page hash (BLAKE3-256) in bytes.
pub const HASH_LEN: usize = 32;

/// Most frames one [`v1::ManifestChunk`] may describe.
pub const MAX_MANIFEST_CHUNK_FRAMES: u32 = 65_536;

/// Most zero ranges one [`v1::ManifestChunk`] may carry (every other frame zero).
pub const MAX_MANIFEST_CHUNK_ZERO_RANGES: usize = (MAX_MANIFEST_CHUNK_FRAMES as usize).div_ceil(2);

/// Most bytes an encoded [`v1::ManifestChunk`] may take: the hashes of a full
/// chunk plus the worst-case zero ranges, with room for field tags.
pub const MAX_MANIFEST_CHUNK_BYTES: usize =
    MAX_MANIFEST_CHUNK_FRAMES as usize * HASH_LEN + MAX_MANIFEST_CHUNK_ZERO_RANGES * 24 + 64;

/// Most bytes an encoded [`v1::ManifestHeader`] may take.
pub const MAX_MANIFEST_HEADER_BYTES: usize = 1024;

/// Most frames a manifest may describe: 4 TiB of guest memory.
pub const MAX_MANIFEST_FRAMES: u64 = 1 << 30;

/// Longest VM or host name, in bytes (see [`name_ok`]).
pub const MAX_VM_NAME_BYTES: usize = 64;

/// Whether `name` is a VM or host name every part of pagecast accepts: 1 to
/// [`MAX_VM_NAME_BYTES`] ASCII letters, digits, `-`, `_` or `.`. The one
/// rule: the agent, the index, the migration engine and the manifest
/// decoder all check names with it.
pub fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_VM_NAME_BYTES
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// What [`name_ok`] requires, for error messages.
pub const NAME_RULE: &str = "1 to 64 letters, digits, '-', '_' or '.'";

/// Most bytes one control frame may carry (a frame's protobuf payload,
/// after its 4-byte length; frames travel inside TLS).
pub const MAX_CONTROL_FRAME_BYTES: usize = 4 << 20;

/// Most page ranges one [`v1::CastGroup`] lists.
pub const MAX_CAST_GROUP_RANGES: usize = 1 << 20;

/// Most pages one cast session carries (16 GiB of pages).
pub const MAX_CAST_PAGES: u32 = 4 << 20;

/// Most multicast groups in one cast session.
pub const MAX_CAST_GROUPS: usize = 1024;

/// Version byte of pagecast's UDP datagrams.
pub const DATAGRAM_VERSION: u8 = 3;

/// Largest UDP datagram pagecast sends or accepts.
pub const MAX_DATAGRAM_BYTES: usize = 9000;

/// Length of the AEAD tag that ends every datagram.
pub const MAC_LEN: usize = 16;

/// Most pages one migration `Pages` or `PagesByHash` message carries.
pub const MAX_MIGRATE_PAGES_PER_FRAME: usize = 64;

/// Most hashes one `NeedHashes` message carries.
pub const MAX_NEED_HASHES_PER_FRAME: usize = 32_768;

/// Version byte that follows the length of every content-index frame.
pub const INDEX_FRAME_VERSION: u8 = 1;

/// Most bytes one content-index frame may carry after its length (the
/// version byte and the message).
pub const MAX_INDEX_FRAME_BYTES: usize = 8 << 20;

/// Largest raft message (a shard snapshot) a replica reassembles from parts.
pub const MAX_RAFT_MESSAGE_BYTES: usize = 1 << 30;

/// Most hashes one content-index lookup or delta batch may carry.
pub const MAX_INDEX_BATCH: usize = 65_536;
/// Most frames of one VM whose published content an agent changes per
/// refresh (each costs the index at most two deltas): what a guest that
/// rewrites its memory fast can cost the index.
pub const MAX_FRAME_UPDATES_PER_REFRESH: usize = 2048;

/// A refusal: `code` for programs, `message` for people.
pub fn refusal(code: v1::RefusalCode, message: impl Into<String>) -> v1::Refusal {
    v1::Refusal {
        code: code as i32,
        message: message.into(),
    }
}

/// The message of a result's refusal, "" if it has none.
pub fn refusal_text(r: &Option<v1::Refusal>) -> &str {
    r.as_ref().map_or("", |r| r.message.as_str())
}

impl v1::Refusal {
    /// The code, [`v1::RefusalCode::Unspecified`] for a value this build
    /// does not know.
    pub fn kind(&self) -> v1::RefusalCode {
        v1::RefusalCode::try_from(self.code).unwrap_or(v1::RefusalCode::Unspecified)
    }
}

impl std::fmt::Display for v1::Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl v1::RefusalCode {
    /// Whether sending the same request again may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            v1::RefusalCode::Busy | v1::RefusalCode::NotLeader | v1::RefusalCode::Unavailable
        )
    }

    /// The code's short name (`busy`, `not-found`, ...), as reports print it.
    pub fn label(self) -> &'static str {
        match self {
            v1::RefusalCode::Unspecified => "unspecified",
            v1::RefusalCode::NotLeader => "not-leader",
            v1::RefusalCode::Busy => "busy",
            v1::RefusalCode::Invalid => "invalid",
            v1::RefusalCode::NotFound => "not-found",
            v1::RefusalCode::Refused => "refused",
            v1::RefusalCode::Internal => "internal",
            v1::RefusalCode::Unavailable => "unavailable",
            v1::RefusalCode::Verification => "verification",
            v1::RefusalCode::Cancelled => "cancelled",
            v1::RefusalCode::Forbidden => "forbidden",
            v1::RefusalCode::UnknownJob => "unknown-job",
        }
    }
}

/// The names operators read and scripts match for the agents' enums (in
/// `vm list`, reports and progress), one per value.
pub mod names {
    use crate::v1::{HostedVmState, MigratePhase, VmKind};

    /// `micro-vm` or `qemu`.
    pub fn kind(k: VmKind) -> &'static str {
        match k {
            VmKind::Qemu => "qemu",
            VmKind::MicroVm | VmKind::Unspecified => "micro-vm",
        }
    }

    /// `running`, `starting`, `incoming`, `migrating-out`, `migrating-in`,
    /// `cloning` or `in-doubt`.
    pub fn state(s: HostedVmState) -> &'static str {
        match s {
            HostedVmState::Running => "running",
            HostedVmState::Starting => "starting",
            HostedVmState::Incoming => "incoming",
            HostedVmState::MigratingOut => "migrating-out",
            HostedVmState::MigratingIn => "migrating-in",
            HostedVmState::Cloning => "cloning",
            HostedVmState::InDoubt => "in-doubt",
            HostedVmState::Unspecified => "unknown",
        }
    }

    /// A migration's phase as progress displays show it.
    pub fn phase(p: MigratePhase) -> &'static str {
        match p {
            MigratePhase::Fingerprinting => "fingerprinting",
            MigratePhase::Manifest => "manifest",
            MigratePhase::Held => "held",
            MigratePhase::Cast => "cast",
            MigratePhase::Round0 => "round 0",
            MigratePhase::Precopy => "pre-copy",
            MigratePhase::Switchover => "switchover",
            MigratePhase::Postcopy => "post-copy",
            MigratePhase::QemuStream => "qemu",
            MigratePhase::Done => "done",
            MigratePhase::Failed => "failed",
            MigratePhase::Unspecified => "",
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn every_value_has_its_own_name() {
            let states: Vec<&str> = (0..=7)
                .filter_map(|i| HostedVmState::try_from(i).ok())
                .map(state)
                .collect();
            let mut unique = states.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), states.len(), "{states:?}");
            let phases: Vec<&str> = (0..=11)
                .filter_map(|i| MigratePhase::try_from(i).ok())
                .map(phase)
                .collect();
            let mut unique = phases.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), phases.len(), "{phases:?}");
        }
    }
}
