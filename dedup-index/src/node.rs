//! One shard's raft-rs `RawNode` and the requests waiting on it.
//!
//! A [`ShardNode`] knows nothing of sockets: the caller feeds it ticks, raft
//! messages from peers and client requests, and sends the raft messages
//! [`ShardNode::ready`] returns. The replica process drives one per shard
//! from a thread; tests drive several through a lossy in-process network.
//!
//! Writes are proposed on the leader and answered once their entry is
//! committed and applied here. Linearizable reads go through ReadIndex and
//! are answered once this replica has applied up to the read index; stale
//! reads are answered at once from the applied state.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagecast_proto::v1::{
    HoldingsResponse, HostHolding, HostsResponse, IndexCommand, IndexRequest, IndexResponse,
    ListHoldingsResponse, LookupResponse, NotLeader, Refusal, RefusalCode, ShardStatus,
    VmsResponse, index_request::Op as ReqOp, index_response::Result as Resp,
};
use pagecast_proto::{HASH_LEN, MAX_INDEX_BATCH, refusal};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, EntryType, Message, MessageType};
use raft::{RawNode, StateRole};

use crate::command::Command;
use crate::raftlog::ShardStorage;
use crate::store::{Store, StoreError};
use crate::{PageHash, sharing};

/// Sends a response back to whoever asked.
pub type Reply = Box<dyn FnOnce(IndexResponse) + Send>;

/// Tuning of one shard's raft group.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This replica's id.
    pub id: u64,
    /// Every replica's id, this one included.
    pub voters: Vec<u64>,
    /// Ticks without a leader before an election (randomised up to twice).
    pub election_ticks: usize,
    /// Ticks between heartbeats.
    pub heartbeat_ticks: usize,
    /// Compact the log once this many applied entries are in it.
    pub compact_after: u64,
    /// ... or once this many bytes of entries were appended since the last
    /// compaction (big batches reach a byte bound long before an entry
    /// bound).
    pub compact_bytes: u64,
    /// Applied entries left in the log after compaction, for followers
    /// slightly behind.
    pub keep_entries: u64,
    /// How long a proposal or read may wait before it is answered with an
    /// error (the client then retries).
    pub request_timeout: Duration,
}

impl NodeConfig {
    /// Defaults for replica `id` of `voters`: 50 ms ticks make elections
    /// start 0.5 to 1 s after the leader goes quiet.
    pub fn new(id: u64, voters: Vec<u64>) -> Self {
        NodeConfig {
            id,
            voters,
            election_ticks: 10,
            heartbeat_ticks: 2,
            compact_after: 512,
            compact_bytes: 32 << 20,
            keep_entries: 64,
            // Below the client's attempt timeout, so a client hears "busy"
            // from a live leader before it gives up on it.
            request_timeout: Duration::from_millis(1500),
        }
    }
}

/// Most holder lists one holdings listing reads (a page of the listing
/// ends there even if it found fewer pairs than asked).
const LIST_SCAN: usize = 65_536;

/// How often the runtime should call [`ShardNode::tick`].
pub const TICK: Duration = Duration::from_millis(50);

/// Errors of a shard node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// raft-rs refused.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A proposed write, waiting for the entry raft placed it at.
struct Waiting {
    /// The term it was proposed in: an entry at the same index from
    /// another term means it was overwritten by another leader's log.
    term: u64,
    /// Everyone waiting for this entry: the proposer, and clients that
    /// resent the same (client, seq) while it was in flight.
    replies: Vec<Reply>,
    since: Instant,
}

struct Read {
    op: ReqOp,
    reply: Reply,
    since: Instant,
}

/// Counters shown by `index status`.
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeCounters {
    /// Snapshots this replica sent.
    pub snapshots_sent: u64,
    /// Snapshots this replica installed.
    pub snapshots_received: u64,
}

