//! `pagecast agent`, `pagecast vm start | list | stop` and `pagecast migrate`.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pagecast_agent::publish::HostMeta;
use pagecast_agent::{AgentConfig, server};
use pagecast_agent_api::client::{AgentClient, MigrationEvent};
use pagecast_pages::units::{format_bytes, parse_bits_per_second, parse_size};
use pagecast_proto::names;
use pagecast_proto::v1;
use serde::Serialize;

use super::{TlsArg, load_tls};

/// Run this host's agent: it owns the host's micro-VMs and migrates them.
///
/// The agent serves an authenticated control API (prost frames over TCP,
/// see docs/migration.md) on --listen: `pagecast vm` and `pagecast migrate`
/// talk to it, and agents talk to each other to migrate VMs. It keeps a map
/// of the page contents its VMs hold, so a VM migrating here copies those
/// pages locally instead of receiving them. It runs until SIGINT or
/// SIGTERM, and then stops its VMs.
///
/// On start it prints `listening on ADDR` on stdout (useful with port 0).
///
/// With --index (or PAGECAST_INDEX) the agent keeps the content index
/// current: it registers its host (address, rack, link, capacity, VMs),
/// publishes every VM's pages when it starts or arrives, updates them from
/// the dirty log every second (pages rewritten in each of the last 3
/// refreshes are left out until they settle; at most 2,048 frames change
/// per VM per second), withdraws them when it stops or leaves, and every
/// 30 s checks each shard's totals for this host, correcting any
/// difference. An unreachable index never stops VMs or migrations; the
/// agent catches up when it returns. At start it withdraws whatever a
/// previous run left in the index under its name.
///
/// Example, two agents on one host:
///
///   pagecast ca init --dir ca
///   pagecast ca issue --dir ca --name host-a --role host --out host-a
///   pagecast ca issue --dir ca --name host-b --role host --out host-b
///
///   pagecast agent --name host-a --listen 127.0.0.1:7400 --tls host-a
///
///   pagecast agent --name host-b --listen 127.0.0.1:7401 --tls host-b \
///       --index 127.0.0.1:7600 --rack r1 --link 10G --capacity 64GiB
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct AgentArgs {
    /// This host's name, as other agents and tools see it: the name its
    /// host certificate carries (the default; another name is refused).
    #[arg(long, value_name = "HOST")]
    name: Option<String>,

    /// Control address (TCP).
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,

    /// Directory that relative image paths of `vm start --image` are
    /// resolved against (default: the agent's working directory); created
    /// if missing.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,

    /// Serve Prometheus metrics on http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,

    #[command(flatten)]
    tls: TlsArg,

    /// Content index replicas to publish to, HOST:PORT[,HOST:PORT...]
    /// (without it the agent does not publish).
    #[arg(long, value_name = "ADDRS", env = "PAGECAST_INDEX")]
    index: Option<String>,

    /// This host's rack, as placement sees it.
    #[arg(long, value_name = "NAME", default_value = "")]
    rack: String,

    /// This host's link rate in bits per second (e.g. 10G, 1000M, 800mbit).
    #[arg(long, value_name = "RATE", value_parser = parse_bits_per_second)]
    link: Option<u64>,

    /// Memory this host offers VMs (e.g. 64GiB); default: the machine's
    /// total memory. A migration in that would take more than is free (the
    /// VMs here and those arriving) is refused before anything moves, and
    /// the index is told the arrivals under way as used.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    capacity: Option<u64>,

    /// The address this host multicasts from (default: the --listen
    /// address's IP).
    #[arg(long, value_name = "ADDR")]
    cast_addr: Option<String>,

    /// Do not offer micro-VM guest memory to the kernel's same-page merging
    /// (KSM). By default it is offered (`MADV_MERGEABLE`), so that pages a
    /// migration filled from content this host's VMs already hold can be
    /// merged back into one physical page; merging itself runs only while
    /// /sys/kernel/mm/ksm/run is 1, which the host's administrator sets.
    #[arg(long)]
    no_ksm: bool,

    /// This host's libvirt as other hosts reach it (e.g.
    /// qemu+tls://host-a/system). Adopted QEMU VMs that are its domains
    /// (`vm adopt --libvirt-domain`) are evacuated with `virsh migrate`,
    /// their stream through pagecast, and evacuations may send libvirt
    /// domains here (docs/qemu.md).
    #[arg(long, value_name = "URI")]
    libvirt: Option<String>,

    /// How long a migration held for a gang job (an evacuation) may hear
    /// nothing from its coordinator, which sends a keep-alive a second
    /// (judged once one came), before it is abandoned and the VM stays
    /// here running: a coordinator
    /// frozen (Ctrl-Z, SIGSTOP) or cut off with its connection open would
    /// otherwise hold the VM, and the memory reserved at its destination,
    /// until the job's deadline (6 hours for an evacuation).
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    hold_silence: u64,

    /// How this agent reaches its own host's libvirt.
    #[arg(
        long,
        value_name = "URI",
        default_value = "qemu:///system",
        requires = "libvirt"
    )]
    libvirt_local: String,
}

