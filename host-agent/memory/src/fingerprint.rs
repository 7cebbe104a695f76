//! Fingerprinting guest memory: the BLAKE3-256 hash of every non-zero page.
//!
//! Work is split into units of [`UNIT_PAGES`] pages spread over a rayon pool
//! whose size the caller chooses ([`Fingerprinter::new`]). Inside a unit,
//! pages are copied out of guest memory 32 at a time (volatile copies: a
//! guest may be writing them), zero pages are detected on the copy and
//! skipped (they get [`PageHash::ZERO_PAGE`] and are never hashed), and the
//! rest go through the multi-page kernel ([`ContentKey::hash_pages`]),
//! sixteen (AVX-512) or eight (AVX2) pages side by side in the SIMD lanes. Every call names the dedup
//! domain's [`ContentKey`] the hashes are taken in.

use pagecast_pages::{ContentKey, PAGE_SIZE, Page, PageHash, is_zero_page};
use rayon::prelude::*;

use crate::{GuestMemory, ImageFile, MemoryError, Region};

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
    ///
    /// Sorted on the threads of the rayon pool it is called in (the global
    /// one, or a [`Fingerprinter`]'s inside [`Fingerprinter::pool`]'s
    /// `install`), comparing the first eight bytes as one big-endian word
    /// before the rest: the order is `PageHash`'s, found with one integer
    /// comparison for all but equal prefixes.
    pub fn distinct(&self) -> Vec<PageHash> {
        let mut v: Vec<PageHash> = self
            .hashes
            .par_iter()
            .copied()
            .filter(|h| !h.is_zero_page())
            .collect();
        let head = |h: &PageHash| {
            u64::from_be_bytes(h.as_bytes()[..8].try_into().expect("a hash is 32 bytes"))
        };
        v.par_sort_unstable_by(|a, b| head(a).cmp(&head(b)).then_with(|| a.cmp(b)));
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
    ///
    /// Pages are copied out of guest memory (volatile copies, 32 pages at a
    /// time) and hashed from the copy. If a running guest writes a
    /// page while it is copied, the hash is of a torn copy; the page is in
    /// the dirty log from that write on, which every user of a fingerprint
    /// consults before trusting it. Memory that nobody can write meanwhile
    /// (an image file under a read lease, [`GuestMemory::hold_still`]) is
    /// hashed in place, without the copy.
    pub fn fingerprint(
        &self,
        mem: &dyn GuestMemory,
        key: &ContentKey,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Fingerprints {
        self.hash_all(mem.region(), Some(mem), key, progress, &|_, _, _| {})
    }

    /// [`Fingerprinter::fingerprint`] of a bare region.
    pub fn fingerprint_region(
        &self,
        region: &Region,
        key: &ContentKey,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Fingerprints {
        self.fingerprint_observed(region, key, progress, &|_, _, _| {})
    }

    /// [`Fingerprinter::fingerprint_region`], calling `observe(frame, copy,
    /// hash)` for every non-zero page with the very copy its hash was
    /// computed from (for tests that check hashing under concurrent writes).
    pub fn fingerprint_observed(
        &self,
        region: &Region,
        key: &ContentKey,
        progress: &(dyn Fn(u64) + Sync),
        observe: &(dyn Fn(u64, &Page, &PageHash) + Sync),
    ) -> Fingerprints {
        self.hash_all(region, None, key, progress, observe)
    }

    /// Every page of `region`, read in place where `mem` holds them still
    /// ([`GuestMemory::hold_still`]), else copied out.
    fn hash_all(
        &self,
        region: &Region,
        mem: Option<&dyn GuestMemory>,
        key: &ContentKey,
        progress: &(dyn Fn(u64) + Sync),
        observe: &(dyn Fn(u64, &Page, &PageHash) + Sync),
    ) -> Fingerprints {
        let mut hashes = vec![PageHash::ZERO_PAGE; region.pages() as usize];
        let zero = self.pool.install(|| {
            hashes
                .par_chunks_mut(UNIT_PAGES)
                .enumerate()
                .map(|(unit, out)| {
                    let first = (unit * UNIT_PAGES) as u64;
                    let zero = hash_unit((region, mem), key, first, out, observe);
                    progress(out.len() as u64);
                    zero
                })
                .sum()
        });
        Fingerprints { hashes, zero }
    }

    /// Hashes the pages of `bytes` (a whole number of pages of memory this
    /// process owns, not guest memory) into `out`, one entry per page, and
    /// returns how many were zero.
    ///
    /// # Panics
    /// If `bytes` is not a whole number of pages or `out` has the wrong length.
    pub fn fingerprint_bytes(
        &self,
        bytes: &[u8],
        key: &ContentKey,
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
                    let pages = unit
                        .chunks_exact(PAGE_SIZE)
                        .map(|p| <&Page>::try_from(p).expect("page-sized chunk"));
                    let zero = hash_skipping_zero(key, pages, out);
                    progress(out.len() as u64);
                    zero
                })
                .sum()
        })
    }

    /// Hashes a list of pages (for example the dirty pages of a round) into
    /// `out`, zero pages marked. Returns how many were zero.
    pub fn fingerprint_pages(
        &self,
        pages: &[&Page],
        key: &ContentKey,
        out: &mut [PageHash],
    ) -> u64 {
        assert_eq!(pages.len(), out.len(), "one hash per page");
        self.pool.install(|| {
            pages
                .par_chunks(UNIT_PAGES)
                .zip(out.par_chunks_mut(UNIT_PAGES))
                .map(|(pages, out)| hash_skipping_zero(key, pages.iter().copied(), out))
                .sum()
        })
    }
}

