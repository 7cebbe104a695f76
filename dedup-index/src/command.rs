//! Committed index commands as a replica applies them.
//!
//! Every replica decodes every committed command, and most are holder
//! deltas: thousands of small messages per command. Decoded generically,
//! each delta became a message with a reference-counted hash, which cost
//! a sixth of the replicas' apply time. [`Command::decode`] reads a deltas
//! command straight from its encoding into plain [`Delta`]s. It takes that
//! path only for input it reads exactly as the generic decoder would (the
//! fields of a deltas command, each hash 32 bytes); anything else (another
//! command, an unknown field, a hash of another length, malformed input)
//! goes to the generic decoder, so the outcome, refusals included, is the
//! same either way.

use pagecast_proto::v1::{HolderDelta, IndexCommand, index_command::Op};
use prost::Message as _;

/// One holder change of a deltas command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delta {
    /// The content's hash.
    pub hash: [u8; 32],
    /// The host the change is for.
    pub host: u32,
    /// Frames added (negative: dropped).
    pub frames: i64,
    /// The frames the writer says the index lists for the host before it.
    pub before: u64,
}

/// A committed command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Holder deltas, read straight from the encoding.
    Deltas {
        /// The writer's session (0: none).
        client: u64,
        /// Its sequence number in the session.
        seq: u64,
        /// The changes, in order.
        deltas: Vec<Delta>,
    },
    /// Any other command, or deltas the fast path left to the generic
    /// decoder.
    Other(IndexCommand),
}

impl From<IndexCommand> for Command {
    fn from(c: IndexCommand) -> Self {
        Command::Other(c)
    }
}

impl Command {
    /// The command encoded in `data`, or `None` if it does not decode.
    pub fn decode(data: &[u8]) -> Option<Command> {
        fast_deltas(data).or_else(|| IndexCommand::decode(data).ok().map(Command::Other))
    }

    /// The writer's session (0: none).
    pub fn client(&self) -> u64 {
        match self {
            Command::Deltas { client, .. } => *client,
            Command::Other(c) => c.client,
        }
    }

    /// The command's sequence number in its session.
    pub fn seq(&self) -> u64 {
        match self {
            Command::Deltas { seq, .. } => *seq,
            Command::Other(c) => c.seq,
        }
    }
}

/// The deltas of `ds` as [`Delta`]s, or the first whose hash is not 32
/// bytes (its place and length).
pub fn deltas_of(ds: &[HolderDelta]) -> Result<Vec<Delta>, (usize, usize)> {
    ds.iter()
        .enumerate()
        .map(|(i, d)| {
            let hash = <[u8; 32]>::try_from(&d.hash[..]).map_err(|_| (i, d.hash.len()))?;
            Ok(Delta {
                hash,
                host: d.host,
                frames: d.frames,
                before: d.before,
            })
        })
        .collect()
}

/// The same command as the generic decoder reads it, if it is a deltas
/// command with 32-byte hashes; a reference for tests.
pub fn generic_deltas(data: &[u8]) -> Option<Command> {
    let c = IndexCommand::decode(data).ok()?;
    let Some(Op::Deltas(d)) = &c.op else {
        return None;
    };
    Some(Command::Deltas {
        client: c.client,
        seq: c.seq,
        deltas: deltas_of(&d.deltas).ok()?,
    })
}

/// Protocol buffer wire types the fast path reads.
const VARINT: u64 = 0;
const LEN: u64 = 2;

/// A reader of one message's fields.
struct Fields<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn new(b: &'a [u8]) -> Self {
        Fields { b, at: 0 }
    }

    /// A varint of at most ten bytes, the tenth at most 1, as the generic
    /// decoder takes them.
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let byte = *self.b.get(self.at)?;
            self.at += 1;
            if i == 9 && byte > 1 {
                return None;
            }
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }

    /// The next field's number and wire type; `None` at the end or on a
    /// key the generic decoder refuses.
    fn key(&mut self) -> Option<(u64, u64)> {
        if self.at >= self.b.len() {
            return None;
        }
        let k = self.varint()?;
        if k > u64::from(u32::MAX) || k >> 3 == 0 {
            return None;
        }
        Some((k >> 3, k & 7))
    }

    fn done(&self) -> bool {
        self.at >= self.b.len()
    }

    /// A length-delimited field's bytes.
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.varint()?).ok()?;
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len())?;
        let s = &self.b[self.at..end];
        self.at = end;
        Some(s)
    }
}

/// A deltas command read straight from its encoding, or `None` to leave
/// it to the generic decoder.
fn fast_deltas(data: &[u8]) -> Option<Command> {
    let mut f = Fields::new(data);
    let (mut client, mut seq, mut deltas) = (0, 0, None);
    while !f.done() {
        match f.key()? {
            (1, VARINT) => client = f.varint()?,
            (2, VARINT) => seq = f.varint()?,
            // A second deltas field would be merged into the first by the
            // generic decoder: left to it.
            (10, LEN) if deltas.is_none() => deltas = Some(holder_deltas(f.bytes()?)?),
            _ => return None,
        }
    }
    Some(Command::Deltas {
        client,
        seq,
        deltas: deltas?,
    })
}

