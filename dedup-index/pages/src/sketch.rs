//! Sketches of page sets: MinHash for similarity, HyperLogLog for size.
//!
//! Sharing questions ("how much of VM v is already on host h?", "which VMs
//! are most alike?") are answered from sketches of a few KiB per VM instead
//! of the page tables. A [`PageHash`] is already a uniform 256-bit value, so
//! the sketches use its bytes directly as hash values, disjoint bytes for
//! each purpose:
//!
//! - [`MinHash`] is one-permutation MinHash: byte 0 picks one of
//!   [`MINHASH_BUCKETS`] buckets, bytes 8..16 are the value whose minimum the
//!   bucket keeps. The Jaccard estimate is the fraction of buckets, among
//!   those non-empty in either sketch, whose minima agree. Its standard error
//!   is about `sqrt(J (1 - J) / 256)`, under 0.032 for any J.
//! - [`HyperLogLog`] has 2^11 registers indexed by bytes 16..24, giving a
//!   relative standard error of about 1.04 / sqrt(2048) = 2.3%.
//!
//! Both merge by element-wise min / max, so the sketch of a union (a host's
//! VMs, a rack's content) is the merge of the members' sketches. Neither
//! supports removal: a host's sketch is rebuilt from its VMs' sketches.

use crate::PageHash;

/// Buckets of a [`MinHash`].
pub const MINHASH_BUCKETS: usize = 256;
/// log2 of the number of [`HyperLogLog`] registers.
pub const HLL_BITS: u32 = 11;
/// Registers of a [`HyperLogLog`].
pub const HLL_REGISTERS: usize = 1 << HLL_BITS;
/// Bytes of an encoded [`Sketch`].
pub const SKETCH_BYTES: usize = 8 + MINHASH_BUCKETS * 8 + HLL_REGISTERS;

const EMPTY: u64 = u64::MAX;

fn word(h: &PageHash, at: usize) -> u64 {
    u64::from_be_bytes(h.as_bytes()[at..at + 8].try_into().expect("8 bytes"))
}

/// One-permutation MinHash of a page set.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct MinHash {
    mins: Box<[u64; MINHASH_BUCKETS]>,
}

impl Default for MinHash {
    fn default() -> Self {
        MinHash {
            mins: Box::new([EMPTY; MINHASH_BUCKETS]),
        }
    }
}

impl MinHash {
    /// Adds a page.
    pub fn insert(&mut self, h: &PageHash) {
        let b = h.as_bytes()[0] as usize % MINHASH_BUCKETS;
        // A value of u64::MAX would read as "empty"; it occurs with
        // probability 2^-64 and then counts as one less than itself.
        let v = word(h, 8).min(EMPTY - 1);
        if v < self.mins[b] {
            self.mins[b] = v;
        }
    }

    /// Adds every page of `other` (the sketch of the union).
    pub fn merge(&mut self, other: &MinHash) {
        for (a, b) in self.mins.iter_mut().zip(other.mins.iter()) {
            *a = (*a).min(*b);
        }
    }

    /// Estimated Jaccard index |A∩B| / |A∪B|; 0 when both are empty.
    pub fn jaccard(&self, other: &MinHash) -> f64 {
        let (mut used, mut same) = (0u32, 0u32);
        for (a, b) in self.mins.iter().zip(other.mins.iter()) {
            if *a != EMPTY || *b != EMPTY {
                used += 1;
                if a == b {
                    same += 1;
                }
            }
        }
        if used == 0 {
            0.0
        } else {
            f64::from(same) / f64::from(used)
        }
    }

    /// Whether no page was added.
    pub fn is_empty(&self) -> bool {
        self.mins.iter().all(|&m| m == EMPTY)
    }
}

/// HyperLogLog estimate of a page set's size.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct HyperLogLog {
    regs: Box<[u8; HLL_REGISTERS]>,
}

impl Default for HyperLogLog {
    fn default() -> Self {
        HyperLogLog {
            regs: Box::new([0; HLL_REGISTERS]),
        }
    }
}

