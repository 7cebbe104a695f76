//! Valid inputs for every target, made with the real encoders: the seeds
//! committed under `fuzz/seeds/<target>/`, from which the fuzzer and the
//! test command's generated inputs start. Written by
//! `cargo run -p pagecast-fuzz-entries --bin pagecast-fuzz-seeds`.

use pagecast_index::chunks::split;
use pagecast_index::holders::HolderList;
use pagecast_index::keys;
use pagecast_index::snapshot::{Column, encode_record};
use pagecast_index::wire::encode_frame;
use pagecast_memory::manifest::Manifest;
use pagecast_multicast::wire::{Body, Datagram, check_of};
use pagecast_pages::{PAGE_SIZE, PageHash, SplitMix64};
use pagecast_proto::v1;
use pagecast_proto::v1::index_frame::Kind;
use prost::Message;

/// Targets whose seeds differ on every run: `cert_subject`'s are
/// certificates of a certificate authority made for the run (fresh keys,
/// the time of issue). Every other target's seeds are the same bytes on
/// every run, so those committed can be checked against this module.
pub const FRESH_EACH_RUN: &[&str] = &["cert_subject"];

/// The seeds of target `name` (none for an unknown name).
pub fn of(name: &str) -> Vec<Vec<u8>> {
    match name {
        "manifest_chunk" => manifest_chunk(),
        "datagram" => datagram(),
        "control_frame" => control_frame(),
        "migrate_frames" => migrate_frames(),
        "index_frame" => index_frame(),
        "qemu_stream" => qemu_stream(),
        "qemu_return_path" => qemu_return_path(),
        "raft_chunks" => raft_chunks(),
        "snapshot" => snapshot(),
        "agent_response" => agent_response(),
        "cert_subject" => cert_subject(),
        _ => Vec::new(),
    }
}

/// A hash with no 0xff byte (the manifest target splits chunks at 0xff).
fn hash(seed: u64) -> PageHash {
    let mut rng = SplitMix64::new(seed);
    let mut b = [0u8; 32];
    rng.fill(&mut b);
    for x in &mut b {
        *x = (*x).clamp(1, 0xfe);
    }
    PageHash::from_bytes(b)
}

fn manifest(vm: &str, frames: u64) -> Manifest {
    Manifest {
        vm: vm.to_owned(),
        hashes: (0..frames)
            .map(|f| {
                if f % 5 == 4 {
                    PageHash::ZERO_PAGE
                } else {
                    hash(f % 7)
                }
            })
            .collect(),
    }
}

fn manifest_chunk() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (frames, chunk) in [(12u64, 5u32), (3, 1), (40, 64)] {
        // A header of even length: the target reads twice the first byte.
        let m = (0..)
            .map(|i| manifest(&format!("vm{i}"), frames))
            .find(|m| m.header().encoded_len() % 2 == 0)
            .expect("some name gives an even header");
        let header = m.header().encode_to_vec();
        let mut b = vec![(header.len() / 2) as u8];
        b.extend_from_slice(&header);
        for (i, c) in m.chunks(chunk).enumerate() {
            if i > 0 {
                b.push(0xff);
            }
            b.extend_from_slice(&c.encode_to_vec());
        }
        out.push(b);
    }
    out
}

fn datagram() -> Vec<Vec<u8>> {
    let page = vec![0x5au8; PAGE_SIZE];
    let bodies = [
        Body::Data {
            group: 0,
            index: 3,
            fragment: 0,
            fragments: 1,
            pages: vec![(9, check_of(&hash(1)))],
            payload: &page,
        },
        Body::Data {
            group: 1,
            index: 0,
            fragment: 1,
            fragments: 3,
            pages: vec![(2, check_of(&hash(2)))],
            payload: &page[..1400],
        },
        Body::Coded {
            group: 0,
            pages: vec![(1, 4, check_of(&hash(3))), (2, 5, check_of(&hash(4)))],
            payload: &page,
        },
        Body::Heartbeat {
            group: 2,
            sent_through: 10,
            group_len: 20,
            done: false,
        },
        Body::Nack {
            group: 0,
            seen_through: 77,
            ranges: vec![(1, 2), (8, 1)],
        },
        Body::Probe {
            group: 1,
            nonce: 42,
        },
        Body::Withdrawn {
            group: 0,
            index: 5,
            count: 2,
        },
    ];
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let mut b = Vec::new();
            Datagram {
                session: 0x1234,
                seq: i as u64 + 1,
                from: (i % 2) as u32,
                body,
            }
            .encode(
                &pagecast_multicast::wire::Sealing {
                    key: &pagecast_multicast::wire::GroupKey::new(crate::DATAGRAM_KEY),
                    tags: &crate::DATAGRAM_MEMBERS,
                },
                &mut b,
            );
            b
        })
        .collect()
}

