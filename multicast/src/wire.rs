//! UDP datagrams of a cast session.
//!
//! Every datagram is `[header][encrypted body][16-byte AEAD tag][member
//! tags]`, big-endian:
//!
//! ```text
//!  0  u8   version (3)            10  u64  sequence (per sender)
//!  1  u8   kind                   18  u32  from (0: the sender, n: receiver n)
//!  2  u64  session id             22  u32  group
//!                                 26  u8   member tags that follow the AEAD tag
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
//! `u32 nonce`; **withdrawn** `u32 group, u32 index, u32 count`: `count`
//! consecutive pages of the group from `index` that the sender could not
//! read (their content left it after the session's page list was fixed),
//! which its receivers take as settled without them, sent where the pages
//! would have gone and again for every NACK asking for one. The body's
//! group is the header's.
//!
//! **Secrecy: one key per group.** Everything after the header is encrypted
//! and authenticated with AES-256-GCM under the key of the group the
//! header names (random per session and group, handed over each member's
//! authenticated control connection to that group's members only), the
//! header being the associated data. The nonce is the datagram's sender
//! number and sequence number: each member numbers its own datagrams and
//! never reuses a number, so no nonce repeats under a key. A host that is
//! not a member of a group, another receiver of the session included,
//! learns the header and the datagram's length, nothing of its pages.
//!
//! **Origin: one tag per reader.** A group key is shared by the group's
//! members, so it cannot tell the sender from a member. Each receiver also
//! has a key of its own, shared with the sender only. A datagram from the
//! sender carries one 8-byte tag per member of its group, in the group's
//! member order: the keyed BLAKE3 hash, under that member's key, of the
//! BLAKE3 hash of the header and the clear body up to its payload (a payload's pages are
//! covered by their checks: every page is hashed on arrival and must match
//! its check, so it is taken only as the sender tagged it; a member that
//! alters a payload gets the page dropped and asked for again, no more). A receiver checks its own tag,
//! so a member that holds the group key still cannot make another member
//! take its datagrams for the sender's. A NACK carries one tag, under its
//! sender's key, which the sender checks; the other members, which use a
//! NACK only to hold back their own, cannot check it.
//!
//! [`decode`] checks, in order: length bounds, version, session id (a
//! datagram of another session is *stale*), the group (*no key* where the
//! reader is not a member), the AEAD tag (*forged* if the datagram does not
//! open), the reader's tag (an *impostor* if it does not verify), then
//! every field: kind, fragment numbering, payload length, range counts.
//! The replay check (by sequence) is the caller's, with [`ReplayWindow`].

use pagecast_pages::{PAGE_SIZE, PageHash};
use pagecast_proto::{DATAGRAM_VERSION, MAC_LEN, MAX_DATAGRAM_BYTES};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

/// Bytes of the common header.
pub const HEADER_LEN: usize = 27;
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
/// Bytes of one member tag. Eight, not sixteen, so that a page still
/// takes three fragments at a 1,500-byte MTU to a group of three: a member
/// tag can only be forged online, one datagram to its victim per guess,
/// each counted as forged, so 2^64 guesses are out of reach (SRTP's tags
/// are 4 to 10 bytes for the same reason).
pub const TAG_LEN: usize = 8;
/// Most member tags a datagram carries (a group has at most this many
/// members).
pub const MAX_TAGS: usize = 64;

const KIND_DATA: u8 = 1;
const KIND_HEARTBEAT: u8 = 2;
const KIND_NACK: u8 = 3;
const KIND_PROBE: u8 = 4;
const KIND_CODED: u8 = 5;
const KIND_WITHDRAWN: u8 = 6;

/// A 32-byte key: a group's (secrecy) or a member's (origin).
pub type CastKey = [u8; 32];

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
    /// A reachability probe, sent to one group.
    Probe {
        /// The group it was sent to.
        group: u32,
        /// Nonce the control channel asks about.
        nonce: u32,
    },
    /// Pages the sender withdrew: their receivers settle them without
    /// their data (and take them from elsewhere).
    Withdrawn {
        /// Group index.
        group: u32,
        /// Index within the group of the first page withdrawn.
        index: u32,
        /// Consecutive pages withdrawn from `index` (at least one).
        count: u32,
    },
}

impl Body<'_> {
    /// The group the datagram belongs to (whose key seals it).
    pub fn group(&self) -> u32 {
        match self {
            Body::Data { group, .. }
            | Body::Coded { group, .. }
            | Body::Heartbeat { group, .. }
            | Body::Nack { group, .. }
            | Body::Probe { group, .. }
            | Body::Withdrawn { group, .. } => *group,
        }
    }
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