/// The machine's memory, bytes (0 if unknown).
fn total_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(0, |k| k * 1024)
}

fn resolve(what: &str, s: &str) -> anyhow::Result<SocketAddr> {
    s.to_socket_addrs()
        .with_context(|| format!("{what} {s:?} is not HOST:PORT"))?
        .next()
        .with_context(|| format!("{what} {s:?} resolves to no address"))
}

/// Runs `pagecast agent`.
/// The cluster's dedup-domain secret beside the agent's TLS identity
/// (`domains.key`), if there is one: without it the agent runs VMs of the
/// cluster-wide domain only.
fn load_domain_secret(a: &TlsArg) -> anyhow::Result<Option<pagecast_pages::DomainSecret>> {
    let Some(dir) = &a.tls else { return Ok(None) };
    let path = dir.join(pagecast_channel::ca::DOMAINS_KEY);
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(pagecast_channel::ca::read_domains_secret(&path)?))
}

pub fn run_agent(a: AgentArgs, threads: usize) -> anyhow::Result<()> {
    let tls = load_tls(&a.tls)?;
    pagecast_memory::set_mergeable(!a.no_ksm);
    if !a.no_ksm {
        let run = std::fs::read_to_string("/sys/kernel/mm/ksm/run").unwrap_or_default();
        match run.trim() {
            "" => tracing::info!("guest memory offered to KSM, but this kernel has none"),
            "1" => tracing::info!("guest memory offered to KSM (merging runs)"),
            _ => tracing::info!(
                "guest memory offered to KSM; merging is off until /sys/kernel/mm/ksm/run is 1"
            ),
        }
    }
    let domain_secret = load_domain_secret(&a.tls)?;
    if let Some(d) = &a.data {
        std::fs::create_dir_all(d)
            .with_context(|| format!("--data {}: cannot create it", d.display()))?;
        anyhow::ensure!(d.is_dir(), "--data {}: not a directory", d.display());
    }
    let listen = resolve("--listen", &a.listen)?;
    if let Some(uri) = &a.libvirt {
        pagecast_agent::qemu::libvirt_uri(uri).context("--libvirt")?;
    }
    let capacity = a.capacity.unwrap_or_else(total_memory);
    let index = a.index.as_deref().map(|addrs| {
        let addrs: Vec<String> = addrs
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let meta = HostMeta {
            address: listen.to_string(),
            rack: a.rack.clone(),
            link_bps: a.link.unwrap_or(0),
            capacity_bytes: capacity,
            cast_addr: a
                .cast_addr
                .clone()
                .unwrap_or_else(|| listen.ip().to_string()),
        };
        (addrs, meta)
    });
    if let Some((addrs, _)) = &index {
        anyhow::ensure!(!addrs.is_empty(), "--index: no address given");
    }
    let config = AgentConfig {
        name: a.name.unwrap_or_else(|| tls.identity().name.clone()),
        listen,
        data: a.data,
        metrics: a
            .metrics
            .as_deref()
            .map(|m| resolve("--metrics", m))
            .transpose()?,
        tls,
        threads,
        index,
        capacity_bytes: capacity,
        cast_iface: a
            .cast_addr
            .as_deref()
            .map(|c| {
                c.parse()
                    .with_context(|| format!("--cast-addr {c}: not an IPv4 address"))
            })
            .transpose()?,
        domain_secret,
        libvirt: a.libvirt.map(|uri| pagecast_agent::Libvirt {
            uri,
            local: a.libvirt_local,
        }),
        hold_silence: std::time::Duration::from_secs(a.hold_silence.max(1)),
    };
    server::serve(config, |addr| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}");
        let _ = out.flush();
    })?;
    Ok(())
}

/// Start, list and stop micro-VMs on an agent.
///
/// Examples:
///
///   pagecast vm start --agent 127.0.0.1:7400 --name web1 --synthetic web --memory 256MiB --dirty-rate 2000
///
///   pagecast vm list --agent 127.0.0.1:7400
///
///   pagecast vm stop --agent 127.0.0.1:7400 --name web1
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct VmArgs {
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    Start(VmStartArgs),
    Adopt(VmAdoptArgs),
    List(VmListArgs),
    Stop(VmStopArgs),
    Set(VmSetArgs),
}

