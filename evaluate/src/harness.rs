//! The evaluation harness: the strategies side by side on an emulated
//! multi-rack network, measured from the interfaces' counters.
//!
//! The network is built from the topology file in network namespaces: one
//! per host, a bridge per rack (in the rack's namespace), each rack's
//! uplink a veth pair into a core bridge, and one namespace for the index
//! replicas and the operator's commands, also on the core. Every host link
//! is shaped to its rate with `tc tbf` in both directions, every uplink
//! likewise; all bridges form one layer-2 domain with IGMP snooping on
//! (every bridge a querier, as data-centre switches are), so a multicast
//! group reaches the hosts that joined it and no others; `--flood` turns
//! snooping off (multicast reaches every host). Segmentation offloads are switched
//! off on every veth (ethtool), so interface counters count every packet's
//! headers as a wire would.
//!
//! Each strategy runs from the same starting state on a fresh cluster
//! (three replicas, an agent per host, the topology's VMs booted), then the
//! optional clone case. Bytes come from the interfaces' counters read
//! before and after; times, downtimes and verification from the commands'
//! own reports; the planner's prediction from `evacuate`'s report.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use pagecast_channel::Role;
use pagecast_channel::ca::Authority;
use pagecast_pages::units::format_bytes;
use serde::Serialize;
use serde_json::Value;

use pagecast_cli::topology::{Topology, VmSource};

use crate::cpu::CpuUse;

/// Run the evacuation strategies (and a clone) on an emulated multi-rack
/// network and report bytes per link from the interfaces' counters.
///
/// Builds the topology file's racks and hosts as network namespaces
/// (bridges per rack, shaped host links and rack uplinks into a core),
/// starts three index replicas and an agent per host, boots the VMs, and
/// runs each strategy from a fresh cluster: `evacuate --strategy S` of the
/// file's [evacuate] section. Then, with --clone VM:N, clones VM to N
/// hosts. Writes OUTDIR/report.json, OUTDIR/report.md and SVG plots, and
/// the processes' logs under OUTDIR/logs. Needs root, /dev/kvm, iproute2,
/// nftables and ethtool (scripts/setup.sh installs them). Everything it
/// starts is stopped and every namespace removed when it ends, Ctrl-C
/// included.
///
/// --quick caps every synthetic VM at 32 MiB (images keep their size) and
/// runs precopy and pagecast only (unless --strategies is given): the CI
/// check.
///
/// Example:
///
///   pagecast-evaluate --topology docs/examples/eval.toml --out eval-out
#[derive(Debug, Parser)]
#[command(name = "pagecast-evaluate", version, verbatim_doc_comment)]
pub struct EvaluateArgs {
    /// The topology file (`pagecast plan --help` describes it).
    #[arg(long, value_name = "FILE")]
    topology: PathBuf,
    /// Where the report, plots and logs go (created).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Strategies to run, in order.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    strategies: Vec<String>,
    /// Also clone VM to N hosts (a fresh cluster).
    #[arg(long, value_name = "VM:N")]
    clone: Option<String>,
    /// Small synthetic VMs (at most 32 MiB), precopy and pagecast only.
    #[arg(long)]
    quick: bool,
    /// Pages per second every VM's guest writes.
    #[arg(long, value_name = "PAGES_PER_S", default_value_t = 500)]
    dirty_rate: u64,
    /// Longest pause of each VM at switchover, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    max_downtime: u32,
    /// Prefix of the namespaces' names.
    #[arg(long, value_name = "NAME", default_value = "pce")]
    prefix: String,
    /// Drop this percentage of multicast datagrams arriving at every host
    /// (an nftables `numgen random` rule in each host's namespace).
    #[arg(long, value_name = "PCT", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=50))]
    loss: u8,
    /// Bridges without IGMP snooping: every multicast datagram reaches
    /// every host, members of its group or not (switches that flood
    /// multicast). By default a group reaches only the hosts that joined it.
    #[arg(long)]
    flood: bool,
    /// The `pagecast` binary the cluster runs (default: the one beside
    /// this program, as cargo builds them).
    #[arg(long, value_name = "PATH")]
    pagecast: Option<PathBuf>,
    /// More `pagecast evacuate` arguments for the `pagecast` strategy only,
    /// split at spaces (e.g. "--release-early"); the baselines run as
    /// their systems do.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pagecast_args: Option<String>,
    /// A job of the jobs-together case, FROM=TO (host lists, e.g.
    /// a1,a2=b1,b2); give it twice or more. Each job is evacuated alone
    /// on a fresh cluster, then all at once on another (separate `pagecast
    /// evacuate` commands, started together): each job's eviction
    /// together against alone says how they shared the links they met on.
    #[arg(long, value_name = "FROM=TO")]
    together: Vec<String>,
}

/// The `pagecast` binary: `given`, or the one beside this program.
fn pagecast_exe(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let exe = match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .context("this program's directory")?
            .join("pagecast"),
    };
    if !exe.is_file() {
        bail!(
            "{} is missing: build it with `cargo build -p pagecast-cli --bin pagecast` \
             (or name it with --pagecast)",
            exe.display()
        );
    }
    Ok(exe)
}

/// Most hosts a topology may have here (addresses are 10.79.RACK.HOST).
const MAX_RACKS: usize = 200;
const MAX_HOSTS_PER_RACK: usize = 200;
/// The index's replicas listen on 10.79.0.1 at these ports.
const INDEX_PORTS: [u16; 3] = [7601, 7602, 7603];
const AGENT_PORT: u16 = 7400;
const MTU: u32 = 9000;
/// Memory of each VM in --quick runs.
const QUICK_MEMORY: u64 = 32 << 20;

