//! The snapshot of one shard's state machine: every record of its holder
//! keys and of its meta keys, as raft carries it to a follower that is too
//! far behind for the log.
//!
//! Layout, in decode order, repeated to the end of the bytes:
//!
//! ```text
//! tag        u8        1: holders column, 2: meta column
//! key_len    u16 LE
//! key        key_len bytes
//! value_len  u32 LE
//! value      value_len bytes
//! ```
//!
//! A follower checks every record before it writes anything: the bytes end
//! only between records, the tag is known, a holder key is a whole
//! 33-byte holder key inside the shard's range and its value a holder list
//! that decodes, a meta key lies inside one of the shard's meta ranges
//! ([`keys::meta_ranges`]). Meta values are checked where they are read.

use crate::holders::{HolderError, HolderList};
use crate::keys;

/// Which column family a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// Holder lists, by content hash.
    Holders,
    /// Applied state, sessions, holding totals, hosts and VMs.
    Meta,
}

impl Column {
    fn tag(self) -> u8 {
        match self {
            Column::Holders => 1,
            Column::Meta => 2,
        }
    }
}

/// One record of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Its column.
    pub column: Column,
    /// Its key.
    pub key: &'a [u8],
    /// Its value.
    pub value: &'a [u8],
}

/// Why a snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The bytes end inside a record.
    #[error("record at byte {at}: truncated {what}")]
    Truncated {
        /// Where the record starts.
        at: usize,
        /// Which field is cut.
        what: &'static str,
    },
    /// A tag that is neither column.
    #[error("record at byte {at}: unknown column tag {tag}")]
    Tag {
        /// Where the record starts.
        at: usize,
        /// The tag.
        tag: u8,
    },
    /// A key outside the shard, or a malformed holder key.
    #[error("record at byte {at}: key outside shard {shard}")]
    Outside {
        /// Where the record starts.
        at: usize,
        /// The shard being restored.
        shard: u32,
    },
    /// A holder list that does not decode.
    #[error("record at byte {at}: bad holder list: {source}")]
    Holders {
        /// Where the record starts.
        at: usize,
        /// What the decoder said.
        #[source]
        source: HolderError,
    },
}

/// Appends one record.
///
/// # Panics
/// If the key is longer than 65,535 bytes or the value than 4 GiB (no
/// key or value of the index is).
pub fn encode_record(out: &mut Vec<u8>, column: Column, key: &[u8], value: &[u8]) {
    out.push(column.tag());
    out.extend_from_slice(
        &u16::try_from(key.len())
            .expect("key fits u16")
            .to_le_bytes(),
    );
    out.extend_from_slice(key);
    out.extend_from_slice(
        &u32::try_from(value.len())
            .expect("value fits u32")
            .to_le_bytes(),
    );
    out.extend_from_slice(value);
}

/// The records of `data`, a snapshot of `shard` of `shards`, each checked;
/// stops at the first error.
pub fn records(shard: u32, shards: u32, data: &[u8]) -> Records<'_> {
    Records {
        data,
        at: 0,
        shard,
        holders: keys::holders_range(shard, shards),
        meta: keys::meta_ranges(shard),
        failed: false,
    }
}

/// Iterator of [`records`].
#[derive(Debug)]
pub struct Records<'a> {
    data: &'a [u8],
    at: usize,
    shard: u32,
    holders: (Vec<u8>, Vec<u8>),
    meta: Vec<(Vec<u8>, Vec<u8>)>,
    failed: bool,
}

