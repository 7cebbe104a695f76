//! Several replicas of one shard, each with its own RocksDB, over an
//! in-process network that drops, delays and reorders messages: every
//! acknowledged write is on every replica once the network heals, and a
//! re-sent batch is applied once.
#![cfg(feature = "replica")]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use pagecast_index::keys::{self, shard_of};
use pagecast_index::node::{NodeConfig, ShardNode};
use pagecast_index::snapshot_in::{self, Descriptor};
use pagecast_index::store::{CF_LOG, Store};
use pagecast_pages::PageHash;
use pagecast_proto::v1::{
    HolderDelta, HolderDeltas, IndexCommand, IndexRequest, IndexResponse, index_command::Op,
    index_request::Op as ReqOp, index_response::Result as Resp,
};
use raft::eraftpb::{Message, MessageType};

/// xorshift64*: a seeded, repeatable source of network chaos.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Net {
    rng: Rng,
    drop_per_mille: u64,
    max_delay: u64,
    /// Messages in flight: (deliver at step, message).
    flight: Vec<(u64, Message)>,
    /// Replicas cut off from everyone.
    cut: Vec<u64>,
}

impl Net {
    fn send(&mut self, now: u64, m: Message) {
        if self.cut.contains(&m.from) || self.cut.contains(&m.to) {
            return;
        }
        if self.rng.below(1000) < self.drop_per_mille {
            return;
        }
        let at = now + 1 + self.rng.below(self.max_delay + 1);
        self.flight.push((at, m));
    }

    fn due(&mut self, now: u64) -> Vec<Message> {
        let (due, later): (Vec<_>, Vec<_>) = self.flight.drain(..).partition(|(at, _)| *at <= now);
        self.flight = later;
        let mut due: Vec<Message> = due.into_iter().map(|(_, m)| m).collect();
        // Shuffle what arrives in the same step: reordering beyond delay.
        for i in (1..due.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            due.swap(i, j);
        }
        due
    }
}

struct Cluster {
    nodes: BTreeMap<u64, ShardNode>,
    stores: BTreeMap<u64, Arc<Store>>,
    net: Net,
    step: u64,
    _dirs: Vec<tempfile::TempDir>,
}

type Answers = Arc<Mutex<Vec<(u64, IndexResponse)>>>;

impl Cluster {
    fn new(n: u64, seed: u64, drop_per_mille: u64, max_delay: u64) -> Self {
        let logger = pagecast_index::node::raft_logger(slog::Level::Critical);
        let voters: Vec<u64> = (1..=n).collect();
        let mut nodes = BTreeMap::new();
        let mut stores = BTreeMap::new();
        let mut dirs = Vec::new();
        for id in 1..=n {
            let d = tempfile::tempdir().unwrap();
            let store = Arc::new(Store::open(d.path(), id, 1, false).unwrap());
            let mut cfg = NodeConfig::new(id, voters.clone());
            cfg.compact_after = 16;
            cfg.keep_entries = 4;
            nodes.insert(id, ShardNode::new(store.clone(), 0, cfg, &logger).unwrap());
            stores.insert(id, store);
            dirs.push(d);
        }
        Cluster {
            nodes,
            stores,
            net: Net {
                rng: Rng(seed | 1),
                drop_per_mille,
                max_delay,
                flight: Vec::new(),
                cut: Vec::new(),
            },
            step: 0,
            _dirs: dirs,
        }
    }

    /// One step: deliver what is due, tick every other step, run ready.
    fn run(&mut self, steps: u64) {
        for _ in 0..steps {
            self.step += 1;
            for m in self.net.due(self.step) {
                if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot && !self.stage(&m) {
                    continue;
                }
                if let Some(n) = self.nodes.get_mut(&m.to) {
                    n.step(m);
                }
            }
            let (net, step) = (&mut self.net, self.step);
            for n in self.nodes.values_mut() {
                if step.is_multiple_of(2) {
                    n.tick();
                }
                // As the replica's shard thread does: what raft lets go
                // before this replica writes anything goes out first.
                let late = n
                    .ready_sending(&mut |ms| ms.into_iter().for_each(|m| net.send(step, m)))
                    .unwrap();
                for m in late {
                    net.send(step, m);
                }
            }
        }
    }