/// One shard's raft group member.
pub struct ShardNode {
    node: RawNode<ShardStorage>,
    store: Arc<Store>,
    shard: u32,
    cfg: NodeConfig,
    /// Context of the next ReadIndex request.
    next_ctx: u64,
    /// Writes proposed here, by the log index of their entry. (Not by a
    /// counter carried in the entry: a new leader commits its
    /// predecessors' entries, whose counters may equal its own.)
    proposals: HashMap<u64, Waiting>,
    /// Session writes proposed here and not yet applied: (client, seq) ->
    /// (log index, term). A client that resends a write still in flight
    /// (its answer was late) waits for the same entry instead of a second
    /// one; under load that keeps resends from adding raft work.
    in_flight: HashMap<(u64, u64), (u64, u64)>,
    /// The same, by log index, to forget them once applied.
    in_flight_at: std::collections::BTreeMap<u64, (u64, u64)>,
    reads: HashMap<u64, Read>,
    /// Reads whose read index is known, waiting for apply.
    ready_reads: Vec<(u64, Read)>,
    applied: u64,
    /// Bytes of entries appended since the last compaction (or start).
    log_bytes: u64,
    was_leader: bool,
    counters: NodeCounters,
    /// Members added (with their address) or removed by configuration
    /// changes applied since the last [`ShardNode::take_member_changes`].
    member_changes: Vec<(u64, Option<String>)>,
    /// A replica was added: compact the log through what is applied, so
    /// that it is sent a snapshot (which carries the members) rather than
    /// the log from its first entry (the members a shard started with are
    /// in no entry).
    compact_for_new_member: bool,
}

/// Longest replica address a membership change may carry.
pub const MAX_MEMBER_ADDRESS: usize = 256;

/// One voter added or removed, as proposed to raft.
struct MemberChange {
    kind: raft::eraftpb::ConfChangeType,
    id: u64,
    /// The added replica's address (empty for a removal).
    address: Vec<u8>,
}

/// A logger for raft-rs that passes its messages at `min` or above to
/// `tracing` (target `raft`), with the replica and shard as fields.
pub fn raft_logger(min: slog::Level) -> slog::Logger {
    struct ToTracing(slog::Level);
    impl slog::Drain for ToTracing {
        type Ok = ();
        type Err = slog::Never;
        fn log(&self, r: &slog::Record<'_>, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
            if r.level().is_at_least(self.0) {
                struct Kv(String);
                impl slog::Serializer for Kv {
                    fn emit_arguments(
                        &mut self,
                        key: slog::Key,
                        val: &std::fmt::Arguments<'_>,
                    ) -> slog::Result {
                        self.0.push_str(&format!(" {key}={val}"));
                        Ok(())
                    }
                }
                let mut kv = Kv(String::new());
                let _ = slog::KV::serialize(values, r, &mut kv);
                match r.level() {
                    slog::Level::Critical | slog::Level::Error => {
                        tracing::error!(target: "raft", "{}{}", r.msg(), kv.0)
                    }
                    slog::Level::Warning => tracing::warn!(target: "raft", "{}{}", r.msg(), kv.0),
                    slog::Level::Info => tracing::info!(target: "raft", "{}{}", r.msg(), kv.0),
                    _ => tracing::debug!(target: "raft", "{}{}", r.msg(), kv.0),
                }
            }
            Ok(())
        }
    }
    slog::Logger::root(slog::Drain::fuse(ToTracing(min)), slog::o!())
}

fn error(code: RefusalCode, msg: impl Into<String>) -> IndexResponse {
    IndexResponse {
        result: Some(Resp::Error(refusal(code, msg))),
    }
}

impl ShardNode {
    /// Opens shard `shard` of `store` as member `cfg.id`.
    pub fn new(
        store: Arc<Store>,
        shard: u32,
        cfg: NodeConfig,
        logger: &slog::Logger,
    ) -> Result<Self, NodeError> {
        let storage = ShardStorage::open(store.clone(), shard, &cfg.voters)?;
        let applied = store.applied(shard)?.index;
        // Entries are applied as soon as they commit, and the new commit
        // index is persisted with the next append: a crash in between
        // leaves applied above the stored commit, which raft-rs refuses.
        // Everything applied was committed, so the commit index moves up.
        if applied > storage.hard_state().commit {
            storage.set_commit(applied)?;
        }
        let rc = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        rc.validate()?;
        let logger = logger.new(slog::o!("replica" => cfg.id, "shard" => shard));
        let node = RawNode::new(&rc, storage, &logger)?;
        Ok(ShardNode {
            node,
            store,
            shard,
            cfg,
            next_ctx: 1,
            proposals: HashMap::new(),
            in_flight: HashMap::new(),
            in_flight_at: std::collections::BTreeMap::new(),
            reads: HashMap::new(),
            ready_reads: Vec::new(),
            applied,
            log_bytes: 0,
            was_leader: false,
            counters: NodeCounters::default(),
            member_changes: Vec::new(),
            compact_for_new_member: false,
        })
    }

