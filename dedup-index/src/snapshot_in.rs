//! Snapshots streamed in parts, with bounded memory on both sides.
//!
//! A raft snapshot carries no state, only a descriptor ([`Descriptor`]:
//! shard, index, term). The sending replica serves the state from a
//! checkpoint of its database ([`Store::checkpoint`]) in parts of a few
//! MiB ([`Store::snapshot_part`]), which the receiving replica asks for one
//! after another over an index connection and writes, checked record by
//! record, into RocksDB table files in a staging directory ([`stage`]).
//! Only when every part has arrived is the raft snapshot handed to raft;
//! installing it removes the shard's state and ingests the files
//! ([`crate::raftlog::ShardStorage::apply_snapshot`]).
//!
//! ```text
//! leader                                   follower
//!   MsgSnapshot{descriptor}  ----------->  held back; stage() starts
//!   snapshot_part(index, after) <--------  part 1 .. n, each checked,
//!   records, next            ----------->    appended to table files
//!                                          staged: the held MsgSnapshot
//!                                          is stepped into raft, installed
//!                                          (ingest) and answered
//! ```

use crate::snapshot::{self, Column};
use crate::store::{CF_HOLDERS, CF_META, SnapshotPart, Store, StoreError};

/// The staged table files of the holder lists: `holders-NNNNNN.sst`, in
/// key order, each of at most [`HOLDERS_PER_FILE`] lists.
pub const HOLDERS_PREFIX: &str = "holders-";
/// Holder lists per staged table file: a table writer keeps a hash of
/// every key until it finishes the file (its filter), 8 bytes each, so
/// files are cut to keep that at 32 MiB.
pub const HOLDERS_PER_FILE: u64 = 4 << 20;
/// The staged table file of the meta records.
pub const META_FILE: &str = "meta.sst";
/// Written last: the staged files are whole.
pub const DONE_FILE: &str = "done";

const MAGIC: &[u8; 4] = b"PCS1";

/// What a raft snapshot's data says: which shard, at which index and term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// The shard.
    pub shard: u32,
    /// Its applied index in the snapshot.
    pub index: u64,
    /// The term of that index.
    pub term: u64,
}

impl Descriptor {
    /// The 24 bytes a raft snapshot's data holds.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.shard.to_le_bytes());
        b.extend_from_slice(&self.index.to_le_bytes());
        b.extend_from_slice(&self.term.to_le_bytes());
        b
    }

    /// Reads [`Descriptor::encode`]'s bytes.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != 24 || &b[..4] != MAGIC {
            return None;
        }
        Some(Descriptor {
            shard: u32::from_le_bytes(b[4..8].try_into().ok()?),
            index: u64::from_le_bytes(b[8..16].try_into().ok()?),
            term: u64::from_le_bytes(b[16..24].try_into().ok()?),
        })
    }
}

/// Why a snapshot could not be staged.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Asking for a part failed (the sender is gone, frozen, or refused).
    #[error("snapshot part {part}: {detail}")]
    Part {
        /// Which part (from 1).
        part: u64,
        /// What went wrong.
        detail: String,
    },
    /// The sender no longer has this snapshot.
    #[error("the sender no longer has snapshot {index} of shard {shard}")]
    Gone {
        /// The shard.
        shard: u32,
        /// The snapshot's index.
        index: u64,
    },
    /// A part's records are malformed or out of order.
    #[error("snapshot part {part}: {detail}")]
    Bad {
        /// Which part (from 1).
        part: u64,
        /// What was wrong.
        detail: String,
    },
    /// Writing the staged files failed.
    #[error("staging snapshot {index} of shard {shard}: {detail}")]
    Write {
        /// The shard.
        shard: u32,
        /// The snapshot's index.
        index: u64,
        /// What failed.
        detail: String,
    },
}

/// Asks for the parts of `d`'s snapshot one after another through `part`
/// (given where the previous part ended; `Ok(None)`: the sender no longer
/// has it), checks each record, and writes them into table files in
/// [`Store::staging_dir`], holding at most one part in memory. Returns the
/// records staged.
pub fn stage(
    store: &Store,
    d: Descriptor,
    part: impl FnMut(&[u8]) -> Result<Option<SnapshotPart>, String>,
) -> Result<u64, StageError> {
    stage_in_files(store, d, HOLDERS_PER_FILE, part)
}

