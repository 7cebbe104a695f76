//! What `pagecast scan` reports: per-image page counts and the sharing
//! between images.

use pagecast_pages::{PAGE_SIZE, PageHash};
use serde::Serialize;

use pagecast_memory::fingerprint::{Fingerprinter, fingerprint_images};
use pagecast_memory::{GuestMemory, MemoryError};

/// Figures for one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageFigures {
    /// The image as named on the command line.
    pub name: String,
    /// Its dedup domain: pages count as shared only within one.
    pub domain: String,
    /// Pages in the image.
    pub pages: u64,
    /// Zero pages.
    pub zero: u64,
    /// Distinct non-zero page contents.
    pub distinct: u64,
    /// Non-zero pages whose content already appeared in the same image
    /// (non-zero pages minus distinct).
    pub duplicates: u64,
    /// Pages hashed in place under a read lease; the rest were copied out
    /// first (all of them where a writer, such as a running QEMU, had the
    /// file open, or no lease could be had).
    pub in_place_pages: u64,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScanReport {
    /// Per image.
    pub images: Vec<ImageFigures>,
    /// Distinct non-zero contents across all images.
    pub union_distinct: u64,
    /// Bytes a per-VM pre-copy sends: every non-zero page of every image.
    pub precopy_bytes: u64,
    /// Bytes a gang transfer sends: each distinct content once.
    pub gang_bytes: u64,
    /// `jaccard[i][j]`: |A∩B| / |A∪B| of the distinct non-zero page sets
    /// (1 on the diagonal; 0 when both are empty).
    pub jaccard: Vec<Vec<f64>>,
    /// Bytes read and hashed.
    pub hashed_bytes: u64,
    /// Wall time spent hashing, in seconds.
    pub hash_seconds: f64,
    /// Hashing rate in GB/s (10^9 bytes per second).
    pub hash_rate_gbps: f64,
    /// Hashing threads.
    pub threads: usize,
}

/// Distinct hashes of each image, and the figures derived from them.
pub struct ScanSets {
    /// Figures per image.
    pub images: Vec<ImageFigures>,
    /// Sorted distinct non-zero hashes per image.
    pub sets: Vec<Vec<PageHash>>,
}

/// Fingerprints each named image in turn, image `i` in dedup domain
/// `domains[i]` (keys for analysis only), so sharing is counted within
/// domains (names checked by the caller). `progress` gets pages hashed; `on_image` is called before each
/// image with its index and page count.
pub fn scan_images(
    paths: &[String],
    domains: &[String],
    fp: &Fingerprinter,
    on_image: &mut dyn FnMut(usize, u64),
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(ScanSets, u64, f64), MemoryError> {
    let keys: Vec<_> = domains
        .iter()
        .map(|d| pagecast_pages::domain::analysis_key(d).expect("domain names checked"))
        .collect();
    let images = fingerprint_images(
        paths,
        &keys,
        fp,
        &mut |i, img| on_image(i, img.page_count()),
        progress,
    )?;
    let mut figures = Vec::with_capacity(images.len());
    let mut sets = Vec::with_capacity(images.len());
    let mut hashed = 0u64;
    let mut seconds = 0.0;
    for ((img, name), domain) in images.iter().zip(paths).zip(domains) {
        let f = &img.fingerprints;
        seconds += img.elapsed.as_secs_f64();
        hashed += img.image.len_bytes();
        let distinct = fp.pool().install(|| f.distinct());
        figures.push(ImageFigures {
            name: name.clone(),
            domain: pagecast_pages::domain::normalize(domain).to_owned(),
            pages: f.frames(),
            zero: f.zero,
            distinct: distinct.len() as u64,
            duplicates: f.nonzero() - distinct.len() as u64,
            in_place_pages: img.pages_in_place,
        });
        sets.push(distinct);
    }
    Ok((
        ScanSets {
            images: figures,
            sets,
        },
        hashed,
        seconds,
    ))
}

/// Size of the intersection of two sorted, deduplicated lists.
pub fn intersection_len(a: &[PageHash], b: &[PageHash]) -> u64 {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

/// Jaccard index of two sorted, deduplicated lists.
pub fn jaccard(a: &[PageHash], b: &[PageHash]) -> f64 {
    let inter = intersection_len(a, b);
    let union = a.len() as u64 + b.len() as u64 - inter;
    if union == 0 {
        0.0
    } else {
        inter as f64 / union as f64
    }
}

impl ScanSets {
    /// Turns the per-image sets into the report.
    // Filling the symmetric matrix by index computes each pair once.
    #[allow(clippy::needless_range_loop)]
    pub fn report(self, hashed_bytes: u64, hash_seconds: f64, threads: usize) -> ScanReport {
        // One image's set is already sorted and distinct.
        let mut all: Vec<PageHash> = self.sets.iter().flatten().copied().collect();
        if self.sets.len() > 1 {
            all.sort_unstable();
            all.dedup();
        }
        let n = self.sets.len();
        let mut jac = vec![vec![0.0; n]; n];
        for i in 0..n {
            jac[i][i] = if self.sets[i].is_empty() { 0.0 } else { 1.0 };
            for j in i + 1..n {
                let v = jaccard(&self.sets[i], &self.sets[j]);
                jac[i][j] = v;
                jac[j][i] = v;
            }
        }
        let nonzero: u64 = self.images.iter().map(|i| i.pages - i.zero).sum();
        ScanReport {
            union_distinct: all.len() as u64,
            precopy_bytes: nonzero * PAGE_SIZE as u64,
            gang_bytes: all.len() as u64 * PAGE_SIZE as u64,
            jaccard: jac,
            hashed_bytes,
            hash_seconds,
            hash_rate_gbps: if hash_seconds > 0.0 {
                hashed_bytes as f64 / hash_seconds / 1e9
            } else {
                0.0
            },
            threads,
            images: self.images,
        }
    }
}
