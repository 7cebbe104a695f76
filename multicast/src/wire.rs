//! UDP datagrams of a cast session.
//!
//! Every datagram is `[header][body][16-byte MAC]`, big-endian:
//!
//! ```text
//!  0  u8   version (1)            12  u32  epoch
//!  1  u8   kind                   16  u64  sequence (per sender)
//!  2  u16  body length            24  u32  from (0: the sender, n: receiver n)
//!  4  u64  session id             28  ...  body, then the MAC
//! ```
//!
//! Bodies: **data** `u32 group, u32 index, u8 fragment, u8 fragments,
//! payload` (one page, or a fragment of one where the path MTU is smaller);
//! **heartbeat** `u32 group, u32 sent_through, u32 group_len, u8 final`;
//! **nack** `u32 group, u64 seen_through, u16 count, count x (u32 first,
//! u32 len)` (`seen_through`: the highest sender sequence the receiver had
//! seen, so the sender can tell a NACK sent before a repair arrived);
//! **probe** `u32 nonce`. The MAC is a BLAKE3 keyed hash under the session
//! key. For every kind but data it covers everything before it. For data it
//! covers the header and data head and, instead of the payload, the
//! BLAKE3 hash the page must have (from the authenticated page list): the
//! receiver checks every page against that hash anyway, so a payload
//! altered under a valid header is caught there, and no page is hashed
//! twice. The sender, which knows every page's hash already, hashes only
//! headers.
//!
//! [`decode`] checks, in order: length bounds, version, session id (a
//! datagram of another session is *stale*), MAC (*forged* if it fails),
//! then every field: kind, fragment numbering, payload length, range counts.
//! The replay check (by sequence) is the caller's, with [`ReplayWindow`].

use pagecast_index::{PAGE_SIZE, PageHash};
use pagecast_proto::{DATAGRAM_VERSION, MAC_LEN, MAX_DATAGRAM_BYTES};

/// Bytes of the common header.
pub const HEADER_LEN: usize = 28;
/// Bytes of a data body before its payload.
pub const DATA_HEAD: usize = 10;
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