    /// The shard this node serves.
    pub fn shard(&self) -> u32 {
        self.shard
    }

    /// Whether this replica leads the shard now.
    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// The leader this replica knows of (0: none).
    pub fn leader(&self) -> u64 {
        self.node.raft.leader_id
    }

    /// The applied index.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Advances raft's clock by one [`TICK`].
    pub fn tick(&mut self) {
        self.node.tick();
    }

    /// Hands a message from a peer to raft. Messages for another shard or
    /// replica are dropped.
    pub fn step(&mut self, mut m: Message) {
        if m.to != self.cfg.id {
            return;
        }
        // A leader tells a follower to commit up to what it believes the
        // follower holds. A replica whose directory was wiped holds less
        // than the leader remembers, and raft-rs would abort on a commit
        // past its log's end: commit no further than the log reaches, and
        // let the leader's probe (after `peer_connected`) send a snapshot.
        if m.get_msg_type() == MessageType::MsgHeartbeat {
            let last = self.node.raft.raft_log.last_index();
            if m.commit > last {
                m.commit = last;
            }
        }
        // raft-rs refuses messages from unknown peers and stale terms by
        // itself; such errors are not this replica's failure.
        let _ = self.node.step(m);
    }

    /// Replica `id` opened a new connection to this one: it may have
    /// restarted, perhaps with less than it held (its directory wiped). A
    /// leader forgets how far that replica's log was known to match and
    /// probes it afresh: a replica that kept its log answers the probe
    /// and is matched again at once; a wiped one rejects it and is sent
    /// the entries, or a snapshot where they were compacted. Lowering a
    /// match only delays commits that need this replica; it never undoes
    /// one.
    pub fn peer_connected(&mut self, id: u64) {
        if id == self.cfg.id || self.node.raft.state != StateRole::Leader {
            return;
        }
        if let Some(pr) = self.node.raft.mut_prs().get_mut(id) {
            pr.become_probe();
            pr.matched = 0;
        }
    }

    /// Starts serving a request; `reply` is called once, now or later.
    pub fn request(&mut self, req: IndexRequest, reply: Reply) {
        let Some(op) = req.op else {
            return reply(error(
                RefusalCode::Invalid,
                "a request without an operation",
            ));
        };
        match op {
            ReqOp::Status(_) => reply(IndexResponse {
                result: Some(Resp::Status(pagecast_proto::v1::StatusResponse {
                    replica: self.cfg.id,
                    shards: vec![self.status()],
                    peers: Vec::new(),
                })),
            }),
            ReqOp::Write(cmd) => self.propose(cmd, reply),
            ReqOp::Members(m) => self.change_members(&m, reply),
            // A replica that is no voter of this shard holds no copy of
            // it: the client asks another.
            _ if req.stale && !self.is_voter() => reply(self.not_leader()),
            op if req.stale => {
                let r = self.read(&op);
                reply(r)
            }
            op => {
                if !self.is_leader() {
                    return reply(self.not_leader());
                }
                let ctx = self.next_ctx;
                self.next_ctx += 1;
                self.node.read_index(ctx.to_le_bytes().to_vec());
                self.reads.insert(
                    ctx,
                    Read {
                        op,
                        reply,
                        since: Instant::now(),
                    },
                );
            }
        }
    }

    fn not_leader(&self) -> IndexResponse {
        IndexResponse {
            result: Some(Resp::NotLeader(NotLeader {
                leader: self.leader(),
                leader_addr: String::new(),
            })),
        }
    }

    /// The shard's voters, as this replica's configuration has them.
    pub fn voters(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.node.raft.prs().conf().voters().ids().iter().collect();
        v.sort_unstable();
        v
    }

    /// Whether this replica votes in (and so holds a copy of) the shard.
    pub fn is_voter(&self) -> bool {
        self.node.raft.prs().conf().voters().contains(self.cfg.id)
    }

    /// Members added or removed by configuration changes applied since the
    /// last call: `(id, Some(address))` added, `(id, None)` removed.
    pub fn take_member_changes(&mut self) -> Vec<(u64, Option<String>)> {
        std::mem::take(&mut self.member_changes)
    }

