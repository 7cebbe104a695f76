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
//! over the baseline's. Targets, for groups of up to 8: sender and
//! receiver at least 0.9x the baseline; link bytes per page within 1% at
//! MTU 9000.
//!
//! Run: `cargo bench -p pagecast-benches --bench cast_tags`
//! Knobs: PAGECAST_BENCH_MIB (page bytes sealed per pass, default 64),
//! PAGECAST_BENCH_PASSES (passes, the best taken, default 5).

use std::time::Instant;

use pagecast_benches::env_or;
use pagecast_multicast::wire::{
    Body, CastKey, Datagram, Opening, Sealing, check_of, decode, link_bytes_per_page,
};
use pagecast_pages::{ContentKey, PAGE_SIZE, SplitMix64};

/// Two pages per datagram, as on a jumbo-frame path.
const PACK: usize = 2;

/// Page bytes per second sealing and opening every datagram of `pages`
/// for a group of `members` (0: the former scheme, no member tags), the
/// reader being the last member. Best of `passes`.
fn throughput(pages: &[u8], members: usize, passes: usize) -> (f64, f64) {
    let group_key: CastKey = [0x42; 32];
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

fn main() {
    let mib: usize = env_or("PAGECAST_BENCH_MIB", 64);
    let passes: usize = env_or("PAGECAST_BENCH_PASSES", 5);
    let mut rng = SplitMix64::new(0xca57);
    let mut pages = vec![0u8; mib << 20];
    for w in pages.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
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
        if members <= 8 && (seal / base_seal < 0.9 || open / base_open < 0.9) {
            misses.push(format!("{members} members: CPU under 0.9x the baseline"));
        }
        if members <= 8 && l9000 > 1.01 {
            misses.push(format!(
                "{members} members: {l9000:.4}x link bytes at MTU 9000"
            ));
        }
    }
    if misses.is_empty() {
        println!("targets met");
    } else {
        println!("targets missed: {}", misses.join("; "));
    }
}
