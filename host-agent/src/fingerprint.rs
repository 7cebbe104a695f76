//! Fingerprinting guest memory: the BLAKE3-256 hash of every non-zero page.
//!
//! Work is split into units of [`UNIT_PAGES`] pages spread over a rayon pool
//! whose size the caller chooses ([`Fingerprinter::new`]). Inside a unit,
//! zero pages are detected and skipped (they get [`PageHash::ZERO_PAGE`] and
//! are never hashed), and the rest go through the multi-page kernel
//! [`pagecast_index::hash_pages`], eight pages side by side in the SIMD lanes.

use pagecast_index::{PAGE_SIZE, Page, PageHash, hash_pages, is_zero_page};
use rayon::prelude::*;

use crate::memory::GuestMemory;

/// Pages per work unit (1 MiB): large enough to amortise scheduling, small
/// enough to balance two threads and report progress smoothly.
pub const UNIT_PAGES: usize = 256;

/// Errors of the fingerprinter.
#[derive(Debug, thiserror::Error)]
pub enum FingerprintError {
    /// The thread pool could not be built.
    #[error("cannot start {threads} hashing threads: {source}")]
    Pool {
        /// Threads asked for.
        threads: usize,
        /// Why not.
        #[source]
        source: rayon::ThreadPoolBuildError,
    },
    /// Zero threads asked for.
    #[error("the hashing pool needs at least one thread")]
    NoThreads,
}

/// The hash of every frame of a guest, zero frames marked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprints {
    /// One entry per frame; [`PageHash::ZERO_PAGE`] for zero pages.
    pub hashes: Vec<PageHash>,
    /// Number of zero frames.
    pub zero: u64,
}

