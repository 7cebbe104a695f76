//! The replica process: one RocksDB, one [`ShardNode`] thread per shard,
//! TCP links to the other replicas, and a listener for peers and clients.
//!
//! Threads, not tasks: each shard thread owns its raft node and blocks on
//! its event queue between ticks; each connection has a reader thread;
//! each peer has a sender thread with a bounded queue (a full queue drops
//! the message, which raft retransmits). Raft messages larger than a frame
//! are cut into parts of [`CHUNK`] bytes and reassembled up to
//! [`MAX_RAFT_MESSAGE_BYTES`] ([`crate::chunks`]); a snapshot's state goes
//! apart, fetched in parts by the replica receiving it
//! ([`crate::snapshot_in`]).

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagecast_proto::v1::{
    IndexFrame, IndexHello, IndexRequest, IndexResponse, RefusalCode, StatusResponse,
    index_frame::Kind, index_request::Op as ReqOp, index_response::Result as Resp,
};
use pagecast_proto::{MAX_RAFT_MESSAGE_BYTES, refusal};
use protobuf::Message as _;
use raft::eraftpb::Message;

use crate::node::{NodeConfig, NodeError, Reply, ShardNode, TICK};
use crate::snapshot_in::Descriptor;
use crate::store::{Store, StoreError};
use crate::wire::{WireError, read_frame, write_frame};
use pagecast_channel::gate::{Arrival, Gate, Limits, Refused};
use pagecast_channel::{Identity, Role, Tls, TlsStream};
use raft::eraftpb::MessageType;

/// Bytes of one raft message part.
pub const CHUNK: usize = 4 << 20;

/// Most client and peer connections served at once.
pub const MAX_CONNECTIONS: usize = 512;
/// Most connections served at once from one peer address.
pub const MAX_CONNECTIONS_PER_PEER: usize = 128;
/// Handshakes under way from one peer address, and in all: past either,
/// the oldest handshake is dropped to make room, so peers that connect and
/// say nothing hold no slot a real client needs.
pub const MAX_HANDSHAKES_PER_PEER: usize = 64;
/// See [`MAX_HANDSHAKES_PER_PEER`].
pub const MAX_HANDSHAKES: usize = 512;

/// How long a connection may take to say who it is (after TLS).
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client connection may stay silent between requests before
/// the replica closes it (clients reconnect on their next request).
pub const CLIENT_IDLE: Duration = Duration::from_secs(120);
/// How long a replica link may stay silent (raft heartbeats flow many
/// times a second on a live link).
const PEER_IDLE: Duration = Duration::from_secs(30);

/// How long a client request may wait for its shard.
const REQUEST_WAIT: Duration = Duration::from_secs(20);

/// Errors of starting a replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A shard's raft node could not start.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is inconsistent.
    #[error("{0}")]
    Config(String),
}

/// What one replica needs to run.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// This replica's id (a key of `peers`).
    pub id: u64,
    /// Where to listen for peers and clients.
    pub listen: String,
    /// Every replica's id and address, this one included.
    pub peers: BTreeMap<u64, String>,
    /// The RocksDB directory.
    pub data: PathBuf,
    /// Shards of the hash space (fixed when the cluster is created).
    pub shards: u32,
    /// Sync the raft log to disk on every append.
    pub sync: bool,
    /// Compact a shard's log once it holds this many applied entries...
    pub compact_after: u64,
    /// ... or once this many bytes were appended to it since the last time.
    pub compact_bytes: u64,
    /// raft-rs messages at or above this level go to standard error.
    pub raft_log_level: slog::Level,
    /// This replica's identity: an `index` certificate of the cluster CA.
    pub tls: Tls,
    /// How long one part of a snapshot this replica fetches may take
    /// before the fetch is given up (the next snapshot starts it again).
    pub part_deadline: Duration,
    /// A replica joining a running cluster: its shards start with no
    /// voters (it is not one until `index members add` makes it one), and
    /// `peers` are the members it was told of.
    pub join: bool,
    /// Voters of each shard in a new cluster, placed across the peers
    /// ([`crate::placement::initial_voters`]); 0: every peer votes in
    /// every shard.
    pub voters_per_shard: usize,
}

/// Who this replica's peers are and its link to each: fixed at start from
/// `--peers` (or the members a previous run recorded, or those a joined
/// replica was told of), changed as configuration changes apply.
struct Members {
    id: u64,
    shards: u32,
    tls: Tls,
    store: Arc<Store>,
    peers: std::sync::RwLock<BTreeMap<u64, String>>,
    links: std::sync::RwLock<BTreeMap<u64, Link>>,
}

/// The queue of a link's sender thread: (shard, encoded raft message).
type Link = SyncSender<(u32, Vec<u8>)>;