/// Adopt a QEMU VM: the agent takes on a QEMU guest it did not start.
///
/// QEMU must keep the guest's RAM in a shared file and offer a QMP socket:
///
///   qemu-system-x86_64 -m 1G \
///     -object memory-backend-file,id=mem,size=1G,mem-path=/dev/shm/vm1.ram,share=on \
///     -machine pc,memory-backend=mem -qmp unix:/run/vm1.qmp,server=on,wait=off ...
///
/// The agent maps the file read-only, hashes it every 5 s, longer for
/// large VMs (it cannot see QEMU's dirty log, so what it publishes may be
/// that stale; every page it copies is hash-checked), publishes it to the
/// content index and uses its pages as local content for VMs migrating in.
/// With --incoming the QEMU must wait for a migration (-incoming defer): it
/// is the destination of `pagecast migrate --vm NAME` or of an evacuation
/// of NAME, or, adopted under a clone's name, of `pagecast clone`. An
/// adopted VM can be migrated, evacuated and cloned like a micro-VM.
/// `vm stop` of an adopted VM only forgets it; QEMU keeps running.
/// docs/qemu.md has the whole procedure.
///
/// Examples:
///
///   pagecast vm adopt --agent 127.0.0.1:7400 --name vm1 --qmp /run/vm1.qmp --memory-file /dev/shm/vm1.ram
///
///   pagecast vm adopt --agent 127.0.0.1:7401 --name vm1 --qmp /run/vm1-in.qmp --memory-file /dev/shm/vm1-in.ram --incoming
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
struct VmAdoptArgs {
    /// The agent, HOST:PORT (on the QEMU's host).
    #[arg(long, value_name = "ADDR")]
    agent: String,

    /// The name pagecast knows the VM by (letters, digits, '-', '_', '.').
    #[arg(long, value_name = "VM")]
    name: String,

    /// QEMU's QMP socket on the agent's host (-qmp unix:PATH,server=on,wait=off).
    #[arg(long, value_name = "SOCKET")]
    qmp: String,

    /// The file holding the guest's RAM (memory-backend-file mem-path, share=on).
    #[arg(long, value_name = "PATH")]
    memory_file: String,

    /// QEMU waits for a migration (started with -incoming defer).
    #[arg(long)]
    incoming: bool,

    /// The VM's dedup domain (see `vm start --help`).
    #[arg(long, value_name = "NAME", default_value = pagecast_pages::CLUSTER_DOMAIN)]
    domain: String,
    /// Adopt it even though the host is cordoned (`pagecast cordon`).
    #[arg(long)]
    force: bool,

    /// The libvirt domain this QEMU is (libvirt runs it on this host): an
    /// evacuation moves it with this host's libvirt (`virsh migrate`, its
    /// stream through pagecast) to a host whose agent names its libvirt
    /// (`agent --libvirt`); no QEMU need wait there.
    #[arg(long, value_name = "DOMAIN", conflicts_with = "incoming")]
    libvirt_domain: Option<String>,

    #[command(flatten)]
    tls: TlsArg,

    /// Print the VM as JSON.
    #[arg(long)]
    json: bool,
}

/// Change a running VM's page-write rate (0: the guest only ticks its
/// progress counter).
///
/// Example:
///
///   pagecast vm set --agent 127.0.0.1:7400 --name web1 --dirty-rate 5000
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
struct VmSetArgs {
    /// The agent, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    agent: String,

    /// The VM's name.
    #[arg(long, value_name = "VM")]
    name: String,

    /// Pages per second the guest writes.
    #[arg(long, value_name = "PAGES_PER_S")]
    dirty_rate: u64,

    #[command(flatten)]
    tls: TlsArg,

    /// Print the VM as JSON.
    #[arg(long)]
    json: bool,
}

/// Start a KVM micro-VM on an agent.
///
/// Its memory comes from a raw image on the agent's host or from the
/// synthetic generator (--synthetic FAMILY[:key=value,...]: VMs of one
/// family share content, as clones of one template do). A small guest
/// program writes --dirty-rate pages per second across a working set of
/// --working-set pages (from frame 16 up) and counts its progress.
///
/// Examples:
///
///   pagecast vm start --agent 127.0.0.1:7400 --name web1 --synthetic web --memory 256MiB --dirty-rate 2000
///
///   pagecast vm start --agent 127.0.0.1:7400 --name web2 --synthetic web:index=1 --memory 256MiB
///
///   pagecast vm start --agent 127.0.0.1:7400 --name db1 --image /var/lib/pagecast/db1.raw
///
///   pagecast vm start --agent 127.0.0.1:7400 --name acme1 --synthetic web --domain acme
///
/// Dedup domains (--domain): pages are shared, filled locally and
/// multicast only between VMs of one domain. The default is one
/// cluster-wide domain, "cluster", whose pages are named by plain BLAKE3;
/// any other domain names them by keyed BLAKE3 under a key derived from the
/// cluster's domain secret (domains.key, which `pagecast ca issue --role
/// host` gives every host), so the index cannot tell that two domains hold
/// the same page.
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
struct VmStartArgs {
    /// The agent, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    agent: String,

