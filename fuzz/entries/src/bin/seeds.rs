//! Writes the seeds of every fuzz target (or of the targets named) to
//! `DIR/<target>/seed-<n>` (default DIR: `fuzz/seeds`), replacing earlier
//! seeds of that name and keeping every other file (inputs the fuzzer
//! found and regressions). Usage: `pagecast-fuzz-seeds [--dir DIR] [TARGET...]`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut dir = PathBuf::from("fuzz/seeds");
    let mut only = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => match args.next() {
                Some(d) => dir = PathBuf::from(d),
                None => {
                    eprintln!("error: --dir needs a directory");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("usage: pagecast-fuzz-seeds [--dir DIR] [TARGET...]");
                return ExitCode::SUCCESS;
            }
            t if pagecast_fuzz_entries::target(t).is_some() => only.push(a),
            t => {
                eprintln!("error: no fuzz target named {t:?}");
                return ExitCode::from(2);
            }
        }
    }
    for t in pagecast_fuzz_entries::TARGETS {
        if !only.is_empty() && !only.iter().any(|o| o == t.name) {
            continue;
        }
        let d = dir.join(t.name);
        if let Err(e) = std::fs::create_dir_all(&d) {
            eprintln!("error: creating {}: {e}", d.display());
            return ExitCode::FAILURE;
        }
        let seeds = pagecast_fuzz_entries::seeds::of(t.name);
        for (i, s) in seeds.iter().enumerate() {
            let p = d.join(format!("seed-{i}"));
            if let Err(e) = std::fs::write(&p, s) {
                eprintln!("error: writing {}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        }
        println!("{}: {} seeds in {}", t.name, seeds.len(), d.display());
    }
    ExitCode::SUCCESS
}
