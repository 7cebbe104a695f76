//! Command-line parsing and the subcommands.

mod plan;
mod progress;
mod scan;
mod synth;

use clap::{Parser, Subcommand};

/// pagecast: a cluster-wide page-deduplication index and multicast
/// migration coordinator for KVM hosts.
///
/// It fingerprints guest memory (BLAKE3 of every 4 KiB page, zero pages
/// skipped), finds the content VMs share, and moves VMs so that each unique
/// page crosses the network once.
#[derive(Debug, Parser)]
#[command(
    name = "pagecast",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Hashing threads (default: one per CPU).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Scan(scan::ScanArgs),
    Synth(synth::SynthArgs),
    Plan(plan::PlanArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let threads = match cli.threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    match cli.command {
        Command::Scan(a) => scan::run(a, threads),
        Command::Synth(a) => synth::run(a, threads),
        Command::Plan(a) => plan::run(a, threads),
    }
}

/// An error and its causes on one line, without repeating a cause whose
/// text the message already contains.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out.replace('\n', " ")
}