    /// The VM's name (letters, digits, '-', '_', '.'; at most 64).
    #[arg(long, value_name = "VM")]
    name: String,

    /// A raw memory image on the agent's host (a relative path is relative
    /// to the agent's --data directory).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "synthetic",
        required_unless_present = "synthetic"
    )]
    image: Option<String>,

    /// A synthetic memory profile, FAMILY[:key=value,...]. VMs of one
    /// family share content as clones of one template do; keys: index (the
    /// VM's number in its family, default 0), seed, and the content
    /// fractions zero, common, kernel, libs, libs-pool, cache, cache-pool,
    /// near-dup, heap-dup (see `pagecast synth --help`). Example:
    /// web:index=2,zero=0.1
    #[arg(long, value_name = "PROFILE")]
    synthetic: Option<String>,

    /// Memory size (e.g. 256MiB, 1GiB); default: the image's size, or
    /// 64 MiB for a synthetic VM.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: Option<u64>,

    /// Pages per second the guest writes.
    #[arg(long, value_name = "PAGES_PER_S", default_value_t = 0)]
    dirty_rate: u64,

    /// Pages the guest writes to, round-robin.
    #[arg(long, value_name = "PAGES", default_value_t = 1024)]
    working_set: u64,

    /// The VM's dedup domain (letters, digits, '.', '_', '-'; at most 64):
    /// its pages are shared only with VMs of the same domain.
    #[arg(long, value_name = "NAME", default_value = pagecast_pages::CLUSTER_DOMAIN)]
    domain: String,
    /// Start it even though the host is cordoned (`pagecast cordon`).
    #[arg(long)]
    force: bool,

    #[command(flatten)]
    tls: TlsArg,

    /// Print the VM as JSON.
    #[arg(long)]
    json: bool,
}

/// List an agent's VMs: state, memory, the guest's progress counter, its
/// dirty rate and throttle, and where its memory came from.
///
/// States: running; migrating-out; starting and incoming (a name reserved
/// while a VM boots or migrates here); in-doubt (a migration's switchover
/// lost contact with the destination: the VM stays paused here, since it
/// may be running there; check the destination, then `vm stop` the copy
/// that must go).
#[derive(Debug, Args)]
struct VmListArgs {
    /// The agent, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    agent: String,

    #[command(flatten)]
    tls: TlsArg,

    /// Print the list as JSON.
    #[arg(long)]
    json: bool,
}

/// Stop a VM and free its memory (refused while it migrates out).
#[derive(Debug, Args)]
struct VmStopArgs {
    /// The agent, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    agent: String,

    /// The VM's name.
    #[arg(long, value_name = "VM")]
    name: String,

    #[command(flatten)]
    tls: TlsArg,

    /// Print the stopped VM as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct VmOut<'a> {
    name: &'a str,
    state: &'a str,
    memory_bytes: u64,
    progress: u64,
    dirty_rate: u64,
    throttle_pct: u32,
    origin: &'a str,
    domain: &'a str,
    kind: &'a str,
    identity: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    libvirt_domain: &'a str,
}

fn vm_out(v: &v1::VmInfo) -> VmOut<'_> {
    VmOut {
        name: &v.name,
        state: names::state(v.state()),
        memory_bytes: v.memory_bytes,
        progress: v.progress,
        dirty_rate: v.dirty_rate,
        throttle_pct: v.throttle_pct,
        origin: &v.origin,
        domain: pagecast_pages::domain::normalize(&v.domain),
        kind: names::kind(v.kind()),
        identity: &v.identity,
        libvirt_domain: &v.libvirt_domain,
    }
}

