//! `pagecast index ...` and `pagecast advise`: run a replica of the content
//! index, and publish VMs to it and ask it questions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pagecast_index::client::{self, IndexClient, VmContent};
use pagecast_index::replica::{self, ReplicaConfig};
use pagecast_memory::GuestMemory;
use pagecast_memory::fingerprint::{Fingerprinter, fingerprint_images};
use pagecast_pages::units::format_bytes;
use pagecast_pages::{PageHash, Sketch, sharing};
use pagecast_proto::v1::VmState;

use super::progress::pages_bar;
use super::{TlsArg, load_tls};

/// Run and query the replicated content index.
///
/// Three (or five) replicas form a cluster; each runs `index serve` with
/// the same --peers list and --shards. Clients take any replica's address
/// (or several, comma-separated) and find each shard's leader themselves.
///
/// A local three-replica cluster:
///
///   pagecast index serve --id 1 --listen 127.0.0.1:7401 --data /tmp/ix1 \
///       --peers 1=127.0.0.1:7401,2=127.0.0.1:7402,3=127.0.0.1:7403 &
///   (and the same with --id 2 and 3, their own --listen and --data)
///   pagecast index status --index 127.0.0.1:7401
///   pagecast index load --index 127.0.0.1:7401 --host h1 --vm web1=web1.img
///   pagecast index holders --index 127.0.0.1:7401 --image web2.img
///   pagecast advise --index 127.0.0.1:7401 --vm web1
///
/// Replacing replica 3 by a new replica 4 while the cluster runs:
///
///   pagecast index serve --id 4 --listen 127.0.0.1:7404 --data /tmp/ix4 \
///       --join 127.0.0.1:7401 &
///   pagecast index members add --index 127.0.0.1:7401 --id 4 --address 127.0.0.1:7404
///   pagecast index status --index 127.0.0.1:7401     (replica 4 caught up)
///   pagecast index members remove --index 127.0.0.1:7401 --id 3
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct IndexCmd {
    #[command(subcommand)]
    command: IndexSub,
}

#[derive(Debug, clap::Subcommand)]
enum IndexSub {
    Serve(ServeArgs),
    Status(StatusArgs),
    Load(LoadArgs),
    Unload(UnloadArgs),
    Holders(HoldersArgs),
    Members(MembersCmd),
    Rebalance(RebalanceArgs),
}

/// Move shards' voters so that every shard has --voters of the replicas
/// allowed, spread evenly: a new replica (started with `index serve
/// --join`, named by --add) takes its share, and replicas named by
/// --without give theirs up (to be stopped afterwards).
///
/// Each move adds a voter to a shard, waits until it has caught up, then
/// removes the voter it replaces; writes go on throughout. --dry-run
/// prints the moves only.
#[derive(Debug, clap::Args)]
pub struct RebalanceArgs {
    #[command(flatten)]
    index: IndexAddrs,
    /// A replica to move every shard off (repeatable).
    #[arg(long, value_name = "ID")]
    without: Vec<u64>,
    /// A replica that votes in no shard yet, to take its share (repeatable):
    /// one started with `index serve --join`.
    #[arg(long, value_name = "ID=HOST:PORT")]
    add: Vec<String>,
    /// Voters per shard.
    #[arg(long, default_value_t = 3, value_name = "K")]
    voters: usize,
    /// Print the moves, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// How long one added voter may take to catch up.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    catch_up_timeout: u64,
}

/// Change which replicas are the shards' voters, while the cluster runs.
///
/// Each change is one raft configuration change in every shard, answered
/// once applied there; writes go on meanwhile. Add a replica started with
/// `index serve --join`, wait for `index status` to show it caught up,
/// then remove the one it replaces (stop that process afterwards).
#[derive(Debug, clap::Args)]
pub struct MembersCmd {
    #[command(subcommand)]
    command: MembersSub,
}

#[derive(Debug, clap::Subcommand)]
enum MembersSub {
    /// Make replica --id (at --address) a voter of every shard.
    Add(MembersAddArgs),
    /// Stop replica --id being a voter of any shard.
    Remove(MembersRemoveArgs),
}

#[derive(Debug, clap::Args)]
pub struct MembersAddArgs {
    #[command(flatten)]
    index: IndexAddrs,
    /// The new replica's id (not one in use).
    #[arg(long, value_name = "N")]
    id: u64,
    /// Where the new replica listens (its `index serve --listen`).
    #[arg(long, value_name = "HOST:PORT")]
    address: String,
}

#[derive(Debug, clap::Args)]
pub struct MembersRemoveArgs {
    #[command(flatten)]
    index: IndexAddrs,
    /// The replica to remove.
    #[arg(long, value_name = "N")]
    id: u64,
}

