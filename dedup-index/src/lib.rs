//! The content index of pagecast.
//!
//! For every distinct non-zero page content in the cluster the index knows
//! which hosts hold it and how many guest frames hold it there, and it
//! keeps a record of every host and VM with the VM's sketch. Page hashes
//! and sketches are the shared vocabulary of `pagecast-pages`; this crate
//! owns key encoding ([`keys`]), holder lists ([`holders`]), the frame
//! codec ([`wire`]), committed commands as replicas decode them
//! ([`command`]), raft messages in parts ([`chunks`]), the snapshot
//! record format ([`snapshot`]; streamed in parts by [`snapshot_in`]), the
//! sharing answers over VM records ([`sharing`]) and
//! (with the `replica` feature) the replicated store: RocksDB for state,
//! raft-rs for replication, one raft group per shard of the hash space.
//! The client ([`client`]) needs neither.
//!
//! The wire codec, key encoding, holder lists and the client build without
//! the feature, so agents, tools and fuzz targets need no RocksDB.

pub mod chunks;
pub mod client;
pub mod command;
pub mod holders;
pub mod keys;
pub mod placement;
pub mod sharing;
pub mod snapshot;
pub mod wire;

#[cfg(feature = "replica")]
pub mod metrics;
#[cfg(feature = "replica")]
pub mod node;
#[cfg(feature = "replica")]
pub mod raftlog;
#[cfg(feature = "replica")]
pub mod replica;
#[cfg(feature = "replica")]
pub mod snapshot_in;
#[cfg(feature = "replica")]
pub mod store;

pub use pagecast_pages::{PageHash, Sketch};