/// A group's key, ready to seal and open: its bytes (handed to the group's
/// members) and its AES-256-GCM key schedule, made once per session rather
/// than once per datagram (AES-256-GCM: hardware AES and carry-less
/// multiplication on the x86-64 and ARM hosts pagecast runs on; measured
/// against ChaCha20-Poly1305 in `benches/cast_tags`).
pub struct GroupKey {
    raw: CastKey,
    aead: LessSafeKey,
}

impl GroupKey {
    /// The group key `raw`.
    pub fn new(raw: CastKey) -> Self {
        let aead = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &raw).expect("a 32-byte key is an AES-256 key"),
        );
        GroupKey { raw, aead }
    }

    /// Its bytes.
    pub fn bytes(&self) -> &CastKey {
        &self.raw
    }
}

impl std::fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupKey(..)")
    }
}

/// The keys a datagram is sealed with: its group's, and one member key per
/// tag to add (the group's members in order, for the sender; its own, for a
/// receiver's NACK).
#[derive(Debug, Clone, Copy)]
pub struct Sealing<'k> {
    /// The group key (secrecy).
    pub key: &'k GroupKey,
    /// The member keys to tag the datagram under (origin), at most
    /// [`MAX_TAGS`].
    pub tags: &'k [CastKey],
}

/// The keys a reader opens a datagram of one group from one sender with.
#[derive(Debug, Clone, Copy)]
pub struct Opening<'k> {
    /// The group key.
    pub key: &'k GroupKey,
    /// The tag this reader checks: its place among the datagram's tags and
    /// the member key it is made under. `None`: the group key alone (a
    /// receiver hearing another member's NACK, which only the sender can
    /// check).
    pub tag: Option<(usize, &'k CastKey)>,
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
    /// Of a group (or from a sender) the reader holds no key for.
    #[error("datagram of group {group} from {from}, which this reader holds no key for")]
    NoKey {
        /// The header's group.
        group: u32,
        /// The header's sender.
        from: u32,
    },
    /// The reader's member tag is missing or does not verify: not from
    /// whom the header names.
    #[error("datagram is not from the member it names (its tag does not verify)")]
    Impostor,
    /// The MAC does not verify.
    #[error("datagram fails authentication")]
    Forged,
    /// An authenticated datagram with impossible fields.
    #[error("malformed datagram: {0}")]
    Malformed(&'static str),
}

impl Datagram<'_> {
    /// Appends the encoded, sealed datagram to `out`.
    ///
    /// # Panics
    /// If `sealing` has more than [`MAX_TAGS`] member keys.
    pub fn encode(&self, sealing: &Sealing, out: &mut Vec<u8>) {
        let start = out.len();
        let kind = match &self.body {
            Body::Data { .. } => KIND_DATA,
            Body::Coded { .. } => KIND_CODED,
            Body::Heartbeat { .. } => KIND_HEARTBEAT,
            Body::Nack { .. } => KIND_NACK,
            Body::Probe { .. } => KIND_PROBE,
            Body::Withdrawn { .. } => KIND_WITHDRAWN,
        };
        out.push(DATAGRAM_VERSION);
        out.push(kind);
        out.extend_from_slice(&self.session.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.from.to_be_bytes());
        out.extend_from_slice(&self.body.group().to_be_bytes());
        out.push(0); // member tags: set by seal_at
        self.body.encode_fields(out);
        seal_at(sealing, out, start);
    }
}

impl Body<'_> {
    fn encode_fields(&self, out: &mut Vec<u8>) {
        match self {
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
            Body::Probe { nonce, .. } => out.extend_from_slice(&nonce.to_be_bytes()),
            Body::Withdrawn {
                group,
                index,
                count,
            } => {
                out.extend_from_slice(&group.to_be_bytes());
                out.extend_from_slice(&index.to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
            }
        }
    }
}

/// Seals raw datagram bytes in place: `buf` holds a header and a body in
/// the clear; the header's tag count is set, the body is encrypted under
/// the group key with the nonce the header names, and the AEAD tag and the
/// member tags are appended. [`Datagram::encode`] does this; it is public
/// for fuzzing the decoder with arbitrary sealed bodies.
///
/// # Panics
/// If `buf` is shorter than a header, or `sealing` has more than
/// [`MAX_TAGS`] member keys.
pub fn seal(sealing: &Sealing, buf: &mut Vec<u8>) {
    seal_at(sealing, buf, 0);
}