/// Runs `pagecast vm ...`.
pub fn run_vm(a: VmArgs) -> anyhow::Result<()> {
    match a.command {
        VmCommand::Start(a) => {
            let tls = load_tls(&a.tls)?;
            let c = AgentClient::connect(&a.agent, &tls)?;
            let req = v1::VmStartRequest {
                name: a.name,
                image: a.image.unwrap_or_default(),
                synthetic: a.synthetic.unwrap_or_default(),
                memory_bytes: a.memory.unwrap_or(0),
                dirty_rate: a.dirty_rate,
                working_set_pages: a.working_set,
                domain: a.domain,
                force: a.force,
            };
            let agent = c.agent_name().to_owned();
            let v = c.vm_start(req)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&vm_out(&v))?);
            } else {
                println!(
                    "started {} on {agent}: {}, {}, writing {} pages/s, dedup domain {}",
                    v.name,
                    format_bytes(v.memory_bytes),
                    v.origin,
                    v.dirty_rate,
                    pagecast_pages::domain::normalize(&v.domain)
                );
            }
        }
        VmCommand::Adopt(a) => {
            let tls = load_tls(&a.tls)?;
            let c = AgentClient::connect(&a.agent, &tls)?;
            let agent = c.agent_name().to_owned();
            let v = c.vm_adopt(v1::VmAdoptRequest {
                name: a.name,
                qmp: a.qmp,
                memory_file: a.memory_file,
                incoming: a.incoming,
                domain: a.domain,
                force: a.force,
                libvirt_domain: a.libvirt_domain.unwrap_or_default(),
            })?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&vm_out(&v))?);
            } else {
                println!(
                    "adopted QEMU VM {} on {agent}: {}, {}, dedup domain {}",
                    v.name,
                    format_bytes(v.memory_bytes),
                    v.state,
                    pagecast_pages::domain::normalize(&v.domain)
                );
            }
        }
        VmCommand::List(a) => {
            let tls = load_tls(&a.tls)?;
            let l = AgentClient::connect(&a.agent, &tls)?.vm_list()?;
            if a.json {
                #[derive(Serialize)]
                struct ListOut<'a> {
                    agent: &'a str,
                    content_entries: u64,
                    vms: Vec<VmOut<'a>>,
                }
                let out = ListOut {
                    agent: &l.agent,
                    content_entries: l.content_entries,
                    vms: l.vms.iter().map(vm_out).collect(),
                };
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print!("{}", render_list(&l));
            }
        }
        VmCommand::Set(a) => {
            let tls = load_tls(&a.tls)?;
            let v = AgentClient::connect(&a.agent, &tls)?.vm_set(&a.name, a.dirty_rate)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&vm_out(&v))?);
            } else {
                println!("{} now writes {} pages/s", v.name, v.dirty_rate);
            }
        }
        VmCommand::Stop(a) => {
            let tls = load_tls(&a.tls)?;
            let v = AgentClient::connect(&a.agent, &tls)?.vm_stop(&a.name)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&vm_out(&v))?);
            } else if v.kind() == v1::VmKind::Qemu {
                println!("forgot QEMU VM {} (QEMU keeps running)", v.name);
            } else {
                println!("stopped {} (progress counter {})", v.name, v.progress);
            }
        }
    }
    Ok(())
}

fn render_list(l: &v1::VmList) -> String {
    let mut s = format!(
        "agent {}: {} VM(s), {} distinct page contents held\n",
        l.agent,
        l.vms.len(),
        l.content_entries
    );
    if l.vms.is_empty() {
        return s;
    }
    s.push_str(&format!(
        "{:<20} {:<9} {:<14} {:>10} {:>12} {:>8} {:>8}  {:<12} {}\n",
        "NAME", "KIND", "STATE", "MEMORY", "PROGRESS", "DIRTY/S", "THROTTLE", "DOMAIN", "ORIGIN"
    ));
    for v in &l.vms {
        s.push_str(&format!(
            "{:<20} {:<9} {:<14} {:>10} {:>12} {:>8} {:>7}%  {:<12} {}\n",
            v.name,
            names::kind(v.kind()),
            names::state(v.state()),
            format_bytes(v.memory_bytes),
            v.progress,
            v.dirty_rate,
            v.throttle_pct,
            if matches!(
                v.state(),
                v1::HostedVmState::Starting | v1::HostedVmState::Incoming
            ) {
                ""
            } else {
                pagecast_pages::domain::normalize(&v.domain)
            },
            v.origin
        ));
    }
    s
}

