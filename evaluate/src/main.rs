//! `pagecast-evaluate`: runs pagecast's strategies side by side on an
//! emulated multi-rack network (`scripts/evaluate.sh` builds and runs it).
//! A harness, not part of the product: it drives the `pagecast` binary in
//! network namespaces and measures what the interfaces counted.

mod cpu;
mod harness;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match harness::run(harness::EvaluateArgs::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The error and its causes on one line.
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