    /// Proposes adding or removing one voter; answered once applied.
    fn change_members(&mut self, m: &pagecast_proto::v1::MembersRequest, reply: Reply) {
        use raft::eraftpb::ConfChangeSingle;
        if !self.is_leader() {
            return reply(self.not_leader());
        }
        let change = match self.member_change(m) {
            Ok(Some(c)) => c,
            Ok(None) => {
                // Done before (a retry, or another shard's leader on this
                // replica answered first): nothing to change.
                return reply(IndexResponse {
                    result: Some(Resp::Write(pagecast_proto::v1::WriteResponse {
                        duplicate: true,
                        ..Default::default()
                    })),
                });
            }
            Err(refused) => return reply(*refused),
        };
        let mut single = ConfChangeSingle::default();
        single.set_change_type(change.kind);
        single.node_id = change.id;
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        // The address travels in the change itself, which every replica
        // applies (the entry's context is the proposer's).
        cc.context = change.address.clone().into();
        match self.node.propose_conf_change(change.address, cc) {
            // A leader appends a proposal to its log at once.
            Ok(()) => {
                self.wait_for_last(reply);
            }
            Err(raft::Error::ProposalDropped) => reply(error(
                RefusalCode::Busy,
                format!(
                    "shard {}: another membership change is under way; try again",
                    self.shard
                ),
            )),
            Err(e) => reply(error(
                RefusalCode::Refused,
                format!("shard {}: membership change refused: {e}", self.shard),
            )),
        }
    }

    /// The change `m` asks of this shard's voters: `Ok(None)` when it is
    /// already so, a refusal when it is malformed or must wait (a leader
    /// asked to remove itself hands the lead over first).
    fn member_change(
        &mut self,
        m: &pagecast_proto::v1::MembersRequest,
    ) -> Result<Option<MemberChange>, Box<IndexResponse>> {
        use raft::eraftpb::ConfChangeType;
        let voters = self.voters();
        let change = match (m.add_id, m.remove_id) {
            (0, 0) | (1.., 1..) => {
                return Err(Box::new(error(
                    RefusalCode::Invalid,
                    "a membership change adds one replica or removes one",
                )));
            }
            (id, 0) => {
                if m.add_address.is_empty()
                    || m.add_address.len() > MAX_MEMBER_ADDRESS
                    || crate::replica::parse_peers(&format!("{id}={}", m.add_address)).is_err()
                {
                    return Err(Box::new(error(
                        RefusalCode::Invalid,
                        format!("replica {id}: {:?} is not HOST:PORT", m.add_address),
                    )));
                }
                MemberChange {
                    kind: ConfChangeType::AddNode,
                    id,
                    address: m.add_address.as_bytes().to_vec(),
                }
            }
            (0, id) => {
                if voters.len() <= 1 {
                    return Err(Box::new(error(
                        RefusalCode::Refused,
                        format!("replica {id} is shard {}'s last voter", self.shard),
                    )));
                }
                if id == self.cfg.id {
                    return Err(Box::new(self.hand_over_lead(&voters)));
                }
                MemberChange {
                    kind: ConfChangeType::RemoveNode,
                    id,
                    address: Vec::new(),
                }
            }
        };
        let already = voters.contains(&change.id) == (change.kind == ConfChangeType::AddNode);
        Ok((!already).then_some(change))
    }

    /// A leader that removed itself would go on leading a shard it no
    /// longer votes in (its heartbeats keep the others from electing): it
    /// hands the lead to the most caught-up other voter and answers that
    /// the change is to be asked again.
    fn hand_over_lead(&mut self, voters: &[u64]) -> IndexResponse {
        let me = self.cfg.id;
        let to = self
            .node
            .raft
            .prs()
            .iter()
            .filter(|(v, _)| **v != me && voters.contains(v))
            .max_by_key(|(v, p)| (p.matched, std::cmp::Reverse(**v)))
            .map(|(v, _)| *v);
        if let Some(to) = to {
            self.node.transfer_leader(to);
        }
        error(
            RefusalCode::Busy,
            format!(
                "shard {}: replica {me} leads it; the lead moves to replica {} before it is \
                 removed; try again",
                self.shard,
                to.unwrap_or(0)
            ),
        )
    }