impl Fingerprints {
    /// Number of frames.
    pub fn frames(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// Number of non-zero frames.
    pub fn nonzero(&self) -> u64 {
        self.frames() - self.zero
    }

    /// The distinct non-zero hashes, sorted.
    pub fn distinct(&self) -> Vec<PageHash> {
        let mut v: Vec<PageHash> = self
            .hashes
            .iter()
            .copied()
            .filter(|h| !h.is_zero_page())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Hashes pages on a rayon pool of a chosen size.
pub struct Fingerprinter {
    pool: rayon::ThreadPool,
}

impl Fingerprinter {
    /// A fingerprinter with its own pool of `threads` threads.
    pub fn new(threads: usize) -> Result<Self, FingerprintError> {
        if threads == 0 {
            return Err(FingerprintError::NoThreads);
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("pagecast-hash-{i}"))
            .build()
            .map_err(|source| FingerprintError::Pool { threads, source })?;
        Ok(Fingerprinter { pool })
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// The pool, for other CPU-heavy work that should share it.
    pub fn pool(&self) -> &rayon::ThreadPool {
        &self.pool
    }

    /// Fingerprints all of `mem`. `progress` is called with the number of
    /// pages finished, from the hashing threads, once per unit.
    pub fn fingerprint(
        &self,
        mem: &dyn GuestMemory,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Fingerprints {
        // SAFETY: we only hash the bytes. If a running guest writes a page
        // while it is hashed, the hash is of a torn page; the page is in the
        // dirty log from that write on, which every user of a fingerprint
        // consults before trusting it.
        let bytes = unsafe { mem.region().bytes() };
        let mut hashes = vec![PageHash::ZERO_PAGE; bytes.len() / PAGE_SIZE];
        let zero = self.fingerprint_bytes(bytes, &mut hashes, progress);
        Fingerprints { hashes, zero }
    }

    /// Hashes the pages of `bytes` (a whole number of pages) into `out`, one
    /// entry per page, and returns how many were zero.
    ///
    /// # Panics
    /// If `bytes` is not a whole number of pages or `out` has the wrong length.
    pub fn fingerprint_bytes(
        &self,
        bytes: &[u8],
        out: &mut [PageHash],
        progress: &(dyn Fn(u64) + Sync),
    ) -> u64 {
        assert_eq!(bytes.len() % PAGE_SIZE, 0, "whole pages");
        assert_eq!(bytes.len() / PAGE_SIZE, out.len(), "one hash per page");
        self.pool.install(|| {
            bytes
                .par_chunks(UNIT_PAGES * PAGE_SIZE)
                .zip(out.par_chunks_mut(UNIT_PAGES))
                .map(|(unit, out)| {
                    let zero = fingerprint_unit(unit, out);
                    progress(out.len() as u64);
                    zero
                })
                .sum()
        })
    }

    /// Hashes a list of pages (for example the dirty pages of a round) into
    /// `out`, zero pages marked. Returns how many were zero.
    pub fn fingerprint_pages(&self, pages: &[&Page], out: &mut [PageHash]) -> u64 {
        assert_eq!(pages.len(), out.len(), "one hash per page");
        self.pool.install(|| {
            pages
                .par_chunks(UNIT_PAGES)
                .zip(out.par_chunks_mut(UNIT_PAGES))
                .map(|(pages, out)| hash_skipping_zero(pages.iter().copied(), out))
                .sum()
        })
    }
}

/// Hashes one unit of contiguous pages; returns its zero-page count.
fn fingerprint_unit(unit: &[u8], out: &mut [PageHash]) -> u64 {
    let pages = unit
        .chunks_exact(PAGE_SIZE)
        .map(|p| <&Page>::try_from(p).expect("page-sized chunk"));
    hash_skipping_zero(pages, out)
}

fn hash_skipping_zero<'a>(pages: impl Iterator<Item = &'a Page>, out: &mut [PageHash]) -> u64 {
    let mut nonzero: Vec<&Page> = Vec::with_capacity(out.len());
    let mut slots: Vec<usize> = Vec::with_capacity(out.len());
    let mut zero = 0;
    for (i, page) in pages.enumerate() {
        if is_zero_page(page) {
            out[i] = PageHash::ZERO_PAGE;
            zero += 1;
        } else {
            nonzero.push(page);
            slots.push(i);
        }
    }
    let mut hashed = vec![PageHash::ZERO_PAGE; nonzero.len()];
    hash_pages(&nonzero, &mut hashed);
    for (slot, h) in slots.into_iter().zip(hashed) {
        out[slot] = h;
    }
    zero
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::synth::{SynthSpec, SyntheticVm};

    #[test]
    fn matches_blake3_page_by_page_and_flags_zero() {
        let vm = SyntheticVm::new(SynthSpec::new("web", 0, 3 << 20).unwrap()).unwrap();
        let mem = vm.materialize(None).unwrap();
        for threads in [1, 2, 3] {
            let fp = Fingerprinter::new(threads).unwrap();
            let done = std::sync::atomic::AtomicU64::new(0);
            let f = fp.fingerprint(&mem, &|n| {
                done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            });
            assert_eq!(done.into_inner(), vm.pages());
            let mut page = [0u8; PAGE_SIZE];
            let mut zero = 0;
            for frame in 0..vm.pages() {
                vm.fill_page(frame, &mut page);
                let h = f.hashes[frame as usize];
                if page.iter().all(|&b| b == 0) {
                    assert!(h.is_zero_page());
                    zero += 1;
                } else {
                    assert_eq!(h, PageHash::of_page(&page), "frame {frame}");
                }
            }
            assert_eq!(f.zero, zero);
            assert!(zero > 0 && zero < vm.pages());
        }
    }

    #[test]
    fn page_lists() {
        let a = [7u8; PAGE_SIZE];
        let z = [0u8; PAGE_SIZE];
        let pages: Vec<&Page> = (0..20).map(|i| if i % 3 == 0 { &z } else { &a }).collect();
        let mut out = vec![PageHash::ZERO_PAGE; pages.len()];
        let zero = Fingerprinter::new(2)
            .unwrap()
            .fingerprint_pages(&pages, &mut out);
        assert_eq!(zero, 7);
        for (i, h) in out.iter().enumerate() {
            assert_eq!(h.is_zero_page(), i % 3 == 0);
            if i % 3 != 0 {
                assert_eq!(*h, PageHash::of_page(&a));
            }
        }
        assert!(matches!(
            Fingerprinter::new(0),
            Err(FingerprintError::NoThreads)
        ));
    }
}
