//! Manifests: for every guest frame of a VM, the hash of its content or
//! "zero page".
//!
//! A manifest stays with the agent that owns the VM and travels only with a
//! migration, ahead of the pages, so the destination can fill what it
//! already holds. On the wire it is one [`v1::ManifestHeader`] followed by
//! [`v1::ManifestChunk`]s in frame order:
//!
//! ```text
//! source                                   destination
//!   | ManifestHeader {vm, frames, nonzero}     |  check version, page size, caps
//!   |----------------------------------------->|
//!   | ManifestChunk {first_frame=0, ...}       |  check contiguity, ranges, hash count
//!   |----------------------------------------->|
//!   | ...                                      |
//!   | ManifestChunk {.., last frame}           |  check totals -> Manifest
//!   |----------------------------------------->|
//! ```
//!
//! [`ManifestDecoder`] accepts chunks one at a time and rejects anything
//! malformed with a [`ManifestError`] naming the problem: a wrong version or
//! page size, a gap or overlap between chunks, zero ranges out of order or
//! outside the chunk, a hash count that does not match, a zero-page marker
//! sent as a hash, or totals that disagree with the header. Every count is
//! capped (see [`pagecast_proto`]) before anything is allocated.

use pagecast_pages::{PAGE_SIZE, PageHash};
use pagecast_proto::{
    HASH_LEN, MAX_MANIFEST_CHUNK_BYTES, MAX_MANIFEST_CHUNK_FRAMES, MAX_MANIFEST_CHUNK_ZERO_RANGES,
    MAX_MANIFEST_FRAMES, MAX_MANIFEST_HEADER_BYTES, WIRE_VERSION, v1,
};
use prost::Message;

use crate::fingerprint::Fingerprints;

/// Why a manifest on the wire was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The protobuf bytes did not decode.
    #[error("manifest {what} does not decode: {why}")]
    Decode {
        /// "header" or "chunk".
        what: &'static str,
        /// The decoder's message.
        why: String,
    },
    /// An encoded message is larger than its cap.
    #[error("manifest {what} of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// "header" or "chunk".
        what: &'static str,
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A wire version this build does not speak.
    #[error("manifest wire version {0} is not supported (this build speaks 1)")]
    Version(i32),
    /// A page size other than 4096.
    #[error("manifest page size {0} is not supported (only 4096)")]
    PageSize(u32),
    /// A VM name outside [`pagecast_proto::name_ok`].
    #[error("manifest VM name of {0} bytes: use 1 to 64 letters, digits, '-', '_' or '.'")]
    VmName(usize),
    /// More frames than pagecast handles.
    #[error("manifest of {frames} frames exceeds the limit of {max}")]
    TooManyFrames {
        /// Frames claimed.
        frames: u64,
        /// The limit.
        max: u64,
    },
    /// More non-zero frames than frames.
    #[error("manifest claims {nonzero} non-zero frames out of {frames}")]
    NonzeroCount {
        /// Non-zero frames claimed.
        nonzero: u64,
        /// Frames.
        frames: u64,
    },
    /// A chunk that does not start where the previous one ended.
    #[error("manifest chunk starts at frame {got}, expected {expected}")]
    Gap {
        /// Where it starts.
        got: u64,
        /// Where it should.
        expected: u64,
    },
    /// A chunk with no frames, too many, or running past the end.
    #[error(
        "manifest chunk of {count} frames at {first} is empty, too long or past frame {frames}"
    )]
    ChunkLength {
        /// First frame.
        first: u64,
        /// Frames in it.
        count: u32,
        /// Total frames.
        frames: u64,
    },
    /// Zero ranges unsorted, overlapping, adjacent, empty or outside the chunk.
    #[error(
        "manifest zero range {first}+{count} is empty, unsorted, not maximal or outside its chunk"
    )]
    ZeroRange {
        /// First frame of the range.
        first: u64,
        /// Its length.
        count: u64,
    },
    /// Too many zero ranges in one chunk.
    #[error("manifest chunk has {0} zero ranges, more than the limit")]
    TooManyRanges(usize),
    /// The hash bytes do not match the chunk's non-zero frames.
    #[error("manifest chunk at {first} carries {got} hash bytes, expected {expected}")]
    HashBytes {
        /// First frame of the chunk.
        first: u64,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// The zero-page marker sent as a hash.
    #[error("manifest frame {0} carries the all-zero hash, reserved for zero pages")]
    ZeroHash(u64),
    /// Chunks ended before covering every frame.
    #[error("manifest ended at frame {got} of {frames}")]
    Incomplete {
        /// Frames covered.
        got: u64,
        /// Frames announced.
        frames: u64,
    },
    /// The non-zero frames received differ from the header's count.
    #[error("manifest carried {got} non-zero frames, header said {expected}")]
    NonzeroMismatch {
        /// Received.
        got: u64,
        /// Announced.
        expected: u64,
    },
}