/// Run one replica of the index until interrupted.
///
/// Every replica of a cluster gets the same --peers and --shards; the shard
/// count is fixed when the cluster is created (a data directory remembers
/// its replica id and shard count and refuses others). A replica restarted
/// on its directory rejoins with its data; a replica started on an empty
/// directory catches up from the leader (by snapshot if the log moved on).
///
/// A full disk stops nothing for good: a replica whose file system has
/// less than --min-free waits (saying so) before it starts, and one whose
/// storage fails while the disk is that full stops serving, waits for the
/// space to return and starts again in the same process, catching up from
/// the others. The others go on meanwhile; nothing acknowledged is lost.
/// Any other storage failure ends the process with an error.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// This replica's id, one of those in --peers.
    #[arg(long, value_name = "N")]
    id: u64,
    /// Address to listen on for replicas and clients.
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    /// Every replica of the cluster, this one included (or --join).
    #[arg(
        long,
        value_name = "1=HOST:PORT,2=HOST:PORT,...",
        required_unless_present = "join",
        conflicts_with = "join"
    )]
    peers: Option<String>,
    /// Voters of each shard when the cluster is created: placed across
    /// the --peers so that shards spread evenly (0: every replica votes in
    /// every shard). A replica holds a copy of the shards it votes in.
    #[arg(long, default_value_t = 3, value_name = "K")]
    voters_per_shard: usize,
    /// Join a running cluster through one of its replicas: learn its
    /// members and shard count from it, start with no shard to vote in,
    /// and wait for `index members add` to make this replica a voter.
    #[arg(long, value_name = "HOST:PORT")]
    join: Option<String>,
    /// RocksDB directory of this replica (created if missing).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Shards of the hash space, each its own raft group (1 to 256).
    #[arg(long, default_value_t = 4, value_name = "S")]
    shards: u32,
    /// Do not fsync the raft log on every append (faster; a power loss on a
    /// majority of replicas can then lose acknowledged writes).
    #[arg(long)]
    no_sync: bool,
    /// Compact a shard's raft log once it holds this many applied entries,
    /// keeping the newest min(64, ENTRIES/2) for replicas that lag a little
    /// (those further behind are sent a snapshot).
    #[arg(long, default_value_t = 512, value_name = "ENTRIES")]
    compact_after: u64,
    /// ... or once this many MiB of entries were appended to it since the
    /// last compaction, whichever comes first.
    #[arg(long, default_value_t = 32, value_name = "MIB")]
    compact_log_mib: u64,
    /// How long one part of a snapshot this replica fetches (when it is
    /// far behind) may take; past it the fetch is given up and starts
    /// again from the next snapshot its leader sends.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    snapshot_part_timeout: u64,
    /// Serve Prometheus metrics on this address.
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
    /// Least level of raft's own log lines on stderr: debug, info, warning, error.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    raft_log: String,
    /// Free space the data directory's file system needs to start on (see
    /// above), e.g. 16MiB.
    #[arg(long, default_value = "16MiB", value_name = "SIZE", value_parser = pagecast_pages::units::parse_size)]
    min_free: u64,
    /// This replica's identity: a node directory with an `index`
    /// certificate (`pagecast ca issue --role index`).
    #[command(flatten)]
    tls: TlsArg,
}

/// Which replicas to talk to.
#[derive(Debug, Clone, clap::Args)]
pub struct IndexAddrs {
    /// Index replicas, HOST:PORT[,HOST:PORT...]; any one is enough.
    #[arg(long = "index", value_name = "ADDRS", env = "PAGECAST_INDEX")]
    index: String,
    #[command(flatten)]
    pub tls: TlsArg,
}

impl IndexAddrs {
    /// The addresses.
    pub fn list(&self) -> Vec<String> {
        self.index
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// This command's TLS identity.
    pub fn identity(&self) -> anyhow::Result<pagecast_channel::Tls> {
        load_tls(&self.tls)
    }

    /// A client of these replicas.
    pub fn client(&self) -> anyhow::Result<IndexClient> {
        Ok(IndexClient::new(&self.list(), self.identity()?)?)
    }
}

/// Per shard and replica: role, leader, term, commit and applied index,
/// log entries, distinct hashes.
///
/// Distinct hashes are RocksDB's estimate (marked `~`) unless `--exact` is
/// given: holder deltas are written without reading the lists, so no exact
/// count is kept, and `--exact` makes each replica scan its shards.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    index: IndexAddrs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Count each shard's distinct hashes exactly: every replica reads all
    /// its holder lists (seconds per ten million hashes).
    #[arg(long)]
    exact: bool,
}

/// Fingerprint memory images and publish them as VMs held by a host.
///
/// Each VM's distinct non-zero pages go to the shards in numbered batches;
/// an interrupted load is finished by running the same command again (the
/// batches already applied are skipped). A VM name is unique in the index.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    #[command(flatten)]
    index: IndexAddrs,
    /// The host that holds these VMs.
    #[arg(long, value_name = "NAME")]
    host: String,
    /// A VM and its raw memory image; repeat for more.
    #[arg(long = "vm", value_name = "VMNAME=IMAGE", required = true)]
    vms: Vec<String>,
    /// Holder deltas per raft proposal.
    #[arg(long, default_value_t = 8192, value_name = "N")]
    batch: usize,
    /// Never draw a progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Remove a VM from the index.
///
/// The VM's image is read again (from where it was loaded, or --image) to
/// know what to remove; it must still hold the content that was loaded.
#[derive(Debug, clap::Args)]
pub struct UnloadArgs {
    #[command(flatten)]
    index: IndexAddrs,
    /// The host that holds the VM.
    #[arg(long, value_name = "NAME")]
    host: String,
    /// The VM.
    #[arg(long, value_name = "VMNAME")]
    vm: String,
    /// Read the content from this image instead of the one recorded at load.
    #[arg(long, value_name = "IMAGE")]
    image: Option<PathBuf>,
    /// Holder deltas per raft proposal.
    #[arg(long, default_value_t = 8192, value_name = "N")]
    batch: usize,
    /// Never draw a progress bar.
    #[arg(long)]
    no_progress: bool,
}

