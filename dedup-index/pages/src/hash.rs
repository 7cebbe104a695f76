//! Page hashes: the BLAKE3-256 digest of one 4 KiB page.
//!
//! [`PageHash`] is the one name for page content used across pagecast: in the
//! index, in manifests, on the wire and in plans. Zero pages are never
//! hashed; where a per-frame table needs a value for one, it stores
//! [`PageHash::ZERO_PAGE`], the all-zero bit pattern, which no BLAKE3 output
//! will ever equal in practice (probability 2^-256).
//!
//! [`hash_pages`] hashes many pages at once. A single 4 KiB page is only four
//! BLAKE3 chunks, which leaves half of an AVX2 unit's eight lanes idle, so
//! hashing pages one by one reaches about half of what BLAKE3 achieves on one
//! long buffer. On x86-64 with AVX2 the batch kernel hashes eight pages side by
//! side instead: 32 chunks in four 8-lane passes, the 16 inner parent nodes in
//! two passes and the 8 roots in one, all lanes busy throughout. The output is
//! bit-for-bit what `blake3::hash` returns for each page.

use std::fmt;
use std::str::FromStr;

/// Size of a guest page in bytes.
pub const PAGE_SIZE: usize = 4096;

/// One guest page.
pub type Page = [u8; PAGE_SIZE];

/// A hasher for maps and sets keyed by [`PageHash`]: a BLAKE3 output is
/// already uniform, so it folds the key's bytes into a word instead of
/// running SipHash over them (for planning's maps of every content a job
/// moves). Keys are hashes of page contents, which nobody can steer
/// towards one bucket.
#[derive(Debug, Default, Clone, Copy)]
pub struct PageHashHasher(u64);

impl std::hash::Hasher for PageHashHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.0 = self.0.rotate_left(23) ^ u64::from_le_bytes(w);
        }
    }

    /// What a [`PageHash`] writes: its folded word, taken as it is.
    fn write_u64(&mut self, i: u64) {
        self.0 = self.0.rotate_left(23) ^ i;
    }
}

/// A map keyed by [`PageHash`], hashed by [`PageHashHasher`].
pub type PageHashMap<V> =
    std::collections::HashMap<PageHash, V, std::hash::BuildHasherDefault<PageHashHasher>>;

/// A set of [`PageHash`]es, hashed by [`PageHashHasher`].
pub type PageHashSet =
    std::collections::HashSet<PageHash, std::hash::BuildHasherDefault<PageHashHasher>>;

/// The BLAKE3-256 hash of a page's content. Ordered bytewise, so sorted
/// lists, key ranges and shard prefixes agree; displayed as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct PageHash([u8; 32]);

impl std::hash::Hash for PageHash {
    /// One word folded from the four: a BLAKE3 output is uniform, so this
    /// keys a table as well as all 32 bytes do, at a fraction of the
    /// hashing (equal hashes fold equally).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let w = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&self.0[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        state.write_u64(w(0) ^ w(1).rotate_left(16) ^ w(2).rotate_left(32) ^ w(3).rotate_left(48));
    }
}

impl PageHash {
    /// The value stored for a zero page in per-frame tables. Zero pages are
    /// never hashed, sent or indexed.
    pub const ZERO_PAGE: PageHash = PageHash([0; 32]);

    /// Wraps 32 raw bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        PageHash(bytes)
    }

    /// Hash of one page's content (one call to `blake3::hash`). Use
    /// [`hash_pages`] for many pages.
    pub fn of_page(page: &Page) -> Self {
        PageHash(*blake3::hash(page).as_bytes())
    }

    /// The 32 raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether this is the [`PageHash::ZERO_PAGE`] marker.
    pub fn is_zero_page(&self) -> bool {
        self.0 == [0; 32]
    }

    /// The first 8 bytes as a big-endian integer: a uniformly distributed
    /// value for sharding and sketches, ordered like the hash itself.
    pub fn prefix_u64(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(b)
    }
}

impl fmt::Display for PageHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PageHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PageHash({self})")
    }
}

/// Why a string or byte slice is not a [`PageHash`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseHashError {
    /// The input has the wrong length.
    #[error("a page hash is {expected} {unit}, got {got}")]
    Length {
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
        /// "hex digits" or "bytes".
        unit: &'static str,
    },
    /// A character is not a hex digit.
    #[error("a page hash is hex, found {found:?} at position {position}")]
    NotHex {
        /// The offending character.
        found: char,
        /// Its character position.
        position: usize,
    },
}

impl FromStr for PageHash {
    type Err = ParseHashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let chars: Vec<char> = s.chars().collect();
        if chars.len() != 64 {
            return Err(ParseHashError::Length {
                expected: 64,
                got: chars.len(),
                unit: "hex digits",
            });
        }
        let mut out = [0u8; 32];
        for (i, pair) in chars.chunks_exact(2).enumerate() {
            let mut byte = 0u8;
            for (j, c) in pair.iter().enumerate() {
                let d = c.to_digit(16).ok_or(ParseHashError::NotHex {
                    found: *c,
                    position: 2 * i + j,
                })?;
                byte = (byte << 4) | d as u8;
            }
            out[i] = byte;
        }
        Ok(PageHash(out))
    }
}

impl TryFrom<&[u8]> for PageHash {
    type Error = ParseHashError;

    fn try_from(b: &[u8]) -> Result<Self, Self::Error> {
        let arr: [u8; 32] = b.try_into().map_err(|_| ParseHashError::Length {
            expected: 32,
            got: b.len(),
            unit: "bytes",
        })?;
        Ok(PageHash(arr))
    }
}