    /// What a replica does before a snapshot reaches raft: fetch its parts
    /// from the sender (here directly, in small parts) and stage them.
    /// False when the sender no longer has it (the message is dropped).
    fn stage(&self, m: &raft::eraftpb::Message) -> bool {
        let d = Descriptor::decode(&m.get_snapshot().data).expect("a descriptor");
        let (Some(from), Some(to)) = (self.stores.get(&m.from), self.stores.get(&m.to)) else {
            return false;
        };
        if snapshot_in::staged(to, d) {
            return true;
        }
        snapshot_in::stage(to, d, |after| {
            from.snapshot_part(d.shard, d.index, after, 4096)
                .map_err(|e| e.to_string())
        })
        .is_ok()
    }

    fn leader(&self) -> Option<u64> {
        self.nodes
            .iter()
            .find(|(id, n)| n.is_leader() && !self.net.cut.contains(id))
            .map(|(id, _)| *id)
    }

    fn wait_leader(&mut self) -> u64 {
        for _ in 0..2000 {
            if let Some(l) = self.leader() {
                return l;
            }
            self.run(1);
        }
        panic!("no leader after 2000 steps");
    }

    fn send(&mut self, to: u64, tag: u64, req: IndexRequest, answers: &Answers) {
        let a = answers.clone();
        self.nodes
            .get_mut(&to)
            .unwrap()
            .request(req, Box::new(move |r| a.lock().unwrap().push((tag, r))));
    }
}

fn hash(i: u64) -> PageHash {
    let mut b = *blake3::hash(&i.to_le_bytes()).as_bytes();
    b[31] |= 1;
    PageHash::from_bytes(b)
}

fn write(client: u64, seq: u64, hashes: &[u64], host: u32, frames: i64) -> IndexRequest {
    IndexRequest {
        shard: 0,
        stale: false,
        op: Some(ReqOp::Write(IndexCommand {
            client,
            seq,
            op: Some(Op::Deltas(HolderDeltas {
                deltas: hashes
                    .iter()
                    .map(|i| HolderDelta {
                        hash: hash(*i).as_bytes().to_vec().into(),
                        host,
                        frames,
                        // The writer's account: one frame held before a removal.
                        before: u64::from(frames < 0),
                    })
                    .collect(),
            })),
        })),
    }
}

/// Sends batch `seq` until some replica acknowledges it (re-sending to
/// whoever leads after a timeout or a lost leadership, as a client does).
fn write_until_acked(c: &mut Cluster, seq: u64, hashes: &[u64]) -> IndexResponse {
    let answers: Answers = Arc::default();
    for attempt in 0..50 {
        let l = c.wait_leader();
        c.send(l, attempt, write(7, seq, hashes, 1, 1), &answers);
        for _ in 0..400 {
            c.run(1);
            let got = answers.lock().unwrap().pop();
            match got {
                Some((
                    _,
                    r @ IndexResponse {
                        result: Some(Resp::Write(_)),
                    },
                )) => return r,
                Some(_) => break, // not leader / timed out: try again
                None => {}
            }
        }
    }
    panic!("batch {seq} never acknowledged");
}

/// Total frames of each of hashes `0..upto`, as each replica sees them.
fn holders_everywhere(c: &Cluster, upto: u64) -> Vec<Vec<u64>> {
    let hashes: Vec<PageHash> = (0..upto).map(hash).collect();
    c.stores
        .values()
        .map(|s| {
            s.holders(&hashes)
                .unwrap()
                .iter()
                .map(|l| l.entries().iter().map(|e| e.1).sum())
                .collect()
        })
        .collect()
}