/// Live-migrate a VM from one agent to another.
///
/// The destination first receives the VM's manifest (the hash of every
/// page) and fills each page it already holds from its own VMs, checking
/// each copy's hash; the source sends the rest, then rounds of the pages
/// the guest dirtied meanwhile, and stops the VM for the final copy once
/// what is left fits --max-downtime (slowing a guest that dirties faster
/// than the link drains). The vCPU state moves last; the destination
/// checks its memory hashes equal the source's, resumes the VM, and the
/// source releases it. On any failure before switchover the VM keeps
/// running on the source and the destination keeps nothing.
///
/// Prints progress while it runs (on a terminal), then a report: pages per
/// round, pages filled locally, bytes on the wire by class, downtime, total
/// time and the verification result. Exits non-zero if it failed.
///
/// Example:
///
///   pagecast migrate --vm web1 --from 127.0.0.1:7400 --to 127.0.0.1:7401 --bandwidth 1G --tls ~/.pagecast
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct MigrateArgs {
    /// The VM to move.
    #[arg(long, value_name = "NAME")]
    vm: String,

    /// The agent running it, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    from: String,

    /// The destination agent, HOST:PORT, as the source agent reaches it.
    #[arg(long, value_name = "ADDR")]
    to: String,

    /// Bits per second the migration may use (e.g. 1G, 500M); default:
    /// unlimited.
    #[arg(long, value_name = "BITS/S", value_parser = parse_bits_per_second)]
    bandwidth: Option<u64>,

    /// Longest pause of the guest at switchover, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    max_downtime: u32,

    /// How the VM switches over: auto, precopy or postcopy (see each).
    #[arg(long, value_enum, default_value = "auto")]
    switchover: super::SwitchoverArg,

    /// At switchover also hash all memory on both sides (slower; the
    /// default check compares the hash of every page the source knows
    /// against the destination's).
    #[arg(long)]
    verify_full: bool,

    /// For an adopted QEMU VM that libvirt migrates: the source agent
    /// listens on this loopback ADDR:PORT for the source QEMU's stream and
    /// starts nothing itself; give libvirt the same address:
    /// `virsh migrate --live DOMAIN DEST_URI --migrateuri tcp:ADDR:PORT
    /// --listen-address ADDR` (docs/qemu.md).
    #[arg(long, value_name = "ADDR:PORT")]
    qemu_listen: Option<String>,

    /// With --qemu-listen: the loopback ADDR:PORT where the destination
    /// host's QEMU listens for the stream (libvirt's --listen-address and
    /// the port of --migrateuri); default: the --qemu-listen address. That
    /// QEMU need not be adopted.
    #[arg(long, value_name = "ADDR:PORT", requires = "qemu_listen")]
    qemu_connect: Option<String>,

    /// With --qemu-listen: how long the source agent waits for QEMU to
    /// connect, in seconds.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 300,
        requires = "qemu_listen"
    )]
    qemu_wait: u32,

    /// The job the migration runs as (default: migrate:VM:TIME). Both
    /// agents are told of it first; `pagecast cancel --job` stops it.
    #[arg(long, value_name = "ID")]
    job: Option<String>,

    #[command(flatten)]
    tls: TlsArg,

    /// Print the report as JSON.
    #[arg(long)]
    json: bool,

    /// Never draw progress.
    #[arg(long)]
    quiet: bool,
}

#[derive(Serialize)]
struct RoundOut {
    round: u32,
    pages: u64,
    seconds: f64,
    throttle_pct: u32,
}

#[derive(Serialize)]
struct MigrateOut<'a> {
    vm: &'a str,
    from: &'a str,
    to: &'a str,
    ok: bool,
    error: &'a str,
    in_doubt: bool,
    verified: bool,
    rounds: usize,
    per_round: Vec<RoundOut>,
    pages_sent: u64,
    pages_local: u64,
    /// Distinct contents filled locally (QEMU VMs).
    contents_local: u64,
    /// "qemu" or "micro-vm".
    kind: &'a str,
    nonzero_pages: u64,
    bytes_sent: u64,
    bytes_manifest: u64,
    bytes_pages: u64,
    bytes_vcpu: u64,
    bytes_control: u64,
    downtime_ms: f64,
    total_ms: f64,
    max_throttle_pct: u32,
    progress_after: u64,
    /// "precopy" or "postcopy": how it switched over.
    switchover: &'static str,
    /// Post-copy: pages the destination asked for when its guest touched
    /// them, pages sent after the VM resumed, and how long that took.
    postcopy_requested: u64,
    postcopy_pages: u64,
    postcopy_ms: f64,
}

/// How long closing a job at its agents may hold up the end of a command:
/// an agent that is frozen or cut off would hold the operator up to a
/// handshake timeout, for a close the job's deadline makes anyway.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Closes `job` at every agent of `at` at once, waiting at most `wait`;
/// returns the agents that did not confirm, with why.
fn close_jobs(
    tls: &pagecast_channel::Tls,
    job: &str,
    at: &[&str],
    wait: Duration,
) -> Vec<(String, String)> {
    let (tx, rx) = std::sync::mpsc::channel();
    for &agent in at {
        let (tx, tls, job, agent) = (tx.clone(), tls.clone(), job.to_owned(), agent.to_owned());
        std::thread::spawn(move || {
            let r = AgentClient::connect(&agent, &tls).and_then(|c| c.close_job(&job));
            let _ = tx.send((agent, r.map(|_| ()).map_err(|e| e.to_string())));
        });
    }
    drop(tx);
    let deadline = std::time::Instant::now() + wait;
    let mut pending: Vec<String> = at.iter().map(|s| (*s).to_owned()).collect();
    let mut failed = Vec::new();
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((agent, r)) => {
                pending.retain(|p| *p != agent);
                if let Err(why) = r {
                    failed.push((agent, why));
                }
            }
            Err(_) => break,
        }
    }
    failed.extend(
        pending
            .into_iter()
            .map(|p| (p, format!("no answer within {wait:?}"))),
    );
    failed
}

