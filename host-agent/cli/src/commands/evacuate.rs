//! `pagecast evacuate`, `pagecast clone` and `pagecast cancel`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use pagecast_coordinator::{CoordError, EvacuateSpec, EvacuationReport, Event, Method};
use pagecast_pages::units::{format_bytes, parse_bits_per_second};
use pagecast_proto::v1;
use pagecast_proto::v1::MigratePhase;
use pagecast_scheduler::Objective;

use super::index::IndexAddrs;

/// Move every VM off one or more hosts (a rack, for maintenance), each
/// unique page leaving its source once.
///
/// Reads the cluster from the content index (hosts, racks, links,
/// capacities, running VMs), asks the source agents what the moving VMs
/// hold (their content maps, no fresh hash), asks the index which hosts
/// hold those pages, and plans where each VM goes. Then every migration
/// starts and holds once its destination has filled what it already holds;
/// pages a host in the destination's rack holds come from that rack-mate;
/// every other missing page leaves one source once, multicast to every
/// destination that lacks it; then each VM finishes live: the pages dirtied
/// meanwhile, a switchover within --max-downtime, verification, resume at
/// the destination, release at the source.
///
/// Strategies: pagecast (the above; placement minimises the most loaded
/// link's time first, or bytes with --objective bytes); vmscatter
/// (VMScatter as published: content-blind placement, pages shared by the
/// moving VMs multicast once, nothing reused from destinations); precopy
/// (each VM its own pre-copy migration, every non-zero page sent, at most
/// --parallel at a time per source host).
///
/// A VM whose migration fails keeps running at its source; running the
/// same command again moves what is still there. Ctrl-C, or `pagecast
/// cancel JOB` from anywhere, stops every VM not yet switched over (they
/// stay at their sources). Exits non-zero unless every VM moved verified.
///
/// JSON (--json): {"job", "ok", "strategy", "dry_run", "vms": [{"name",
/// "from", "to", "ok", "verified", "kind", "downtime_ms", "max_downtime_ms" (asked), "bytes_sent",
/// "pages_local", "pages_short_haul", "pages_cast", "error", "in_doubt",
/// "switchover" ("precopy", "postcopy", or "" if it did not),
/// "postcopy_faults" and "postcopy_s" (pages its guest asked for at the
/// destination, and seconds until its last page arrived there),
/// "max_throttle_pct" (the most its guest was slowed under pre-copy), "left_s"
/// (when it left its source, or null)}], "source_bytes", "core_bytes", "bytes_by_class":
/// {"multicast", "unicast", "short_haul", "repair"}, "eviction_s",
/// "evicted_s" ({SOURCE: seconds until its last VM left, or null if one
/// stayed}), "total_s",
/// "predicted": {"source_bytes", "rewrite_bytes", "manifest_bytes",
/// "header_bytes", "core_bytes", "eviction_s",
/// "bottleneck", "precopy_source_bytes", "placement", "only_at_source_bytes"
/// ({SOURCE: bytes of the moving VMs' pages no other host holds}),
/// "lower_bound_s" ({SOURCE: those bytes over its link, the least its
/// eviction can take})}, "bytes_by_source",
/// "phases": {VM: [{"phase", "at_s"}]}} (when each VM entered each phase:
/// manifest, held, cast, round 0, pre-copy, switchover, done or failed,
/// seconds from the command's start)
///
/// Exit status: 0 every VM moved; 2 the job ran but some VMs did not move
/// (the report lists them; they run at their sources unless in doubt;
/// `--retry REPORT.json` moves them); 1 refused or failed before anything
/// moved.
///
/// Examples:
///
///   pagecast evacuate --index 10.0.0.1:7600 --from h1,h2 --dry-run
///
///   pagecast evacuate --index 10.0.0.1:7600 --from h1,h2 --to h5,h6 --max-downtime 300
///
///   pagecast evacuate --index 10.0.0.1:7600 --from h1 --strategy precopy --parallel 2 --json
///
///   pagecast evacuate --index 10.0.0.1:7600 --from h1,h2 --json > job.json
///   pagecast evacuate --index 10.0.0.1:7600 --retry job.json --to h6
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct EvacuateArgs {
    #[command(flatten)]
    index: IndexAddrs,

    /// Hosts to empty (with --retry: default, the sources of the VMs that
    /// did not move).
    #[arg(
        long,
        value_name = "HOST[,HOST..]",
        value_delimiter = ',',
        required_unless_present = "retry"
    )]
    from: Vec<String>,

    /// Most VMs arriving at one destination at once (off by default). A
    /// held job (pagecast, vmscatter) then moves in waves that keep to it,
    /// each held, filled and released in turn; a pre-copy job starts a
    /// VM only while its destination has room.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_incoming: Option<u32>,

    /// Most VMs leaving one source at once (off by default; with
    /// --strategy precopy, the smaller of it and --parallel). A held job
    /// moves in waves that keep to it.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_outgoing: Option<u32>,

    /// What a VM that fails does to the job: `continue` (the others go
    /// on; the report lists it) or `stop` (the migrations not yet switched
    /// over give up, as on Ctrl-C; their VMs stay at their sources).
    #[arg(long, value_name = "WHAT", default_value = "continue", value_parser = ["continue", "stop"])]
    on_failure: String,

    /// Moves again only the VMs that did not move in an earlier job, from
    /// its `--json` report (FILE, or - for standard input): re-planned from
    /// the index as it is now, onto any destination; VMs that reached the
    /// sources since are left alone, and a VM no longer on a source is
    /// skipped with a note.
    #[arg(long, value_name = "REPORT.json")]
    retry: Option<PathBuf>,

    /// Hosts that may receive VMs (default: every other host whose agent
    /// reports to the index).
    #[arg(long, value_name = "HOST[,HOST..]", value_delimiter = ',')]
    to: Vec<String>,

    /// pagecast, vmscatter or precopy.
    #[arg(long, default_value = "pagecast", value_parser = ["pagecast", "vmscatter", "precopy"])]
    strategy: String,

    /// Migrations at once per source host (precopy; KubeVirt's default).
    #[arg(long, value_name = "N", default_value_t = 2)]
    parallel: usize,

    /// Bits per second each source may send (e.g. 1G); default: each
    /// source's link rate as its agent reported it.
    #[arg(long, value_name = "BITS/S", value_parser = parse_bits_per_second)]
    bandwidth: Option<u64>,

    /// The network's MTU in bytes: the prediction then counts the frames'
    /// headers (Ethernet, IP, UDP or TCP, TLS and pagecast's own) in the
    /// bytes on the wire; without it, only pages, manifests and re-sent
    /// pages are predicted.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(576..=65_535))]
    mtu: Option<u32>,

    /// The network delivers every multicast datagram to every host (no
    /// IGMP snooping, or snooping without a querier): every cast then
    /// counts against every destination's link when the casts' rates share
    /// the links, since each reaches them all. By default a cast counts
    /// only against its own destinations' links.
    #[arg(long)]
    multicast_floods: bool,

    /// Release each held VM to its own pre-copy rounds as soon as the
    /// casts and fetches that bring what it lacks have ended, instead of
    /// when the job's last transfer ends. Off by default: on this
    /// project's benchmark its rounds then compete with the casts still
    /// running for the same links, and it has not yet been measured on
    /// shaped links (docs/evacuation.md).
    #[arg(long)]
    release_early: bool,

    /// Scatter-gather: where the destinations' links cannot take the
    /// sources' pages in the time the sources' links send them (their
    /// agents' --link rates), the contents one destination lacks beyond
    /// what its link takes in that time go to intermediaries instead:
    /// hosts with an agent, a known link and free memory that take no
    /// other part in the job. They fetch them from the sources, and each
    /// destination gathers them after its VM has switched over by
    /// post-copy, while the VM runs. A source then counts as evicted once
    /// it has pushed its last page, not when its destination has every
    /// page (evicted_s in the report).
    ///
    /// On by default wherever it can work (--strategy pagecast and a
    /// switchover that may be post-copy, auto or postcopy); the plan
    /// scatters nothing where the destinations' links keep up, or no
    /// host is free to take pages. --scatter asks for it by name and is
    /// refused where it cannot work; --no-scatter turns it off.
    #[arg(long, conflicts_with = "no_scatter")]
    scatter: bool,

    /// No scatter-gather: every page goes straight to its destinations
    /// (see --scatter).
    #[arg(long)]
    no_scatter: bool,

    /// Longest pause of each VM at switchover, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    max_downtime: u32,

    /// How pagecast's moves switch over: auto, precopy or postcopy (see
    /// `pagecast migrate --help`). The baselines (--strategy precopy,
    /// vmscatter) always use pre-copy, as the systems they are named after.
    #[arg(long, value_enum, default_value = "auto")]
    switchover: super::SwitchoverArg,

    /// What placement minimises first: eviction (the most loaded link's
    /// time) or bytes (that leave the sources).
    #[arg(long, default_value = "eviction", value_parser = ["eviction", "bytes"])]
    objective: String,

    /// How shared pages travel: auto (multicast where every receiver hears
    /// it, else a TCP chain), multicast, chain.
    #[arg(long, default_value = "auto", value_parser = ["auto", "multicast", "chain"])]
    transport: String,

    /// Print the plan and its predicted cost; move nothing.
    #[arg(long)]
    dry_run: bool,

    /// The job's id (default: a new one), for `pagecast cancel`.
    #[arg(long, value_name = "ID")]
    job: Option<String>,

    /// Print the report as JSON.
    #[arg(long)]
    json: bool,

    /// Never draw progress.
    #[arg(long)]
    no_progress: bool,
}