#[test]
fn a_leaders_appends_leave_before_it_writes_its_own_log() {
    let mut c = Cluster::new(3, 11, 0, 0);
    let l = c.wait_leader();
    // Let the election's own entry settle first.
    write_until_acked(&mut c, 1, &[1]);
    let answers: Answers = Arc::default();
    c.send(l, 0, write(7, 2, &[2, 3], 1, 1), &answers);
    let store = c.stores[&l].clone();
    let in_log = |i: u64| {
        store
            .db()
            .get_cf(store.cf(CF_LOG), keys::log(0, i))
            .unwrap()
            .is_some()
    };
    // (index, already in the leader's log when the append left).
    let mut sent = Vec::new();
    let late = c
        .nodes
        .get_mut(&l)
        .unwrap()
        .ready_sending(&mut |ms| {
            for m in ms
                .iter()
                .filter(|m| m.get_msg_type() == MessageType::MsgAppend)
            {
                sent.extend(m.get_entries().iter().map(|e| (e.index, in_log(e.index))));
            }
        })
        .unwrap();
    assert!(
        late.iter()
            .all(|m| m.get_msg_type() != MessageType::MsgAppend),
        "appends wait for the leader's write: {late:?}"
    );
    assert!(
        !sent.is_empty(),
        "the new entry was not sent to the followers"
    );
    assert!(
        sent.iter().all(|(_, before)| !before),
        "entries written before their appends left: {sent:?}"
    );
    assert!(sent.iter().all(|(i, _)| in_log(*i)), "not written after");
    // The write still completes, once a follower acknowledges it.
    c.run(40);
    let got = answers.lock().unwrap().pop();
    assert!(
        matches!(
            got,
            Some((
                _,
                IndexResponse {
                    result: Some(Resp::Write(_))
                }
            ))
        ),
        "{got:?}"
    );
}

#[test]
fn replicas_converge_over_a_lossy_reordering_network() {
    let mut c = Cluster::new(3, 0xC0FFEE, 150, 6);
    let batches = 60u64;
    let mut dup_seen = 0;
    for seq in 1..=batches {
        let hs: Vec<u64> = (seq * 10..seq * 10 + 10).collect();
        let r = write_until_acked(&mut c, seq, &hs);
        if let Some(Resp::Write(w)) = r.result
            && w.duplicate
        {
            dup_seen += 1;
        }
        // Cut a follower off for 30 batches: the log moves past it and is
        // compacted, so it must come back through a snapshot.
        if seq == 10 {
            let l = c.wait_leader();
            let f = *c.nodes.keys().find(|id| **id != l).unwrap();
            c.net.cut.push(f);
        }
        if seq == 40 {
            c.net.cut.clear();
        }
        // Then cut the leader off for a while: a new one must take over.
        if seq == 45 {
            let old = c.wait_leader();
            c.net.cut.push(old);
            c.run(200);
            let new = c.wait_leader();
            assert_ne!(new, old, "a cut-off leader cannot stay leader of the rest");
            c.net.cut.clear();
        }
    }
    // Heal: no more loss, let every replica catch up (by log or snapshot).
    c.net.drop_per_mille = 0;
    c.run(600);
    let applied: Vec<u64> = c.nodes.values().map(ShardNode::applied).collect();
    assert!(
        applied.iter().all(|a| *a == applied[0]),
        "applied {applied:?}"
    );
    let views = holders_everywhere(&c, (batches + 1) * 10);
    for v in &views[1..] {
        assert_eq!(v, &views[0]);
    }
    // Every acknowledged batch is there exactly once (one frame each).
    for i in 10..(batches + 1) * 10 {
        assert_eq!(views[0][i as usize], 1, "hash {i}");
    }
    for s in c.stores.values() {
        assert_eq!(s.count_distinct(0).unwrap(), batches * 10);
    }
    let snaps: u64 = c
        .nodes
        .values()
        .map(|n| n.status().snapshots_received)
        .sum();
    assert!(
        snaps >= 1,
        "the cut-off follower caught up without a snapshot"
    );
    let first: Vec<u64> = c.nodes.values().map(|n| n.status().first_index).collect();
    assert!(
        first.iter().all(|f| *f > 16),
        "logs were never compacted: {first:?}"
    );
    // Batches sent again after the fact, across the leader changes and
    // snapshots above, are recognised by their session and not applied
    // twice. (Re-sends inside the loop happen only when an answer times
    // out, which a fast run may never see: `dup_seen` counts them.)
    eprintln!("{dup_seen} batches were acknowledged as duplicates during the run");
    for seq in [1, 10, 33, 45, batches] {
        let hs: Vec<u64> = (seq * 10..seq * 10 + 10).collect();
        let r = write_until_acked(&mut c, seq, &hs);
        assert!(
            matches!(r.result, Some(Resp::Write(ref w)) if w.duplicate),
            "batch {seq} sent again was applied again: {r:?}"
        );
    }
    c.run(100);
    let views = holders_everywhere(&c, (batches + 1) * 10);
    for v in &views {
        assert!(
            v[10..].iter().all(|x| *x == 1),
            "a re-sent batch counted twice"
        );
    }
}