fn control_frame() -> Vec<Vec<u8>> {
    use pagecast_channel::frame;
    let req = v1::AgentRequest {
        body: Some(v1::agent_request::Body::VmList(v1::VmListRequest {})),
    };
    let content = v1::AgentRequest {
        body: Some(v1::agent_request::Body::VmContent(v1::VmContentRequest {
            name: "web1".into(),
            job: String::new(),
        })),
    };
    let begin = v1::MigrateFrame {
        body: Some(v1::migrate_frame::Body::Begin(begin(8))),
    };
    let cast = v1::CastFrame::default();
    let mut all = frame(&req);
    all.extend(frame(&begin));
    all.extend(frame(&cast));
    vec![frame(&req), frame(&content), frame(&begin), all]
}

fn begin(pages: u64) -> v1::MigrateBegin {
    v1::MigrateBegin {
        version: pagecast_proto::MIGRATE_WIRE_VERSION as i32,
        vm: "vm1".into(),
        memory_bytes: pages * PAGE_SIZE as u64,
        dirty_rate: 100,
        origin: "seed".into(),
        ..Default::default()
    }
}

fn migrate_frames() -> Vec<Vec<u8>> {
    use v1::migrate_frame::Body as B;
    let script = |bodies: Vec<B>| {
        let mut out = Vec::new();
        for b in bodies {
            let f = v1::MigrateFrame { body: Some(b) }.encode_to_vec();
            out.extend_from_slice(&(f.len() as u16).to_le_bytes());
            out.extend_from_slice(&f);
        }
        out
    };
    // Four pages: frames 0 and 2 hold one content, 1 is zero, 3 another.
    let data: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i + 1; PAGE_SIZE]).collect();
    let h: Vec<PageHash> = data
        .iter()
        .map(|d| pagecast_pages::ContentKey::CLUSTER.hash_page(d.as_slice().try_into().unwrap()))
        .collect();
    let m = Manifest {
        vm: "vm1".into(),
        hashes: vec![h[0], PageHash::ZERO_PAGE, h[0], h[3]],
    };
    let mut bodies = vec![B::Begin(begin(4)), B::ManifestHeader(m.header())];
    bodies.extend(m.chunks(2).map(B::ManifestChunk));
    let mut pages_data = data[0].clone();
    pages_data.extend_from_slice(&data[3]);
    let mut hashes = h[0].as_bytes().to_vec();
    hashes.extend_from_slice(h[3].as_bytes());
    bodies.push(B::Pages(v1::Pages {
        frames: vec![0, 3],
        hashes: hashes.into(),
        data: pages_data.into(),
        round: 0,
    }));
    // The same up to the switchover, then post-copy: frame 3 still to come.
    let mut post = bodies.clone();
    if let Some(B::Begin(b)) = post.first_mut() {
        b.postcopy = true;
    }
    post.push(B::Switchover(v1::Switchover {
        round: 1,
        postcopy: true,
    }));
    post.push(B::PostcopyMissing(v1::PostcopyMissing {
        frames: vec![3],
        last: true,
        digest: vec![0; 32].into(),
    }));
    bodies.push(B::Switchover(v1::Switchover {
        round: 1,
        postcopy: false,
    }));
    let vcpu = B::Vcpu(v1::VcpuState {
        regs: vec![0; 144].into(),
        sregs: vec![0; 312].into(),
    });
    post.push(vcpu.clone());
    post.push(B::Commit(v1::Commit {}));
    bodies.push(vcpu);
    bodies.push(B::Digest(v1::Digest {
        digest: vec![0; 32].into(),
        full: Vec::new().into(),
    }));
    bodies.push(B::Commit(v1::Commit {}));
    vec![
        script(bodies),
        script(post),
        script(vec![B::Begin(begin(1 << 40))]),
        script(vec![B::Begin(begin(2)), B::Abort(v1::Abort::default())]),
    ]
}

fn index_frame() -> Vec<Vec<u8>> {
    let hello = v1::IndexFrame {
        kind: Some(Kind::Hello(v1::IndexHello {
            peer_id: 2,
            shards: 4,
        })),
    };
    let raft = v1::IndexFrame {
        kind: Some(Kind::Raft(v1::RaftChunk {
            shard: 1,
            data: vec![8, 1, 16, 2].into(),
            more: false,
        })),
    };
    let mut both = encode_frame(&hello);
    both.extend(encode_frame(&raft));
    let mut l = HolderList::default();
    l.apply(1, 3);
    l.apply(40, 1);
    // A committed deltas command, as a replica reads it from its entry.
    let deltas = v1::IndexCommand {
        client: 9,
        seq: 300,
        op: Some(v1::index_command::Op::Deltas(v1::HolderDeltas {
            deltas: (0..3u8)
                .map(|i| v1::HolderDelta {
                    hash: vec![i + 1; 32].into(),
                    host: u32::from(i) * 200,
                    frames: 1 - i64::from(i),
                    before: u64::from(i),
                })
                .collect(),
        })),
    };
    vec![
        encode_frame(&hello),
        both,
        l.encode(),
        prost::Message::encode_to_vec(&deltas),
    ]
}