/// Clone a running VM to several hosts, live, each page leaving its host
/// once.
///
/// Every destination fills what it already holds (its own VMs' pages,
/// hash-checked); each page some destination lacks leaves the source once,
/// multicast to every destination lacking it; pages the guest dirties
/// meanwhile go in rounds, multicast too; then the source pauses (at most
/// about --max-downtime), the last pages and the vCPU state go to every
/// destination, each clone is verified against the source's memory at that
/// moment and starts under its own name, and the source runs on.
///
/// A micro-VM's clone gets a fresh identity (16 random bytes in its
/// parameter block, which its guest reads as a VM generation ID) before it
/// first runs, so that no two copies share it; `vm list` shows each VM's.
/// An adopted QEMU VM's clone gets the VM generation ID of the QEMU that
/// waits for it: start each clone's QEMU with -device vmgenid,guid=auto
/// (a clone into a QEMU with its source's ID, or none when the source has
/// one, is refused); QEMU writes it into the guest after the stream and
/// tells the guest. The stream carries the source's MACs; once the clone
/// runs, each network card with an id is unplugged and plugged again with
/// the MAC its QEMU was started with (the guest takes it as a new card);
/// one that cannot be is reported as kept (docs/evacuation.md).
///
/// JSON (--json): {"job", "ok", "clones": [{"name", "host", "ok",
/// "verified", "error", "identity" (a QEMU clone's: its VM generation ID),
/// "changed": what differs from the source ("identity", "vm_generation_id",
/// "mac"), "kept": what it still shares ("mac")}], "source_bytes",
/// "source_downtime_ms", "source_identity", "total_s"}
///
/// Example:
///
///   pagecast clone --index 10.0.0.1:7600 --vm web1 --to h4,h5,h6
///
///   pagecast clone --index 10.0.0.1:7600 --vm web1 --to h4,h5 --names 'web-{host}'
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct CloneArgs {
    #[command(flatten)]
    index: IndexAddrs,

    /// The VM to clone.
    #[arg(long, value_name = "NAME")]
    vm: String,

    /// Hosts to clone it to.
    #[arg(
        long,
        value_name = "HOST[,HOST..]",
        value_delimiter = ',',
        required = true
    )]
    to: Vec<String>,

    /// Clone names: {vm} and {host} are replaced.
    #[arg(long, value_name = "PATTERN", default_value = "{vm}-{host}")]
    names: String,

    /// Bits per second the source may send (e.g. 1G); default: the
    /// slowest link among the source's and the destinations' as their
    /// agents reported them (unpaced if none is known).
    #[arg(long, value_name = "BITS/S", value_parser = parse_bits_per_second)]
    bandwidth: Option<u64>,

    /// Longest pause of the source VM, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    max_downtime: u32,

    /// How the clones switch over: auto or precopy (the same here: a
    /// clone's source runs on, so post-copy is refused).
    #[arg(long, value_enum, default_value = "auto")]
    switchover: super::SwitchoverArg,

    /// The job's id (default: a new one), for `pagecast cancel`.
    #[arg(long, value_name = "ID")]
    job: Option<String>,

    /// Print the report as JSON.
    #[arg(long)]
    json: bool,

    /// Never draw progress.
    #[arg(long)]
    no_progress: bool,
}

