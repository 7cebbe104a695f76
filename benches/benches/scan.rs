//! `pagecast scan` of an image file, as a whole process, against `b3sum
//! --num-threads 2` on the same file, in the same run.
//!
//! A file of random bytes (1 GiB by default, no zero pages: every page is
//! hashed) is written once and read from the page cache by every run. Each
//! run times `pagecast --threads 2 scan --json FILE` and `b3sum
//! --num-threads 2 FILE` one after the other; the best of the runs of each
//! is printed with the ratio of the rates. b3sum hashes the file as one
//! BLAKE3 tree over its mapping; pagecast hashes every 4 KiB page on its
//! own, as guest memory is fingerprinted. Target: at least 0.8x.
//!
//! The pagecast binary is `target/release/pagecast` (build it first:
//! `cargo build --release -p pagecast-cli`); b3sum is Debian's `b3sum`
//! package (`apt-get install b3sum`). Without it the run says so and
//! stops.
//!
//! Run: `cargo bench -p pagecast-benches --bench scan`
//! Knobs: PAGECAST_BENCH_MIB (file size, default 1024), PAGECAST_BENCH_RUNS
//! (runs, default 3).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use pagecast_benches::env_or;
use pagecast_pages::SplitMix64;

/// Seconds `cmd` takes as a process; panics if it fails.
fn timed(cmd: &mut Command) -> f64 {
    let t = Instant::now();
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("the command starts");
    let s = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    s
}

fn write_random(path: &Path, mib: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("the image file"));
    let mut rng = SplitMix64::new(0x5ca4);
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for w in chunk.chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        f.write_all(&chunk).expect("writing the image");
    }
    f.flush().expect("writing the image");
}

fn main() {
    let mib: usize = env_or("PAGECAST_BENCH_MIB", 1024);
    let runs: usize = env_or("PAGECAST_BENCH_RUNS", 3);
    let bin = pagecast_tests::pagecast_bin();
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/pagecast");
    let bin = if release.exists() { release } else { bin };
    if Command::new("b3sum").arg("--version").output().is_err() {
        println!("scan: b3sum is not installed (apt-get install b3sum): no baseline, no figure");
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let image = dir.path().join("random.raw");
    write_random(&image, mib);
    println!(
        "scan: {mib} MiB of random bytes from the page cache, 2 threads, best of {runs}; pagecast {}",
        bin.display()
    );
    let (mut ours, mut theirs) = (f64::MAX, f64::MAX);
    for _ in 0..runs {
        ours = ours.min(timed(
            Command::new(&bin)
                .args(["--threads", "2", "scan", "--json", "--no-progress"])
                .arg(&image),
        ));
        theirs = theirs.min(timed(
            Command::new("b3sum")
                .args(["--num-threads", "2"])
                .arg(&image),
        ));
    }
    let gb = (mib << 20) as f64 / 1e9;
    let ratio = theirs / ours;
    println!(
        "  pagecast scan {:.3} s ({:.2} GB/s), b3sum --num-threads 2 {:.3} s ({:.2} GB/s): {:.2}x (target >= 0.8x: {})",
        ours,
        gb / ours,
        theirs,
        gb / theirs,
        ratio,
        if ratio >= 0.8 { "met" } else { "missed" }
    );
}