impl HyperLogLog {
    /// Adds a page.
    pub fn insert(&mut self, h: &PageHash) {
        let w = word(h, 16);
        let idx = (w >> (64 - HLL_BITS)) as usize;
        let rest = w << HLL_BITS;
        let rank = (rest.leading_zeros() + 1).min(64 - HLL_BITS + 1) as u8;
        if rank > self.regs[idx] {
            self.regs[idx] = rank;
        }
    }

    /// Adds every page of `other`.
    pub fn merge(&mut self, other: &HyperLogLog) {
        for (a, b) in self.regs.iter_mut().zip(other.regs.iter()) {
            *a = (*a).max(*b);
        }
    }

    /// Estimated number of distinct pages added.
    pub fn estimate(&self) -> f64 {
        let m = HLL_REGISTERS as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        // 2^-r for every possible register value, computed once.
        const POW: [f64; 66] = {
            let mut t = [0.0; 66];
            let mut i = 0;
            let mut v = 1.0;
            while i < 66 {
                t[i] = v;
                v /= 2.0;
                i += 1;
            }
            t
        };
        let (mut sum, mut zeros) = (0.0, 0u32);
        for &r in self.regs.iter() {
            sum += POW[r as usize];
            zeros += u32::from(r == 0);
        }
        let raw = alpha * m * m / sum;
        if raw <= 2.5 * m && zeros > 0 {
            // Small range: linear counting is more accurate.
            m * (m / f64::from(zeros)).ln()
        } else {
            raw
        }
    }
}

/// The sketch of one VM's (or host's) distinct non-zero pages.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Sketch {
    /// Similarity sketch.
    pub minhash: MinHash,
    /// Size sketch.
    pub hll: HyperLogLog,
    /// Non-zero frames counted (duplicates included).
    pub frames: u64,
}

/// Why bytes are not a [`Sketch`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SketchError {
    /// Wrong length.
    #[error("a sketch is {SKETCH_BYTES} bytes, got {0}")]
    Length(usize),
    /// A HyperLogLog register larger than any rank.
    #[error("sketch register {index} holds {value}, above the largest rank {max}")]
    Register {
        /// Register index.
        index: usize,
        /// Its value.
        value: u8,
        /// The largest valid value.
        max: u8,
    },
}

impl Sketch {
    /// Adds one non-zero frame holding `h`.
    pub fn insert(&mut self, h: &PageHash) {
        self.minhash.insert(h);
        self.hll.insert(h);
        self.frames += 1;
    }

    /// The sketch of a sequence of frames; zero pages are skipped.
    pub fn of<'a>(hashes: impl IntoIterator<Item = &'a PageHash>) -> Self {
        let mut s = Sketch::default();
        for h in hashes {
            if !h.is_zero_page() {
                s.insert(h);
            }
        }
        s
    }

    /// Adds everything `other` holds.
    pub fn merge(&mut self, other: &Sketch) {
        self.minhash.merge(&other.minhash);
        self.hll.merge(&other.hll);
        self.frames += other.frames;
    }

    /// Estimated distinct pages.
    pub fn distinct(&self) -> f64 {
        if self.minhash.is_empty() {
            0.0
        } else {
            self.hll.estimate()
        }
    }

    /// Estimated Jaccard index with `other`.
    pub fn jaccard(&self, other: &Sketch) -> f64 {
        self.minhash.jaccard(&other.minhash)
    }

    /// Estimated pages in both: J/(1+J) * (|A| + |B|), never more than
    /// the smaller set.
    pub fn shared(&self, other: &Sketch) -> f64 {
        let j = self.jaccard(other);
        let (a, b) = (self.distinct(), other.distinct());
        (j / (1.0 + j) * (a + b)).min(a.min(b))
    }

    /// Fixed-size encoding: frames (u64 BE), the MinHash minima (u64 BE),
    /// the HyperLogLog registers.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SKETCH_BYTES);
        out.extend_from_slice(&self.frames.to_be_bytes());
        for m in self.minhash.mins.iter() {
            out.extend_from_slice(&m.to_be_bytes());
        }
        out.extend_from_slice(&self.hll.regs[..]);
        out
    }

    /// Decodes [`Sketch::to_bytes`], checking length and register range.
    pub fn from_bytes(b: &[u8]) -> Result<Self, SketchError> {
        if b.len() != SKETCH_BYTES {
            return Err(SketchError::Length(b.len()));
        }
        let mut s = Sketch {
            frames: u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
            ..Sketch::default()
        };
        for (i, m) in s.minhash.mins.iter_mut().enumerate() {
            let at = 8 + i * 8;
            *m = u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        }
        let max = (64 - HLL_BITS + 1) as u8;
        for (index, (r, &value)) in s
            .hll
            .regs
            .iter_mut()
            .zip(&b[8 + MINHASH_BUCKETS * 8..])
            .enumerate()
        {
            if value > max {
                return Err(SketchError::Register { index, value, max });
            }
            *r = value;
        }
        Ok(s)
    }
}