impl<'a> Records<'a> {
    fn field(
        &mut self,
        len: usize,
        start: usize,
        what: &'static str,
    ) -> Result<&'a [u8], SnapshotError> {
        let end = self.at.checked_add(len);
        let f = end
            .and_then(|e| self.data.get(self.at..e))
            .ok_or(SnapshotError::Truncated { at: start, what })?;
        self.at += len;
        Ok(f)
    }

    fn next_record(&mut self) -> Result<Record<'a>, SnapshotError> {
        let start = self.at;
        let tag = self.field(1, start, "tag")?[0];
        let klen = self.field(2, start, "key length")?;
        let klen = usize::from(u16::from_le_bytes([klen[0], klen[1]]));
        let key = self.field(klen, start, "key")?;
        let vlen = self.field(4, start, "value length")?;
        let vlen = u32::from_le_bytes([vlen[0], vlen[1], vlen[2], vlen[3]]) as usize;
        let value = self.field(vlen, start, "value")?;
        let inside = |(lo, hi): &(Vec<u8>, Vec<u8>)| key >= &lo[..] && key < &hi[..];
        let outside = SnapshotError::Outside {
            at: start,
            shard: self.shard,
        };
        let column = match tag {
            1 => {
                if keys::parse_holders(key).is_none() || !inside(&self.holders) {
                    return Err(outside);
                }
                HolderList::decode(value)
                    .map_err(|source| SnapshotError::Holders { at: start, source })?;
                Column::Holders
            }
            2 => {
                if !self.meta.iter().any(inside) {
                    return Err(outside);
                }
                Column::Meta
            }
            tag => return Err(SnapshotError::Tag { at: start, tag }),
        };
        Ok(Record { column, key, value })
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, SnapshotError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.at >= self.data.len() {
            return None;
        }
        let r = self.next_record();
        self.failed = r.is_err();
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagecast_pages::PageHash;
    use proptest::prelude::*;

    fn holder_key(first: u8) -> Vec<u8> {
        let mut h = [7u8; 32];
        h[0] = first;
        keys::holders(&PageHash::from_bytes(h)).to_vec()
    }

    fn one_holder() -> Vec<u8> {
        let mut l = HolderList::default();
        l.apply(3, 2);
        l.encode()
    }

    #[test]
    fn records_round_trip_and_refusals_name_the_record() {
        // Shard 0 of 2 owns hashes with a first byte below 0x80.
        let mut snap = Vec::new();
        encode_record(&mut snap, Column::Holders, &holder_key(0x10), &one_holder());
        let second = snap.len();
        encode_record(&mut snap, Column::Meta, &keys::applied(0), b"applied");
        let got: Vec<Record> = records(0, 2, &snap).map(Result::unwrap).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].column, Column::Holders);
        assert_eq!(got[1].value, b"applied");

        // The same holder record is outside shard 1.
        let e = records(1, 2, &snap).next().unwrap().unwrap_err();
        assert_eq!(e, SnapshotError::Outside { at: 0, shard: 1 });
        // Cut anywhere inside the second record: truncated, at its start.
        for cut in second + 1..snap.len() {
            let r: Vec<_> = records(0, 2, &snap[..cut]).collect();
            assert!(r[0].is_ok());
            assert!(
                matches!(r[1], Err(SnapshotError::Truncated { at, .. }) if at == second),
                "cut at {cut}: {:?}",
                r[1]
            );
        }
        let mut bad = snap.clone();
        bad[0] = 9;
        assert_eq!(
            records(0, 2, &bad).next().unwrap(),
            Err(SnapshotError::Tag { at: 0, tag: 9 })
        );
        // A short key inside the holders range is not a holder key.
        let mut short = Vec::new();
        encode_record(
            &mut short,
            Column::Holders,
            &holder_key(0x10)[..3],
            &one_holder(),
        );
        assert!(matches!(
            records(0, 2, &short).next(),
            Some(Err(SnapshotError::Outside { .. }))
        ));
        // A holder list that does not decode.
        let mut garbage = Vec::new();
        encode_record(&mut garbage, Column::Holders, &holder_key(0x10), &[0xff; 3]);
        assert!(matches!(
            records(0, 2, &garbage).next(),
            Some(Err(SnapshotError::Holders { at: 0, .. }))
        ));
    }

    proptest! {
        #[test]
        fn garbage_never_panics_and_stops_at_the_first_error(
            data in proptest::collection::vec(any::<u8>(), 0..400),
            shard in 0u32..4,
        ) {
            let mut errors = 0;
            for r in records(shard, 4, &data) {
                prop_assert_eq!(errors, 0, "nothing after an error");
                if r.is_err() {
                    errors += 1;
                }
            }
        }
    }
}
