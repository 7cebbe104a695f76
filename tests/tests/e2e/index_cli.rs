//! `pagecast index` and `pagecast advise` as operators run them: three
//! replica processes on loopback, images published and queried through the
//! CLI, and failures injected by killing and wiping replicas.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagecast_index::client::IndexClient;
use pagecast_pages::PageHash;
use pagecast_proto::v1::{HolderDelta, HolderDeltas, IndexCommand, index_command::Op};
use pagecast_tests::{pagecast, pagecast_bin, pagecast_json};

use pagecast_tests::cluster::free_port;
use pagecast_tests::pki;

use pagecast_channel::{Role, Tls};
use pagecast_proto::v1::{RefusalCode, RegisterHost};

fn operator() -> Tls {
    pki::tls("operator", Role::Operator)
}

struct Replica {
    id: u64,
    addr: String,
    dir: PathBuf,
    log: PathBuf,
    child: Option<std::process::Child>,
}

struct Cluster {
    reps: Vec<Replica>,
    peers: String,
    shards: u32,
    _root: tempfile::TempDir,
}

impl Cluster {
    fn start(shards: u32) -> Cluster {
        Self::start_n(3, shards)
    }

    fn start_n(n: u64, shards: u32) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let reps: Vec<Replica> = (1..=n)
            .map(|id| Replica {
                id,
                addr: format!("127.0.0.1:{}", free_port()),
                dir: root.path().join(format!("r{id}")),
                log: root.path().join(format!("r{id}.log")),
                child: None,
            })
            .collect();
        let peers = reps
            .iter()
            .map(|r| format!("{}={}", r.id, r.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            reps,
            peers,
            shards,
            _root: root,
        };
        for i in 0..n as usize {
            c.spawn(i);
        }
        c.wait_leaders();
        c
    }

    /// Starts replica `i`'s `index serve`, told of the cluster by `how`
    /// (`--peers ...` or `--join ADDR`).
    fn serve(&mut self, i: usize, how: &[String]) {
        let r = &mut self.reps[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&r.log)
            .unwrap();
        let child = Command::new(pagecast_bin())
            .args([
                "index",
                "serve",
                "--id",
                &r.id.to_string(),
                "--listen",
                &r.addr,
            ])
            .args(how)
            .args(["--compact-after", "16", "--raft-log", "warning", "--data"])
            .arg(&r.dir)
            .arg("--tls")
            .arg(pki::node(&format!("index-{}", r.id), Role::Index))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning a replica");
        r.child = Some(child);
    }

