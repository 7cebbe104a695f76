//! The value stored under a hash: which hosts hold that content, and in how
//! many guest frames each.
//!
//! Encoded as LEB128 pairs `(host gap, frames)` in increasing host order,
//! where the gap is the host number minus the previous one (the first is
//! the number itself). One holder with a few frames takes 2 or 3 bytes.
//! Decoding refuses anything [`HolderList::encode`] cannot produce: hosts
//! not strictly increasing, zero frames, overlong varints, trailing bytes,
//! more than [`MAX_HOLDERS`] entries.

/// Most holders one hash may have (one per host).
pub const MAX_HOLDERS: usize = 1 << 16;

/// Why a stored holder list is unreadable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HolderError {
    /// The bytes end inside a number.
    #[error("holder list truncated at byte {0}")]
    Truncated(usize),
    /// A number is longer than its type allows.
    #[error("holder list has an overlong number at byte {0}")]
    Overlong(usize),
    /// Hosts are not in strictly increasing order.
    #[error("holder list hosts out of order at byte {0}")]
    Order(usize),
    /// A holder with no frames.
    #[error("holder list has a host holding zero frames at byte {0}")]
    Zero(usize),
    /// Too many holders.
    #[error("holder list has more than {MAX_HOLDERS} holders")]
    TooMany,
}

/// The holders of one content: `(host, frames)` with hosts increasing and
/// frames non-zero.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HolderList(Vec<(u32, u64)>);

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &[u8], at: &mut usize, max_bits: u32) -> Result<u64, HolderError> {
    let start = *at;
    let mut v = 0u64;
    let mut shift = 0u32;
    loop {
        let Some(&byte) = b.get(*at) else {
            return Err(HolderError::Truncated(start));
        };
        *at += 1;
        let part = u64::from(byte & 0x7f);
        if shift >= max_bits || (shift > 0 && part >> (max_bits - shift) != 0) {
            return Err(HolderError::Overlong(start));
        }
        v |= part << shift;
        if byte & 0x80 == 0 {
            // A final zero byte after the first is a non-canonical encoding.
            if byte == 0 && shift > 0 {
                return Err(HolderError::Overlong(start));
            }
            return Ok(v);
        }
        shift += 7;
    }
}

impl HolderList {
    /// The holders, hosts increasing.
    pub fn entries(&self) -> &[(u32, u64)] {
        &self.0
    }

    /// True when no host holds the content.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Frames held by `host`.
    pub fn frames_of(&self, host: u32) -> u64 {
        self.0
            .binary_search_by_key(&host, |e| e.0)
            .map_or(0, |i| self.0[i].1)
    }

    /// Adds `delta` frames (possibly negative) for `host`; a count that
    /// reaches zero removes the host. Returns `false`, changing nothing, if
    /// the delta would take the count below zero or past `u64::MAX`.
    pub fn apply(&mut self, host: u32, delta: i64) -> bool {
        match self.0.binary_search_by_key(&host, |e| e.0) {
            Ok(i) => {
                let cur = self.0[i].1;
                let Some(new) = cur.checked_add_signed(delta) else {
                    return false;
                };
                if new == 0 {
                    self.0.remove(i);
                } else {
                    self.0[i].1 = new;
                }
                true
            }
            Err(i) => {
                if delta < 0 {
                    return false;
                }
                if delta > 0 {
                    if self.0.len() >= MAX_HOLDERS {
                        return false;
                    }
                    self.0.insert(i, (host, delta as u64));
                }
                true
            }
        }
    }

    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * 3);
        let mut prev = 0u32;
        for (i, &(host, frames)) in self.0.iter().enumerate() {
            let gap = if i == 0 { host } else { host - prev };
            put_varint(&mut out, u64::from(gap));
            put_varint(&mut out, frames);
            prev = host;
        }
        out
    }

    /// Reads a stored list.
    pub fn decode(b: &[u8]) -> Result<Self, HolderError> {
        let mut at = 0;
        let mut out: Vec<(u32, u64)> = Vec::new();
        while at < b.len() {
            if out.len() >= MAX_HOLDERS {
                return Err(HolderError::TooMany);
            }
            let start = at;
            let gap = get_varint(b, &mut at, 32)? as u32;
            let host = match out.last() {
                None => gap,
                Some(&(prev, _)) => {
                    if gap == 0 {
                        return Err(HolderError::Order(start));
                    }
                    prev.checked_add(gap).ok_or(HolderError::Order(start))?
                }
            };
            let frames_at = at;
            let frames = get_varint(b, &mut at, 64)?;
            if frames == 0 {
                return Err(HolderError::Zero(frames_at));
            }
            out.push((host, frames));
        }
        Ok(HolderList(out))
    }
}

/// What one host holds in one shard, summed: distinct contents, frames,
/// and an order-independent digest of its `(hash, frames)` pairs (the sum,
/// modulo 2^128, of a keyed BLAKE3 of each pair). The index keeps one per
/// shard and host, updated by every delta; an agent computes the same over
/// what it believes the index holds for it, so one small read tells
/// whether the two agree, without listing anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldingSum {
    /// Contents held in at least one frame.
    pub distinct: u64,
    /// Frames, summed over contents.
    pub frames: u64,
    /// Sum of [`holding_term`] over every held pair.
    pub digest: u128,
}

/// One page of a host's holdings in a shard: `(hash, frames)` pairs in
/// hash order, and the hash to continue after (`None`: the last page).
pub type HoldingsPage = (Vec<(crate::PageHash, u64)>, Option<crate::PageHash>);

/// Bytes of an encoded [`HoldingSum`].
pub const HOLDING_SUM_BYTES: usize = 32;

