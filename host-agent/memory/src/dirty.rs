//! Dirty page bitmaps.
//!
//! A [`DirtyBitmap`] is one bit per guest page, in the layout KVM's
//! `KVM_GET_DIRTY_LOG` returns (bit `i % 64` of word `i / 64` for page `i`),
//! so KVM's log merges in without conversion once its shape is checked. An
//! [`AtomicBitmap`] records host-side writes from many threads and is drained
//! into a `DirtyBitmap`.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::MemoryError;

fn words_for(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

/// One bit per page: set for pages that changed.
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// An empty bitmap for `pages` pages.
    pub fn new(pages: u64) -> Self {
        DirtyBitmap {
            words: vec![0; words_for(pages)],
            pages,
        }
    }

    /// A bitmap with every page set.
    pub fn full(pages: u64) -> Self {
        let mut b = DirtyBitmap {
            words: vec![u64::MAX; words_for(pages)],
            pages,
        };
        b.clear_tail();
        b
    }

    /// Adopts `words` (KVM's layout) as the bitmap of `pages` pages, after
    /// checking that the length fits and no bit lies beyond the last page.
    pub fn from_words(words: Vec<u64>, pages: u64) -> Result<Self, MemoryError> {
        let expected = words_for(pages);
        if words.len() != expected {
            return Err(MemoryError::BitmapShape {
                got: words.len(),
                expected,
                pages,
            });
        }
        let b = DirtyBitmap { words, pages };
        if let Some(frame) = b.first_overrun() {
            return Err(MemoryError::BitmapOverrun { frame, pages });
        }
        Ok(b)
    }

    fn first_overrun(&self) -> Option<u64> {
        let tail = self.pages % 64;
        if tail == 0 {
            return None;
        }
        let last = *self.words.last()?;
        let over = last & !((1u64 << tail) - 1);
        (over != 0).then(|| (self.words.len() as u64 - 1) * 64 + over.trailing_zeros() as u64)
    }

    fn clear_tail(&mut self) {
        let tail = self.pages % 64;
        if let (true, Some(last)) = (tail != 0, self.words.last_mut()) {
            *last &= (1u64 << tail) - 1;
        }
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The raw words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Marks page `frame`.
    pub fn set(&mut self, frame: u64) -> Result<(), MemoryError> {
        if frame >= self.pages {
            return Err(MemoryError::FrameOutOfRange {
                frame,
                pages: self.pages,
            });
        }
        self.words[(frame / 64) as usize] |= 1 << (frame % 64);
        Ok(())
    }

    /// Unmarks page `frame` (out-of-range frames are ignored).
    pub fn clear(&mut self, frame: u64) {
        if frame < self.pages {
            self.words[(frame / 64) as usize] &= !(1 << (frame % 64));
        }
    }

    /// Whether page `frame` is marked (false beyond the end).
    pub fn get(&self, frame: u64) -> bool {
        frame < self.pages && self.words[(frame / 64) as usize] & (1 << (frame % 64)) != 0
    }

    /// Number of marked pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no page is marked.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Adds every page marked in `other`, which must cover as many pages.
    pub fn merge(&mut self, other: &DirtyBitmap) -> Result<(), MemoryError> {
        if other.pages != self.pages {
            return Err(MemoryError::BitmapShape {
                got: other.words.len(),
                expected: self.words.len(),
                pages: self.pages,
            });
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        Ok(())
    }

    /// Removes every page marked in `other`.
    pub fn subtract(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !b;
        }
    }

    /// Marked pages in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(i as u64 * 64 + bit)
            })
        })
    }

    /// Maximal runs of consecutive marked pages, in increasing order.
    pub fn ranges(&self) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for frame in self.iter() {
            match out.last_mut() {
                Some(r) if r.end == frame => r.end += 1,
                _ => out.push(frame..frame + 1),
            }
        }
        out
    }
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("pages", &self.pages)
            .field("dirty", &self.count())
            .field("ranges", &self.ranges())
            .finish()
    }
}

