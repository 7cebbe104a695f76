//! UDP datagrams of a cast session.
//!
//! Every datagram is `[header][encrypted body][16-byte tag]`, big-endian:
//!
//! ```text
//!  0  u8   version (1)            10  u64  sequence (per sender)
//!  1  u8   kind                   18  u32  from (0: the sender, n: receiver n)
//!  2  u64  session id             22  ...  body, then the MAC
//! ```
//!
//! Bodies: **data** `u32 group, u32 index, u8 fragment, u8 fragments, u8
//! count, count x (u64 frame, [16] check), payload`: `count` consecutive
//! pages of the group from `index` (two where the MTU allows, halving the
//! per-datagram overhead), or an equal-sized fragment of one page where the
//! path MTU is below a page (the last fragment padded); `check` is the first
//! 16 bytes of the page's BLAKE3 hash; **coded** `u32 group, u8 count, count x
//! (u32 index, u64 frame, [16] check), payload` (the XOR of 2 to 8 whole
//! pages: one repair for every receiver missing exactly one of them);
//! **heartbeat** `u32 group, u32 sent_through, u32 group_len, u8 final`;
//! **nack** `u32 group, u64 seen_through, u16 count, count x (u32 first, u32
//! len)` (`seen_through`: the highest sender sequence the receiver had seen,
//! so the sender can tell a NACK sent before a repair arrived); **probe**
//! `u32 nonce`.
//!
//! Everything after the header is encrypted and authenticated with
//! ChaCha20-Poly1305 under the session key (random per session, handed to
//! each receiver over its authenticated control connection), the header
//! being the associated data; the last 16 bytes are the Poly1305 tag. The
//! nonce is the datagram's sender number and sequence number: each member
//! numbers its own datagrams and never reuses a number, so no nonce repeats
//! under a key. A receiver that is not a member learns the header and the
//! datagram's length, nothing of the pages or their hashes.
//!
//! [`decode`] checks, in order: length bounds, version, session id (a
//! datagram of another session is *stale*), tag (*forged* if the datagram
//! does not open),
//! then every field: kind, fragment numbering, payload length, range counts.
//! The replay check (by sequence) is the caller's, with [`ReplayWindow`].

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use pagecast_pages::{PAGE_SIZE, PageHash};
use pagecast_proto::{DATAGRAM_VERSION, MAC_LEN, MAX_DATAGRAM_BYTES};

/// Bytes of the common header.
pub const HEADER_LEN: usize = 22;
/// Bytes of a data body before its page entries.
pub const DATA_HEAD: usize = 11;
/// Bytes of each page entry of a data body.
pub const DATA_ENTRY: usize = 24;
/// Most whole pages one data datagram carries.
pub const MAX_PACK: usize = 2;
/// Bytes of a coded body before its page entries.
const CODED_HEAD: usize = 5;
/// Bytes of each page entry of a coded body.
pub const CODED_ENTRY: usize = 28;
/// Bytes of a page check (a prefix of its BLAKE3 hash).
pub const CHECK_LEN: usize = 16;
/// Most pages XORed into one coded repair.
pub const MAX_CODED: usize = 8;
/// Most ranges one NACK carries.
pub const MAX_NACK_RANGES: usize = 64;
/// Most fragments a page is split into.
pub const MAX_FRAGMENTS: u8 = 8;
/// Smallest fragment payload (a page in at most [`MAX_FRAGMENTS`]).
pub const MIN_FRAGMENT: usize = PAGE_SIZE / MAX_FRAGMENTS as usize;

const KIND_DATA: u8 = 1;
const KIND_HEARTBEAT: u8 = 2;
const KIND_NACK: u8 = 3;
const KIND_PROBE: u8 = 4;
const KIND_CODED: u8 = 5;

/// The check a datagram carries for a page: the first bytes of its hash.
pub type Check = [u8; CHECK_LEN];

/// The check of a page hash.
pub fn check_of(h: &PageHash) -> Check {
    h.as_bytes()[..CHECK_LEN]
        .try_into()
        .expect("hash is longer than a check")
}