/// Every frame of one VM: its content hash, or [`PageHash::ZERO_PAGE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The VM's name.
    pub vm: String,
    /// One entry per frame.
    pub hashes: Vec<PageHash>,
}

impl Manifest {
    /// The manifest of `vm` from its fingerprints.
    pub fn from_fingerprints(vm: &str, f: Fingerprints) -> Self {
        Manifest {
            vm: vm.to_owned(),
            hashes: f.hashes,
        }
    }

    /// Number of non-zero frames.
    pub fn nonzero(&self) -> u64 {
        self.hashes.iter().filter(|h| !h.is_zero_page()).count() as u64
    }

    /// The header announcing this manifest.
    pub fn header(&self) -> v1::ManifestHeader {
        v1::ManifestHeader {
            version: WIRE_VERSION as i32,
            vm: self.vm.clone(),
            page_size: PAGE_SIZE as u32,
            frames: self.hashes.len() as u64,
            nonzero_frames: self.nonzero(),
        }
    }

    /// The chunks, in order, of at most `chunk_frames` frames each (capped
    /// at [`MAX_MANIFEST_CHUNK_FRAMES`]).
    pub fn chunks(&self, chunk_frames: u32) -> impl Iterator<Item = v1::ManifestChunk> + '_ {
        let step = chunk_frames.clamp(1, MAX_MANIFEST_CHUNK_FRAMES) as usize;
        self.hashes
            .chunks(step)
            .enumerate()
            .map(move |(i, frames)| {
                let first = (i * step) as u64;
                let mut zero_ranges: Vec<v1::ZeroRange> = Vec::new();
                let mut hashes = Vec::with_capacity(frames.len() * HASH_LEN);
                for (j, h) in frames.iter().enumerate() {
                    let frame = first + j as u64;
                    if h.is_zero_page() {
                        match zero_ranges.last_mut() {
                            Some(r) if r.first + r.count == frame => r.count += 1,
                            _ => zero_ranges.push(v1::ZeroRange {
                                first: frame,
                                count: 1,
                            }),
                        }
                    } else {
                        hashes.extend_from_slice(h.as_bytes());
                    }
                }
                v1::ManifestChunk {
                    first_frame: first,
                    frame_count: frames.len() as u32,
                    zero_ranges,
                    hashes: hashes.into(),
                }
            })
    }
}

/// Rebuilds a [`Manifest`] from a header and its chunks, validating each.
#[derive(Debug)]
pub struct ManifestDecoder {
    vm: String,
    frames: u64,
    nonzero_expected: u64,
    nonzero_seen: u64,
    hashes: Vec<PageHash>,
}

impl ManifestDecoder {
    /// Starts from an encoded header.
    pub fn from_header_bytes(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_HEADER_BYTES {
            return Err(ManifestError::TooLarge {
                what: "header",
                len: bytes.len(),
                max: MAX_MANIFEST_HEADER_BYTES,
            });
        }
        let h = v1::ManifestHeader::decode(bytes).map_err(|e| ManifestError::Decode {
            what: "header",
            why: e.to_string(),
        })?;
        Self::new(&h)
    }

    /// Starts from a decoded header.
    pub fn new(h: &v1::ManifestHeader) -> Result<Self, ManifestError> {
        if h.version != WIRE_VERSION as i32 {
            return Err(ManifestError::Version(h.version));
        }
        if h.page_size != PAGE_SIZE as u32 {
            return Err(ManifestError::PageSize(h.page_size));
        }
        if !pagecast_proto::name_ok(&h.vm) {
            return Err(ManifestError::VmName(h.vm.len()));
        }
        if h.frames > MAX_MANIFEST_FRAMES {
            return Err(ManifestError::TooManyFrames {
                frames: h.frames,
                max: MAX_MANIFEST_FRAMES,
            });
        }
        if h.nonzero_frames > h.frames {
            return Err(ManifestError::NonzeroCount {
                nonzero: h.nonzero_frames,
                frames: h.frames,
            });
        }
        Ok(ManifestDecoder {
            vm: h.vm.clone(),
            frames: h.frames,
            nonzero_expected: h.nonzero_frames,
            nonzero_seen: 0,
            // Grows chunk by chunk: a header alone never makes us allocate.
            hashes: Vec::new(),
        })
    }