/// What a datagram carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<'a> {
    /// Page data.
    Data {
        /// Group index.
        group: u32,
        /// Page index within the group.
        index: u32,
        /// Fragment number.
        fragment: u8,
        /// Fragments of the page.
        fragments: u8,
        /// The bytes.
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
    /// Epoch (0 for first sends, the repair round after).
    pub epoch: u32,
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
    /// Appends the encoded, authenticated datagram to `out`. A data
    /// datagram's MAC binds `page_hash`, the hash of the page it carries
    /// (ignored for other kinds).
    pub fn encode(&self, key: &[u8; 32], page_hash: &PageHash, out: &mut Vec<u8>) {
        let start = out.len();
        let (kind, body_len) = match &self.body {
            Body::Data { payload, .. } => (KIND_DATA, DATA_HEAD + payload.len()),
            Body::Heartbeat { .. } => (KIND_HEARTBEAT, 13),
            Body::Nack { ranges, .. } => (KIND_NACK, 14 + 8 * ranges.len()),
            Body::Probe { .. } => (KIND_PROBE, 4),
        };
        out.push(DATAGRAM_VERSION);
        out.push(kind);
        out.extend_from_slice(&(body_len as u16).to_be_bytes());
        out.extend_from_slice(&self.session.to_be_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.from.to_be_bytes());
        match &self.body {
            Body::Data {
                group,
                index,
                fragment,
                fragments,
                payload,
            } => {
                out.extend_from_slice(&group.to_be_bytes());
                out.extend_from_slice(&index.to_be_bytes());
                out.push(*fragment);
                out.push(*fragments);
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
        let mac = match self.body {
            Body::Data { .. } => {
                data_mac(key, &out[start..start + HEADER_LEN + DATA_HEAD], page_hash)
            }
            _ => blake3::keyed_hash(key, &out[start..]),
        };
        out.extend_from_slice(&mac.as_bytes()[..MAC_LEN]);
    }
}

fn data_mac(key: &[u8; 32], head: &[u8], page_hash: &PageHash) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(head);
    h.update(page_hash.as_bytes());
    h.finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Payload bytes per data datagram for a path MTU (IPv4 and UDP headers,
/// our header, the data head and the MAC subtracted), at most a page.
pub fn fragment_payload(mtu: usize) -> usize {
    mtu.saturating_sub(20 + 8 + HEADER_LEN + DATA_HEAD + MAC_LEN)
        .min(PAGE_SIZE)
}

/// Decodes and authenticates a datagram of session `session`.
/// `page_hash(group, index)` gives the hash the page a data datagram
/// carries must have, or `None` for a page the caller does not take (the
/// datagram is then refused as malformed).
pub fn decode<'a>(
    buf: &'a [u8],
    key: &[u8; 32],
    session: u64,
    page_hash: impl FnOnce(u32, u32) -> Option<PageHash>,
) -> Result<Datagram<'a>, WireError> {
    if buf.len() < HEADER_LEN + MAC_LEN || buf.len() > MAX_DATAGRAM_BYTES {
        return Err(WireError::Length(buf.len()));
    }
    if buf[0] != DATAGRAM_VERSION {
        return Err(WireError::Version(buf[0]));
    }
    let got = u64::from_be_bytes(buf[4..12].try_into().expect("8 bytes"));
    if got != session {
        return Err(WireError::Stale { got, want: session });
    }
    let (signed, mac) = buf.split_at(buf.len() - MAC_LEN);
    let want = if buf[1] == KIND_DATA {
        if signed.len() < HEADER_LEN + DATA_HEAD {
            return Err(WireError::Malformed("data without payload"));
        }
        let (group, index) = (u32_at(signed, HEADER_LEN), u32_at(signed, HEADER_LEN + 4));
        let Some(h) = page_hash(group, index) else {
            return Err(WireError::Malformed(
                "data for a page this receiver does not take",
            ));
        };
        data_mac(key, &signed[..HEADER_LEN + DATA_HEAD], &h)
    } else {
        blake3::keyed_hash(key, signed)
    };
    let mut a = [0u8; 32];
    a[..MAC_LEN].copy_from_slice(mac);
    let mut b = [0u8; 32];
    b[..MAC_LEN].copy_from_slice(&want.as_bytes()[..MAC_LEN]);
    if blake3::Hash::from(a) != blake3::Hash::from(b) {
        return Err(WireError::Forged);
    }
    let body_len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let body = &signed[HEADER_LEN..];
    if body.len() != body_len {
        return Err(WireError::Malformed("body length does not match"));
    }
    let body = match buf[1] {
        KIND_DATA => {
            if body.len() < DATA_HEAD + 1 {
                return Err(WireError::Malformed("data without payload"));
            }
            let (fragment, fragments) = (body[8], body[9]);
            if fragments == 0 || fragments > MAX_FRAGMENTS || fragment >= fragments {
                return Err(WireError::Malformed("fragment numbering"));
            }
            let payload = &body[DATA_HEAD..];
            if payload.len() > PAGE_SIZE {
                return Err(WireError::Malformed("payload larger than a page"));
            }
            Body::Data {
                group: u32_at(body, 0),
                index: u32_at(body, 4),
                fragment,
                fragments,
                payload,
            }
        }
        KIND_HEARTBEAT => {
            if body.len() != 13 || body[12] > 1 {
                return Err(WireError::Malformed("heartbeat"));
            }
            let (sent_through, group_len) = (u32_at(body, 4), u32_at(body, 8));
            if sent_through > group_len {
                return Err(WireError::Malformed("heartbeat beyond the group"));
            }
            Body::Heartbeat {
                group: u32_at(body, 0),
                sent_through,
                group_len,
                done: body[12] == 1,
            }
        }
        KIND_NACK => {
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
            Body::Nack {
                group: u32_at(body, 0),
                seen_through: u64::from_be_bytes(body[4..12].try_into().expect("8 bytes")),
                ranges,
            }
        }
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
        epoch: u32_at(buf, 12),
        seq: u64::from_be_bytes(buf[16..24].try_into().expect("8 bytes")),
        from: u32_at(buf, 24),
        body,
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
    const H: PageHash = PageHash::from_bytes([4; 32]);

    fn any_page(_: u32, _: u32) -> Option<PageHash> {
        Some(H)
    }

    fn round(d: &Datagram) -> Datagram<'static> {
        let mut b = Vec::new();
        d.encode(&KEY, &H, &mut b);
        let leaked: &'static [u8] = Box::leak(b.into_boxed_slice());
        decode(leaked, &KEY, d.session, any_page).unwrap()
    }

    #[test]
    fn every_kind_round_trips() {
        let payload = [5u8; 1000];
        for body in [
            Body::Data {
                group: 3,
                index: 77,
                fragment: 1,
                fragments: 3,
                payload: &payload,
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
                epoch: 2,
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
            epoch: 0,
            seq: 1,
            from: 0,
            body: Body::Probe { nonce: 1 },
        };
        let mut b = Vec::new();
        d.encode(&KEY, &H, &mut b);
        assert_eq!(decode(&b, &[8; 32], 7, any_page), Err(WireError::Forged));
        assert_eq!(
            decode(&b, &KEY, 8, any_page),
            Err(WireError::Stale { got: 7, want: 8 })
        );
        let mut flipped = b.clone();
        flipped[HEADER_LEN] ^= 1;
        assert_eq!(decode(&flipped, &KEY, 7, any_page), Err(WireError::Forged));
        assert_eq!(
            decode(&b[..20], &KEY, 7, any_page),
            Err(WireError::Length(20))
        );
        let mut v2 = b.clone();
        v2[0] = 2;
        assert_eq!(decode(&v2, &KEY, 7, any_page), Err(WireError::Version(2)));
        // Authenticated but impossible: a fragment numbered past the count.
        let p = [0u8; 10];
        let bad = Datagram {
            session: 7,
            epoch: 0,
            seq: 1,
            from: 0,
            body: Body::Data {
                group: 0,
                index: 0,
                fragment: 3,
                fragments: 2,
                payload: &p,
            },
        };
        let mut b = Vec::new();
        bad.encode(&KEY, &H, &mut b);
        assert_eq!(
            decode(&b, &KEY, 7, any_page),
            Err(WireError::Malformed("fragment numbering"))
        );
        // Data bound to another page hash, or to a page not taken: refused.
        let ok = Datagram {
            session: 7,
            epoch: 0,
            seq: 1,
            from: 0,
            body: Body::Data {
                group: 0,
                index: 0,
                fragment: 0,
                fragments: 1,
                payload: &p,
            },
        };
        let mut b = Vec::new();
        ok.encode(&KEY, &H, &mut b);
        assert_eq!(
            decode(&b, &KEY, 7, |_, _| Some(PageHash::from_bytes([5; 32]))),
            Err(WireError::Forged)
        );
        assert!(matches!(
            decode(&b, &KEY, 7, |_, _| None),
            Err(WireError::Malformed(_))
        ));
        assert!(decode(&b, &KEY, 7, any_page).is_ok());
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
        assert_eq!(fragment_payload(1500), 1500 - 82);
        assert!(PAGE_SIZE.div_ceil(fragment_payload(1500)) <= MAX_FRAGMENTS as usize);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200), session in any::<u64>()) {
            let _ = decode(&b, &KEY, session, any_page);
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