fn qemu_stream() -> Vec<Vec<u8>> {
    use pagecast_qemu::stream::sample::{Rec, write};
    let blocks: &[(&str, u64)] = &[("mem", 16 << 12), ("pc.bios", 2 << 12)];
    vec![
        write(blocks, &[], false),
        write(
            blocks,
            &[
                Rec::Zero(0, 1),
                Rec::Page(0, 2, 7),
                Rec::Eos,
                Rec::Page(1, 0, 9),
            ],
            true,
        ),
    ]
}

fn qemu_return_path() -> Vec<Vec<u8>> {
    use pagecast_qemu::return_path::{RP_PONG, RP_SHUT, message};
    let mut pong_shut = message(RP_PONG, 1).to_vec();
    pong_shut.extend_from_slice(&message(RP_SHUT, 0));
    vec![message(RP_SHUT, 0).to_vec(), pong_shut]
}

fn raft_chunks() -> Vec<Vec<u8>> {
    let msg: Vec<u8> = (0..700u32).map(|i| (i * 7) as u8).collect();
    [(0u32, 100usize), (3, 699), (2, 701)]
        .iter()
        .map(|&(shard, part)| {
            let mut b = Vec::new();
            for c in split(shard, &msg, part) {
                b.extend(encode_frame(&v1::IndexFrame {
                    kind: Some(Kind::Raft(c)),
                }));
            }
            b
        })
        .collect()
}

fn snapshot() -> Vec<Vec<u8>> {
    (0..4u32)
        .map(|shard| {
            let mut b = vec![shard as u8];
            // A hash whose first byte lies in the shard's quarter.
            let mut h = *hash(u64::from(shard)).as_bytes();
            h[0] = (shard * 64 + 5) as u8;
            let mut l = HolderList::default();
            l.apply(shard + 1, 2);
            encode_record(
                &mut b,
                Column::Holders,
                &keys::holders(&PageHash::from_bytes(h)),
                &l.encode(),
            );
            encode_record(&mut b, Column::Meta, &keys::applied(shard), &[1; 24]);
            b
        })
        .collect()
}

fn agent_response() -> Vec<Vec<u8>> {
    use pagecast_channel::frame;
    use v1::agent_response::Body as R;
    let answer = |b: R| frame(&v1::AgentResponse { body: Some(b) });
    let hashes = |n: u64| -> Vec<u8> { (0..n).flat_map(|i| *hash(i).as_bytes()).collect() };
    let content = |h: Vec<u8>, last| {
        answer(R::Content(v1::VmContentPart {
            hashes: h.into(),
            last,
            frames: 100,
            nonzero_frames: 60,
            memory_bytes: 409_600,
            rewrite_pages_per_s: 12.5,
            kind: v1::VmKind::MicroVm as i32,
        }))
    };
    let held = |h: Vec<u8>, last| {
        answer(R::Held(v1::Held {
            hashes: h.into(),
            last,
            pages_local: 30,
        }))
    };
    let mut contents = content(hashes(3), false);
    contents.extend(content(hashes(2), true));
    let mut migration = answer(R::Progress(v1::MigrateProgress::default()));
    migration.extend(held(hashes(4), false));
    migration.extend(held(hashes(1), true));
    migration.extend(answer(R::Result(v1::MigrateResult::default())));
    let error = answer(R::Error(v1::AgentError {
        message: "no VM named \"x\"".into(),
        code: v1::RefusalCode::NotFound as i32,
    }));
    vec![contents, migration, error]
}

fn cert_subject() -> Vec<Vec<u8>> {
    use pagecast_channel::Role;
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let ca = pagecast_channel::ca::Authority::generate().expect("a CA");
    let now = std::time::SystemTime::now();
    [
        ("h1", Role::Host),
        ("operator", Role::Operator),
        ("index-1", Role::Index),
        ("dash", Role::Reader),
    ]
    .iter()
    .map(|(name, role)| {
        let (pem, _) = ca
            .sign(name, *role, now, now + std::time::Duration::from_secs(3600))
            .expect("a certificate");
        CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("PEM")
            .to_vec()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_has_seeds_and_they_run() {
        for t in crate::TARGETS {
            let s = of(t.name);
            assert!(s.len() >= 2, "{} has {} seeds", t.name, s.len());
            for x in &s {
                (t.run)(x);
            }
        }
    }
}
