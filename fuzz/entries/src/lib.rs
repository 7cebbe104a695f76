//! The bodies of pagecast's fuzz targets: one function per decoder that
//! reads bytes from the network or a file. Each takes arbitrary bytes and
//! must return without panicking, hanging or allocating beyond its
//! bounds; where the decoder accepts, the function checks that what it
//! decoded encodes back to the same thing.
//!
//! Two callers run them:
//! - `fuzz/fuzz_targets/<name>.rs`, under libFuzzer with cargo-fuzz, for
//!   as long as one likes (docs/testing.md says how);
//! - the test command (`tests/seeds.rs` here), over every file committed
//!   under `fuzz/seeds/<name>/` and a bounded number of inputs derived
//!   from them ([`mutate`]), in seconds.
//!
//! [`seeds`] writes the valid inputs the corpus starts from
//! (`cargo run -p pagecast-fuzz-entries --bin pagecast-fuzz-seeds`).

use std::collections::VecDeque;
use std::time::Duration;

use pagecast_agent_api::answers::{ContentParts, MAX_HASHES, MigrationReports};
use pagecast_agent_api::client::MigrationEvent;
use pagecast_channel::FrameDecoder;
use pagecast_index::chunks::{Reassembler, split};
use pagecast_index::command::{Command, generic_deltas};
use pagecast_index::holders::HolderList;
use pagecast_index::snapshot::{encode_record, records};
use pagecast_index::wire::{decode_frame, encode_frame, read_frame};
use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_memory::manifest::ManifestDecoder;
use pagecast_migrate::{MigrationError, MigrationLink, NoLocalContent, migrate_in};
use pagecast_proto::v1;
use pagecast_proto::v1::index_frame::Kind;
use pagecast_qemu::{PAGE, Sink, StreamError, proxy};
use prost::Message;

pub mod mutate;
pub mod seeds;

/// A fuzz target: its name (its file under `fuzz/fuzz_targets/`, its
/// folder under `fuzz/seeds/`) and its body.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// The name.
    pub name: &'static str,
    /// The body.
    pub run: fn(&[u8]),
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "manifest_chunk",
        run: manifest_chunk,
    },
    Target {
        name: "datagram",
        run: datagram,
    },
    Target {
        name: "control_frame",
        run: control_frame,
    },
    Target {
        name: "migrate_frames",
        run: migrate_frames,
    },
    Target {
        name: "index_frame",
        run: index_frame,
    },
    Target {
        name: "qemu_stream",
        run: qemu_stream,
    },
    Target {
        name: "qemu_return_path",
        run: qemu_return_path,
    },
    Target {
        name: "raft_chunks",
        run: raft_chunks,
    },
    Target {
        name: "snapshot",
        run: snapshot,
    },
    Target {
        name: "agent_response",
        run: agent_response,
    },
    Target {
        name: "cert_subject",
        run: cert_subject,
    },
];

/// The target of that name.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().copied().find(|t| t.name == name)
}

/// The manifest decoder, fed a header (the first byte says how long) and
/// chunks separated by 0xff bytes. A manifest it accepts survives a round
/// trip through the encoder unchanged.
pub fn manifest_chunk(data: &[u8]) {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let (header, rest) = data.split_at((split as usize * 2).min(data.len()));
    let Ok(mut d) = ManifestDecoder::from_header_bytes(header) else {
        return;
    };
    for piece in rest.split(|&b| b == 0xff) {
        let _ = d.push_bytes(piece);
    }
    if let Ok(m) = d.finish() {
        let mut again = ManifestDecoder::new(&m.header()).expect("own header");
        for c in m.chunks(1 + split as u32) {
            again.push_bytes(&c.encode_to_vec()).expect("own chunk");
        }
        assert_eq!(again.finish().expect("own manifest"), m);
    }
}

/// The group key the `datagram` target and its seeds seal with.
pub const DATAGRAM_KEY: [u8; 32] = [7; 32];
/// The member keys they tag the datagrams with (the reader is member 1).
pub const DATAGRAM_MEMBERS: [[u8; 32]; 2] = [[8; 32], [9; 32]];

/// A cast datagram as received, then the same bytes sealed as a sender
/// would (so the checks behind the tags run); an accepted datagram
/// re-encodes byte for byte.
pub fn datagram(data: &[u8]) {
    use pagecast_multicast::wire::{GroupKey, HEADER_LEN, Opening, Sealing, decode, seal};
    let key = GroupKey::new(DATAGRAM_KEY);
    let open = |_, from| {
        Some(Opening {
            key: &key,
            tag: (from == 0).then_some((1, &DATAGRAM_MEMBERS[1])),
        })
    };
    let sealing = Sealing {
        key: &key,
        tags: &DATAGRAM_MEMBERS,
    };
    let _ = decode(&mut data.to_vec(), 0x1234, open);
    if data.len() < HEADER_LEN {
        return;
    }
    let mut plain = data.to_vec();
    plain[2..10].copy_from_slice(&0x1234u64.to_be_bytes());
    let mut sealed = plain;
    seal(&sealing, &mut sealed);
    let original = sealed.clone();
    if let Ok(d) = decode(&mut sealed, 0x1234, open) {
        let mut again = Vec::new();
        d.encode(&sealing, &mut again);
        assert_eq!(again, original);
    }
}

