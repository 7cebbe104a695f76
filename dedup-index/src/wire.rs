//! Frames of the content index's TCP protocol (see `index.proto`).
//!
//! A frame is a 4-byte big-endian length `n`, then `n` bytes: one version
//! byte ([`INDEX_FRAME_VERSION`]) and an encoded [`IndexFrame`]. A length
//! of zero or above [`MAX_INDEX_FRAME_BYTES`], another version, or a message
//! prost cannot decode is an error naming the peer; nothing is allocated
//! before the length is checked.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use pagecast_proto::v1::IndexFrame;
use pagecast_proto::{INDEX_FRAME_VERSION, MAX_INDEX_FRAME_BYTES};
use prost::Message;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed or closed.
    #[error("{peer}: {source}")]
    Io {
        /// Who was on the other end.
        peer: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The bytes end before the frame does.
    #[error("{peer}: frame truncated: {have} of {need} bytes")]
    Truncated {
        /// Who sent it.
        peer: String,
        /// Bytes present.
        have: usize,
        /// Bytes the frame needs.
        need: usize,
    },
    /// The frame is longer than allowed.
    #[error("{peer}: frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Who sent it.
        peer: String,
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A zero-length frame.
    #[error("{peer}: empty frame")]
    Empty {
        /// Who sent it.
        peer: String,
    },
    /// Another protocol version.
    #[error("{peer}: frame version {got}, this build speaks {INDEX_FRAME_VERSION}")]
    Version {
        /// Who sent it.
        peer: String,
        /// The version byte received.
        got: u8,
    },
    /// Not a valid message.
    #[error("{peer}: undecodable frame: {source}")]
    Decode {
        /// Who sent it.
        peer: String,
        /// What prost said.
        #[source]
        source: prost::DecodeError,
    },
}

/// Encodes `frame` with its length and version.
pub fn encode_frame(frame: &IndexFrame) -> Vec<u8> {
    let len = frame.encoded_len() + 1;
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(INDEX_FRAME_VERSION);
    frame.encode(&mut out).expect("a Vec grows");
    out
}

fn check_len(head: [u8; 4], peer: &str) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(head) as usize;
    if len == 0 {
        return Err(WireError::Empty { peer: peer.into() });
    }
    if len > MAX_INDEX_FRAME_BYTES {
        return Err(WireError::TooLarge {
            peer: peer.into(),
            len,
            max: MAX_INDEX_FRAME_BYTES,
        });
    }
    Ok(len)
}

fn decode_body(body: &[u8], peer: &str) -> Result<IndexFrame, WireError> {
    if body[0] != INDEX_FRAME_VERSION {
        return Err(WireError::Version {
            peer: peer.into(),
            got: body[0],
        });
    }
    IndexFrame::decode(&body[1..]).map_err(|source| WireError::Decode {
        peer: peer.into(),
        source,
    })
}

/// Decodes the first frame of `buf`, returning it and the bytes it took.
pub fn decode_frame(buf: &[u8], peer: &str) -> Result<(IndexFrame, usize), WireError> {
    let Some(head) = buf.get(..4) else {
        return Err(WireError::Truncated {
            peer: peer.into(),
            have: buf.len(),
            need: 4,
        });
    };
    let len = check_len(head.try_into().expect("4 bytes"), peer)?;
    let Some(body) = buf.get(4..4 + len) else {
        return Err(WireError::Truncated {
            peer: peer.into(),
            have: buf.len(),
            need: 4 + len,
        });
    };
    Ok((decode_body(body, peer)?, 4 + len))
}

/// How long the rest of a frame may take once its first byte came, plus
/// a second for every [`pagecast_channel::SLOWEST_FRAME_PACE`] bytes of
/// it: a peer that sends a frame a byte at a time, each byte within the
/// socket's read timeout, no longer holds its connection (and the slot
/// it takes at a replica) for as long as it likes. The check comes as
/// each read returns, so a frame is given up at most one read timeout
/// after this.
pub const FRAME_REST: Duration = Duration::from_secs(10);

