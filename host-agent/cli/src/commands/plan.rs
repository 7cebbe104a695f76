//! `pagecast plan`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use pagecast_cli::topology::Topology;
use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_pages::units::format_bytes;
use pagecast_pages::{Sketch, sharing};
use pagecast_scheduler::{ContentSource, Plan, Planner, Strategy};
use serde::Serialize;

use super::progress::pages_bar;

/// Plan a gang evacuation: where each VM goes and what crosses which link.
///
/// Reads a topology (racks, hosts, the VMs they run as raw memory images,
/// and which hosts to evacuate to which), fingerprints every image, and
/// plans with each strategy:
///
///   first-fit   VMs in order, each to the first destination with room
///
///   vmscatter   VMScatter's greedy grouping by identical pages, blind to
///               what destinations already hold
///
///   pagecast    places VMs where their content already is and with the VMs
///               they share most, weighing core and destination links
///
/// For each it prints the placement, bytes on source links, rack uplinks,
/// the core and destination links, pages copied locally or taken
/// short-haul inside a rack, multicast groups with their joins and leaves,
/// the predicted eviction time, and savings against per-VM pre-copy (which
/// sends every non-zero page of every VM).
///
/// Topology file (TOML; image paths are relative to it):
///
///   [[racks]]
///   name = "A"
///   uplink_gbps = 40
///   [[racks.hosts]]
///   name = "a1"
///   memory_gib = 8
///   link_gbps = 10
///   vms = [ { name = "vm1", image = "images/vm1.raw" } ]
///   [evacuate]
///   from = ["a1"]
///   to = ["b1", "b2"]
///
/// Optional: core_gbps at the top; anti_affinity = [["vm1", "vm2"]] and
/// pinned = { vm1 = "b2" } under [evacuate]. See docs/planner.md.
///
/// Example:
///
///   pagecast plan --topology docs/examples/rack.toml
///
///   pagecast plan --topology rack.toml --strategy pagecast --json
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct PlanArgs {
    /// The topology file (TOML).
    #[arg(long, value_name = "FILE")]
    topology: PathBuf,

    /// Strategy: first-fit, vmscatter, pagecast, or all.
    #[arg(long, value_name = "NAME", default_value = "all")]
    strategy: String,

    /// Print the plans as JSON (keys: strategies[].{name, placement,
    /// source_bytes, core_bytes, eviction_s, joins, leaves, ...},
    /// precopy_bytes).
    #[arg(long)]
    json: bool,

    /// Also print sharing advice: for each moving VM the hosts already
    /// holding most of its content, and groups of VMs worth placing together
    /// (always included in --json).
    #[arg(long)]
    advise: bool,

    /// Top hosts listed per VM in the advice.
    #[arg(long, value_name = "K", default_value_t = 3)]
    top: usize,

    /// Never draw a progress bar.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Serialize)]
struct HostAdvice {
    host: String,
    shared_pages: f64,
    fraction: f64,
}

#[derive(Serialize)]
struct Advice {
    /// Per moving VM, the evacuation's destinations holding most of it
    /// (never a host being emptied: the VM cannot go there).
    top_hosts: BTreeMap<String, Vec<HostAdvice>>,
    /// The moving VMs, in the order of `sharing`'s rows.
    vms: Vec<String>,
    /// Estimated pairwise Jaccard indices of the moving VMs.
    sharing: Vec<Vec<f64>>,
    /// Groups of moving VMs with average Jaccard at least 0.1.
    groups: Vec<Vec<String>>,
}

#[derive(Serialize)]
struct StrategyReport {
    name: &'static str,
    placement: BTreeMap<String, String>,
    source_bytes: u64,
    source_bytes_by_host: BTreeMap<String, u64>,
    core_bytes: u64,
    rack_up_bytes: BTreeMap<String, u64>,
    rack_down_bytes: BTreeMap<String, u64>,
    destination_bytes: BTreeMap<String, u64>,
    local_bytes: u64,
    short_haul_bytes: u64,
    multicast_groups: usize,
    unicast_groups: usize,
    joins: u64,
    leaves: u64,
    eviction_s: f64,
    bottleneck: String,
    precopy_eviction_s: f64,
    precopy_core_bytes: u64,
    savings_vs_precopy: f64,
    objective: f64,
    planning_ms: f64,
}

#[derive(Serialize)]
struct Report {
    topology: String,
    vms_moving: usize,
    precopy_bytes: u64,
    strategies: Vec<StrategyReport>,
    advice: Advice,
}

pub fn run(args: PlanArgs, threads: usize) -> anyhow::Result<()> {
    let strategies: Vec<Strategy> = match args.strategy.as_str() {
        "all" => Strategy::ALL.to_vec(),
        s => vec![Strategy::parse(s).ok_or_else(|| {
            anyhow::anyhow!("unknown strategy {s:?}: use first-fit, vmscatter, pagecast or all")
        })?],
    };
    let mut topo = Topology::load(&args.topology)?;
    let fp = Fingerprinter::new(threads)?;
    let bar = pages_bar(0, "hashing", args.no_progress);
    let n = topo.sources.len();
    let content = topo.fingerprint(
        &fp,
        &mut |i, pages| {
            bar.set_length(bar.length().unwrap_or(0) + pages);
            bar.set_prefix(format!("image {}/{n}", i + 1));
        },
        &|p| bar.inc(p),
    )?;
    bar.finish_and_clear();
    let (c, e) = (&topo.cluster, &topo.evacuation);
    let planner = Planner::new(c, e, &content)?;
    let mut reports = Vec::new();
    for s in strategies {
        let t = Instant::now();
        let plan = planner.plan(s)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        reports.push(report(&planner, c, &plan, ms));
    }
    let report = Report {
        topology: args.topology.display().to_string(),
        vms_moving: planner.moving().len(),
        precopy_bytes: planner.precopy_bytes(),
        strategies: reports,
        advice: advice(c, e, planner.moving(), &content, args.top),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, c, e));
        if args.advise {
            print!("{}", render_advice(&report.advice));
        }
    }
    Ok(())
}

