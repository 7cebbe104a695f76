//! Faults of the host a process runs on, with real processes: an index
//! replica cut off by nftables while its connections stay open, a replica
//! whose disk fills, an agent whose disk fills. Against the index, a
//! writer adds one frame to a counter content per acknowledged write
//! (exactly once, by session and sequence number) while readers check that
//! no read returns less than was acknowledged before it began.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pagecast_index::client::IndexClient;
use pagecast_pages::PageHash;
use pagecast_proto::v1::{HolderDelta, HolderDeltas, IndexCommand, index_command::Op};
use pagecast_testkit::{Need, needs};
use pagecast_tests::cluster::{AgentProc, IndexCluster, ReplicaOpts, cli, cli_json, eventually};
use pagecast_tests::host::{Group, Partition, Tmpfs};

/// The counter: frames of host `HOST` holding content `X` in shard 0.
const HOST: u32 = 9;

fn x() -> PageHash {
    PageHash::from_bytes([0x11; 32])
}

fn add_one(c: &mut IndexClient, session: u64, seq: u64) -> Result<(), String> {
    c.write(
        0,
        IndexCommand {
            client: session,
            seq,
            op: Some(Op::Deltas(HolderDeltas {
                deltas: vec![HolderDelta {
                    hash: x().as_bytes().to_vec().into(),
                    host: HOST,
                    frames: 1,
                    before: 0,
                }],
            })),
        },
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

fn read(c: &mut IndexClient) -> Result<u64, String> {
    let l = c
        .lookup(0, &[x()], &[HOST], false)
        .map_err(|e| e.to_string())?;
    Ok(l.frames.iter().sum())
}

/// A writer of the counter and readers of it, on their own threads: one
/// reader that may ask any replica, and one bound to each replica (so a
/// replica that answered from a stale state would be caught).
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    writer: std::thread::JoinHandle<Vec<(Instant, u64)>>,
    readers: Vec<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    fn start(idx: &IndexCluster) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), acked.clone());
        let mut c = idx.client();
        let session = 0x5eed_0001;
        let writer = std::thread::spawn(move || {
            let mut acks = Vec::new();
            let mut seq = 1;
            while !s.load(Ordering::SeqCst) {
                // A failed write is sent again under the same sequence
                // number: applied once whatever happened to the first try.
                if add_one(&mut c, session, seq).is_ok() {
                    a.store(seq, Ordering::SeqCst);
                    acks.push((Instant::now(), seq));
                    seq += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            acks
        });
        let mut clients = vec![("any replica".to_owned(), idx.client())];
        for r in &idx.reps {
            let mut c = IndexClient::new(
                std::slice::from_ref(&r.addr),
                pagecast_tests::pki::tls("operator", pagecast_channel::Role::Operator),
            )
            .expect("an address");
            c.timeout = Duration::from_secs(5);
            clients.push((format!("replica {}", r.id), c));
        }
        let readers = clients
            .into_iter()
            .map(|(who, mut c)| {
                let (s, a) = (stop.clone(), acked.clone());
                std::thread::spawn(move || {
                    let (mut reads, mut stale) = (0, Vec::new());
                    while !s.load(Ordering::SeqCst) {
                        let floor = a.load(Ordering::SeqCst);
                        if let Ok(v) = read(&mut c) {
                            reads += 1;
                            if v < floor {
                                stale.push(format!(
                                    "through {who}: read {v} after {floor} writes were acknowledged"
                                ));
                            }
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    (reads, stale)
                })
            })
            .collect();
        Load {
            stop,
            acked,
            writer,
            readers,
        }
    }

    fn wait_acked(&self, n: u64, within: Duration) {
        eventually(within, "acknowledged writes", || {
            let a = self.acked.load(Ordering::SeqCst);
            if a >= n {
                Ok(())
            } else {
                Err(format!("{a} of {n}"))
            }
        });
    }

    fn stop(self) -> (Vec<(Instant, u64)>, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let acks = self.writer.join().expect("the writer");
        let (mut reads, mut stale) = (0, Vec::new());
        for r in self.readers {
            let (n, s) = r.join().expect("a reader");
            reads += n;
            stale.extend(s);
        }
        (acks, reads, stale)
    }
}

/// The longest time between two acknowledged writes after `from`.
fn longest_gap(acks: &[(Instant, u64)], from: Instant) -> Duration {
    let mut prev = from;
    let mut worst = Duration::ZERO;
    for (t, _) in acks.iter().filter(|(t, _)| *t >= from) {
        worst = worst.max(t.duration_since(prev));
        prev = *t;
    }
    worst
}

/// Waits until replica `i` has applied as far as the rest in shard 0.
fn caught_up(idx: &IndexCluster, i: usize, within: Duration) {
    eventually(within, "the replica caught up", || {
        let others: Vec<u64> = (0..3)
            .filter(|&j| j != i)
            .filter_map(|j| idx.status(j))
            .filter_map(|s| s.shards.first().map(|x| x.applied))
            .collect();
        let mine = idx
            .status(i)
            .and_then(|s| s.shards.first().map(|x| x.applied))
            .ok_or("it does not answer")?;
        match others.iter().max() {
            Some(&top) if mine >= top => Ok(()),
            top => Err(format!("applied {mine}, the others {top:?}")),
        }
    });
}

/// The leader of shard 0 is cut off from the other replicas by nftables,
/// its process running, its connections open and clients still reaching
/// it: within seconds another replica leads and writes go on; no read
/// returns less than was acknowledged before it began (the old leader,
/// which clients still ask, must not answer from its stale state); healed,
/// the old leader catches up.
#[test]
fn a_partitioned_leader_costs_seconds_and_no_read_goes_back() {
    if !needs(
        "a_partitioned_leader_costs_seconds_and_no_read_goes_back",
        &[Need::Root, Need::Nftables, Need::Cgroup2],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut idx, groups) = IndexCluster::start_in_groups(dir.path(), 1, "pagecast-part");
    let load = Load::start(&idx);
    load.wait_acked(20, Duration::from_secs(30));
    let old = idx.leader_of(0).expect("a leader");
    let partition = Partition::new();
    let peers: Vec<(&Group, u16)> = (0..3)
        .filter(|&i| i != old)
        .map(|i| (&*groups[i], idx.port(i)))
        .collect();
    partition.cut_between(&groups[old], idx.port(old), &peers);
    let cut_at = Instant::now();
    // The cut is real: the old leader runs and answers clients, yet within
    // seconds it knows it leads no one.
    assert!(idx.running(old), "the partitioned replica runs on");
    eventually(
        Duration::from_secs(10),
        "the old leader steps down",
        || match idx.status(old) {
            Some(s) if s.shards.iter().all(|x| x.role != "leader") => Ok(()),
            Some(_) => Err("it still leads".to_owned()),
            None => Err("it does not answer its clients".to_owned()),
        },
    );
    let before = load.acked.load(Ordering::SeqCst);
    load.wait_acked(before + 50, Duration::from_secs(30));
    let new = eventually(Duration::from_secs(10), "a new leader", || {
        match (0..3).filter(|&i| i != old).find(|&i| {
            idx.status(i)
                .is_some_and(|s| s.shards.iter().any(|x| x.role == "leader"))
        }) {
            Some(i) => Ok(i),
            None => Err("none of the others leads".to_owned()),
        }
    });
    // Writes go on for a while on the majority, then the network heals.
    std::thread::sleep(Duration::from_secs(3));
    partition.heal();
    caught_up(&idx, old, Duration::from_secs(60));
    let during = load.acked.load(Ordering::SeqCst) - before;
    let (acks, reads, stale) = load.stop();
    let gap = longest_gap(&acks, cut_at);
    eprintln!(
        "replica {} cut off, replica {} leads; {during} writes during the cut, longest gap \
         {gap:?}; {reads} reads",
        old + 1,
        new + 1
    );
    assert!(stale.is_empty(), "stale reads: {stale:?}");
    assert!(reads > 50, "only {reads} reads");
    assert!(
        gap < Duration::from_secs(10),
        "writes stopped for {gap:?} after the cut"
    );
    // Every acknowledged write is there, once.
    let last = acks.last().map_or(0, |a| a.1);
    let mut c = idx.client();
    assert_eq!(read(&mut c).unwrap(), last);
    idx.kill(old);
    drop(idx);
}

/// Writes `n` deltas of distinct contents for host `HOST + 1` to shard 0,
/// in batches: enough bytes to reach a replica's disk quickly.
fn burst(idx: &IndexCluster, n: u32) {
    let mut c = idx.client();
    for b in 0..n.div_ceil(4096) {
        let deltas = (0..4096)
            .map(|i| {
                let mut h = [0u8; 32];
                h[..4].copy_from_slice(&(b * 4096 + i).to_be_bytes());
                h[4] = 0x5a;
                HolderDelta {
                    hash: h.to_vec().into(),
                    host: HOST + 1,
                    frames: 1,
                    before: 0,
                }
            })
            .collect();
        c.write(
            0,
            IndexCommand {
                client: 0,
                seq: 0,
                op: Some(Op::Deltas(HolderDeltas { deltas })),
            },
        )
        .expect("the majority takes the burst");
    }
}

/// A replica whose disk fills up: it says so and stops serving, while the
/// other two go on taking writes; when the space returns it starts again
/// by itself and catches up; every acknowledged write is there, on it too.
#[test]
fn a_replica_with_its_disk_full_says_so_and_catches_up_when_space_returns() {
    if !needs(
        "a_replica_with_its_disk_full_says_so_and_catches_up_when_space_returns",
        &[Need::Root, Need::Tmpfs],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("small"), 64);
    let mut opts = vec![ReplicaOpts::default(); 3];
    opts[2].data = Some(fs.path().join("replica3"));
    let mut idx = IndexCluster::start_with(dir.path(), 1, opts);
    let load = Load::start(&idx);
    load.wait_acked(20, Duration::from_secs(30));
    let filled = fs.fill();
    burst(&idx, 40_000);
    // Replica 3 found its disk full: it says so, in words an operator can
    // act on, and waits in its process.
    let said = "this replica waits for";
    eventually(
        Duration::from_secs(60),
        "replica 3 says its disk is full",
        || {
            let log = idx.log(2);
            if log.contains(said) {
                Ok(())
            } else {
                burst(&idx, 4096);
                Err(format!(
                    "its log: {}",
                    log.lines().last().unwrap_or_default()
                ))
            }
        },
    );
    assert!(idx.running(2), "replica 3 waits, it did not exit");
    assert!(
        idx.status(2).is_none(),
        "replica 3 serves with its disk full"
    );
    let before = load.acked.load(Ordering::SeqCst);
    load.wait_acked(before + 50, Duration::from_secs(30));
    // The space returns: it starts again by itself and catches up.
    fs.empty();
    caught_up(&idx, 2, Duration::from_secs(60));
    let (acks, reads, stale) = load.stop();
    assert!(stale.is_empty(), "stale reads: {stale:?}");
    assert!(reads > 50, "only {reads} reads");
    let last = acks.last().map_or(0, |a| a.1);
    let mut c = idx.client();
    assert_eq!(read(&mut c).unwrap(), last);
    // Replica 3's own state holds every acknowledged write.
    let mut mine = IndexClient::new(
        std::slice::from_ref(&idx.reps[2].addr),
        pagecast_tests::pki::tls("operator", pagecast_channel::Role::Operator),
    )
    .unwrap();
    let l = mine.lookup(0, &[x()], &[HOST], true).unwrap();
    assert_eq!(l.frames.iter().sum::<u64>(), last);
    eprintln!(
        "filled {filled} bytes; replica 3 said: {}",
        idx.log(2)
            .lines()
            .find(|l| l.contains(said))
            .unwrap_or_default()
    );
}

/// An agent whose disk fills up (its data directory and its log on a full
/// tmpfs): it needs no disk to run, receive and send VMs, so it serves on
/// and every VM it acknowledged runs (losing log lines meanwhile does not
/// stop it); and an agent that cannot create its data directory there says
/// why, and starts once there is room.
#[test]
fn an_agent_with_its_disk_full_serves_on_and_says_what_it_cannot_do() {
    if !needs(
        "an_agent_with_its_disk_full_serves_on_and_says_what_it_cannot_do",
        &[Need::Root, Need::Tmpfs, Need::Kvm],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fs = Tmpfs::mount_with(&d.join("small"), 24, Some(64));
    let data = fs.path().join("data");
    // An image in its data directory, written while there was room.
    let out = cli(
        d,
        &[
            "synth",
            "--out",
            data.to_str().unwrap(),
            "--family",
            "web",
            "--vms",
            "1",
            "--memory",
            "8MiB",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let full = AgentProc::start(fs.path(), "ha", &["--data", data.to_str().unwrap()]);
    let other = AgentProc::start(d, "hb", &[]);
    fs.fill();
    assert!(fs.free() < 4096, "{} bytes left", fs.free());
    // A VM from its image (a path relative to --data), one migrated in,
    // one migrated out: all acknowledged, all running where they should.
    let vm = |agent: &AgentProc, name: &str, what: &[&str]| {
        let mut args = vec![
            "vm",
            "start",
            "--agent",
            &agent.addr,
            "--name",
            name,
            "--json",
        ];
        args.extend_from_slice(what);
        cli_json(d, &args)
    };
    vm(
        &full,
        "img1",
        &["--image", "web-0.raw", "--dirty-rate", "500"],
    );
    vm(
        &other,
        "in1",
        &[
            "--synthetic",
            "db",
            "--memory",
            "16MiB",
            "--dirty-rate",
            "500",
        ],
    );
    let migrate = |vm: &str, from: &AgentProc, to: &AgentProc| {
        let r = cli_json(
            d,
            &[
                "migrate", "--vm", vm, "--from", &from.addr, "--to", &to.addr, "--json",
            ],
        );
        assert_eq!(r["verified"], true, "{r}");
    };
    migrate("in1", &other, &full);
    migrate("img1", &full, &other);
    let names = |a: &AgentProc| -> Vec<(String, String)> {
        let l = cli_json(d, &["vm", "list", "--agent", &a.addr, "--json"]);
        l["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap().to_owned(),
                    v["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(names(&full), [("in1".to_owned(), "running".to_owned())]);
    assert_eq!(names(&other), [("img1".to_owned(), "running".to_owned())]);
    // An agent whose data directory cannot be created there says why.
    let more = fs.path().join("more");
    let out = cli(
        d,
        &[
            "agent",
            "--name",
            "hc",
            "--listen",
            "127.0.0.1:0",
            "--data",
            more.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot create it") && err.contains("No space left on device"),
        "{err}"
    );
    // The space returns: that agent starts.
    fs.empty();
    let hc = AgentProc::start(d, "hc", &["--data", more.to_str().unwrap()]);
    assert!(names(&hc).is_empty());
}