fn seal_at(sealing: &Sealing, out: &mut Vec<u8>, start: usize) {
    assert!(sealing.tags.len() <= MAX_TAGS, "too many member tags");
    out[start + 26] = sealing.tags.len() as u8;
    let (from, seq) = (u32_at(out, start + 18), u64_at(out, start + 10));
    let (head, body) = out[start..].split_at_mut(HEADER_LEN);
    // Member tags over the header and the body's head, in the clear.
    let mut tags = [0u8; MAX_TAGS * TAG_LEN];
    let digest = tagged_digest(head, &body[..tagged_len(head[1], body)]);
    for (k, t) in sealing.tags.iter().zip(tags.chunks_exact_mut(TAG_LEN)) {
        t.copy_from_slice(&member_tag(k, &digest));
    }
    let mut tag = [0u8; MAC_LEN];
    if cleartext() {
        tag.copy_from_slice(&blake3::keyed_hash(&sealing.key.raw, head).as_bytes()[..MAC_LEN]);
    } else {
        tag.copy_from_slice(
            sealing
                .key
                .aead
                .seal_in_place_separate_tag(nonce(from, seq), Aad::from(&*head), body)
                .expect("a datagram is far below AES-GCM's length limit")
                .as_ref(),
        );
    }
    out.extend_from_slice(&tag);
    out.extend_from_slice(&tags[..sealing.tags.len() * TAG_LEN]);
}

/// Bytes of a (clear) body that member tags cover: all of it but the
/// payload of a data or coded datagram. Each page of a payload is checked
/// on arrival against the check its entry carries, which the tag covers,
/// so a page is taken only as the sender tagged it, without hashing the
/// payload a second time.
fn tagged_len(kind: u8, body: &[u8]) -> usize {
    let head = match kind {
        KIND_DATA if body.len() >= DATA_HEAD => DATA_HEAD + DATA_ENTRY * body[10] as usize,
        KIND_CODED if body.len() >= CODED_HEAD => CODED_HEAD + CODED_ENTRY * body[4] as usize,
        _ => body.len(),
    };
    head.min(body.len())
}

/// The BLAKE3 hash of a datagram's header and the covered head of its
/// clear body, which each member tag is made from (hashed once, however
/// many members a group has).
fn tagged_digest(header: &[u8], covered: &[u8]) -> blake3::Hash {
    // Every covered head (a NACK's, the longest, is 526 bytes) fits one
    // buffer: one call of the one-shot hash, cheaper than a hasher.
    let mut buf = [0u8; 640];
    let n = header.len() + covered.len();
    if n <= buf.len() {
        buf[..header.len()].copy_from_slice(header);
        buf[header.len()..n].copy_from_slice(covered);
        blake3::hash(&buf[..n])
    } else {
        let mut h = blake3::Hasher::new();
        h.update(header);
        h.update(covered);
        h.finalize()
    }
}

/// The tag a chain page carries for the receiver whose key is `key`: the
/// keyed hash, under that key, of the session, the page's place in it,
/// its frame and its hash (`docs/transport.md`, "Fallback: the TCP
/// chain").
pub fn chain_tag(
    key: &CastKey,
    session: u64,
    page: u32,
    frame: u64,
    hash: &PageHash,
) -> [u8; TAG_LEN] {
    const LABEL: &[u8] = b"pagecast chain page v1";
    let mut m = [0u8; LABEL.len() + 8 + 4 + 8 + 32];
    let (label, rest) = m.split_at_mut(LABEL.len());
    label.copy_from_slice(LABEL);
    rest[..8].copy_from_slice(&session.to_be_bytes());
    rest[8..12].copy_from_slice(&page.to_be_bytes());
    rest[12..20].copy_from_slice(&frame.to_be_bytes());
    rest[20..].copy_from_slice(hash.as_bytes());
    blake3::keyed_hash(key, &m).as_bytes()[..TAG_LEN]
        .try_into()
        .expect("a hash is longer than a tag")
}

/// Whether `tags` (a chain page's, in receiver-id order) holds receiver
/// `id`'s tag, under `key`, for page `page` of `session` with `frame` and
/// `hash`.
pub fn chain_tag_ok(
    key: &CastKey,
    (session, page, frame): (u64, u32, u64),
    hash: &PageHash,
    tags: &[u8],
    id: u32,
) -> bool {
    let Some(at) = (id as usize)
        .checked_sub(1)
        .and_then(|i| i.checked_mul(TAG_LEN))
    else {
        return false;
    };
    tags.get(at..at.saturating_add(TAG_LEN))
        .is_some_and(|t| same_tag(t, &chain_tag(key, session, page, frame, hash)))
}

