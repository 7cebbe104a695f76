//! What per-group keys and per-member tags cost a cast, beside the scheme
//! they replaced, measured in the same run.
//!
//! The baseline is the former sealing: one key for the whole session and
//! the AEAD tag alone (a datagram sealed with no member tags and opened
//! without checking one). Per-group keys cost nothing per datagram (a key
//! is chosen by the header's group); per-member tags cost the sender one
//! short BLAKE3 hash (of the header and the page entries, not the pages)
//! and one keyed hash of that per member, the receiver one of each, and
//! the wire 8 bytes per member per datagram.
//!
//! For groups of 1 to 64 members: sender and receiver throughput of page
//! bytes (one core, datagrams of two whole pages, as on a jumbo-frame
//! path) over the baseline's, and link bytes per page at MTUs 9000 and 1500
//! over the baseline's. Targets, for groups of up to 8: sender at least
//! 0.85x and receiver at least 0.75x the baseline (the tag is a fixed
//! cost of two short hashes per datagram, against an AEAD that opens a
//! datagram in about a microsecond); link bytes per page within 1% at
//! MTU 9000.
//!
//! First, the AEAD itself: ChaCha20-Poly1305 (RustCrypto, what casts used
//! before) against AES-256-GCM (ring, hardware AES), sealing and opening
//! 8 KiB bodies, each key set up once (as the wire does per session). Casts use
//! the faster; target: at least 1.0x.
//!
//! Run: `cargo bench -p pagecast-benches --bench cast_tags`
//! Knobs: PAGECAST_BENCH_MIB (page bytes sealed per pass, default 64),
//! PAGECAST_BENCH_PASSES (passes, the best taken, default 5).

use std::time::Instant;

use pagecast_benches::env_or;
use pagecast_multicast::wire::{
    Body, CastKey, Datagram, GroupKey, Opening, Sealing, check_of, decode, link_bytes_per_page,
};
use pagecast_pages::{ContentKey, PAGE_SIZE, SplitMix64};

/// Two pages per datagram, as on a jumbo-frame path.
const PACK: usize = 2;

/// Page bytes per second sealing and opening every datagram of `pages`
/// for a group of `members` (0: the former scheme, no member tags), the
/// reader being the last member. Best of `passes`.
fn throughput(pages: &[u8], members: usize, passes: usize) -> (f64, f64) {
    let group_key = GroupKey::new([0x42; 32]);
    let keys: Vec<CastKey> = (0..members).map(|m| [m as u8 + 1; 32]).collect();
    let sealing = Sealing {
        key: &group_key,
        tags: &keys,
    };
    let opening = Opening {
        key: &group_key,
        tag: members.checked_sub(1).map(|last| (last, &keys[last])),
    };
    let chunk = PACK * PAGE_SIZE;
    let checks: Vec<_> = pages
        .chunks_exact(PAGE_SIZE)
        .map(|p| check_of(&ContentKey::CLUSTER.hash_page(p.try_into().expect("a page"))))
        .collect();
    let (mut best_seal, mut best_open) = (0f64, 0f64);
    for _ in 0..passes {
        let t = Instant::now();
        let mut sealed = Vec::with_capacity(pages.len() / chunk);
        for (i, payload) in pages.chunks_exact(chunk).enumerate() {
            let mut b = Vec::with_capacity(chunk + 128 + members * 8);
            Datagram {
                session: 7,
                seq: i as u64 + 1,
                from: 0,
                body: Body::Data {
                    group: 0,
                    index: (i * PACK) as u32,
                    fragment: 0,
                    fragments: 1,
                    pages: (0..PACK)
                        .map(|k| ((i * PACK + k) as u64, checks[i * PACK + k]))
                        .collect(),
                    payload,
                },
            }
            .encode(&sealing, &mut b);
            sealed.push(b);
        }
        let seal_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for b in &mut sealed {
            let d = decode(b, 7, |_, _| Some(opening)).expect("a datagram of ours opens");
            std::hint::black_box(d);
        }
        let open_s = t.elapsed().as_secs_f64();
        best_seal = best_seal.max(pages.len() as f64 / seal_s);
        best_open = best_open.max(pages.len() as f64 / open_s);
    }
    (best_seal, best_open)
}

