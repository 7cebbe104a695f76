//! Content-index benchmark: replicated ingest against raw RocksDB, batched
//! lookups, and bytes on disk per distinct hash.
//!
//! 1. Ingest: holder deltas per second into one shard with 3 replicas on
//!    loopback (each its own RocksDB and raft node, raft log synced on
//!    append as `index serve` does by default), written by 4 clients in
//!    batches; beside the same deltas written as raw RocksDB `WriteBatch`es
//!    (one synced batch per client batch) in the same run. Target (issue
//!    27): 0.6x of raw RocksDB or better.
//! 2. Lookups: hashes looked up per second in batches of 4,096, through
//!    the leader (ReadIndex) and stale from a follower.
//! 3. Bytes on disk per distinct hash after a full compaction of every
//!    column family of a replica, with a third of the hashes held by two
//!    hosts: the index state (holders, meta, raft state) per hash, target
//!    64 B or less, and beside it the raft log's tail, which compaction
//!    bounds (512 entries or 32 MiB appended) whatever the number of
//!    hashes.
//!
//! Run: `cargo bench -p pagecast-benches --bench index`
//! (`PAGECAST_BENCH_INDEX_DELTAS=N` changes the 1,000,000 deltas.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagecast_benches::{env_or, median, process_cpu_seconds, raw_rocksdb, start_replicas};
use pagecast_channel::Role;
use pagecast_channel::ca::Authority;
use pagecast_index::client::IndexClient;
use pagecast_index::store::Store;
use pagecast_pages::PageHash;
use pagecast_proto::v1::{HolderDelta, HolderDeltas, IndexCommand, index_command::Op};

const BATCH: usize = 8192;
const WRITERS: usize = 4;

fn hash(i: u64) -> PageHash {
    let mut b = *blake3::hash(&i.to_le_bytes()).as_bytes();
    b[31] |= 1;
    PageHash::from_bytes(b)
}

/// Deltas of writer `w`: hash i for i = w, w + WRITERS, ...; host 1 for
/// all, and host 2 as well for every third hash.
fn deltas(w: usize, n: u64) -> Vec<HolderDelta> {
    let mut out = Vec::new();
    let mut i = w as u64;
    while i < n {
        let h = hash(i).as_bytes().to_vec();
        out.push(HolderDelta {
            hash: h.clone().into(),
            host: 1,
            frames: 1,
            before: 0,
        });
        if i.is_multiple_of(3) {
            out.push(HolderDelta {
                hash: h.into(),
                host: 2,
                frames: 2,
                before: 0,
            });
        }
        i += WRITERS as u64;
    }
    out
}

