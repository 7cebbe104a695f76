//! The content index of pagecast.
//!
//! For every distinct non-zero page content in the cluster the index knows
//! which hosts hold it and how many guest frames hold it there. This crate
//! owns the [`PageHash`] type that names a page's content everywhere in
//! pagecast, and the batched BLAKE3 kernel that computes it
//! ([`hash_pages`]). Storage and replication come in later modules.

pub mod hash;
pub mod sketch;

pub use hash::{PAGE_SIZE, Page, PageHash, ParseHashError, hash_pages, is_zero_page};
pub use sketch::{HyperLogLog, MinHash, Sketch, SketchError};