impl serde::Serialize for PageHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PageHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether a page is all zero bytes. Reads 64 bytes at a time and stops at
/// the first non-zero block, so non-zero pages usually cost one cache line.
pub fn is_zero_page(page: &Page) -> bool {
    page.chunks_exact(64).all(|block| {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8-byte chunk"));
        }
        acc == 0
    })
}

/// Hashes `pages[i]` into `out[i]` for every `i` with plain BLAKE3 (the
/// cluster-wide dedup domain), using the multi-page SIMD kernel where the
/// CPU has one. Zero pages are hashed like any other page: callers that
/// skip them (the fingerprinter does) leave them out of `pages`.
///
/// # Panics
/// If `out` is shorter than `pages`.
pub fn hash_pages(pages: &[&Page], out: &mut [PageHash]) {
    ContentKey::CLUSTER.hash_pages(pages, out)
}

/// How page content is named in one dedup domain: plain BLAKE3 for the
/// cluster-wide domain, keyed BLAKE3 with the domain's key for any other.
/// Equal pages of two different domains get unrelated hashes, so nothing
/// that compares hashes (the index, manifests, local fills, casts) can
/// match content across domains. Debug output never shows the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentKey {
    /// `None`: plain BLAKE3 (the cluster-wide domain).
    key: Option<[u8; 32]>,
}

impl fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.key {
            None => f.write_str("ContentKey(cluster)"),
            Some(_) => write!(f, "ContentKey(keyed, check {:016x})", self.check()),
        }
    }
}

impl ContentKey {
    /// The cluster-wide domain: plain, unkeyed BLAKE3-256.
    pub const CLUSTER: ContentKey = ContentKey { key: None };

    /// Keyed BLAKE3 with `key`.
    pub const fn keyed(key: [u8; 32]) -> Self {
        ContentKey { key: Some(key) }
    }

    /// Whether this is the cluster-wide (unkeyed) domain.
    pub const fn is_cluster(&self) -> bool {
        self.key.is_none()
    }

    /// A value that tells two hosts whether they derived the same key,
    /// without revealing it (the first 8 bytes of the key's hash of a fixed
    /// string).
    pub fn check(&self) -> u64 {
        const PROBE: &[u8] = b"pagecast dedup domain key check";
        let h = match &self.key {
            None => blake3::hash(PROBE),
            Some(k) => blake3::keyed_hash(k, PROBE),
        };
        let mut b = [0u8; 8];
        b.copy_from_slice(&h.as_bytes()[..8]);
        u64::from_be_bytes(b)
    }

    /// The hash of one page's content in this domain.
    pub fn hash_page(&self, page: &Page) -> PageHash {
        match &self.key {
            None => PageHash::of_page(page),
            Some(k) => PageHash(*blake3::keyed_hash(k, page).as_bytes()),
        }
    }

    /// Hashes `pages[i]` into `out[i]` for every `i` in this domain, eight
    /// pages side by side on x86-64 with AVX2. Zero pages are hashed like
    /// any other page.
    ///
    /// # Panics
    /// If `out` is shorter than `pages`.
    pub fn hash_pages(&self, pages: &[&Page], out: &mut [PageHash]) {
        assert!(out.len() >= pages.len(), "output shorter than input");
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            let mode = avx2::Mode::of(self.key.as_ref());
            let groups = pages.len() / avx512::PAGES;
            for g in 0..groups {
                let at = g * avx512::PAGES;
                let group: &[&Page; avx512::PAGES] = pages[at..at + avx512::PAGES]
                    .try_into()
                    .expect("group of PAGES");
                let mut hashes = [[0u8; 32]; avx512::PAGES];
                // The first pages of the next group, prefetched meanwhile
                // (the last group prefetches its own first pages again).
                let next = match pages.get(at + avx512::PAGES..at + avx512::PAGES + 4) {
                    Some(n) => [n[0], n[1], n[2], n[3]],
                    None => [group[0], group[1], group[2], group[3]],
                };
                // SAFETY: `available()` confirmed at run time that this CPU
                // supports AVX-512F, the only requirement of `hash16`.
                unsafe { avx512::hash16(&mode, group, next, &mut hashes) };
                for (o, h) in out[at..at + avx512::PAGES].iter_mut().zip(hashes) {
                    *o = PageHash(h);
                }
            }
            done = groups * avx512::PAGES;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            let mode = avx2::Mode::of(self.key.as_ref());
            let groups = (pages.len() - done) / avx2::PAGES;
            for g in 0..groups {
                let at = done + g * avx2::PAGES;
                let group: &[&Page; avx2::PAGES] = pages[at..at + avx2::PAGES]
                    .try_into()
                    .expect("group of PAGES");
                let mut hashes = [[0u8; 32]; avx2::PAGES];
                // The first pages of the next group, prefetched meanwhile
                // (the last group prefetches its own first pages again:
                // harmless).
                let next = match pages.get(at + avx2::PAGES..at + avx2::PAGES + 2) {
                    Some(n) => [n[0], n[1]],
                    None => [group[0], group[1]],
                };
                // SAFETY: `available()` confirmed at run time that this CPU
                // supports AVX2, the only requirement of `hash8`.
                unsafe { avx2::hash8(&mode, group, next, &mut hashes) };
                for (o, h) in out[at..at + avx2::PAGES].iter_mut().zip(hashes) {
                    *o = PageHash(h);
                }
            }
            done += groups * avx2::PAGES;
        }
        for (page, o) in pages[done..].iter().zip(&mut out[done..]) {
            *o = self.hash_page(page);
        }
    }
}