    /// Frames received so far.
    pub fn received(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// Adds an encoded chunk.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> Result<(), ManifestError> {
        if bytes.len() > MAX_MANIFEST_CHUNK_BYTES {
            return Err(ManifestError::TooLarge {
                what: "chunk",
                len: bytes.len(),
                max: MAX_MANIFEST_CHUNK_BYTES,
            });
        }
        let c = v1::ManifestChunk::decode(bytes).map_err(|e| ManifestError::Decode {
            what: "chunk",
            why: e.to_string(),
        })?;
        self.push(&c)
    }

    /// Adds a decoded chunk. On error the decoder is unchanged.
    pub fn push(&mut self, c: &v1::ManifestChunk) -> Result<(), ManifestError> {
        let expected = self.received();
        if c.first_frame != expected {
            return Err(ManifestError::Gap {
                got: c.first_frame,
                expected,
            });
        }
        let count = u64::from(c.frame_count);
        if c.frame_count == 0
            || c.frame_count > MAX_MANIFEST_CHUNK_FRAMES
            || count > self.frames - expected
        {
            return Err(ManifestError::ChunkLength {
                first: c.first_frame,
                count: c.frame_count,
                frames: self.frames,
            });
        }
        if c.zero_ranges.len() > MAX_MANIFEST_CHUNK_ZERO_RANGES {
            return Err(ManifestError::TooManyRanges(c.zero_ranges.len()));
        }
        let end = c.first_frame + count;
        // Ranges must be canonical: sorted, maximal (not even adjacent),
        // non-empty and inside the chunk. One encoding per manifest.
        let mut prev_end: Option<u64> = None;
        let mut zero = 0u64;
        for r in &c.zero_ranges {
            let bad = ManifestError::ZeroRange {
                first: r.first,
                count: r.count,
            };
            let after_prev = prev_end.is_none_or(|e| r.first > e);
            if r.count == 0
                || r.first < c.first_frame
                || !after_prev
                || r.first >= end
                || r.count > end - r.first
            {
                return Err(bad);
            }
            prev_end = Some(r.first + r.count);
            zero += r.count;
        }
        let nonzero = count - zero;
        let want = nonzero as usize * HASH_LEN;
        if c.hashes.len() != want {
            return Err(ManifestError::HashBytes {
                first: c.first_frame,
                got: c.hashes.len(),
                expected: want,
            });
        }
        let mut hashes = c
            .hashes
            .chunks_exact(HASH_LEN)
            .map(|b| PageHash::try_from(b).expect("chunks_exact yields HASH_LEN bytes"));
        let mut out = Vec::with_capacity(count as usize);
        let mut ranges = c.zero_ranges.iter().peekable();
        let mut frame = c.first_frame;
        while frame < end {
            if let Some(r) = ranges.peek().filter(|r| r.first == frame) {
                out.extend(std::iter::repeat_n(PageHash::ZERO_PAGE, r.count as usize));
                frame += r.count;
                ranges.next();
                continue;
            }
            let h = hashes.next().expect("hash count checked above");
            if h.is_zero_page() {
                return Err(ManifestError::ZeroHash(frame));
            }
            out.push(h);
            frame += 1;
        }
        self.nonzero_seen += nonzero;
        self.hashes.extend(out);
        Ok(())
    }