/// A follower whose directory is wiped restarts with an empty log while
/// the leader remembers it holding much more: it must neither abort on the
/// leader's commit index nor stall, but come back through a snapshot.
#[test]
fn a_wiped_follower_catches_up_through_a_snapshot() {
    let mut c = Cluster::new(3, 7, 0, 2);
    for seq in 1..=30 {
        write_until_acked(&mut c, seq, &[seq]);
    }
    c.run(50);
    let l = c.wait_leader();
    let f = *c.nodes.keys().find(|id| **id != l).unwrap();
    let d = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(d.path(), f, 1, false).unwrap());
    let mut cfg = NodeConfig::new(f, vec![1, 2, 3]);
    cfg.compact_after = 16;
    cfg.keep_entries = 4;
    let logger = pagecast_index::node::raft_logger(slog::Level::Critical);
    c.nodes
        .insert(f, ShardNode::new(store.clone(), 0, cfg, &logger).unwrap());
    c.stores.insert(f, store);
    c._dirs.push(d);
    // The restarted replica dials its peers again.
    for (id, n) in c.nodes.iter_mut() {
        if *id != f {
            n.peer_connected(f);
        }
    }
    // With no further writes, it still catches up.
    c.run(300);
    assert_eq!(c.stores[&f].count_distinct(0).unwrap(), 30);
    for seq in 31..=35 {
        write_until_acked(&mut c, seq, &[seq]);
    }
    c.run(300);
    assert!(c.nodes[&f].status().snapshots_received >= 1);
    let views = holders_everywhere(&c, 36);
    for v in &views[1..] {
        assert_eq!(v, &views[0]);
    }
    assert!(views[0][1..].iter().all(|x| *x == 1), "{:?}", views[0]);
    assert_eq!(c.stores[&f].count_distinct(0).unwrap(), 35);
}