/// What a datagram carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<'a> {
    /// Page data: whole consecutive pages, or a fragment of one.
    Data {
        /// Group index.
        group: u32,
        /// Index within the group of the first page.
        index: u32,
        /// Fragment number (0 for whole pages).
        fragment: u8,
        /// Fragments of the page (1 for whole pages).
        fragments: u8,
        /// `(image frame, check)` of each page carried.
        pages: Vec<(u64, Check)>,
        /// The bytes: every page whole, or one fragment.
        payload: &'a [u8],
    },
    /// The XOR of several whole pages of one group.
    Coded {
        /// Group index.
        group: u32,
        /// `(index, frame, check)` of each page XORed in.
        pages: Vec<(u32, u64, Check)>,
        /// Their XOR.
        payload: &'a [u8],
    },
    /// The sender's progress in a group.
    Heartbeat {
        /// Group index.
        group: u32,
        /// Every page index below this has been sent at least once.
        sent_through: u32,
        /// Pages in the group.
        group_len: u32,
        /// The first pass over the group is over.
        done: bool,
    },
    /// A receiver's request for missing pages.
    Nack {
        /// Group index.
        group: u32,
        /// Highest sender sequence number the receiver had seen.
        seen_through: u64,
        /// `(first index, count)` ranges.
        ranges: Vec<(u32, u32)>,
    },
    /// A reachability probe.
    Probe {
        /// Nonce the control channel asks about.
        nonce: u32,
    },
}

/// A decoded datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram<'a> {
    /// Session id.
    pub session: u64,
    /// The sender's sequence number.
    pub seq: u64,
    /// Who sent it: 0 for the session's sender, n for receiver n.
    pub from: u32,
    /// The body.
    pub body: Body<'a>,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than a header and MAC, or longer than any datagram.
    #[error("datagram of {0} bytes is truncated or oversized")]
    Length(usize),
    /// A version this build does not speak.
    #[error("datagram version {0} is not supported")]
    Version(u8),
    /// Of another session.
    #[error("datagram of session {got:#x}, not {want:#x}")]
    Stale {
        /// Its session.
        got: u64,
        /// Ours.
        want: u64,
    },
    /// The MAC does not verify.
    #[error("datagram fails authentication")]
    Forged,
    /// An authenticated datagram with impossible fields.
    #[error("malformed datagram: {0}")]
    Malformed(&'static str),
}

impl Datagram<'_> {
    /// Appends the encoded, authenticated datagram to `out`.
    pub fn encode(&self, key: &[u8; 32], out: &mut Vec<u8>) {
        let start = out.len();
        let kind = match &self.body {
            Body::Data { .. } => KIND_DATA,
            Body::Coded { .. } => KIND_CODED,
            Body::Heartbeat { .. } => KIND_HEARTBEAT,
            Body::Nack { .. } => KIND_NACK,
            Body::Probe { .. } => KIND_PROBE,
        };
        out.push(DATAGRAM_VERSION);
        out.push(kind);
        out.extend_from_slice(&self.session.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.from.to_be_bytes());
        match &self.body {
            Body::Data {
                group,
                index,
                fragment,
                fragments,
                pages,
                payload,
            } => {
                out.extend_from_slice(&group.to_be_bytes());
                out.extend_from_slice(&index.to_be_bytes());
                out.push(*fragment);
                out.push(*fragments);
                out.push(pages.len() as u8);
                for (frame, check) in pages {
                    out.extend_from_slice(&frame.to_be_bytes());
                    out.extend_from_slice(check);
                }
                out.extend_from_slice(payload);
            }
            Body::Coded {
                group,
                pages,
                payload,
            } => {
                out.extend_from_slice(&group.to_be_bytes());
                out.push(pages.len() as u8);
                for (index, frame, check) in pages {
                    out.extend_from_slice(&index.to_be_bytes());
                    out.extend_from_slice(&frame.to_be_bytes());
                    out.extend_from_slice(check);
                }
                out.extend_from_slice(payload);
            }
            Body::Heartbeat {
                group,
                sent_through,
                group_len,
                done,
            } => {
                out.extend_from_slice(&group.to_be_bytes());
                out.extend_from_slice(&sent_through.to_be_bytes());
                out.extend_from_slice(&group_len.to_be_bytes());
                out.push(u8::from(*done));
            }
            Body::Nack {
                group,
                seen_through,
                ranges,
            } => {
                out.extend_from_slice(&group.to_be_bytes());
                out.extend_from_slice(&seen_through.to_be_bytes());
                out.extend_from_slice(&(ranges.len() as u16).to_be_bytes());
                for (a, n) in ranges {
                    out.extend_from_slice(&a.to_be_bytes());
                    out.extend_from_slice(&n.to_be_bytes());
                }
            }
            Body::Probe { nonce } => out.extend_from_slice(&nonce.to_be_bytes()),
        }
        seal_at(key, out, start);
    }
}

