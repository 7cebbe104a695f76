//! Page hashes packed back to back, 32 bytes each, as the wire carries
//! lists of them (a `bytes` field): the one packing and the one checked
//! unpacking every crate uses.

use crate::PageHash;

/// Why packed hashes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackedError {
    /// Bytes that are not whole hashes.
    #[error("{len} bytes of hashes is not a whole number of 32-byte hashes")]
    Length {
        /// Bytes received.
        len: usize,
    },
    /// More hashes than allowed.
    #[error("{count} hashes, over the limit of {max}")]
    TooMany {
        /// Hashes received.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// The hashes, packed.
pub fn pack(hashes: &[PageHash]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hashes.len() * 32);
    pack_into(&mut out, hashes);
    out
}

/// Appends the hashes, packed, to `out`.
pub fn pack_into(out: &mut Vec<u8>, hashes: &[PageHash]) {
    for h in hashes {
        out.extend_from_slice(h.as_bytes());
    }
}

/// The hashes in `bytes`, at most `max` of them; checked before anything
/// is allocated.
pub fn unpack(bytes: &[u8], max: usize) -> Result<Vec<PageHash>, PackedError> {
    Ok(iter(bytes, max)?.collect())
}

/// The hashes in `bytes`, at most `max`, one at a time.
pub fn iter(
    bytes: &[u8],
    max: usize,
) -> Result<impl ExactSizeIterator<Item = PageHash> + '_, PackedError> {
    if !bytes.len().is_multiple_of(32) {
        return Err(PackedError::Length { len: bytes.len() });
    }
    let count = bytes.len() / 32;
    if count > max {
        return Err(PackedError::TooMany { count, max });
    }
    Ok(bytes
        .chunks_exact(32)
        .map(|h| PageHash::from_bytes(h.try_into().expect("chunks of 32 bytes"))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refusals_name_the_problem() {
        assert_eq!(unpack(&[0; 33], 10), Err(PackedError::Length { len: 33 }));
        assert_eq!(
            unpack(&[0; 96], 2),
            Err(PackedError::TooMany { count: 3, max: 2 })
        );
        assert_eq!(unpack(&[], 0), Ok(Vec::new()));
    }

    proptest! {
        #[test]
        fn unpack_undoes_pack(raw in proptest::collection::vec(any::<[u8; 32]>(), 0..40)) {
            let hashes: Vec<PageHash> = raw.into_iter().map(PageHash::from_bytes).collect();
            let packed = pack(&hashes);
            prop_assert_eq!(packed.len(), hashes.len() * 32);
            prop_assert_eq!(unpack(&packed, hashes.len()), Ok(hashes));
        }
    }
}
