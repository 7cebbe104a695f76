//! The content index of pagecast.
//!
//! For every distinct non-zero page content in the cluster the index knows
//! which hosts hold it and how many guest frames hold it there. This crate
//! owns the [`PageHash`] type that names a page's content everywhere in
//! pagecast, and the batched BLAKE3 kernel that computes it
//! ([`hash_pages`]), the sketches that answer sharing questions, and (with
//! the `replica` feature) the replicated store: RocksDB for state, raft-rs
//! for replication, one raft group per shard of the hash space.
//!
//! The wire codec ([`wire`]), key encoding ([`keys`]) and holder lists
//! ([`holders`]) build without the feature, so fuzz targets need no RocksDB.

pub mod hash;
pub mod holders;
pub mod keys;
pub mod sharing;
pub mod sketch;
pub mod wire;

#[cfg(feature = "replica")]
pub mod client;
#[cfg(feature = "replica")]
pub mod node;
#[cfg(feature = "replica")]
pub mod raftlog;
#[cfg(feature = "replica")]
pub mod replica;
#[cfg(feature = "replica")]
pub mod store;

pub use hash::{PAGE_SIZE, Page, PageHash, ParseHashError, hash_pages, is_zero_page};
pub use sketch::{HyperLogLog, MinHash, Sketch, SketchError};