    /// Answers `reply` once the entry just appended (the log's last) is
    /// applied, or another leader's entry took its place; returns its index.
    fn wait_for_last(&mut self, reply: Reply) -> u64 {
        let index = self.node.raft.raft_log.last_index();
        self.proposals.insert(
            index,
            Waiting {
                term: self.node.raft.term,
                replies: vec![reply],
                since: Instant::now(),
            },
        );
        index
    }

    fn propose(&mut self, cmd: IndexCommand, reply: Reply) {
        if !self.is_leader() {
            return reply(self.not_leader());
        }
        if let Some(pagecast_proto::v1::index_command::Op::Deltas(d)) = &cmd.op
            && d.deltas.len() > MAX_INDEX_BATCH
        {
            return reply(error(
                RefusalCode::Invalid,
                format!(
                    "a batch of {} deltas exceeds the limit of {MAX_INDEX_BATCH}",
                    d.deltas.len()
                ),
            ));
        }
        let key = (cmd.client != 0).then_some((cmd.client, cmd.seq));
        let term = self.node.raft.term;
        if let Some(&(index, t)) = key.and_then(|k| self.in_flight.get(&k))
            && t == term
            && index > self.applied
        {
            // The same write is in this leader's log, in this term: it
            // commits or this replica stops leading; wait for it.
            self.proposals
                .entry(index)
                .or_insert_with(|| Waiting {
                    term,
                    replies: Vec::new(),
                    since: Instant::now(),
                })
                .replies
                .push(reply);
            return;
        }
        match self.node.propose(Vec::new(), cmd.encode_to_vec()) {
            Ok(()) => {
                metrics::counter!(crate::metrics::PROPOSALS).increment(1);
                // A leader appends a proposal to its log at once.
                let index = self.wait_for_last(reply);
                if let Some(k) = key {
                    self.in_flight.insert(k, (index, term));
                    self.in_flight_at.insert(index, k);
                }
            }
            Err(raft::Error::ProposalDropped) => reply(self.not_leader()),
            Err(e) => reply(error(RefusalCode::Busy, format!("proposal refused: {e}"))),
        }
    }

    /// Answers a read from the applied state.
    fn read(&self, op: &ReqOp) -> IndexResponse {
        match self.read_inner(op) {
            Ok(r) => IndexResponse { result: Some(r) },
            Err(e) => IndexResponse {
                result: Some(Resp::Error(e)),
            },
        }
    }

