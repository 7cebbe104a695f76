//! Every fuzz target over its committed corpus (`fuzz/seeds/<target>/`,
//! which must not be empty) and over inputs derived from it
//! (`pagecast_fuzz_entries::mutate`): 5,000 per target by default,
//! `PAGECAST_FUZZ_INPUTS` sets another number. An input that panics is
//! written to `target/fuzz-failures/<target>-<n>` and named in the
//! failure, ready to be run again with `cargo fuzz run <target> FILE` or
//! committed under `fuzz/seeds/<target>/` as a regression.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = root().join("fuzz/seeds").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).expect("reading a seed");
            (p.display().to_string(), b)
        })
        .collect()
}

fn run(name: &str) {
    let t = pagecast_fuzz_entries::target(name).expect("a target");
    let seeds = corpus(name);
    assert!(
        !seeds.is_empty(),
        "fuzz/seeds/{name}/ is empty: run pagecast-fuzz-seeds"
    );
    let count: usize = std::env::var("PAGECAST_FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let bytes: Vec<Vec<u8>> = seeds.iter().map(|(_, b)| b.clone()).collect();
    // Seeded by the target's name: each target its own inputs, the same
    // ones on every run.
    let seed = name
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31) ^ u64::from(b));
    let generated = pagecast_fuzz_entries::mutate::inputs(&bytes, count, seed);
    let inputs = seeds.into_iter().chain(
        generated
            .into_iter()
            .enumerate()
            .map(|(i, b)| (format!("generated input {i}"), b)),
    );
    for (i, (what, input)) in inputs.enumerate() {
        let r = std::panic::catch_unwind(|| (t.run)(&input));
        if r.is_err() {
            let dir = root().join("target/fuzz-failures");
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("{name}-{i}"));
            let _ = std::fs::write(&path, &input);
            panic!(
                "fuzz target {name} panicked on {what} ({} bytes), saved as {}",
                input.len(),
                path.display()
            );
        }
    }
}

/// The seeds committed as `seed-<n>` are those the seed writer makes now,
/// for every target whose seeds are the same on every run: a change to an
/// encoder that the seeds were not written again for leaves the fuzzer
/// and the inputs above starting from stale encodings (as three targets'
/// did, until their seeds were written again).
#[test]
fn committed_seeds_are_the_writers() {
    for t in pagecast_fuzz_entries::TARGETS {
        if pagecast_fuzz_entries::seeds::FRESH_EACH_RUN.contains(&t.name) {
            continue;
        }
        let dir = root().join("fuzz/seeds").join(t.name);
        for (i, want) in pagecast_fuzz_entries::seeds::of(t.name).iter().enumerate() {
            let p = dir.join(format!("seed-{i}"));
            let got = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(
                &got == want,
                "{} is not what the seed writer makes now: run pagecast-fuzz-seeds {}",
                p.display(),
                t.name
            );
        }
    }
}

macro_rules! targets {
    ($($t:ident),* $(,)?) => {
        $(
            #[test]
            fn $t() {
                run(stringify!($t));
            }
        )*

        #[test]
        fn every_target_is_run_here() {
            let here = [$(stringify!($t)),*];
            for t in pagecast_fuzz_entries::TARGETS {
                assert!(here.contains(&t.name), "no test runs fuzz target {}", t.name);
            }
        }
    };
}

targets!(
    manifest_chunk,
    datagram,
    control_frame,
    migrate_frames,
    index_frame,
    qemu_stream,
    qemu_return_path,
    raft_chunks,
    snapshot,
    agent_response,
    cert_subject,
);