/// Seals raw datagram bytes in place: `buf` holds a header and a body in
/// the clear; the body is encrypted under `key` with the nonce the header
/// names and the tag appended. [`Datagram::encode`] does this; it is public
/// for fuzzing the decoder with arbitrary sealed bodies.
///
/// # Panics
/// If `buf` is shorter than a header.
pub fn seal(key: &[u8; 32], buf: &mut Vec<u8>) {
    seal_at(key, buf, 0);
}

fn seal_at(key: &[u8; 32], out: &mut Vec<u8>, start: usize) {
    let (from, seq) = (u32_at(out, start + 18), u64_at(out, start + 10));
    let (head, body) = out[start..].split_at_mut(HEADER_LEN);
    let mut tag = [0u8; MAC_LEN];
    if cleartext() {
        tag.copy_from_slice(&blake3::keyed_hash(key, head).as_bytes()[..MAC_LEN]);
    } else {
        tag.copy_from_slice(
            &cipher(key)
                .encrypt_in_place_detached(&nonce(from, seq), head, body)
                .expect("a datagram is far below ChaCha20-Poly1305's length limit"),
        );
    }
    out.extend_from_slice(&tag);
}

fn cipher(key: &[u8; 32]) -> ChaCha20Poly1305 {
    ChaCha20Poly1305::new(Key::from_slice(key))
}

/// The nonce of a datagram: who sent it and its sequence number. Every
/// session member numbers its own datagrams from 1 and never reuses a
/// number, and member numbers are unique within a session, so no nonce is
/// used twice under a session's key (keys are random per session).
fn nonce(from: u32, seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&from.to_be_bytes());
    n[4..].copy_from_slice(&seq.to_be_bytes());
    *Nonce::from_slice(&n)
}

