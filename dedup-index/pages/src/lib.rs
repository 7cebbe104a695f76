//! The page vocabulary every pagecast crate shares.
//!
//! [`PageHash`] names a page's content everywhere: in manifests, on the
//! wire, in the content index and in plans. [`hash_pages`] is the batched
//! BLAKE3 kernel that computes it (sixteen pages side by side where
//! AVX-512F is available, eight with AVX2), [`is_zero_page`] the test that keeps zero pages out of
//! everything. [`ContentKey`] names pages within a dedup domain ([`domain`]):
//! plain BLAKE3 for the cluster-wide one, keyed BLAKE3 for any other.
//! [`Sketch`] (MinHash + HyperLogLog) answers sharing questions
//! in a few KiB per VM; [`sharing`] turns sketches into rankings, matrices
//! and co-location groups. [`units`] parses and prints sizes and rates the
//! way operators write them, and [`SplitMix64`] is the one seeded generator
//! that synthetic memory, tests and benchmarks draw from.
//!
//! The crate does no I/O and depends on nothing of pagecast's, so the
//! transport and the planner can use it without knowing an index exists.

pub mod domain;
pub mod hash;
pub mod packed;
pub mod rng;
pub mod sharing;
pub mod sketch;
pub mod units;

pub use domain::{CLUSTER_DOMAIN, DomainError, DomainSecret};
pub use hash::{
    ContentKey, PAGE_SIZE, Page, PageHash, PageHashHasher, PageHashMap, PageHashSet,
    ParseHashError, hash_pages, is_zero_page,
};
pub use rng::SplitMix64;
pub use sketch::{HyperLogLog, MinHash, Sketch, SketchError};

/// [`PAGE_SIZE`] as a `u64`, for byte arithmetic on page counts.
pub const PAGE_BYTES: u64 = PAGE_SIZE as u64;

/// Bytes of `pages` pages.
pub const fn pages_to_bytes(pages: u64) -> u64 {
    pages * PAGE_BYTES
}