    fn spawn(&mut self, i: usize) {
        let how = ["--peers", &self.peers, "--shards", &self.shards.to_string()].map(String::from);
        self.serve(i, &how);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.reps[i].child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn addrs(&self) -> String {
        self.addrs_of(self.reps.len())
    }

    /// The first `n` replicas' addresses, comma-separated.
    fn addrs_of(&self, n: usize) -> String {
        self.addr_list()[..n].join(",")
    }

    /// Every replica's address.
    fn addr_list(&self) -> Vec<String> {
        self.reps.iter().map(|r| r.addr.clone()).collect()
    }

    fn logs(&self) -> String {
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

    /// Status of replica `i` (distinct hashes counted exactly), or None
    /// if it does not answer.
    fn status(&self, i: usize) -> Option<pagecast_proto::v1::StatusResponse> {
        let mut c = IndexClient::new(&[self.reps[i].addr.clone()], operator()).unwrap();
        c.status_counted(&self.reps[i].addr, true).ok()
    }

    /// The replica index leading `shard`, among the running ones.
    fn leader_of(&self, shard: u32) -> Option<usize> {
        (0..self.reps.len())
            .filter(|i| self.reps[*i].child.is_some())
            .find(|i| {
                self.status(*i).is_some_and(|s| {
                    s.shards
                        .iter()
                        .any(|x| x.shard == shard && x.role == "leader")
                })
            })
    }

    fn wait_leaders(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if (0..self.shards).all(|s| self.leader_of(s).is_some()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no leaders after 20 s\n{}", self.logs());
    }

    /// Waits until replica `i` has applied as far as the leader of every
    /// shard had when called.
    fn wait_caught_up(&self, i: usize) -> pagecast_proto::v1::StatusResponse {
        self.wait_reaches(i, false)
    }

    /// Waits until replica `i` has applied what each shard's leader had
    /// committed: now (`fixed`, while writes go on) or at each look.
    fn wait_reaches(&self, i: usize, fixed: bool) -> pagecast_proto::v1::StatusResponse {
        let deadline = Instant::now() + Duration::from_secs(30);
        let commits = || -> Vec<u64> {
            (0..self.shards)
                .map(|s| {
                    let l = self.leader_of(s).expect("a leader");
                    self.status(l).unwrap().shards[s as usize].commit
                })
                .collect()
        };
        let first = commits();
        loop {
            let target = if fixed { first.clone() } else { commits() };
            if let Some(st) = self.status(i)
                && st.shards.iter().zip(&target).all(|(x, t)| x.applied >= *t)
            {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "replica {} did not catch up to {target:?}: {:?}\n{}",
                i + 1,
                self.status(i),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.reps.len() {
            self.kill(i);
        }
    }
}

/// Writes an image of `pages` pages where page i holds content `seed + i`
/// (a non-zero pattern), and `zeros` zero pages after them.
fn image(dir: &Path, name: &str, contents: impl Iterator<Item = u64>, zeros: usize) -> PathBuf {
    let mut b = Vec::new();
    for c in contents {
        let mut page = vec![0u8; 4096];
        for (j, chunk) in page.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(
                &(c.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ j as u64 | 1).to_le_bytes(),
            );
        }
        b.extend_from_slice(&page);
    }
    b.resize(b.len() + zeros * 4096, 0);
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

fn ok(args: &[&str]) -> String {
    let out = pagecast(args);
    assert!(
        out.status.success(),
        "pagecast {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(args: &[&str]) -> String {
    let out = pagecast(args);
    assert!(!out.status.success(), "pagecast {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn load_query_advise_and_unload_through_the_cli() {
    let c = Cluster::start(3);
    let d = tempfile::tempdir().unwrap();
    let ix = c.addrs();
    let first = c.reps[0].addr.clone();
    // a: contents 0..2000 (each twice), b: 1000..3000, n: nothing shared.
    let a = image(d.path(), "a.img", (0..2000).chain(0..2000), 100);
    let b = image(d.path(), "b.img", 1000..3000, 0);
    let n = image(d.path(), "n.img", 50_000..50_500, 0);
    let (a, b, n) = (
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        n.to_str().unwrap(),
    );

    let out = pagecast_json(&[
        "index",
        "load",
        "--index",
        &first,
        "--host",
        "h1",
        "--vm",
        &format!("a={a}"),
        "--batch",
        "500",
        "--json",
    ]);
    assert_eq!(out[0]["distinct"], 2000);
    assert_eq!(out[0]["frames"], 4100);
    assert!(out[0]["updates_per_second"].as_f64().unwrap() > 0.0);
    let text = ok(&[
        "index",
        "load",
        "--index",
        &ix,
        "--host",
        "h2",
        "--vm",
        &format!("b={b}"),
    ]);
    assert!(
        text.contains("loaded b on h2") && text.contains("updates/s"),
        "{text}"
    );

    // The same VM name again is refused, whatever the host.
    let e = fails(&[
        "index",
        "load",
        "--index",
        &ix,
        "--host",
        "h2",
        "--vm",
        &format!("a={b}"),
    ]);
    assert!(e.contains("VM a is already in the index on host h1"), "{e}");

    let h = pagecast_json(&["index", "holders", "--index", &ix, "--image", b, "--json"]);
    assert_eq!(h["distinct"], 2000);
    assert_eq!(h["hosts"]["h1"], 1000);
    assert_eq!(h["hosts"]["h2"], 2000);
    assert_eq!(h["held_by_none"], 0);
    let h = pagecast_json(&[
        "index", "holders", "--index", &ix, "--image", n, "--json", "--stale",
    ]);
    assert_eq!(h["held_by_none"], 500);
    assert!(h["hosts"].as_object().unwrap().is_empty());

    let adv = pagecast_json(&[
        "advise", "--index", &ix, "--vm", "a", "--top", "3", "--json",
    ]);
    assert_eq!(adv["host"], "h1");
    assert_eq!(adv["hosts"][0]["name"], "h2");
    let shared = adv["hosts"][0]["shared_pages"].as_f64().unwrap();
    assert!(
        (shared - 1000.0).abs() < 150.0,
        "estimated {shared} of 1000 shared"
    );
    assert_eq!(adv["vms"][0]["name"], "b");
    let j = adv["vms"][0]["jaccard"].as_f64().unwrap();
    assert!((j - 1.0 / 3.0).abs() < 0.08, "jaccard {j}");
    let text = ok(&["advise", "--index", &ix, "--vm", "b"]);
    assert!(
        text.contains("hosts holding most of its content") && text.contains("h1"),
        "{text}"
    );

    let st = pagecast_json(&["index", "status", "--index", &first, "--json", "--exact"]);
    let reps = st["replicas"].as_array().unwrap();
    assert_eq!(reps.len(), 3, "one address shows every replica: {st}");
    let distinct: u64 = reps
        .iter()
        .flat_map(|r| r["shards"].as_array().unwrap().clone())
        .filter(|s| s["role"] == "leader")
        .inspect(|s| assert_eq!(s["distinct_exact"], true, "{s}"))
        .map(|s| s["distinct_hashes"].as_u64().unwrap())
        .sum();
    assert_eq!(distinct, 3000);
    let text = ok(&["index", "status", "--index", &first]);
    assert!(
        text.contains("SHARD") && text.contains("leader") && text.contains("follower"),
        "{text}"
    );
    assert!(text.contains(" ~"), "without --exact, an estimate: {text}");

    // Unload a: only b's holders remain.
    let e = fails(&[
        "index", "unload", "--index", &ix, "--host", "h2", "--vm", "a",
    ]);
    assert!(e.contains("held by h1, not h2"), "{e}");
    ok(&[
        "index", "unload", "--index", &ix, "--host", "h1", "--vm", "a",
    ]);
    let h = pagecast_json(&["index", "holders", "--index", &ix, "--image", a, "--json"]);
    assert!(h["hosts"].get("h1").is_none(), "{h}");
    assert_eq!(h["hosts"]["h2"], 1000);
    assert_eq!(h["held_by_none"], 1000);
    let e = fails(&["advise", "--index", &ix, "--vm", "a"]);
    assert!(e.contains("VM a is not in the index"), "{e}");
    // It can be loaded again after the unload.
    ok(&[
        "index",
        "load",
        "--index",
        &ix,
        "--host",
        "h3",
        "--vm",
        &format!("a={a}"),
    ]);
    let h = pagecast_json(&["index", "holders", "--index", &ix, "--image", a, "--json"]);
    assert_eq!(h["hosts"]["h3"], 2000);
}

#[test]
fn operator_mistakes_get_clear_errors() {
    let e = fails(&[
        "index",
        "serve",
        "--id",
        "4",
        "--listen",
        "127.0.0.1:0",
        "--peers",
        "1=127.0.0.1:1,2=127.0.0.1:2",
        "--data",
        "/nonexistent/x",
    ]);
    assert!(e.contains("--id 4 is not in --peers (1, 2)"), "{e}");
    let e = fails(&[
        "index",
        "serve",
        "--id",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--peers",
        "1=nohost",
        "--data",
        "/tmp/x",
    ]);
    assert!(e.contains("expected HOST:PORT"), "{e}");
    let dead = format!("127.0.0.1:{}", free_port());
    let e = fails(&["index", "status", "--index", &dead]);
    assert!(e.contains("no replica answered"), "{e}");
    let e = fails(&[
        "index", "load", "--index", &dead, "--host", "h", "--vm", "novalue",
    ]);
    assert!(e.contains("expected VMNAME=IMAGE"), "{e}");
    let out = pagecast(&["index", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in ["serve", "status", "load", "unload", "holders"] {
        assert!(help.contains(sub), "{help}");
    }
}

#[test]
fn a_data_directory_refuses_another_replica_id() {
    let d = tempfile::tempdir().unwrap();
    let p = free_port();
    let peers = format!("1=127.0.0.1:{p},2=127.0.0.1:{}", free_port());
    let data = d.path().join("r");
    let mut ch = Command::new(pagecast_bin())
        .args([
            "index",
            "serve",
            "--id",
            "1",
            "--listen",
            &format!("127.0.0.1:{p}"),
            "--peers",
            &peers,
            "--data",
        ])
        .arg(&data)
        .arg("--tls")
        .arg(pki::node("index-1", Role::Index))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The replica listens once its store is open, its identity written.
    pagecast_tests::cluster::eventually(Duration::from_secs(20), "replica 1 listening", || {
        std::net::TcpStream::connect(format!("127.0.0.1:{p}"))
            .map(drop)
            .map_err(|e| e.to_string())
    });
    ch.kill().unwrap();
    ch.wait().unwrap();
    let e = fails(&[
        "index",
        "serve",
        "--id",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--peers",
        &peers,
        "--data",
        data.to_str().unwrap(),
        "--tls",
        pki::node("index-2", Role::Index).to_str().unwrap(),
    ]);
    assert!(
        e.contains("belongs to replica 1 of a 4-shard cluster, not replica 2 of 4"),
        "{e}"
    );
}

fn hash(i: u64) -> PageHash {
    let mut b = *blake3::hash(&i.to_le_bytes()).as_bytes();
    b[31] |= 1;
    PageHash::from_bytes(b)
}

/// Every acknowledged batch's hashes, read back linearizably (or from one
/// replica's state with `only`), must be there with one frame.
fn check_acked(addrs: &[String], acked: &[u64], per_batch: u64, stale: bool) {
    let mut c = IndexClient::new(addrs, operator()).unwrap();
    let hashes: Vec<PageHash> = acked
        .iter()
        .flat_map(|b| (b * per_batch..(b + 1) * per_batch).map(hash))
        .collect();
    for chunk in hashes.chunks(4096) {
        let l = c.lookup(0, chunk, &[], stale).unwrap();
        assert_eq!(
            l.hash_index.len(),
            chunk.len(),
            "acknowledged hashes missing"
        );
        assert!(l.frames.iter().all(|f| *f == 1), "a batch applied twice");
    }
}

#[test]
fn killed_leader_restarts_and_a_wiped_replica_catches_up() {
    let mut c = Cluster::start(1);
    let addrs = c.addr_list();
    let per_batch = 200u64;
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, addrs) = (acked.clone(), stop.clone(), addrs.clone());
        std::thread::spawn(move || {
            let mut cl = IndexClient::new(&addrs, operator()).unwrap();
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) {
                seq += 1;
                let deltas = (seq * per_batch..(seq + 1) * per_batch)
                    .map(|i| HolderDelta {
                        hash: hash(i).as_bytes().to_vec().into(),
                        host: 1,
                        frames: 1,
                        before: 0,
                    })
                    .collect();
                let cmd = IndexCommand {
                    client: 99,
                    seq,
                    op: Some(Op::Deltas(HolderDeltas { deltas })),
                };
                // The client retries across replicas until acknowledged.
                cl.write(0, cmd).expect("a batch was never acknowledged");
                acked.lock().unwrap().push(seq);
            }
        })
    };
    let wait_acks = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked.lock().unwrap().len() < n {
            assert!(
                Instant::now() < deadline,
                "writes stalled at {}",
                acked.lock().unwrap().len()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_acks(30);
    let old = c.leader_of(0).expect("a leader");
    c.kill(old);
    let killed_at = Instant::now();
    let new = loop {
        if let Some(l) = c.leader_of(0) {
            break l;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(5),
            "no new leader\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = killed_at.elapsed();
    assert_ne!(new, old);
    // Elections start 0.5-1 s after the leader falls silent; a split vote
    // costs another such timeout (and pre-vote a round trip), so 4 s
    // bounds two rounds on a loaded machine.
    assert!(took < Duration::from_secs(4), "a new leader took {took:?}");
    let before = acked.lock().unwrap().len();
    wait_acks(before + 30);
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let acked: Vec<u64> = acked.lock().unwrap().clone();
    check_acked(&addrs, &acked, per_batch, false);

    // The killed replica rejoins and catches up.
    c.spawn(old);
    c.wait_caught_up(old);
    check_acked(&[addrs[old].clone()], &acked, per_batch, true);

    // Restart every replica: the same content.
    let distinct = c.status(new).unwrap().shards[0].distinct_hashes;
    assert_eq!(distinct, acked.len() as u64 * per_batch);
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.spawn(i);
    }
    c.wait_leaders();
    check_acked(&addrs, &acked, per_batch, false);
    for i in 0..3 {
        let st = c.wait_caught_up(i);
        assert_eq!(st.shards[0].distinct_hashes, distinct, "replica {}", i + 1);
    }

    // Wipe a follower's directory: it comes back through a snapshot (the
    // log was compacted long ago).
    let f = (0..3).find(|i| Some(*i) != c.leader_of(0)).unwrap();
    c.kill(f);
    std::fs::remove_dir_all(&c.reps[f].dir).unwrap();
    c.spawn(f);
    let st = c.wait_caught_up(f);
    assert!(st.shards[0].snapshots_received >= 1, "{st:?}");
    assert_eq!(st.shards[0].distinct_hashes, distinct);
    check_acked(&[addrs[f].clone()], &acked, per_batch, true);

    snapshot_parts_are_for_replicas_only(&c, f, &addrs, st.shards[0].first_index - 1);
}

/// The snapshot's state was streamed in parts from a checkpoint the
/// sender keeps a while. Its page hashes are for replicas only: an
/// attacker with a host, operator or reader certificate, speaking the
/// protocol directly, is refused the very part (snapshot `index`) a
/// replica's certificate is given by the replica that sent it to `f`.
fn snapshot_parts_are_for_replicas_only(c: &Cluster, f: usize, addrs: &[String], index: u64) {
    let sender = (0..3)
        .filter(|i| *i != f)
        .find(|i| {
            c.status(*i)
                .is_some_and(|s| s.shards[0].snapshots_sent >= 1)
        })
        .expect("the replica that sent the snapshot");
    let at = addrs[sender].clone();
    let mut replica =
        IndexClient::new(std::slice::from_ref(&at), pki::tls("peer", Role::Index)).unwrap();
    let (records, _) = replica
        .snapshot_part(&at, 0, index, &[])
        .unwrap()
        .expect("the sender still holds the snapshot's checkpoint");
    assert!(!records.is_empty());
    for role in [Role::Host, Role::Operator, Role::Reader] {
        let mut attacker =
            IndexClient::new(std::slice::from_ref(&at), pki::tls("mallory", role)).unwrap();
        let e = attacker.snapshot_part(&at, 0, index, &[]).unwrap_err();
        assert!(e.contains("may not read a snapshot"), "{role:?}: {e}");
    }
}

/// Membership is the operator's: a host or a reader asking a shard's
/// leader directly to add a replica it controls is refused.
fn members_are_for_operators_only(clients: &mut [(&str, &mut IndexClient)]) {
    for (who, cl) in clients.iter_mut() {
        let e = cl
            .write_request(pagecast_proto::v1::IndexRequest {
                shard: 0,
                stale: false,
                op: Some(pagecast_proto::v1::index_request::Op::Members(
                    pagecast_proto::v1::MembersRequest {
                        add_id: 9,
                        add_address: "127.0.0.1:9".into(),
                        remove_id: 0,
                    },
                )),
            })
            .unwrap_err();
        assert_eq!(e.code(), Some(RefusalCode::Forbidden), "{who}: {e}");
        assert!(
            e.to_string().contains("may not change the index's members"),
            "{e}"
        );
    }
}

#[test]
fn writes_are_limited_to_what_the_certificate_allows() {
    let c = Cluster::start(1);
    let addrs = vec![c.addrs()];
    let client = |name: &str, role: Role| {
        let mut cl = IndexClient::new(&addrs, pki::tls(name, role)).unwrap();
        cl.timeout = Duration::from_secs(20);
        cl
    };
    let register = |name: &str| IndexCommand {
        client: 0,
        seq: 0,
        op: Some(Op::RegisterHost(RegisterHost { name: name.into() })),
    };
    let deltas = |host: u32, session: u64| IndexCommand {
        client: session,
        seq: 1,
        op: Some(Op::Deltas(HolderDeltas {
            deltas: vec![HolderDelta {
                hash: hash(7).as_bytes().to_vec().into(),
                host,
                frames: 1,
                before: 0,
            }],
        })),
    };
    let (mut h1, mut h2) = (client("w-h1", Role::Host), client("w-h2", Role::Host));
    let n1 = h1.write(0, register("w-h1")).unwrap().host;
    let n2 = h2.write(0, register("w-h2")).unwrap().host;
    assert_ne!(n1, n2);
    // A host registering under another's name, writing another's holders.
    let e = h2.write(0, register("w-h1")).unwrap_err();
    assert_eq!(e.code(), Some(RefusalCode::Forbidden), "{e}");
    let e = h2.write(0, deltas(n1, 501)).unwrap_err();
    assert_eq!(e.code(), Some(RefusalCode::Forbidden), "{e}");
    assert!(e.to_string().contains("may not write the holders"), "{e}");
    // A reader may not write at all, but may read.
    let mut reader = client("w-reader", Role::Reader);
    let e = reader.write(0, deltas(n2, 502)).unwrap_err();
    assert_eq!(e.code(), Some(RefusalCode::Forbidden), "{e}");
    assert!(
        e.to_string().contains("w-reader (reader) may not write"),
        "{e}"
    );
    assert_eq!(reader.hosts(false).unwrap().len(), 2);
    members_are_for_operators_only(&mut [("w-h1", &mut h1), ("w-reader", &mut reader)]);
    let st = c.status(0).unwrap();
    assert!(
        st.shards.iter().all(|s| s.voters == vec![1, 2, 3]),
        "{st:?}"
    );
    // The host's own holders go through.
    h2.write(0, deltas(n2, 503)).unwrap();
    let l = reader.lookup(0, &[hash(7)], &[], false).unwrap();
    assert_eq!(l.host, vec![n2], "only the permitted write landed");

    // A VM's record: h2 cannot take over h1's by putting one of its own
    // under the same name (before, the put replaced it).
    let put = |host: u32| IndexCommand {
        client: 0,
        seq: 0,
        op: Some(Op::PutVm(pagecast_proto::v1::PutVm {
            vm: Some(pagecast_proto::v1::VmRecord {
                host,
                ..pagecast_index::client::VmContent::from_frames("w-vm", "test", &[hash(9)])
                    .record("")
            }),
        })),
    };
    h1.write(0, put(n1)).unwrap();
    let e = h2.write(0, put(n2)).unwrap_err();
    assert_eq!(e.code(), Some(RefusalCode::Refused), "{e}");
    assert!(
        e.to_string().contains("only that host moves or drops"),
        "{e}"
    );
    let vm = reader.vms(false).unwrap();
    assert_eq!(
        vm.iter()
            .map(|v| (v.name.as_str(), v.host))
            .collect::<Vec<_>>(),
        [("w-vm", n1)]
    );
    // A writer session is its writer's: h2 naming h1's session id with a
    // high sequence number (session ids are computed from public data)
    // does not make the shard acknowledge h1's batches unapplied.
    let mut forged = deltas(n2, 777);
    forged.seq = 1_000_000;
    h2.write(0, forged).unwrap();
    let mine = h1.write(0, deltas(n1, 777)).unwrap();
    assert!(!mine.duplicate, "h1's batch was taken for a duplicate");
    let mut l = reader.lookup(0, &[hash(7)], &[], false).unwrap().host;
    l.sort_unstable();
    assert_eq!(l, [n1.min(n2), n1.max(n2)], "h1's batch was not applied");
    // A host's page hashes: listed to an operator and to that host, to no
    // other host and to no reader.
    assert_eq!(h1.list_holdings(0, n1, None, 10).unwrap().0.len(), 1);
    let mut op = client("w-op", Role::Operator);
    assert_eq!(op.list_holdings(0, n1, None, 10).unwrap().0.len(), 1);
    for (who, c) in [("another host", &mut h2), ("a reader", &mut reader)] {
        let e = c.list_holdings(0, n1, None, 10).unwrap_err();
        assert_eq!(e.code(), Some(RefusalCode::Forbidden), "{who}: {e}");
        assert!(
            e.to_string().contains("may not list the page hashes"),
            "{who}: {e}"
        );
    }
}

/// Connections that never finish a handshake hold no slot a real client
/// needs: a peer keeping 640 idle connections open to each replica from 5
/// loopback addresses (past the 128 a peer address and the 512 in all a
/// replica keeps open) does not lock a client out. Before, every replica
/// turned the client away until the idle ones timed out.
#[test]
fn idle_connections_from_many_addresses_lock_no_client_out_of_the_index() {
    pagecast_tests::flood::raise_fd_limit();
    let c = Cluster::start(1);
    let targets: Vec<std::net::SocketAddr> =
        c.addrs().split(',').map(|a| a.parse().unwrap()).collect();
    let floods = pagecast_tests::flood::Flood::start_all(&targets, 5, 128);
    // Within less than the replicas' 5 s handshake timeout, so an answer
    // cannot come from waiting for the idle ones to be dropped.
    let mut client = IndexClient::new(&[c.addrs()], operator()).unwrap();
    client.timeout = Duration::from_secs(3);
    client.hosts(false).unwrap();
    drop(floods);
}

/// A client with a real host certificate that sends its hello a byte a
/// second, each byte well within the replica's 5 s read timeout, is closed
/// once the frame has taken its 10 s from its first byte: it no longer
/// holds the connection, and the slot it takes, for as long as it likes.
/// Before, each byte restarted the wait, and the connection stayed open
/// for as long as bytes came.
#[test]
fn a_client_trickling_its_hello_is_closed_at_the_frames_deadline() {
    use std::io::Write;
    let c = Cluster::start(1);
    let addr = c.addr_list()[0].clone();
    let s = std::net::TcpStream::connect(&addr).unwrap();
    let mut w = pki::tls("trickler", Role::Host).connect(s).unwrap();
    // A head announcing a 200-byte frame, then its bytes, one a second.
    w.write_all(&200u32.to_be_bytes()).unwrap();
    w.flush().unwrap();
    let started = Instant::now();
    let closed = (0..60).find_map(|_| {
        std::thread::sleep(Duration::from_secs(1));
        w.write_all(&[0])
            .and_then(|()| w.flush())
            .err()
            .map(|_| started.elapsed())
    });
    let closed = closed.expect("the replica still reads the trickled hello after 60 s");
    // 10 s and at most one read's wait (a second here), then the close
    // reaches this side's next write or the one after.
    assert!(
        closed >= Duration::from_secs(9) && closed < Duration::from_secs(15),
        "closed after {closed:?}"
    );
}

/// A client publishing numbered batches of holder deltas until stopped,
/// batch `seq` to the shard and contents `batch(seq)` names, retrying each
/// until acknowledged; it records every acknowledged batch.
struct Publisher {
    acked: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

type Batch = fn(u64) -> (u32, Vec<PageHash>);

impl Publisher {
    fn start(addrs: Vec<String>, client: u64, batch: Batch) -> Publisher {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, st) = (acked.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut cl = IndexClient::new(&addrs, operator()).unwrap();
            cl.timeout = Duration::from_secs(30);
            let mut seq = 0u64;
            while !st.load(Ordering::SeqCst) {
                seq += 1;
                let (shard, hashes) = batch(seq);
                let deltas = hashes
                    .iter()
                    .map(|h| HolderDelta {
                        hash: h.as_bytes().to_vec().into(),
                        host: 1,
                        frames: 1,
                        before: 0,
                    })
                    .collect();
                let cmd = IndexCommand {
                    client,
                    seq,
                    op: Some(Op::Deltas(HolderDeltas { deltas })),
                };
                cl.write(shard, cmd)
                    .expect("a batch was never acknowledged");
                a.lock().unwrap().push(seq);
            }
        });
        Publisher {
            acked,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits (up to a minute) for `n` more acknowledged batches.
    fn wait_more(&self, n: usize) {
        let want = self.acked.lock().unwrap().len() + n;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked.lock().unwrap().len() < want {
            assert!(Instant::now() < deadline, "writes stalled");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops; the acknowledged batches.
    fn stop(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.acked.lock().unwrap().clone()
    }
}

/// Every content of every `acked` batch is there, once.
fn check_batches(addrs: &[String], acked: &[u64], batch: Batch, stale: bool) {
    let mut cl = IndexClient::new(addrs, operator()).unwrap();
    cl.timeout = Duration::from_secs(30);
    for seq in acked {
        let (shard, hashes) = batch(*seq);
        let l = cl.lookup(shard, &hashes, &[], stale).unwrap();
        assert_eq!(l.hash_index.len(), hashes.len(), "batch {seq} lost");
        assert!(
            l.frames.iter().all(|f| *f == 1),
            "batch {seq} applied twice"
        );
    }
}

impl Cluster {
    /// Starts (or starts again) replica `i`, one that joined through the
    /// replica at `join_at`.
    fn spawn_joining(&mut self, i: usize, join_at: &str) {
        self.serve(i, &["--join".to_owned(), join_at.to_owned()]);
        let t = Instant::now();
        while self.status(i).is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "replica {} never answered",
                i + 1
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A replica `id` not started yet, at a free port.
    fn add_replica(&mut self, id: u64) -> usize {
        let dir = self.reps[0].dir.with_file_name(format!("r{id}"));
        let log = self.reps[0].log.with_file_name(format!("r{id}.log"));
        self.reps.push(Replica {
            id,
            addr: format!("127.0.0.1:{}", free_port()),
            dir,
            log,
            child: None,
        });
        self.reps.len() - 1
    }

    /// Each shard's voters, as its leader has them.
    fn voters(&self) -> Vec<Vec<u64>> {
        (0..self.shards)
            .map(|s| {
                let l = self.leader_of(s).expect("a leader");
                self.status(l).unwrap().shards[s as usize].voters.clone()
            })
            .collect()
    }
}

/// Batch `seq` of a two-shard cluster: 100 contents of shard 0.
fn shard0_batch(seq: u64) -> (u32, Vec<PageHash>) {
    let h = |i: u64| {
        let mut b = *hash(i).as_bytes();
        b[0] &= 0x7f;
        PageHash::from_bytes(b)
    };
    (0, (seq * 100..(seq + 1) * 100).map(h).collect())
}

#[test]
fn a_replica_joins_and_another_leaves_while_writes_go_on() {
    let mut c = Cluster::start(2);
    // Replica 4's address is known to the writer from the start; it
    // answers once it runs.
    let four = c.add_replica(4);
    let addr4 = c.reps[four].addr.clone();
    let addrs = c.addr_list();
    let publisher = Publisher::start(addrs, 77, shard0_batch);
    publisher.wait_more(20);

    // Replica 4 joins through replica 1: it learns the members and the
    // shard count there, and votes nowhere until it is added.
    let first = c.reps[0].addr.clone();
    c.spawn_joining(four, &first);
    let ix = c.addrs_of(3);
    let out = ok(&[
        "index",
        "members",
        "add",
        "--index",
        &ix,
        "--id",
        "4",
        "--address",
        &addr4,
    ]);
    assert!(
        out.contains("shard 0: add replica 4") && out.contains("shard 1: add replica 4"),
        "{out}"
    );
    let st = c.wait_reaches(four, true);
    assert!(
        st.shards.iter().all(|s| s.voters == vec![1, 2, 3, 4]),
        "{st:?}"
    );
    publisher.wait_more(20);

    // A replica that leads no shard leaves; the others and replica 4 go on.
    let leaders: Vec<usize> = (0..2).filter_map(|s| c.leader_of(s)).collect();
    let gone = (0..3)
        .find(|i| !leaders.contains(i))
        .expect("a replica leading nothing");
    let gone_id = c.reps[gone].id;
    let out = ok(&[
        "index",
        "members",
        "remove",
        "--index",
        &ix,
        "--id",
        &gone_id.to_string(),
    ]);
    assert!(
        out.contains(&format!("shard 1: remove replica {gone_id}: done")),
        "{out}"
    );
    c.kill(gone);
    publisher.wait_more(20);
    let acked = publisher.stop();

    // Nothing acknowledged is lost, and replica 4 holds it all.
    let live: Vec<String> = (0..4)
        .filter(|i| *i != gone)
        .map(|i| c.reps[i].addr.clone())
        .collect();
    let st = c.wait_caught_up(four);
    let want: Vec<u64> = [1u64, 2, 3, 4]
        .into_iter()
        .filter(|id| *id != gone_id)
        .collect();
    assert!(st.shards.iter().all(|s| s.voters == want), "{st:?}");
    check_batches(&live, &acked, shard0_batch, false);
    check_batches(std::slice::from_ref(&addr4), &acked, shard0_batch, true);
    // Replica 4 started again (joining through any member) keeps the
    // members it recorded and catches up.
    c.kill(four);
    c.spawn_joining(four, &live[0]);
    let st = c.wait_caught_up(four);
    assert!(st.shards.iter().all(|s| s.voters == want), "{st:?}");
}

/// Batch `seq` of a sixteen-shard cluster: 50 contents of shard `seq % 16`.
fn sixteen_batch(seq: u64) -> (u32, Vec<PageHash>) {
    let s = (seq % 16) as u32;
    let h = |i: u64| {
        let mut b = *hash(i).as_bytes();
        b[0] = ((s as u8) << 4) | (b[0] & 0x0f);
        PageHash::from_bytes(b)
    };
    (s, (seq * 50..(seq + 1) * 50).map(h).collect())
}

#[test]
fn five_servers_sixteen_shards_one_replaced_while_writes_go_on() {
    let mut c = Cluster::start_n(5, 16);
    let st = c.status(0).unwrap();
    assert!(
        st.shards
            .iter()
            .all(|s| s.voters.len() == if s.shard == 0 { 5 } else { 3 }),
        "three voters a shard, placed across the servers, and shard 0 (host and VM records) on \
         every server: {st:?}"
    );
    let six = c.add_replica(6);
    let addrs = c.addr_list();
    let publisher = Publisher::start(addrs, 55, sixteen_batch);
    publisher.wait_more(40);

    // Server 6 joins; `index rebalance --add 6=ADDR --without 2` gives it
    // server 2's shards (and evens the spread), each move adding before
    // removing.
    let first = c.reps[0].addr.clone();
    c.spawn_joining(six, &first);
    let ix = c.addrs_of(5);
    let add6 = format!("6={}", c.reps[six].addr);
    let rebalance = |dry: bool| {
        let mut args = vec![
            "index",
            "rebalance",
            "--index",
            &ix,
            "--without",
            "2",
            "--add",
            &add6,
            "--catch-up-timeout",
            "20",
        ];
        if dry {
            args.push("--dry-run");
        }
        ok(&args)
    };
    let plan = rebalance(true);
    assert!(plan.contains("add replica 6, then remove 2"), "{plan}");
    let out = rebalance(false);
    assert!(
        out.contains("moves:") && out.contains("add replica 6"),
        "{out}"
    );
    publisher.wait_more(40);
    c.kill(1);
    publisher.wait_more(40);
    let acked = publisher.stop();

    // Every shard has three voters, none of them server 2; server 6 votes
    // in its share and holds a copy of those shards only; nothing
    // acknowledged is lost.
    let voters = c.voters();
    assert_eq!(voters[0], vec![1, 3, 4, 5, 6]);
    for (s, v) in voters.iter().enumerate().skip(1) {
        assert_eq!(v.len(), 3, "shard {s}: {v:?}");
        assert!(!v.contains(&2), "shard {s}: {v:?}");
    }
    let n6 = voters.iter().filter(|v| v.contains(&6)).count();
    assert!(n6 >= 9, "server 6 votes in {n6} of 16 shards: {voters:?}");
    let st6 = c.status(six).unwrap();
    for (s, v) in voters.iter().enumerate() {
        assert_eq!(st6.shards[s].role != "none", v.contains(&6), "shard {s}");
    }
    let again = ok(&["index", "rebalance", "--index", &ix, "--without", "2"]);
    assert!(again.contains("nothing to move"), "{again}");
    let live: Vec<String> = (0..6)
        .filter(|i| *i != 1)
        .map(|i| c.reps[i].addr.clone())
        .collect();
    check_batches(&live, &acked, sixteen_batch, false);
}

/// Sets the dirty rate of `pub-vm{agent}{0,1}` on each of `agents`.
fn set_dirty_rate(dir: &Path, agents: &[pagecast_tests::cluster::AgentProc], rate: &str) {
    for (i, a) in agents.iter().enumerate() {
        for v in 0..2 {
            let name = format!("pub-vm{i}{v}");
            let args = [
                "vm",
                "set",
                "--agent",
                &a.addr,
                "--name",
                &name,
                "--dirty-rate",
                rate,
            ];
            let out = pagecast_tests::cluster::cli(dir, &args);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Waits (up to a minute each) until the index at `addrs` lists exactly
/// what each agent's VMs hold; on a timeout, says what the agent warned.
fn wait_exact(
    dir: &Path,
    agents: &[pagecast_tests::cluster::AgentProc],
    addrs: &[String],
    what: &str,
) {
    use pagecast_tests::cluster::{eventually, index_exact};
    let mut client = IndexClient::new(addrs, operator()).unwrap();
    client.timeout = Duration::from_secs(20);
    for a in agents {
        eventually(Duration::from_secs(60), what, || {
            index_exact(&mut client, a, 16).map_err(|e| {
                let log = std::fs::read_to_string(dir.join(format!("{}.log", a.name)))
                    .unwrap_or_default();
                let warned: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .take(20)
                    .collect();
                format!("{e}\n{}", warned.join("\n"))
            })
        });
    }
}

/// The same replacement as above with real agents publishing: two
/// `pagecast agent`s, each running two micro-VMs that dirty memory, publish
/// into five servers while server 6 joins and takes server 2's shards;
/// afterwards the index lists, for each agent, exactly what its VMs hold.
#[test]
fn agents_publish_while_a_server_is_replaced() {
    use pagecast_tests::cluster::{AgentProc, start_vm};
    if !pagecast_testkit::needs(
        "agents_publish_while_a_server_is_replaced",
        &[pagecast_testkit::Need::Kvm],
    ) {
        return;
    }
    let mut c = Cluster::start_n(5, 16);
    let dir = tempfile::tempdir().unwrap();
    let ix = c.addrs();
    let agents: Vec<AgentProc> = ["pub-a", "pub-b"]
        .iter()
        .map(|n| AgentProc::start(dir.path(), n, &["--index", &ix]))
        .collect();
    for (i, a) in agents.iter().enumerate() {
        for v in 0..2 {
            let extra = ["--dirty-rate", "200", "--working-set", "3000"];
            start_vm(
                dir.path(),
                &a.addr,
                &format!("pub-vm{i}{v}"),
                "web",
                "32MiB",
                &extra,
            );
        }
    }
    // Guests that stop dirtying: what their agents publish settles.
    set_dirty_rate(dir.path(), &agents, "0");
    wait_exact(
        dir.path(),
        &agents,
        std::slice::from_ref(&ix),
        "published before",
    );
    set_dirty_rate(dir.path(), &agents, "200");

    let six = c.add_replica(6);
    let first = c.reps[0].addr.clone();
    c.spawn_joining(six, &first);
    let add6 = format!("6={}", c.reps[six].addr);
    let out = ok(&[
        "index",
        "rebalance",
        "--index",
        &ix,
        "--without",
        "2",
        "--add",
        &add6,
        "--catch-up-timeout",
        "30",
    ]);
    assert!(out.contains("add replica 6"), "{out}");
    c.kill(1);
    let live: Vec<String> = (0..6)
        .filter(|i| *i != 1)
        .map(|i| c.reps[i].addr.clone())
        .collect();
    set_dirty_rate(dir.path(), &agents, "0");
    wait_exact(dir.path(), &agents, &live, "published after");
    let voters = c.voters();
    assert_eq!(voters[0], vec![1, 3, 4, 5, 6]);
    assert!(voters[1..].iter().all(|v| v.len() == 3 && !v.contains(&2)));
}