fn ip(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn in_ns(ns: &str, cmd: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .with_context(|| format!("running {} in {ns}", cmd[0]))?;
    if !out.status.success() {
        bail!(
            "{} in {ns}: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One end of a link whose counters are read: an interface in a namespace.
#[derive(Debug, Clone)]
struct Port {
    ns: String,
    dev: String,
}

/// The emulated network. Dropping it removes every namespace it made.
struct Net {
    made: Vec<String>,
    idx: String,
    /// Per host: its namespace, address, and the port of its link (eth0).
    hosts: Vec<(String, Ipv4Addr, Port)>,
    /// Per rack: the rack side of its uplink.
    uplinks: Vec<Port>,
    offloads_off: bool,
}

impl Net {
    fn add_ns(&mut self, name: String) -> anyhow::Result<String> {
        let out = Command::new("ip").args(["netns", "add", &name]).output()?;
        if !out.status.success() {
            bail!(
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.made.push(name.clone());
        ip(&name, &["link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// A bridge in `ns`: with IGMP snooping and its own querier (queries
    /// each second at start-up, answers within a second, so snooping is in
    /// force well before any cast), or flooding multicast (`flood`).
    fn bridge(ns: &str, flood: bool) -> anyhow::Result<()> {
        let mut args = vec!["link", "add", "br0", "type", "bridge"];
        if flood {
            args.extend(["mcast_snooping", "0"]);
        } else {
            args.extend([
                "mcast_snooping",
                "1",
                "mcast_querier",
                "1",
                "mcast_query_response_interval",
                "100",
                "mcast_startup_query_interval",
                "100",
            ]);
        }
        ip(ns, &args)?;
        ip(ns, &["link", "set", "br0", "mtu", &MTU.to_string(), "up"])
    }

    /// A veth pair `a` in `ns_a` and `b` (enslaved to br0) in `ns_b`, each
    /// end shaped to `bps` on egress, offloads off.
    fn wire(&mut self, ns_a: &str, a: &str, ns_b: &str, b: &str, bps: f64) -> anyhow::Result<()> {
        let out = Command::new("ip")
            .args([
                "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b,
            ])
            .args(["netns", ns_b])
            .output()?;
        if !out.status.success() {
            bail!(
                "veth {ns_a}/{a} - {ns_b}/{b}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        ip(
            ns_b,
            &[
                "link",
                "set",
                b,
                "mtu",
                &MTU.to_string(),
                "master",
                "br0",
                "up",
            ],
        )?;
        ip(ns_a, &["link", "set", a, "mtu", &MTU.to_string(), "up"])?;
        for (ns, dev) in [(ns_a, a), (ns_b, b)] {
            let rate = format!("{}bit", bps.round() as u64);
            let burst = (MTU * 64).to_string();
            in_ns(
                ns,
                &[
                    "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst",
                    &burst, "latency", "20ms",
                ],
            )?;
            if self.offloads_off {
                in_ns(
                    ns,
                    &[
                        "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off",
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Builds the namespaces of `topo`.
    fn build(topo: &Topology, prefix: &str, loss: u8, flood: bool) -> anyhow::Result<Net> {
        Net::remove_all(prefix);
        let offloads_off = Command::new("ethtool")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        let mut net = Net {
            made: Vec::new(),
            idx: String::new(),
            hosts: Vec::new(),
            uplinks: Vec::new(),
            offloads_off,
        };
        let c = &topo.cluster;
        if c.racks.len() > MAX_RACKS {
            bail!(
                "{} racks; the evaluation handles at most {MAX_RACKS}",
                c.racks.len()
            );
        }
        let core = net.add_ns(format!("{prefix}-core"))?;
        Net::bridge(&core, flood)?;
        net.idx = net.add_ns(format!("{prefix}-idx"))?;
        let idx = net.idx.clone();
        // The control namespace's link is not measured: 100 Gbit/s.
        net.wire(&idx, "eth0", &core, "idx", 100e9)?;
        ip(&idx, &["addr", "add", "10.79.0.1/16", "dev", "eth0"])?;
        let mut per_rack = vec![0usize; c.racks.len()];
        for (k, r) in c.racks.iter().enumerate() {
            let rns = net.add_ns(format!("{prefix}-r{k}"))?;
            Net::bridge(&rns, flood)?;
            net.wire(&rns, "up0", &core, &format!("r{k}"), r.uplink_bps)?;
            ip(&rns, &["link", "set", "up0", "master", "br0"])?;
            net.uplinks.push(Port {
                ns: rns,
                dev: "up0".into(),
            });
        }
        for (i, h) in c.hosts.iter().enumerate() {
            let j = per_rack[h.rack];
            per_rack[h.rack] += 1;
            if j >= MAX_HOSTS_PER_RACK {
                bail!(
                    "rack {} has more than {MAX_HOSTS_PER_RACK} hosts",
                    c.racks[h.rack].name
                );
            }
            let hns = net.add_ns(format!("{prefix}-h{i}"))?;
            let rns = net.uplinks[h.rack].ns.clone();
            net.wire(&hns, "eth0", &rns, &format!("h{i}"), h.link_bps)?;
            let addr = Ipv4Addr::new(10, 79, h.rack as u8 + 1, j as u8 + 1);
            ip(&hns, &["addr", "add", &format!("{addr}/16"), "dev", "eth0"])?;
            ip(&hns, &["route", "add", "224.0.0.0/4", "dev", "eth0"])?;
            if loss > 0 {
                let pct = loss.to_string();
                in_ns(&hns, &["nft", "add", "table", "inet", "pagecast_loss"])?;
                in_ns(
                    &hns,
                    &[
                        "nft",
                        "add",
                        "chain",
                        "inet",
                        "pagecast_loss",
                        "input",
                        "{ type filter hook input priority 0 ; policy accept ; }",
                    ],
                )?;
                in_ns(
                    &hns,
                    &[
                        "nft",
                        "add",
                        "rule",
                        "inet",
                        "pagecast_loss",
                        "input",
                        "ip",
                        "daddr",
                        "224.0.0.0/4",
                        "numgen",
                        "random",
                        "mod",
                        "100",
                        "<",
                        &pct,
                        "drop",
                    ],
                )?;
            }
            net.hosts.push((
                hns.clone(),
                addr,
                Port {
                    ns: hns,
                    dev: "eth0".into(),
                },
            ));
        }
        Ok(net)
    }

    /// Removes every namespace named `PREFIX-...` (left by an earlier run).
    fn remove_all(prefix: &str) {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(&format!("{prefix}-")) {
                kill_in(name);
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            kill_in(ns);
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Kills every process left in namespace `ns`.
fn kill_in(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill(2) on a process id listed for the namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Bytes each way through `p` so far.
fn counters(p: &Port) -> anyhow::Result<(u64, u64)> {
    let out = Command::new("ip")
        .args(["-n", &p.ns, "-s", "-j", "link", "show", "dev", &p.dev])
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("counters of {}/{}", p.ns, p.dev))?;
    let s = &v[0]["stats64"];
    let get = |d: &str| {
        s[d]["bytes"]
            .as_u64()
            .with_context(|| format!("no {d} bytes for {}/{}", p.ns, p.dev))
    };
    Ok((get("tx")?, get("rx")?))
}

/// Bytes sent and received on one link during a run.
#[derive(Debug, Clone, Copy, Serialize, Default)]
struct LinkBytes {
    tx: u64,
    rx: u64,
}

/// The processes of one cluster. Dropping it kills them and removes their
/// data (the replicas' databases; logs stay).
struct Cluster {
    children: Vec<Child>,
    /// Each child's name: its host's for an agent, `replicaN` for a
    /// replica.
    names: Vec<String>,
    data: PathBuf,
    index: String,
    operator: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SAFETY: SIGTERM to our own child, so agents withdraw cleanly.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let t = Instant::now();
        for c in &mut self.children {
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

struct Ctx<'a> {
    exe: PathBuf,
    /// OUTDIR, absolute.
    out: PathBuf,
    net: &'a Net,
    topo: &'a Topology,
    tls: PathBuf,
    stop: &'static AtomicBool,
    args: &'a EvaluateArgs,
}

impl Ctx<'_> {
    fn spawn(&self, ns: &str, args: &[String], log: &Path) -> anyhow::Result<Child> {
        let logf = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&self.exe)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .context("spawning a pagecast process")
    }

    /// A pagecast command in the control namespace as the operator; its
    /// stdout as JSON.
    fn operator_json(&self, cl: &Cluster, args: &[&str]) -> anyhow::Result<Value> {
        self.operator_json_logged(cl, args, None)
    }

    /// [`Self::operator_json`], its stderr (with each step's time, at
    /// `RUST_LOG=info`) also written to `log`.
    fn operator_json_logged(
        &self,
        cl: &Cluster,
        args: &[&str],
        log: Option<&Path>,
    ) -> anyhow::Result<Value> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.net.idx])
            .arg(&self.exe)
            .args(args)
            .env("PAGECAST_TLS", &cl.operator)
            .env("PAGECAST_INDEX", &cl.index);
        if log.is_some() {
            // Each step with its time, for the log kept.
            cmd.env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        }
        let out = cmd.output()?;
        if let Some(log) = log {
            std::fs::write(log, &out.stderr)?;
        }
        let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "pagecast {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        Ok(v)
    }

    fn check_stop(&self) -> anyhow::Result<()> {
        if self.stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        Ok(())
    }

    /// A fresh cluster: replicas, agents, the topology's VMs, indexed.
    fn start_cluster(&self, run: &str) -> anyhow::Result<Cluster> {
        let dir = self.out.join("data").join(run);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let logs = self.out.join("logs").join(run);
        std::fs::create_dir_all(&logs)?;
        let index: Vec<String> = INDEX_PORTS
            .iter()
            .map(|p| format!("10.79.0.1:{p}"))
            .collect();
        let mut cl = Cluster {
            children: Vec::new(),
            names: Vec::new(),
            data: dir.clone(),
            index: index.join(","),
            operator: self.tls.join("operator"),
        };
        self.start_replicas(&mut cl, &dir, &logs)?;
        let agents = self.start_agents(&mut cl, &logs)?;
        self.start_vms(&cl, &agents)?;
        self.wait_published(&cl)?;
        Ok(cl)
    }

    /// Three index replicas, until leaders are elected (`hosts` answers).
    fn start_replicas(&self, cl: &mut Cluster, dir: &Path, logs: &Path) -> anyhow::Result<()> {
        let peers: Vec<String> = INDEX_PORTS
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=10.79.0.1:{p}", i + 1))
            .collect();
        for (i, p) in INDEX_PORTS.iter().enumerate() {
            let id = (i + 1).to_string();
            let args: Vec<String> = [
                "index",
                "serve",
                "--id",
                &id,
                "--listen",
                &format!("10.79.0.1:{p}"),
                "--peers",
                &peers.join(","),
                "--raft-log",
                "warning",
                "--data",
                dir.join(format!("replica{id}"))
                    .to_str()
                    .unwrap_or_default(),
                "--tls",
                self.tls
                    .join(format!("index-{id}"))
                    .to_str()
                    .unwrap_or_default(),
            ]
            .map(String::from)
            .to_vec();
            let child = self.spawn(&self.net.idx, &args, &logs.join(format!("replica{id}.log")))?;
            cl.children.push(child);
            cl.names.push(format!("replica{id}"));
        }
        let t = Instant::now();
        loop {
            self.check_stop()?;
            if self.operator_json(cl, &["hosts", "--json"]).is_ok() {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the index did not answer within 60 s (logs in {})",
                    logs.display()
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// An agent per host, each in its namespace; returns their addresses.
    fn start_agents(&self, cl: &mut Cluster, logs: &Path) -> anyhow::Result<Vec<String>> {
        let c = &self.topo.cluster;
        let mut agents = Vec::new();
        for (i, h) in c.hosts.iter().enumerate() {
            let (ns, addr, _) = &self.net.hosts[i];
            let args: Vec<String> = [
                "agent",
                "--name",
                &h.name,
                "--listen",
                &format!("{addr}:{AGENT_PORT}"),
                "--tls",
                self.tls.join(&h.name).to_str().unwrap_or_default(),
                "--index",
                &cl.index,
                "--rack",
                &c.racks[h.rack].name,
                "--link",
                &(h.link_bps.round() as u64).to_string(),
                "--capacity",
                &h.memory_bytes.to_string(),
                "--cast-addr",
                &addr.to_string(),
            ]
            .map(String::from)
            .to_vec();
            let mut child = self.spawn(ns, &args, &logs.join(format!("{}.log", h.name)))?;
            let mut line = String::new();
            BufReader::new(child.stdout.take().context("agent stdout")?).read_line(&mut line)?;
            cl.children.push(child);
            cl.names.push(h.name.clone());
            if !line.starts_with("listening on ") {
                bail!(
                    "agent {} did not start (log: {})",
                    h.name,
                    logs.join(format!("{}.log", h.name)).display()
                );
            }
            agents.push(format!("{addr}:{AGENT_PORT}"));
        }
        Ok(agents)
    }

    /// The topology's VMs, each on its host's agent.
    fn start_vms(&self, cl: &Cluster, agents: &[String]) -> anyhow::Result<()> {
        for (v, vm) in self.topo.cluster.vms.iter().enumerate() {
            self.check_stop()?;
            let mut args: Vec<String> = [
                "vm",
                "start",
                "--agent",
                &agents[vm.host],
                "--name",
                &vm.name,
                "--dirty-rate",
                &self.args.dirty_rate.to_string(),
                "--working-set",
                "2000",
                "--domain",
                &self.topo.domains[v],
                "--json",
            ]
            .map(String::from)
            .to_vec();
            match &self.topo.sources[v] {
                VmSource::Image(p) => {
                    args.push("--image".into());
                    args.push(p.display().to_string());
                }
                VmSource::Synthetic { profile, spec } => {
                    let mem = if self.args.quick {
                        spec.memory_bytes().min(QUICK_MEMORY)
                    } else {
                        spec.memory_bytes()
                    };
                    args.extend(["--synthetic".into(), profile.clone()]);
                    args.extend(["--memory".into(), mem.to_string()]);
                }
            }
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let v = self
                .operator_json(cl, &refs)
                .with_context(|| format!("starting VM {}", vm.name))?;
            if v["name"] != vm.name.as_str() {
                bail!("starting VM {}: {v}", vm.name);
            }
        }
        Ok(())
    }

    /// Waits until the index lists every VM, then a moment more so that
    /// nothing is hot.
    fn wait_published(&self, cl: &Cluster) -> anyhow::Result<()> {
        let want = self.topo.cluster.vms.len();
        let t = Instant::now();
        loop {
            self.check_stop()?;
            let h = self.operator_json(cl, &["hosts", "--json"])?;
            let listed: usize = h["hosts"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| x["vms"].as_array().map_or(0, Vec::len))
                        .sum()
                })
                .unwrap_or(0);
            if listed == want {
                break;
            }
            if t.elapsed() > Duration::from_secs(120) {
                bail!("the index lists {listed} of {want} VMs after 120 s");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        std::thread::sleep(Duration::from_secs(2));
        Ok(())
    }

    /// Packets each shaper (tbf) dropped so far, by "namespace/device".
    fn shaper_drops(&self) -> BTreeMap<String, u64> {
        let mut by = BTreeMap::new();
        for ns in &self.net.made {
            let out = in_ns(ns, &["tc", "-s", "-j", "qdisc", "show"]).unwrap_or_default();
            let Some(qs) = serde_json::from_str::<Value>(&out)
                .ok()
                .and_then(|v| v.as_array().cloned())
            else {
                continue;
            };
            for q in qs.iter().filter(|q| q["kind"] == "tbf") {
                let dev = q["dev"].as_str().unwrap_or("?");
                *by.entry(format!("{ns}/{dev}")).or_default() += q["drops"].as_u64().unwrap_or(0);
            }
        }
        by
    }

    /// Per host: UDP datagrams its kernel dropped for a full socket buffer,
    /// and UDP input errors in all (`/proc/net/snmp` of its namespace).
    fn udp_drops(&self) -> Vec<(u64, u64)> {
        self.net
            .hosts
            .iter()
            .map(|h| {
                let snmp = in_ns(&h.0, &["cat", "/proc/net/snmp"]).unwrap_or_default();
                let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
                let (Some(head), Some(vals)) = (lines.next(), lines.next()) else {
                    return (0, 0);
                };
                let field = |name: &str| {
                    head.split_whitespace()
                        .position(|f| f == name)
                        .and_then(|i| vals.split_whitespace().nth(i))
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                (field("RcvbufErrors"), field("InErrors"))
            })
            .collect()
    }

    fn snapshot(&self) -> anyhow::Result<Vec<(u64, u64)>> {
        self.net
            .hosts
            .iter()
            .map(|h| &h.2)
            .chain(self.net.uplinks.iter())
            .map(counters)
            .collect()
    }

    /// Runs the operator command `args` on `cl` with --json, saves its
    /// report to `save`, and measures the links meanwhile.
    fn measured(&self, cl: &Cluster, args: &[&str], save: &Path) -> anyhow::Result<Measured> {
        let before = self.snapshot()?;
        let udp_before = self.udp_drops();
        let shaped_before = self.shaper_drops();
        let pids: Vec<u32> = cl.children.iter().map(Child::id).collect();
        let cpu_before = crate::cpu::Probe::take(&pids);
        let t = Instant::now();
        let rep = self.operator_json_logged(cl, args, Some(&save.with_extension("log")))?;
        let wall_s = t.elapsed().as_secs_f64();
        let cpu = cpu_before.since(&pids, &cl.names);
        std::fs::write(save, serde_json::to_string_pretty(&rep)?)?;
        // Let the last segments reach the counters.
        std::thread::sleep(Duration::from_millis(500));
        let after = self.snapshot()?;
        Ok(Measured {
            rep,
            wall_s,
            cpu,
            links: self.deltas(&before, &after),
            udp: self.udp_diff(&udp_before),
            shaper_drops: {
                // Which shapers dropped: a source's own (its sends wait and
                // go again) or one on the way (the pages come back as
                // repairs).
                let mut total = 0;
                for (at, n) in self.shaper_drops() {
                    let d = n.saturating_sub(shaped_before.get(&at).copied().unwrap_or(0));
                    if d > 0 {
                        eprintln!("   shaper {at} dropped {d} packets");
                        total += d;
                    }
                }
                total
            },
        })
    }

    /// Bytes that entered the core: every rack uplink's transmit counter.
    fn core_bytes(&self, links: &BTreeMap<String, LinkBytes>) -> u64 {
        self.topo
            .cluster
            .racks
            .iter()
            .map(|r| links[&format!("uplink:{}", r.name)].tx)
            .sum()
    }

    /// UDP drops per host since `before`.
    fn udp_diff(&self, before: &[(u64, u64)]) -> BTreeMap<String, (u64, u64)> {
        self.topo
            .cluster
            .hosts
            .iter()
            .zip(before.iter().zip(self.udp_drops()))
            .map(|(h, (b, a))| {
                (
                    h.name.clone(),
                    (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1)),
                )
            })
            .collect()
    }

    /// Bytes per link between two snapshots, named host:NAME and
    /// uplink:RACK.
    fn deltas(&self, before: &[(u64, u64)], after: &[(u64, u64)]) -> BTreeMap<String, LinkBytes> {
        let c = &self.topo.cluster;
        let names = c
            .hosts
            .iter()
            .map(|h| format!("host:{}", h.name))
            .chain(c.racks.iter().map(|r| format!("uplink:{}", r.name)));
        names
            .zip(before.iter().zip(after))
            .map(|(n, (b, a))| {
                (
                    n,
                    LinkBytes {
                        tx: a.0.saturating_sub(b.0),
                        rx: a.1.saturating_sub(b.1),
                    },
                )
            })
            .collect()
    }
}

/// What a measured command reported, and what the links counted meanwhile.
struct Measured {
    rep: Value,
    wall_s: f64,
    /// CPU spent while the command ran.
    cpu: CpuUse,
    links: BTreeMap<String, LinkBytes>,
    udp: BTreeMap<String, (u64, u64)>,
    shaper_drops: u64,
}

/// Bytes the links of `hosts` sent.
fn tx_of(links: &BTreeMap<String, LinkBytes>, hosts: &[String]) -> u64 {
    hosts.iter().map(|h| links[&format!("host:{h}")].tx).sum()
}

/// One VM's outcome in a run.
#[derive(Debug, Clone, Serialize)]
struct VmOutcome {
    name: String,
    downtime_ms: f64,
    verified: bool,
}

/// What the planner predicted for a run.
#[derive(Debug, Clone, Serialize, Default)]
struct Predicted {
    source_bytes: Option<f64>,
    /// Of `source_bytes`, the re-sending of pages the guests rewrite.
    rewrite_bytes: Option<f64>,
    /// Of `source_bytes`, the manifests (a hash per non-zero page).
    manifest_bytes: Option<f64>,
    /// Of `source_bytes`, the frames' headers.
    header_bytes: Option<f64>,
    eviction_s: Option<f64>,
}

/// One strategy's (or the clone's) measured run.
#[derive(Debug, Clone, Serialize)]
struct Run {
    strategy: String,
    ok: bool,
    /// Bytes that left the source hosts: their links' transmit counters.
    source_bytes: u64,
    /// Bytes that entered the core: every rack uplink's transmit counter.
    core_bytes: u64,
    bytes_by_link: BTreeMap<String, LinkBytes>,
    /// Per host: UDP datagrams dropped at a full receive buffer, and UDP
    /// input errors in all, during the run.
    udp_drops: BTreeMap<String, (u64, u64)>,
    /// Packets the links' shapers dropped during the run.
    shaper_drops: u64,
    eviction_s: f64,
    total_s: f64,
    vms: Vec<VmOutcome>,
    predicted: Predicted,
    /// What the command itself counted as sent from the sources.
    reported_source_bytes: f64,
    /// Per VM: when it entered each phase, seconds from the command's
    /// start (empty for the clone).
    phases: BTreeMap<String, Vec<Phase>>,
    /// CPU spent while the command ran: the machine's and each process's.
    cpu: CpuUse,
    /// The same in a line, by role (empty for the clone).
    cpu_text: String,
}

/// A VM entering a phase.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Phase {
    phase: String,
    at_s: f64,
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// The whole report.
#[derive(Debug, Serialize)]
struct Report {
    topology: String,
    commit: String,
    machine: String,
    command: String,
    quick: bool,
    loss_pct: u8,
    offloads_off: bool,
    /// Whether the bridges flooded multicast (`--flood`) rather than
    /// deliver each group to its members only (IGMP snooping).
    multicast_flood: bool,
    strategies: Vec<Run>,
    clone: Option<Run>,
    /// The jobs-together case, if asked for.
    together: Vec<JobTogether>,
}

/// One job of the jobs-together case.
#[derive(Debug, Serialize)]
struct JobTogether {
    from: Vec<String>,
    to: Vec<String>,
    /// Its eviction alone, on a fresh cluster, and all verified.
    alone_s: f64,
    alone_ok: bool,
    /// Its eviction beside the others, and all verified.
    together_s: f64,
    together_ok: bool,
}

impl JobTogether {
    /// Its eviction together over alone.
    fn slowdown(&self) -> f64 {
        self.together_s / self.alone_s.max(1e-9)
    }

    /// Every VM verified, alone and together.
    fn verified(&self) -> bool {
        self.alone_ok && self.together_ok
    }
}

/// What the arguments ask for, checked against the topology.
struct Choice {
    topo: Topology,
    strategies: Vec<String>,
    /// The VM to clone and to how many hosts.
    clone: Option<(usize, usize)>,
    /// The jobs run together: (from, to) host names.
    together: Vec<(Vec<String>, Vec<String>)>,
}

impl Choice {
    fn of(a: &EvaluateArgs) -> anyhow::Result<Choice> {
        let topo = Topology::load(&a.topology)?;
        let mut strategies = a.strategies.clone();
        // The jobs-together case alone, unless strategies are named too.
        if strategies.is_empty() && a.together.is_empty() {
            strategies = if a.quick {
                vec!["precopy".into(), "pagecast".into()]
            } else {
                vec!["precopy".into(), "vmscatter".into(), "pagecast".into()]
            };
        }
        for s in &strategies {
            if !["precopy", "vmscatter", "pagecast"].contains(&s.as_str()) {
                bail!("--strategies: {s:?} is not precopy, vmscatter or pagecast");
            }
        }
        let clone = match &a.clone {
            None => None,
            Some(c) => Some(clone_choice(&topo, c)?),
        };
        let together = together_choice(&topo, &a.together)?;
        Ok(Choice {
            topo,
            strategies,
            clone,
            together,
        })
    }
}

/// `--together FROM=TO`, each checked: known hosts, disjoint sources.
fn together_choice(
    topo: &Topology,
    jobs: &[String],
) -> anyhow::Result<Vec<(Vec<String>, Vec<String>)>> {
    if jobs.len() == 1 {
        bail!("--together: give two jobs or more");
    }
    let known = |h: &str| topo.cluster.hosts.iter().any(|x| x.name == h);
    let mut out: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    for j in jobs {
        let (from, to) = j
            .split_once('=')
            .with_context(|| format!("--together {j}: give FROM=TO"))?;
        let list = |l: &str| -> anyhow::Result<Vec<String>> {
            let hs: Vec<String> = l.split(',').map(|h| h.trim().to_owned()).collect();
            for h in &hs {
                if !known(h) {
                    bail!("--together {j}: no host {h:?} in the topology");
                }
            }
            Ok(hs)
        };
        let (from, to) = (list(from)?, list(to)?);
        if out.iter().any(|(f, _)| f.iter().any(|h| from.contains(h))) {
            bail!("--together {j}: its sources are another job's");
        }
        if out
            .iter()
            .any(|(f, t)| f.iter().any(|h| to.contains(h)) || t.iter().any(|h| from.contains(h)))
        {
            bail!("--together {j}: a host is one job's source and another's destination");
        }
        out.push((from, to));
    }
    Ok(out)
}

/// `--clone VM:N`: the VM's index and N.
fn clone_choice(topo: &Topology, c: &str) -> anyhow::Result<(usize, usize)> {
    let (vm, n) = c
        .split_once(':')
        .with_context(|| format!("--clone {c}: give VM:N"))?;
    let n: usize = n
        .parse()
        .with_context(|| format!("--clone {c}: N is a number"))?;
    let vi = topo
        .cluster
        .vms
        .iter()
        .position(|v| v.name == vm)
        .with_context(|| format!("--clone {c}: no VM {vm} in the topology"))?;
    if n == 0 || n >= topo.cluster.hosts.len() {
        bail!(
            "--clone {c}: N must be 1 to {} (the other hosts)",
            topo.cluster.hosts.len() - 1
        );
    }
    Ok((vi, n))
}

/// A certificate authority and every certificate the cluster needs, under
/// `tls` (made afresh).
fn certificates(tls: &Path, topo: &Topology) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(tls);
    let ca = Authority::init(&tls.join("ca"))?;
    for id in 1..=3 {
        ca.issue_to(
            &format!("index-{id}"),
            Role::Index,
            30,
            &tls.join(format!("index-{id}")),
        )?;
    }
    for h in &topo.cluster.hosts {
        ca.issue_to(&h.name, Role::Host, 30, &tls.join(&h.name))?;
    }
    ca.issue_to("operator", Role::Operator, 30, &tls.join("operator"))?;
    Ok(())
}

pub fn run(a: EvaluateArgs) -> anyhow::Result<()> {
    // The arguments first: a mistake there costs no namespace.
    let choice = Choice::of(&a)?;
    let exe = pagecast_exe(a.pagecast.as_deref())?;
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("evaluate builds network namespaces: it needs root");
    }
    if !Path::new("/dev/kvm").exists() {
        bail!("evaluate runs KVM micro-VMs: /dev/kvm is missing");
    }
    let topo = &choice.topo;
    let stop = pagecast_cli::interrupts::catch();
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let out = a.out.canonicalize()?;
    eprintln!("== certificates");
    let tls = out.join("tls");
    certificates(&tls, topo)?;
    eprintln!(
        "== network: {} racks, {} hosts in namespaces {}-*",
        topo.cluster.racks.len(),
        topo.cluster.hosts.len(),
        a.prefix
    );
    let net = Net::build(topo, &a.prefix, a.loss, a.flood)?;
    let ctx = Ctx {
        exe,
        out: out.clone(),
        net: &net,
        topo,
        tls,
        stop,
        args: &a,
    };
    let names = |hs: &[usize]| -> Vec<String> {
        hs.iter()
            .map(|&h| topo.cluster.hosts[h].name.clone())
            .collect()
    };
    let (from, to) = (names(&topo.evacuation.from), names(&topo.evacuation.to));
    let mut runs = Vec::new();
    for s in &choice.strategies {
        runs.push(ctx.evacuation(s, &from, &to)?);
    }
    let clone_run = match choice.clone {
        None => None,
        Some((vi, n)) => Some(ctx.clone_case(vi, n)?),
    };
    let together = if choice.together.is_empty() {
        Vec::new()
    } else {
        ctx.together_case(&choice.together)?
    };
    let report = Report {
        topology: a.topology.display().to_string(),
        commit: git_commit(),
        machine: machine(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        quick: a.quick,
        loss_pct: a.loss,
        offloads_off: net.offloads_off,
        multicast_flood: a.flood,
        strategies: runs,
        clone: clone_run,
        together,
    };
    drop(net);
    let _ = std::fs::remove_dir_all(out.join("data"));
    write_report(&out, &report, &from)?;
    eprintln!("== wrote {}", out.join("report.md").display());
    Ok(())
}

impl Ctx<'_> {
    /// `pagecast evacuate` of `from` onto `to` with pagecast, as the
    /// strategies run it.
    fn evacuate_args(&self, from: &[String], to: &[String]) -> Vec<String> {
        vec![
            "evacuate".to_owned(),
            "--from".into(),
            from.join(","),
            "--to".into(),
            to.join(","),
            "--max-downtime".into(),
            self.args.max_downtime.to_string(),
            "--json".into(),
            "--no-progress".into(),
        ]
    }

    /// Each job alone on a fresh cluster, then all at once on another.
    fn together_case(
        &self,
        jobs: &[(Vec<String>, Vec<String>)],
    ) -> anyhow::Result<Vec<JobTogether>> {
        let logs = self.out.join("logs").join("together");
        std::fs::create_dir_all(&logs)?;
        let mut alone = Vec::new();
        for (k, (from, to)) in jobs.iter().enumerate() {
            eprintln!("== job {}: alone on a fresh cluster", from.join(","));
            let cl = self.start_cluster(&format!("alone{k}"))?;
            let args = self.evacuate_args(from, to);
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let rep =
                self.operator_json_logged(&cl, &refs, Some(&logs.join(format!("alone{k}.log"))))?;
            alone.push((num(&rep["eviction_s"]), rep["ok"] == true));
        }
        eprintln!("== {} jobs together: starting a fresh cluster", jobs.len());
        let cl = self.start_cluster("together")?;
        let reps: Vec<anyhow::Result<Value>> = std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .iter()
                .enumerate()
                .map(|(k, (from, to))| {
                    let (cl, logs) = (&cl, &logs);
                    s.spawn(move || {
                        let args = self.evacuate_args(from, to);
                        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                        self.operator_json_logged(
                            cl,
                            &refs,
                            Some(&logs.join(format!("together{k}.log"))),
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a job's thread panicked"))
                .collect()
        });
        let mut out = Vec::new();
        for (((from, to), (alone_s, alone_ok)), rep) in jobs.iter().zip(alone).zip(reps) {
            let rep = rep?;
            let j = JobTogether {
                from: from.clone(),
                to: to.clone(),
                alone_s,
                alone_ok,
                together_s: num(&rep["eviction_s"]),
                together_ok: rep["ok"] == true,
            };
            eprintln!(
                "== job {}: eviction {:.2} s alone, {:.2} s together ({:.2}x), {}",
                from.join(","),
                j.alone_s,
                j.together_s,
                j.slowdown(),
                if j.verified() {
                    "all verified"
                } else {
                    "NOT all verified"
                }
            );
            out.push(j);
        }
        Ok(out)
    }

    /// Strategy `s` on a fresh cluster: evacuates `from` (onto `to`, or
    /// where the planner chooses), measured.
    fn evacuation(&self, s: &str, from: &[String], to: &[String]) -> anyhow::Result<Run> {
        let a = self.args;
        eprintln!("== {s}: starting a fresh cluster");
        let cl = self.start_cluster(s)?;
        eprintln!("== {s}: evacuating {}", from.join(","));
        let mut args = vec![
            "evacuate".to_owned(),
            "--from".into(),
            from.join(","),
            "--strategy".into(),
            s.to_owned(),
            "--max-downtime".into(),
            a.max_downtime.to_string(),
            "--json".into(),
            "--no-progress".into(),
            // The prediction counts headers as the counters do.
            "--mtu".into(),
            MTU.to_string(),
        ];
        if a.flood {
            args.push("--multicast-floods".into());
        }
        if !to.is_empty() {
            args.extend(["--to".into(), to.join(",")]);
        }
        if s == "pagecast" {
            let more = a.pagecast_args.as_deref().unwrap_or_default();
            args.extend(more.split_whitespace().map(str::to_owned));
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.out.join("logs").join(s).join("evacuate.json");
        let m = self.measured(&cl, &refs, &log)?;
        drop(cl);
        let rep = &m.rep;
        let vms = outcomes(&rep["vms"], |x| num(&x["downtime_ms"]));
        let run = Run {
            strategy: s.to_owned(),
            ok: rep["ok"] == true,
            source_bytes: tx_of(&m.links, from),
            core_bytes: self.core_bytes(&m.links),
            eviction_s: num(&rep["eviction_s"]),
            total_s: rep["total_s"].as_f64().unwrap_or(m.wall_s),
            vms,
            predicted: Predicted {
                source_bytes: rep["predicted"]["source_bytes"].as_f64(),
                rewrite_bytes: rep["predicted"]["rewrite_bytes"].as_f64(),
                manifest_bytes: rep["predicted"]["manifest_bytes"].as_f64(),
                header_bytes: rep["predicted"]["header_bytes"].as_f64(),
                eviction_s: rep["predicted"]["eviction_s"].as_f64(),
            },
            reported_source_bytes: num(&rep["source_bytes"]),
            phases: serde_json::from_value(rep["phases"].clone()).unwrap_or_default(),
            bytes_by_link: m.links,
            udp_drops: m.udp,
            shaper_drops: m.shaper_drops,
            cpu_text: self.cpu_text(&m.cpu, from, to),
            cpu: m.cpu,
        };
        eprintln!(
            "== {s}: {} from the sources, {} into the core, eviction {:.2} s, {}",
            format_bytes(run.source_bytes),
            format_bytes(run.core_bytes),
            run.eviction_s,
            if run.ok {
                "all verified"
            } else {
                "NOT all verified"
            }
        );
        eprintln!("   {}", run.cpu_text);
        Ok(run)
    }

    /// Where a run's CPU went, in a line: cores busy on average, then
    /// CPU-seconds by the agents at the sources, at the destinations
    /// (`to`, or every other host if empty) and elsewhere, the replicas,
    /// the command, and the rest; and the time the hypervisor stole.
    fn cpu_text(&self, cpu: &CpuUse, from: &[String], to: &[String]) -> String {
        let hosts: Vec<String> = self
            .topo
            .cluster
            .hosts
            .iter()
            .map(|h| h.name.clone())
            .collect();
        let dests: Vec<String> = hosts
            .iter()
            .filter(|h| !from.contains(h) && (to.is_empty() || to.contains(h)))
            .cloned()
            .collect();
        let others: Vec<String> = hosts
            .iter()
            .filter(|h| !from.contains(h) && !dests.contains(h))
            .cloned()
            .collect();
        // Every measured process that is neither an agent nor the command.
        let replicas: Vec<String> = cpu
            .by_process
            .keys()
            .filter(|k| !hosts.contains(k) && *k != "command")
            .cloned()
            .collect();
        format!(
            "cpu: {:.2} of {} cores busy on average over {:.2} s ({:.1} CPU-s: agents at the \
             sources {:.1}, at the destinations {:.1}, elsewhere {:.1}; index replicas {:.1}; \
             the command {:.1}; other {:.1}; {:.1} stolen by the hypervisor)",
            cpu.cores_busy(),
            cpu.cores,
            cpu.wall_s,
            cpu.machine_s,
            cpu.of(from),
            cpu.of(&dests),
            cpu.of(&others),
            cpu.of(&replicas),
            cpu.of(&["command".to_owned()]),
            cpu.elsewhere(),
            cpu.steal_s,
        )
    }

    /// The clone case on a fresh cluster: VM `vi` to `n` hosts, other
    /// racks first, then the source's rack.
    fn clone_case(&self, vi: usize, n: usize) -> anyhow::Result<Run> {
        let c = &self.topo.cluster;
        let vm = &c.vms[vi];
        let src = vm.host;
        let mut hosts: Vec<usize> = (0..c.hosts.len()).filter(|&h| h != src).collect();
        hosts.sort_by_key(|&h| (c.hosts[h].rack == c.hosts[src].rack, h));
        let dests: Vec<String> = hosts[..n]
            .iter()
            .map(|&h| c.hosts[h].name.clone())
            .collect();
        eprintln!("== clone: starting a fresh cluster");
        let cl = self.start_cluster("clone")?;
        eprintln!("== clone: {} to {}", vm.name, dests.join(","));
        let m = self.measured(
            &cl,
            &[
                "clone",
                "--vm",
                &vm.name,
                "--to",
                &dests.join(","),
                "--max-downtime",
                &self.args.max_downtime.to_string(),
                "--json",
            ],
            &self.out.join("logs").join("clone").join("clone.json"),
        )?;
        drop(cl);
        let rep = &m.rep;
        let vms = outcomes(&rep["clones"], |_| num(&rep["source_downtime_ms"]));
        Ok(Run {
            strategy: format!("clone {}:{n}", vm.name),
            ok: rep["ok"] == true,
            source_bytes: tx_of(&m.links, std::slice::from_ref(&c.hosts[src].name)),
            core_bytes: self.core_bytes(&m.links),
            eviction_s: num(&rep["total_s"]),
            total_s: num(&rep["total_s"]),
            vms,
            predicted: Predicted::default(),
            reported_source_bytes: num(&rep["source_bytes"]),
            phases: BTreeMap::new(),
            bytes_by_link: m.links,
            udp_drops: m.udp,
            shaper_drops: m.shaper_drops,
            cpu_text: String::new(),
            cpu: m.cpu,
        })
    }
}

/// Each VM of a report's list: its name, downtime and whether it was
/// verified.
fn outcomes(list: &Value, downtime: impl Fn(&Value) -> f64) -> Vec<VmOutcome> {
    list.as_array()
        .map(|v| {
            v.iter()
                .map(|x| VmOutcome {
                    name: x["name"].as_str().unwrap_or("").to_owned(),
                    downtime_ms: downtime(x),
                    verified: x["verified"] == true,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores, {} of memory, Linux {}",
        format_bytes(mem * 1024),
        kernel.trim()
    )
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

fn write_report(out: &Path, r: &Report, from: &[String]) -> anyhow::Result<()> {
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(r)?)?;
    let base = r.strategies.iter().find(|s| s.strategy == "precopy");
    let mut md = String::new();
    md.push_str("# pagecast evaluation\n\n");
    md.push_str(&format!(
        "- topology: `{}`\n- commit: {}\n- machine: {}\n- command: `{}`\n- multicast loss at every host: {}%\n- multicast delivery: {}\n- segmentation offloads on the veths: {}\n\n",
        r.topology,
        r.commit,
        r.machine,
        r.command,
        r.loss_pct,
        if r.multicast_flood { "flooded to every host (--flood)" } else { "to each group's members (IGMP snooping)" },
        if r.offloads_off { "off (counters count every packet's headers)" } else { "on (headers counted once per super-packet)" }
    ));
    md.push_str("Bytes are the interfaces' counters: source bytes leave the evacuated hosts' links, core bytes enter the core through the rack uplinks. Ratios are of precopy's.\n\n");
    md.push_str("| strategy | source bytes | vs precopy | core bytes | vs precopy | eviction | vs precopy | downtime min / median / max | verified | predicted source bytes | measured / predicted |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for s in &r.strategies {
        let mut d: Vec<f64> = s.vms.iter().map(|v| v.downtime_ms).collect();
        d.sort_by(f64::total_cmp);
        let (lo, med, hi) = if d.is_empty() {
            (0.0, 0.0, 0.0)
        } else {
            (d[0], d[d.len() / 2], d[d.len() - 1])
        };
        let verified = s.vms.iter().filter(|v| v.verified).count();
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.2} s | {} | {:.0} / {:.0} / {:.0} ms | {verified} of {} | {} | {} |\n",
            s.strategy,
            format_bytes(s.source_bytes),
            base.map_or("-".into(), |b| ratio(s.source_bytes as f64, b.source_bytes as f64)),
            format_bytes(s.core_bytes),
            base.map_or("-".into(), |b| ratio(s.core_bytes as f64, b.core_bytes as f64)),
            s.eviction_s,
            base.map_or("-".into(), |b| ratio(s.eviction_s, b.eviction_s)),
            lo,
            med,
            hi,
            s.vms.len(),
            s.predicted
                .source_bytes
                .map_or("-".into(), |p| format_bytes(p as u64)),
            s.predicted
                .source_bytes
                .map_or("-".into(), |p| ratio(s.source_bytes as f64, p)),
        ));
    }
    md.push_str(
        "\nCPU while each command ran (the emulated hosts share this machine's cores; a run \
         with every core busy was bound by CPU, not by its links; a process's figure includes \
         the kernel work of its own calls and faults, an agent's its guests' vCPUs):\n\n",
    );
    for s in &r.strategies {
        md.push_str(&format!("- {}: {}\n", s.strategy, s.cpu_text));
    }
    if let Some(cl) = &r.clone {
        md.push_str(&format!(
            "\n**{}**: {} from the source, {} into the core, {:.2} s, {} of {} clones verified.\n",
            cl.strategy,
            format_bytes(cl.source_bytes),
            format_bytes(cl.core_bytes),
            cl.total_s,
            cl.vms.iter().filter(|v| v.verified).count(),
            cl.vms.len()
        ));
    }
    if !r.together.is_empty() {
        md.push_str("\n**Jobs together** (pagecast, each job alone on a fresh cluster, then all started at once on another):\n\n| job's sources | destinations | eviction alone | together | together / alone | verified |\n|---|---|---|---|---|---|\n");
        for j in &r.together {
            md.push_str(&format!(
                "| {} | {} | {:.2} s | {:.2} s | {:.2}x | {} |\n",
                j.from.join(","),
                j.to.join(","),
                j.alone_s,
                j.together_s,
                j.slowdown(),
                if j.verified() { "yes" } else { "NO" }
            ));
        }
    }
    md.push_str("\nPlots: `bytes.svg` (bytes per link class), `downtime.svg` (per VM), `predicted.svg` (measured against predicted source bytes), `timeline-STRATEGY.svg` (each VM's phases over time).\n");
    std::fs::write(out.join("report.md"), md)?;
    if !r.strategies.is_empty() {
        plots(out, &r.strategies, from)?;
    }
    Ok(())
}

/// A grouped bar chart: one group per entry of `groups`, one bar per
/// series in each, written as SVG to `path`.
fn bars(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let top = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.35;
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let n = groups.len().max(1) as f64;
    // The band below zero holds each group's name, under its bars.
    let floor = -top * 0.08;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title}, {y_label}"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(10)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n, floor..top)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_label_formatter(&|y| {
            if *y < 0.0 {
                String::new()
            } else {
                format!("{y:.0}")
            }
        })
        .y_desc(y_label)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(groups.iter().enumerate().map(|(i, g)| {
            Text::new(
                g.clone(),
                (i as f64 + 0.5, floor * 0.35),
                ("sans-serif", 14)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Center)),
            )
        }))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let k = series.len().max(1) as f64;
    let width = 0.8 / k;
    for (si, (name, values)) in series.iter().enumerate() {
        let color = Palette99::pick(si).to_rgba();
        chart
            .draw_series(values.iter().enumerate().map(|(g, &v)| {
                let x0 = g as f64 + 0.1 + si as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], color.filled())
            }))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn plots(out: &Path, runs: &[Run], from: &[String]) -> anyhow::Result<()> {
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let names: Vec<String> = runs.iter().map(|r| r.strategy.clone()).collect();
    // Bytes per link class.
    let class = |r: &Run, f: &dyn Fn(&str, &LinkBytes) -> f64| -> f64 {
        r.bytes_by_link.iter().map(|(n, b)| f(n, b)).sum()
    };
    let is_source = |n: &str| {
        n.strip_prefix("host:")
            .is_some_and(|h| from.iter().any(|f| f == h))
    };
    let series = vec![
        (
            "source host links (sent)".to_owned(),
            runs.iter()
                .map(|r| {
                    mib(class(r, &|n, b| {
                        if is_source(n) { b.tx as f64 } else { 0.0 }
                    }))
                })
                .collect(),
        ),
        (
            "other host links (received)".to_owned(),
            runs.iter()
                .map(|r| {
                    mib(class(r, &|n, b| {
                        if n.starts_with("host:") && !is_source(n) {
                            b.rx as f64
                        } else {
                            0.0
                        }
                    }))
                })
                .collect(),
        ),
        (
            "rack uplinks (into the core)".to_owned(),
            runs.iter().map(|r| mib(r.core_bytes as f64)).collect(),
        ),
    ];
    bars(
        &out.join("bytes.svg"),
        "Bytes per link class",
        "MiB",
        &names,
        &series,
    )?;
    // Downtime per VM.
    let mut vms: Vec<String> = runs
        .iter()
        .flat_map(|r| r.vms.iter().map(|v| v.name.clone()))
        .collect();
    vms.sort();
    vms.dedup();
    let series: Vec<(String, Vec<f64>)> = runs
        .iter()
        .map(|r| {
            (
                r.strategy.clone(),
                vms.iter()
                    .map(|n| {
                        r.vms
                            .iter()
                            .find(|v| &v.name == n)
                            .map_or(0.0, |v| v.downtime_ms)
                    })
                    .collect(),
            )
        })
        .collect();
    bars(
        &out.join("downtime.svg"),
        "Downtime per VM",
        "ms",
        &vms,
        &series,
    )?;
    // Measured against predicted.
    let series = vec![
        (
            "measured source bytes".to_owned(),
            runs.iter().map(|r| mib(r.source_bytes as f64)).collect(),
        ),
        (
            "predicted source bytes".to_owned(),
            runs.iter()
                .map(|r| mib(r.predicted.source_bytes.unwrap_or(0.0)))
                .collect(),
        ),
    ];
    bars(
        &out.join("predicted.svg"),
        "Source bytes: measured (interface counters) and predicted (planner)",
        "MiB",
        &names,
        &series,
    )?;
    for r in runs {
        timeline(&out.join(format!("timeline-{}.svg", r.strategy)), r)?;
    }
    Ok(())
}

/// Each VM's phases over time in one run: a bar per VM, a colour per phase.
fn timeline(path: &Path, r: &Run) -> anyhow::Result<()> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    const PHASES: [&str; 8] = [
        "manifest",
        "held",
        "cast",
        "round 0",
        "pre-copy",
        "switchover",
        "done",
        "failed",
    ];
    let end = r
        .phases
        .values()
        .flat_map(|l| l.iter().map(|p| p.at_s))
        .fold(r.total_s, f64::max)
        .max(1e-3);
    let n = r.phases.len().max(1) as f64;
    let left = -end * 0.18;
    let root = SVGBackend::new(path, (900, 120 + 40 * r.phases.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: each VM's phases, seconds", r.strategy),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(10)
        .build_cartesian_2d(left..end * 1.3, 0f64..n)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_y_axis()
        .x_label_formatter(&|x| {
            if *x < 0.0 {
                String::new()
            } else {
                format!("{x:.1}")
            }
        })
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let names: Vec<&String> = r.phases.keys().collect();
    chart
        .draw_series(names.iter().enumerate().map(|(i, name)| {
            Text::new(
                (*name).clone(),
                (left * 0.95, i as f64 + 0.5),
                ("sans-serif", 14)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Left, VPos::Center)),
            )
        }))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (k, phase) in PHASES.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let mut bars = Vec::new();
        for (i, list) in r.phases.values().enumerate() {
            for (j, p) in list.iter().enumerate() {
                if p.phase != *phase {
                    continue;
                }
                let until = list.get(j + 1).map_or(p.at_s + end * 0.01, |q| q.at_s);
                bars.push(Rectangle::new(
                    [
                        (p.at_s, i as f64 + 0.2),
                        (until.max(p.at_s + end * 0.003), i as f64 + 0.8),
                    ],
                    color.filled(),
                ));
            }
        }
        if bars.is_empty() {
            continue;
        }
        chart
            .draw_series(bars)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(*phase)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