/// Reads one frame. A connection closed cleanly before the frame starts is
/// an `Io` error of kind `UnexpectedEof`; a frame whose rest takes longer
/// than [`FRAME_REST`] (and its pace allowance) an `Io` error of kind
/// `TimedOut`.
pub fn read_frame(r: &mut impl Read, peer: &str) -> Result<IndexFrame, WireError> {
    read_frame_within(r, peer, FRAME_REST, MAX_INDEX_FRAME_BYTES)
}

/// Most bytes a connection's first frame, its hello, may have: a hello is
/// a few bytes, so a peer cannot claim a large one to earn its pace
/// allowance (or to have it allocated) before it is known.
pub const MAX_HELLO_BYTES: usize = 1024;

/// [`read_frame`] for a connection's first frame (at most
/// [`MAX_HELLO_BYTES`]).
pub fn read_hello(r: &mut impl Read, peer: &str) -> Result<IndexFrame, WireError> {
    read_frame_within(r, peer, FRAME_REST, MAX_HELLO_BYTES)
}

/// [`read_frame`], the rest of the frame taking at most `rest` (and its
/// pace allowance) from its first byte, and the frame at most `most`
/// bytes.
pub(crate) fn read_frame_within(
    r: &mut impl Read,
    peer: &str,
    rest: Duration,
    most: usize,
) -> Result<IndexFrame, WireError> {
    let io = |source| WireError::Io {
        peer: peer.into(),
        source,
    };
    let mut head = [0u8; 4];
    let mut have = 0;
    let mut first = None;
    while have < head.len() {
        match r.read(&mut head[have..]) {
            Ok(0) => return Err(io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => have += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        }
        let at = *first.get_or_insert_with(Instant::now);
        late(at, rest, head.len(), peer)?;
    }
    let at = first.unwrap_or_else(Instant::now);
    let len = check_len(head, peer)?;
    if len > most {
        return Err(WireError::TooLarge {
            peer: peer.into(),
            len,
            max: most,
        });
    }
    let mut body = vec![0u8; len];
    let mut have = 0;
    while have < len {
        match r.read(&mut body[have..]) {
            Ok(0) => {
                return Err(WireError::Truncated {
                    peer: peer.into(),
                    have: 4 + have,
                    need: 4 + len,
                });
            }
            Ok(n) => have += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
        late(at, rest, 4 + len, peer)?;
    }
    decode_body(&body, peer)
}

/// An error if a frame of `bytes` begun at `at` is past its time.
fn late(at: Instant, rest: Duration, bytes: usize, peer: &str) -> Result<(), WireError> {
    let allowed =
        rest + Duration::from_secs_f64(bytes as f64 / pagecast_channel::SLOWEST_FRAME_PACE as f64);
    if at.elapsed() <= allowed {
        return Ok(());
    }
    Err(WireError::Io {
        peer: peer.into(),
        source: std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("a frame of {bytes} bytes did not arrive within {allowed:?} of its first byte"),
        ),
    })
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, frame: &IndexFrame, peer: &str) -> Result<(), WireError> {
    let bytes = encode_frame(frame);
    if bytes.len() - 4 > MAX_INDEX_FRAME_BYTES {
        return Err(WireError::TooLarge {
            peer: peer.into(),
            len: bytes.len() - 4,
            max: MAX_INDEX_FRAME_BYTES,
        });
    }
    w.write_all(&bytes).map_err(|source| WireError::Io {
        peer: peer.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagecast_proto::v1::{IndexHello, RaftChunk, index_frame::Kind};
    use proptest::prelude::*;

    fn hello() -> IndexFrame {
        IndexFrame {
            kind: Some(Kind::Hello(IndexHello {
                peer_id: 2,
                shards: 4,
            })),
        }
    }

    #[test]
    fn round_trip_and_stream() {
        let mut buf = encode_frame(&hello());
        let raft = IndexFrame {
            kind: Some(Kind::Raft(RaftChunk {
                shard: 1,
                data: vec![7u8; 1000].into(),
                more: true,
            })),
        };
        buf.extend(encode_frame(&raft));
        let (a, n) = decode_frame(&buf, "t").unwrap();
        assert_eq!(a, hello());
        let (b, m) = decode_frame(&buf[n..], "t").unwrap();
        assert_eq!(b, raft);
        assert_eq!(n + m, buf.len());
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r, "t").unwrap(), hello());
        assert_eq!(read_frame(&mut r, "t").unwrap(), raft);
    }

    /// Hands out `bytes` one at a time, `every` apart (the first at once).
    struct Trickle {
        bytes: Vec<u8>,
        at: usize,
        every: Duration,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.at == self.bytes.len() || buf.is_empty() {
                return Ok(0);
            }
            if self.at > 0 {
                std::thread::sleep(self.every);
            }
            buf[0] = self.bytes[self.at];
            self.at += 1;
            Ok(1)
        }
    }

    /// A frame trickled a byte at a time is given up once its rest has
    /// taken its time from its first byte, however long the wait before
    /// that byte; the same bytes coming quickly make a frame. Before, each
    /// read waited anew and the trickled frame was taken whole.
    #[test]
    fn a_trickled_frame_is_given_up_at_its_deadline() {
        let bytes = encode_frame(&hello());
        assert!(bytes.len() >= 8, "{}", bytes.len());
        let every = Duration::from_millis(50);
        let rest = Duration::from_millis(120);
        let mut slow = Trickle {
            bytes: bytes.clone(),
            at: 0,
            every,
        };
        let t = Instant::now();
        let e = read_frame_within(&mut slow, "p", rest, MAX_HELLO_BYTES).unwrap_err();
        let took = t.elapsed();
        assert!(
            matches!(&e, WireError::Io { source, .. } if source.kind() == std::io::ErrorKind::TimedOut),
            "{e}"
        );
        assert!(e.to_string().contains("did not arrive within"), "{e}");
        // Given up at the first read past the deadline: far short of the
        // whole frame's time.
        assert!(
            took >= rest && took < every * (bytes.len() as u32 - 1),
            "{took:?}"
        );
        // A hello claiming more than a hello's bytes is refused at once.
        let claim = ((MAX_HELLO_BYTES + 1) as u32).to_be_bytes();
        let e = read_hello(&mut &claim[..], "p").unwrap_err();
        assert!(matches!(e, WireError::TooLarge { .. }), "{e}");
        let mut quick = Trickle {
            bytes,
            at: 0,
            every: Duration::from_millis(1),
        };
        assert_eq!(
            read_frame_within(&mut quick, "p", rest, MAX_HELLO_BYTES).unwrap(),
            hello()
        );
    }

    #[test]
    fn bad_frames_get_clear_errors() {
        let good = encode_frame(&hello());
        let e = decode_frame(&good[..good.len() - 1], "peer-x").unwrap_err();
        assert!(matches!(e, WireError::Truncated { .. }), "{e}");
        assert!(e.to_string().starts_with("peer-x: frame truncated"), "{e}");
        let e = read_frame(&mut &good[..good.len() - 1], "p").unwrap_err();
        assert!(matches!(e, WireError::Truncated { .. }), "{e}");

        let big = ((MAX_INDEX_FRAME_BYTES + 1) as u32).to_be_bytes();
        assert!(matches!(
            decode_frame(&big, "p"),
            Err(WireError::TooLarge { .. })
        ));
        assert!(matches!(
            read_frame(&mut &big[..], "p"),
            Err(WireError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_frame(&[0, 0, 0, 0], "p"),
            Err(WireError::Empty { .. })
        ));

        let mut v2 = good.clone();
        v2[4] = 2;
        let e = decode_frame(&v2, "p").unwrap_err();
        assert_eq!(e.to_string(), "p: frame version 2, this build speaks 1");

        let garbage = [0, 0, 0, 5, 1, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode_frame(&garbage, "p"),
            Err(WireError::Decode { .. })
        ));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame(&b, "p");
            let _ = read_frame(&mut &b[..], "p");
        }
    }
}