/// Debug builds only: `PAGECAST_INSECURE_CLEARTEXT_DATAGRAMS=1` sends
/// datagrams unencrypted (the header still authenticated), so a test can
/// show that its capture would find what encryption hides. Release builds
/// always encrypt.
fn cleartext() -> bool {
    #[cfg(debug_assertions)]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            std::env::var_os("PAGECAST_INSECURE_CLEARTEXT_DATAGRAMS").is_some_and(|v| v == "1")
        })
    }
    #[cfg(not(debug_assertions))]
    {
        false
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn check_at(b: &[u8], at: usize) -> Check {
    b[at..at + CHECK_LEN].try_into().expect("check bytes")
}

/// Payload bytes per single-page data datagram for a path MTU (IPv4 and
/// UDP headers, our header, one page entry and the MAC subtracted), at most
/// a page.
pub fn fragment_payload(mtu: usize) -> usize {
    mtu.saturating_sub(20 + 8 + HEADER_LEN + DATA_HEAD + DATA_ENTRY + MAC_LEN)
        .min(PAGE_SIZE)
}

/// Whole pages one data datagram can carry at a path MTU (0 if not even
/// one: pages are fragmented).
pub fn pages_per_datagram(mtu: usize) -> usize {
    let room = mtu
        .min(MAX_DATAGRAM_BYTES + 28)
        .saturating_sub(20 + 8 + HEADER_LEN + DATA_HEAD + MAC_LEN);
    (room / (DATA_ENTRY + PAGE_SIZE)).min(MAX_PACK)
}

/// Bytes one page of a cast's first sends takes on an Ethernet link at a
/// path MTU: its data and entry and its share of its datagram's headers
/// (Ethernet 14, IPv4 20, UDP 8, this wire's header, data head and
/// check), or, where pages are fragmented, every fragment's (fragments of
/// one size, the last padded, as the sender makes them).
pub fn link_bytes_per_page(mtu: usize) -> f64 {
    let head = 14 + 20 + 8 + HEADER_LEN + DATA_HEAD + MAC_LEN;
    let pack = pages_per_datagram(mtu);
    if pack > 0 {
        head as f64 / pack as f64 + (DATA_ENTRY + PAGE_SIZE) as f64
    } else {
        let n = PAGE_SIZE.div_ceil(fragment_payload(mtu).max(1));
        let frag = PAGE_SIZE.div_ceil(n);
        (n * (head + DATA_ENTRY + frag)) as f64
    }
}

/// Decodes, authenticates and decrypts (in place) a datagram of session
/// `session`.
pub fn decode<'a>(
    buf: &'a mut [u8],
    key: &[u8; 32],
    session: u64,
) -> Result<Datagram<'a>, WireError> {
    let (kind, seq, from, body) = open(buf, key, session)?;
    // Authenticated: now every field is checked (any session member holds
    // the key, so a datagram that opens proves no shape).
    let body = match kind {
        KIND_DATA => data_body(body)?,
        KIND_CODED => coded_body(body)?,
        KIND_HEARTBEAT => heartbeat_body(body)?,
        KIND_NACK => nack_body(body)?,
        KIND_PROBE => {
            if body.len() != 4 {
                return Err(WireError::Malformed("probe"));
            }
            Body::Probe {
                nonce: u32_at(body, 0),
            }
        }
        _ => return Err(WireError::Malformed("unknown kind")),
    };
    Ok(Datagram {
        session,
        seq,
        from,
        body,
    })
}

/// Checks a datagram's header and opens it: its kind, sequence, sender
/// and (decrypted) body.
fn open<'a>(
    buf: &'a mut [u8],
    key: &[u8; 32],
    session: u64,
) -> Result<(u8, u64, u32, &'a [u8]), WireError> {
    if buf.len() < HEADER_LEN + MAC_LEN || buf.len() > MAX_DATAGRAM_BYTES {
        return Err(WireError::Length(buf.len()));
    }
    if buf[0] != DATAGRAM_VERSION {
        return Err(WireError::Version(buf[0]));
    }
    let got = u64_at(buf, 2);
    if got != session {
        return Err(WireError::Stale { got, want: session });
    }
    let kind = buf[1];
    let (seq, from) = (u64_at(buf, 10), u32_at(buf, 18));
    let n = buf.len();
    let (head, rest) = buf.split_at_mut(HEADER_LEN);
    let (body, tag) = rest.split_at_mut(n - HEADER_LEN - MAC_LEN);
    let opened = if cleartext() {
        // Constant-time comparison of the truncated MAC over the header.
        let want = blake3::keyed_hash(key, head);
        let mut a = [0u8; 32];
        a[..MAC_LEN].copy_from_slice(tag);
        let mut b = [0u8; 32];
        b[..MAC_LEN].copy_from_slice(&want.as_bytes()[..MAC_LEN]);
        blake3::Hash::from(a) == blake3::Hash::from(b)
    } else {
        cipher(key)
            .decrypt_in_place_detached(&nonce(from, seq), head, body, Tag::from_slice(tag))
            .is_ok()
    };
    if !opened {
        return Err(WireError::Forged);
    }
    Ok((kind, seq, from, body))
}