fn advice(
    c: &pagecast_scheduler::Cluster,
    e: &pagecast_scheduler::Evacuation,
    moving: &[usize],
    content: &dyn ContentSource,
    k: usize,
) -> Advice {
    // Only hosts the VMs may go to: the evacuation's destinations.
    let hosts: Vec<(usize, Sketch)> = e.to.iter().map(|&h| (h, content.host_sketch(h))).collect();
    let vms: Vec<Sketch> = moving.iter().map(|&v| content.vm_sketch(v)).collect();
    let mut top_hosts = BTreeMap::new();
    for (&v, sketch) in moving.iter().zip(&vms) {
        let list = sharing::rank(sketch, hosts.iter().map(|(h, s)| (*h, s)), k)
            .into_iter()
            .map(|m| HostAdvice {
                host: c.hosts[m.key].name.clone(),
                shared_pages: m.shared_pages.round(),
                fraction: m.fraction,
            })
            .collect();
        top_hosts.insert(c.vms[v].name.clone(), list);
    }
    let matrix = sharing::sharing_matrix(&vms);
    let names: Vec<String> = moving.iter().map(|&v| c.vms[v].name.clone()).collect();
    let groups = sharing::colocation_groups(&matrix, 0.1)
        .into_iter()
        .map(|g| g.into_iter().map(|i| names[i].clone()).collect())
        .collect();
    Advice {
        top_hosts,
        vms: names,
        sharing: matrix,
        groups,
    }
}

fn render_advice(a: &Advice) -> String {
    use std::fmt::Write;
    let mut s = String::from("\nadvice: destinations already holding each VM's content\n");
    for (vm, hosts) in &a.top_hosts {
        let list: Vec<String> = hosts
            .iter()
            .map(|h| format!("{} {:.0}%", h.host, h.fraction * 100.0))
            .collect();
        let _ = writeln!(s, "  {vm:<12} {}", list.join(", "));
    }
    let _ = writeln!(s, "groups worth placing together (average Jaccard >= 0.1):");
    for g in &a.groups {
        let _ = writeln!(s, "  {}", g.join(", "));
    }
    s
}

