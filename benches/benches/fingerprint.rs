//! Fingerprinting throughput against BLAKE3's best case.
//!
//! Hashes synthetic guest memory (1 GiB by default) page by page with
//! pagecast's fingerprinter (16 or 8 pages side by side in the SIMD lanes,
//! zero pages skipped), with 1 and 2 threads, and in the same run:
//! - plain per-page `blake3::hash` over rayon (what one writes first);
//! - BLAKE3 over the same bytes as one buffer with `update_rayon`: the best
//!   a tree hash does on these cores, the baseline of the ratio.
//!
//! The three are measured in turn within each run, so drift in a shared
//! machine's speed hits all three alike; medians over the runs are printed.
//! Target: pagecast fingerprint at 0.8x or more of the one-buffer rate.
//!
//! Run: `cargo bench -p pagecast-benches --bench fingerprint`
//! Knobs: PAGECAST_BENCH_MIB (memory, default 1024), PAGECAST_BENCH_RUNS
//! (runs, default 7).

use std::time::Instant;

use pagecast_benches::{env_or, median};
use pagecast_memory::GuestMemory;
use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_memory::synth::{SynthSpec, SyntheticVm};
use pagecast_pages::{PAGE_SIZE, Page, PageHash};
use rayon::prelude::*;

fn main() {
    let mib: u64 = env_or("PAGECAST_BENCH_MIB", 1024);
    let runs: usize = env_or("PAGECAST_BENCH_RUNS", 7);
    for (label, zero) in [("no zero pages", 0.0), ("25% zero pages", 0.25)] {
        let mut spec = SynthSpec::new("web", 0, mib << 20).expect("valid size");
        spec.profile.zero = zero;
        let vm = SyntheticVm::new(spec).expect("valid profile");
        let mem = vm.materialize(None).expect("memory for the benchmark");
        // The baselines hash plain bytes, so they get a private copy; pagecast
        // reads the guest memory itself, through volatile copies.
        let mut owned = vec![0u8; mem.region().len()];
        mem.region()
            .read_bytes(0, &mut owned)
            .expect("whole region");
        let bytes = &owned[..];
        let gb = bytes.len() as f64 / 1e9;
        println!(
            "fingerprint: {mib} MiB of synthetic memory (family web, {label}), median of {runs} runs"
        );
        println!(
            "{:>7}  {:>20}  {:>21}  {:>23}  {:>6}  {:>6}",
            "threads",
            "pagecast fingerprint",
            "per-page blake3::hash",
            "one buffer update_rayon",
            "ratio",
            "plain"
        );
        for threads in [1usize, 2] {
            let fp = Fingerprinter::new(threads).expect("pool");
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let mut ours = vec![PageHash::ZERO_PAGE; bytes.len() / PAGE_SIZE];
            let mut plain = ours.clone();
            let (mut r_fp, mut r_plain, mut r_one, mut ratio, mut ratio_plain) =
                (vec![], vec![], vec![], vec![], vec![]);
            for _ in 0..runs {
                let t = Instant::now();
                ours = fp
                    .fingerprint(&mem, &pagecast_pages::ContentKey::CLUSTER, &|_| {})
                    .hashes;
                let fp_rate = gb / t.elapsed().as_secs_f64();
                let t = Instant::now();
                pool.install(|| {
                    bytes
                        .par_chunks_exact(PAGE_SIZE)
                        .zip(plain.par_iter_mut())
                        .for_each(|(p, o)| {
                            let p: &Page = p.try_into().expect("page");
                            *o = PageHash::of_page(p);
                        })
                });
                let plain_rate = gb / t.elapsed().as_secs_f64();
                let t = Instant::now();
                pool.install(|| {
                    let mut h = blake3::Hasher::new();
                    h.update_rayon(bytes);
                    std::hint::black_box(h.finalize());
                });
                let one_rate = gb / t.elapsed().as_secs_f64();
                r_fp.push(fp_rate);
                r_plain.push(plain_rate);
                r_one.push(one_rate);
                ratio.push(fp_rate / one_rate);
                ratio_plain.push(plain_rate / one_rate);
            }
            // Same hash for every non-zero page, or the comparison is void.
            assert!(
                ours.iter()
                    .zip(&plain)
                    .all(|(a, b)| a.is_zero_page() || a == b)
            );
            println!(
                "{:>7}  {:>15.2} GB/s  {:>16.2} GB/s  {:>18.2} GB/s  {:>5.2}x  {:>5.2}x",
                threads,
                median(&mut r_fp),
                median(&mut r_plain),
                median(&mut r_one),
                median(&mut ratio),
                median(&mut ratio_plain),
            );
        }
        println!();
    }
    println!(
        "ratio: pagecast fingerprint / one buffer (target >= 0.80 with no zero pages to skip)"
    );
    println!("plain: per-page blake3::hash / one buffer (the starting point)");
}