/// Stop every VM of a gang job that has not switched over yet (they stay
/// at their sources; clones in progress are discarded).
///
/// Tells every agent that reports to the index; the job's own command then
/// ends with the VMs it could not move listed as cancelled.
///
/// Example:
///
///   pagecast cancel --index 10.0.0.1:7600 ev-1a2b3c4d
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct CancelArgs {
    #[command(flatten)]
    index: IndexAddrs,

    /// The job's id, as `evacuate` or `clone` printed it.
    #[arg(value_name = "JOB")]
    job: String,
}

fn new_job_id(prefix: &str) -> String {
    let mut b = [0u8; 4];
    let _ = pagecast_channel::random_bytes(&mut b);
    format!("{prefix}-{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
}

/// Per-VM progress lines and a total that never runs backwards.
struct Progress {
    multi: MultiProgress,
    total: ProgressBar,
    vms: Mutex<BTreeMap<String, ProgressBar>>,
    /// What each VM's line shows, kept from running backwards.
    forward: Mutex<pagecast_cli::forward::Forward>,
    done: Mutex<u64>,
    count: u64,
    /// The sources' eviction bound, once the plan says it: kept on the
    /// line beside every later step.
    bound: Mutex<String>,
}

impl Progress {
    fn new(quiet: bool, count: u64) -> Self {
        let multi = if quiet {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        } else {
            MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10))
        };
        let total = multi.add(ProgressBar::new(count.max(1)));
        total.set_style(
            ProgressStyle::with_template("{elapsed:>4} [{bar:20}] {pos}/{len} VMs  {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        Progress {
            multi,
            total,
            vms: Mutex::new(BTreeMap::new()),
            forward: Mutex::new(pagecast_cli::forward::Forward::default()),
            done: Mutex::new(0),
            count,
            bound: Mutex::new(String::new()),
        }
    }

    fn event(&self, e: Event) {
        match e {
            Event::LowerBound(by_source) => {
                let per_source: Vec<String> = by_source
                    .iter()
                    .map(|(h, s)| format!("{h} {s:.2} s"))
                    .collect();
                let line = format!(
                    "eviction's lower bound (pages only each source holds, over its link): {}",
                    per_source.join(", ")
                );
                *self.bound.lock().unwrap_or_else(|e| e.into_inner()) =
                    format!("  [bound {}]", per_source.join(", "));
                self.total.set_message(line.clone());
                if self.multi.is_hidden() {
                    tracing::info!("{line}");
                }
            }
            Event::Step(s) => {
                let bound = self.bound.lock().unwrap_or_else(|e| e.into_inner()).clone();
                self.total.set_message(format!("{s}{bound}"));
                if self.multi.is_hidden() {
                    tracing::info!("{s}");
                }
            }
            Event::Vm {
                name,
                phase,
                bytes,
                pages_local,
            } => {
                let mut vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
                let bar = vms.entry(name.clone()).or_insert_with(|| {
                    let b = self.multi.add(ProgressBar::new_spinner());
                    b.set_style(
                        ProgressStyle::with_template("  {prefix:<16} {msg}")
                            .expect("static template"),
                    );
                    b.set_prefix(name.clone());
                    b
                });
                // A late event of an earlier phase is not shown: the line
                // never runs backwards.
                let shown = self
                    .forward
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .update(&name, phase as i32, bytes);
                let Some((_, bytes)) = shown else { return };
                bar.set_message(format!(
                    "{:<12} {:>10} sent, {pages_local} pages filled at the destination",
                    pagecast_proto::names::phase(phase),
                    format_bytes(bytes)
                ));
                if matches!(phase, MigratePhase::Done | MigratePhase::Failed) {
                    let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
                    *d += 1;
                    self.total.set_position((*d).min(self.count));
                }
            }
        }
    }

    fn finish(&self) {
        for b in self.vms.lock().unwrap_or_else(|e| e.into_inner()).values() {
            b.finish_and_clear();
        }
        self.total.finish_and_clear();
    }
}