#[test]
fn a_resent_batch_is_applied_once() {
    let mut c = Cluster::new(3, 42, 0, 2);
    let first = write_until_acked(&mut c, 1, &[1, 2, 3]);
    let again = write_until_acked(&mut c, 1, &[1, 2, 3]);
    let dup = |r: &IndexResponse| matches!(&r.result, Some(Resp::Write(w)) if w.duplicate);
    assert!(!dup(&first));
    assert!(dup(&again));
    c.run(50);
    for s in c.stores.values() {
        let l = s.holders(&[hash(1)]).unwrap();
        assert_eq!(l[0].frames_of(1), 1);
    }
    // A removal below the writer's own account is refused on every
    // replica alike.
    let answers: Answers = Arc::default();
    let l = c.wait_leader();
    c.send(l, 1, write(8, 1, &[1], 1, -2), &answers);
    c.run(100);
    let r = answers.lock().unwrap().pop().unwrap().1;
    match r.result {
        Some(Resp::Error(e)) => {
            assert!(e.message.contains("cannot add -2"), "{e}");
            assert_eq!(e.kind(), pagecast_proto::v1::RefusalCode::Refused);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    for s in c.stores.values() {
        assert_eq!(s.holders(&[hash(1)]).unwrap()[0].frames_of(1), 1);
    }
    // Re-sent, the refused batch is judged again, not taken for done.
    c.send(l, 2, write(8, 1, &[1], 1, -2), &answers);
    c.run(100);
    let r = answers.lock().unwrap().pop().unwrap().1;
    assert!(
        matches!(&r.result, Some(Resp::Error(e)) if e.message.contains("cannot add -2")),
        "a re-sent refused batch got {:?}",
        r.result
    );
}

#[test]
fn a_batch_resent_while_in_flight_is_proposed_once() {
    let mut c = Cluster::new(3, 11, 0, 1);
    write_until_acked(&mut c, 1, &[1]);
    c.run(50);
    let l = c.wait_leader();
    let before = c.nodes[&l].status().last_index;
    let answers: Answers = Arc::default();
    // The same (client, seq) three times before it commits, as a client
    // does whose attempts time out under load.
    for tag in 0..3 {
        c.send(l, tag, write(7, 2, &[10, 11], 1, 1), &answers);
    }
    c.run(200);
    let got = answers.lock().unwrap();
    assert_eq!(got.len(), 3, "every sender is answered");
    for (_, r) in got.iter() {
        assert!(matches!(&r.result, Some(Resp::Write(_))), "{r:?}");
    }
    assert_eq!(
        c.nodes[&l].status().last_index,
        before + 1,
        "one log entry for the three sends"
    );
    for s in c.stores.values() {
        assert_eq!(s.holders(&[hash(10)]).unwrap()[0].frames_of(1), 1);
    }
}

#[test]
fn reads_are_linearizable_on_the_leader_and_refused_elsewhere() {
    let mut c = Cluster::new(3, 7, 0, 1);
    write_until_acked(&mut c, 1, &[5]);
    let l = c.wait_leader();
    let follower = *c.nodes.keys().find(|id| **id != l).unwrap();
    let h = hash(5);
    assert_eq!(shard_of(&h, 1), 0);
    let lookup = |stale| IndexRequest {
        shard: 0,
        stale,
        op: Some(ReqOp::Lookup(pagecast_proto::v1::LookupRequest {
            hashes: h.as_bytes().to_vec().into(),
            hosts: vec![],
        })),
    };
    let answers: Answers = Arc::default();
    c.send(follower, 1, lookup(false), &answers);
    c.send(l, 2, lookup(false), &answers);
    c.run(50);
    let mut got = answers.lock().unwrap().clone();
    got.sort_by_key(|g| g.0);
    assert!(matches!(got[0].1.result, Some(Resp::NotLeader(ref n)) if n.leader == l));
    match &got[1].1.result {
        Some(Resp::Lookup(lr)) => {
            assert_eq!((lr.host.clone(), lr.frames.clone()), (vec![1], vec![1]))
        }
        other => panic!("{other:?}"),
    }
}

/// A new leader commits entries its predecessor proposed. Those must not
/// answer the new leader's own waiting writes: here the old leader's first
/// proposal (refused when applied) is committed under the new leader while
/// the new leader's first proposal (which succeeds) waits.
#[test]
fn a_new_leader_answers_its_writes_with_their_own_results() {
    let mut c = Cluster::new(3, 11, 0, 0);
    let old = c.wait_leader();
    // Let the followers match the leader's log, so it streams appends.
    c.run(10);
    let answers: Answers = Arc::default();
    // Refused when applied: host 1 holds no frame of hash 1.
    c.send(old, 1, write(8, 1, &[1], 1, -2), &answers);
    // One step: the leader appends it and sends it; the next, the followers
    // append it. Then cut the old leader off before it hears back.
    c.run(2);
    c.net.cut.push(old);
    c.net.flight.retain(|(_, m)| m.to != old && m.from != old);
    let mut new = old;
    for _ in 0..400 {
        c.run(1);
        if let Some(l) = c.leader() {
            new = l;
            break;
        }
    }
    assert_ne!(new, old, "no new leader");
    c.send(new, 2, write(9, 1, &[2], 1, 1), &answers);
    c.run(50);
    let got: Vec<(u64, IndexResponse)> = answers.lock().unwrap().clone();
    let mine = got
        .iter()
        .find(|(tag, _)| *tag == 2)
        .expect("the new leader answered its write");
    assert!(
        matches!(&mine.1.result, Some(Resp::Write(w)) if !w.duplicate),
        "the new leader's write got {:?}",
        mine.1.result
    );
    // Both entries were applied, each with its own outcome.
    let others: Vec<u64> = c.stores.keys().copied().filter(|id| *id != old).collect();
    for id in others {
        let s = &c.stores[&id];
        assert_eq!(s.holders(&[hash(2)]).unwrap()[0].frames_of(1), 1);
        assert_eq!(s.holders(&[hash(1)]).unwrap()[0].frames_of(1), 0);
    }
}