impl Members {
    fn new(
        id: u64,
        shards: u32,
        tls: Tls,
        store: Arc<Store>,
        peers: BTreeMap<u64, String>,
    ) -> Self {
        let m = Members {
            id,
            shards,
            tls,
            store,
            peers: std::sync::RwLock::new(BTreeMap::new()),
            links: std::sync::RwLock::new(BTreeMap::new()),
        };
        for (pid, addr) in peers {
            m.add(pid, addr);
        }
        m
    }

    fn peers(&self) -> BTreeMap<u64, String> {
        self.peers.read().expect("not poisoned").clone()
    }

    fn address(&self, id: u64) -> Option<String> {
        self.peers.read().expect("not poisoned").get(&id).cloned()
    }

    fn add(&self, id: u64, addr: String) {
        if id != self.id && !self.links.read().expect("not poisoned").contains_key(&id) {
            let link = spawn_link(self.id, id, addr.clone(), self.shards, self.tls.clone());
            self.links.write().expect("not poisoned").insert(id, link);
        }
        self.peers.write().expect("not poisoned").insert(id, addr);
    }

    /// A configuration change applied in some shard: `Some(address)` adds
    /// replica `id` (a link to it, recorded so that a restart knows it);
    /// `None` removed it from that shard's voters.
    fn apply(&self, id: u64, addr: Option<String>) {
        let Some(a) = addr else {
            // Kept in the address book: this replica cannot know whether
            // `id` still votes in shards it does not hold itself, and a
            // link to a stopped replica only retries.
            tracing::info!("replica {id} was removed from a shard's voters");
            return;
        };
        let new = self.address(id).as_deref() != Some(a.as_str());
        if new {
            tracing::info!("replica {id} at {a} is a member");
        }
        self.add(id, a);
        // Every shard applies the same addition: record it once.
        if (new || matches!(self.store.members(), Ok(None)))
            && let Err(e) = self.store.set_members(&format_peers(&self.peers()))
        {
            tracing::warn!("cannot record the members: {e}");
        }
    }

    fn send(&self, to: u64, shard: u32, bytes: Vec<u8>) {
        if let Some(link) = self.links.read().expect("not poisoned").get(&to) {
            // A full queue drops the message; raft sends it again.
            let _ = link.try_send((shard, bytes));
        }
    }
}

/// `1=HOST:PORT,2=HOST:PORT,...`, as [`parse_peers`] reads it.
pub fn format_peers(p: &BTreeMap<u64, String>) -> String {
    p.iter()
        .map(|(i, a)| format!("{i}={a}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses `1=HOST:PORT,2=HOST:PORT,...`.
pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected ID=HOST:PORT"))?;
        let id: u64 = id
            .trim()
            .parse()
            .ok()
            .filter(|i| *i > 0)
            .ok_or_else(|| format!("{part:?}: a replica id is a number from 1"))?;
        let addr = addr.trim();
        if addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(format!("{part:?}: expected HOST:PORT after the '='"));
        }
        if out.insert(id, addr.to_owned()).is_some() {
            return Err(format!("replica {id} is listed twice"));
        }
    }
    if out.is_empty() {
        return Err("no replicas listed".into());
    }
    Ok(out)
}

enum Event {
    Raft(Message),
    /// A replica opened a new link to this one.
    PeerConnected(u64),
    Request(IndexRequest, Reply),
    /// A snapshot's parts were all fetched and staged (the records), or
    /// fetching them failed.
    Staged(Descriptor, Result<u64, String>),
}

/// How long one snapshot part may take to arrive, by default.
pub const PART_DEADLINE: Duration = Duration::from_secs(30);

/// The snapshot a shard is receiving: a raft snapshot names its state,
/// which is fetched in parts from the replica that sent it on a thread of
/// its own (so the shard goes on ticking), and only then handed to raft.
struct Incoming {
    store: Arc<Store>,
    members: Arc<Members>,
    tls: Tls,
    tx: Sender<Event>,
    shard: u32,
    deadline: Duration,
    fetching: Option<Descriptor>,
    /// The raft snapshot whose state is being fetched, stepped once staged.
    pending: Option<Message>,
}

