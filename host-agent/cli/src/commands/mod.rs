//! Command-line parsing and the subcommands.

mod agent;
mod cast;
mod evacuate;
mod index;
mod plan;
mod progress;
mod rebalance;
mod scan;
mod synth;

use std::path::PathBuf;

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
    Ca(CaCmd),
    Agent(agent::AgentArgs),
    Vm(agent::VmArgs),
    Migrate(agent::MigrateArgs),
    Index(index::IndexCmd),
    Advise(index::AdviseArgs),
    Hosts(index::HostsArgs),
    Cordon(index::CordonArgs),
    Uncordon(index::UncordonArgs),
    Evacuate(evacuate::EvacuateArgs),
    Clone(evacuate::CloneArgs),
    Cancel(evacuate::CancelArgs),
}

/// The cluster's certificate authority: every daemon and tool proves who
/// it is with a certificate it signed (mutual TLS on every connection).
///
/// Roles: `host` (an agent: its own VMs and index records, migration and
/// cast traffic with other hosts), `operator` (start, stop, migrate,
/// evacuate, clone, index loads), `reader` (queries only), `index` (an
/// index replica).
///
/// Example:
///
///   pagecast ca init --dir /etc/pagecast/ca
///   pagecast ca issue --dir /etc/pagecast/ca --name host-a --role host --out /etc/pagecast/host-a
///   pagecast ca issue --dir /etc/pagecast/ca --name alice --role operator --out ~/.pagecast
///   pagecast agent --name host-a --listen 10.0.0.1:7400 --tls /etc/pagecast/host-a
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
struct CaCmd {
    #[command(subcommand)]
    command: CaSub,
}

#[derive(Debug, Subcommand)]
enum CaSub {
    /// Make a new CA in DIR: ca.crt, ca.key and domains.key (the cluster's
    /// dedup-domain secret; both owner-only). Refuses to replace an
    /// existing CA. Keep DIR off the hosts: whoever holds ca.key can issue
    /// any identity.
    Init {
        /// The CA directory (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Issue a node certificate: writes OUT/ca.crt, OUT/node.crt and
    /// OUT/node.key (owner-only), and for a host OUT/domains.key (the
    /// dedup-domain secret agents derive domain keys from; a CA made before
    /// domains gets one on first issue); refuses to replace an existing key.
    Issue {
        /// The CA directory (from `ca init`).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node's name: an agent's --name for hosts; any label for
        /// operators, readers and replicas.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// What the holder may do: host, operator, reader or index.
        #[arg(long, value_name = "ROLE")]
        role: pagecast_channel::Role,
        /// The node directory to write (created if missing).
        #[arg(long, value_name = "OUT")]
        out: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, value_name = "N", default_value_t = pagecast_channel::ca::DEFAULT_DAYS)]
        days: u32,
    },
}

/// The TLS identity option every networked command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArg {
    /// This node's directory from `pagecast ca issue --out DIR` (ca.crt,
    /// node.crt, node.key).
    #[arg(long = "tls", value_name = "DIR", env = "PAGECAST_TLS")]
    pub tls: Option<PathBuf>,
}

/// How a migration switches over to its destination (`--switchover`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SwitchoverArg {
    /// Pre-copy; where the rounds stop shrinking (a guest dirtying faster
    /// than the link) the guest is slowed to half speed once, and if they
    /// still stall it resumes at the destination, which pulls the rest
    /// (post-copy), instead of being slowed further. Micro-VM moves only;
    /// anything else: pre-copy.
    Auto,
    /// Stop and copy once the rest fits --max-downtime, slowing a guest
    /// that dirties faster than the link until it does.
    Precopy,
    /// Resume at the destination right after the first full pass; the
    /// destination pulls each page its guest touches and the rest is
    /// pushed. Until the last page arrives the VM needs both hosts: if the
    /// destination or the link fails, the destination's copy stops and the
    /// source resumes its own from the pause once it learns that (what the
    /// guest did at the destination is lost); if the source dies, the VM
    /// is lost. Micro-VM moves only, to a destination
    /// whose agent may use userfaultfd (root, or
    /// vm.unprivileged_userfaultfd=1); refused for clones and adopted QEMU
    /// VMs.
    Postcopy,
}

impl SwitchoverArg {
    /// As the agent protocol carries it.
    pub fn to_proto(self) -> pagecast_proto::v1::SwitchoverMode {
        use pagecast_proto::v1::SwitchoverMode as M;
        match self {
            SwitchoverArg::Auto => M::Auto,
            SwitchoverArg::Precopy => M::Precopy,
            SwitchoverArg::Postcopy => M::Postcopy,
        }
    }
}

/// Loads the identity named by `--tls` or the environment.
pub fn load_tls(a: &TlsArg) -> anyhow::Result<pagecast_channel::Tls> {
    let dir = a.tls.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "no TLS identity: pass --tls DIR or set PAGECAST_TLS (make one with `pagecast ca issue ... --out DIR`)"
        )
    })?;
    Ok(pagecast_channel::Tls::load(dir)?)
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

/// A job that ran but did not move everything it was asked to: the
/// command exits with status 2 (1: refused or failed before anything
/// moved).
#[derive(Debug)]
pub struct NotAllMoved(pub String);

impl std::fmt::Display for NotAllMoved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotAllMoved {}

/// The exit status for `e`: 2 when a job ran but not everything moved, 1
/// otherwise.
pub fn exit_status(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<NotAllMoved>().is_some() {
        2
    } else {
        1
    }
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
        Command::Cordon(a) => index::cordon(a),
        Command::Uncordon(a) => index::uncordon(a),
        Command::Evacuate(a) => evacuate::run_evacuate(a),
        Command::Clone(a) => evacuate::run_clone(a),
        Command::Cancel(a) => evacuate::run_cancel(a),
        Command::Ca(CaCmd {
            command: CaSub::Init { dir },
        }) => {
            pagecast_channel::ca::Authority::init(&dir)?;
            eprintln!(
                "made a cluster CA in {} (ca.key and domains.key are owner-only: keep ca.key off \
                 the hosts)",
                dir.display()
            );
            Ok(())
        }
        Command::Ca(CaCmd {
            command:
                CaSub::Issue {
                    dir,
                    name,
                    role,
                    out,
                    days,
                },
        }) => {
            let ca = pagecast_channel::ca::Authority::load(&dir)?;
            ca.issue_to(&name, role, days, &out)?;
            eprintln!(
                "issued {name} ({role}) for {days} days in {}{}",
                out.display(),
                if role == pagecast_channel::Role::Host {
                    " with the cluster's dedup-domain secret (domains.key)"
                } else {
                    ""
                }
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