#[cfg(target_arch = "x86_64")]
/// One BLAKE3 round on every lane of a vector kernel (eight with AVX2,
/// sixteen with AVX-512): the four column G functions, then the four
/// diagonal ones, each step interleaved across the four. `add`, `xor`,
/// `rot16`, `rot12`, `rot8`, `rot7` and `SCHEDULE` are the expanding
/// module's.
///
/// A macro rather than a function: `#[target_feature]` functions cannot
/// be `#[inline(always)]`, and a call per round costs a third of the speed.
macro_rules! round {
    ($v:ident, $m:ident, $r:expr) => {{
        let v = &mut $v;
        let m = &$m;
        let s = &SCHEDULE[$r];
        // Columns: G(0,4,8,12) G(1,5,9,13) G(2,6,10,14) G(3,7,11,15).
        g4!(
            v,
            m,
            s,
            [0, 1, 2, 3],
            [4, 5, 6, 7],
            [8, 9, 10, 11],
            [12, 13, 14, 15],
            0
        );
        // Diagonals: G(0,5,10,15) G(1,6,11,12) G(2,7,8,13) G(3,4,9,14).
        g4!(
            v,
            m,
            s,
            [0, 1, 2, 3],
            [5, 6, 7, 4],
            [10, 11, 8, 9],
            [15, 12, 13, 14],
            8
        );
    }};
}