/// One image, opened and fingerprinted by [`fingerprint_images`].
pub struct FingerprintedImage {
    /// The open image.
    pub image: ImageFile,
    /// Every frame's hash.
    pub fingerprints: Fingerprints,
    /// How long hashing it took.
    pub elapsed: std::time::Duration,
    /// Pages hashed in place under a read lease (the rest were copied
    /// out first: see [`ImageFile::take_lease`]).
    pub pages_in_place: u64,
}

/// Opens every image of `paths` first (so a bad last image costs no
/// hashing of the others), then fingerprints each in turn: `on_image` is
/// called before each with its index and the open image, `progress` with
/// pages hashed. This is how `scan`, `plan`, `index load` and `cast send`
/// read images. `keys[i]` is the dedup domain image `i` is hashed in.
///
/// # Panics
/// If `keys` and `paths` differ in length.
pub fn fingerprint_images<P: AsRef<std::path::Path>>(
    paths: &[P],
    keys: &[ContentKey],
    fp: &Fingerprinter,
    on_image: &mut dyn FnMut(usize, &ImageFile),
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<FingerprintedImage>, MemoryError> {
    assert_eq!(paths.len(), keys.len(), "one key per image");
    let images = paths
        .iter()
        .map(ImageFile::open)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(images
        .into_iter()
        .enumerate()
        .map(|(i, image)| {
            on_image(i, &image);
            let t = std::time::Instant::now();
            // Read in place while no one can write the file; copied where
            // a lease cannot be had.
            image.take_lease();
            let fingerprints = fp.fingerprint(&image, &keys[i], progress);
            image.release_lease();
            FingerprintedImage {
                pages_in_place: image.pages_in_place(),
                image,
                fingerprints,
                elapsed: t.elapsed(),
            }
        })
        .collect())
}

/// Pages copied out of guest memory at once (128 KiB: the copy stays in
/// the core's L2 cache while the batch kernel hashes it).
const STAGE_PAGES: usize = 32;

thread_local! {
    /// Each hashing thread's staging area, reused from unit to unit.
    static STAGE: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(vec![0u8; STAGE_PAGES * PAGE_SIZE]);
}

/// Hashes the unit of pages starting at frame `first` (as many as `out`
/// holds), 32 at a time: in place where `mem` holds them still (again from
/// a copy if the hold did not last the block), else copied out of the
/// region (one volatile copy each) and hashed from the copy; returns its
/// zero-page count.
fn hash_unit(
    (region, mem): (&Region, Option<&dyn GuestMemory>),
    key: &ContentKey,
    first: u64,
    out: &mut [PageHash],
    observe: &(dyn Fn(u64, &Page, &PageHash) + Sync),
) -> u64 {
    STAGE.with(|stage| {
        let mut stage = stage.borrow_mut();
        let mut zero = 0;
        let mut at = 0;
        while at < out.len() {
            let n = (out.len() - at).min(STAGE_PAGES);
            let frame = first + at as u64;
            let block_out = &mut out[at..at + n];
            let in_place = mem.and_then(|m| m.hold_still(frame, n)).and_then(|s| {
                let z = hash_block(key, s.bytes(), frame, block_out, &|_, _, _| {});
                s.kept().then_some(z)
            });
            zero += match in_place {
                Some(z) => z,
                None => {
                    let copy = &mut stage[..n * PAGE_SIZE];
                    region
                        .read_pages(frame, copy)
                        .expect("the unit lies inside the region");
                    hash_block(key, copy, frame, block_out, observe)
                }
            };
            at += n;
        }
        zero
    })
}

/// Hashes the pages of `block` (frames from `frame` on) into `out`, zero
/// pages marked, calling `observe` for each non-zero one; returns how many
/// were zero.
fn hash_block(
    key: &ContentKey,
    block: &[u8],
    frame: u64,
    out: &mut [PageHash],
    observe: &(dyn Fn(u64, &Page, &PageHash) + Sync),
) -> u64 {
    let mut zero = 0;
    let mut hashed = [PageHash::ZERO_PAGE; STAGE_PAGES];
    let mut refs: Vec<&Page> = Vec::with_capacity(STAGE_PAGES);
    let mut slots = [0usize; STAGE_PAGES];
    for (i, p) in block.chunks_exact(PAGE_SIZE).enumerate() {
        let page: &Page = p.try_into().expect("page-sized chunk");
        if is_zero_page(page) {
            out[i] = PageHash::ZERO_PAGE;
            zero += 1;
        } else {
            slots[refs.len()] = i;
            refs.push(page);
        }
    }
    let k = refs.len();
    key.hash_pages(&refs, &mut hashed[..k]);
    for j in 0..k {
        observe(frame + slots[j] as u64, refs[j], &hashed[j]);
        out[slots[j]] = hashed[j];
    }
    zero
}

fn hash_skipping_zero<'a>(
    key: &ContentKey,
    pages: impl Iterator<Item = &'a Page>,
    out: &mut [PageHash],
) -> u64 {
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
    key.hash_pages(&nonzero, &mut hashed);
    for (slot, h) in slots.into_iter().zip(hashed) {
        out[slot] = h;
    }
    zero
}