/// The downtime asked beside the longest achieved, naming the VMs over it.
fn render_downtime(vms: &[pagecast_coordinator::VmOutcome]) -> String {
    let asked = vms[0].max_downtime_ms;
    let moved: Vec<&_> = vms.iter().filter(|v| v.ok).collect();
    let over: Vec<String> = moved
        .iter()
        .filter(|v| v.downtime_ms > asked)
        .map(|v| format!("{} {:.0} ms", v.name, v.downtime_ms))
        .collect();
    let most = moved.iter().map(|v| v.downtime_ms).fold(0.0, f64::max);
    format!(
        "downtime: asked at most {asked:.0} ms, the longest {most:.0} ms; {}\n",
        if over.is_empty() {
            "every VM kept to it".to_owned()
        } else {
            format!("over it: {}", over.join(", "))
        }
    )
}

fn render(r: &EvacuationReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let verb = if r.dry_run { "plan" } else { "evacuation" };
    let _ = writeln!(
        s,
        "{verb} {} ({}): {} VM(s)",
        r.job,
        r.strategy,
        r.vms.len()
    );
    let _ = writeln!(
        s,
        "{:<16} {:<12} {:<12} {:<9} {:>10} {:>10} {:>9} {:>9} {:>9}",
        "VM", "FROM", "TO", "RESULT", "DOWNTIME", "SENT", "LOCAL", "RACKMATE", "CAST"
    );
    for v in &r.vms {
        let result = if r.dry_run {
            "planned"
        } else if v.ok && v.verified {
            "verified"
        } else if v.in_doubt {
            "IN DOUBT"
        } else {
            "FAILED"
        };
        let _ = writeln!(
            s,
            "{:<16} {:<12} {:<12} {:<9} {:>8.1}ms {:>10} {:>9} {:>9} {:>9}",
            v.name,
            v.from,
            v.to,
            result,
            v.downtime_ms,
            format_bytes(v.bytes_sent),
            v.pages_local,
            v.pages_short_haul,
            v.pages_cast
        );
    }
    if !r.dry_run && !r.vms.is_empty() {
        s.push_str(&render_downtime(&r.vms));
    }
    for v in r.vms.iter().filter(|v| v.switchover == "postcopy") {
        let _ = writeln!(
            s,
            "  {}: post-copy: resumed at {} before its last pages, which followed in {:.2} s ({} asked for by its guest)",
            v.name, v.to, v.postcopy_s, v.postcopy_faults
        );
    }
    for v in r.vms.iter().filter(|v| !v.error.is_empty()) {
        let where_ = if v.in_doubt {
            "paused at its source, maybe running at its destination"
        } else {
            "still runs at its source"
        };
        let _ = writeln!(s, "  {}: {} ({where_})", v.name, v.error);
    }
    let p = &r.predicted;
    let _ = writeln!(
        s,
        "predicted: {} from the sources, {} of them rewritten pages sent again, {} manifests and {} headers ({} by per-VM pre-copy), {} into other racks, eviction {:.2} s (bottleneck {})",
        format_bytes(p.source_bytes),
        format_bytes(p.rewrite_bytes),
        format_bytes(p.manifest_bytes),
        format_bytes(p.header_bytes),
        format_bytes(p.precopy_source_bytes),
        format_bytes(p.core_bytes),
        p.eviction_s,
        p.bottleneck
    );
    if !r.dry_run {
        let b = &r.bytes_by_class;
        let _ = writeln!(
            s,
            "measured:  {} from the sources, {} into other racks; multicast {}, unicast {}, rack-mates {}, repair {}",
            format_bytes(r.source_bytes),
            format_bytes(r.core_bytes),
            format_bytes(b.multicast),
            format_bytes(b.unicast),
            format_bytes(b.short_haul),
            format_bytes(b.repair)
        );
        let _ = writeln!(
            s,
            "eviction {:.2} s, total {:.2} s",
            r.eviction_s, r.total_s
        );
        render_evicted(&mut s, r);
    }
    s
}

