//! The content index of pagecast.
//!
//! For every distinct non-zero page content in the cluster the index knows
//! which hosts hold it and how many guest frames hold it there. This crate
//! owns the [`PageHash`] type that names a page's content everywhere in
//! pagecast, and the batched BLAKE3 kernel that computes it
//! ([`hash_pages`]), the sketches that answer sharing questions, and the
//! pieces of the replicated store: its wire codec ([`wire`]), key encoding
//! ([`keys`]) and holder lists ([`holders`]).

pub mod hash;
pub mod holders;
pub mod keys;
pub mod sharing;
pub mod sketch;
pub mod wire;

pub use hash::{PAGE_SIZE, Page, PageHash, ParseHashError, hash_pages, is_zero_page};
pub use sketch::{HyperLogLog, MinHash, Sketch, SketchError};
