//! A large shard caught up by a wiped replica through a streamed snapshot,
//! with the peak resident memory of the replica that sends it and of the
//! one that receives it.
//!
//! Replicas 1 and 2 of a one-shard `pagecast index serve` cluster start
//! with the same state: `PAGECAST_BENCH_SNAPSHOT_HASHES` holder lists
//! (default 50,000,000, one holder each), written as one RocksDB table
//! file and ingested by both, at raft index 5 with the log compacted
//! there. Replica 3 starts empty, so the leader can only send it a
//! snapshot. Reported: the time until replica 3 has applied index 5 and
//! counts every hash, each process's peak resident memory (`VmHWM`), and
//! beside them the bytes the snapshot carries, which a snapshot sent as
//! one message would have held in memory on both sides. Target (issue
//! 27): under 1 GiB resident on each side.
//!
//! Run: `cargo build --release -p pagecast-cli && cargo bench -p
//! pagecast-benches --bench snapshot` (about 5 GB of disk for 50 M).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagecast_benches::env_or;
use pagecast_index::keys;
use pagecast_index::raftlog::ShardStorage;
use pagecast_index::store::{CF_HOLDERS, Store};
use pagecast_tests::cluster::IndexCluster;
use raft::eraftpb::{Entry, HardState};

/// The raft index both full replicas start at.
const AT: u64 = 5;
/// Its term.
const TERM: u64 = 2;

/// The `i`th of `n` hashes: spread evenly over the hash space in order,
/// the rest of its bytes from BLAKE3, never the zero page.
fn key(i: u64, n: u64) -> [u8; 33] {
    let step = u64::MAX / n.max(1);
    let mut k = [0u8; 33];
    k[0] = keys::HOLDERS;
    k[1..9].copy_from_slice(&(i * step).to_be_bytes());
    k[9..].copy_from_slice(&blake3::hash(&i.to_le_bytes()).as_bytes()[..24]);
    k[32] |= 1;
    k
}

/// Writes the holder lists into one table file.
fn write_table(path: &Path, n: u64) {
    let opts = rocksdb::Options::default();
    let mut w = rocksdb::SstFileWriter::create(&opts);
    w.open(path).expect("a table file");
    for i in 0..n {
        // One holder, host 1 to 16, one frame: (gap, frames) LEB128.
        let host = (i % 16 + 1) as u8;
        w.put(key(i, n), [host, 1]).expect("keys in order");
    }
    w.finish().expect("the table file");
}

/// Gives replica `id`'s directory the shard's state at index [`AT`].
fn prepare(dir: &Path, id: u64, table: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let store = Arc::new(Store::open(dir, id, 1, true).unwrap());
    let link = dir.join("bench-holders.sst");
    std::fs::hard_link(table, &link).unwrap();
    let mut o = rocksdb::IngestExternalFileOptions::default();
    o.set_move_files(true);
    store
        .db()
        .ingest_external_file_cf_opts(store.cf(CF_HOLDERS), &o, vec![link])
        .unwrap();
    let log = ShardStorage::open(store.clone(), 0, &[1, 2, 3]).unwrap();
    let entries: Vec<Entry> = (1..=AT)
        .map(|index| Entry {
            index,
            term: TERM,
            ..Default::default()
        })
        .collect();
    let hs = HardState {
        term: TERM,
        vote: 1,
        commit: AT,
        ..Default::default()
    };
    log.append(&entries, Some(&hs)).unwrap();
    let empty: Vec<(u64, Option<pagecast_proto::v1::IndexCommand>)> =
        (1..=AT).map(|i| (i, None)).collect();
    store.apply(0, &empty, TERM).unwrap();
    log.compact(AT).unwrap();
}

/// Peak resident memory of process `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}

fn main() {
    let n: u64 = env_or("PAGECAST_BENCH_SNAPSHOT_HASHES", 50_000_000);
    let root = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let table = root.path().join("holders.sst");
    write_table(&table, n);
    let table_bytes = std::fs::metadata(&table).unwrap().len();
    for id in 1..=2 {
        prepare(&root.path().join(format!("replica{id}")), id, &table);
    }
    std::fs::remove_file(&table).unwrap();
    println!(
        "snapshot: a shard of {n} hashes ({:.0} MiB of holder lists in one table file), \
         prepared on replicas 1 and 2 in {:.1} s",
        mib(table_bytes),
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let c = IndexCluster::start(root.path(), 1);
    let mut caught_up = None;
    let deadline = Instant::now() + Duration::from_secs(3600);
    while Instant::now() < deadline {
        if let Some(st) = c.status(2)
            && st.shards[0].applied >= AT
        {
            caught_up = Some(t.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let Some(took) = caught_up else {
        panic!("replica 3 did not catch up\n{}", c.logs());
    };
    let rss: Vec<u64> = (0..3).map(|i| c.pid(i).map_or(0, peak_rss)).collect();
    let sender = (0..2)
        .find(|i| {
            c.status(*i)
                .is_some_and(|s| s.shards[0].snapshots_sent >= 1)
        })
        .expect("a replica sent the snapshot");
    let mut client = c.client();
    client.timeout = Duration::from_secs(600);
    client.attempt_timeout = Duration::from_secs(600);
    let counted = client
        .status_counted(&c.reps[2].addr, true)
        .map(|s| s.shards[0].distinct_hashes)
        .unwrap_or(0);
    assert_eq!(counted, n, "replica 3 holds {counted} of {n} hashes");
    let received = c.status(2).unwrap().shards[0].snapshots_received;
    println!(
        "  replica 3 (wiped) caught up in {:.1} s through {received} snapshot(s); it counts all {counted} hashes",
        took.as_secs_f64()
    );
    println!(
        "  peak resident memory: sender (replica {}) {:.0} MiB, receiver {:.0} MiB (target: under 1024 MiB each)",
        sender + 1,
        mib(rss[sender]),
        mib(rss[2])
    );
    println!(
        "  beside: the snapshot's state is {:.0} MiB of holder lists, what one raft message would have held; \
         receiver's peak {:.2}x of it",
        mib(table_bytes),
        rss[2] as f64 / table_bytes as f64
    );
    drop(c);
}