/// Seconds until no replica's database runs a flush or a compaction or
/// has one pending in any column family, first seen then and confirmed
/// by two more looks 100 ms apart (at most 120 s, said if reached).
fn wait_idle(reps: &[pagecast_index::replica::Replica]) -> f64 {
    use pagecast_index::store::{CF_HOLDERS, CF_LOG, CF_META, CF_RAFT};
    let t = Instant::now();
    let busy = |r: &pagecast_index::replica::Replica| {
        let store = r.store();
        let db = store.db();
        let int = |v: Result<Option<u64>, rocksdb::Error>| v.ok().flatten().unwrap_or(0);
        let running = int(db.property_int_value("rocksdb.num-running-compactions"))
            + int(db.property_int_value("rocksdb.num-running-flushes"));
        let pending: u64 = [CF_LOG, CF_RAFT, CF_META, CF_HOLDERS]
            .into_iter()
            .map(|cf| {
                let cf = store.cf(cf);
                int(db.property_int_value_cf(cf, "rocksdb.compaction-pending"))
                    + int(db.property_int_value_cf(cf, "rocksdb.mem-table-flush-pending"))
            })
            .sum();
        running + pending > 0
    };
    let mut quiet_since: Option<Duration> = None;
    let mut looks = 0;
    while looks < 3 {
        if t.elapsed() > Duration::from_secs(120) {
            println!("  (the replicas were still flushing or compacting after 120 s)");
            break;
        }
        if reps.iter().any(busy) {
            (quiet_since, looks) = (None, 0);
        } else {
            quiet_since.get_or_insert(t.elapsed());
            looks += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    quiet_since.unwrap_or(t.elapsed()).as_secs_f64()
}

fn main() {
    let n: u64 = env_or("PAGECAST_BENCH_INDEX_DELTAS", 1_000_000);
    let root = tempfile::tempdir().unwrap();
    let ca = Authority::generate().unwrap();
    let client_tls = ca.issue("bench", Role::Operator, 1).unwrap();
    let (reps, addrs) = start_replicas(root.path(), &ca, 3, 1);
    // Wait for a leader.
    let mut c = IndexClient::new(&addrs, client_tls.clone()).unwrap();
    let t = Instant::now();
    while c.lookup(0, &[hash(u64::MAX)], &[], false).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "no leader");
    }

    let all: Vec<Vec<HolderDelta>> = (0..WRITERS).map(|w| deltas(w, n)).collect();
    let total: usize = all.iter().map(Vec::len).sum();
    println!(
        "index ingest: {total} holder deltas ({n} distinct hashes), batches of {BATCH}, {WRITERS} writers"
    );

    // Raw RocksDB first and last, replicated ingest between: the raw figure
    // is the mean of the two, so drift in the machine shows in both.
    let raw1 = raw_rocksdb(&all, BATCH);
    let cpu = process_cpu_seconds();
    let t = Instant::now();
    std::thread::scope(|s| {
        for (w, ds) in all.iter().enumerate() {
            let (addrs, client_tls) = (&addrs, &client_tls);
            s.spawn(move || {
                let mut c = IndexClient::new(addrs, client_tls.clone()).unwrap();
                for (i, chunk) in ds.chunks(BATCH).enumerate() {
                    let cmd = IndexCommand {
                        client: 1000 + w as u64,
                        seq: i as u64 + 1,
                        op: Some(Op::Deltas(HolderDeltas {
                            deltas: chunk.to_vec(),
                        })),
                    };
                    c.write(0, cmd).unwrap();
                }
            });
        }
    });
    let secs = t.elapsed().as_secs_f64();
    let replicated = total as f64 / secs;
    let busy = (process_cpu_seconds() - cpu) / secs;
    // The replicas' flushes and compactions of what they took run on after
    // the last acknowledgement; let them finish so the second baseline run
    // has the machine to itself, as the first had.
    let idle = wait_idle(&reps);
    let raw2 = raw_rocksdb(&all, BATCH);
    let raw = (raw1 + raw2) / 2.0;
    println!(
        "  raw RocksDB WriteBatch (synced): {raw:>12.0} deltas/s  (mean of runs {raw1:.0}, {raw2:.0})"
    );
    println!(
        "  3 replicas, raft + RocksDB:      {replicated:>12.0} deltas/s  ({busy:.2} cores busy; \
         their flushes and compactions went on {idle:.1} s after the last write)"
    );
    println!(
        "  ratio {:.2}x of raw RocksDB (issue target >= 0.60x); counting the replicas' \
         work after the last write, {:.0} deltas/s, {:.2}x",
        replicated / raw,
        total as f64 / (secs + idle),
        total as f64 / (secs + idle) / raw
    );

    // Lookups.
    let leader = (0..3)
        .find(|i| {
            IndexClient::new(&[addrs[*i].clone()], client_tls.clone())
                .unwrap()
                .status_of(&addrs[*i])
                .is_ok_and(|s| s.shards[0].role == "leader")
        })
        .unwrap();
    let follower = (leader + 1) % 3;
    let probe: Vec<PageHash> = (0..200_000u64).map(|i| hash(i * 7 % n.max(1))).collect();
    let mut rates = BTreeMap::new();
    for (label, at, stale) in [
        ("leader, linearizable", leader, false),
        ("follower, stale", follower, true),
    ] {
        let mut c = IndexClient::new(&[addrs[at].clone()], client_tls.clone()).unwrap();
        let mut runs = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let mut found = 0;
            for chunk in probe.chunks(4096) {
                found += c.lookup(0, chunk, &[], stale).unwrap().hash_index.len();
            }
            assert!(found >= probe.len());
            runs.push(probe.len() as f64 / t.elapsed().as_secs_f64());
        }
        rates.insert(label, median(&mut runs));
    }
    println!("batched lookups (4,096 hashes per request, one client, median of 3):");
    for (l, r) in &rates {
        println!("  {l:<22} {r:>12.0} hashes/s");
    }

    // Bytes per distinct hash after compaction.
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "bytes on disk per distinct hash after full compaction ({n} hashes, a third with 2 holders):"
    );
    for (i, r) in reps.iter().enumerate() {
        let store: &Arc<Store> = r.store();
        store.compact_all().unwrap();
        let by_cf = store.disk_bytes().unwrap();
        let distinct = store.count_distinct(0).unwrap();
        assert_eq!(distinct, n, "replica {} holds {distinct} hashes", i + 1);
        let per = |b: u64| b as f64 / distinct as f64;
        let log: u64 = by_cf.iter().filter(|c| c.0 == "log").map(|c| c.1).sum();
        let state: u64 = by_cf.iter().filter(|c| c.0 != "log").map(|c| c.1).sum();
        let parts: Vec<String> = by_cf
            .iter()
            .filter(|c| c.0 != "log")
            .map(|(cf, b)| format!("{cf} {:.1}", per(*b)))
            .collect();
        println!(
            "  replica {}: {:.1} B/hash of index state ({}) (target <= 64); \
             raft log tail {:.1} MiB more ({:.1} B/hash here), bounded by the compaction triggers",
            i + 1,
            per(state),
            parts.join(", "),
            log as f64 / f64::from(1 << 20),
            per(log)
        );
    }
}