/// For the distinct non-zero pages of an image: how many each host holds,
/// and how many no host holds.
#[derive(Debug, clap::Args)]
pub struct HoldersArgs {
    #[command(flatten)]
    index: IndexAddrs,
    /// A raw memory image.
    #[arg(long, value_name = "IMAGE")]
    image: PathBuf,
    /// Answer from any replica's applied state, without a leader round trip.
    #[arg(long)]
    stale: bool,
    /// Never draw a progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Sharing advice for placing VMs, from the content index.
///
/// Three forms:
///
///   --vm NAME: the hosts that already hold most of a VM's content and the
///   VMs most like it (running VMs their agents publish, or VMs loaded with
///   `index load`), estimated from sketches; a VM's own host is counted
///   without the VM itself. Only VMs of its dedup domain count: pages are
///   never shared across domains.
///
///   --image FILE: for a VM not yet started, which hosts hold most of its
///   distinct pages (looked up exactly, page by page) and have the capacity
///   to run it (capacity minus memory in use, as their agents report).
///
///   --cluster: every pair of VMs' estimated Jaccard index of their page
///   sets (0 between VMs of different dedup domains), and the groups worth
///   placing together (average-linkage clustering at --threshold).
///
/// JSON (--json):
///
///   --vm: {"vm", "host", "distinct", "domain", "state", "hosts":
///   [{"name", "host", "jaccard", "shared_pages"}], "vms": [same]}
///
///   --image: {"image", "memory_bytes", "distinct", "held_by_none",
///   "hosts": [{"host", "held_pages", "fraction", "capacity_bytes",
///   "free_bytes", "fits"}]}, best first
///
///   --cluster: {"vms": [{"name", "host", "domain"}], "matrix": [[jaccard]],
///   "groups": [[name]], "threshold"}
///
/// Examples:
///
///   pagecast advise --index 10.0.0.1:7600 --vm web1
///
///   pagecast advise --index 10.0.0.1:7600 --image /images/web-next.raw
///
///   pagecast advise --index 10.0.0.1:7600 --cluster --json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
#[command(group(clap::ArgGroup::new("subject").required(true).args(["vm", "image", "cluster"])))]
pub struct AdviseArgs {
    #[command(flatten)]
    index: IndexAddrs,
    /// A VM the index knows (running, or loaded with `index load`).
    #[arg(long, value_name = "VMNAME")]
    vm: Option<String>,
    /// A raw memory image of a VM not yet started.
    #[arg(long, value_name = "IMAGE")]
    image: Option<PathBuf>,
    /// The whole cluster: pairwise sharing and co-location groups.
    #[arg(long)]
    cluster: bool,
    /// How many hosts and VMs to list.
    #[arg(long, default_value_t = 5, value_name = "K")]
    top: u32,
    /// Least average Jaccard index of a co-location group (--cluster).
    #[arg(long, default_value_t = 0.1, value_name = "J")]
    threshold: f64,
    /// Answer from any replica's applied state (faster, maybe slightly old).
    #[arg(long)]
    stale: bool,
    /// Never draw a progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The cluster as the content index sees it: per host, its address, rack,
/// link, capacity, memory in use, VMs, distinct pages held, pages left out
/// as hot, and when its agent last reported.
///
/// "hot" counts frames whose current content the index does not show:
/// rewritten in each of the last few refreshes (left out until they
/// settle), or waiting for the per-VM update bound. A host that `index
/// load` named but no agent runs on shows no address.
///
/// JSON (--json): {"hosts": [{"name", "address", "rack", "link_bps",
/// "capacity_bytes", "used_bytes", "vms": [names], "pages", "hot_pages",
/// "last_seen_s", "cordoned", "cordon_reason"}]} (last_seen_s is null for
/// a host no agent reported).
///
/// Example:
///
///   pagecast hosts --index 10.0.0.1:7600
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct HostsArgs {
    #[command(flatten)]
    index: IndexAddrs,
    /// Answer from any replica's applied state (faster, maybe slightly old).
    #[arg(long)]
    stale: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Cordons a host: no evacuation or clone sends it VMs (nor their
/// `--dry-run` plans), `advise` never proposes it, and its agent refuses
/// to start or adopt a VM unless told `--force` (the agent asks the index
/// at each start). VMs already there keep running. Operators only.
/// `pagecast uncordon HOST` lifts it; `pagecast hosts` shows it.
///
/// Example:
///
///   pagecast cordon b3 --reason "firmware update" --index 10.0.0.1:7600
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct CordonArgs {
    /// The host, as `pagecast hosts` names it.
    host: String,
    /// Why, for `pagecast hosts` to show.
    #[arg(long, value_name = "TEXT", default_value = "")]
    reason: String,
    #[command(flatten)]
    index: IndexAddrs,
}

/// Lifts a host's cordon (`pagecast cordon --help`).
///
/// Example:
///
///   pagecast uncordon b3 --index 10.0.0.1:7600
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct UncordonArgs {
    /// The host, as `pagecast hosts` names it.
    host: String,
    #[command(flatten)]
    index: IndexAddrs,
}

/// Runs `pagecast cordon`.
pub fn cordon(a: CordonArgs) -> anyhow::Result<()> {
    set_cordon(&a.index, &a.host, true, &a.reason)
}

/// Runs `pagecast uncordon`.
pub fn uncordon(a: UncordonArgs) -> anyhow::Result<()> {
    set_cordon(&a.index, &a.host, false, "")
}

fn set_cordon(index: &IndexAddrs, host: &str, on: bool, reason: &str) -> anyhow::Result<()> {
    let mut c = index.client()?;
    c.timeout = Duration::from_secs(20);
    client::set_cordon(&mut c, host, on, reason)
        .with_context(|| format!("{} {host}", if on { "cordoning" } else { "uncordoning" }))?;
    if on {
        println!(
            "{host} is cordoned: no plan sends it VMs and its agent starts or adopts none \
             until `pagecast uncordon {host}`"
        );
    } else {
        println!("{host} is no longer cordoned");
    }
    Ok(())
}

/// Runs `pagecast index ...`.
pub fn run(cmd: IndexCmd, threads: usize) -> anyhow::Result<()> {
    match cmd.command {
        IndexSub::Serve(a) => serve(a),
        IndexSub::Status(a) => status(a),
        IndexSub::Load(a) => load(a, threads),
        IndexSub::Unload(a) => unload(a, threads),
        IndexSub::Holders(a) => holders(a, threads),
        IndexSub::Rebalance(a) => super::rebalance::run(
            &a.index.list(),
            a.index.identity()?,
            &a.without,
            &a.add,
            a.voters,
            a.dry_run,
            Duration::from_secs(a.catch_up_timeout),
        ),
        IndexSub::Members(m) => match m.command {
            MembersSub::Add(a) => members_change(&a.index, a.id, &a.address, 0),
            MembersSub::Remove(a) => members_change(&a.index, 0, "", a.id),
        },
    }
}

/// The members and shard count of the cluster the replica at `at` is in,
/// this replica (`id` at `listen`) added.
fn joined_peers(
    at: &str,
    id: u64,
    listen: &str,
    tls: &pagecast_channel::Tls,
) -> anyhow::Result<(std::collections::BTreeMap<u64, String>, u32)> {
    let mut c = IndexClient::new(&[at.to_owned()], tls.clone())?;
    let st = c
        .status_of(at)
        .map_err(|e| anyhow::anyhow!("--join {at}: {e}"))?;
    let mut peers = replica::parse_peers(&st.peers.join(","))
        .map_err(|e| anyhow::anyhow!("--join {at}: its members: {e}"))?;
    match peers.get(&id) {
        // This replica again (a restart): the members it recorded rule.
        Some(a) if a == listen => {}
        Some(a) => {
            bail!("--join {at}: replica {id} is already a member (at {a}); pick another --id")
        }
        None => {}
    }
    peers.insert(id, listen.to_owned());
    Ok((peers, st.shards.len() as u32))
}

/// Runs `index members add` (`add` non-zero) or `remove`, every shard.
fn members_change(ix: &IndexAddrs, add: u64, address: &str, remove: u64) -> anyhow::Result<()> {
    let mut c = ix.client()?;
    c.timeout = Duration::from_secs(30);
    let shards = c.shards()?;
    let what = if add != 0 {
        format!("add replica {add} at {address}")
    } else {
        format!("remove replica {remove}")
    };
    for s in 0..shards {
        let w = members_request(&mut c, s, add, address, remove)
            .with_context(|| format!("shard {s}: {what}"))?;
        println!(
            "shard {s}: {what}: {}",
            if w.duplicate { "already so" } else { "done" }
        );
    }
    Ok(())
}

/// One membership change in shard `s` (`add` non-zero: add replica `add`
/// at `address`; else remove replica `remove`), at its leader.
pub fn members_request(
    c: &mut IndexClient,
    s: u32,
    add: u64,
    address: &str,
    remove: u64,
) -> anyhow::Result<pagecast_proto::v1::WriteResponse> {
    use pagecast_proto::v1::{IndexRequest, MembersRequest, index_request::Op};
    {
        let req = IndexRequest {
            shard: s,
            stale: false,
            op: Some(Op::Members(MembersRequest {
                add_id: add,
                add_address: address.to_owned(),
                remove_id: remove,
            })),
        };
        Ok(c.write_request(req)?)
    }
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let tls = load_tls(&a.tls)?;
    let (peers, shards) = match (&a.peers, &a.join) {
        (Some(p), _) => (
            replica::parse_peers(p).map_err(|e| anyhow::anyhow!("--peers: {e}"))?,
            a.shards,
        ),
        (None, Some(at)) => joined_peers(at, a.id, &a.listen, &tls)?,
        (None, None) => bail!("give --peers, or --join a running cluster"),
    };
    let level = match a.raft_log.as_str() {
        "debug" => slog::Level::Debug,
        "info" => slog::Level::Info,
        "warning" | "warn" => slog::Level::Warning,
        "error" => slog::Level::Error,
        other => bail!("--raft-log {other:?}: use debug, info, warning or error"),
    };
    if let Some(m) = &a.metrics {
        let addr: std::net::SocketAddr = m.parse().with_context(|| format!("--metrics {m}"))?;
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
    }
    let cfg = ReplicaConfig {
        id: a.id,
        listen: a.listen.clone(),
        peers: peers.clone(),
        data: a.data.clone(),
        shards,
        sync: !a.no_sync,
        compact_after: a.compact_after.max(2),
        compact_bytes: a.compact_log_mib.max(1) << 20,
        raft_log_level: level,
        tls,
        part_deadline: Duration::from_secs(a.snapshot_part_timeout.clamp(1, 3600)),
        join: a.join.is_some(),
        voters_per_shard: a.voters_per_shard,
    };
    wait_for_space(&a.data, a.min_free);
    let r = replica::start(cfg)?;
    tracing::info!(
        "index replica {} of {} serving {} shards on {}, data in {}",
        a.id,
        peers.len(),
        shards,
        r.local_addr(),
        a.data.display()
    );
    let stopped = r.wait_stopped();
    let free = free_bytes(&a.data);
    if free.is_some_and(|f| f < a.min_free) {
        tracing::error!(
            "replica {}: shard {} could not write to {} ({}), whose file system has {} free: \
             this replica waits for {} free, then starts again and catches up from the others",
            a.id,
            stopped.shard,
            a.data.display(),
            stopped.error,
            format_bytes(free.unwrap_or(0)),
            format_bytes(a.min_free)
        );
        wait_for_space(&a.data, a.min_free);
        tracing::info!("replica {}: space is back; starting again", a.id);
        let err = restart_self();
        bail!("replica {}: cannot start again: {err}", a.id);
    }
    bail!(
        "replica {}: shard {} stopped: {} (data in {}); nothing it acknowledged is lost: start it \
         again once the cause is fixed and it catches up from the others",
        a.id,
        stopped.shard,
        stopped.error,
        a.data.display()
    )
}

/// Bytes free to unprivileged writers on the file system of `dir` (or of
/// its nearest existing ancestor), if it can be read.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let at = dir.ancestors().find(|p| p.exists())?;
    let at = if at.as_os_str().is_empty() {
        Path::new(".")
    } else {
        at
    };
    let c = std::ffi::CString::new(at.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs(3) fills the zeroed struct we pass; `c` is a
    // NUL-terminated path that outlives the call.
    let s = unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return None;
        }
        s
    };
    Some(s.f_bavail * s.f_frsize)
}

/// Waits until the file system of `dir` has `min` bytes free, saying so
/// when it starts waiting and every 30 s.
fn wait_for_space(dir: &Path, min: u64) {
    let mut told: Option<Instant> = None;
    loop {
        let Some(free) = free_bytes(dir) else { return };
        if free >= min {
            return;
        }
        if told.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
            tracing::warn!(
                "{}: {} free, waiting for {} (--min-free) before serving",
                dir.display(),
                format_bytes(free),
                format_bytes(min)
            );
            told = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Replaces this process with a fresh run of the same command: RocksDB
/// reopens its directory and raft recovers from what it persisted. Returns
/// only on failure.
fn restart_self() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .exec(),
        Err(e) => e,
    }
}

fn status(a: StatusArgs) -> anyhow::Result<()> {
    let addrs = a.index.list();
    let mut c = IndexClient::new(&addrs, a.index.identity()?)?;
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for addr in &addrs {
        match c.status_counted(addr, a.exact) {
            Ok(s) => rows.push((addr.clone(), s)),
            Err(e) => failures.push(e),
        }
    }
    // Ask the other replicas the first one knows of, so that one address
    // shows the whole cluster.
    if let Some((_, first)) = rows.first() {
        let known: Vec<String> = first
            .peers
            .iter()
            .filter_map(|p| p.split_once('=').map(|(_, a)| a.to_owned()))
            .filter(|p| !addrs.contains(p))
            .collect();
        for addr in known {
            match c.status_counted(&addr, a.exact) {
                Ok(s) => rows.push((addr, s)),
                Err(e) => failures.push(e),
            }
        }
    }
    if rows.is_empty() {
        bail!("no replica answered: {}", failures.join("; "));
    }
    if a.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(addr, s)| {
                serde_json::json!({
                    "address": addr,
                    "replica": s.replica,
                    "shards": s.shards.iter().map(|x| serde_json::json!({
                        "shard": x.shard, "role": x.role, "leader": x.leader, "term": x.term,
                        "commit": x.commit, "applied": x.applied, "first_index": x.first_index,
                        "last_index": x.last_index,
                        "entries": (x.last_index + 1).saturating_sub(x.first_index),
                        "distinct_hashes": x.distinct_hashes, "distinct_exact": x.distinct_exact,
                        "holder_frames": x.holder_frames,
                        "snapshots_sent": x.snapshots_sent, "snapshots_received": x.snapshots_received,
                        "voters": x.voters,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"replicas": v, "unreachable": failures})
            )?
        );
        return Ok(());
    }
    print_status_table(&rows);
    for f in failures {
        println!("unreachable: {f}");
    }
    Ok(())
}

/// `index status`'s table: one line per shard and replica, by shard.
fn print_status_table(rows: &[(String, pagecast_proto::v1::StatusResponse)]) {
    println!(
        "{:>5} {:>7} {:<21} {:<10} {:>6} {:>5} {:>9} {:>9} {:>8} {:>12} {:>5}  VOTERS",
        "SHARD",
        "REPLICA",
        "ADDRESS",
        "ROLE",
        "LEADER",
        "TERM",
        "COMMIT",
        "APPLIED",
        "ENTRIES",
        "DISTINCT",
        "SNAPS",
    );
    let mut lines = Vec::new();
    for (addr, s) in rows {
        for x in &s.shards {
            lines.push((x.shard, s.replica, addr.clone(), x.clone()));
        }
    }
    lines.sort_by_key(|l| (l.0, l.1));
    for (shard, rep, addr, x) in lines {
        println!(
            "{:>5} {:>7} {:<21} {:<10} {:>6} {:>5} {:>9} {:>9} {:>8} {:>12} {:>5}  {}",
            shard,
            rep,
            addr,
            x.role,
            x.leader,
            x.term,
            x.commit,
            x.applied,
            (x.last_index + 1).saturating_sub(x.first_index),
            if x.distinct_exact {
                x.distinct_hashes.to_string()
            } else {
                format!("~{}", x.distinct_hashes)
            },
            format!("{}/{}", x.snapshots_sent, x.snapshots_received),
            x.voters
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
    }
}

fn fingerprint_image(
    fp: &Fingerprinter,
    path: &Path,
    label: &str,
    quiet: bool,
) -> anyhow::Result<Vec<PageHash>> {
    let bar = pages_bar(0, label, quiet);
    // Loaded images are in the cluster-wide dedup domain.
    let img = fingerprint_images(
        &[path],
        &[pagecast_pages::ContentKey::CLUSTER],
        fp,
        &mut |_, img| bar.set_length(img.page_count()),
        &|n| bar.inc(n),
    )
    .with_context(|| format!("{}", path.display()))?
    .pop()
    .expect("one image");
    bar.finish_and_clear();
    Ok(img.fingerprints.hashes)
}

fn absolute(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

fn load(a: LoadArgs, threads: usize) -> anyhow::Result<()> {
    let mut pairs = Vec::new();
    for v in &a.vms {
        let (name, image) = v
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--vm {v:?}: expected VMNAME=IMAGE"))?;
        pairs.push((name.to_owned(), PathBuf::from(image)));
    }
    let fp = Fingerprinter::new(threads)?;
    let addrs = a.index.list();
    let tls = a.index.identity()?;
    let mut out = Vec::new();
    for (name, image) in pairs {
        let t0 = Instant::now();
        let hashes = fingerprint_image(&fp, &image, "hashing", a.no_progress)?;
        let content = VmContent::from_frames(&name, &absolute(&image), &hashes);
        let hash_s = t0.elapsed().as_secs_f64();
        let bar = pages_bar(content.counts.len() as u64, "publishing", a.no_progress);
        let rep = client::load_vm(&addrs, &tls, &a.host, &content, a.batch, &|n| bar.inc(n))
            .with_context(|| format!("loading VM {name}"))?;
        bar.finish_and_clear();
        let rate = rep.deltas as f64 / rep.elapsed.as_secs_f64().max(1e-9);
        if a.json {
            out.push(serde_json::json!({
                "vm": name, "host": a.host, "image": content.image, "frames": content.frames,
                "distinct": content.counts.len(), "deltas": rep.deltas, "batches": rep.batches,
                "already_applied_batches": rep.duplicates, "resumed": rep.resumed,
                "hash_seconds": hash_s, "publish_seconds": rep.elapsed.as_secs_f64(),
                "updates_per_second": rate,
            }));
        } else {
            println!(
                "loaded {name} on {}: {} frames, {} distinct non-zero pages, {} batches{}; {:.0} updates/s ({:.2} s publishing, {:.2} s hashing)",
                a.host,
                content.frames,
                content.counts.len(),
                rep.batches,
                if rep.resumed {
                    format!(" (resumed; {} already applied)", rep.duplicates)
                } else {
                    String::new()
                },
                rate,
                rep.elapsed.as_secs_f64(),
                hash_s
            );
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

fn unload(a: UnloadArgs, threads: usize) -> anyhow::Result<()> {
    let fp = Fingerprinter::new(threads)?;
    let addrs = a.index.list();
    let bar = pages_bar(0, "removing", a.no_progress);
    let rep = client::unload_vm(
        &addrs,
        &a.index.identity()?,
        &a.host,
        &a.vm,
        a.batch,
        |rec| {
            let path = a.image.clone().unwrap_or_else(|| PathBuf::from(&rec.image));
            let hashes = fingerprint_image(&fp, &path, "hashing", a.no_progress)
                .map_err(|e| format!("{e:#} (pass --image if the image moved)"))?;
            let c = VmContent::from_frames(&rec.name, &rec.image, &hashes);
            bar.set_length(c.counts.len() as u64);
            Ok(c)
        },
        &|n| bar.inc(n),
    )
    .with_context(|| format!("unloading VM {}", a.vm))?;
    bar.finish_and_clear();
    println!(
        "unloaded {} from {}: {} distinct pages in {} batches ({:.0} updates/s)",
        a.vm,
        a.host,
        rep.deltas,
        rep.batches,
        rep.deltas as f64 / rep.elapsed.as_secs_f64().max(1e-9)
    );
    Ok(())
}

fn holders(a: HoldersArgs, threads: usize) -> anyhow::Result<()> {
    let fp = Fingerprinter::new(threads)?;
    let hashes = fingerprint_image(&fp, &a.image, "hashing", a.no_progress)?;
    let rep = client::holders_of(&a.index.list(), &a.index.identity()?, &hashes, a.stale)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "image": a.image.display().to_string(),
                "distinct": rep.distinct,
                "hosts": rep.by_host,
                "held_by_none": rep.held_by_none,
            }))?
        );
        return Ok(());
    }
    let pct = |n: u64| 100.0 * n as f64 / rep.distinct.max(1) as f64;
    println!(
        "{}: {} distinct non-zero pages",
        a.image.display(),
        rep.distinct
    );
    let mut hosts: Vec<_> = rep.by_host.iter().collect();
    hosts.sort_by(|x, y| y.1.cmp(x.1).then(x.0.cmp(y.0)));
    println!("{:<24} {:>12} {:>7}", "HOST", "PAGES", "%");
    for (h, n) in hosts {
        println!("{:<24} {:>12} {:>6.1}%", h, n, pct(*n));
    }
    println!(
        "{:<24} {:>12} {:>6.1}%",
        "(no host)",
        rep.held_by_none,
        pct(rep.held_by_none)
    );
    Ok(())
}

/// Runs `pagecast advise`.
pub fn advise(a: AdviseArgs, threads: usize) -> anyhow::Result<()> {
    if let Some(vm) = a.vm.clone() {
        return advise_vm(&a, &vm);
    }
    if let Some(image) = a.image.clone() {
        return advise_image(&a, &image, threads);
    }
    advise_cluster(&a)
}

fn advise_vm(a: &AdviseArgs, vm_name: &str) -> anyhow::Result<()> {
    let mut c = a.index.client()?;
    c.timeout = Duration::from_secs(20);
    let r = c.advise(vm_name, a.top.max(1), a.stale)?;
    let vm = r.vm.clone().unwrap_or_default();
    let domain = pagecast_pages::domain::normalize(&vm.domain);
    if a.json {
        let cand = |v: &[pagecast_proto::v1::Candidate]| {
            v.iter()
                .map(|c| serde_json::json!({"name": c.name, "host": c.host, "jaccard": c.jaccard, "shared_pages": c.shared_pages}))
                .collect::<Vec<_>>()
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "vm": vm.name, "host": r.vm_host, "distinct": vm.distinct, "domain": domain,
                "state": VmState::try_from(vm.state).map_or("unknown", |s| s.as_str_name()),
                "hosts": cand(&r.hosts), "vms": cand(&r.vms),
            }))?
        );
        return Ok(());
    }
    println!(
        "{} on {}: {} distinct non-zero pages, dedup domain {domain}",
        vm.name, r.vm_host, vm.distinct
    );
    println!(
        "\nhosts holding most of its content (in other VMs of domain {domain}; {} itself not \
         counted):",
        vm.name
    );
    println!("{:<24} {:>14} {:>8}", "HOST", "SHARED PAGES", "JACCARD");
    for h in &r.hosts {
        println!("{:<24} {:>14.0} {:>8.3}", h.name, h.shared_pages, h.jaccard);
    }
    if r.hosts.is_empty() {
        println!("(no other VMs)");
    }
    println!("\nmost similar VMs:");
    println!(
        "{:<24} {:<16} {:>14} {:>8}",
        "VM", "HOST", "SHARED PAGES", "JACCARD"
    );
    for v in &r.vms {
        println!(
            "{:<24} {:<16} {:>14.0} {:>8.3}",
            v.name, v.host, v.shared_pages, v.jaccard
        );
    }
    if r.vms.is_empty() {
        println!("(no other VMs)");
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct ImageHost {
    host: String,
    held_pages: u64,
    fraction: f64,
    capacity_bytes: u64,
    free_bytes: u64,
    fits: bool,
}

fn advise_image(a: &AdviseArgs, image: &Path, threads: usize) -> anyhow::Result<()> {
    let fp = Fingerprinter::new(threads)?;
    let hashes = fingerprint_image(&fp, image, "hashing", a.no_progress || a.json)?;
    let memory = hashes.len() as u64 * pagecast_pages::PAGE_BYTES;
    let addrs = a.index.list();
    let rep = client::holders_of(&addrs, &a.index.identity()?, &hashes, a.stale)?;
    let mut c = IndexClient::new(&addrs, a.index.identity()?)?;
    let hosts = c.hosts(a.stale)?;
    // A cordoned host is never proposed.
    let mut rows: Vec<ImageHost> = hosts
        .iter()
        .filter(|h| !h.cordoned)
        .map(|h| {
            let free = h.capacity_bytes.saturating_sub(h.used_bytes);
            let held = rep.by_host.get(&h.name).copied().unwrap_or(0);
            ImageHost {
                host: h.name.clone(),
                held_pages: held,
                fraction: held as f64 / rep.distinct.max(1) as f64,
                capacity_bytes: h.capacity_bytes,
                free_bytes: free,
                fits: h.capacity_bytes > 0 && free >= memory,
            }
        })
        .collect();
    rows.sort_by(|x, y| {
        y.fits
            .cmp(&x.fits)
            .then(y.held_pages.cmp(&x.held_pages))
            .then(x.host.cmp(&y.host))
    });
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "image": image.display().to_string(),
                "memory_bytes": memory,
                "distinct": rep.distinct,
                "held_by_none": rep.held_by_none,
                "hosts": rows,
            }))?
        );
        return Ok(());
    }
    println!(
        "{}: {}, {} distinct non-zero pages, {} held by no host",
        image.display(),
        format_bytes(memory),
        rep.distinct,
        rep.held_by_none
    );
    println!(
        "{:<24} {:>12} {:>7} {:>12}  FITS",
        "HOST", "HELD PAGES", "%", "FREE"
    );
    for r in &rows {
        println!(
            "{:<24} {:>12} {:>6.1}% {:>12}  {}",
            r.host,
            r.held_pages,
            r.fraction * 100.0,
            if r.capacity_bytes == 0 {
                "unknown".to_owned()
            } else {
                format_bytes(r.free_bytes)
            },
            if r.fits { "yes" } else { "no" }
        );
    }
    Ok(())
}

