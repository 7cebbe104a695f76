//! QEMU's return path, as a pre-copy migration uses it: the messages a
//! destination QEMU writes back on its migration socket once the source
//! asked for them (the `return-path` capability, which libvirt turns on
//! for every migration it does not tunnel).
//!
//! Each message is a big-endian `u16` type, a `u16` length and that many
//! bytes. Pre-copy uses two: `PONG` (the answer to the stream's `PING`
//! command, 4 bytes) and `SHUT` (the destination is done: 4 bytes, 0 when
//! it loaded the stream, else an error). The source QEMU waits for `SHUT`
//! before it calls the migration completed, so a destination that failed
//! to load the stream fails the migration and the guest runs on at the
//! source.
//!
//! A destination host relays what its QEMU wrote; the source host checks it
//! here before its own QEMU reads it: only those two messages, each whole
//! and of its length, nothing after `SHUT`. The page requests, bitmaps and
//! resume messages of post-copy are refused (pagecast refuses post-copy
//! for QEMU guests), so a destination host cannot make a source QEMU send
//! pages or change its state.

/// `SHUT`: the destination is done; its 4 bytes are 0 when it loaded the
/// stream.
pub const RP_SHUT: u16 = 1;
/// `PONG`: the answer to a `PING` command in the stream.
pub const RP_PONG: u16 = 2;
/// A message's header: type and length.
const HEAD: usize = 4;

/// Why return-path bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReturnPathError {
    /// A message type pre-copy does not use.
    #[error("return-path message type {kind} at byte {at}: pre-copy uses only SHUT and PONG")]
    Type {
        /// The type.
        kind: u16,
        /// Its offset in the return path.
        at: u64,
    },
    /// A message whose length is not its type's.
    #[error("return-path message type {kind} at byte {at} is {len} bytes, not 4")]
    Length {
        /// The type.
        kind: u16,
        /// The length it gave.
        len: u16,
        /// Its offset in the return path.
        at: u64,
    },
    /// Bytes after `SHUT`.
    #[error("return-path bytes after SHUT, at byte {0}")]
    AfterShut(u64),
}

/// Checks a return path as it arrives, in pieces of any size.
#[derive(Debug, Default)]
pub struct ReturnPath {
    /// The bytes of an incomplete message.
    partial: Vec<u8>,
    /// Bytes seen before `partial`.
    at: u64,
    shut: Option<u32>,
    pongs: u64,
    /// A refusal was given: everything after is refused too.
    broken: bool,
}

impl ReturnPath {
    /// A checker at the start of a return path.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks `bytes`, the next piece: `Ok` when everything in it is (the
    /// start of) a message pre-copy uses. After an error the checker
    /// refuses everything.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), ReturnPathError> {
        for &b in bytes {
            if self.shut.is_some() || self.broken {
                return Err(ReturnPathError::AfterShut(self.at));
            }
            self.partial.push(b);
            if self.partial.len() < HEAD {
                continue;
            }
            let kind = u16::from_be_bytes([self.partial[0], self.partial[1]]);
            let len = u16::from_be_bytes([self.partial[2], self.partial[3]]);
            if kind != RP_SHUT && kind != RP_PONG {
                self.broken = true;
                return Err(ReturnPathError::Type { kind, at: self.at });
            }
            if len != 4 {
                self.broken = true;
                return Err(ReturnPathError::Length {
                    kind,
                    len,
                    at: self.at,
                });
            }
            if self.partial.len() < HEAD + 4 {
                continue;
            }
            let value = u32::from_be_bytes(self.partial[HEAD..HEAD + 4].try_into().expect("4"));
            if kind == RP_SHUT {
                self.shut = Some(value);
            } else {
                self.pongs += 1;
            }
            self.at += self.partial.len() as u64;
            self.partial.clear();
        }
        Ok(())
    }

    /// `SHUT`'s value once it came: 0 when the destination loaded the
    /// stream.
    pub fn shut(&self) -> Option<u32> {
        self.shut
    }

    /// `PONG`s so far.
    pub fn pongs(&self) -> u64 {
        self.pongs
    }
}

/// One message as QEMU writes it (for tests and the fuzz target).
pub fn message(kind: u16, value: u32) -> [u8; 8] {
    let mut m = [0u8; 8];
    m[..2].copy_from_slice(&kind.to_be_bytes());
    m[2..4].copy_from_slice(&4u16.to_be_bytes());
    m[4..].copy_from_slice(&value.to_be_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pongs_then_shut_pass_and_the_status_is_kept() {
        let mut rp = ReturnPath::new();
        rp.push(&message(RP_PONG, 1)).unwrap();
        rp.push(&message(RP_SHUT, 0)).unwrap();
        assert_eq!(rp.shut(), Some(0));
        assert_eq!(rp.pongs(), 1);
        let mut failed = ReturnPath::new();
        failed.push(&message(RP_SHUT, 1)).unwrap();
        assert_eq!(failed.shut(), Some(1));
    }

    #[test]
    fn post_copy_messages_wrong_lengths_and_bytes_after_shut_are_refused() {
        // REQ_PAGES (4): a destination asking the source for pages.
        let mut rp = ReturnPath::new();
        let err = rp.push(&[0, 4, 0, 12]).unwrap_err();
        assert_eq!(err, ReturnPathError::Type { kind: 4, at: 0 });
        assert!(
            rp.push(&message(RP_SHUT, 0)).is_err(),
            "refuses after an error"
        );
        let mut rp = ReturnPath::new();
        rp.push(&message(RP_PONG, 7)).unwrap();
        assert_eq!(
            rp.push(&[0, 2, 0, 8]).unwrap_err(),
            ReturnPathError::Length {
                kind: RP_PONG,
                len: 8,
                at: 8
            }
        );
        let mut rp = ReturnPath::new();
        rp.push(&message(RP_SHUT, 0)).unwrap();
        assert_eq!(rp.push(&[0]).unwrap_err(), ReturnPathError::AfterShut(8));
    }

    proptest! {
        /// However a valid return path is cut into pieces, it passes with
        /// the same status and count.
        #[test]
        fn pieces_do_not_matter(pongs in 0usize..5, status in any::<u32>(), cuts in proptest::collection::vec(1usize..9, 0..12)) {
            let mut all = Vec::new();
            for i in 0..pongs {
                all.extend_from_slice(&message(RP_PONG, i as u32));
            }
            all.extend_from_slice(&message(RP_SHUT, status));
            let mut rp = ReturnPath::new();
            let mut rest = &all[..];
            for c in cuts {
                let n = c.min(rest.len());
                rp.push(&rest[..n]).unwrap();
                rest = &rest[n..];
            }
            rp.push(rest).unwrap();
            prop_assert_eq!(rp.shut(), Some(status));
            prop_assert_eq!(rp.pongs(), pongs as u64);
        }

        /// Any bytes: an answer, never a panic, and a refusal is final.
        #[test]
        fn any_bytes_get_an_answer(pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 0..8)) {
            let mut rp = ReturnPath::new();
            let mut failed = false;
            for p in pieces {
                let r = rp.push(&p);
                if failed && !p.is_empty() {
                    prop_assert!(r.is_err());
                }
                failed |= r.is_err();
            }
        }
    }
}