/// Each source's eviction beside its lower bound (the pages only it holds,
/// over its link).
fn render_evicted(s: &mut String, r: &EvacuationReport) {
    use std::fmt::Write;
    for (host, at) in &r.evicted_s {
        let bound = match (
            r.predicted.lower_bound_s.get(host),
            r.predicted.only_at_source_bytes.get(host),
        ) {
            (Some(b), Some(bytes)) => format!(
                " (lower bound {b:.2} s: {} only it holds, over its link{})",
                format_bytes(*bytes),
                match at {
                    Some(t) if *b > 0.0 => format!("; {:.1}x", t / b),
                    _ => String::new(),
                }
            ),
            _ => String::new(),
        };
        let _ = match at {
            Some(t) => writeln!(s, "  {host}: evicted at {t:.2} s{bound}"),
            None => writeln!(
                s,
                "  {host}: not evicted (a VM of the job is still there){bound}"
            ),
        };
    }
}

/// `--scatter` only where it can work: pagecast's strategy, and a switchover
/// that may be post-copy.
fn check_scatter(a: &EvacuateArgs) -> anyhow::Result<()> {
    if a.scatter && a.strategy != "pagecast" {
        anyhow::bail!(
            "--scatter needs --strategy pagecast ({} moves as the system it is named after); \
             nothing was moved",
            a.strategy
        );
    }
    if a.scatter && matches!(a.switchover, super::SwitchoverArg::Precopy) {
        anyhow::bail!(
            "--scatter needs a switchover that may be post-copy (auto or postcopy): a destination \
             gathers scattered pages while its VM runs; nothing was moved"
        );
    }
    Ok(())
}