impl Incoming {
    fn on_raft(&mut self, m: Message, node: &mut ShardNode) {
        if m.get_msg_type() != MessageType::MsgSnapshot {
            return node.step(m);
        }
        let Some(d) = Descriptor::decode(&m.get_snapshot().data).filter(|d| {
            d.shard == self.shard
                && d.index == m.get_snapshot().get_metadata().index
                && d.term == m.get_snapshot().get_metadata().term
        }) else {
            tracing::warn!(
                "shard {}: a snapshot from replica {} does not name this shard's state; dropped",
                self.shard,
                m.from
            );
            return;
        };
        // Staged already, or nothing to fetch: the shard has applied that
        // far (a leader sends a snapshot again until it hears the first
        // was installed), and raft answers it at once.
        if node.applied() >= d.index || crate::snapshot_in::staged(&self.store, d) {
            return node.step(m);
        }
        if let Some(f) = self.fetching {
            if f == d {
                self.pending = Some(m);
            }
            return;
        }
        let Some(addr) = self.members.address(m.from) else {
            return;
        };
        tracing::info!(
            "shard {}: fetching snapshot {} from replica {} ({addr})",
            self.shard,
            d.index,
            m.from
        );
        self.fetching = Some(d);
        self.pending = Some(m);
        let (store, tls, tx) = (self.store.clone(), self.tls.clone(), self.tx.clone());
        let deadline = self.deadline;
        let spawned = std::thread::Builder::new()
            .name(format!("snapshot-{}", self.shard))
            .spawn(move || {
                let r = fetch_snapshot(&store, &addr, &tls, d, deadline);
                let _ = tx.send(Event::Staged(d, r));
            });
        if spawned.is_err() {
            self.fetching = None;
            self.pending = None;
        }
    }

    fn on_staged(&mut self, d: Descriptor, r: Result<u64, String>, node: &mut ShardNode) {
        if self.fetching == Some(d) {
            self.fetching = None;
        }
        let pending = self.pending.take();
        match r {
            Ok(n) => {
                tracing::info!(
                    "shard {}: snapshot {} staged ({n} records); installing",
                    self.shard,
                    d.index
                );
                if let Some(m) =
                    pending.filter(|m| Descriptor::decode(&m.get_snapshot().data) == Some(d))
                {
                    node.step(m);
                }
            }
            Err(e) => {
                tracing::warn!(
                    "shard {}: fetching snapshot {} failed: {e}; waiting for the leader to send one again",
                    self.shard,
                    d.index
                );
                self.store.clear_staging(self.shard);
            }
        }
    }
}

/// Fetches `d`'s parts from the replica at `addr` into the staging
/// directory, each part within `deadline`.
fn fetch_snapshot(
    store: &Store,
    addr: &str,
    tls: &Tls,
    d: Descriptor,
    deadline: Duration,
) -> Result<u64, String> {
    let mut c = crate::client::IndexClient::new(&[addr.to_owned()], tls.clone())
        .map_err(|e| e.to_string())?;
    c.timeout = deadline;
    c.attempt_timeout = deadline;
    crate::snapshot_in::stage(store, d, |after| {
        c.snapshot_part(addr, d.shard, d.index, after)
    })
    .map_err(|e| e.to_string())
}

/// A running replica.
pub struct Replica {
    addr: SocketAddr,
    store: Arc<Store>,
    stopped: Mutex<Receiver<Stopped>>,
}

/// A shard stopped because its storage failed: raft's state could not be
/// persisted, and there is no safe way on in this process (a RocksDB that
/// failed a write refuses every later one). The replica stops serving that
/// shard; whoever runs it decides what follows (`pagecast index serve`
/// waits for disk space and starts again when the disk was full).
#[derive(Debug)]
pub struct Stopped {
    /// The shard.
    pub shard: u32,
    /// What failed.
    pub error: NodeError,
}

impl Replica {
    /// Waits until a shard stops on a storage failure.
    pub fn wait_stopped(&self) -> Stopped {
        let rx = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        match rx.recv() {
            Ok(s) => s,
            // Every shard thread is gone without a word: not reachable, as
            // each holds a sender until it returns.
            Err(_) => loop {
                std::thread::park();
            },
        }
    }