/// Copies the pages `frames` of `mem` into `buf` (resized to fit, one page
/// after another) and hashes each copy into `hashes` (the zero marker for a
/// zero page): the one read-then-hash step that migration rounds, dirty
/// refreshes and local fills share. Meant for short lists (a frame of
/// pages); whole memories go through [`Fingerprinter`].
pub fn read_and_hash(
    mem: &dyn GuestMemory,
    key: &ContentKey,
    frames: &[u64],
    buf: &mut Vec<u8>,
    hashes: &mut Vec<PageHash>,
) -> Result<(), MemoryError> {
    buf.resize(frames.len() * PAGE_SIZE, 0);
    for (i, &f) in frames.iter().enumerate() {
        let page: &mut Page = (&mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
            .try_into()
            .expect("page");
        mem.read_page(f, page)?;
    }
    hashes.clear();
    hashes.resize(frames.len(), PageHash::ZERO_PAGE);
    let pages: Vec<&Page> = buf
        .chunks_exact(PAGE_SIZE)
        .map(|p| p.try_into().expect("page"))
        .collect();
    hash_skipping_zero(key, pages.into_iter(), hashes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{SynthSpec, SyntheticVm};

    #[test]
    fn matches_blake3_page_by_page_and_flags_zero() {
        let vm = SyntheticVm::new(SynthSpec::new("web", 0, 3 << 20).unwrap()).unwrap();
        let mem = vm.materialize(None).unwrap();
        for threads in [1, 2, 3] {
            let fp = Fingerprinter::new(threads).unwrap();
            let done = std::sync::atomic::AtomicU64::new(0);
            let f = fp.fingerprint(&mem, &ContentKey::CLUSTER, &|n| {
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

    /// `distinct` sorts as `PageHash` orders (bytes, first to last), ties
    /// on the first eight bytes included, drops repeats and the zero marker.
    #[test]
    fn distinct_is_the_sorted_set_of_non_zero_hashes() {
        let mut rng = pagecast_pages::SplitMix64::new(9);
        let mut hashes = Vec::new();
        for i in 0..5000u64 {
            let mut b = [0u8; 32];
            // Few distinct prefixes, so most comparisons go past them.
            b[..8].copy_from_slice(&(rng.next_u64() % 7).to_be_bytes());
            b[8..16].copy_from_slice(&(rng.next_u64() % 900).to_le_bytes());
            hashes.push(if i % 11 == 0 {
                PageHash::ZERO_PAGE
            } else {
                PageHash::from_bytes(b)
            });
        }
        let f = Fingerprints {
            zero: hashes.iter().filter(|h| h.is_zero_page()).count() as u64,
            hashes: hashes.clone(),
        };
        let mut want: Vec<PageHash> = hashes.into_iter().filter(|h| !h.is_zero_page()).collect();
        want.sort();
        want.dedup();
        assert!(want.len() > 1000);
        assert_eq!(f.distinct(), want);
    }

    #[test]
    fn page_lists() {
        let a = [7u8; PAGE_SIZE];
        let z = [0u8; PAGE_SIZE];
        let pages: Vec<&Page> = (0..20).map(|i| if i % 3 == 0 { &z } else { &a }).collect();
        let mut out = vec![PageHash::ZERO_PAGE; pages.len()];
        let zero = Fingerprinter::new(2).unwrap().fingerprint_pages(
            &pages,
            &ContentKey::CLUSTER,
            &mut out,
        );
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

    #[test]
    fn a_domain_key_names_every_page_in_that_domain() {
        let vm = SyntheticVm::new(SynthSpec::new("web", 0, 1 << 20).unwrap()).unwrap();
        let mem = vm.materialize(None).unwrap();
        let key = ContentKey::keyed([5; 32]);
        let fp = Fingerprinter::new(2).unwrap();
        let keyed = fp.fingerprint(&mem, &key, &|_| {});
        let plain = fp.fingerprint(&mem, &ContentKey::CLUSTER, &|_| {});
        assert_eq!(keyed.zero, plain.zero);
        let mut page = [0u8; PAGE_SIZE];
        for frame in 0..vm.pages() {
            let (k, p) = (keyed.hashes[frame as usize], plain.hashes[frame as usize]);
            assert_eq!(k.is_zero_page(), p.is_zero_page());
            if !k.is_zero_page() {
                vm.fill_page(frame, &mut page);
                assert_eq!(k, key.hash_page(&page), "frame {frame}");
                assert_ne!(k, p, "frame {frame} has the same name in two domains");
            }
        }
        let (mut buf, mut hashes) = (Vec::new(), Vec::new());
        read_and_hash(&mem, &key, &[0, 1, 2, 3], &mut buf, &mut hashes).unwrap();
        assert_eq!(hashes, keyed.hashes[..4]);
    }
}