    fn read_inner(&self, op: &ReqOp) -> Result<Resp, Refusal> {
        let s = |e: StoreError| refusal(RefusalCode::Internal, e.to_string());
        let invalid = |m: String| refusal(RefusalCode::Invalid, m);
        match op {
            ReqOp::Lookup(l) => {
                if l.hashes.len() % HASH_LEN != 0 {
                    return Err(invalid(format!(
                        "lookup: {} bytes is not a whole number of hashes",
                        l.hashes.len()
                    )));
                }
                let n = l.hashes.len() / HASH_LEN;
                if n > MAX_INDEX_BATCH {
                    return Err(invalid(format!(
                        "lookup of {n} hashes exceeds the limit of {MAX_INDEX_BATCH}"
                    )));
                }
                let hashes: Vec<PageHash> = l
                    .hashes
                    .chunks_exact(HASH_LEN)
                    .map(|c| PageHash::from_bytes(c.try_into().expect("32")))
                    .collect();
                for (i, h) in hashes.iter().enumerate() {
                    if crate::keys::shard_of(h, self.store.shards()) != self.shard {
                        return Err(invalid(format!(
                            "lookup: hash {i} ({h}) is not in shard {}",
                            self.shard
                        )));
                    }
                }
                let lists = self.store.holders(&hashes).map_err(s)?;
                let mut r = LookupResponse::default();
                for (i, list) in lists.iter().enumerate() {
                    for &(host, frames) in list.entries() {
                        if l.hosts.is_empty() || l.hosts.contains(&host) {
                            r.hash_index.push(i as u32);
                            r.host.push(host);
                            r.frames.push(frames);
                        }
                    }
                }
                Ok(Resp::Lookup(r))
            }
            ReqOp::Holdings(h) => Ok(Resp::Holdings(HoldingsResponse {
                hosts: self
                    .store
                    .holdings(self.shard, h.host)
                    .map_err(s)?
                    .into_iter()
                    .map(|(host, sum)| HostHolding {
                        host,
                        sum: sum.encode().to_vec().into(),
                    })
                    .collect(),
            })),
            ReqOp::ListHoldings(l) => {
                let after = match l.after.len() {
                    0 => None,
                    HASH_LEN => Some(PageHash::from_bytes(
                        l.after[..].try_into().expect("32 bytes"),
                    )),
                    n => return Err(invalid(format!("list: `after` is {n} bytes, not 32"))),
                };
                if l.host == 0 {
                    return Err(invalid("list: name a host".into()));
                }
                let limit = (l.limit as usize).clamp(1, MAX_INDEX_BATCH);
                let (pairs, next) = self
                    .store
                    .list_holdings(self.shard, l.host, after, limit, LIST_SCAN)
                    .map_err(s)?;
                let mut r = ListHoldingsResponse::default();
                let mut hashes = Vec::with_capacity(pairs.len() * HASH_LEN);
                for (h, f) in pairs {
                    hashes.extend_from_slice(h.as_bytes());
                    r.frames.push(f);
                }
                r.hashes = hashes.into();
                r.next = next
                    .map(|n| n.as_bytes().to_vec())
                    .unwrap_or_default()
                    .into();
                Ok(Resp::ListHoldings(r))
            }
            other if self.shard != 0 => Err(invalid(format!(
                "{} is answered by shard 0, not shard {}",
                req_name(other),
                self.shard
            ))),
            ReqOp::Vms(_) => Ok(Resp::Vms(VmsResponse {
                vms: self.store.vms().map_err(s)?,
            })),
            ReqOp::Hosts(_) => Ok(Resp::Hosts(HostsResponse {
                hosts: self.store.hosts().map_err(s)?,
            })),
            ReqOp::Advise(a) => {
                let vms = self.store.vms().map_err(s)?;
                let hosts = self.store.hosts().map_err(s)?;
                let top = if a.top == 0 {
                    5
                } else {
                    a.top.min(1000) as usize
                };
                sharing::advise(&vms, &hosts, &a.vm, top).map(Resp::Advise)
            }
            ReqOp::Pair(p) => {
                let vms = self.store.vms().map_err(s)?;
                let hosts = self.store.hosts().map_err(s)?;
                sharing::pair(&vms, &hosts, p).map(Resp::Pair)
            }
            ReqOp::Status(_) | ReqOp::Write(_) | ReqOp::SnapshotPart(_) | ReqOp::Members(_) => {
                Err(invalid("not a read".into()))
            }
        }
    }

    /// This shard's row of `index status`.
    pub fn status(&self) -> ShardStatus {
        let st = self.node.store();
        let applied = self.store.applied(self.shard).unwrap_or_default();
        ShardStatus {
            shard: self.shard,
            replica: self.cfg.id,
            role: if self.is_voter() {
                format!("{:?}", self.node.raft.state).to_lowercase()
            } else {
                // No copy of this shard here.
                "none".into()
            },
            leader: self.leader(),
            term: self.node.raft.term,
            commit: self.node.raft.raft_log.committed,
            applied: self.applied,
            first_index: st.first(),
            last_index: st.last(),
            distinct_hashes: self.store.estimate_distinct(self.shard).unwrap_or(0),
            holder_frames: applied.frames,
            snapshots_sent: self.counters.snapshots_sent,
            snapshots_received: self.counters.snapshots_received,
            distinct_exact: false,
            voters: self.voters(),
        }
    }