/// The digest term of one held pair: content `hash` in `frames` frames.
pub fn holding_term(hash: &[u8; 32], frames: u64) -> u128 {
    let mut h = blake3::Hasher::new_keyed(&HOLDING_KEY);
    h.update(hash);
    h.update(&frames.to_le_bytes());
    u128::from_le_bytes(h.finalize().as_bytes()[..16].try_into().expect("16 bytes"))
}

const HOLDING_KEY: [u8; 32] = *b"pagecast holding digest, v1 ....";

impl HoldingSum {
    /// Accounts for `hash` going from `before` to `after` frames.
    pub fn change(&mut self, hash: &[u8; 32], before: u64, after: u64) {
        if before == after {
            return;
        }
        if before > 0 {
            self.distinct -= 1;
            self.frames -= before;
            self.digest = self.digest.wrapping_sub(holding_term(hash, before));
        }
        if after > 0 {
            self.distinct += 1;
            self.frames += after;
            self.digest = self.digest.wrapping_add(holding_term(hash, after));
        }
    }

    /// The 32-byte encoding (little-endian distinct, frames, digest).
    pub fn encode(&self) -> [u8; HOLDING_SUM_BYTES] {
        let mut b = [0u8; HOLDING_SUM_BYTES];
        b[..8].copy_from_slice(&self.distinct.to_le_bytes());
        b[8..16].copy_from_slice(&self.frames.to_le_bytes());
        b[16..].copy_from_slice(&self.digest.to_le_bytes());
        b
    }

    /// Decodes [`HoldingSum::encode`]'s bytes.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != HOLDING_SUM_BYTES {
            return None;
        }
        Some(HoldingSum {
            distinct: u64::from_le_bytes(b[..8].try_into().ok()?),
            frames: u64::from_le_bytes(b[8..16].try_into().ok()?),
            digest: u128::from_le_bytes(b[16..].try_into().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_small_holder_takes_two_bytes() {
        let mut l = HolderList::default();
        assert!(l.apply(3, 5));
        assert_eq!(l.encode(), vec![3, 5]);
        assert!(l.apply(3, -5));
        assert!(l.is_empty());
        assert!(l.encode().is_empty());
    }

    #[test]
    fn counts_never_go_negative() {
        let mut l = HolderList::default();
        assert!(!l.apply(1, -1));
        assert!(l.apply(1, 2));
        assert!(!l.apply(1, -3));
        assert_eq!(l.frames_of(1), 2);
        assert!(l.apply(1, 0));
        assert!(l.apply(2, 0));
        assert_eq!(l.entries(), &[(1, 2)]);
    }

    #[test]
    fn refuses_what_encode_cannot_produce() {
        assert_eq!(HolderList::decode(&[1]), Err(HolderError::Truncated(1)));
        assert_eq!(HolderList::decode(&[0x80]), Err(HolderError::Truncated(0)));
        assert_eq!(HolderList::decode(&[1, 0]), Err(HolderError::Zero(1)));
        assert_eq!(
            HolderList::decode(&[1, 1, 0, 1]),
            Err(HolderError::Order(2))
        );
        assert_eq!(
            HolderList::decode(&[0x81, 0x00, 1]),
            Err(HolderError::Overlong(0))
        );
        assert_eq!(
            HolderList::decode(&[0xff, 0xff, 0xff, 0xff, 0x1f, 1]),
            Err(HolderError::Overlong(0))
        );
        assert!(HolderList::decode(&[0xff, 0xff, 0xff, 0xff, 0x0f, 1]).is_ok());
    }

    proptest! {
        #[test]
        fn round_trips(ops in proptest::collection::vec((0u32..50, -5i64..20), 0..200)) {
            let mut l = HolderList::default();
            let mut model = std::collections::BTreeMap::<u32, u64>::new();
            for (h, d) in ops {
                let cur = model.get(&h).copied().unwrap_or(0);
                let ok = l.apply(h, d);
                prop_assert_eq!(ok, cur as i64 + d >= 0);
                if ok {
                    let new = (cur as i64 + d) as u64;
                    if new == 0 { model.remove(&h); } else { model.insert(h, new); }
                }
            }
            let want: Vec<(u32, u64)> = model.into_iter().collect();
            prop_assert_eq!(l.entries(), &want[..]);
            prop_assert_eq!(HolderList::decode(&l.encode()), Ok(l));
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(l) = HolderList::decode(&b) {
                prop_assert_eq!(l.encode(), b);
            }
        }
    }

    #[test]
    fn holding_sums_do_not_depend_on_order_and_undo_exactly() {
        let hs: Vec<[u8; 32]> = (0u8..50).map(|i| [i; 32]).collect();
        let mut a = HoldingSum::default();
        for (i, h) in hs.iter().enumerate() {
            a.change(h, 0, i as u64 % 3 + 1);
        }
        let mut b = HoldingSum::default();
        for (i, h) in hs.iter().enumerate().rev() {
            b.change(h, 0, 7);
            b.change(h, 7, i as u64 % 3 + 1);
        }
        assert_eq!(a, b);
        assert_eq!(a.distinct, 50);
        let mut c = a;
        c.change(&hs[3], 1, 2);
        assert_ne!(c, a, "a changed count changes the digest");
        c.change(&hs[3], 2, 1);
        assert_eq!(c, a);
        for (i, h) in hs.iter().enumerate() {
            c.change(h, i as u64 % 3 + 1, 0);
        }
        assert_eq!(c, HoldingSum::default());
        assert_eq!(HoldingSum::decode(&a.encode()), Some(a));
        assert_eq!(HoldingSum::decode(&[0; 31]), None);
    }
}