/// The deltas of an encoded `HolderDeltas`.
fn holder_deltas(b: &[u8]) -> Option<Vec<Delta>> {
    // A delta with a 32-byte hash takes at least 34 bytes, most near 45.
    let mut out = Vec::with_capacity(b.len() / 40);
    let mut f = Fields::new(b);
    while !f.done() {
        match f.key()? {
            (1, LEN) => out.push(delta(f.bytes()?)?),
            _ => return None,
        }
    }
    Some(out)
}

/// One encoded `HolderDelta`; the last of a repeated field counts, as in
/// the generic decoder.
fn delta(b: &[u8]) -> Option<Delta> {
    let mut f = Fields::new(b);
    let (mut hash, mut host, mut frames, mut before) = (None, 0, 0, 0);
    while !f.done() {
        match f.key()? {
            (1, LEN) => hash = Some(f.bytes()?),
            // A uint32 is a varint cut to its low 32 bits.
            (2, VARINT) => host = f.varint()? as u32,
            (3, VARINT) => {
                let z = f.varint()?;
                frames = ((z >> 1) as i64) ^ -((z & 1) as i64);
            }
            (4, VARINT) => before = f.varint()?,
            _ => return None,
        }
    }
    Some(Delta {
        hash: hash?.try_into().ok()?,
        host,
        frames,
        before,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagecast_proto::v1::{HolderDeltas, RegisterHost};
    use proptest::prelude::*;

    fn encoded(client: u64, seq: u64, ds: &[(Vec<u8>, u32, i64, u64)]) -> Vec<u8> {
        IndexCommand {
            client,
            seq,
            op: Some(Op::Deltas(HolderDeltas {
                deltas: ds
                    .iter()
                    .map(|(h, host, frames, before)| HolderDelta {
                        hash: h.clone().into(),
                        host: *host,
                        frames: *frames,
                        before: *before,
                    })
                    .collect(),
            })),
        }
        .encode_to_vec()
    }

    #[test]
    fn other_commands_and_odd_hashes_go_to_the_generic_decoder() {
        let reg = IndexCommand {
            client: 1,
            seq: 2,
            op: Some(Op::RegisterHost(RegisterHost { name: "h".into() })),
        };
        let got = Command::decode(&reg.encode_to_vec());
        assert_eq!(got, Some(Command::Other(reg)));
        // A 31-byte hash: left to the generic decoder, whose deltas the
        // apply refuses by name.
        let odd = encoded(1, 2, &[(vec![7; 31], 1, 1, 0)]);
        assert!(matches!(Command::decode(&odd), Some(Command::Other(_))));
        // No op: the generic decoder's empty command.
        let empty = IndexCommand::default().encode_to_vec();
        assert!(matches!(Command::decode(&empty), Some(Command::Other(_))));
        assert_eq!(Command::decode(&[0xff]), None);
    }

    proptest! {
        /// A deltas command as an agent encodes it takes the fast path and
        /// reads as the generic decoder reads it.
        #[test]
        fn deltas_read_as_the_generic_decoder_reads_them(
            client: u64,
            seq: u64,
            ds in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 32), any::<u32>(), any::<i64>(), any::<u64>()),
                0..40,
            ),
        ) {
            let b = encoded(client, seq, &ds);
            let fast = fast_deltas(&b);
            prop_assert!(fast.is_some());
            prop_assert_eq!(fast, generic_deltas(&b));
        }

        /// Whatever the bytes (a command's encoding cut or changed, or
        /// garbage), the fast path never panics, and what it reads is what
        /// the generic decoder reads.
        #[test]
        fn the_fast_path_reads_nothing_the_generic_decoder_would_not(
            ds in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 30..34), any::<u32>(), any::<i64>(), any::<u64>()),
                0..6,
            ),
            cuts in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            garbage in proptest::collection::vec(any::<u8>(), 0..200),
            keep in 0usize..400,
        ) {
            // Two commands' encodings back to back are one command to the
            // generic decoder, its deltas both lists.
            let twice = [encoded(3, 4, &ds), encoded(5, 6, &ds)].concat();
            if let Some(c) = fast_deltas(&twice) {
                prop_assert_eq!(Some(c), generic_deltas(&twice));
            }
            let mut b = encoded(3, 4, &ds);
            for (at, v) in cuts {
                if !b.is_empty() {
                    let n = b.len();
                    b[at % n] = v;
                }
            }
            b.truncate(keep.max(b.len() / 2));
            for input in [&b[..], &garbage[..]] {
                if let Some(c) = fast_deltas(input) {
                    prop_assert_eq!(Some(c), generic_deltas(input));
                }
            }
        }
    }
}
