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

    /// Adds `delta` frames for `host`, stopping at zero (the host is then
    /// removed) and at `u64::MAX`; a new holder past [`MAX_HOLDERS`] is
    /// left out.
    pub fn apply_saturating(&mut self, host: u32, delta: i64) {
        match self.0.binary_search_by_key(&host, |e| e.0) {
            Ok(i) => {
                let cur = self.0[i].1;
                let new = if delta < 0 {
                    cur.saturating_sub(delta.unsigned_abs())
                } else {
                    cur.saturating_add(delta as u64)
                };
                if new == 0 {
                    self.0.remove(i);
                } else {
                    self.0[i].1 = new;
                }
            }
            Err(i) => {
                if delta > 0 && self.0.len() < MAX_HOLDERS {
                    self.0.insert(i, (host, delta as u64));
                }
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

/// A holder list's change as RocksDB's merge operator carries it: the
/// `(host, delta)` pairs one apply made to one content, in order, each as
/// a LEB128 host and a zigzag LEB128 delta. Applying deltas this way never
/// reads the list; RocksDB folds the changes into it when it is read or
/// compacted ([`merge`]). Two change lists concatenated are the change
/// list of both, in order, which is how partial merges combine them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes(Vec<u8>);

impl Changes {
    /// Appends `delta` frames for `host`.
    pub fn push(&mut self, host: u32, delta: i64) {
        put_varint(&mut self.0, u64::from(host));
        put_varint(&mut self.0, ((delta << 1) ^ (delta >> 63)) as u64);
    }

    /// Empties the list, keeping its buffer.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// The encoded operand.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// True when nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Reads a change list's `(host, delta)` pairs, calling `f` for each.
pub fn for_each_change(b: &[u8], mut f: impl FnMut(u32, i64)) -> Result<(), HolderError> {
    let mut at = 0;
    while at < b.len() {
        let host = get_varint(b, &mut at, 32)? as u32;
        let z = get_varint(b, &mut at, 64)?;
        f(host, ((z >> 1) as i64) ^ -((z & 1) as i64));
    }
    Ok(())
}

/// Folds change lists into a stored holder list (`None`: no list yet), in
/// order, and returns the new list's encoding (empty: no holder left).
///
/// Every replica applies the same changes in the same order, so the result
/// is the same on each whenever RocksDB folds them. A change that would
/// take a count below zero takes it to zero (the index no longer refuses
/// it, having read nothing; the writer's own sum check then differs and it
/// lists what the index holds); one past `u64::MAX` stops there; a new
/// holder past [`MAX_HOLDERS`] is left out.
pub fn merge<'a>(
    base: Option<&[u8]>,
    changes: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<u8>, HolderError> {
    let mut l = match base {
        Some(b) => HolderList::decode(b)?,
        None => HolderList::default(),
    };
    for c in changes {
        for_each_change(c, |host, delta| l.apply_saturating(host, delta))?;
    }
    Ok(l.encode())
}

/// What one host holds in one shard, summed: distinct contents, frames,
/// and an order-independent digest of its `(hash, frames)` pairs (the sum,
/// modulo 2^128, of each held content's [`holding_term`] times its frames).
/// The index keeps one per shard and host, updated by every delta without
/// reading any holder list; an agent computes the same over what it
/// believes the index holds for it, so one small read tells whether the
/// two agree ([`HoldingSum::same_holdings`]), without listing anything.
///
/// `frames` and `digest` are linear in the deltas, so the index keeps them
/// exactly from the deltas alone. `distinct` is not: the index keeps it
/// from each delta's `before`, the writer's own account of the frames it
/// held, so it is what the writers say; it counts, it does not check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldingSum {
    /// Contents held in at least one frame (by the writers' account).
    pub distinct: u64,
    /// Frames, summed over contents.
    pub frames: u64,
    /// Sum of [`holding_term`] times frames over every held content.
    pub digest: u128,
}

/// One page of a host's holdings in a shard: `(hash, frames)` pairs in
/// hash order, and the hash to continue after (`None`: the last page).
pub type HoldingsPage = (Vec<(crate::PageHash, u64)>, Option<crate::PageHash>);

/// Bytes of an encoded [`HoldingSum`].
pub const HOLDING_SUM_BYTES: usize = 32;

/// The digest term of content `hash`: its last 16 bytes. A BLAKE3 output
/// is already uniform, and its first bytes choose the shard, so the tail
/// is used; no hashing is spent per delta.
pub fn holding_term(hash: &[u8; 32]) -> u128 {
    u128::from_le_bytes(hash[16..].try_into().expect("16 bytes"))
}

impl HoldingSum {
    /// Accounts for `hash` going from `before` to `after` frames.
    pub fn change(&mut self, hash: &[u8; 32], before: u64, after: u64) {
        if before == after {
            return;
        }
        match (before > 0, after > 0) {
            (false, true) => self.distinct = self.distinct.wrapping_add(1),
            (true, false) => self.distinct = self.distinct.wrapping_sub(1),
            _ => {}
        }
        self.frames = self.frames.wrapping_sub(before).wrapping_add(after);
        let d = after.wrapping_sub(before) as u128;
        // (after - before) mod 2^128 times the term: two's complement of a
        // negative difference, sign-extended, is its value mod 2^128.
        let d = if after < before {
            d | !(u64::MAX as u128)
        } else {
            d
        };
        self.digest = self.digest.wrapping_add(d.wrapping_mul(holding_term(hash)));
    }

    /// True when the frames and digest agree: the same contents in the same
    /// counts, whatever `distinct` says (that one is the writers' account).
    pub fn same_holdings(&self, other: &HoldingSum) -> bool {
        self.frames == other.frames && self.digest == other.digest
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

    proptest! {
        /// Folding change lists, however RocksDB groups them (partial
        /// merges concatenate), gives what applying every change in order
        /// to the list gives.
        #[test]
        fn merging_is_applying_in_order(
            base in proptest::collection::vec((0u32..20, 1i64..9), 0..10),
            ops in proptest::collection::vec((0u32..20, -12i64..12), 0..120),
            cuts in proptest::collection::vec(0usize..120, 0..8),
            joins in proptest::collection::vec(any::<bool>(), 0..8),
        ) {
            let mut start = HolderList::default();
            for (h, d) in base {
                start.apply_saturating(h, d);
            }
            let mut model = start.clone();
            for &(h, d) in &ops {
                model.apply_saturating(h, d);
            }
            // Cut the changes into operands, then concatenate some
            // neighbours as a partial merge would.
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|c| *c < ops.len()).collect();
            cuts.push(ops.len());
            cuts.sort_unstable();
            cuts.dedup();
            let mut operands: Vec<Vec<u8>> = Vec::new();
            let mut at = 0;
            for (i, c) in cuts.into_iter().enumerate() {
                let mut ch = Changes::default();
                for &(h, d) in &ops[at..c] {
                    ch.push(h, d);
                }
                at = c;
                if joins.get(i).copied().unwrap_or(false) && !operands.is_empty() {
                    operands.last_mut().unwrap().extend_from_slice(ch.as_bytes());
                } else {
                    operands.push(ch.as_bytes().to_vec());
                }
            }
            let base_bytes = start.encode();
            let got = merge(
                (!start.is_empty()).then_some(&base_bytes[..]),
                operands.iter().map(|o| &o[..]),
            ).unwrap();
            prop_assert_eq!(HolderList::decode(&got).unwrap(), model);
        }

        #[test]
        fn change_lists_round_trip_and_garbage_never_panics(
            ops in proptest::collection::vec((any::<u32>(), any::<i64>()), 0..40),
            junk in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut ch = Changes::default();
            for &(h, d) in &ops {
                ch.push(h, d);
            }
            let mut back = Vec::new();
            for_each_change(ch.as_bytes(), |h, d| back.push((h, d))).unwrap();
            prop_assert_eq!(back, ops);
            let _ = for_each_change(&junk, |_, _| {});
            let _ = merge(Some(&junk[..]), [&junk[..]]);
        }
    }

    #[test]
    fn counts_stop_at_zero_and_at_the_top() {
        let mut l = HolderList::default();
        l.apply_saturating(4, -3);
        assert!(l.is_empty(), "no holder appears from a removal");
        l.apply_saturating(4, 2);
        l.apply_saturating(4, -5);
        assert!(l.is_empty(), "a count below zero is zero");
        l.apply_saturating(4, i64::MAX);
        l.apply_saturating(4, i64::MAX);
        l.apply_saturating(4, i64::MAX);
        assert_eq!(l.frames_of(4), u64::MAX);
        l.apply_saturating(4, i64::MIN);
        assert_eq!(l.frames_of(4), u64::MAX - (1 << 63));
        assert_eq!(merge(Some(&[1, 0][..]), []), Err(HolderError::Zero(1)));
        assert_eq!(merge(None, [&[0x80][..]]), Err(HolderError::Truncated(0)));
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
        // Frames and digest are linear: the same changes through other
        // counts (or a wrong account of `before`) give the same two.
        let mut d = HoldingSum::default();
        d.change(&hs[0], 5, 9);
        d.change(&hs[0], 9, 6);
        let mut e = HoldingSum::default();
        e.change(&hs[0], 0, 1);
        assert!(d.same_holdings(&e) && d.distinct != e.distinct);
        let mut f = e;
        f.change(&hs[1], 0, 1);
        f.change(&hs[2], 2, 1);
        assert!(!f.same_holdings(&e), "a missed content shows");
    }
}