/// A member's tag: the keyed hash, under its key, of the tagged digest.
fn member_tag(key: &CastKey, digest: &blake3::Hash) -> [u8; TAG_LEN] {
    blake3::keyed_hash(key, digest.as_bytes()).as_bytes()[..TAG_LEN]
        .try_into()
        .expect("a hash is longer than a tag")
}

/// Compares two tags of one length (at most 32 bytes) in constant time
/// (by way of `blake3::Hash`'s constant-time equality).
fn same_tag(a: &[u8], b: &[u8]) -> bool {
    let (mut x, mut y) = ([0u8; 32], [0u8; 32]);
    x[..a.len()].copy_from_slice(a);
    y[..b.len()].copy_from_slice(b);
    a.len() == b.len() && blake3::Hash::from(x) == blake3::Hash::from(y)
}

/// The nonce of a datagram: who sent it and its sequence number. Every
/// session member numbers its own datagrams from 1 and never reuses a
/// number, and member numbers are unique within a session, so no nonce is
/// used twice under a group's key (keys are random per session and group).
fn nonce(from: u32, seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&from.to_be_bytes());
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
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

/// Bytes of a datagram's IPv4 and UDP headers, our header and its MACs
/// with `tags` member tags.
fn framing(tags: usize) -> usize {
    20 + 8 + HEADER_LEN + MAC_LEN + tags * TAG_LEN
}

/// Payload bytes per single-page data datagram for a path MTU (IPv4 and
/// UDP headers, our header, one page entry and the MACs of `tags` member
/// tags subtracted), at most a page.
pub fn fragment_payload(mtu: usize, tags: usize) -> usize {
    mtu.saturating_sub(framing(tags) + DATA_HEAD + DATA_ENTRY)
        .min(PAGE_SIZE)
}

/// Whole pages one data datagram with `tags` member tags can carry at a
/// path MTU (0 if not even one: pages are fragmented).
pub fn pages_per_datagram(mtu: usize, tags: usize) -> usize {
    let room = mtu
        .min(MAX_DATAGRAM_BYTES + 28)
        .saturating_sub(framing(tags) + DATA_HEAD);
    (room / (DATA_ENTRY + PAGE_SIZE)).min(MAX_PACK)
}

/// Bytes one page of a cast's first sends takes on an Ethernet link at a
/// path MTU, sent to a group of `tags` members: its data and entry and its
/// share of its datagram's headers (Ethernet 14, IPv4 20, UDP 8, this
/// wire's header, data head, MAC and member tags), or, where pages are
/// fragmented, every fragment's (fragments of one size, the last padded,
/// as the sender makes them).
pub fn link_bytes_per_page(mtu: usize, tags: usize) -> f64 {
    let head = 14 + framing(tags) + DATA_HEAD;
    let pack = pages_per_datagram(mtu, tags);
    if pack > 0 {
        head as f64 / pack as f64 + (DATA_ENTRY + PAGE_SIZE) as f64
    } else {
        let n = PAGE_SIZE.div_ceil(fragment_payload(mtu, tags).max(1));
        let frag = PAGE_SIZE.div_ceil(n);
        (n * (head + DATA_ENTRY + frag)) as f64
    }
}

/// Decodes, authenticates and decrypts (in place) a datagram of session
/// `session`. `keys` gives, for the header's group and sender, the keys
/// the reader opens it with (`None`: it holds none, a group it is not in).
pub fn decode<'a, 'k>(
    buf: &'a mut [u8],
    session: u64,
    keys: impl FnOnce(u32, u32) -> Option<Opening<'k>>,
) -> Result<Datagram<'a>, WireError> {
    let (kind, seq, from, group, body) = open(buf, session, keys)?;
    // Authenticated: now every field is checked (any member of the group
    // holds its key, so a datagram that opens proves no shape).
    let body = match kind {
        KIND_DATA => data_body(body)?,
        KIND_CODED => coded_body(body)?,
        KIND_HEARTBEAT => heartbeat_body(body)?,
        KIND_NACK => nack_body(body)?,
        KIND_WITHDRAWN => withdrawn_body(body)?,
        KIND_PROBE => {
            if body.len() != 4 {
                return Err(WireError::Malformed("probe"));
            }
            Body::Probe {
                group,
                nonce: u32_at(body, 0),
            }
        }
        _ => return Err(WireError::Malformed("unknown kind")),
    };
    if body.group() != group {
        return Err(WireError::Malformed(
            "body of another group than the header's",
        ));
    }
    Ok(Datagram {
        session,
        seq,
        from,
        body,
    })
}

