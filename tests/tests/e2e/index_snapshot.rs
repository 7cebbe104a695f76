//! A wiped replica catching up through a snapshot streamed in parts while
//! the replica sending it is frozen mid-stream (SIGSTOP, its connections
//! open): the fetch gives the frozen sender up at the part deadline and
//! takes the next leader's snapshot; nothing half-fetched is installed.

use std::time::{Duration, Instant};

use pagecast_tests::cluster::{IndexCluster, ReplicaOpts};
use pagecast_tests::shard_state::{AT, prepare_two};

/// Holder lists in the shard: about 250 MB, a stream of some seconds.
const HASHES: u64 = 6_000_000;
/// `--snapshot-part-timeout` of the replicas.
const PART_SECS: u64 = 3;

fn wait_for(what: &str, limit: Duration, c: &IndexCluster, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < limit,
            "{what}: not within {limit:?}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The staging directory of the snapshot of shard 0 a replica fetches
/// under `incoming`, once its first table file is there, and the
/// snapshot's index. The index is AT or, once the leader has applied its
/// own first entry of the new term, just after it.
fn staged_snapshot(incoming: &std::path::Path) -> Option<(std::path::PathBuf, u64)> {
    std::fs::read_dir(incoming)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find_map(|p| {
            let index = p
                .file_name()?
                .to_str()?
                .strip_prefix("shard-0-")?
                .parse()
                .ok()?;
            p.join("holders-000001.sst").exists().then_some((p, index))
        })
}

#[test]
fn a_snapshot_sender_frozen_mid_stream_costs_the_receiver_one_part_deadline() {
    let root = tempfile::tempdir().unwrap();
    prepare_two(root.path(), HASHES);
    let opts = ReplicaOpts {
        extra: vec!["--snapshot-part-timeout".into(), PART_SECS.to_string()],
        ..ReplicaOpts::default()
    };
    let mut c = IndexCluster::start_with(root.path(), 1, vec![opts; 3]);
    // Replica 3 may have caught up while the cluster elected its leader
    // (on a busy machine that takes longer than the stream): start it
    // again, empty, and watch its fetch from the beginning.
    c.kill(2);
    std::fs::remove_dir_all(c.data_dir(2)).unwrap();
    c.spawn(2);
    let incoming = c.data_dir(2).join("pagecast-snapshots").join("in");
    // Replica 3 starts fetching the leader's snapshot: its first table
    // file appears. Freeze the replica that sent it.
    let mut staged = None;
    wait_for("the first part", Duration::from_secs(60), &c, || {
        staged = staged_snapshot(&incoming);
        staged.is_some()
    });
    let (staging, index) = staged.unwrap();
    assert!(index >= AT, "a snapshot at {index}, before {AT}");
    eprintln!("replica 3 fetches the snapshot at {index} (the shard was made at {AT})");
    let mut sender = None;
    wait_for("the sender", Duration::from_secs(10), &c, || {
        sender = (0..2).find(|i| {
            c.status(*i)
                .is_some_and(|s| s.shards[0].snapshots_sent >= 1)
        });
        sender.is_some()
    });
    let sender = sender.unwrap();
    c.freeze(sender);
    let frozen_at = Instant::now();
    assert!(
        !staging.join("done").exists(),
        "the stream ended before the freeze: the shard needs more hashes"
    );

    // The fetch gives the frozen sender up after one part deadline; the
    // other full replica leads and sends its own snapshot, which replica 3
    // fetches and installs.
    wait_for("replica 3 caught up", Duration::from_secs(90), &c, || {
        c.status(2).is_some_and(|s| s.shards[0].applied >= AT)
    });
    let took = frozen_at.elapsed();
    assert!(
        took >= Duration::from_secs(PART_SECS) && took < Duration::from_secs(PART_SECS + 30),
        "caught up {took:?} after the freeze"
    );
    let log = c.log(2);
    assert!(
        log.contains(&format!("fetching snapshot {index} failed")),
        "the frozen sender's stream was given up: {log}"
    );
    let other = 1 - sender;
    assert!(
        c.status(other)
            .is_some_and(|s| s.shards[0].snapshots_sent >= 1),
        "replica {} sent the snapshot that was installed",
        other + 1
    );
    let mut client = c.client();
    client.timeout = Duration::from_secs(60);
    client.attempt_timeout = Duration::from_secs(60);
    let counted = client.status_counted(&c.reps[2].addr, true).unwrap().shards[0].distinct_hashes;
    assert_eq!(counted, HASHES, "replica 3 holds every hash, none twice");

    // With the sender thawed, the cluster takes writes again.
    c.thaw(sender);
    client
        .write(
            0,
            pagecast_proto::v1::IndexCommand {
                client: 0,
                seq: 0,
                op: Some(pagecast_proto::v1::index_command::Op::RegisterHost(
                    pagecast_proto::v1::RegisterHost {
                        name: "after".into(),
                    },
                )),
            },
        )
        .unwrap();
}