/// Whether the job may scatter: asked for by name (and checked by
/// [`check_scatter`]), or by default where it can work.
fn scatter_on(a: &EvacuateArgs) -> bool {
    if a.no_scatter {
        return false;
    }
    a.scatter
        || (a.strategy == "pagecast" && !matches!(a.switchover, super::SwitchoverArg::Precopy))
}

/// Runs `pagecast evacuate`.
pub fn run_evacuate(a: EvacuateArgs) -> anyhow::Result<()> {
    check_scatter(&a)?;
    let tls = a.index.identity()?;
    let stop = pagecast_cli::interrupts::catch();
    let job = a.job.clone().unwrap_or_else(|| new_job_id("ev"));
    let retry = match &a.retry {
        Some(f) => Retry::read(f)?,
        None => Retry::default(),
    };
    let from = if a.from.is_empty() {
        retry.from.clone()
    } else {
        a.from.clone()
    };
    let spec = EvacuateSpec {
        from,
        to: a.to.clone(),
        method: Method::parse(&a.strategy).expect("clap checked the value"),
        parallel: a.parallel,
        bandwidth_bps: a.bandwidth,
        mtu: a.mtu,
        multicast_floods: a.multicast_floods,
        release_early: a.release_early,
        scatter: scatter_on(&a),
        stop_on_failure: a.on_failure == "stop",
        only: retry.only,
        max_incoming: a.max_incoming.map(|n| n as usize),
        max_outgoing: a.max_outgoing.map(|n| n as usize),
        max_downtime_ms: a.max_downtime,
        switchover: a.switchover.to_proto(),
        objective: if a.objective == "bytes" {
            Objective::Bytes
        } else {
            Objective::Eviction
        },
        dry_run: a.dry_run,
        job: job.clone(),
        transport: match a.transport.as_str() {
            "multicast" => v1::CastTransport::Multicast,
            "chain" => v1::CastTransport::Chain,
            _ => v1::CastTransport::Unspecified,
        },
    };
    if !a.json {
        eprintln!("job {job} (stop it with Ctrl-C or `pagecast cancel {job}`)");
    }
    let progress = Progress::new(a.no_progress || a.json, 0);
    // When each VM entered each phase, for the JSON report's timeline.
    let started = std::time::Instant::now();
    let timeline = Mutex::new(Timeline::default());
    let on = |e: Event| {
        if let Event::Vm { name, phase, .. } = &e {
            let at = started.elapsed().as_secs_f64();
            timeline
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(name, *phase, at);
        }
        progress.event(e)
    };
    let svc = pagecast_coordinator::Services::remote(&a.index.list(), tls.clone());
    let res = pagecast_coordinator::evacuate(&svc, &spec, &on, stop);
    progress.finish();
    let r = match res {
        Ok(r) => r,
        Err(CoordError::Invalid(m)) => anyhow::bail!("{m}; nothing was moved"),
        Err(e) => return Err(e).context("nothing was moved"),
    };
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["phases"] = timeline
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .to_json();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(&r));
    }
    if !r.ok {
        let failed = r.vms.iter().filter(|v| !(v.ok && v.verified)).count();
        return Err(anyhow::Error::new(super::NotAllMoved(format!(
            "{failed} of {} VM(s) did not move; they run at their sources{}",
            r.vms.len(),
            if stop.load(Ordering::Relaxed) {
                " (stopped)"
            } else {
                "; `--retry` with this command's --json report moves them"
            }
        ))));
    }
    Ok(())
}