fn advise_cluster(a: &AdviseArgs) -> anyhow::Result<()> {
    let mut c = a.index.client()?;
    c.timeout = Duration::from_secs(20);
    let hosts: HashMap<u32, String> = c
        .hosts(a.stale)?
        .into_iter()
        .map(|h| (h.index, h.name))
        .collect();
    let vms: Vec<_> = c
        .vms(a.stale)?
        .into_iter()
        .filter(|v| v.state == VmState::Loaded as i32 || v.state == VmState::Running as i32)
        .collect();
    let mut sketches = Vec::with_capacity(vms.len());
    for v in &vms {
        sketches.push(
            Sketch::from_bytes(&v.sketch)
                .with_context(|| format!("VM {}: its sketch in the index", v.name))?,
        );
    }
    let mut matrix = sharing::sharing_matrix(&sketches);
    // Pages are shared only within a dedup domain: pairs across domains
    // share nothing (their estimate would be sketch noise).
    for (i, row) in matrix.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            if !pagecast_index::sharing::same_domain(&vms[i], &vms[j]) {
                *v = 0.0;
            }
        }
    }
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    let groups: Vec<Vec<&str>> = sharing::colocation_groups(&matrix, a.threshold)
        .into_iter()
        .map(|g| g.into_iter().map(|i| names[i]).collect())
        .collect();
    let host_of = |v: &pagecast_proto::v1::VmRecord| {
        hosts
            .get(&v.host)
            .cloned()
            .unwrap_or_else(|| format!("#{}", v.host))
    };
    if a.json {
        let list: Vec<_> = vms
            .iter()
            .map(|v| {
                serde_json::json!({"name": v.name, "host": host_of(v),
                    "domain": pagecast_pages::domain::normalize(&v.domain)})
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "vms": list, "matrix": matrix, "groups": groups, "threshold": a.threshold,
            }))?
        );
        return Ok(());
    }
    println!(
        "{} VMs; estimated Jaccard index of their page sets:",
        vms.len()
    );
    print!("{:<16}", "");
    for n in &names {
        print!(" {:>8.8}", n);
    }
    println!();
    for (i, row) in matrix.iter().enumerate() {
        print!("{:<16.16}", names[i]);
        for v in row {
            print!(" {v:>8.3}");
        }
        println!();
    }
    println!(
        "\ngroups worth placing together (average Jaccard >= {}):",
        a.threshold
    );
    for g in &groups {
        println!("  {}", g.join(", "));
    }
    Ok(())
}