    /// The replica's database (for measurements and maintenance).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The address the replica listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

fn resolve(a: &str) -> Option<SocketAddr> {
    a.to_socket_addrs().ok()?.next()
}

/// Opens the store, starts every shard and the listener, and returns once
/// the replica accepts connections. Its threads run until the process ends.
pub fn start(cfg: ReplicaConfig) -> Result<Replica, ReplicaError> {
    if !cfg.peers.contains_key(&cfg.id) {
        return Err(ReplicaError::Config(format!(
            "--id {} is not in --peers ({})",
            cfg.id,
            cfg.peers
                .keys()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if cfg.shards == 0 || cfg.shards > crate::keys::MAX_SHARDS {
        return Err(ReplicaError::Config(format!(
            "--shards must be 1 to {}, not {}",
            crate::keys::MAX_SHARDS,
            cfg.shards
        )));
    }
    let me = cfg.tls.identity();
    if me.role != Role::Index {
        return Err(ReplicaError::Config(format!(
            "a replica needs an index certificate (`pagecast ca issue --role index`); this one is {me}"
        )));
    }
    std::fs::create_dir_all(&cfg.data)
        .map_err(|e| ReplicaError::Config(format!("cannot create {}: {e}", cfg.data.display())))?;
    let store = Arc::new(Store::open(&cfg.data, cfg.id, cfg.shards, cfg.sync)?);
    let listener = TcpListener::bind(&cfg.listen)
        .and_then(|l| pagecast_channel::gate::deepen_backlog(&l).map(|()| l))
        .map_err(|source| ReplicaError::Listen {
            addr: cfg.listen.clone(),
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ReplicaError::Listen {
            addr: cfg.listen.clone(),
            source,
        })?;
    let members = Arc::new(Members::new(
        cfg.id,
        cfg.shards,
        cfg.tls.clone(),
        store.clone(),
        starting_members(&store, &cfg)?,
    ));
    let (stopped_tx, stopped_rx) = mpsc::channel();
    let shard_tx = spawn_shards(&cfg, &store, &members, &stopped_tx)?;
    let shared = Arc::new(Shared {
        id: cfg.id,
        shards: cfg.shards,
        members: members.clone(),
        shard_tx: Mutex::new(shard_tx),
        gate: Gate::new(Limits {
            handshakes_per_peer: MAX_HANDSHAKES_PER_PEER,
            handshakes: MAX_HANDSHAKES,
            open_per_peer: MAX_CONNECTIONS_PER_PEER,
            open: MAX_CONNECTIONS,
        }),
        tls: cfg.tls.clone(),
        store: store.clone(),
    });
    std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || accept_loop(&listener, &shared))
        .expect("spawn the accept thread");
    Ok(Replica {
        addr,
        store,
        stopped: Mutex::new(stopped_rx),
    })
}

/// The members this replica starts with: those its configuration changes
/// recorded, else `--peers` (or those a joining replica was told of).
fn starting_members(
    store: &Store,
    cfg: &ReplicaConfig,
) -> Result<BTreeMap<u64, String>, ReplicaError> {
    let Some(recorded) = store.members()? else {
        return Ok(cfg.peers.clone());
    };
    let recorded = parse_peers(&recorded)
        .map_err(|e| ReplicaError::Config(format!("the members this replica recorded: {e}")))?;
    if recorded != cfg.peers {
        tracing::info!(
            "members as recorded by configuration changes: {} (not --peers {})",
            format_peers(&recorded),
            format_peers(&cfg.peers)
        );
    }
    Ok(recorded)
}

/// Starts one thread per shard; returns the senders of their events.
fn spawn_shards(
    cfg: &ReplicaConfig,
    store: &Arc<Store>,
    members: &Arc<Members>,
    stopped_tx: &Sender<Stopped>,
) -> Result<Vec<Sender<Event>>, ReplicaError> {
    let logger = crate::node::raft_logger(cfg.raft_log_level);
    // A shard's voters when it starts for the first time: placed across
    // the peers, or none for a replica joining (it becomes one by a
    // configuration change). Later starts take them from its stored state.
    let ids: Vec<u64> = cfg.peers.keys().copied().collect();
    let mut shard_tx = Vec::new();
    for s in 0..cfg.shards {
        let voters = if cfg.join {
            Vec::new()
        } else {
            crate::placement::initial_voters(&ids, s, cfg.voters_per_shard)
        };
        let mut ncfg = NodeConfig::new(cfg.id, voters);
        ncfg.compact_after = cfg.compact_after;
        ncfg.compact_bytes = cfg.compact_bytes;
        ncfg.keep_entries = ncfg.keep_entries.min(cfg.compact_after / 2);
        let node = ShardNode::new(store.clone(), s, ncfg, &logger)?;
        let (tx, rx) = mpsc::channel();
        let incoming = Incoming {
            store: store.clone(),
            members: members.clone(),
            tls: cfg.tls.clone(),
            tx: tx.clone(),
            shard: s,
            deadline: cfg.part_deadline,
            fetching: None,
            pending: None,
        };
        shard_tx.push(tx);
        let m = members.clone();
        let stopped = stopped_tx.clone();
        std::thread::Builder::new()
            .name(format!("shard-{s}"))
            .spawn(move || run_shard(node, incoming, rx, &m, &stopped))
            .expect("spawn a shard thread");
    }
    Ok(shard_tx)
}

/// Accepts connections for good: each handshake enters the gate (which
/// may drop older idle ones, by shutting their sockets) and is served on
/// a thread of its own.
fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let Ok(from) = conn.peer_addr() else { continue };
        let Ok(handle) = conn.try_clone() else {
            continue;
        };
        let evict = Box::new(move || {
            let _ = handle.shutdown(std::net::Shutdown::Both);
        });
        let (arrival, dropped) = shared.gate.arrive(from.ip(), evict);
        if dropped > 0 {
            metrics::counter!(crate::metrics::OVER_LIMIT).increment(dropped as u64);
        }
        let sh = shared.clone();
        let _ = std::thread::Builder::new().name("conn".into()).spawn(move || {
            let peer = from.to_string();
            if let Err(e) = serve_conn(&sh, conn, arrival, &peer) {
                let quiet = matches!(&e, WireError::Io { source, .. }
                    if matches!(source.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset));
                if !quiet {
                    tracing::warn!("connection from {e}");
                }
            }
        });
    }
}

struct Shared {
    id: u64,
    shards: u32,
    members: Arc<Members>,
    shard_tx: Mutex<Vec<Sender<Event>>>,
    gate: Arc<Gate>,
    tls: Tls,
    store: Arc<Store>,
}

impl Shared {
    fn send(&self, shard: u32, ev: Event) -> bool {
        let tx = self.shard_tx.lock().expect("not poisoned")[shard as usize].clone();
        tx.send(ev).is_ok()
    }
}

fn run_shard(
    mut node: ShardNode,
    mut incoming: Incoming,
    rx: Receiver<Event>,
    members: &Members,
    stopped: &Sender<Stopped>,
) {
    let shard = node.shard();
    let mut next_tick = Instant::now() + TICK;
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        let handle = |ev: Event, node: &mut ShardNode, incoming: &mut Incoming| match ev {
            Event::Raft(m) => incoming.on_raft(m, node),
            Event::PeerConnected(id) => node.peer_connected(id),
            Event::Request(r, reply) => node.request(r, reply),
            Event::Staged(d, r) => incoming.on_staged(d, r, node),
        };
        match rx.recv_timeout(wait) {
            Ok(ev) => {
                handle(ev, &mut node, &mut incoming);
                // Take whatever else is queued before one ready round.
                for _ in 0..1024 {
                    match rx.try_recv() {
                        Ok(ev) => handle(ev, &mut node, &mut incoming),
                        Err(_) => break,
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if Instant::now() >= next_tick {
            node.tick();
            next_tick += TICK;
            if next_tick < Instant::now() {
                next_tick = Instant::now() + TICK;
            }
        }
        // A leader's appends go out before it writes its own log, so the
        // replicas' log writes overlap. raft-rs allows it: a majority of
        // voters commits an entry, and the leader applies one only once it
        // has written it too.
        match node.ready_sending(&mut |msgs| send_raft(shard, msgs, members)) {
            Ok(msgs) => {
                // Members changed by configuration changes just applied:
                // links to added replicas exist before messages go to them.
                for (id, addr) in node.take_member_changes() {
                    members.apply(id, addr);
                }
                send_raft(shard, msgs, members);
            }
            Err(error) => {
                // Storage failing under raft leaves no safe way on: stop
                // serving the shard rather than serve from a state that
                // cannot be persisted, and say so to whoever runs us.
                tracing::error!("shard {shard}: {error}; this replica stops serving it");
                let _ = stopped.send(Stopped { shard, error });
                return;
            }
        }
    }
}

/// Hands `msgs` of `shard` to the links to their replicas.
fn send_raft(shard: u32, msgs: Vec<Message>, members: &Members) {
    for m in msgs {
        let bytes = m.write_to_bytes().expect("encodes");
        if bytes.len() > MAX_RAFT_MESSAGE_BYTES {
            // The peer would refuse it; say why here.
            tracing::warn!(
                "shard {shard}: a {:?} to replica {} is {} bytes, over the \
                 {MAX_RAFT_MESSAGE_BYTES} a raft message may carry; not sent",
                m.get_msg_type(),
                m.to,
                bytes.len()
            );
            continue;
        }
        members.send(m.to, shard, bytes);
    }
}

/// Starts the sender thread of the link to replica `to` at `addr`.
fn spawn_link(me: u64, to: u64, addr: String, shards: u32, tls: Tls) -> SyncSender<(u32, Vec<u8>)> {
    let (tx, rx) = mpsc::sync_channel::<(u32, Vec<u8>)>(4096);
    std::thread::Builder::new()
        .name(format!("link-{to}"))
        .spawn(move || {
            let mut conn: Option<BufWriter<TlsStream>> = None;
            let mut warned = false;
            let mut next_try = Instant::now();
            let mut queued: Option<(u32, Vec<u8>)> = None;
            loop {
                let (shard, bytes) = match queued.take() {
                    Some(m) => m,
                    None => match rx.recv() {
                        Ok(m) => m,
                        Err(_) => return,
                    },
                };
                if conn.is_none() && Instant::now() >= next_try {
                    conn = connect_peer(me, &addr, shards, &tls);
                    match (&conn, warned) {
                        (None, false) => {
                            tracing::warn!("replica {to} at {addr} is unreachable; retrying");
                            warned = true;
                        }
                        (Some(_), true) => {
                            tracing::info!("replica {to} at {addr} is reachable again");
                            warned = false;
                        }
                        _ => {}
                    }
                    if conn.is_none() {
                        next_try = Instant::now() + Duration::from_millis(200);
                    }
                }
                let Some(w) = conn.as_mut() else { continue };
                let mut ok = send_chunks(w, shard, &bytes, &addr).is_ok();
                if ok {
                    // Flush only when nothing else is waiting, so bursts
                    // share writes.
                    match rx.try_recv() {
                        Ok(m) => queued = Some(m),
                        Err(_) => ok = w.flush().is_ok(),
                    }
                }
                if !ok {
                    conn = None;
                }
            }
        })
        .expect("spawn a link thread");
    tx
}

fn connect_peer(me: u64, addr: &str, shards: u32, tls: &Tls) -> Option<BufWriter<TlsStream>> {
    let sa = resolve(addr)?;
    let s = TcpStream::connect_timeout(&sa, Duration::from_millis(500)).ok()?;
    s.set_nodelay(true).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    let s = match tls.connect(s) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("replica link to {addr}: {e}");
            return None;
        }
    };
    if let Err(e) = pagecast_channel::require(s.identity(), &[Role::Index], addr, "be a replica") {
        tracing::warn!("{e}");
        return None;
    }
    let mut w = BufWriter::with_capacity(256 << 10, s);
    let hello = IndexFrame {
        kind: Some(Kind::Hello(IndexHello {
            peer_id: me,
            shards,
        })),
    };
    write_frame(&mut w, &hello, addr).ok()?;
    Some(w)
}

fn send_chunks(w: &mut impl Write, shard: u32, bytes: &[u8], addr: &str) -> Result<(), WireError> {
    for c in crate::chunks::split(shard, bytes, CHUNK) {
        let f = IndexFrame {
            kind: Some(Kind::Raft(c)),
        };
        write_frame(w, &f, addr)?;
    }
    Ok(())
}

fn serve_conn(sh: &Shared, conn: TcpStream, arrival: Arrival, peer: &str) -> Result<(), WireError> {
    conn.set_nodelay(true).ok();
    conn.set_write_timeout(Some(Duration::from_secs(10))).ok();
    let s = match sh.tls.accept(conn) {
        Ok(s) => s,
        Err(e) => {
            metrics::counter!(crate::metrics::REFUSED).increment(1);
            tracing::warn!("refused {peer}: {e}");
            return Ok(());
        }
    };
    // Held while the connection is served.
    let _slot = match arrival.admit() {
        Ok(slot) => slot,
        Err(Refused::Evicted) => {
            tracing::debug!("dropped {peer}'s handshake to make room for newer ones");
            return Ok(());
        }
        Err(e @ Refused::Full) => {
            metrics::counter!(crate::metrics::OVER_LIMIT).increment(1);
            tracing::warn!("turned away {peer}: {e}");
            return Ok(());
        }
    };
    s.socket().set_read_timeout(Some(HELLO_TIMEOUT)).ok();
    let who = s.identity().clone();
    let mut r = std::io::BufReader::with_capacity(256 << 10, s);
    let first = crate::wire::read_hello(&mut r, peer)?;
    let Some(Kind::Hello(hello)) = first.kind else {
        tracing::warn!("{peer}: the first frame must be a hello; closing");
        return Ok(());
    };
    if hello.peer_id == 0 {
        r.get_ref()
            .socket()
            .set_read_timeout(Some(CLIENT_IDLE))
            .ok();
        return serve_client(sh, r, peer, &who);
    }
    r.get_ref().socket().set_read_timeout(Some(PEER_IDLE)).ok();
    if who.role != Role::Index {
        metrics::counter!(crate::metrics::FORBIDDEN).increment(1);
        tracing::warn!("{peer}: {who} may not speak raft (only index certificates); closing");
        return Ok(());
    }
    if sh.members.address(hello.peer_id).is_none() || hello.peer_id == sh.id {
        tracing::warn!("{peer}: replica {} is not a member; closing", hello.peer_id);
        return Ok(());
    }
    if hello.shards != sh.shards {
        tracing::warn!(
            "{peer}: replica {} has {} shards, this one {}; closing",
            hello.peer_id,
            hello.shards,
            sh.shards
        );
        return Ok(());
    }
    for s in 0..sh.shards {
        sh.send(s, Event::PeerConnected(hello.peer_id));
    }
    let mut parts = crate::chunks::Reassembler::new(sh.shards);
    loop {
        let f = read_frame(&mut r, peer)?;
        let Some(Kind::Raft(c)) = f.kind else {
            tracing::warn!(
                "{peer}: replica {} sent a non-raft frame; closing",
                hello.peer_id
            );
            return Ok(());
        };
        let (shard, bytes) = match parts.push(c) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("{peer}: {e}; closing");
                return Ok(());
            }
        };
        match Message::parse_from_bytes(&bytes) {
            Ok(m) if m.from == hello.peer_id && m.to == sh.id => {
                sh.send(shard, Event::Raft(m));
            }
            Ok(m) => tracing::warn!(
                "{peer}: dropped a raft message from {} to {} on a link from replica {}",
                m.from,
                m.to,
                hello.peer_id
            ),
            Err(e) => {
                tracing::warn!("{peer}: undecodable raft message: {e}; closing");
                return Ok(());
            }
        }
    }
}

fn ask(sh: &Shared, shard: u32, req: IndexRequest) -> IndexResponse {
    let (tx, rx) = mpsc::channel();
    let reply: Reply = Box::new(move |r| {
        let _ = tx.send(r);
    });
    if !sh.send(shard, Event::Request(req, reply)) {
        return err(RefusalCode::Unavailable, "the shard is not running");
    }
    match rx.recv_timeout(REQUEST_WAIT) {
        Ok(r) => r,
        Err(_) => err(RefusalCode::Busy, "the shard did not answer in time"),
    }
}

/// Serves a part of a snapshot this replica sent, from its checkpoint, on
/// the connection's thread (the shard's thread goes on).
fn serve_snapshot_part(
    sh: &Shared,
    shard: u32,
    p: &pagecast_proto::v1::SnapshotPartRequest,
) -> IndexResponse {
    // A position is a range number and a key of at most 33 bytes.
    if p.after.len() > 64 {
        return err(
            RefusalCode::Invalid,
            "a snapshot part position over 64 bytes",
        );
    }
    match sh
        .store
        .snapshot_part(shard, p.index, &p.after, crate::store::SNAPSHOT_PART_BYTES)
    {
        Ok(Some((records, next))) => IndexResponse {
            result: Some(Resp::SnapshotPart(
                pagecast_proto::v1::SnapshotPartResponse {
                    records: records.into(),
                    done: next.is_none(),
                    next: next.unwrap_or_default().into(),
                },
            )),
        },
        Ok(None) => err(
            RefusalCode::NotFound,
            &format!(
                "replica {} no longer has snapshot {} of shard {shard}",
                sh.id, p.index
            ),
        ),
        Err(e) => err(RefusalCode::Internal, &format!("snapshot part: {e}")),
    }
}

fn err(code: RefusalCode, m: &str) -> IndexResponse {
    IndexResponse {
        result: Some(Resp::Error(refusal(code, m))),
    }
}

fn serve_client(
    sh: &Shared,
    mut r: std::io::BufReader<TlsStream>,
    peer: &str,
    who: &Identity,
) -> Result<(), WireError> {
    let mut host_number = None;
    loop {
        let f = read_frame(&mut r, peer)?;
        let resp = match f.kind {
            Some(Kind::Request(req)) => match authorize(sh, &req, who, &mut host_number) {
                Ok(()) => handle_request(sh, bind_session(req, who)),
                Err(why) => {
                    metrics::counter!(crate::metrics::FORBIDDEN).increment(1);
                    tracing::warn!("{peer}: refused: {why}");
                    err(RefusalCode::Forbidden, &why)
                }
            },
            _ => err(RefusalCode::Invalid, "expected a request"),
        };
        let out = IndexFrame {
            kind: Some(Kind::Response(resp)),
        };
        write_frame(r.get_mut(), &out, peer)?;
    }
}

/// Whether `who` may make `req`: anyone may read counts and look up
/// hashes it names; only an operator lists a host's holdings (its page
/// hashes), and a host its own; operators may write anything (loads,
/// unloads, repairs); a host may write only its own records and holders;
/// readers and replicas may not write.
fn authorize(
    sh: &Shared,
    req: &IndexRequest,
    who: &Identity,
    host_number: &mut Option<u32>,
) -> Result<(), String> {
    if let Some(ReqOp::Members(m)) = &req.op {
        return match who.role {
            Role::Operator => Ok(()),
            _ => Err(format!(
                "{who} may not change the index's members (replica {} / {}): operators do",
                m.add_id, m.remove_id
            )),
        };
    }
    if matches!(req.op, Some(ReqOp::SnapshotPart(_))) {
        // A shard's whole state, page hashes and all: replicas only.
        return match who.role {
            Role::Index => Ok(()),
            _ => Err(format!("{who} may not read a snapshot (replicas do)")),
        };
    }
    if let Some(ReqOp::ListHoldings(l)) = &req.op {
        return match who.role {
            Role::Operator => Ok(()),
            Role::Host if my_number(sh, who, host_number)? == l.host => Ok(()),
            _ => Err(format!(
                "{who} may not list the page hashes host number {} holds",
                l.host
            )),
        };
    }
    let Some(ReqOp::Write(cmd)) = &req.op else {
        return Ok(());
    };
    match who.role {
        Role::Operator => return Ok(()),
        Role::Host => {}
        Role::Reader | Role::Index => return Err(format!("{who} may not write to the index")),
    }
    use pagecast_proto::v1::index_command::Op;
    let Some(op) = &cmd.op else { return Ok(()) };
    let named = |name: &str| {
        if name == who.name {
            Ok(())
        } else {
            Err(format!("{who} may not write the records of host {name:?}"))
        }
    };
    match op {
        Op::RegisterHost(r) => return named(&r.name),
        Op::HostReport(r) => return named(&r.name),
        Op::SetCordon(c) => {
            return Err(format!(
                "{who} may not cordon or uncordon hosts (host {:?}): operators do",
                c.name
            ));
        }
        _ => {}
    }
    // The rest name hosts by number: find this host's.
    let mine = my_number(sh, who, host_number)?;
    let numbers: Vec<u32> = match op {
        Op::Deltas(d) => d.deltas.iter().map(|d| d.host).collect(),
        Op::BeginVm(b) => vec![b.vm.as_ref().map_or(0, |v| v.host)],
        Op::PutVm(p) => vec![p.vm.as_ref().map_or(0, |v| v.host)],
        Op::SetVmState(v) => vec![v.host],
        Op::RemoveVm(v) => vec![v.host],
        Op::DropVm(v) => vec![v.host],
        Op::MoveVm(v) => vec![v.from],
        Op::RegisterHost(_) | Op::HostReport(_) | Op::SetCordon(_) => Vec::new(),
    };
    match numbers.iter().find(|&&n| n != mine) {
        None => Ok(()),
        Some(n) => Err(format!(
            "{who} (host number {mine}) may not write the holders or records of host number {n}"
        )),
    }
}

/// A writer session belongs to the identity that opened it: the session
/// id a write names is bound to its writer's certificate (name and role),
/// so no other writer can acknowledge, and so suppress, its batches
/// (session ids are computed from public data: host, VM, generation).
/// The same writer retrying through any replica gets the same session.
fn bind_session(mut req: IndexRequest, who: &Identity) -> IndexRequest {
    if let Some(ReqOp::Write(cmd)) = &mut req.op
        && cmd.client != 0
    {
        cmd.client = session_of(who, cmd.client);
    }
    req
}

/// The session id writer `who` gets for the id `named`.
fn session_of(who: &Identity, named: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"pagecast index writer session\0");
    h.update(who.role.to_string().as_bytes());
    h.update(b"\0");
    h.update(who.name.as_bytes());
    h.update(b"\0");
    h.update(&named.to_le_bytes());
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes")) | 1
}

/// The number of host `who` in the index (looked up once a connection).
fn my_number(sh: &Shared, who: &Identity, host_number: &mut Option<u32>) -> Result<u32, String> {
    if let Some(n) = *host_number {
        return Ok(n);
    }
    let hosts = sh
        .store
        .hosts()
        .map_err(|e| format!("cannot read hosts: {e}"))?;
    let Some(h) = hosts.iter().find(|h| h.name == who.name) else {
        return Err(format!(
            "{who} is not registered in the index yet (report the host first)"
        ));
    };
    *host_number = Some(h.index);
    Ok(h.index)
}

fn handle_request(sh: &Shared, req: IndexRequest) -> IndexResponse {
    if matches!(req.op, Some(ReqOp::Status(_))) {
        let mut all = StatusResponse {
            replica: sh.id,
            shards: Vec::new(),
            peers: sh
                .members
                .peers()
                .iter()
                .map(|(i, a)| format!("{i}={a}"))
                .collect(),
        };
        for s in 0..sh.shards {
            match ask(sh, s, req.clone()).result {
                Some(Resp::Status(st)) => all.shards.extend(st.shards),
                Some(Resp::Error(e)) => {
                    return IndexResponse {
                        result: Some(Resp::Error(e)),
                    };
                }
                _ => return err(RefusalCode::Internal, "unexpected status answer"),
            }
        }
        if matches!(&req.op, Some(ReqOp::Status(r)) if r.exact) {
            for st in &mut all.shards {
                match sh.store.count_distinct(st.shard) {
                    Ok(n) => {
                        st.distinct_hashes = n;
                        st.distinct_exact = true;
                    }
                    Err(e) => {
                        return err(
                            RefusalCode::Internal,
                            &format!("cannot count shard {}'s hashes: {e}", st.shard),
                        );
                    }
                }
            }
        }
        return IndexResponse {
            result: Some(Resp::Status(all)),
        };
    }
    if req.shard < sh.shards
        && let Some(ReqOp::SnapshotPart(p)) = &req.op
    {
        return serve_snapshot_part(sh, req.shard, p);
    }
    if req.shard >= sh.shards {
        return err(
            RefusalCode::Invalid,
            &format!(
                "shard {} does not exist: this cluster has {} shards",
                req.shard, sh.shards
            ),
        );
    }
    let mut resp = ask(sh, req.shard, req);
    if let Some(Resp::NotLeader(nl)) = &mut resp.result
        && let Some(a) = sh.members.address(nl.leader)
    {
        nl.leader_addr = a;
    }
    resp
}