/// When each VM entered each phase, for the JSON report: each phase once,
/// in the phases' order (a late event of an earlier phase adds nothing:
/// the timeline never runs backwards).
#[derive(Default)]
struct Timeline {
    by_vm: BTreeMap<String, Vec<(&'static str, f64)>>,
    forward: pagecast_cli::forward::Forward,
}

impl Timeline {
    fn record(&mut self, vm: &str, phase: MigratePhase, at_s: f64) {
        if self.forward.advances(vm, phase as i32) {
            let name = pagecast_proto::names::phase(phase);
            self.by_vm
                .entry(vm.to_owned())
                .or_default()
                .push((name, at_s));
        }
    }

    /// {VM: [{"phase", "at_s"}]}.
    fn to_json(&self) -> serde_json::Value {
        let map: serde_json::Map<String, serde_json::Value> = self
            .by_vm
            .iter()
            .map(|(vm, list)| {
                let list = list
                    .iter()
                    .map(|(phase, at_s)| serde_json::json!({"phase": phase, "at_s": at_s}))
                    .collect();
                (vm.clone(), serde_json::Value::Array(list))
            })
            .collect();
        serde_json::Value::Object(map)
    }
}

/// What `--retry` takes from an earlier job's report.
#[derive(Default)]
struct Retry {
    /// The VMs that did not move.
    only: Vec<String>,
    /// Their sources.
    from: Vec<String>,
}

impl Retry {
    /// Reads a `pagecast evacuate --json` report (`-`: standard input).
    fn read(path: &Path) -> anyhow::Result<Retry> {
        // Read at most one byte more than a report may have, so that the
        // bound holds before the whole input is in memory.
        const MOST: u64 = 64 << 20;
        let mut text = String::new();
        let read = if path == Path::new("-") {
            std::io::stdin()
                .lock()
                .take(MOST + 1)
                .read_to_string(&mut text)
        } else {
            std::fs::File::open(path).and_then(|f| f.take(MOST + 1).read_to_string(&mut text))
        };
        read.with_context(|| format!("--retry {}: cannot read it", path.display()))?;
        anyhow::ensure!(
            text.len() as u64 <= MOST,
            "--retry {}: more than {} MiB, more than a report has",
            path.display(),
            MOST >> 20
        );
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| {
            format!(
                "--retry {}: not an `evacuate --json` report",
                path.display()
            )
        })?;
        let vms = v["vms"].as_array().with_context(|| {
            format!(
                "--retry {}: no \"vms\" list: not an `evacuate --json` report",
                path.display()
            )
        })?;
        let mut r = Retry::default();
        for vm in vms {
            let (Some(name), Some(from)) = (vm["name"].as_str(), vm["from"].as_str()) else {
                anyhow::bail!("--retry {}: a VM without a name or source", path.display());
            };
            let moved = vm["ok"] == true && vm["verified"] == true;
            if !moved {
                r.only.push(name.to_owned());
                if !r.from.iter().any(|f| f == from) {
                    r.from.push(from.to_owned());
                }
            }
        }
        anyhow::ensure!(
            !r.only.is_empty(),
            "--retry {}: every VM of that job moved; nothing to retry",
            path.display()
        );
        Ok(r)
    }
}