/// What [`open`] finds: kind, sequence, sender, group and decrypted body.
type Opened<'a> = (u8, u64, u32, u32, &'a [u8]);

/// Checks a datagram's header and opens it: its kind, sequence, sender,
/// group and (decrypted) body.
fn open<'a, 'k>(
    buf: &'a mut [u8],
    session: u64,
    keys: impl FnOnce(u32, u32) -> Option<Opening<'k>>,
) -> Result<Opened<'a>, WireError> {
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
    let (seq, from, group, tags) = (u64_at(buf, 10), u32_at(buf, 18), u32_at(buf, 22), buf[26]);
    let tags = tags as usize;
    if tags > MAX_TAGS || buf.len() < HEADER_LEN + MAC_LEN + tags * TAG_LEN {
        return Err(WireError::Length(buf.len()));
    }
    let opening = keys(group, from).ok_or(WireError::NoKey { group, from })?;
    let sealed_len = buf.len() - tags * TAG_LEN;
    let (sealed, member_tags) = buf.split_at_mut(sealed_len);
    let (head, rest) = sealed.split_at_mut(HEADER_LEN);
    let body_len = sealed_len - HEADER_LEN - MAC_LEN;
    let opened = if cleartext() {
        same_tag(
            &rest[body_len..],
            &blake3::keyed_hash(&opening.key.raw, head).as_bytes()[..MAC_LEN],
        )
    } else {
        // The body and the AEAD tag after it, decrypted in place.
        opening
            .key
            .aead
            .open_in_place(nonce(from, seq), Aad::from(&*head), rest)
            .is_ok()
    };
    if !opened {
        return Err(WireError::Forged);
    }
    let body = &rest[..body_len];
    if let Some((slot, member)) = opening.tag {
        if slot >= tags {
            return Err(WireError::Impostor);
        }
        let want = member_tag(
            member,
            &tagged_digest(head, &body[..tagged_len(kind, body)]),
        );
        let at = slot * TAG_LEN;
        if !same_tag(&member_tags[at..at + TAG_LEN], &want) {
            return Err(WireError::Impostor);
        }
    }
    Ok((kind, seq, from, group, body))
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

