//! A checked history of the index under faults: clients publish holder
//! deltas, write VM records and read both, each operation recorded with
//! when it was invoked and completed, while replicas are killed, frozen
//! (SIGSTOP) and cut off by nftables (connections held open); then
//! `pagecast_tests::history::check` verifies that every acknowledged
//! delta was applied exactly once and that no read was stale. The first
//! tests show the checker catching planted faults.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pagecast_index::client::{ClientError, IndexClient};
use pagecast_pages::PageHash;
use pagecast_proto::v1::{
    HolderDelta, HolderDeltas, IndexCommand, PutVm, RegisterHost, VmRecord, VmState,
    index_command::Op,
};
use pagecast_testkit::{Need, needs};
use pagecast_tests::cluster::IndexCluster;
use pagecast_tests::history::{Checked, History, Kind, Op as HOp, Outcome, check};
use pagecast_tests::host::{Group, Partition};

fn op(key: &str, kind: Kind, invoked_ms: u64, completed_ms: u64) -> HOp {
    HOp {
        process: 0,
        key: key.into(),
        kind,
        invoked: Duration::from_millis(invoked_ms),
        completed: Duration::from_millis(completed_ms),
    }
}

fn write(key: &str, value: u64, outcome: Outcome, at: u64, done: u64) -> HOp {
    op(key, Kind::Write { value, outcome }, at, done)
}

fn read(key: &str, value: u64, at: u64, done: u64) -> HOp {
    op(key, Kind::Read { value }, at, done)
}