    /// Finishes: every frame must have arrived.
    pub fn finish(self) -> Result<Manifest, ManifestError> {
        if self.received() != self.frames {
            return Err(ManifestError::Incomplete {
                got: self.received(),
                frames: self.frames,
            });
        }
        if self.nonzero_seen != self.nonzero_expected {
            return Err(ManifestError::NonzeroMismatch {
                got: self.nonzero_seen,
                expected: self.nonzero_expected,
            });
        }
        Ok(Manifest {
            vm: self.vm,
            hashes: self.hashes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn manifest_from(pattern: &[u8]) -> Manifest {
        Manifest {
            vm: "vm-1".into(),
            hashes: pattern
                .iter()
                .map(|&b| {
                    if b == 0 {
                        PageHash::ZERO_PAGE
                    } else {
                        PageHash::from_bytes([b; 32])
                    }
                })
                .collect(),
        }
    }

    fn round_trip(m: &Manifest, chunk: u32) -> Result<Manifest, ManifestError> {
        let mut d = ManifestDecoder::from_header_bytes(&m.header().encode_to_vec())?;
        for c in m.chunks(chunk) {
            d.push_bytes(&c.encode_to_vec())?;
        }
        d.finish()
    }

    proptest! {
        #[test]
        fn round_trips(pattern in proptest::collection::vec(prop_oneof![Just(0u8), 1u8..4], 1..300), chunk in 1u32..70) {
            let m = manifest_from(&pattern);
            prop_assert_eq!(round_trip(&m, chunk).unwrap(), m);
        }

        #[test]
        fn garbage_is_refused_not_panicked_on(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = ManifestDecoder::from_header_bytes(&bytes);
            let m = manifest_from(&[1, 0, 2]);
            let mut d = ManifestDecoder::from_header_bytes(&m.header().encode_to_vec()).unwrap();
            let _ = d.push_bytes(&bytes);
        }

        #[test]
        fn mutated_chunks_are_refused_or_consistent(
            pattern in proptest::collection::vec(prop_oneof![Just(0u8), 1u8..4], 1..100),
            first_delta in -2i64..3, count_delta in -2i64..3, drop_hash in any::<bool>(),
            range_shift in -1i64..2,
        ) {
            let m = manifest_from(&pattern);
            let mut chunk = m.chunks(u32::MAX).next().unwrap();
            chunk.first_frame = (chunk.first_frame as i64 + first_delta).max(0) as u64;
            chunk.frame_count = (chunk.frame_count as i64 + count_delta).max(0) as u32;
            if drop_hash && chunk.hashes.len() >= HASH_LEN {
                chunk.hashes = chunk.hashes.slice(HASH_LEN..);
            }
            if let Some(r) = chunk.zero_ranges.first_mut() {
                r.first = (r.first as i64 + range_shift).max(0) as u64;
            }
            let mut header = m.header();
            header.frames = u64::from(chunk.frame_count).max(header.frames);
            let mut d = ManifestDecoder::new(&header).unwrap();
            // Whatever the decoder accepts, it read faithfully: the result
            // encodes back to exactly the chunk it was given.
            if let Ok(got) = d.push(&chunk).and_then(|()| d.finish()) {
                let again = got.chunks(u32::MAX).next().unwrap();
                prop_assert_eq!(again, chunk);
            }
        }
    }

    #[test]
    fn refusals_name_the_problem() {
        let m = manifest_from(&[1, 0, 0, 2, 3, 0]);
        let mut h = m.header();
        h.version = 0;
        assert_eq!(
            ManifestDecoder::new(&h).unwrap_err(),
            ManifestError::Version(0)
        );
        let mut h = m.header();
        h.page_size = 2 << 20;
        assert_eq!(
            ManifestDecoder::new(&h).unwrap_err(),
            ManifestError::PageSize(2 << 20)
        );
        let mut h = m.header();
        h.frames = MAX_MANIFEST_FRAMES + 1;
        assert!(matches!(
            ManifestDecoder::new(&h),
            Err(ManifestError::TooManyFrames { .. })
        ));
        let mut h = m.header();
        h.vm = String::new();
        assert_eq!(
            ManifestDecoder::new(&h).unwrap_err(),
            ManifestError::VmName(0)
        );

        let chunks: Vec<_> = m.chunks(2).collect();
        let mut d = ManifestDecoder::new(&m.header()).unwrap();
        assert_eq!(
            d.push(&chunks[1]).unwrap_err(),
            ManifestError::Gap {
                got: 2,
                expected: 0
            }
        );
        d.push(&chunks[0]).unwrap();
        assert!(matches!(d.push(&chunks[0]), Err(ManifestError::Gap { .. })));
        let mut zeroed = chunks[1].clone();
        zeroed.zero_ranges.clear();
        zeroed.hashes = vec![0u8; 2 * HASH_LEN].into();
        assert_eq!(d.push(&zeroed).unwrap_err(), ManifestError::ZeroHash(2));
        d.push(&chunks[1]).unwrap();
        let early = ManifestDecoder::new(&m.header()).unwrap();
        assert_eq!(
            early.finish().unwrap_err(),
            ManifestError::Incomplete { got: 0, frames: 6 }
        );
        let mut lying = m.header();
        lying.nonzero_frames = 4;
        let mut d = ManifestDecoder::new(&lying).unwrap();
        for c in m.chunks(4) {
            d.push(&c).unwrap();
        }
        assert_eq!(
            d.finish().unwrap_err(),
            ManifestError::NonzeroMismatch {
                got: 3,
                expected: 4
            }
        );
        let huge = vec![0u8; MAX_MANIFEST_CHUNK_BYTES + 1];
        let mut d = ManifestDecoder::new(&m.header()).unwrap();
        assert!(matches!(
            d.push_bytes(&huge),
            Err(ManifestError::TooLarge { .. })
        ));
    }
}