/// The plaintext a TLS connection delivers: the frame layer and the cast,
/// agent-request and migration decoders, whatever the lengths claim.
pub fn control_frame(data: &[u8]) {
    let mut d = FrameDecoder;
    let mut input = data;
    while let Ok(p) = d.next(&mut input, "fuzz") {
        if let Ok(v1::CastFrame {
            body: Some(v1::cast_frame::Body::Welcome(w)),
        }) = v1::CastFrame::decode(&p[..])
        {
            // What a receiver does with a welcome: bounded by its pages.
            if let Ok(pages) = pagecast_multicast::receiver::check_welcome("fuzz", &w) {
                assert!(pages <= w.total_pages as usize);
            }
        }
        let _ = v1::AgentRequest::decode(&p[..]);
        let _ = v1::MigrateFrame::decode(&p[..]);
    }
    let mut framed = (data.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(data);
    if data.len() <= pagecast_proto::MAX_CONTROL_FRAME_BYTES {
        let p = d.next(&mut &framed[..], "fuzz").expect("own frame");
        assert_eq!(p, data);
    }
    let _ = v1::AgentRequest::decode(data);
}

struct Script(VecDeque<Result<v1::migrate_frame::Body, MigrationError>>);

impl MigrationLink for Script {
    fn send(&mut self, _: v1::migrate_frame::Body) -> Result<(), MigrationError> {
        Ok(())
    }
    fn recv(&mut self, _: Option<Duration>) -> Result<v1::migrate_frame::Body, MigrationError> {
        self.0.pop_front().unwrap_or(Err(MigrationError::Timeout {
            peer: "the fuzzer".into(),
            what: "frame",
            after: Duration::ZERO,
        }))
    }
}

/// A migration destination played the frames a source sends (each: a
/// 2-byte little-endian length, then a `MigrateFrame`), guest memory
/// capped at 64 pages. It refuses, aborts or finishes, and hands memory of
/// exactly the announced size to `start`.
pub fn migrate_frames(data: &[u8]) {
    thread_local! {
        static FP: Fingerprinter = Fingerprinter::new(1).expect("pool");
    }
    let mut frames = VecDeque::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let n = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let f = match v1::MigrateFrame::decode(&rest[2..2 + n]) {
            Ok(v1::MigrateFrame { body: Some(b) }) => Ok(b),
            Ok(_) => Err(MigrationError::Protocol("empty migration frame".into())),
            Err(e) => Err(MigrationError::Protocol(e.to_string())),
        };
        frames.push_back(f);
        rest = &rest[2 + n..];
    }
    let Some(Ok(v1::migrate_frame::Body::Begin(mut begin))) = frames.pop_front() else {
        return;
    };
    begin.memory_bytes = begin.memory_bytes.min(64 * 4096);
    let mut link = Script(frames);
    FP.with(|fp| {
        let _ = migrate_in(
            &mut link,
            &begin,
            &NoLocalContent,
            fp,
            &mut |region, _state| {
                assert_eq!(region.len() as u64, begin.memory_bytes);
                Ok(0)
            },
        );
    });
}

/// A stream of content-index frames, the same bytes as a stored holder
/// list, and as a committed command: accepted frames and lists re-encode,
/// and a deltas command the replicas' fast path reads is what prost reads.
pub fn index_frame(data: &[u8]) {
    if let Some(c @ Command::Deltas { .. }) = Command::decode(data) {
        assert_eq!(Some(c), generic_deltas(data));
    }
    let mut rest = data;
    while let Ok((frame, used)) = decode_frame(rest, "fuzz") {
        let again = encode_frame(&frame);
        assert_eq!(decode_frame(&again, "fuzz").expect("own frame").0, frame);
        rest = &rest[used..];
    }
    let mut r = data;
    while read_frame(&mut r, "fuzz").is_ok() {}
    if let Ok(l) = HolderList::decode(data) {
        assert_eq!(l.encode(), data);
    }
}

struct Join(Vec<u8>);

impl Sink for Join {
    fn raw(&mut self, b: &[u8]) -> Result<(), StreamError> {
        self.0.extend_from_slice(b);
        Ok(())
    }
    fn page(&mut self, _: &str, _: u64, p: &[u8; PAGE]) -> Result<(), StreamError> {
        self.0.extend_from_slice(p);
        Ok(())
    }
}

/// A QEMU migration stream reaching the source agent's proxy: refused or
/// passed through, and what it accepts comes back byte for byte.
pub fn qemu_stream(data: &[u8]) {
    let mut j = Join(Vec::new());
    if proxy(&mut &data[..], &mut j).is_ok() {
        assert_eq!(j.0, data);
    }
}