fn finals(kv: &[(&str, u64)]) -> BTreeMap<String, u64> {
    kv.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

#[test]
fn the_checker_passes_a_linearizable_history() {
    let h = vec![
        write("a", 1, Outcome::Ok, 0, 10),
        // Concurrent with the write: either value is fine.
        read("a", 0, 5, 8),
        read("a", 1, 6, 9),
        read("a", 1, 11, 12),
        write("b", 1, Outcome::Unknown, 0, 50),
        read("b", 0, 60, 61),
        write("v", 1, Outcome::Ok, 0, 1),
        write("v", 2, Outcome::Unknown, 2, 30),
        write("v", 3, Outcome::Ok, 31, 40),
        read("v", 2, 20, 35),
    ];
    let c = check(&h, &finals(&[("a", 1), ("b", 0), ("v", 3)]));
    assert!(c.violations.is_empty(), "{:?}", c.violations);
    assert_eq!((c.keys, c.acknowledged, c.unknown, c.reads), (3, 3, 2, 5));
    // An unknown write may also have been applied.
    let c = check(&h, &finals(&[("a", 1), ("b", 1), ("v", 3)]));
    assert!(c.violations.is_empty(), "{:?}", c.violations);
}

#[test]
fn the_checker_catches_a_planted_stale_read() {
    let h = vec![
        write("a", 1, Outcome::Ok, 0, 10),
        // Invoked after the acknowledgement, yet it sees nothing.
        read("a", 0, 11, 12),
    ];
    let c = check(&h, &finals(&[("a", 1)]));
    assert_eq!(c.violations.len(), 1, "{:?}", c.violations);
    assert!(c.violations[0].contains("stale read"), "{:?}", c.violations);
}

#[test]
fn the_checker_catches_reads_going_back_and_from_the_future() {
    // The write's outcome is unknown, so no acknowledgement makes the
    // second read stale; the first read that saw it does.
    let back = vec![
        write("a", 1, Outcome::Unknown, 0, 100),
        read("a", 1, 10, 20),
        read("a", 0, 30, 40),
    ];
    let c = check(&back, &finals(&[("a", 1)]));
    assert_eq!(c.violations.len(), 1, "{:?}", c.violations);
    assert!(
        c.violations[0].contains("after a read"),
        "{:?}",
        c.violations
    );
    let future = vec![read("a", 1, 0, 5), write("a", 1, Outcome::Ok, 10, 20)];
    let c = check(&future, &finals(&[("a", 1)]));
    assert!(
        c.violations.iter().any(|v| v.contains("before its write")),
        "{:?}",
        c.violations
    );
}

#[test]
fn the_checker_catches_lost_and_duplicated_writes() {
    let h = vec![
        write("a", 1, Outcome::Ok, 0, 10),
        write("b", 1, Outcome::Unknown, 0, 10),
        write("c", 1, Outcome::Failed, 0, 10),
    ];
    // a lost; b applied twice; c refused yet applied.
    let c = check(&h, &finals(&[("a", 0), ("b", 2), ("c", 1)]));
    assert_eq!(c.violations.len(), 3, "{:?}", c.violations);
    assert!(c.violations[0].contains("acknowledged write lost"), "{c:?}");
    assert!(c.violations[1].contains("applied twice"), "{c:?}");
    assert!(c.violations[2].contains("refused write applied"), "{c:?}");
}

/// The host number the delta writers publish as.
const HOST: u32 = 77;

/// A fresh content of `shard` (of `shards`) for writer `w`'s `n`th write.
fn content(w: usize, n: u64, shard: u32, shards: u32) -> PageHash {
    let mut b = *blake3::hash(format!("history {w} {n}").as_bytes()).as_bytes();
    // First two bytes pick the shard (as `keys::shard_of` reads them).
    let p = ((shard << 16) / shards) as u16 + 1;
    b[..2].copy_from_slice(&p.to_be_bytes());
    PageHash::from_bytes(b)
}

fn outcome(r: &Result<(), ClientError>) -> Outcome {
    match r {
        Ok(()) => Outcome::Ok,
        Err(ClientError::Refused { .. }) => Outcome::Failed,
        Err(_) => Outcome::Unknown,
    }
}

/// The clients of the run, each on its own thread, recording into `h`.
struct Clients {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Contents written so far, by shard, for the readers to sample.
    written: Arc<std::sync::Mutex<Vec<Vec<PageHash>>>>,
}

const SHARDS: u32 = 4;
const DELTA_WRITERS: usize = 3;
const VMS: [&str; 2] = ["hist-vm-a", "hist-vm-b"];

fn client(idx: &IndexCluster) -> IndexClient {
    let mut c = idx.client();
    // Gives up well within the run: some outcomes stay unknown.
    c.timeout = Duration::from_millis(1500);
    c
}

/// What the client threads share: the history, the stop flag and the
/// contents written so far, by shard (for the readers to sample).
#[derive(Clone)]
struct Shared {
    h: Arc<History>,
    stop: Arc<AtomicBool>,
    written: Arc<std::sync::Mutex<Vec<Vec<PageHash>>>>,
}

impl Shared {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::SeqCst)
    }
}

/// Delta writer `w`: a fresh content per write, round robin over the
/// shards, each write under its own session's next sequence number.
fn delta_writer(mut c: IndexClient, s: Shared, w: usize) {
    let mut n = 0u64;
    while s.running() {
        let shard = (n % u64::from(SHARDS)) as u32;
        let x = content(w, n, shard, SHARDS);
        s.written.lock().unwrap()[shard as usize].push(x);
        let t = Instant::now();
        let delta = HolderDelta {
            hash: x.as_bytes().to_vec().into(),
            host: HOST,
            frames: 1,
            before: 0,
        };
        let cmd = IndexCommand {
            client: 0x4157_0000 + w as u64,
            seq: n + 1,
            op: Some(Op::Deltas(HolderDeltas {
                deltas: vec![delta],
            })),
        };
        let r = c.write(shard, cmd).map(|_| ());
        let kind = Kind::Write {
            value: 1,
            outcome: outcome(&r),
        };
        s.h.record(w, &x.to_string(), kind, t);
        n += 1;
    }
}