/// Runs `pagecast clone`.
pub fn run_clone(a: CloneArgs) -> anyhow::Result<()> {
    let tls = a.index.identity()?;
    let stop = pagecast_cli::interrupts::catch();
    let job = a.job.clone().unwrap_or_else(|| new_job_id("cl"));
    if !a.json {
        eprintln!("job {job} (stop it with Ctrl-C or `pagecast cancel {job}`)");
    }
    // Ctrl-C cancels the job on every agent: the clone in progress is
    // discarded, the source runs on.
    let addrs = a.index.list();
    let (job2, tls2, addrs2) = (job.clone(), tls.clone(), addrs.clone());
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = cancel_everywhere(&addrs2, &tls2, &job2);
    });
    let spec = pagecast_coordinator::CloneSpec {
        vm: a.vm.clone(),
        to: a.to.clone(),
        names: a.names.clone(),
        bandwidth_bps: a.bandwidth,
        max_downtime_ms: a.max_downtime,
        switchover: a.switchover.to_proto(),
        job: job.clone(),
    };
    let progress = Progress::new(a.no_progress || a.json, 0);
    let svc = pagecast_coordinator::Services::remote(&addrs, tls.clone());
    let res = pagecast_coordinator::clone(&svc, &spec, &|e| progress.event(e));
    progress.finish();
    let r = match res {
        Ok(r) => r,
        Err(CoordError::Invalid(m)) => anyhow::bail!("{m}; nothing was cloned"),
        Err(e) => return Err(e).context("the clone failed"),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("clone {} of {}:", r.job, a.vm);
        if !r.source_identity.is_empty() {
            println!("  {:<20} identity {}", a.vm, r.source_identity);
        }
        for c in &r.clones {
            if c.ok && c.verified {
                // The identity its guest reads is its own.
                let identity = if c.identity.is_empty() {
                    String::new()
                } else {
                    format!(", identity {} (new)", c.identity)
                };
                println!(
                    "  {:<20} on {:<12} verified, running{identity}",
                    c.name, c.host
                );
                if c.kept.iter().any(|k| k == "mac") {
                    println!(
                        "  {:<20} note: a network card kept the source's MAC; the guest must set its own (docs/evacuation.md)",
                        ""
                    );
                }
            } else {
                println!("  {:<20} on {:<12} FAILED: {}", c.name, c.host, c.error);
            }
        }
        println!(
            "{} from the source, source paused {:.1} ms, total {:.2} s",
            format_bytes(r.source_bytes),
            r.source_downtime_ms,
            r.total_s
        );
    }
    if !r.ok {
        anyhow::bail!(
            "{} of {} clone(s) failed",
            r.clones.iter().filter(|c| !(c.ok && c.verified)).count(),
            r.clones.len()
        );
    }
    Ok(())
}

fn cancel_everywhere(
    index: &[String],
    tls: &pagecast_channel::Tls,
    job: &str,
) -> anyhow::Result<(usize, Vec<String>)> {
    let mut c = pagecast_index::client::IndexClient::new(index, tls.clone())?;
    c.timeout = Duration::from_secs(20);
    let hosts = c.hosts(true)?;
    // Every agent at once, each answer within a job request's deadline:
    // a frozen or cut-off host costs that deadline, not one per host.
    let agents = pagecast_agent_api::Remote::new(tls.clone());
    let reachable: Vec<_> = hosts.iter().filter(|h| !h.address.is_empty()).collect();
    let answers = pagecast_agent_api::at_once(&reachable, |h| {
        pagecast_agent_api::AgentApi::cancel_job(&agents, &h.address, job)
    });
    let mut told = 0;
    let mut failed = Vec::new();
    for (h, r) in reachable.iter().zip(answers) {
        match r {
            Ok(_) => told += 1,
            Err(e) => failed.push(format!("{}: {e}", h.name)),
        }
    }
    Ok((told, failed))
}

/// Runs `pagecast cancel`.
pub fn run_cancel(a: CancelArgs) -> anyhow::Result<()> {
    let tls = a.index.identity()?;
    let (told, failed) = cancel_everywhere(&a.index.list(), &tls, &a.job)?;
    println!("job {} cancelled on {told} agent(s)", a.job);
    if !failed.is_empty() {
        anyhow::bail!("could not reach: {}", failed.join("; "));
    }
    Ok(())
}