fn report(p: &Planner, c: &pagecast_scheduler::Cluster, plan: &Plan, ms: f64) -> StrategyReport {
    let precopy = p.precopy_bytes();
    let multicast = plan.multicast_groups();
    StrategyReport {
        name: plan.strategy.name(),
        placement: plan
            .placement()
            .into_iter()
            .map(|(v, h)| (c.vms[v].name.clone(), c.hosts[h].name.clone()))
            .collect(),
        source_bytes: plan.cost.source_total,
        source_bytes_by_host: plan.cost.source_bytes.clone(),
        core_bytes: plan.cost.core_bytes,
        rack_up_bytes: plan.cost.rack_up_bytes.clone(),
        rack_down_bytes: plan.cost.rack_down_bytes.clone(),
        destination_bytes: plan.cost.destination_bytes.clone(),
        local_bytes: plan.cost.local_bytes,
        short_haul_bytes: plan.cost.short_haul_bytes,
        multicast_groups: multicast,
        unicast_groups: plan.transmission.groups.len() - multicast,
        joins: plan.transmission.joins,
        leaves: plan.transmission.leaves,
        eviction_s: plan.cost.eviction_s,
        bottleneck: plan.cost.bottleneck.clone(),
        precopy_eviction_s: plan.precopy.eviction_s,
        precopy_core_bytes: plan.precopy.core_bytes,
        savings_vs_precopy: if precopy > 0 {
            1.0 - plan.cost.source_total as f64 / precopy as f64
        } else {
            0.0
        },
        objective: plan.objective,
        planning_ms: ms,
    }
}

fn render(
    r: &Report,
    c: &pagecast_scheduler::Cluster,
    e: &pagecast_scheduler::Evacuation,
) -> String {
    use std::fmt::Write;
    let names = |hs: &[usize]| {
        hs.iter()
            .map(|&h| c.hosts[h].name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "evacuating {} -> {}: {} VMs; per-VM pre-copy sends {}",
        names(&e.from),
        names(&e.to),
        r.vms_moving,
        format_bytes(r.precopy_bytes)
    );
    let list = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k} {}", format_bytes(*v)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for st in &r.strategies {
        let _ = writeln!(s, "\n== {}", st.name);
        let mut by_dest: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (vm, host) in &st.placement {
            by_dest.entry(host).or_default().push(vm);
        }
        for (host, vms) in by_dest {
            let _ = writeln!(s, "  {host:<12} <- {}", vms.join(", "));
        }
        let _ = writeln!(
            s,
            "  sources send     {} ({})",
            format_bytes(st.source_bytes),
            list(&st.source_bytes_by_host)
        );
        let _ = writeln!(
            s,
            "  core carries     {} (pre-copy: {})",
            format_bytes(st.core_bytes),
            format_bytes(st.precopy_core_bytes)
        );
        if !st.rack_down_bytes.is_empty() {
            let _ = writeln!(s, "  into racks       {}", list(&st.rack_down_bytes));
        }
        let _ = writeln!(s, "  destinations get {}", list(&st.destination_bytes));
        let _ = writeln!(
            s,
            "  copied locally   {}; short-haul in rack {}",
            format_bytes(st.local_bytes),
            format_bytes(st.short_haul_bytes)
        );
        let _ = writeln!(
            s,
            "  groups           {} multicast, {} unicast; {} joins, {} leaves",
            st.multicast_groups, st.unicast_groups, st.joins, st.leaves
        );
        let _ = writeln!(
            s,
            "  eviction         {:.2} s (bottleneck: {}); pre-copy {:.2} s",
            st.eviction_s, st.bottleneck, st.precopy_eviction_s
        );
        let _ = writeln!(
            s,
            "  saves            {:.1}% of pre-copy's bytes",
            st.savings_vs_precopy * 100.0
        );
    }
    if r.strategies.len() > 1 {
        let _ = writeln!(
            s,
            "\n{:<10} {:>12} {:>12} {:>10} {:>8}",
            "STRATEGY", "SOURCES", "CORE", "EVICTION", "SAVES"
        );
        for st in &r.strategies {
            let _ = writeln!(
                s,
                "{:<10} {:>12} {:>12} {:>9.2}s {:>7.1}%",
                st.name,
                format_bytes(st.source_bytes),
                format_bytes(st.core_bytes),
                st.eviction_s,
                st.savings_vs_precopy * 100.0
            );
        }
    }
    s
}