/// The VM-record writer: moves each record through versions (kept in its
/// `frames` field).
fn vm_writer(mut c: IndexClient, s: Shared, vm_host: u32) {
    let mut version = 0u64;
    while s.running() {
        version += 1;
        for (i, vm) in VMS.iter().enumerate() {
            let rec = VmRecord {
                name: (*vm).to_owned(),
                host: vm_host,
                frames: version,
                digest: vec![0u8; 32].into(),
                sketch: pagecast_pages::sketch::Sketch::default().to_bytes().into(),
                state: VmState::Running as i32,
                ..VmRecord::default()
            };
            let t = Instant::now();
            let cmd = IndexCommand {
                client: 0x564d_0000 + i as u64,
                seq: version,
                op: Some(Op::PutVm(PutVm { vm: Some(rec) })),
            };
            let r = c.write(0, cmd).map(|_| ());
            let kind = Kind::Write {
                value: version,
                outcome: outcome(&r),
            };
            s.h.record(DELTA_WRITERS, vm, kind, t);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reader `process`: the newest contents of each shard in turn (some still
/// being written) and a spread of older ones, and every fourth time the VM
/// records.
fn reader(mut c: IndexClient, s: Shared, process: usize) {
    let mut n = 0u64;
    while s.running() {
        n += 1;
        let shard = (n % u64::from(SHARDS)) as u32;
        let sample: Vec<PageHash> = {
            let all = &s.written.lock().unwrap()[shard as usize];
            let newest = all.iter().rev().take(12);
            let older = all.iter().step_by((all.len() / 12).max(1)).take(12);
            newest.chain(older).copied().collect()
        };
        if !sample.is_empty() {
            read_holders(&mut c, &s.h, process, shard, &sample);
        }
        if n.is_multiple_of(4) {
            read_vms(&mut c, &s.h, process);
        }
    }
}

impl Clients {
    fn start(idx: &IndexCluster, h: &Arc<History>, vm_host: u32) -> Clients {
        let shared = Shared {
            h: h.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            written: Arc::new(std::sync::Mutex::new(vec![Vec::new(); SHARDS as usize])),
        };
        let mut threads = Vec::new();
        for w in 0..DELTA_WRITERS {
            let (c, s) = (client(idx), shared.clone());
            threads.push(std::thread::spawn(move || delta_writer(c, s, w)));
        }
        let (c, s) = (client(idx), shared.clone());
        threads.push(std::thread::spawn(move || vm_writer(c, s, vm_host)));
        for r in 0..2 {
            let (c, s) = (client(idx), shared.clone());
            threads.push(std::thread::spawn(move || {
                reader(c, s, DELTA_WRITERS + 1 + r)
            }));
        }
        Clients {
            stop: shared.stop,
            threads,
            written: shared.written,
        }
    }

    /// Stops the clients; every content they wrote, by shard.
    fn stop(self) -> Vec<Vec<PageHash>> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("a client thread");
        }
        std::mem::take(&mut *self.written.lock().unwrap())
    }
}

/// A linearizable lookup of `hashes` (of `shard`), recorded per hash.
fn read_holders(c: &mut IndexClient, h: &History, process: usize, shard: u32, hashes: &[PageHash]) {
    let t = Instant::now();
    let Ok(l) = c.lookup(shard, hashes, &[HOST], false) else {
        return;
    };
    let mut frames = vec![0u64; hashes.len()];
    for (i, f) in l.hash_index.iter().zip(&l.frames) {
        frames[*i as usize] += f;
    }
    for (x, f) in hashes.iter().zip(frames) {
        h.record(process, &x.to_string(), Kind::Read { value: f }, t);
    }
}

/// A linearizable read of the VM records, recorded per VM.
fn read_vms(c: &mut IndexClient, h: &History, process: usize) {
    let t = Instant::now();
    let Ok(vms) = c.vms(false) else { return };
    for vm in VMS {
        let v = vms.iter().find(|r| r.name == vm).map_or(0, |r| r.frames);
        h.record(process, vm, Kind::Read { value: v }, t);
    }
}

/// One fault at a time, each healed before the next, on whichever replica
/// leads a shard when it starts.
fn nemesis(idx: &mut IndexCluster, groups: &[Arc<Group>], log: &mut Vec<String>) {
    let pause = |s: u64| std::thread::sleep(Duration::from_secs(s));
    let leader = |idx: &IndexCluster, shard: u32| idx.leader_of(shard).unwrap_or(0);
    pause(2);
    let k = leader(idx, 0);
    log.push(format!("killed replica {} (leader of shard 0)", k + 1));
    idx.kill(k);
    pause(3);
    idx.spawn(k);
    pause(2);
    let f = leader(idx, 1);
    log.push(format!("froze replica {} (leader of shard 1)", f + 1));
    idx.freeze(f);
    pause(4);
    idx.thaw(f);
    pause(2);
    let partition = Partition::new();
    let p = leader(idx, 2);
    log.push(format!(
        "cut replica {} off from everyone (leader of shard 2)",
        p + 1
    ));
    partition.cut(&groups[p], idx.port(p));
    pause(4);
    partition.heal();
    pause(2);
    // Cut off from its peers only: clients still reach it, and it must not
    // answer them from a state its peers have moved past.
    let q = leader(idx, 3);
    let peers: Vec<(&Group, u16)> = (0..3)
        .filter(|&i| i != q)
        .map(|i| (&*groups[i], idx.port(i)))
        .collect();
    log.push(format!(
        "cut replica {} off from its peers (leader of shard 3)",
        q + 1
    ));
    partition.cut_between(&groups[q], idx.port(q), &peers);
    pause(5);
    partition.heal();
    pause(2);
}

/// Every key's value after the run, read through the leaders.
fn final_values(c: &mut IndexClient, written: &[Vec<PageHash>]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (shard, hashes) in written.iter().enumerate() {
        for chunk in hashes.chunks(4096) {
            let l = c
                .lookup(shard as u32, chunk, &[HOST], false)
                .expect("a final lookup");
            for (i, f) in l.hash_index.iter().zip(&l.frames) {
                *out.entry(chunk[*i as usize].to_string()).or_insert(0) += f;
            }
        }
    }
    let vms = c.vms(false).expect("the final VM records");
    for vm in VMS {
        let v = vms.iter().find(|r| r.name == vm).map_or(0, |r| r.frames);
        out.insert(vm.to_owned(), v);
    }
    out
}

#[test]
fn a_history_under_kills_freezes_and_partitions_checks_out() {
    if !needs(
        "a_history_under_kills_freezes_and_partitions_checks_out",
        &[Need::Root, Need::Nftables, Need::Cgroup2],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut idx, groups) = IndexCluster::start_in_groups(dir.path(), SHARDS, "pagecast-hist");
    let mut c = idx.client();
    let vm_host = c
        .write(
            0,
            IndexCommand {
                client: 0,
                seq: 0,
                op: Some(Op::RegisterHost(RegisterHost {
                    name: "hist-host".into(),
                })),
            },
        )
        .expect("registering the VMs' host")
        .host;
    let h = Arc::new(History::new());
    let clients = Clients::start(&idx, &h, vm_host);
    let mut faults = Vec::new();
    nemesis(&mut idx, &groups, &mut faults);
    let written = clients.stop();
    idx.wait_leaders();
    let fin = final_values(&mut c, &written);
    let ops = h.ops();
    let t = Instant::now();
    let checked: Checked = check(&ops, &fin);
    eprintln!(
        "faults: {}; {} operations on {} keys: {} writes acknowledged, {} unknown, {} refused, \
         {} reads; checked in {:?}",
        faults.join("; "),
        ops.len(),
        checked.keys,
        checked.acknowledged,
        checked.unknown,
        checked.failed,
        checked.reads,
        t.elapsed()
    );
    assert!(
        checked.violations.is_empty(),
        "{} violations, first ones: {:#?}\n{}",
        checked.violations.len(),
        &checked.violations[..checked.violations.len().min(10)],
        idx.logs()
    );
    // The run did what it claims: writes and reads all through it.
    assert!(checked.acknowledged > 200, "{checked:?}");
    assert!(checked.reads > 1000, "{checked:?}");
    assert_eq!(faults.len(), 4);
}
