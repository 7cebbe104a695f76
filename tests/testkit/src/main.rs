//! `pagecast-testkit`: what this machine offers pagecast's tests.
//!
//! - `pagecast-testkit` prints one line per need (found, or why not) and,
//!   under `PAGECAST_REQUIRE`, fails naming every required need that is
//!   missing, so that CI stops before building anything. It also fails
//!   when the target directory or the temporary directory has less than
//!   `MIN_FREE_GIB` free (`PAGECAST_MIN_FREE_GIB` overrides), always.
//! - `pagecast-testkit skips FILE` prints the skips a run logged to
//!   `PAGECAST_SKIP_LOG` (one line per test, then a count by need).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use pagecast_testkit::{
    MIN_FREE_GIB, Need, disk_verdict, free_bytes, read_skip_log, required, unknown_required,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => table(),
        ["skips", file] => skips(Path::new(file)),
        _ => {
            eprintln!(
                "usage: pagecast-testkit          what this machine offers the tests\n       \
                 pagecast-testkit skips FILE   the skips a run logged (PAGECAST_SKIP_LOG)"
            );
            ExitCode::from(2)
        }
    }
}

fn table() -> ExitCode {
    let unknown = unknown_required();
    if !unknown.is_empty() {
        eprintln!(
            "error: PAGECAST_REQUIRE names {} (known: all, {})",
            unknown.join(", "),
            Need::ALL.map(Need::name).join(", ")
        );
        return ExitCode::FAILURE;
    }
    println!("what this machine offers the tests:");
    let mut missing_required = Vec::new();
    for n in Need::ALL {
        let (mark, what) = match n.probe() {
            Ok(found) => ("yes", found),
            Err(why) if required(n) => {
                missing_required.push(n.name());
                ("NO, required", why)
            }
            Err(why) => ("no, its tests skip", why),
        };
        println!("  {:<10} {mark:<19} {what}", n.name());
    }
    let disk_ok = disk();
    match std::env::var("PAGECAST_REQUIRE") {
        Ok(spec) if !spec.is_empty() => {
            println!("PAGECAST_REQUIRE={spec}: a test that cannot run its subject fails")
        }
        _ => println!("PAGECAST_REQUIRE is unset: a test that cannot run its subject skips"),
    }
    if missing_required.is_empty() && disk_ok {
        ExitCode::SUCCESS
    } else if missing_required.is_empty() {
        ExitCode::FAILURE
    } else {
        eprintln!(
            "error: required but missing: {} (scripts/setup.sh installs the packages; \
             the rest needs root, /dev/kvm or a kernel that allows it)",
            missing_required.join(", ")
        );
        ExitCode::FAILURE
    }
}

/// Prints the free space where the build and the tests write; false when
/// either place is short of it.
fn disk() -> bool {
    let min = std::env::var("PAGECAST_MIN_FREE_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MIN_FREE_GIB);
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let mut ok = true;
    for (what, path) in [
        ("the build", target),
        ("the tests' temporary files", std::env::temp_dir()),
    ] {
        let verdict = free_bytes(&path)
            .map_err(|e| format!("cannot measure free space at {}: {e}", path.display()))
            .and_then(|free| disk_verdict(what, &path, free, min));
        match verdict {
            Ok(line) => println!("  {:<10} {:<19} {line}", "disk", "yes"),
            Err(why) => {
                eprintln!("error: {why}");
                ok = false;
            }
        }
    }
    ok
}

fn skips(file: &Path) -> ExitCode {
    let list = match read_skip_log(file) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            eprintln!("error: reading {}: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    if list.is_empty() {
        println!("skipped: none");
        return ExitCode::SUCCESS;
    }
    let mut by_need: BTreeMap<&str, usize> = BTreeMap::new();
    for (test, needs) in &list {
        println!("  skipped {test} (missing {needs})");
        for n in needs.split(',') {
            *by_need.entry(n).or_default() += 1;
        }
    }
    let counts: Vec<String> = by_need.iter().map(|(n, c)| format!("{n} {c}")).collect();
    println!(
        "skipped: {} tests (missing: {})",
        list.len(),
        counts.join(", ")
    );
    ExitCode::SUCCESS
}
