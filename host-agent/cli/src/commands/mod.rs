//! Command-line parsing and the subcommands.

mod agent;
mod cast;
mod evacuate;
mod index;
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

    /// Log lines on stderr as readable text or as JSON objects (one per
    /// line, for log collectors). Which lines: RUST_LOG, e.g. `info`,
    /// `debug`, `pagecast_agent=debug,raft=warn` (default `info`).
    #[arg(long, global = true, value_name = "FORMAT", default_value = "text")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Scan(scan::ScanArgs),
    Synth(synth::SynthArgs),
    Plan(plan::PlanArgs),
    Cast(cast::CastArgs),
    Secret(SecretCmd),
    Agent(agent::AgentArgs),
    Vm(agent::VmArgs),
    Migrate(agent::MigrateArgs),
    Index(index::IndexCmd),
    Advise(index::AdviseArgs),
    Hosts(index::HostsArgs),
    Evacuate(evacuate::EvacuateArgs),
    Clone(evacuate::CloneArgs),
    Cancel(evacuate::CancelArgs),
}

/// Manage the cluster secret that agents, peers and tools authenticate
/// each other with.
///
/// Example:
///
///   pagecast secret new /etc/pagecast/cluster.secret
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
struct SecretCmd {
    #[command(subcommand)]
    command: SecretSub,
}

#[derive(Debug, Subcommand)]
enum SecretSub {
    /// Write a new random secret (refuses to overwrite an existing file).
    New {
        /// The file to create.
        file: std::path::PathBuf,
    },
}

/// The cluster secret option every networked command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct SecretArg {
    /// The cluster secret file (make one with `pagecast secret new FILE`).
    #[arg(
        long = "secret-file",
        value_name = "FILE",
        env = "PAGECAST_SECRET_FILE"
    )]
    pub secret_file: Option<std::path::PathBuf>,
}

/// Loads the cluster secret named by `--secret-file` or the environment.
pub fn load_secret(a: &SecretArg) -> anyhow::Result<pagecast_channel::Secret> {
    let path = a.secret_file.as_ref().ok_or_else(|| {
        anyhow::anyhow!("no cluster secret: pass --secret-file FILE or set PAGECAST_SECRET_FILE (create one with `pagecast secret new FILE`)")
    })?;
    Ok(pagecast_channel::Secret::load(path)?)
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// `2026-12-01T14:03:07.123Z  INFO agent{host=a}: listening on ...`
    Text,
    /// One JSON object per line.
    Json,
}

/// Sends `tracing` events (the daemons' logs) to stderr, filtered by
/// RUST_LOG (default `info`).
fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(cli.log_format);
    let threads = match cli.threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    match cli.command {
        Command::Scan(a) => scan::run(a, threads),
        Command::Synth(a) => synth::run(a, threads),
        Command::Plan(a) => plan::run(a, threads),
        Command::Cast(a) => cast::run(a, threads),
        Command::Agent(a) => agent::run_agent(a, threads),
        Command::Vm(a) => agent::run_vm(a),
        Command::Migrate(a) => agent::run_migrate(a),
        Command::Index(a) => index::run(a, threads),
        Command::Advise(a) => index::advise(a, threads),
        Command::Hosts(a) => index::hosts(a),
        Command::Evacuate(a) => evacuate::run_evacuate(a),
        Command::Clone(a) => evacuate::run_clone(a),
        Command::Cancel(a) => evacuate::run_cancel(a),
        Command::Secret(SecretCmd {
            command: SecretSub::New { file },
        }) => {
            pagecast_channel::Secret::create_file(&file)?;
            eprintln!(
                "wrote a new cluster secret to {} (mode 0600); copy it to every host",
                file.display()
            );
            Ok(())
        }
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