fn data_body(body: &[u8]) -> Result<Body<'_>, WireError> {
    if body.len() < DATA_HEAD {
        return Err(WireError::Malformed("data head truncated"));
    }
    let (fragment, fragments, count) = (body[8], body[9], body[10] as usize);
    let head = DATA_HEAD + DATA_ENTRY * count;
    if head > body.len() {
        return Err(WireError::Malformed("head longer than the datagram"));
    }
    if fragments == 0 || fragments > MAX_FRAGMENTS || fragment >= fragments {
        return Err(WireError::Malformed("fragment numbering"));
    }
    if count == 0 || count > MAX_PACK || (fragments > 1 && count != 1) {
        return Err(WireError::Malformed("page count"));
    }
    let payload = &body[head..];
    let fits = if fragments == 1 {
        payload.len() == count * PAGE_SIZE
    } else {
        !payload.is_empty() && payload.len() <= PAGE_SIZE
    };
    if !fits {
        return Err(WireError::Malformed("payload size"));
    }
    let pages = (0..count)
        .map(|i| {
            let at = DATA_HEAD + DATA_ENTRY * i;
            (u64_at(body, at), check_at(body, at + 8))
        })
        .collect();
    Ok(Body::Data {
        group: u32_at(body, 0),
        index: u32_at(body, 4),
        fragment,
        fragments,
        pages,
        payload,
    })
}

fn coded_body(body: &[u8]) -> Result<Body<'_>, WireError> {
    if body.len() < CODED_HEAD {
        return Err(WireError::Malformed("coded head truncated"));
    }
    let n = body[4] as usize;
    let head = CODED_HEAD + CODED_ENTRY * n;
    if head > body.len() {
        return Err(WireError::Malformed("head longer than the datagram"));
    }
    if !(2..=MAX_CODED).contains(&n) {
        return Err(WireError::Malformed("coded page count"));
    }
    if body.len() != head + PAGE_SIZE {
        return Err(WireError::Malformed("coded payload is not one page"));
    }
    let pages = (0..n)
        .map(|i| {
            let at = CODED_HEAD + CODED_ENTRY * i;
            (
                u32_at(body, at),
                u64_at(body, at + 4),
                check_at(body, at + 12),
            )
        })
        .collect();
    Ok(Body::Coded {
        group: u32_at(body, 0),
        pages,
        payload: &body[head..],
    })
}

fn heartbeat_body(body: &[u8]) -> Result<Body<'_>, WireError> {
    if body.len() != 13 || body[12] > 1 {
        return Err(WireError::Malformed("heartbeat"));
    }
    let (sent_through, group_len) = (u32_at(body, 4), u32_at(body, 8));
    if sent_through > group_len {
        return Err(WireError::Malformed("heartbeat beyond the group"));
    }
    Ok(Body::Heartbeat {
        group: u32_at(body, 0),
        sent_through,
        group_len,
        done: body[12] == 1,
    })
}

fn nack_body(body: &[u8]) -> Result<Body<'_>, WireError> {
    if body.len() < 14 {
        return Err(WireError::Malformed("nack"));
    }
    let n = u16::from_be_bytes([body[12], body[13]]) as usize;
    if n == 0 || n > MAX_NACK_RANGES || body.len() != 14 + 8 * n {
        return Err(WireError::Malformed("nack range count"));
    }
    let mut ranges = Vec::with_capacity(n);
    for i in 0..n {
        let (a, c) = (u32_at(body, 14 + 8 * i), u32_at(body, 18 + 8 * i));
        if c == 0 || a.checked_add(c).is_none() {
            return Err(WireError::Malformed("nack range"));
        }
        ranges.push((a, c));
    }
    Ok(Body::Nack {
        group: u32_at(body, 0),
        seen_through: u64_at(body, 4),
        ranges,
    })
}

/// Rejects replayed datagrams: the highest sequence seen and a bitmap of
/// the [`ReplayWindow::SIZE`] before it (as in IPsec's anti-replay window).
#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    top: u64,
    seen: [u64; 16],
    any: bool,
}

/// Verdict of [`ReplayWindow::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// New: accept.
    Fresh,
    /// Seen before.
    Duplicate,
    /// Older than the window: cannot tell, so refuse.
    TooOld,
}

impl ReplayWindow {
    /// Sequence numbers tracked behind the highest.
    pub const SIZE: u64 = 1024;

    fn bit(&mut self, seq: u64) -> (&mut u64, u64) {
        let i = (seq % Self::SIZE) as usize;
        (&mut self.seen[i / 64], 1 << (i % 64))
    }