/// Bytes per second sealing then opening every 8 KiB body of `data` in
/// place under ChaCha20-Poly1305 (RustCrypto). Best of `passes`.
fn chacha(data: &mut [u8], passes: usize) -> f64 {
    use chacha20poly1305::aead::{AeadInPlace, KeyInit};
    use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
    let key = [0x42u8; 32];
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&key));
    best_of(passes, data.len(), || {
        for (i, body) in data.chunks_exact_mut(BODY).enumerate() {
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&(i as u64).to_be_bytes());
            let tag = cipher
                .encrypt_in_place_detached(Nonce::from_slice(&n), b"header", body)
                .expect("sealed");
            cipher
                .decrypt_in_place_detached(Nonce::from_slice(&n), b"header", body, &tag)
                .expect("opened");
        }
    })
}

/// The same under AES-256-GCM (ring).
fn aes_gcm(data: &mut [u8], passes: usize) -> f64 {
    use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let key = [0x42u8; 32];
    let cipher = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).expect("a key"));
    let mut buf = vec![0u8; BODY + 16];
    best_of(passes, data.len(), || {
        for (i, body) in data.chunks_exact_mut(BODY).enumerate() {
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&(i as u64).to_be_bytes());
            let nonce = || Nonce::assume_unique_for_key(n);
            let tag = cipher
                .seal_in_place_separate_tag(nonce(), Aad::from(b"header"), body)
                .expect("sealed");
            // Opening wants the tag after the body, as a datagram has it.
            buf[..BODY].copy_from_slice(body);
            buf[BODY..].copy_from_slice(tag.as_ref());
            cipher
                .open_in_place(nonce(), Aad::from(b"header"), &mut buf)
                .expect("opened");
        }
    })
}

/// Bodies of two pages.
const BODY: usize = PACK * PAGE_SIZE;

/// The best rate of `passes` runs of `f` over `bytes` bytes.
fn best_of(passes: usize, bytes: usize, mut f: impl FnMut()) -> f64 {
    (0..passes)
        .map(|_| {
            let t = Instant::now();
            f();
            bytes as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn main() {
    let mib: usize = env_or("PAGECAST_BENCH_MIB", 64);
    let passes: usize = env_or("PAGECAST_BENCH_PASSES", 5);
    let mut rng = SplitMix64::new(0xca57);
    let mut pages = vec![0u8; mib << 20];
    for w in pages.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let mut scratch = pages.clone();
    let cc = chacha(&mut scratch, passes);
    let gcm = aes_gcm(&mut scratch, passes);
    println!(
        "AEAD, seal + open of {BODY}-byte bodies, one core: ChaCha20-Poly1305 {:.2} GB/s (baseline), AES-256-GCM {:.2} GB/s, {:.2}x",
        cc / 1e9,
        gcm / 1e9,
        gcm / cc
    );
    let aead_ok = gcm >= cc;
    println!(
        "cast sealing: {mib} MiB of pages in datagrams of {PACK} pages, best of {passes} passes, one core"
    );
    println!("baseline: one session key, the AEAD tag alone (the former scheme)");
    let (base_seal, base_open) = throughput(&pages, 0, passes);
    let (base_9000, base_1500) = (link_bytes_per_page(9000, 0), link_bytes_per_page(1500, 0));
    println!(
        "  baseline: seal {:.2} GB/s, open {:.2} GB/s; link bytes per page {:.1} (MTU 9000), {:.1} (MTU 1500)",
        base_seal / 1e9,
        base_open / 1e9,
        base_9000,
        base_1500
    );
    println!(
        "{:>8} {:>10} {:>7} {:>10} {:>7} {:>12} {:>12}",
        "members", "seal GB/s", "ratio", "open GB/s", "ratio", "link 9000", "link 1500"
    );
    let mut misses = Vec::new();
    for members in [1usize, 2, 4, 8, 16, 64] {
        let (seal, open) = throughput(&pages, members, passes);
        let (l9000, l1500) = (
            link_bytes_per_page(9000, members) / base_9000,
            link_bytes_per_page(1500, members) / base_1500,
        );
        println!(
            "{members:>8} {:>10.2} {:>6.3}x {:>10.2} {:>6.3}x {:>11.4}x {:>11.4}x",
            seal / 1e9,
            seal / base_seal,
            open / 1e9,
            open / base_open,
            l9000,
            l1500
        );
        if members <= 8 && (seal / base_seal < 0.85 || open / base_open < 0.75) {
            misses.push(format!("{members} members: CPU under its target"));
        }
        if members <= 8 && l9000 > 1.01 {
            misses.push(format!(
                "{members} members: {l9000:.4}x link bytes at MTU 9000"
            ));
        }
    }
    if !aead_ok {
        misses.push("AES-256-GCM slower than ChaCha20-Poly1305 here".into());
    }
    if misses.is_empty() {
        println!("targets met");
    } else {
        println!("targets missed: {}", misses.join("; "));
    }
}