    /// Answers with an error every request older than the timeout, and
    /// every proposal and read if this replica stopped leading.
    pub fn expire(&mut self) {
        let now = Instant::now();
        let leader = self.is_leader();
        let lost = self.was_leader && !leader;
        self.was_leader = leader;
        let timeout = self.cfg.request_timeout;
        let late = |since: Instant| now.duration_since(since) > timeout;
        let nl = self.not_leader();
        let expired = |since: Instant| lost || late(since);
        if lost {
            self.in_flight.clear();
            self.in_flight_at.clear();
        }
        for (_, w) in self.proposals.extract_if(|_, w| expired(w.since)) {
            for reply in w.replies {
                reply(if lost {
                    nl.clone()
                } else {
                    error(
                        RefusalCode::Busy,
                        "timed out waiting for the write to commit",
                    )
                });
            }
        }
        for (_, r) in self.reads.extract_if(|_, r| expired(r.since)) {
            (r.reply)(if lost {
                nl.clone()
            } else {
                error(
                    RefusalCode::Busy,
                    "timed out confirming leadership for a read",
                )
            });
        }
        let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.ready_reads)
            .into_iter()
            .partition(|(_, r)| late(r.since));
        self.ready_reads = keep;
        for (_, r) in old {
            (r.reply)(error(
                RefusalCode::Busy,
                "timed out waiting for this replica to apply",
            ));
        }
    }

    /// Handles raft's pending work: persists entries and state, applies
    /// committed entries and answers what they complete. Hands `send_now`
    /// the messages raft lets go before this replica persists anything (a
    /// leader's appends to its followers, so the followers write their
    /// logs while the leader applies and writes its own; raft-rs gives a
    /// follower or candidate none), and returns the messages that must
    /// wait for this replica's writes.
    pub fn ready_sending(
        &mut self,
        send_now: &mut dyn FnMut(Vec<Message>),
    ) -> Result<Vec<Message>, NodeError> {
        let mut out = Vec::new();
        if !self.node.has_ready() {
            self.expire();
            return Ok(out);
        }
        let mut rd = self.node.ready();
        let early = rd.take_messages();
        // Reported after `advance`, as raft-rs asks of calls into the node.
        let mut snap_to = snapshot_targets(&early);
        send_now(early);
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.node.store().apply_snapshot(&snap)?;
            self.applied = snap.get_metadata().index;
            self.counters.snapshots_received += 1;
            metrics::counter!(crate::metrics::SNAPSHOTS_RECEIVED).increment(1);
        }
        for rs in rd.take_read_states() {
            let ctx = u64::from_le_bytes(rs.request_ctx.as_slice().try_into().unwrap_or([0; 8]));
            if let Some(r) = self.reads.remove(&ctx) {
                self.ready_reads.push((rs.index, r));
            }
        }
        self.apply(rd.take_committed_entries())?;
        let store = self.node.store();
        if !rd.entries().is_empty() || rd.hs().is_some() {
            self.log_bytes += rd
                .entries()
                .iter()
                .map(|e| e.data.len() as u64)
                .sum::<u64>();
            store.append(rd.entries(), rd.hs())?;
        }
        out.extend(rd.take_persisted_messages());
        let mut light = self.node.advance(rd);
        if let Some(c) = light.commit_index() {
            self.node.store().set_commit(c)?;
        }
        out.extend(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.node.advance_apply();
        self.serve_reads();
        self.maybe_compact()?;
        self.expire();
        snap_to.extend(snapshot_targets(&out));
        self.report_snapshots_sent(&snap_to);
        Ok(out)
    }

    /// raft-rs holds a replica's progress until told how its snapshot
    /// went. Report it delivered as soon as it is handed to the link: if
    /// it was lost, the replica's next answer shows it still lacks the
    /// entries and the leader probes (and sends a snapshot) again. A
    /// replica that already reported holding the snapshot's index (one
    /// wiped and restarted) would otherwise never be sent more.
    fn report_snapshots_sent(&mut self, snap_to: &[u64]) {
        for to in snap_to {
            self.node.report_snapshot(*to, raft::SnapshotStatus::Finish);
        }
        let sent = snap_to.len() as u64;
        if sent > 0 {
            self.counters.snapshots_sent += sent;
            metrics::counter!(crate::metrics::SNAPSHOTS_SENT).increment(sent);
        }
    }

    fn serve_reads(&mut self) {
        let applied = self.applied;
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.ready_reads)
            .into_iter()
            .partition(|(i, _)| *i <= applied);
        self.ready_reads = later;
        for (_, r) in now {
            let resp = self.read(&r.op);
            (r.reply)(resp);
        }
    }

    fn apply(&mut self, entries: Vec<raft::eraftpb::Entry>) -> Result<(), NodeError> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let (last_index, last_term) = (last.index, last.term);
        let started = Instant::now();
        let mut cmds = Vec::with_capacity(entries.len());
        for e in &entries {
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    let cmd = if e.data.is_empty() {
                        None
                    } else {
                        // Only commands that decoded on the leader are
                        // proposed; one that does not decode here is
                        // applied as a no-op on every replica alike.
                        Command::decode(&e.data)
                    };
                    cmds.push((e.index, cmd));
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data).map_err(corrupt_conf_change)?;
                    let cs = self.node.apply_conf_change(&cc)?;
                    self.node.store().set_conf_state(&cs)?;
                    cmds.push((e.index, None));
                }
                EntryType::EntryConfChangeV2 => {
                    let cc =
                        ConfChangeV2::parse_from_bytes(&e.data).map_err(corrupt_conf_change)?;
                    let cs = self.node.apply_conf_change(&cc)?;
                    self.node.store().set_conf_state(&cs)?;
                    self.note_member_changes(&cc);
                    cmds.push((e.index, None));
                }
            }
        }
        let results = self.store.apply(self.shard, &cmds, last_term)?;
        self.applied = last_index;
        metrics::counter!(crate::metrics::COMMITS).increment(entries.len() as u64);
        metrics::histogram!(crate::metrics::APPLY_SECONDS).record(started.elapsed().as_secs_f64());
        let later = self.in_flight_at.split_off(&(last_index + 1));
        for k in std::mem::replace(&mut self.in_flight_at, later).into_values() {
            self.in_flight.remove(&k);
        }
        for (e, r) in entries.iter().zip(results) {
            let Some(w) = self.proposals.remove(&e.index) else {
                continue;
            };
            let answer = if w.term != e.term {
                // Another leader's entry took its place: the write was
                // never applied, and the client tries again.
                self.not_leader()
            } else {
                match r {
                    Ok(w) => IndexResponse {
                        result: Some(Resp::Write(w)),
                    },
                    Err(e) => IndexResponse {
                        result: Some(Resp::Error(e)),
                    },
                }
            };
            for reply in w.replies {
                reply(answer.clone());
            }
        }
        Ok(())
    }

    fn note_member_changes(&mut self, cc: &ConfChangeV2) {
        use raft::eraftpb::ConfChangeType;
        let address = String::from_utf8_lossy(&cc.context).into_owned();
        for c in cc.get_changes() {
            match c.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    self.member_changes.push((c.node_id, Some(address.clone())));
                    self.compact_for_new_member = true;
                }
                ConfChangeType::RemoveNode => self.member_changes.push((c.node_id, None)),
            }
        }
    }

    fn maybe_compact(&mut self) -> Result<(), NodeError> {
        let store = self.node.store();
        let first = store.first();
        if std::mem::take(&mut self.compact_for_new_member) && self.applied >= first {
            store.compact(self.applied)?;
            self.log_bytes = 0;
            return Ok(());
        }
        if self.applied >= first
            && (self.applied - first + 1 >= self.cfg.compact_after
                || self.log_bytes >= self.cfg.compact_bytes)
        {
            let to = self.applied.saturating_sub(self.cfg.keep_entries);
            if to >= first {
                store.compact(to)?;
                self.log_bytes = 0;
            }
        }
        let n = store.last().saturating_sub(store.first()) + 1;
        metrics::gauge!(crate::metrics::LOG_ENTRIES, "shard" => self.shard.to_string())
            .set(n as f64);
        Ok(())
    }
}

fn req_name(op: &ReqOp) -> &'static str {
    match op {
        ReqOp::Status(_) => "status",
        ReqOp::Write(_) => "a write",
        ReqOp::Lookup(_) => "lookup",
        ReqOp::Vms(_) => "the VM list",
        ReqOp::Hosts(_) => "the host list",
        ReqOp::Advise(_) => "advice",
        ReqOp::Pair(_) => "pair sharing",
        ReqOp::Holdings(_) => "holdings",
        ReqOp::ListHoldings(_) => "a holdings listing",
        ReqOp::SnapshotPart(_) => "a snapshot part",
        ReqOp::Members(_) => "a membership change",
    }
}

fn corrupt_conf_change(e: protobuf::ProtobufError) -> NodeError {
    NodeError::Store(StoreError::Corrupt {
        what: "conf change",
        detail: e.to_string(),
    })
}
/// The replicas `msgs` send a snapshot to.
fn snapshot_targets(msgs: &[Message]) -> Vec<u64> {
    msgs.iter()
        .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
        .map(|m| m.to)
        .collect()
}