/// A dirty bitmap many threads can mark at once.
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl AtomicBitmap {
    /// An empty bitmap for `pages` pages.
    pub fn new(pages: u64) -> Self {
        AtomicBitmap {
            words: (0..words_for(pages)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Marks page `frame`.
    pub fn mark(&self, frame: u64) -> Result<(), MemoryError> {
        if frame >= self.pages {
            return Err(MemoryError::FrameOutOfRange {
                frame,
                pages: self.pages,
            });
        }
        self.words[(frame / 64) as usize].fetch_or(1 << (frame % 64), Ordering::AcqRel);
        Ok(())
    }

    /// Marks every page marked in `pages`, which must cover as many pages.
    pub fn mark_all(&self, pages: &DirtyBitmap) -> Result<(), MemoryError> {
        if pages.pages != self.pages {
            return Err(MemoryError::BitmapShape {
                got: pages.words.len(),
                expected: self.words.len(),
                pages: self.pages,
            });
        }
        for (a, &b) in self.words.iter().zip(&pages.words) {
            if b != 0 {
                a.fetch_or(b, Ordering::AcqRel);
            }
        }
        Ok(())
    }

    /// Takes the marks, leaving the bitmap empty. Each word is swapped
    /// atomically, so a concurrent mark lands in this result or the next.
    pub fn take(&self) -> DirtyBitmap {
        DirtyBitmap {
            words: self
                .words
                .iter()
                .map(|w| w.swap(0, Ordering::AcqRel))
                .collect(),
            pages: self.pages,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn from_set(pages: u64, set: &BTreeSet<u64>) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(pages);
        for &f in set {
            b.set(f).unwrap();
        }
        b
    }

    proptest! {
        #[test]
        fn merge_matches_set_union(
            pages in 1u64..700,
            a in proptest::collection::btree_set(0u64..700, 0..80),
            b in proptest::collection::btree_set(0u64..700, 0..80),
        ) {
            let a: BTreeSet<u64> = a.into_iter().filter(|&f| f < pages).collect();
            let b: BTreeSet<u64> = b.into_iter().filter(|&f| f < pages).collect();
            let mut m = from_set(pages, &a);
            m.merge(&from_set(pages, &b)).unwrap();
            let union: Vec<u64> = a.union(&b).copied().collect();
            prop_assert_eq!(m.iter().collect::<Vec<_>>(), union.clone());
            prop_assert_eq!(m.count(), union.len() as u64);
            // Ranges cover exactly the union, are maximal and sorted.
            let ranges = m.ranges();
            let flat: Vec<u64> = ranges.iter().flat_map(|r| r.clone()).collect();
            prop_assert_eq!(flat, union);
            for w in ranges.windows(2) {
                prop_assert!(w[0].end < w[1].start);
            }
            let mut s = m.clone();
            s.subtract(&from_set(pages, &b));
            let diff: Vec<u64> = a.difference(&b).copied().collect();
            prop_assert_eq!(s.iter().collect::<Vec<_>>(), diff);
        }

        #[test]
        fn atomic_take_and_remark_lose_nothing(
            pages in 1u64..500,
            marks in proptest::collection::vec(0u64..500, 0..100),
            failed in proptest::collection::vec(0u64..500, 0..20),
        ) {
            let bits = AtomicBitmap::new(pages);
            let mut want = BTreeSet::new();
            for f in marks {
                if f < pages {
                    bits.mark(f).unwrap();
                    want.insert(f);
                } else {
                    prop_assert!(bits.mark(f).is_err());
                }
            }
            let taken = bits.take();
            prop_assert_eq!(taken.iter().collect::<BTreeSet<_>>(), want);
            prop_assert!(bits.take().is_empty());
            // Pages whose send failed go back and come out again.
            let failed: BTreeSet<u64> = failed.into_iter().filter(|&f| f < pages).collect();
            bits.mark_all(&from_set(pages, &failed)).unwrap();
            prop_assert_eq!(bits.take().iter().collect::<BTreeSet<_>>(), failed);
        }

        #[test]
        fn from_words_checks_shape(pages in 1u64..300, extra in 0usize..3, word in any::<u64>()) {
            let n = pages.div_ceil(64) as usize;
            let mut words = vec![0u64; n + extra];
            words[n - 1] = word;
            let r = DirtyBitmap::from_words(words, pages);
            let tail = pages % 64;
            let overruns = tail != 0 && word >> tail != 0;
            prop_assert_eq!(r.is_ok(), extra == 0 && !overruns);
        }
    }

    #[test]
    fn full_has_exactly_pages_bits() {
        for pages in [1, 63, 64, 65, 130] {
            let f = DirtyBitmap::full(pages);
            assert_eq!(f.count(), pages);
            assert_eq!(f.ranges(), vec![0..pages]);
        }
    }
}