/// [`stage`], with at most `per_file` holder lists in each table file.
pub fn stage_in_files(
    store: &Store,
    d: Descriptor,
    per_file: u64,
    mut part: impl FnMut(&[u8]) -> Result<Option<SnapshotPart>, String>,
) -> Result<u64, StageError> {
    let dir = store.staging_dir(d.shard, d.index);
    let werr = |e: &dyn std::fmt::Display| StageError::Write {
        shard: d.shard,
        index: d.index,
        detail: e.to_string(),
    };
    store.clear_staging(d.shard);
    std::fs::create_dir_all(&dir).map_err(|e| werr(&e))?;
    let holders_opts = crate::store::cf_options(CF_HOLDERS);
    let meta_opts = crate::store::cf_options(CF_META);
    let mut holders = rocksdb::SstFileWriter::create(&holders_opts);
    let mut meta = rocksdb::SstFileWriter::create(&meta_opts);
    let (mut holders_open, mut meta_open) = (false, false);
    let (mut holders_files, mut in_file) = (0u32, 0u64);
    let mut after: Vec<u8> = Vec::new();
    let mut records = 0u64;
    for n in 1u64.. {
        let (bytes, next) = match part(&after) {
            Ok(Some(p)) => p,
            Ok(None) => {
                return Err(StageError::Gone {
                    shard: d.shard,
                    index: d.index,
                });
            }
            Err(detail) => return Err(StageError::Part { part: n, detail }),
        };
        let bad = |detail: String| StageError::Bad { part: n, detail };
        for r in snapshot::records(d.shard, store.shards(), &bytes) {
            let r = r.map_err(|e| bad(e.to_string()))?;
            match r.column {
                Column::Holders => {
                    if meta_open {
                        return Err(bad("a holder list after the meta records".into()));
                    }
                    if holders_open && in_file >= per_file.max(1) {
                        holders.finish().map_err(|e| werr(&e))?;
                        holders_open = false;
                    }
                    if !holders_open {
                        holders_files += 1;
                        in_file = 0;
                        holders
                            .open(dir.join(format!("{HOLDERS_PREFIX}{holders_files:06}.sst")))
                            .map_err(|e| werr(&e))?;
                        holders_open = true;
                    }
                    in_file += 1;
                    // The writer refuses a key not after the last one.
                    holders
                        .put(r.key, r.value)
                        .map_err(|e| bad(e.to_string()))?;
                }
                Column::Meta => {
                    if !meta_open {
                        meta.open(dir.join(META_FILE)).map_err(|e| werr(&e))?;
                        meta_open = true;
                    }
                    meta.put(r.key, r.value).map_err(|e| bad(e.to_string()))?;
                }
            }
            records += 1;
        }
        match next {
            None => break,
            Some(next) if next.is_empty() || next <= after => {
                return Err(bad("the next part does not start after this one".into()));
            }
            Some(next) => after = next,
        }
    }
    if holders_open {
        holders.finish().map_err(|e| werr(&e))?;
    }
    if meta_open {
        meta.finish().map_err(|e| werr(&e))?;
    }
    std::fs::write(dir.join(DONE_FILE), d.encode()).map_err(|e| werr(&e))?;
    Ok(records)
}

/// Whether `d`'s snapshot is staged whole.
pub fn staged(store: &Store, d: Descriptor) -> bool {
    std::fs::read(store.staging_dir(d.shard, d.index).join(DONE_FILE))
        .is_ok_and(|b| Descriptor::decode(&b) == Some(d))
}

/// Errors of installing from the staging directory.
pub fn not_staged(d: Descriptor) -> StoreError {
    StoreError::Corrupt {
        what: "snapshot",
        detail: format!(
            "snapshot {} of shard {} was handed to raft before it was staged",
            d.index, d.shard
        ),
    }
}

/// The staging directory of `d`, for installing.
pub fn dir_of(store: &Store, d: Descriptor) -> std::path::PathBuf {
    store.staging_dir(d.shard, d.index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn descriptors_round_trip_and_garbage_is_refused(
            shard in any::<u32>(),
            index in any::<u64>(),
            term in any::<u64>(),
            junk in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let d = Descriptor { shard, index, term };
            prop_assert_eq!(Descriptor::decode(&d.encode()), Some(d));
            if let Some(x) = Descriptor::decode(&junk) {
                prop_assert_eq!(x.encode(), junk);
            }
        }
    }

    #[test]
    fn a_descriptor_is_24_bytes_with_its_magic() {
        let d = Descriptor {
            shard: 3,
            index: 9,
            term: 2,
        };
        let mut b = d.encode();
        assert_eq!(b.len(), 24);
        b[0] = b'X';
        assert_eq!(Descriptor::decode(&b), None);
        assert_eq!(Descriptor::decode(&d.encode()[..23]), None);
    }
}