impl std::fmt::Debug for Sketch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sketch")
            .field("frames", &self.frames)
            .field("distinct", &self.distinct())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(i: u64) -> PageHash {
        PageHash::from_bytes(*blake3::hash(&i.to_le_bytes()).as_bytes())
    }

    fn set(range: std::ops::Range<u64>) -> Sketch {
        let hashes: Vec<PageHash> = range.map(h).collect();
        Sketch::of(&hashes)
    }

    #[test]
    fn estimates_within_stated_bounds() {
        // Overlaps from 0% to 100% of sets of 20,000 pages.
        for shared in [0u64, 2_000, 5_000, 10_000, 15_000, 20_000] {
            let a = set(0..20_000);
            let b = set(20_000 - shared..40_000 - shared);
            let exact_j = shared as f64 / (40_000 - shared) as f64;
            let j = a.jaccard(&b);
            assert!((j - exact_j).abs() < 0.08, "J {j} vs {exact_j}");
            let s = a.shared(&b);
            assert!(
                (s - shared as f64).abs() < 0.1 * 20_000.0,
                "shared {s} vs {shared}"
            );
            assert!(
                (a.distinct() - 20_000.0).abs() < 0.07 * 20_000.0,
                "{}",
                a.distinct()
            );
        }
    }

    #[test]
    fn merge_is_the_union() {
        let mut u = set(0..5000);
        u.merge(&set(3000..9000));
        let direct = set(0..9000);
        assert_eq!(u.minhash, direct.minhash);
        assert_eq!(u.hll, direct.hll);
        assert_eq!(u.frames, 11_000);
        assert!((u.distinct() - 9000.0).abs() < 0.07 * 9000.0);
    }

    #[test]
    fn small_and_empty_sets() {
        let e = Sketch::default();
        assert_eq!(e.distinct(), 0.0);
        assert_eq!(e.jaccard(&e), 0.0);
        let one = set(0..1);
        assert!((one.distinct() - 1.0).abs() < 0.01);
        assert_eq!(one.jaccard(&one), 1.0);
        assert_eq!(one.jaccard(&e), 0.0);
        assert!((set(0..100).distinct() - 100.0).abs() < 5.0);
    }

    #[test]
    fn decode_refuses_bad_bytes() {
        let s = set(0..1000);
        let b = s.to_bytes();
        assert_eq!(Sketch::from_bytes(&b).unwrap(), s);
        assert_eq!(
            Sketch::from_bytes(&b[1..]),
            Err(SketchError::Length(SKETCH_BYTES - 1))
        );
        let mut bad = b.clone();
        *bad.last_mut().unwrap() = 200;
        assert!(matches!(
            Sketch::from_bytes(&bad),
            Err(SketchError::Register { value: 200, .. })
        ));
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..SKETCH_BYTES + 10)) {
            let _ = Sketch::from_bytes(&b);
        }
    }
}