/// Tells the destination agent of a migration's job: VM `vm` may arrive
/// from `source` in it (and, on the libvirt route, be fed into the QEMU
/// listening on `qemu_connect` there).
fn open_migration_job(
    tls: &pagecast_channel::Tls,
    job: &str,
    (source, vm): (&str, &str),
    to: &str,
    qemu_connect: &str,
) -> anyhow::Result<()> {
    AgentClient::connect(to, tls)
        .and_then(|c| c.with_answer_timeout(pagecast_agent_api::QUICK_ANSWER_TIMEOUT))
        .and_then(|c| {
            c.open_job(v1::JobOpen {
                job: job.to_owned(),
                peers: vec![v1::JobPeer {
                    host: source.to_owned(),
                    role: v1::JobRole::Source as i32,
                    vms: vec![vm.to_owned()],
                }],
                deadline_ms: 0,
                qemu_connect: (!qemu_connect.is_empty())
                    .then(|| qemu_connect.to_owned())
                    .into_iter()
                    .collect(),
            })
        })
        .with_context(|| format!("telling the destination agent at {to} of job {job}"))?;
    Ok(())
}

/// Runs `pagecast migrate`.
pub fn run_migrate(a: MigrateArgs) -> anyhow::Result<()> {
    let tls = load_tls(&a.tls)?;
    let client = AgentClient::connect(&a.from, &tls)?;
    let job = a.job.clone().unwrap_or_else(|| {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        format!("migrate:{}:{ms}", a.vm)
    });
    let req = migrate_request(&a, &job);
    open_migration_job(
        &tls,
        &job,
        (client.agent_name(), &a.vm),
        &a.to,
        &req.qemu_connect,
    )?;
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(10))
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}").expect("static template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_message(format!("migrating {} to {}", a.vm, a.to));
    if let Some(l) = &a.qemu_listen {
        bar.suspend(|| {
            eprintln!(
                "{}: the source agent takes QEMU's stream on tcp:{l} (up to {} s): start the migration, e.g. virsh migrate --live {} DEST_URI --migrateuri tcp:{l}",
                a.vm, a.qemu_wait, a.vm
            )
        });
    }
    let r = follow_migration(client, req, &bar);
    bar.finish_and_clear();
    // The job is over at both ends (a VM left in doubt is still settled:
    // that question is answered whatever the job's state).
    for (at, why) in close_jobs(&tls, &job, &[&a.from, &a.to], CLOSE_WAIT) {
        eprintln!(
            "warning: {at} did not confirm the job's close ({why}); its grant ends at the job's deadline"
        );
    }
    let r = r?;
    let out = migrate_out(&a, &r);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if r.ok {
        print!("{}", render_report(&out));
    }
    if !r.ok {
        if r.in_doubt {
            anyhow::bail!(
                "migration of {} in doubt: {} (the VM stays paused on {}; check `pagecast vm list --agent {}` and stop the copy that must go)",
                a.vm,
                pagecast_proto::refusal_text(&r.error),
                a.from,
                a.to
            );
        }
        anyhow::bail!(
            "migration of {} failed, it keeps running on {}: {}",
            a.vm,
            a.from,
            pagecast_proto::refusal_text(&r.error)
        );
    }
    Ok(())
}

fn migrate_request(a: &MigrateArgs, job: &str) -> v1::MigrateRequest {
    v1::MigrateRequest {
        vm: a.vm.clone(),
        to: a.to.clone(),
        bandwidth_bps: a.bandwidth.unwrap_or(0),
        max_downtime_ms: a.max_downtime,
        verify_full: a.verify_full,
        switchover: a.switchover.to_proto() as i32,
        qemu_listen: a.qemu_listen.clone().unwrap_or_default(),
        qemu_connect: a
            .qemu_connect
            .clone()
            .or_else(|| a.qemu_listen.clone())
            .unwrap_or_default(),
        qemu_wait_s: a.qemu_wait,
        job: job.to_owned(),
        ..Default::default()
    }
}

