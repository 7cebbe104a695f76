//! Raft messages in parts: a message larger than a frame (a snapshot) goes
//! between replicas as consecutive [`RaftChunk`]s of one shard, every part
//! but the last with `more` set.
//!
//! ```text
//! sender                               receiver (one per peer link)
//!   split(shard, message, part)  --->  Reassembler::push(chunk)
//!     RaftChunk{shard, data, more}       Ok(None) while more is set
//!     ...                                Ok(Some((shard, message))) at the last
//! ```
//!
//! The receiver refuses, before copying anything, a shard outside
//! `0..shards`, a part of another shard in the middle of a message, and a
//! message that would grow past its limit ([`MAX_RAFT_MESSAGE_BYTES`] on
//! the wire). After a refusal the link is closed; the reassembler holds
//! nothing of the refused message. Parsing the message itself is raft's
//! codec's job (the `replica` feature).

use pagecast_proto::MAX_RAFT_MESSAGE_BYTES;
use pagecast_proto::v1::RaftChunk;

/// Why a part was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The part names a shard this replica does not have.
    #[error("raft part for shard {shard}, but there are {shards} shards")]
    BadShard {
        /// The shard named.
        shard: u32,
        /// Shards of this index.
        shards: u32,
    },
    /// A part of another shard arrived while a message was incomplete.
    #[error("raft part for shard {got} in the middle of a message of shard {open}")]
    Interleaved {
        /// The shard whose message is incomplete.
        open: u32,
        /// The shard the part names.
        got: u32,
    },
    /// The message would exceed its limit.
    #[error("raft message over {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
    },
}

/// Cuts `message` of `shard` into parts of at most `part` bytes (at least
/// one byte each). An empty message has no parts.
pub fn split(shard: u32, message: &[u8], part: usize) -> impl Iterator<Item = RaftChunk> + '_ {
    let part = part.max(1);
    let n = message.len().div_ceil(part);
    message
        .chunks(part)
        .enumerate()
        .map(move |(i, p)| RaftChunk {
            shard,
            data: p.to_vec().into(),
            more: i + 1 < n,
        })
}

/// Puts the parts of one link's raft messages back together.
#[derive(Debug)]
pub struct Reassembler {
    shards: u32,
    max: usize,
    open: Option<u32>,
    bytes: Vec<u8>,
}

impl Reassembler {
    /// For an index of `shards` shards, messages of at most
    /// [`MAX_RAFT_MESSAGE_BYTES`].
    pub fn new(shards: u32) -> Self {
        Self::with_limit(shards, MAX_RAFT_MESSAGE_BYTES)
    }

    /// As [`Reassembler::new`], with messages of at most `max` bytes.
    pub fn with_limit(shards: u32, max: usize) -> Self {
        Reassembler {
            shards,
            max,
            open: None,
            bytes: Vec::new(),
        }
    }

    /// Bytes of the incomplete message held now.
    pub fn held(&self) -> usize {
        self.bytes.len()
    }

    /// Takes one part: `Some((shard, message))` when it completes one.
    /// After an error the incomplete message is dropped.
    pub fn push(&mut self, c: RaftChunk) -> Result<Option<(u32, Vec<u8>)>, ChunkError> {
        if let Err(e) = self.check(&c) {
            self.open = None;
            self.bytes = Vec::new();
            return Err(e);
        }
        self.bytes.extend_from_slice(&c.data);
        if c.more {
            self.open = Some(c.shard);
            return Ok(None);
        }
        self.open = None;
        Ok(Some((c.shard, std::mem::take(&mut self.bytes))))
    }

    fn check(&self, c: &RaftChunk) -> Result<(), ChunkError> {
        if c.shard >= self.shards {
            return Err(ChunkError::BadShard {
                shard: c.shard,
                shards: self.shards,
            });
        }
        if let Some(open) = self.open.filter(|&s| s != c.shard) {
            return Err(ChunkError::Interleaved { open, got: c.shard });
        }
        if self.bytes.len().saturating_add(c.data.len()) > self.max {
            return Err(ChunkError::TooLarge { max: self.max });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn part(shard: u32, data: &[u8], more: bool) -> RaftChunk {
        RaftChunk {
            shard,
            data: data.to_vec().into(),
            more,
        }
    }

    #[test]
    fn refusals_name_the_problem_and_drop_what_was_held() {
        let mut r = Reassembler::with_limit(2, 8);
        assert_eq!(
            r.push(part(2, b"x", false)),
            Err(ChunkError::BadShard {
                shard: 2,
                shards: 2
            })
        );
        assert_eq!(r.push(part(0, b"abc", true)), Ok(None));
        assert_eq!(r.held(), 3);
        assert_eq!(
            r.push(part(1, b"d", false)),
            Err(ChunkError::Interleaved { open: 0, got: 1 })
        );
        assert_eq!(r.held(), 0);
        assert_eq!(r.push(part(1, b"12345", true)), Ok(None));
        assert_eq!(
            r.push(part(1, b"6789", false)),
            Err(ChunkError::TooLarge { max: 8 })
        );
        assert_eq!(r.held(), 0);
        // After refusals, a fresh message goes through.
        assert_eq!(r.push(part(1, b"ok", false)), Ok(Some((1, b"ok".to_vec()))));
    }

    proptest! {
        #[test]
        fn split_then_reassemble_is_the_identity(
            shard in 0u32..4,
            msg in proptest::collection::vec(any::<u8>(), 0..3000),
            size in 1usize..700,
        ) {
            let mut r = Reassembler::with_limit(4, 3000);
            let mut got = None;
            for c in split(shard, &msg, size) {
                prop_assert!(c.data.len() <= size && !c.data.is_empty());
                prop_assert!(got.is_none(), "a message completes only at its last part");
                got = r.push(c).unwrap();
            }
            if msg.is_empty() {
                prop_assert!(got.is_none());
            } else {
                prop_assert_eq!(got, Some((shard, msg)));
            }
            prop_assert_eq!(r.held(), 0);
        }

        #[test]
        fn any_parts_stay_within_the_limit(
            parts in proptest::collection::vec(
                (0u32..5, proptest::collection::vec(any::<u8>(), 0..40), any::<bool>()),
                0..60,
            ),
        ) {
            let mut r = Reassembler::with_limit(4, 100);
            for (shard, data, more) in parts {
                if let Ok(Some((s, m))) = r.push(part(shard, &data, more)) {
                    prop_assert!(s < 4 && m.len() <= 100);
                }
                prop_assert!(r.held() <= 100);
            }
        }
    }
}