/// What a destination host relays from its QEMU's return path, as the
/// source agent checks it before its QEMU reads it: in pieces cut where the
/// input's 0xff bytes are, an answer for each, never a panic; once refused,
/// refused for good; and what passes is only whole `PONG`s and at most one
/// final `SHUT`.
pub fn qemu_return_path(data: &[u8]) {
    use pagecast_qemu::return_path::{RP_PONG, RP_SHUT, ReturnPath, message};
    let mut rp = ReturnPath::new();
    let mut refused = false;
    let mut passed = Vec::new();
    for piece in data.split(|&b| b == 0xff) {
        let r = rp.push(piece);
        if refused && !piece.is_empty() {
            assert!(r.is_err(), "a refused return path passed more");
        }
        if r.is_ok() && !refused {
            passed.extend_from_slice(piece);
        }
        refused |= r.is_err();
    }
    if refused {
        return;
    }
    // What passed is PONGs and maybe a SHUT, then the start of a message.
    let whole = passed.len() / 8 * 8;
    for (i, m) in passed[..whole].chunks(8).enumerate() {
        let value = u32::from_be_bytes(m[4..].try_into().expect("4"));
        let last = (i + 1) * 8 == whole;
        let kind = u16::from_be_bytes([m[0], m[1]]);
        assert!(kind == RP_PONG || (kind == RP_SHUT && last), "{m:?}");
        assert_eq!(m, message(kind, value));
    }
    assert_eq!(
        rp.pongs() + u64::from(rp.shut().is_some()),
        (whole / 8) as u64
    );
}

/// Raft messages in parts, as a replica's peer link reads them: index
/// frames whose raft parts go to a reassembler (4 shards, 64 KiB
/// messages), which never holds or yields more than its limit. Then the
/// bytes as one message, cut into parts and put back together unchanged.
pub fn raft_chunks(data: &[u8]) {
    const MAX: usize = 1 << 16;
    let mut r = Reassembler::with_limit(4, MAX);
    let mut rest = data;
    while let Ok((frame, used)) = decode_frame(rest, "fuzz") {
        rest = &rest[used..];
        if let Some(Kind::Raft(c)) = frame.kind {
            if let Ok(Some((shard, m))) = r.push(c) {
                assert!(shard < 4 && m.len() <= MAX);
            }
            assert!(r.held() <= MAX);
        }
    }
    let Some((&size, msg)) = data.split_first() else {
        return;
    };
    let msg = &msg[..msg.len().min(MAX)];
    let mut again = Reassembler::with_limit(4, MAX);
    let mut got = None;
    for c in split(1, msg, usize::from(size) + 1) {
        assert!(got.is_none(), "a message completes only at its last part");
        got = again.push(c).expect("own parts");
    }
    if !msg.is_empty() {
        assert_eq!(got, Some((1, msg.to_vec())));
    }
}

/// A shard's snapshot as a follower restores it (the first byte picks the
/// shard of 4): the records it accepts re-encode to the bytes they came
/// from, and read back the same.
pub fn snapshot(data: &[u8]) {
    let Some((&sel, data)) = data.split_first() else {
        return;
    };
    let (shard, shards) = (u32::from(sel % 4), 4);
    let mut again = Vec::new();
    let mut accepted = 0;
    for r in records(shard, shards, data) {
        let Ok(r) = r else {
            break;
        };
        encode_record(&mut again, r.column, r.key, r.value);
        accepted += 1;
    }
    assert_eq!(&data[..again.len()], &again[..]);
    assert_eq!(
        records(shard, shards, &again).filter(Result::is_ok).count(),
        accepted
    );
}

/// An agent's answers as a client reads them off the channel: framed
/// `AgentResponse`s fed to the assemblers of a VM's contents and of a
/// migration's reports (a fresh one after a refusal, as a client would
/// reconnect). Nothing yields more hashes than the bound.
pub fn agent_response(data: &[u8]) {
    let mut d = FrameDecoder;
    let mut input = data;
    let mut content = ContentParts::default();
    let mut reports = MigrationReports::default();
    while let Ok(p) = d.next(&mut input, "fuzz") {
        let Ok(r) = v1::AgentResponse::decode(&p[..]) else {
            continue;
        };
        match content.push(r.clone()) {
            Ok(Some(c)) => assert!(c.hashes.len() as u64 <= MAX_HASHES),
            Ok(None) => {}
            Err(_) => content = ContentParts::default(),
        }
        match reports.push(r) {
            Ok(Some(MigrationEvent::Held(h, _))) => assert!(h.len() as u64 <= MAX_HASHES),
            Ok(_) => {}
            Err(_) => reports = MigrationReports::default(),
        }
    }
}

/// A peer's certificate (DER) as the channel reads who it is: refused, or
/// a non-empty name and a role that prints and parses back to itself.
pub fn cert_subject(data: &[u8]) {
    if let Ok(id) = pagecast_channel::identity_of(data) {
        assert!(!id.name.is_empty());
        assert_eq!(id.role.to_string().parse(), Ok(id.role));
    }
}