/// Starts the migration and shows its progress until its result; Ctrl-C
/// stops it before its switchover (the VM stays).
fn follow_migration(
    client: AgentClient,
    req: v1::MigrateRequest,
    bar: &ProgressBar,
) -> Result<v1::MigrateResult, pagecast_agent_api::ClientError> {
    let stop = pagecast_cli::interrupts::catch();
    let mut m = client.start_migrate(req)?;
    let handle = m.handle();
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = handle.go(true, "interrupted by the operator");
    });
    loop {
        match m.next_event()? {
            MigrationEvent::Progress(p) => bar.set_message(format!(
                "{:<14} round {:>2}  {} pages sent ({}), {} filled locally, {} dirty, throttle {}%",
                p.phase,
                p.round,
                p.pages_sent,
                format_bytes(p.bytes_sent),
                p.pages_local,
                p.dirty_pages,
                p.throttle_pct
            )),
            MigrationEvent::Held(..) => {}
            MigrationEvent::Result(r) => return Ok(r),
        }
    }
}

fn migrate_out<'a>(a: &'a MigrateArgs, r: &'a v1::MigrateResult) -> MigrateOut<'a> {
    MigrateOut {
        vm: &a.vm,
        from: &a.from,
        to: &a.to,
        ok: r.ok,
        error: pagecast_proto::refusal_text(&r.error),
        in_doubt: r.in_doubt,
        verified: r.verified,
        rounds: r.rounds.len(),
        per_round: r
            .rounds
            .iter()
            .map(|x| RoundOut {
                round: x.round,
                pages: x.pages,
                seconds: x.seconds,
                throttle_pct: x.throttle_pct,
            })
            .collect(),
        pages_sent: r.pages_sent,
        pages_local: r.pages_local,
        contents_local: r.contents_local,
        kind: names::kind(r.kind()),
        nonzero_pages: r.nonzero_pages,
        bytes_sent: r.bytes_sent,
        bytes_manifest: r.bytes_manifest,
        bytes_pages: r.bytes_pages,
        bytes_vcpu: r.bytes_vcpu,
        bytes_control: r.bytes_control,
        downtime_ms: r.downtime_ms,
        total_ms: r.total_ms,
        max_throttle_pct: r.max_throttle_pct,
        progress_after: r.progress_after,
        switchover: if r.postcopy { "postcopy" } else { "precopy" },
        postcopy_requested: r.postcopy_requested,
        postcopy_pages: r.postcopy_pages,
        postcopy_ms: r.postcopy_ms,
    }
}

fn render_report(o: &MigrateOut<'_>) -> String {
    if o.kind == "qemu" {
        return format!(
            "migrated QEMU VM {} from {} to {} in {:.0} ms, downtime {:.1} ms (QEMU's figure)\n  pages: {} in QEMU's stream, {} of them ({} distinct contents) filled from the destination's memory, {} sent\n  wire:  {} between the agents\n",
            o.vm,
            o.from,
            o.to,
            o.total_ms,
            o.downtime_ms,
            o.nonzero_pages,
            o.pages_local,
            o.contents_local,
            o.pages_sent,
            format_bytes(o.bytes_sent)
        );
    }
    let mut s = format!(
        "migrated {} from {} to {} in {:.0} ms, downtime {:.1} ms, verified: {}\n",
        o.vm,
        o.from,
        o.to,
        o.total_ms,
        o.downtime_ms,
        if o.verified { "yes" } else { "NO" }
    );
    s.push_str(&format!(
        "  pages: {} non-zero, {} filled locally at the destination, {} sent\n",
        o.nonzero_pages, o.pages_local, o.pages_sent
    ));
    s.push_str(&format!(
        "  wire:  {} in all = manifest {} + pages {} + vCPU {} + control {}\n",
        format_bytes(o.bytes_sent),
        format_bytes(o.bytes_manifest),
        format_bytes(o.bytes_pages),
        format_bytes(o.bytes_vcpu),
        format_bytes(o.bytes_control)
    ));
    if o.switchover == "postcopy" {
        s.push_str(&format!(
            "  rounds: {}, then post-copy: the VM resumed at the destination and {} pages followed in {:.0} ms ({} asked for by its guest)\n",
            o.rounds, o.postcopy_pages, o.postcopy_ms, o.postcopy_requested
        ));
    } else {
        s.push_str(&format!(
            "  rounds: {} (the last is stop-and-copy)\n",
            o.rounds
        ));
    }
    for r in &o.per_round {
        s.push_str(&format!(
            "    round {:>2}: {:>9} pages in {:>7.3} s, throttle {}%\n",
            r.round, r.pages, r.seconds, r.throttle_pct
        ));
    }
    s.push_str(&format!(
        "  guest progress counter on the destination after resuming: {}\n",
        o.progress_after
    ));
    s
}