fn withdrawn_body(body: &[u8]) -> Result<Body<'_>, WireError> {
    if body.len() != 12 {
        return Err(WireError::Malformed("withdrawn"));
    }
    let (index, count) = (u32_at(body, 4), u32_at(body, 8));
    if count == 0 || index.checked_add(count).is_none() {
        return Err(WireError::Malformed("withdrawn range"));
    }
    Ok(Body::Withdrawn {
        group: u32_at(body, 0),
        index,
        count,
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

    /// A chain page's tag checks only for the receiver, session, page,
    /// frame and hash it was made for, at that receiver's place.
    #[test]
    fn a_chain_tag_checks_only_what_it_was_made_for() {
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        let h = PageHash::from_bytes([9; 32]);
        let other = PageHash::from_bytes([8; 32]);
        // Receivers 1 and 2, in id order.
        let mut tags = chain_tag(&k1, 5, 3, 6, &h).to_vec();
        tags.extend(chain_tag(&k2, 5, 3, 6, &h));
        assert!(chain_tag_ok(&k1, (5, 3, 6), &h, &tags, 1));
        assert!(chain_tag_ok(&k2, (5, 3, 6), &h, &tags, 2));
        assert!(
            !chain_tag_ok(&k2, (5, 3, 6), &h, &tags, 1),
            "another's place"
        );
        assert!(
            !chain_tag_ok(&k1, (5, 3, 6), &other, &tags, 1),
            "another hash"
        );
        assert!(!chain_tag_ok(&k1, (5, 4, 6), &h, &tags, 1), "another page");
        assert!(!chain_tag_ok(&k1, (5, 3, 7), &h, &tags, 1), "another frame");
        assert!(
            !chain_tag_ok(&k1, (4, 3, 6), &h, &tags, 1),
            "another session"
        );
        assert!(!chain_tag_ok(&k1, (5, 3, 6), &h, &tags, 0), "no receiver 0");
        assert!(
            !chain_tag_ok(&k2, (5, 3, 6), &h, &tags[..12], 2),
            "cut short"
        );
        assert!(!chain_tag_ok(&k1, (5, 3, 6), &h, &[], 1), "no tags");
    }

    static KEY: std::sync::LazyLock<GroupKey> = std::sync::LazyLock::new(|| GroupKey::new([9; 32]));
    /// The member keys of a group of two.
    const MEMBERS: [CastKey; 2] = [[1; 32], [2; 32]];
    static SEAL: std::sync::LazyLock<Sealing<'static>> = std::sync::LazyLock::new(|| Sealing {
        key: &KEY,
        tags: &MEMBERS,
    });
    const C: Check = [4; CHECK_LEN];

    /// Opens as member `slot` of the group would (the tag checked where
    /// the datagram is the sender's).
    fn member(slot: usize) -> impl FnOnce(u32, u32) -> Option<Opening<'static>> {
        move |_, from| {
            Some(Opening {
                key: &KEY,
                tag: (from == 0).then_some((slot, &MEMBERS[slot])),
            })
        }
    }

    fn encoded(d: &Datagram) -> Vec<u8> {
        let mut b = Vec::new();
        d.encode(&SEAL, &mut b);
        b
    }

    fn round(d: &Datagram) -> Datagram<'static> {
        let leaked: &'static mut [u8] = Box::leak(encoded(d).into_boxed_slice());
        decode(leaked, d.session, member(1)).unwrap()
    }

    /// What the planner is told a page costs on a link is what the
    /// datagrams the sender makes take, headers and member tags included.
    #[test]
    fn a_page_on_the_link_is_its_datagrams_share() {
        for tags in [1, 2, 16] {
            let keys = vec![[3u8; 32]; tags];
            let sealing = Sealing {
                key: &KEY,
                tags: &keys,
            };
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
                .encode(&sealing, &mut b);
                b.len() + 14 + 20 + 8
            };
            // Jumbo frames: two pages a datagram.
            assert_eq!(pages_per_datagram(9000, tags), 2);
            let two = encoded(2, 2 * PAGE_SIZE) as f64 / 2.0;
            assert!(
                (link_bytes_per_page(9000, tags) - two).abs() < 1e-9,
                "{two}"
            );
            // 1500 bytes: fragments of one size, each a datagram.
            assert_eq!(pages_per_datagram(1500, tags), 0);
            let n = PAGE_SIZE.div_ceil(fragment_payload(1500, tags));
            let frag = PAGE_SIZE.div_ceil(n);
            // Each fragment's IP packet fits the MTU.
            assert!(encoded(1, frag) - 14 <= 1500);
            let page = (n * encoded(1, frag)) as f64;
            assert!(
                (link_bytes_per_page(1500, tags) - page).abs() < 1e-9,
                "{page}"
            );
            assert!(link_bytes_per_page(1500, tags) > link_bytes_per_page(9000, tags));
        }
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
            Body::Probe {
                group: 5,
                nonce: 42,
            },
            Body::Withdrawn {
                group: 4,
                index: 310,
                count: 3,
            },
        ] {
            for from in [0, 4] {
                let d = Datagram {
                    session: 0xfeed,
                    seq: 99,
                    from,
                    body: body.clone(),
                };
                assert_eq!(round(&d), d);
            }
        }
    }

    #[test]
    fn forged_stale_and_malformed_are_told_apart() {
        let d = Datagram {
            session: 7,
            seq: 1,
            from: 0,
            body: Body::Probe { group: 0, nonce: 1 },
        };
        let b = encoded(&d);
        let wrong = GroupKey::new([8; 32]);
        let other = |_, _| {
            Some(Opening {
                key: &wrong,
                tag: None,
            })
        };
        assert_eq!(decode(&mut b.clone(), 7, other), Err(WireError::Forged));
        assert_eq!(
            decode(&mut b.clone(), 8, member(0)),
            Err(WireError::Stale { got: 7, want: 8 })
        );
        assert_eq!(
            decode(&mut b.clone(), 7, |_, _| None),
            Err(WireError::NoKey { group: 0, from: 0 })
        );
        let mut flipped = b.clone();
        flipped[HEADER_LEN] ^= 1;
        assert_eq!(decode(&mut flipped, 7, member(0)), Err(WireError::Forged));
        let mut tag_flipped = b.clone();
        *tag_flipped.last_mut().unwrap() ^= 1;
        assert_eq!(
            decode(&mut tag_flipped.clone(), 7, member(1)),
            Err(WireError::Impostor)
        );
        assert!(
            decode(&mut tag_flipped, 7, member(0)).is_ok(),
            "member 0's tag is intact"
        );
        let unchecked = |_, _| {
            Some(Opening {
                key: &KEY,
                tag: None,
            })
        };
        assert_eq!(decode(&mut flipped, 7, unchecked), Err(WireError::Forged));
        assert_eq!(
            decode(&mut b.clone()[..20], 7, member(0)),
            Err(WireError::Length(20))
        );
        let mut v9 = b.clone();
        v9[0] = 9;
        assert_eq!(decode(&mut v9, 7, member(0)), Err(WireError::Version(9)));
        // The header is authenticated too: another sequence number (or
        // sender) is another nonce, and the datagram does not open.
        let mut reseq = b.clone();
        reseq[17] ^= 1;
        assert_eq!(decode(&mut reseq, 7, unchecked), Err(WireError::Forged));
        // A tag count past the datagram, or past the most there can be.
        let mut tags = b.clone();
        tags[26] = 200;
        assert!(matches!(
            decode(&mut tags, 7, member(0)),
            Err(WireError::Length(_))
        ));
    }

    /// Datagrams that open but whose fields are impossible are malformed;
    /// every byte after the header is authenticated.
    #[test]
    fn impossible_fields_are_malformed_and_every_byte_is_authenticated() {
        let unchecked = |_, _| {
            Some(Opening {
                key: &KEY,
                tag: None,
            })
        };
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
        assert_eq!(
            decode(&mut encoded(&data(3, 2)), 7, member(0)),
            Err(WireError::Malformed("fragment numbering"))
        );
        // A withdrawal of no page, or of pages past the last index.
        for (index, count) in [(5, 0), (u32::MAX, 2)] {
            let w = Datagram {
                session: 7,
                seq: 1,
                from: 0,
                body: Body::Withdrawn {
                    group: 0,
                    index,
                    count,
                },
            };
            assert_eq!(
                decode(&mut encoded(&w), 7, member(0)),
                Err(WireError::Malformed("withdrawn range"))
            );
        }
        // Every byte is authenticated: the check in the head and the
        // payload alike.
        let b = encoded(&data(0, 1));
        assert!(decode(&mut b.clone(), 7, member(0)).is_ok());
        let mut other = b.clone();
        other[HEADER_LEN + DATA_HEAD + 10] ^= 1;
        assert_eq!(decode(&mut other, 7, unchecked), Err(WireError::Forged));
        let mut payload_changed = b.clone();
        payload_changed[HEADER_LEN + DATA_HEAD + DATA_ENTRY] ^= 1;
        assert_eq!(
            decode(&mut payload_changed, 7, unchecked),
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
        assert!(matches!(
            decode(&mut encoded(&short), 7, member(0)),
            Err(WireError::Malformed(_))
        ));
        // A body of another group than the header names.
        let mut raw = raw_header(KIND_HEARTBEAT);
        raw[22..26].copy_from_slice(&1u32.to_be_bytes());
        for field in [0u32, 0, 1] {
            raw.extend_from_slice(&field.to_be_bytes());
        }
        raw.push(0);
        seal(&SEAL, &mut raw);
        assert_eq!(
            decode(&mut raw, 7, member(0)),
            Err(WireError::Malformed(
                "body of another group than the header's"
            ))
        );
    }

    /// A member holds its group's key and its own member key, and nothing
    /// else: it cannot open another group's datagrams, and a datagram it
    /// makes as the sender (sealed under the group key, with its own tag
    /// right and a guess for the others') is refused by the other member.
    #[test]
    fn a_member_can_neither_open_other_groups_nor_speak_for_the_sender() {
        let page = [0x11u8; PAGE_SIZE];
        let d = Datagram {
            session: 7,
            seq: 5,
            from: 0,
            body: Body::Data {
                group: 0,
                index: 0,
                fragment: 0,
                fragments: 1,
                pages: vec![(1, C)],
                payload: &page,
            },
        };
        // Another group's key does not open it.
        let other_group = GroupKey::new([0x77u8; 32]);
        let mut b = encoded(&d);
        let foreign = |_, _| {
            Some(Opening {
                key: &other_group,
                tag: None,
            })
        };
        assert_eq!(decode(&mut b, 7, foreign), Err(WireError::Forged));
        // Member 0 forges: the group key, its own key, and every other key
        // it could guess (none is member 1's).
        let guesses = [MEMBERS[0], [0u8; 32]];
        let mut forged = Vec::new();
        d.encode(
            &Sealing {
                key: &KEY,
                tags: &guesses,
            },
            &mut forged,
        );
        assert!(decode(&mut forged.clone(), 7, member(0)).is_ok());
        assert_eq!(
            decode(&mut forged.clone(), 7, member(1)),
            Err(WireError::Impostor)
        );
        // Nor does a datagram with fewer tags than member 1's place pass.
        let mut one = Vec::new();
        d.encode(
            &Sealing {
                key: &KEY,
                tags: &MEMBERS[..1],
            },
            &mut one,
        );
        assert_eq!(decode(&mut one, 7, member(1)), Err(WireError::Impostor));
        // The sender's own datagram opens for both.
        for m in 0..2 {
            assert_eq!(decode(&mut encoded(&d), 7, member(m)).unwrap(), d);
        }
    }

    /// What an eavesdropper on the group sees: no byte of a page, no check
    /// of its hash; only the header (version, kind, session, sequence,
    /// sender, group) is in the clear.
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
        let mut b = encoded(&d);
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
        let again = encoded(&Datagram {
            seq: 4,
            ..d.clone()
        });
        assert_ne!(b[HEADER_LEN..], again[HEADER_LEN..]);
        assert_eq!(decode(&mut b, 7, member(0)).unwrap(), d);
    }

    /// A header in the clear (tags counted by `seal`).
    fn raw_header(kind: u8) -> Vec<u8> {
        let mut b = vec![DATAGRAM_VERSION, kind];
        b.extend_from_slice(&7u64.to_be_bytes());
        b.extend_from_slice(&1u64.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.push(0);
        b
    }

    /// Found by the `datagram` fuzz target: a data datagram with a body
    /// shorter than its head, authenticated over all of it, once indexed
    /// past its end.
    #[test]
    fn truncated_heads_are_refused_whatever_the_mac() {
        for kind in [KIND_DATA, KIND_CODED] {
            for body_len in 0..12 {
                let mut b = raw_header(kind);
                b.extend(std::iter::repeat_n(0xbe, body_len));
                seal(&SEAL, &mut b);
                assert!(matches!(
                    decode(&mut b, 7, member(0)),
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
        assert_eq!(fragment_payload(65536, 3), PAGE_SIZE);
        assert_eq!(fragment_payload(9000, 3), PAGE_SIZE);
        assert_eq!(
            fragment_payload(1500, 3),
            1500 - 20 - 8 - HEADER_LEN - DATA_HEAD - DATA_ENTRY - MAC_LEN - 3 * TAG_LEN
        );
        assert_eq!(pages_per_datagram(1500, 3), 0);
        assert_eq!(pages_per_datagram(4500, 3), 1);
        assert_eq!(pages_per_datagram(9000, 3), 2);
        assert_eq!(pages_per_datagram(65536, 3), 2);
        // Two pages fit a jumbo frame with the most tags.
        assert_eq!(pages_per_datagram(9000, MAX_TAGS), 2);
        // At 1,500 bytes a page takes three fragments to a group of up to
        // three, and a group of the most members still fits it in eight.
        assert_eq!(PAGE_SIZE.div_ceil(fragment_payload(1500, 3)), 3);
        assert!(PAGE_SIZE.div_ceil(fragment_payload(1500, MAX_TAGS)) <= MAX_FRAGMENTS as usize);
    }

    proptest! {
        /// Whatever bytes a chain page carries as tags and whatever id,
        /// the check never panics and passes only where the receiver's
        /// place holds its own tag.
        #[test]
        fn a_chain_tag_check_takes_any_bytes(
            tags in proptest::collection::vec(any::<u8>(), 0..200),
            id in any::<u32>(),
            page in any::<u32>(),
        ) {
            let (key, h) = ([3u8; 32], PageHash::from_bytes([4; 32]));
            let ok = chain_tag_ok(&key, (1, page, 2), &h, &tags, id);
            let want = (id as usize).checked_sub(1).and_then(|i| {
                tags.get(i * TAG_LEN..(i + 1) * TAG_LEN)
            }) == Some(&chain_tag(&key, 1, page, 2, &h)[..]);
            prop_assert_eq!(ok, want);
        }

        #[test]
        fn garbage_never_panics(mut b in proptest::collection::vec(any::<u8>(), 0..200), session in any::<u64>()) {
            let _ = decode(&mut b, session, member(0));
        }

        /// Any body sealed under the group key, tagged, reaches the field checks,
        /// which refuse or accept it without panicking.
        #[test]
        fn sealed_garbage_never_panics(kind in 0u8..8, body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut b = raw_header(kind);
            b.extend_from_slice(&body);
            seal(&SEAL, &mut b);
            if let Err(e) = decode(&mut b, 7, member(1)) {
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