    /// Records `seq` if it is new.
    pub fn check(&mut self, seq: u64) -> Replay {
        if !self.any {
            self.any = true;
            self.top = seq;
            let (w, m) = self.bit(seq);
            *w |= m;
            return Replay::Fresh;
        }
        if seq > self.top {
            // Clear the slots the window slides past.
            let shift = (seq - self.top).min(Self::SIZE);
            for s in 1..=shift {
                let (w, m) = self.bit(self.top + s);
                *w &= !m;
            }
            self.top = seq;
            let (w, m) = self.bit(seq);
            *w |= m;
            return Replay::Fresh;
        }
        if self.top - seq >= Self::SIZE {
            return Replay::TooOld;
        }
        let (w, m) = self.bit(seq);
        if *w & m != 0 {
            Replay::Duplicate
        } else {
            *w |= m;
            Replay::Fresh
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: [u8; 32] = [9; 32];
    const C: Check = [4; CHECK_LEN];

    fn round(d: &Datagram) -> Datagram<'static> {
        let mut b = Vec::new();
        d.encode(&KEY, &mut b);
        let leaked: &'static mut [u8] = Box::leak(b.into_boxed_slice());
        decode(leaked, &KEY, d.session).unwrap()
    }

    /// What the planner is told a page costs on a link is what the
    /// datagrams the sender makes take, headers included.
    #[test]
    fn a_page_on_the_link_is_its_datagrams_share() {
        let encoded = |pages: usize, payload: usize| {
            let data = vec![7u8; payload];
            let mut b = Vec::new();
            Datagram {
                session: 1,
                seq: 1,
                from: 0,
                body: Body::Data {
                    group: 0,
                    index: 0,
                    fragment: 0,
                    fragments: 1,
                    pages: vec![(0, C); pages],
                    payload: &data,
                },
            }
            .encode(&KEY, &mut b);
            b.len() + 14 + 20 + 8
        };
        // Jumbo frames: two pages a datagram.
        assert_eq!(pages_per_datagram(9000), 2);
        let two = encoded(2, 2 * PAGE_SIZE) as f64 / 2.0;
        assert!((link_bytes_per_page(9000) - two).abs() < 1e-9, "{two}");
        // 1500 bytes: fragments of one size, each a datagram.
        assert_eq!(pages_per_datagram(1500), 0);
        let n = PAGE_SIZE.div_ceil(fragment_payload(1500));
        let frag = PAGE_SIZE.div_ceil(n);
        // Each fragment's IP packet fits the MTU.
        assert!(encoded(1, frag) - 14 <= 1500);
        let page = (n * encoded(1, frag)) as f64;
        assert!((link_bytes_per_page(1500) - page).abs() < 1e-9, "{page}");
        assert!(link_bytes_per_page(1500) > link_bytes_per_page(9000));
    }

    #[test]
    fn every_kind_round_trips() {
        let payload = [5u8; 1000];
        let page = [6u8; PAGE_SIZE];
        for body in [
            Body::Data {
                group: 3,
                index: 77,
                fragment: 1,
                fragments: 3,
                pages: vec![(9, C)],
                payload: &payload,
            },
            Body::Data {
                group: 3,
                index: 78,
                fragment: 0,
                fragments: 1,
                pages: vec![(9, C), (11, [2; CHECK_LEN])],
                payload: &[7u8; 2 * PAGE_SIZE],
            },
            Body::Coded {
                group: 1,
                pages: vec![(1, 10, C), (4, 40, [1; CHECK_LEN])],
                payload: &page,
            },
            Body::Heartbeat {
                group: 0,
                sent_through: 10,
                group_len: 12,
                done: true,
            },
            Body::Nack {
                group: 2,
                seen_through: 1234,
                ranges: vec![(0, 4), (9, 1)],
            },
            Body::Probe { nonce: 42 },
        ] {
            let d = Datagram {
                session: 0xfeed,
                seq: 99,
                from: 4,
                body,
            };
            assert_eq!(round(&d), d);
        }
    }

    #[test]
    fn forged_stale_and_malformed_are_told_apart() {
        let d = Datagram {
            session: 7,
            seq: 1,
            from: 0,
            body: Body::Probe { nonce: 1 },
        };
        let mut b = Vec::new();
        d.encode(&KEY, &mut b);
        assert_eq!(decode(&mut b.clone(), &[8; 32], 7), Err(WireError::Forged));
        assert_eq!(
            decode(&mut b.clone(), &KEY, 8),
            Err(WireError::Stale { got: 7, want: 8 })
        );
        let mut flipped = b.clone();
        flipped[HEADER_LEN] ^= 1;
        assert_eq!(decode(&mut flipped, &KEY, 7), Err(WireError::Forged));
        assert_eq!(
            decode(&mut b.clone()[..20], &KEY, 7),
            Err(WireError::Length(20))
        );
        let mut v2 = b.clone();
        v2[0] = 2;
        assert_eq!(decode(&mut v2, &KEY, 7), Err(WireError::Version(2)));
        // The header is authenticated too: another sequence number (or
        // sender) is another nonce, and the datagram does not open.
        let mut reseq = b.clone();
        reseq[17] ^= 1;
        assert_eq!(decode(&mut reseq, &KEY, 7), Err(WireError::Forged));
        // Authenticated but impossible: a fragment numbered past the count.
        let p = [0u8; 10];
        let page = [0u8; PAGE_SIZE];
        let data = |fragment, fragments| Datagram {
            session: 7,
            seq: 1,
            from: 0,
            body: Body::Data {
                group: 0,
                index: 0,
                fragment,
                fragments,
                pages: vec![(3, C)],
                payload: if fragments == 1 { &page[..] } else { &p[..] },
            },
        };
        let mut b = Vec::new();
        data(3, 2).encode(&KEY, &mut b);
        assert_eq!(
            decode(&mut b, &KEY, 7),
            Err(WireError::Malformed("fragment numbering"))
        );
        // Every byte is authenticated: the check in the head and the
        // payload alike.
        let mut b = Vec::new();
        data(0, 1).encode(&KEY, &mut b);
        assert!(decode(&mut b.clone(), &KEY, 7).is_ok());
        let mut other = b.clone();
        other[HEADER_LEN + DATA_HEAD + 10] ^= 1;
        assert_eq!(decode(&mut other, &KEY, 7), Err(WireError::Forged));
        let mut payload_changed = b.clone();
        payload_changed[HEADER_LEN + DATA_HEAD + DATA_ENTRY] ^= 1;
        assert_eq!(
            decode(&mut payload_changed, &KEY, 7),
            Err(WireError::Forged)
        );
        // A coded repair must carry exactly one page of payload.
        let short = Datagram {
            session: 7,
            seq: 2,
            from: 0,
            body: Body::Coded {
                group: 0,
                pages: vec![(0, 0, C), (1, 1, C)],
                payload: &p,
            },
        };
        let mut b = Vec::new();
        short.encode(&KEY, &mut b);
        assert!(matches!(
            decode(&mut b, &KEY, 7),
            Err(WireError::Malformed(_))
        ));
    }

    /// What an eavesdropper on the group sees: no byte of a page, no check
    /// of its hash; only the header (version, kind, session, sequence,
    /// sender) is in the clear.
    #[test]
    fn pages_and_checks_travel_encrypted() {
        let page = [0x5au8; PAGE_SIZE];
        let check = [0xc3u8; CHECK_LEN];
        let d = Datagram {
            session: 7,
            seq: 3,
            from: 0,
            body: Body::Data {
                group: 0,
                index: 0,
                fragment: 0,
                fragments: 1,
                pages: vec![(1, check)],
                payload: &page,
            },
        };
        let mut b = Vec::new();
        d.encode(&KEY, &mut b);
        let wire = &b[HEADER_LEN..];
        assert!(
            !wire.windows(16).any(|w| w == &page[..16]),
            "page in the clear"
        );
        assert!(
            !wire.windows(CHECK_LEN).any(|w| w == check),
            "check in the clear"
        );
        // The same datagram under another sequence number encrypts
        // differently (a fresh nonce).
        let mut again = Vec::new();
        Datagram {
            seq: 4,
            ..d.clone()
        }
        .encode(&KEY, &mut again);
        assert_ne!(b[HEADER_LEN..], again[HEADER_LEN..]);
        assert_eq!(decode(&mut b, &KEY, 7).unwrap(), d);
    }

    /// Found by the `datagram` fuzz target: a data datagram with a body
    /// shorter than its head, authenticated over all of it, once indexed
    /// past its end.
    #[test]
    fn truncated_heads_are_refused_whatever_the_mac() {
        for kind in [KIND_DATA, KIND_CODED] {
            for body_len in 0..12 {
                let mut b = vec![DATAGRAM_VERSION, kind];
                b.extend_from_slice(&7u64.to_be_bytes());
                b.extend_from_slice(&1u64.to_be_bytes());
                b.extend_from_slice(&0u32.to_be_bytes());
                b.extend(std::iter::repeat_n(0xbe, body_len));
                seal(&KEY, &mut b);
                assert!(matches!(
                    decode(&mut b, &KEY, 7),
                    Err(WireError::Malformed(_) | WireError::Length(_))
                ));
            }
        }
    }

    #[test]
    fn replay_window() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.check(10), Replay::Fresh);
        assert_eq!(w.check(10), Replay::Duplicate);
        assert_eq!(w.check(5), Replay::Fresh);
        assert_eq!(w.check(5), Replay::Duplicate);
        assert_eq!(w.check(5000), Replay::Fresh);
        assert_eq!(w.check(10), Replay::TooOld);
        assert_eq!(w.check(4999), Replay::Fresh);
        assert_eq!(w.check(5000 - ReplayWindow::SIZE + 1), Replay::Fresh);
        assert_eq!(w.check(5000 - ReplayWindow::SIZE), Replay::TooOld);
    }

    #[test]
    fn mtus() {
        assert_eq!(fragment_payload(65536), PAGE_SIZE);
        assert_eq!(fragment_payload(9000), PAGE_SIZE);
        assert_eq!(
            fragment_payload(1500),
            1500 - 20 - 8 - HEADER_LEN - DATA_HEAD - DATA_ENTRY - MAC_LEN
        );
        assert_eq!(pages_per_datagram(1500), 0);
        assert_eq!(pages_per_datagram(4500), 1);
        assert_eq!(pages_per_datagram(9000), 2);
        assert_eq!(pages_per_datagram(65536), 2);
        assert!(PAGE_SIZE.div_ceil(fragment_payload(1500)) <= MAX_FRAGMENTS as usize);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(mut b in proptest::collection::vec(any::<u8>(), 0..200), session in any::<u64>()) {
            let _ = decode(&mut b, &KEY, session);
        }

        /// Any body sealed under the session key reaches the field checks,
        /// which refuse or accept it without panicking.
        #[test]
        fn sealed_garbage_never_panics(kind in 0u8..8, body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut b = vec![DATAGRAM_VERSION, kind];
            b.extend_from_slice(&7u64.to_be_bytes());
            b.extend_from_slice(&1u64.to_be_bytes());
            b.extend_from_slice(&0u32.to_be_bytes());
            b.extend_from_slice(&body);
            seal(&KEY, &mut b);
            if let Err(e) = decode(&mut b, &KEY, 7) {
                prop_assert!(matches!(e, WireError::Malformed(_) | WireError::Length(_)), "{e}");
            }
        }

        #[test]
        fn replay_window_matches_a_set(seqs in proptest::collection::vec(0u64..3000, 1..300)) {
            let mut w = ReplayWindow::default();
            let mut seen = std::collections::BTreeSet::new();
            let mut top: Option<u64> = None;
            for s in seqs {
                let want = match top {
                    Some(t) if s <= t && t - s >= ReplayWindow::SIZE => Replay::TooOld,
                    _ if seen.contains(&s) => Replay::Duplicate,
                    _ => Replay::Fresh,
                };
                prop_assert_eq!(w.check(s), want);
                if want == Replay::Fresh {
                    seen.insert(s);
                }
                top = Some(top.map_or(s, |t| t.max(s)));
            }
        }
    }
}