#[cfg(target_arch = "x86_64")]
/// Four BLAKE3 G functions, each step interleaved across the four: G on
/// state words `a[k], b[k], c[k], d[k]` with message words
/// `s[first + 2k]` and `s[first + 2k + 1]`.
macro_rules! g4 {
    ($v:ident, $m:ident, $s:ident, [$a0:expr, $a1:expr, $a2:expr, $a3:expr],
     [$b0:expr, $b1:expr, $b2:expr, $b3:expr], [$c0:expr, $c1:expr, $c2:expr, $c3:expr],
     [$d0:expr, $d1:expr, $d2:expr, $d3:expr], $first:expr) => {{
        g4!(@half $v, $m, $s, [$a0, $a1, $a2, $a3], [$b0, $b1, $b2, $b3],
            [$c0, $c1, $c2, $c3], [$d0, $d1, $d2, $d3], $first, rot16, rot12);
        g4!(@half $v, $m, $s, [$a0, $a1, $a2, $a3], [$b0, $b1, $b2, $b3],
            [$c0, $c1, $c2, $c3], [$d0, $d1, $d2, $d3], $first + 1, rot8, rot7);
    }};
    (@half $v:ident, $m:ident, $s:ident, [$a0:expr, $a1:expr, $a2:expr, $a3:expr],
     [$b0:expr, $b1:expr, $b2:expr, $b3:expr], [$c0:expr, $c1:expr, $c2:expr, $c3:expr],
     [$d0:expr, $d1:expr, $d2:expr, $d3:expr], $w:expr, $rd:ident, $rb:ident) => {{
        $v[$a0] = add(add($v[$a0], $m[$s[$w]]), $v[$b0]);
        $v[$a1] = add(add($v[$a1], $m[$s[$w + 2]]), $v[$b1]);
        $v[$a2] = add(add($v[$a2], $m[$s[$w + 4]]), $v[$b2]);
        $v[$a3] = add(add($v[$a3], $m[$s[$w + 6]]), $v[$b3]);
        $v[$d0] = $rd(xor($v[$d0], $v[$a0]));
        $v[$d1] = $rd(xor($v[$d1], $v[$a1]));
        $v[$d2] = $rd(xor($v[$d2], $v[$a2]));
        $v[$d3] = $rd(xor($v[$d3], $v[$a3]));
        $v[$c0] = add($v[$c0], $v[$d0]);
        $v[$c1] = add($v[$c1], $v[$d1]);
        $v[$c2] = add($v[$c2], $v[$d2]);
        $v[$c3] = add($v[$c3], $v[$d3]);
        $v[$b0] = $rb(xor($v[$b0], $v[$c0]));
        $v[$b1] = $rb(xor($v[$b1], $v[$c1]));
        $v[$b2] = $rb(xor($v[$b2], $v[$c2]));
        $v[$b3] = $rb(xor($v[$b3], $v[$c3]));
    }};
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! Eight BLAKE3 hashes of 4 KiB inputs at once with AVX2.
    //!
    //! State is kept transposed: vector `v[i]` holds state word `i` of all
    //! eight lanes, and the message vectors likewise, so one instruction
    //! advances eight independent compressions. A page is four chunks of
    //! sixteen 64-byte blocks; its tree has two parents over chunk pairs and
    //! a root over those. Because the chaining values come out transposed,
    //! building the parents' messages only needs even/odd lane shuffles, not
    //! a transpose; only the final root words are transposed back to bytes.

    use super::Page;
    use core::arch::x86_64::*;
    use std::sync::OnceLock;

    /// Pages hashed per call.
    pub const PAGES: usize = 8;

    pub(super) const IV: [u32; 8] = [
        0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB,
        0x5BE0CD19,
    ];
    pub(super) const CHUNK_START: u32 = 1;
    pub(super) const CHUNK_END: u32 = 2;
    pub(super) const PARENT: u32 = 4;
    pub(super) const ROOT: u32 = 8;
    const KEYED_HASH: u32 = 16;
    pub(super) const BLOCK_LEN: u32 = 64;
    pub(super) const CHUNK_LEN: usize = 1024;

    const MSG_PERMUTATION: [usize; 16] = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8];

    /// `SCHEDULE[r][i]`: which original message word round `r` uses in slot `i`.
    pub(super) const SCHEDULE: [[usize; 16]; 7] = {
        let mut s = [[0usize; 16]; 7];
        let mut i = 0;
        while i < 16 {
            s[0][i] = i;
            i += 1;
        }
        let mut r = 1;
        while r < 7 {
            let mut i = 0;
            while i < 16 {
                s[r][i] = s[r - 1][MSG_PERMUTATION[i]];
                i += 1;
            }
            r += 1;
        }
        s
    };

    /// Plain or keyed hashing: the chaining value every chunk and parent
    /// starts from (the IV, or the key's words) and the flag bits every
    /// compression carries.
    pub struct Mode {
        pub(super) start: [u32; 8],
        pub(super) flags: u32,
    }

    impl Mode {
        /// Plain BLAKE3 for `None`, keyed BLAKE3 with the key otherwise.
        pub fn of(key: Option<&[u8; 32]>) -> Self {
            match key {
                None => Mode {
                    start: IV,
                    flags: 0,
                },
                Some(k) => {
                    let mut start = [0u32; 8];
                    for (w, b) in start.iter_mut().zip(k.chunks_exact(4)) {
                        *w = u32::from_le_bytes(b.try_into().expect("4 bytes"));
                    }
                    Mode {
                        start,
                        flags: KEYED_HASH,
                    }
                }
            }
        }
    }

    /// Whether the running CPU has AVX2 (checked once).
    pub fn available() -> bool {
        static AVX2: OnceLock<bool> = OnceLock::new();
        *AVX2.get_or_init(|| std::is_x86_feature_detected!("avx2"))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn add(a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(a, b)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn xor(a: __m256i, b: __m256i) -> __m256i {
        _mm256_xor_si256(a, b)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn splat(x: u32) -> __m256i {
        _mm256_set1_epi32(x as i32)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn rot16(x: __m256i) -> __m256i {
        // LLVM rewrites a constant-mask `vpshufb` that swaps 16-bit halves
        // into `vpshuflw` + `vpshufhw`: two instructions where one does, in
        // the innermost loop. Emitting it by hand keeps it at one.
        static MASK: [u8; 32] = [
            2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11,
            8, 9, 14, 15, 12, 13,
        ];
        let out: __m256i;
        // SAFETY: `vpshufb` reads the 32-byte static `MASK` and writes only
        // `out`; the function is only compiled for AVX2.
        unsafe {
            std::arch::asm!(
                "vpshufb {out}, {x}, ymmword ptr [{mask}]",
                out = lateout(ymm_reg) out,
                x = in(ymm_reg) x,
                mask = in(reg) MASK.as_ptr(),
                options(pure, readonly, nostack, preserves_flags),
            );
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn rot12(x: __m256i) -> __m256i {
        _mm256_or_si256(_mm256_srli_epi32(x, 12), _mm256_slli_epi32(x, 20))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn rot8(x: __m256i) -> __m256i {
        _mm256_shuffle_epi8(
            x,
            _mm256_setr_epi8(
                1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12, 1, 2, 3, 0, 5, 6, 7, 4, 9,
                10, 11, 8, 13, 14, 15, 12,
            ),
        )
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn rot7(x: __m256i) -> __m256i {
        _mm256_or_si256(_mm256_srli_epi32(x, 7), _mm256_slli_epi32(x, 25))
    }

    /// Compresses one 64-byte block in each of eight lanes, updating `cv`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn compress8(cv: &mut [__m256i; 8], m: &[__m256i; 16], counter: __m256i, flags: u32) {
        let mut v = [
            cv[0],
            cv[1],
            cv[2],
            cv[3],
            cv[4],
            cv[5],
            cv[6],
            cv[7],
            splat(IV[0]),
            splat(IV[1]),
            splat(IV[2]),
            splat(IV[3]),
            counter,
            splat(0),
            splat(BLOCK_LEN),
            splat(flags),
        ];
        round!(v, m, 0);
        round!(v, m, 1);
        round!(v, m, 2);
        round!(v, m, 3);
        round!(v, m, 4);
        round!(v, m, 5);
        round!(v, m, 6);
        for i in 0..8 {
            cv[i] = xor(v[i], v[i + 8]);
        }
    }

    /// Transposes an 8x8 matrix of 32-bit words held as eight rows.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn transpose(r: [__m256i; 8]) -> [__m256i; 8] {
        let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
        let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
        let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
        let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
        let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
        let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
        let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
        let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
        let u0 = _mm256_unpacklo_epi64(t0, t2);
        let u1 = _mm256_unpackhi_epi64(t0, t2);
        let u2 = _mm256_unpacklo_epi64(t1, t3);
        let u3 = _mm256_unpackhi_epi64(t1, t3);
        let u4 = _mm256_unpacklo_epi64(t4, t6);
        let u5 = _mm256_unpackhi_epi64(t4, t6);
        let u6 = _mm256_unpacklo_epi64(t5, t7);
        let u7 = _mm256_unpackhi_epi64(t5, t7);
        [
            _mm256_permute2x128_si256(u0, u4, 0x20),
            _mm256_permute2x128_si256(u1, u5, 0x20),
            _mm256_permute2x128_si256(u2, u6, 0x20),
            _mm256_permute2x128_si256(u3, u7, 0x20),
            _mm256_permute2x128_si256(u0, u4, 0x31),
            _mm256_permute2x128_si256(u1, u5, 0x31),
            _mm256_permute2x128_si256(u2, u6, 0x31),
            _mm256_permute2x128_si256(u3, u7, 0x31),
        ]
    }

    /// Lanes 0,2,4,6 of `a` then of `b`, and lanes 1,3,5,7 of `a` then of `b`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn split_even_odd(a: __m256i, b: __m256i) -> (__m256i, __m256i) {
        let (fa, fb) = (_mm256_castsi256_ps(a), _mm256_castsi256_ps(b));
        // Within each 128-bit half: [a0 a2 b0 b2 | a4 a6 b4 b6].
        let even = _mm256_castps_si256(_mm256_shuffle_ps(fa, fb, 0b10_00_10_00));
        let odd = _mm256_castps_si256(_mm256_shuffle_ps(fa, fb, 0b11_01_11_01));
        // Reorder the 64-bit pairs to [a0 a2 a4 a6 b0 b2 b4 b6].
        (
            _mm256_permute4x64_epi64(even, 0b11_01_10_00),
            _mm256_permute4x64_epi64(odd, 0b11_01_10_00),
        )
    }

    /// Parent nodes of adjacent lane pairs: lane `j` of the result is the
    /// parent of lanes `2j`, `2j+1` of the sixteen inputs `lo` (lanes 0..8)
    /// and `hi` (lanes 8..16).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn parents8(mode: &Mode, lo: &[__m256i; 8], hi: &[__m256i; 8], flags: u32) -> [__m256i; 8] {
        let mut m = [splat(0); 16];
        for w in 0..8 {
            let (left, right) = split_even_odd(lo[w], hi[w]);
            m[w] = left;
            m[w + 8] = right;
        }
        let mut cv = [splat(0); 8];
        for (c, w) in cv.iter_mut().zip(mode.start) {
            *c = splat(w);
        }
        compress8(&mut cv, &m, splat(0), PARENT | flags | mode.flags);
        cv
    }

    /// Chaining values of the eight chunks of pages `a` and `b` (lanes 0..4
    /// are `a`'s chunks 0..4, lanes 4..8 are `b`'s).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn chunks8(mode: &Mode, a: &Page, b: &Page, next: [&Page; 2]) -> [__m256i; 8] {
        let lanes: [*const u8; 8] = [
            a.as_ptr(),
            a[CHUNK_LEN..].as_ptr(),
            a[2 * CHUNK_LEN..].as_ptr(),
            a[3 * CHUNK_LEN..].as_ptr(),
            b.as_ptr(),
            b[CHUNK_LEN..].as_ptr(),
            b[2 * CHUNK_LEN..].as_ptr(),
            b[3 * CHUNK_LEN..].as_ptr(),
        ];
        let counter = _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3);
        let mut cv = [splat(0); 8];
        for (c, w) in cv.iter_mut().zip(mode.start) {
            *c = splat(w);
        }
        for block in 0..16 {
            let off = block * 64;
            let mut lo = [splat(0); 8];
            let mut hi = [splat(0); 8];
            // Eight strided streams that start cold at every pair defeat
            // the hardware prefetcher. Instead, while this pair is hashed,
            // the next pair is pulled into cache: one line per lane per
            // block covers its 8 KiB exactly when this pair is done.
            for page in next {
                for c in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>(page[c * CHUNK_LEN + off..].as_ptr() as *const i8);
                }
            }
            for l in 0..8 {
                // SAFETY: every lane pointer starts a 1024-byte chunk inside a
                // page, and `off + 64 <= 1024`; unaligned loads are allowed.
                unsafe {
                    lo[l] = _mm256_loadu_si256(lanes[l].add(off) as *const __m256i);
                    hi[l] = _mm256_loadu_si256(lanes[l].add(off + 32) as *const __m256i);
                }
            }
            let lo = transpose(lo);
            let hi = transpose(hi);
            let mut m = [splat(0); 16];
            m[..8].copy_from_slice(&lo);
            m[8..].copy_from_slice(&hi);
            let mut flags = mode.flags;
            if block == 0 {
                flags |= CHUNK_START;
            }
            if block == 15 {
                flags |= CHUNK_END;
            }
            compress8(&mut cv, &m, counter, flags);
        }
        cv
    }

    /// BLAKE3-256 (plain or keyed, per `mode`) of eight 4 KiB pages.
    /// Callers must first check that the CPU supports AVX2 (see
    /// [`available`]).
    #[target_feature(enable = "avx2")]
    pub fn hash8(
        mode: &Mode,
        pages: &[&Page; PAGES],
        next: [&Page; 2],
        out: &mut [[u8; 32]; PAGES],
    ) {
        let c01 = chunks8(mode, pages[0], pages[1], [pages[2], pages[3]]);
        let c23 = chunks8(mode, pages[2], pages[3], [pages[4], pages[5]]);
        let c45 = chunks8(mode, pages[4], pages[5], [pages[6], pages[7]]);
        let c67 = chunks8(mode, pages[6], pages[7], next);
        // Lane j: parent j%2 of page j/2 (pages 0..4, then 4..8).
        let p0123 = parents8(mode, &c01, &c23, 0);
        let p4567 = parents8(mode, &c45, &c67, 0);
        // Lane j: root of page j.
        let roots = parents8(mode, &p0123, &p4567, ROOT);
        let rows = transpose(roots);
        for (row, o) in rows.iter().zip(out.iter_mut()) {
            // SAFETY: `o` is 32 writable bytes; unaligned stores are allowed.
            unsafe { _mm256_storeu_si256(o.as_mut_ptr() as *mut __m256i, *row) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! Sixteen BLAKE3 hashes of 4 KiB inputs at once with AVX-512F: the
    //! AVX2 kernel's layout (state and message transposed, one lane per
    //! chunk, then per parent, then per page) on vectors twice as wide.
    //! Four pages fill the sixteen lanes of a chunk pass; their message
    //! blocks are transposed with four butterfly stages of two-source
    //! permutes.

    use super::Page;
    use super::avx2::{
        BLOCK_LEN, CHUNK_END, CHUNK_LEN, CHUNK_START, IV, Mode, PARENT, ROOT, SCHEDULE,
    };
    use core::arch::x86_64::*;
    use std::sync::OnceLock;

    /// Pages hashed per call.
    pub const PAGES: usize = 16;

    /// Whether the running CPU has AVX-512F (checked once).
    pub fn available() -> bool {
        static AVX512: OnceLock<bool> = OnceLock::new();
        *AVX512.get_or_init(|| std::is_x86_feature_detected!("avx512f"))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn add(a: __m512i, b: __m512i) -> __m512i {
        _mm512_add_epi32(a, b)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn xor(a: __m512i, b: __m512i) -> __m512i {
        _mm512_xor_si512(a, b)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn splat(x: u32) -> __m512i {
        _mm512_set1_epi32(x as i32)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn rot16(x: __m512i) -> __m512i {
        _mm512_ror_epi32::<16>(x)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn rot12(x: __m512i) -> __m512i {
        _mm512_ror_epi32::<12>(x)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn rot8(x: __m512i) -> __m512i {
        _mm512_ror_epi32::<8>(x)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn rot7(x: __m512i) -> __m512i {
        _mm512_ror_epi32::<7>(x)
    }

    /// Compresses one 64-byte block in each of sixteen lanes, updating `cv`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn compress16(cv: &mut [__m512i; 8], m: &[__m512i; 16], counter: __m512i, flags: u32) {
        let mut v = [
            cv[0],
            cv[1],
            cv[2],
            cv[3],
            cv[4],
            cv[5],
            cv[6],
            cv[7],
            splat(IV[0]),
            splat(IV[1]),
            splat(IV[2]),
            splat(IV[3]),
            counter,
            splat(0),
            splat(BLOCK_LEN),
            splat(flags),
        ];
        round!(v, m, 0);
        round!(v, m, 1);
        round!(v, m, 2);
        round!(v, m, 3);
        round!(v, m, 4);
        round!(v, m, 5);
        round!(v, m, 6);
        for i in 0..8 {
            cv[i] = xor(v[i], v[i + 8]);
        }
    }

    /// The permute indices of one butterfly stage of block size `s`: row
    /// `i` (bit `s` of `i` clear) keeps its columns with bit `s` clear and
    /// takes row `i + s`'s first such columns into the others; row `i + s`
    /// takes row `i`'s other columns into its first ones.
    const fn stage(s: usize) -> ([i32; 16], [i32; 16]) {
        let (mut lo, mut hi) = ([0i32; 16], [0i32; 16]);
        let mut c = 0;
        while c < 16 {
            if c & s == 0 {
                lo[c] = c as i32;
                hi[c] = (c + s) as i32;
            } else {
                lo[c] = (16 + c - s) as i32;
                hi[c] = (16 + c) as i32;
            }
            c += 1;
        }
        (lo, hi)
    }

    const STAGES: [([i32; 16], [i32; 16]); 4] = [stage(8), stage(4), stage(2), stage(1)];
    const SIZES: [usize; 4] = [8, 4, 2, 1];

    /// Transposes a 16x16 matrix of 32-bit words held as sixteen rows: at
    /// each stage every off-diagonal block of the stage's size is swapped
    /// with its mirror, which over sizes 8, 4, 2 and 1 is the transpose.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose(mut r: [__m512i; 16]) -> [__m512i; 16] {
        for (k, (lo, hi)) in STAGES.iter().enumerate() {
            let s = SIZES[k];
            // SAFETY: each index table is 16 `i32`s, one 64-byte load.
            let (lo, hi) = unsafe {
                (
                    _mm512_loadu_si512(lo.as_ptr() as *const __m512i),
                    _mm512_loadu_si512(hi.as_ptr() as *const __m512i),
                )
            };
            for i in 0..16 {
                if i & s == 0 {
                    let (a, b) = (r[i], r[i + s]);
                    r[i] = _mm512_permutex2var_epi32(a, lo, b);
                    r[i + s] = _mm512_permutex2var_epi32(a, hi, b);
                }
            }
        }
        r
    }

    /// Lanes 0,2,..,14 of `a` then of `b`, and lanes 1,3,..,15 of `a`
    /// then of `b`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn split_even_odd(a: __m512i, b: __m512i) -> (__m512i, __m512i) {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        (
            _mm512_permutex2var_epi32(a, even, b),
            _mm512_permutex2var_epi32(a, odd, b),
        )
    }

    /// Parent nodes of adjacent lane pairs: lane `j` of the result is the
    /// parent of lanes `2j`, `2j+1` of the thirty-two inputs `lo` (lanes
    /// 0..16) and `hi` (lanes 16..32).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn parents16(mode: &Mode, lo: &[__m512i; 8], hi: &[__m512i; 8], flags: u32) -> [__m512i; 8] {
        let mut m = [splat(0); 16];
        for w in 0..8 {
            let (left, right) = split_even_odd(lo[w], hi[w]);
            m[w] = left;
            m[w + 8] = right;
        }
        let mut cv = [splat(0); 8];
        for (c, w) in cv.iter_mut().zip(mode.start) {
            *c = splat(w);
        }
        compress16(&mut cv, &m, splat(0), PARENT | flags | mode.flags);
        cv
    }

    /// Chaining values of the sixteen chunks of four pages (lane `4p + c`
    /// is chunk `c` of page `p`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn chunks16(mode: &Mode, pages: [&Page; 4], next: [&Page; 4]) -> [__m512i; 8] {
        let mut lanes = [std::ptr::null::<u8>(); 16];
        for (p, page) in pages.iter().enumerate() {
            for c in 0..4 {
                lanes[4 * p + c] = page[c * CHUNK_LEN..].as_ptr();
            }
        }
        let counter = _mm512_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
        let mut cv = [splat(0); 8];
        for (c, w) in cv.iter_mut().zip(mode.start) {
            *c = splat(w);
        }
        for block in 0..16 {
            let off = block * 64;
            // The next four pages are pulled into cache while these are
            // hashed (one line per chunk per block: all of them by the end).
            for page in next {
                for c in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>(page[c * CHUNK_LEN + off..].as_ptr() as *const i8);
                }
            }
            let mut rows = [splat(0); 16];
            for (l, row) in rows.iter_mut().enumerate() {
                // SAFETY: every lane pointer starts a 1024-byte chunk inside a
                // page, and `off + 64 <= 1024`; unaligned loads are allowed.
                *row = unsafe { _mm512_loadu_si512(lanes[l].add(off) as *const __m512i) };
            }
            let m = transpose(rows);
            let mut flags = mode.flags;
            if block == 0 {
                flags |= CHUNK_START;
            }
            if block == 15 {
                flags |= CHUNK_END;
            }
            compress16(&mut cv, &m, counter, flags);
        }
        cv
    }

    /// BLAKE3-256 (plain or keyed, per `mode`) of sixteen 4 KiB pages;
    /// `next` are prefetched meanwhile. Callers must first check that the
    /// CPU supports AVX-512F (see [`available`]).
    #[target_feature(enable = "avx512f")]
    pub fn hash16(
        mode: &Mode,
        pages: &[&Page; PAGES],
        next: [&Page; 4],
        out: &mut [[u8; 32]; PAGES],
    ) {
        let quad = |q: usize| -> [&Page; 4] {
            [
                pages[4 * q],
                pages[4 * q + 1],
                pages[4 * q + 2],
                pages[4 * q + 3],
            ]
        };
        let c0 = chunks16(mode, quad(0), quad(1));
        let c1 = chunks16(mode, quad(1), quad(2));
        let c2 = chunks16(mode, quad(2), quad(3));
        let c3 = chunks16(mode, quad(3), next);
        // Lane j: parent j%2 of page j/2 (pages 0..8, then 8..16).
        let p_lo = parents16(mode, &c0, &c1, 0);
        let p_hi = parents16(mode, &c2, &c3, 0);
        // Lane j: root of page j.
        let roots = parents16(mode, &p_lo, &p_hi, ROOT);
        let mut words = [[0u32; 16]; 8];
        for (w, row) in roots.iter().zip(words.iter_mut()) {
            // SAFETY: `row` is 64 writable bytes; unaligned stores are allowed.
            unsafe { _mm512_storeu_si512(row.as_mut_ptr() as *mut __m512i, *w) };
        }
        for (j, o) in out.iter_mut().enumerate() {
            for (w, bytes) in o.chunks_exact_mut(4).enumerate() {
                bytes.copy_from_slice(&words[w][j].to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Maps keyed by page hashes work with the folding hasher, and hashes
    /// that differ in any one of their four words (as tests' made-up ones
    /// do) fold apart.
    #[test]
    fn page_hashes_key_maps_and_fold_apart_in_every_word() {
        use std::hash::BuildHasher;
        let b = std::hash::BuildHasherDefault::<PageHashHasher>::default();
        let mut seen = std::collections::HashSet::new();
        for word in 0..4 {
            for v in 1..=64u8 {
                let mut x = [0u8; 32];
                x[word * 8 + (v as usize % 8)] = v;
                assert!(
                    seen.insert(b.hash_one(PageHash::from_bytes(x))),
                    "{word} {v}"
                );
            }
        }
        let mut m: PageHashMap<u32> = PageHashMap::default();
        let real: Vec<PageHash> = (0u8..200)
            .map(|i| PageHash::of_page(&[i; PAGE_SIZE]))
            .collect();
        for (i, h) in real.iter().enumerate() {
            m.insert(*h, i as u32);
        }
        assert_eq!(m.len(), 200);
        assert!(real.iter().enumerate().all(|(i, h)| m[h] == i as u32));
        let set: PageHashSet = real.iter().copied().collect();
        assert!(set.contains(&real[7]));
        assert_eq!(
            b.hash_one(real[3]),
            b.hash_one(PageHash::of_page(&[3; PAGE_SIZE]))
        );
    }
    use proptest::prelude::*;

    fn page_from_seed(seed: u64) -> Box<Page> {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        for w in p.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        p
    }

    #[test]
    fn batch_kernel_matches_blake3_for_every_batch_length() {
        let pages: Vec<Box<Page>> = (0..37).map(page_from_seed).collect();
        for n in 0..pages.len() {
            let refs: Vec<&Page> = pages[..n].iter().map(|p| &**p).collect();
            let mut out = vec![PageHash::ZERO_PAGE; n];
            hash_pages(&refs, &mut out);
            for (p, h) in refs.iter().zip(&out) {
                assert_eq!(*h.as_bytes(), *blake3::hash(*p).as_bytes(), "batch of {n}");
            }
        }
    }

    #[test]
    fn keyed_batch_kernel_matches_blake3_keyed_hash_for_every_batch_length() {
        let pages: Vec<Box<Page>> = (0..37).map(page_from_seed).collect();
        let key: [u8; 32] = core::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0xa5);
        let k = ContentKey::keyed(key);
        for n in 0..pages.len() {
            let refs: Vec<&Page> = pages[..n].iter().map(|p| &**p).collect();
            let mut out = vec![PageHash::ZERO_PAGE; n];
            k.hash_pages(&refs, &mut out);
            for (p, h) in refs.iter().zip(&out) {
                assert_eq!(
                    *h.as_bytes(),
                    *blake3::keyed_hash(&key, *p).as_bytes(),
                    "batch of {n}"
                );
                assert_ne!(*h, PageHash::of_page(p), "keyed equals plain");
            }
        }
    }

    #[test]
    fn domains_name_equal_pages_differently_and_checks_tell_keys_apart() {
        let p = page_from_seed(3);
        let a = ContentKey::keyed([1; 32]);
        let b = ContentKey::keyed([2; 32]);
        assert_ne!(a.hash_page(&p), b.hash_page(&p));
        assert_ne!(a.hash_page(&p), ContentKey::CLUSTER.hash_page(&p));
        assert_eq!(ContentKey::CLUSTER.hash_page(&p), PageHash::of_page(&p));
        assert_ne!(a.check(), b.check());
        assert_eq!(a.check(), ContentKey::keyed([1; 32]).check());
        assert!(
            !format!("{a:?}").contains("1, 1"),
            "debug output shows the key"
        );
    }

    #[test]
    fn batch_kernel_handles_zero_and_repeated_pages() {
        let zero = Box::new([0u8; PAGE_SIZE]);
        let a = page_from_seed(7);
        let refs: Vec<&Page> = [&*zero, &*a, &*zero, &*a, &*a, &*zero, &*zero, &*a]
            .into_iter()
            .collect();
        let mut out = [PageHash::ZERO_PAGE; 8];
        hash_pages(&refs, &mut out);
        let hz = PageHash::of_page(&zero);
        let ha = PageHash::of_page(&a);
        assert_eq!(out, [hz, ha, hz, ha, ha, hz, hz, ha]);
        assert!(
            !hz.is_zero_page(),
            "the hash of a zero page is not the marker"
        );
    }

    proptest! {
        #[test]
        fn batch_kernel_matches_blake3_on_sparse_edits(
            edits in proptest::collection::vec((0usize..8, 0usize..PAGE_SIZE, any::<u8>()), 1..64)
        ) {
            let mut pages: Vec<Box<Page>> = (0..8).map(|_| Box::new([0u8; PAGE_SIZE])).collect();
            for (p, at, v) in edits {
                pages[p][at] = v;
            }
            let refs: Vec<&Page> = pages.iter().map(|p| &**p).collect();
            let mut out = [PageHash::ZERO_PAGE; 8];
            hash_pages(&refs, &mut out);
            for (p, h) in refs.iter().zip(out) {
                prop_assert_eq!(h, PageHash::of_page(p));
            }
        }

        #[test]
        fn keyed_batch_kernel_matches_blake3_on_any_key(
            key in any::<[u8; 32]>(),
            edits in proptest::collection::vec((0usize..8, 0usize..PAGE_SIZE, any::<u8>()), 1..32)
        ) {
            let mut pages: Vec<Box<Page>> = (0..8).map(|_| Box::new([0u8; PAGE_SIZE])).collect();
            for (p, at, v) in edits {
                pages[p][at] = v;
            }
            let refs: Vec<&Page> = pages.iter().map(|p| &**p).collect();
            let mut out = [PageHash::ZERO_PAGE; 8];
            let k = ContentKey::keyed(key);
            k.hash_pages(&refs, &mut out);
            for (p, h) in refs.iter().zip(out) {
                prop_assert_eq!(*h.as_bytes(), *blake3::keyed_hash(&key, *p).as_bytes());
            }
        }

        #[test]
        fn hex_round_trips(bytes in any::<[u8; 32]>()) {
            let h = PageHash::from_bytes(bytes);
            let s = h.to_string();
            prop_assert_eq!(s.len(), 64);
            prop_assert_eq!(s.parse::<PageHash>().unwrap(), h);
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(s in ".{0,80}") {
            let _ = s.parse::<PageHash>();
        }

        #[test]
        fn order_matches_byte_order_and_prefix(a in any::<[u8; 32]>(), b in any::<[u8; 32]>()) {
            let (ha, hb) = (PageHash::from_bytes(a), PageHash::from_bytes(b));
            prop_assert_eq!(ha.cmp(&hb), a.cmp(&b));
            if ha <= hb {
                prop_assert!(ha.prefix_u64() <= hb.prefix_u64());
            }
        }
    }

    #[test]
    fn zero_detection() {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        assert!(is_zero_page(&p));
        for at in [0, 1, 63, 64, 2047, 4095] {
            p[at] = 1;
            assert!(!is_zero_page(&p), "byte {at} set");
            p[at] = 0;
        }
    }

    #[test]
    fn parse_errors_name_the_problem() {
        assert_eq!(
            "abc".parse::<PageHash>(),
            Err(ParseHashError::Length {
                expected: 64,
                got: 3,
                unit: "hex digits"
            })
        );
        let mut s = "0".repeat(64);
        s.replace_range(5..6, "g");
        assert_eq!(
            s.parse::<PageHash>(),
            Err(ParseHashError::NotHex {
                found: 'g',
                position: 5
            })
        );
        assert!(PageHash::try_from(&[0u8; 31][..]).is_err());
    }
}
