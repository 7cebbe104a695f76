//! A local pagecast cluster made of real processes: three `index serve`
//! replicas and any number of `pagecast agent`s on loopback, each with its
//! log in a file, all killed when dropped. Processes can be killed
//! (SIGKILL), frozen (SIGSTOP) and thawed (SIGCONT), and restarted.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pagecast_channel::Role;
use pagecast_index::client::IndexClient;
use pagecast_proto::v1;

use crate::pagecast_bin;

/// A free TCP port on 127.0.0.1 for a process to bind later.
///
/// Ports come from below Linux's ephemeral range (32768 and up), so an
/// outgoing connection of another test cannot take one between this check
/// and the bind; each test process walks its own window (by pid), and a port
/// something already listens on is skipped.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 12_000;
    const SPAN: u32 = 20_000;
    let base = (std::process::id() % 100) * 200;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (base + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {LOW} and {}", LOW + SPAN)
}

/// Sends `sig` to a child process (SIGSTOP freezes it, connections open;
/// SIGCONT thaws it).
pub fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on a child we spawned and have not reaped; a stale
    // pid at worst gets ESRCH, which we ignore.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// One index replica.
pub struct Replica {
    /// Its raft id (1..=3).
    pub id: u64,
    /// Its address.
    pub addr: String,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// The cgroup it runs in, if any.
    group: Option<std::sync::Arc<crate::host::Group>>,
    extra: Vec<String>,
}

/// How one replica of [`IndexCluster::start_with`] runs.
#[derive(Default, Clone)]
pub struct ReplicaOpts {
    /// Its data directory (default: `replicaN` in the cluster's directory).
    pub data: Option<PathBuf>,
    /// A cgroup to run it in (so a [`crate::host::Partition`] can cut it off).
    pub group: Option<std::sync::Arc<crate::host::Group>>,
    /// More arguments of `index serve`.
    pub extra: Vec<String>,
    /// The IP it listens on (default 127.0.0.1).
    pub ip: Option<String>,
}

/// Three replicas of `pagecast index serve`.
pub struct IndexCluster {
    /// The replicas.
    pub reps: Vec<Replica>,
    peers: String,
    /// Shards.
    pub shards: u32,
}

impl IndexCluster {
    /// Starts three replicas of `shards` shards under `dir` and waits for
    /// every shard to have a leader.
    pub fn start(dir: &Path, shards: u32) -> IndexCluster {
        Self::start_with(dir, shards, vec![ReplicaOpts::default(); 3])
    }

