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

use std::time::{Duration, Instant};

use pagecast_benches::env_or;
use pagecast_tests::cluster::IndexCluster;
use pagecast_tests::shard_state::{AT, peak_rss, prepare_two};

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}

fn main() {
    let n: u64 = env_or("PAGECAST_BENCH_SNAPSHOT_HASHES", 50_000_000);
    let root = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let table_bytes = prepare_two(root.path(), n);
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