/// Runs `pagecast hosts`.
pub fn hosts(a: HostsArgs) -> anyhow::Result<()> {
    let mut c = a.index.client()?;
    c.timeout = Duration::from_secs(20);
    let hosts = c.hosts(a.stale)?;
    let shards = c.shards()?;
    let mut pages: HashMap<u32, u64> = HashMap::new();
    for s in 0..shards {
        for (h, sum) in c.holdings_of(s, 0, a.stale)? {
            *pages.entry(h).or_default() += sum.distinct;
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let rows: Vec<serde_json::Value> = hosts
        .iter()
        .map(|h| {
            let last_seen =
                (h.reported_ms > 0).then(|| now.saturating_sub(h.reported_ms) as f64 / 1e3);
            serde_json::json!({
                "name": h.name,
                "address": h.address,
                "rack": h.rack,
                "link_bps": h.link_bps,
                "capacity_bytes": h.capacity_bytes,
                "used_bytes": h.used_bytes,
                "vms": h.vm_names,
                "pages": pages.get(&h.index).copied().unwrap_or(0),
                "hot_pages": h.hot_pages,
                "last_seen_s": last_seen,
                "cordoned": h.cordoned,
                "cordon_reason": h.cordon_reason,
            })
        })
        .collect();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "hosts": rows }))?
        );
        return Ok(());
    }
    println!(
        "{:<14} {:<21} {:<8} {:>9} {:>10} {:>10} {:>10} {:>8} {:>6} {:<8}  VMS",
        "HOST", "ADDRESS", "RACK", "LINK", "CAPACITY", "USED", "PAGES", "HOT", "SEEN", "CORDON"
    );
    for (h, r) in hosts.iter().zip(&rows) {
        let seen = r["last_seen_s"]
            .as_f64()
            .map_or_else(|| "-".to_owned(), |s| format!("{s:.0}s"));
        println!(
            "{:<14} {:<21} {:<8} {:>9} {:>10} {:>10} {:>10} {:>8} {:>6} {:<8}  {}",
            h.name,
            if h.address.is_empty() {
                "-"
            } else {
                &h.address
            },
            if h.rack.is_empty() { "-" } else { &h.rack },
            if h.link_bps == 0 {
                "-".to_owned()
            } else {
                format_rate(h.link_bps)
            },
            format_bytes(h.capacity_bytes),
            format_bytes(h.used_bytes),
            r["pages"].to_string(),
            h.hot_pages,
            seen,
            if h.cordoned { "yes" } else { "-" },
            h.vm_names.join(",")
        );
    }
    for h in hosts.iter().filter(|h| h.cordoned) {
        let why = if h.cordon_reason.is_empty() {
            "no reason given"
        } else {
            &h.cordon_reason
        };
        println!("{} is cordoned: {why}", h.name);
    }
    Ok(())
}

fn format_rate(bps: u64) -> String {
    if bps >= 1_000_000_000 {
        format!("{:.1}G", bps as f64 / 1e9)
    } else if bps >= 1_000_000 {
        format!("{:.0}M", bps as f64 / 1e6)
    } else {
        format!("{bps}")
    }
}