    /// As [`IndexCluster::start`], replica `i` run as `opts[i]` says.
    pub fn start_with(dir: &Path, shards: u32, opts: Vec<ReplicaOpts>) -> IndexCluster {
        std::fs::create_dir_all(dir).expect("the cluster's directory");
        assert_eq!(opts.len(), 3, "three replicas");
        let reps: Vec<Replica> = opts
            .into_iter()
            .zip(1..=3)
            .map(|(o, id)| Replica {
                id,
                addr: format!("{}:{}", o.ip.as_deref().unwrap_or("127.0.0.1"), free_port()),
                dir: o.data.unwrap_or_else(|| dir.join(format!("replica{id}"))),
                log: dir.join(format!("replica{id}.log")),
                child: None,
                group: o.group,
                extra: o.extra,
            })
            .collect();
        let peers = reps
            .iter()
            .map(|r| format!("{}={}", r.id, r.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = IndexCluster {
            reps,
            peers,
            shards,
        };
        for i in 0..3 {
            c.spawn(i);
        }
        c.wait_leaders();
        c
    }

    /// As [`IndexCluster::start`], each replica in a cgroup of its own
    /// (named `{tag}-{pid}-{n}`), so that a [`crate::host::Partition`] can
    /// cut any one of them off; the groups, in replica order.
    pub fn start_in_groups(
        dir: &Path,
        shards: u32,
        tag: &str,
    ) -> (IndexCluster, Vec<std::sync::Arc<crate::host::Group>>) {
        let groups: Vec<std::sync::Arc<crate::host::Group>> = (1..=3)
            .map(|i| {
                std::sync::Arc::new(crate::host::Group::new(&format!(
                    "{tag}-{}-{i}",
                    std::process::id()
                )))
            })
            .collect();
        let opts = groups
            .iter()
            .map(|g| ReplicaOpts {
                group: Some(g.clone()),
                ..ReplicaOpts::default()
            })
            .collect();
        (Self::start_with(dir, shards, opts), groups)
    }

    /// Starts replica `i` (again).
    pub fn spawn(&mut self, i: usize) {
        let r = &mut self.reps[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&r.log)
            .expect("replica log");
        let mut cmd = match &r.group {
            Some(g) => g.command(&pagecast_bin()),
            None => Command::new(pagecast_bin()),
        };
        let child = cmd
            .args(["index", "serve", "--id", &r.id.to_string()])
            .args(["--listen", &r.addr, "--peers", &self.peers])
            .args(["--shards", &self.shards.to_string()])
            .args(["--raft-log", "warning", "--data"])
            .arg(&r.dir)
            .arg("--tls")
            .arg(crate::pki::node(&format!("index-{}", r.id), Role::Index))
            .args(&r.extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning a replica");
        r.child = Some(child);
    }

    /// Kills replica `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.reps[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The port replica `i` listens on.
    pub fn port(&self, i: usize) -> u16 {
        self.reps[i]
            .addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("HOST:PORT")
    }

    /// Whether replica `i`'s process runs (not exited by itself).
    pub fn running(&mut self, i: usize) -> bool {
        match &mut self.reps[i].child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Replica `i`'s process id, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.reps[i].child.as_ref().map(Child::id)
    }

    /// Replica `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> &Path {
        &self.reps[i].dir
    }

    /// Replica `i`'s log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.reps[i].log).unwrap_or_default()
    }

    /// Freezes replica `i` (SIGSTOP): its connections stay open.
    pub fn freeze(&self, i: usize) {
        if let Some(c) = &self.reps[i].child {
            signal(c, libc::SIGSTOP);
        }
    }

    /// Thaws replica `i` (SIGCONT).
    pub fn thaw(&self, i: usize) {
        if let Some(c) = &self.reps[i].child {
            signal(c, libc::SIGCONT);
        }
    }

    /// Every replica's address, comma-separated.
    pub fn addrs(&self) -> String {
        self.reps
            .iter()
            .map(|r| r.addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The replicas' logs.
    pub fn logs(&self) -> String {
        self.reps
            .iter()
            .map(|r| {
                format!(
                    "--- replica {}:\n{}",
                    r.id,
                    std::fs::read_to_string(&r.log).unwrap_or_default()
                )
            })
            .collect()
    }

    /// A client of every replica.
    pub fn client(&self) -> IndexClient {
        let mut c = IndexClient::new(&[self.addrs()], crate::pki::tls("operator", Role::Operator))
            .expect("addresses");
        c.timeout = Duration::from_secs(20);
        c
    }

    /// Status of replica `i`, or None if it does not answer.
    pub fn status(&self, i: usize) -> Option<v1::StatusResponse> {
        let mut c = IndexClient::new(
            &[self.reps[i].addr.clone()],
            crate::pki::tls("operator", Role::Operator),
        )
        .ok()?;
        c.attempt_timeout = Duration::from_millis(500);
        c.status_of(&self.reps[i].addr).ok()
    }

    /// The replica (index into `reps`) leading `shard`, among the running
    /// ones.
    pub fn leader_of(&self, shard: u32) -> Option<usize> {
        (0..3).filter(|i| self.reps[*i].child.is_some()).find(|i| {
            self.status(*i).is_some_and(|s| {
                s.shards
                    .iter()
                    .any(|x| x.shard == shard && x.role == "leader")
            })
        })
    }

    /// Waits (up to 30 s) for every shard to have a leader.
    pub fn wait_leaders(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if (0..self.shards).all(|s| self.leader_of(s).is_some()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no leaders after 30 s\n{}", self.logs());
    }
}

impl Drop for IndexCluster {
    fn drop(&mut self) {
        for i in 0..self.reps.len() {
            self.thaw(i);
            self.kill(i);
        }
    }
}

/// A `pagecast agent` process.
pub struct AgentProc {
    /// Its name.
    pub name: String,
    /// Its control address.
    pub addr: String,
    /// Its metrics address, if asked for.
    pub metrics: Option<String>,
    child: Child,
    log: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    dir: PathBuf,
    /// A prefix that runs it elsewhere (`nsenter ...`), or empty.
    wrap: Vec<String>,
}

impl AgentProc {
    /// Starts agent `name` (its host certificate from [`crate::pki`]) with
    /// its log in `dir` and `extra`
    /// arguments (e.g. `--index ADDRS --rack r1`); waits until it listens.
    pub fn start(dir: &Path, name: &str, extra: &[&str]) -> AgentProc {
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::spawn(dir, name, args, Vec::new(), None, "127.0.0.1:0", Vec::new())
    }

    /// As [`AgentProc::start`], run through `wrap` (a command prefix such
    /// as `nsenter -t PID -n -m -u --`, to run it in another host's
    /// namespaces) and listening on `listen`.
    pub fn start_in(
        dir: &Path,
        name: &str,
        listen: &str,
        wrap: Vec<String>,
        extra: &[&str],
    ) -> AgentProc {
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::spawn(dir, name, args, Vec::new(), None, listen, wrap)
    }

    /// As [`AgentProc::start`], with a Prometheus endpoint.
    pub fn start_with_metrics(dir: &Path, name: &str, extra: &[&str]) -> AgentProc {
        Self::start_with_env(dir, name, extra, &[])
    }

    /// As [`AgentProc::start_with_metrics`], with `env` set in its
    /// environment (e.g. `PAGECAST_FAILPOINT`).
    pub fn start_with_env(
        dir: &Path,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> AgentProc {
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let m = format!("127.0.0.1:{}", free_port());
        Self::spawn(dir, name, args, env, Some(m), "127.0.0.1:0", Vec::new())
    }

    fn spawn(
        dir: &Path,
        name: &str,
        args: Vec<String>,
        env: Vec<(String, String)>,
        metrics: Option<String>,
        listen: &str,
        wrap: Vec<String>,
    ) -> AgentProc {
        // A free port found by binding and closing can be taken by another
        // test before the agent binds it: pick another and try again.
        let mut metrics = metrics;
        for _ in 0..4 {
            match Self::try_spawn(
                dir,
                name,
                args.clone(),
                env.clone(),
                metrics.clone(),
                listen,
                wrap.clone(),
            ) {
                Ok(agent) => return agent,
                Err(log) if metrics.is_some() && log.contains("Address already in use") => {
                    metrics = Some(format!("127.0.0.1:{}", free_port()));
                }
                Err(log) => panic!("agent {name} did not start; log: {log}"),
            }
        }
        panic!("agent {name}: no free metrics port after 4 tries")
    }

    fn try_spawn(
        dir: &Path,
        name: &str,
        args: Vec<String>,
        env: Vec<(String, String)>,
        metrics: Option<String>,
        listen: &str,
        wrap: Vec<String>,
    ) -> Result<AgentProc, String> {
        let log = dir.join(format!("{name}.log"));
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(pagecast_bin());
                c
            }
            None => Command::new(pagecast_bin()),
        };
        cmd.args(["agent", "--name", name, "--listen", listen])
            .arg("--tls")
            .arg(crate::pki::node(name, Role::Host))
            .args(&args);
        if let Some(m) = &metrics {
            cmd.args(["--metrics", m]);
        }
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("agent log");
        // PAGECAST_TEST_AGENT_LOG: the agents' log filter (default info).
        let filter = std::env::var("PAGECAST_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into());
        let mut child = cmd
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", filter)
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .expect("spawning an agent");
        // The first line within a minute: an agent that hangs before it
        // listens fails the test with its log instead of stalling it.
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(60)) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "printed nothing within 60 s; {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        };
        let Some(addr) = line.trim().strip_prefix("listening on ").map(str::to_owned) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "printed {line:?}; {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        };
        Ok(AgentProc {
            name: name.to_owned(),
            addr,
            metrics,
            child,
            log,
            args,
            env,
            dir: dir.to_owned(),
            wrap,
        })
    }

    /// Kills the agent (SIGKILL) and starts it again with the same name,
    /// arguments and address, as a host keeps its address (a crash and
    /// restart: it comes back with no VMs).
    pub fn restart(&mut self) {
        self.kill();
        let again = Self::spawn(
            &self.dir,
            &self.name,
            self.args.clone(),
            self.env.clone(),
            self.metrics.clone(),
            &self.addr.clone(),
            self.wrap.clone(),
        );
        *self = again;
    }

    /// As [`AgentProc::restart`], with `env` as its environment's additions
    /// from now on (empty: none).
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.restart();
    }

    /// Waits (up to `within`) for the process to exit by itself; its exit
    /// status, or `None` if it still runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + within;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the agent (SIGKILL).
    pub fn kill(&mut self) {
        signal(&self.child, libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freezes the agent (SIGSTOP): its connections stay open.
    pub fn freeze(&self) {
        signal(&self.child, libc::SIGSTOP);
    }

    /// Thaws the agent (SIGCONT).
    pub fn thaw(&self) {
        signal(&self.child, libc::SIGCONT);
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of a counter or gauge on its metrics endpoint (0 if the
    /// metric has not appeared yet).
    pub fn metric(&self, name: &str) -> f64 {
        let addr = self.metrics.as_ref().expect("started with metrics");
        let Ok(mut s) = std::net::TcpStream::connect(addr) else {
            return 0.0;
        };
        use std::io::{Read, Write};
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(
            s,
            "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        );
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts micro-VM `name` on the agent at address `agent` from synthetic
/// `profile` with `memory` (e.g. "64MiB"; `extra`: more `vm start`
/// arguments, e.g. `--dirty-rate`); panics with the agent's answer if it
/// does not start.
pub fn start_vm(dir: &Path, agent: &str, name: &str, profile: &str, memory: &str, extra: &[&str]) {
    let mut args = vec![
        "vm",
        "start",
        "--agent",
        agent,
        "--name",
        name,
        "--synthetic",
        profile,
        "--memory",
        memory,
    ];
    args.extend_from_slice(extra);
    let out = cli(dir, &args);
    assert!(
        out.status.success(),
        "vm start {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `pagecast` as the test operator, in `dir`; returns its output.
pub fn cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(pagecast_bin())
        .args(args)
        .current_dir(dir)
        .env("PAGECAST_TLS", crate::pki::operator())
        .env_remove("PAGECAST_INDEX")
        .output()
        .expect("running pagecast")
}

/// Runs `pagecast ... --json` as the test operator, requires success and
/// parses its output.
pub fn cli_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = cli(dir, args);
    assert!(
        out.status.success(),
        "pagecast {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "pagecast {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Polls `f` every 100 ms until it returns `Some`, or panics with `what`
/// and the last `Err` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("{what}: not within {timeout:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Whether the index lists for `agent`'s host exactly what the agent's
/// audit says its VMs hold (a fresh hash of micro-VMs' memory, adopted QEMU
/// VMs as their last scan saw them), shard by shard, over `shards` shards.
pub fn index_exact(c: &mut IndexClient, agent: &AgentProc, shards: u32) -> Result<(), String> {
    let hosts = c.hosts(false).map_err(|e| e.to_string())?;
    let Some(host) = hosts.iter().find(|h| h.name == agent.name) else {
        return Err(format!("host {} is not in the index", agent.name));
    };
    let tls = crate::pki::tls("operator", Role::Operator);
    let audit = pagecast_agent_api::client::AgentClient::connect(&agent.addr, &tls)
        .and_then(|a| a.audit(shards, false))
        .map_err(|e| e.to_string())?;
    for s in 0..shards {
        let fresh = pagecast_index::holders::HoldingSum::decode(&audit.fresh[s as usize])
            .ok_or("bad audit")?;
        let listed = c.holdings(s, host.index).map_err(|e| e.to_string())?;
        if fresh != listed {
            return Err(format!(
                "{} shard {s}: memory holds {} contents in {} frames, the index lists {} in {} \
                 ({} hot frames left out)",
                agent.name,
                fresh.distinct,
                fresh.frames,
                listed.distinct,
                listed.frames,
                audit.hot_frames
            ));
        }
    }
    Ok(())
}
