//! Keyed (dedup domain) page hashing against plain BLAKE3, same kernel.
//!
//! Hashes the same pages (256 MiB of pseudo-random content by default) with
//! `ContentKey::CLUSTER` (plain BLAKE3-256) and with a domain's key (keyed
//! BLAKE3), alternating within each run so drift hits both alike, on one
//! thread; prints the medians and keyed/plain. Target: 0.95x or more (a
//! keyed hash does the same compressions; only its starting words and flag
//! differ).
//!
//! Run: `cargo bench -p pagecast-pages --bench keyed`
//! Knobs: PAGECAST_BENCH_MIB (default 256), PAGECAST_BENCH_RUNS (default 7).

use std::time::Instant;

use pagecast_pages::{ContentKey, PAGE_SIZE, Page, PageHash, SplitMix64};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mib = env_or("PAGECAST_BENCH_MIB", 256);
    let runs = env_or("PAGECAST_BENCH_RUNS", 7).max(1);
    let pages = mib * 256;
    let mut rng = SplitMix64::new(7);
    let mut bytes = vec![0u8; pages * PAGE_SIZE];
    for w in bytes.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let refs: Vec<&Page> = bytes
        .chunks_exact(PAGE_SIZE)
        .map(|p| p.try_into().expect("page"))
        .collect();
    let key = ContentKey::keyed([0x5a; 32]);
    let mut out = vec![PageHash::ZERO_PAGE; pages];
    let gb = bytes.len() as f64 / 1e9;
    let (mut plain, mut keyed, mut ratio) = (vec![], vec![], vec![]);
    for _ in 0..runs {
        let t = Instant::now();
        ContentKey::CLUSTER.hash_pages(&refs, &mut out);
        let p = gb / t.elapsed().as_secs_f64();
        std::hint::black_box(&out);
        let t = Instant::now();
        key.hash_pages(&refs, &mut out);
        let k = gb / t.elapsed().as_secs_f64();
        std::hint::black_box(&out);
        plain.push(p);
        keyed.push(k);
        ratio.push(k / p);
    }
    // The keyed hashes are blake3's keyed hashes, or the figure is void.
    assert_eq!(
        *out[0].as_bytes(),
        *blake3::keyed_hash(&[0x5a; 32], refs[0]).as_bytes()
    );
    println!("keyed page hashing: {mib} MiB of random pages, one thread, median of {runs} runs");
    println!(
        "plain BLAKE3 (cluster domain) {:.2} GB/s, keyed BLAKE3 (dedup domain) {:.2} GB/s: {:.3}x (target >= 0.95x)",
        median(&mut plain),
        median(&mut keyed),
        median(&mut ratio)
    );
}
