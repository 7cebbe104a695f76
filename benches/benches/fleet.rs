//! The content index at fleet scale, in simulation: 1,000 hosts publishing
//! into a 5-replica index on this machine.
//!
//! The hosts are light clients: each sends the holder deltas an agent
//! would, for its VMs' contents, without VMs. A VM's contents follow a
//! family profile (the fleet profile of `docs/examples/eval.toml`, reduced
//! to its parts): a quarter zero pages (never indexed), 5% its family's
//! kernel (the same pages in every VM of the family), 14% drawn from its
//! family's library pool (17% of a VM's size), 28% from the family's page
//! cache pool (36%), the rest its own heap. Three families, the VMs of a
//! host of mixed families. A content is the BLAKE3 of its identity, so
//! contents spread over the shards as real page hashes do.
//!
//! Reported, each beside what bounds or compares it:
//! 1. Cold start: every host's deltas from an empty index (one command per
//!    host and shard, as an agent's first publication sends them, from 32
//!    client threads), the time until all are acknowledged, beside raw
//!    RocksDB ingest of the same deltas in the same batches (synced) in
//!    the same run.
//! 2. Steady state: hosts whose heap pages change content (each change a
//!    -1 and a +1), deltas per second in all and per shard.
//! 3. Holder lookups for an evacuation of 1,000 VMs (one VM of each host):
//!    every distinct content of those VMs looked up, 4,096 a request, one
//!    client per shard, linearizable (target: under 2 s).
//! 4. Bytes on disk per distinct content per replica after compaction.
//!
//! Run: `cargo bench -p pagecast-benches --bench fleet`. Knobs:
//! PAGECAST_BENCH_FLEET_HOSTS (1000), PAGECAST_BENCH_FLEET_VMS (VMs per
//! host, 2), PAGECAST_BENCH_FLEET_VM_MIB (16), PAGECAST_BENCH_FLEET_SHARDS
//! (16), PAGECAST_BENCH_FLEET_REPLICAS (5), PAGECAST_BENCH_FLEET_STEADY_S
//! (10).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pagecast_benches::{env_or, process_cpu_seconds, raw_rocksdb, start_replicas};
use pagecast_channel::Role;
use pagecast_channel::ca::Authority;
use pagecast_index::client::IndexClient;
use pagecast_index::keys::shard_of;
use pagecast_index::replica;
use pagecast_pages::PageHash;
use pagecast_proto::v1::{
    HolderDelta, HolderDeltas, IndexCommand, RegisterHost, index_command::Op,
};

const FAMILIES: [&str; 3] = ["web", "db", "cache"];
const CLIENTS: usize = 32;

/// The simulated fleet.
struct Fleet {
    hosts: usize,
    vms: usize,
    /// Frames per VM.
    frames: u64,
    shards: u32,
}

fn content(parts: &[&[u8]]) -> PageHash {
    let mut h = blake3::Hasher::new();
    h.update(b"pagecast fleet simulation\0");
    for p in parts {
        h.update(p);
        h.update(b"\0");
    }
    PageHash::from_bytes(*h.finalize().as_bytes())
}

impl Fleet {
    /// The contents of VM `vm` of host `host`, one per non-zero frame.
    fn vm_frames(&self, host: usize, vm: usize) -> Vec<PageHash> {
        let fam = FAMILIES[(host + vm) % FAMILIES.len()].as_bytes();
        let n = self.frames;
        let part = |share: f64| (n as f64 * share) as u64;
        let (kernel, libs, libs_pool, cache, cache_pool) =
            (part(0.05), part(0.14), part(0.17), part(0.28), part(0.36));
        let heap = self.heap_frames();
        let me = format!("{host}/{vm}");
        let mut out = Vec::with_capacity((n - part(0.25)) as usize);
        for k in 0..kernel {
            out.push(content(&[fam, b"kernel", &k.to_le_bytes()]));
        }
        // Draws from a pool: the i-th draw of this VM picks a pool page.
        let draw = |what: &[u8], i: u64, pool: u64| {
            let pick = blake3::hash(format!("{me}/{i}").as_bytes());
            let at = u64::from_le_bytes(pick.as_bytes()[..8].try_into().unwrap()) % pool.max(1);
            content(&[fam, what, &at.to_le_bytes()])
        };
        for i in 0..libs {
            out.push(draw(b"libs", i, libs_pool));
        }
        for i in 0..cache {
            out.push(draw(b"cache", i, cache_pool));
        }
        for i in 0..heap {
            out.push(heap_page(host, vm, i, 0));
        }
        out
    }

    /// Frames of a VM that are its own heap.
    fn heap_frames(&self) -> u64 {
        let part = |share: f64| (self.frames as f64 * share) as u64;
        self.frames - part(0.25) - part(0.05) - part(0.14) - part(0.28)
    }

    /// Host `host`'s holdings: content -> frames, over its VMs.
    fn holdings(&self, host: usize) -> HashMap<PageHash, u64> {
        let mut m = HashMap::new();
        for vm in 0..self.vms {
            for h in self.vm_frames(host, vm) {
                *m.entry(h).or_insert(0) += 1;
            }
        }
        m
    }
}

/// Heap page `i` of VM `vm` of `host` after `gen` changes.
fn heap_page(host: usize, vm: usize, i: u64, generation: u64) -> PageHash {
    content(&[
        b"heap",
        &(host as u64).to_le_bytes(),
        &(vm as u64).to_le_bytes(),
        &i.to_le_bytes(),
        &generation.to_le_bytes(),
    ])
}

fn deltas_cmd(client: u64, seq: u64, deltas: Vec<HolderDelta>) -> IndexCommand {
    IndexCommand {
        client,
        seq,
        op: Some(Op::Deltas(HolderDeltas { deltas })),
    }
}

/// `frames` more of `h` at `host`, which held `before` (its own account).
fn delta(h: &PageHash, host: u32, frames: i64, before: u64) -> HolderDelta {
    HolderDelta {
        hash: h.as_bytes().to_vec().into(),
        host,
        frames,
        before,
    }
}

/// Per host, its cold-start commands: (shard, deltas), one per shard.
fn cold_commands(f: &Fleet, host: usize, number: u32) -> Vec<(u32, Vec<HolderDelta>)> {
    let mut by_shard: BTreeMap<u32, Vec<HolderDelta>> = BTreeMap::new();
    for (h, frames) in f.holdings(host) {
        by_shard
            .entry(shard_of(&h, f.shards))
            .or_default()
            .push(delta(&h, number, frames as i64, 0));
    }
    by_shard.into_iter().collect()
}

fn main() {
    let f = Fleet {
        hosts: env_or("PAGECAST_BENCH_FLEET_HOSTS", 1000),
        vms: env_or("PAGECAST_BENCH_FLEET_VMS", 2),
        frames: env_or::<u64>("PAGECAST_BENCH_FLEET_VM_MIB", 16) << 8,
        shards: env_or("PAGECAST_BENCH_FLEET_SHARDS", 16),
    };
    let n_reps: u64 = env_or("PAGECAST_BENCH_FLEET_REPLICAS", 5);
    let steady_s: u64 = env_or("PAGECAST_BENCH_FLEET_STEADY_S", 10);
    let root = tempfile::tempdir().unwrap();
    let ca = Authority::generate().unwrap();
    let tls = ca.issue("bench", Role::Operator, 1).unwrap();
    let (reps, addrs) = start_replicas(root.path(), &ca, n_reps, f.shards);
    let client = || {
        let mut c = IndexClient::new(&addrs, tls.clone()).unwrap();
        c.timeout = Duration::from_secs(120);
        c
    };
    let mut c = client();
    let t = Instant::now();
    for s in 0..f.shards {
        let probe = (0u64..)
            .map(|i| content(&[b"probe", &i.to_le_bytes()]))
            .find(|h| shard_of(h, f.shards) == s)
            .unwrap();
        while c.lookup(s, &[probe], &[], false).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "no leader of shard {s}"
            );
        }
    }
    println!(
        "fleet: {} hosts x {} VMs x {} MiB, {} replicas, {} shards, {CLIENTS} client threads",
        f.hosts,
        f.vms,
        f.frames >> 8,
        n_reps,
        f.shards
    );
    let numbers = register(&mut c, f.hosts);
    let cold = cold_start(&f, &numbers, &client);
    steady(&f, &numbers, &client, steady_s);
    evacuation_lookups(&f, &client);
    bytes_per_content(&reps, f.shards, cold.distinct);
}

/// Registers `hosts` hosts; their numbers.
fn register(c: &mut IndexClient, hosts: usize) -> Vec<u32> {
    let t = Instant::now();
    let numbers: Vec<u32> = (0..hosts)
        .map(|h| {
            let cmd = IndexCommand {
                client: 0,
                seq: 0,
                op: Some(Op::RegisterHost(RegisterHost {
                    name: format!("sim-{h:05}"),
                })),
            };
            c.write(0, cmd).unwrap().host
        })
        .collect();
    println!(
        "  registered {hosts} hosts in {:.1} s (one command each)",
        t.elapsed().as_secs_f64()
    );
    numbers
}

struct Cold {
    distinct: u64,
}

/// Part 1: every host's first publication, against raw RocksDB.
fn cold_start(f: &Fleet, numbers: &[u32], client: &(dyn Fn() -> IndexClient + Sync)) -> Cold {
    let t = Instant::now();
    // Per client thread, its hosts' commands.
    let work: Vec<Vec<(u64, u32, Vec<HolderDelta>)>> = (0..CLIENTS)
        .map(|w| {
            (w..f.hosts)
                .step_by(CLIENTS)
                .flat_map(|h| {
                    cold_commands(f, h, numbers[h])
                        .into_iter()
                        .map(move |(s, d)| (h as u64, s, d))
                })
                .collect()
        })
        .collect();
    let total: usize = work.iter().flatten().map(|(_, _, d)| d.len()).sum();
    let commands: usize = work.iter().map(Vec::len).sum();
    let mut distinct: Vec<PageHash> = work
        .iter()
        .flatten()
        .flat_map(|(_, _, d)| {
            d.iter()
                .map(|x| PageHash::from_bytes(x.hash[..].try_into().unwrap()))
        })
        .collect();
    distinct.sort_unstable();
    distinct.dedup();
    println!(
        "  generated {total} deltas ({} distinct contents) in {commands} commands in {:.1} s",
        distinct.len(),
        t.elapsed().as_secs_f64()
    );
    let flat: Vec<Vec<HolderDelta>> = work
        .iter()
        .map(|w| w.iter().flat_map(|(_, _, d)| d.iter().cloned()).collect())
        .collect();
    let batch = total / commands.max(1);
    let raw1 = raw_rocksdb(&flat, batch.max(1));
    let cpu = process_cpu_seconds();
    let t = Instant::now();
    std::thread::scope(|s| {
        for w in &work {
            s.spawn(move || {
                let mut c = client();
                for (seq, (host, shard, d)) in w.iter().enumerate() {
                    c.write(
                        *shard,
                        deltas_cmd(0xf1ee_0000 + host, seq as u64 + 1, d.clone()),
                    )
                    .unwrap();
                }
            });
        }
    });
    let secs = t.elapsed().as_secs_f64();
    let busy = (process_cpu_seconds() - cpu) / secs;
    let raw2 = raw_rocksdb(&flat, batch.max(1));
    let raw = (raw1 + raw2) / 2.0;
    let rate = total as f64 / secs;
    println!(
        "1. cold start: {total} deltas acknowledged in {secs:.1} s, {rate:.0} deltas/s \
         ({busy:.2} cores busy); raw RocksDB, same deltas in batches of {batch} (synced): \
         {raw:.0} deltas/s (runs {raw1:.0}, {raw2:.0}); ratio {:.2}x",
        rate / raw
    );
    Cold {
        distinct: distinct.len() as u64,
    }
}

/// Part 2: heap pages changing content on every host, for `secs`.
fn steady(f: &Fleet, numbers: &[u32], client: &(dyn Fn() -> IndexClient + Sync), secs: u64) {
    // Changes per host and round: what an agent's publisher sends after a
    // second of a guest rewriting about 1,000 pages/s.
    const CHANGES: u64 = 1024;
    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let per_shard: Vec<AtomicU64> = (0..f.shards).map(|_| AtomicU64::new(0)).collect();
    let heap = f.heap_frames();
    let t = Instant::now();
    std::thread::scope(|s| {
        for w in 0..CLIENTS {
            let (stop, sent, per_shard) = (&stop, &sent, &per_shard);
            s.spawn(move || {
                let mut c = client();
                let hosts: Vec<usize> = (w..f.hosts).step_by(CLIENTS).collect();
                // Per host: generation of each changed heap page (VM 0).
                let mut generation: HashMap<(usize, u64), u64> = HashMap::new();
                let mut seq = 1u64 << 32;
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for &h in &hosts {
                        let mut by_shard: BTreeMap<u32, Vec<HolderDelta>> = BTreeMap::new();
                        for k in 0..CHANGES {
                            let i = (round * CHANGES + k) % heap.max(1);
                            let g = generation.entry((h, i)).or_insert(0);
                            let (old, new) = (heap_page(h, 0, i, *g), heap_page(h, 0, i, *g + 1));
                            *g += 1;
                            for (x, d, before) in [(old, -1, 1), (new, 1, 0)] {
                                by_shard
                                    .entry(shard_of(&x, f.shards))
                                    .or_default()
                                    .push(delta(&x, numbers[h], d, before));
                            }
                        }
                        for (shard, d) in by_shard {
                            let n = d.len() as u64;
                            seq += 1;
                            c.write(shard, deltas_cmd(0x57ea_0000 + h as u64, seq, d))
                                .unwrap();
                            sent.fetch_add(n, Ordering::Relaxed);
                            per_shard[shard as usize].fetch_add(n, Ordering::Relaxed);
                        }
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                    round += 1;
                }
            });
        }
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
    });
    let el = t.elapsed().as_secs_f64();
    let all = sent.load(Ordering::Relaxed) as f64 / el;
    let shards: Vec<f64> = per_shard
        .iter()
        .map(|x| x.load(Ordering::Relaxed) as f64 / el)
        .collect();
    let lo = shards.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = shards.iter().copied().fold(0.0, f64::max);
    println!(
        "2. steady state: {all:.0} deltas/s in all over {el:.1} s ({CHANGES} page changes per \
         host and command round), per shard {:.0} on average ({lo:.0} to {hi:.0})",
        all / f64::from(f.shards)
    );
}

/// Part 3: the holder lookups an evacuation of one VM of every host needs.
fn evacuation_lookups(f: &Fleet, client: &(dyn Fn() -> IndexClient + Sync)) {
    let mut by_shard: Vec<Vec<PageHash>> = vec![Vec::new(); f.shards as usize];
    for h in 0..f.hosts {
        for x in f.vm_frames(h, 0) {
            by_shard[shard_of(&x, f.shards) as usize].push(x);
        }
    }
    for v in &mut by_shard {
        v.sort_unstable();
        v.dedup();
    }
    let contents: usize = by_shard.iter().map(Vec::len).sum();
    let t = Instant::now();
    let holders = AtomicU64::new(0);
    std::thread::scope(|s| {
        for (shard, hs) in by_shard.iter().enumerate() {
            let holders = &holders;
            s.spawn(move || {
                let mut c = client();
                for chunk in hs.chunks(4096) {
                    let l = c.lookup(shard as u32, chunk, &[], false).unwrap();
                    holders.fetch_add(l.host.len() as u64, Ordering::Relaxed);
                }
            });
        }
    });
    let secs = t.elapsed().as_secs_f64();
    println!(
        "3. evacuation of {} VMs: {contents} distinct contents looked up in {secs:.2} s \
         ({} holder entries; target under 2 s)",
        f.hosts,
        holders.load(Ordering::Relaxed)
    );
}

/// Part 4: index state on disk per distinct content, each replica.
fn bytes_per_content(reps: &[replica::Replica], shards: u32, contents: u64) {
    std::thread::sleep(Duration::from_millis(500));
    for (i, r) in reps.iter().enumerate() {
        let store = r.store();
        store.compact_all().unwrap();
        let by_cf = store.disk_bytes().unwrap();
        let distinct: u64 = (0..shards).map(|s| store.count_distinct(s).unwrap()).sum();
        let state: u64 = by_cf.iter().filter(|c| c.0 != "log").map(|c| c.1).sum();
        let log: u64 = by_cf.iter().filter(|c| c.0 == "log").map(|c| c.1).sum();
        println!(
            "4. replica {}: {distinct} distinct contents (generated at cold start: {contents}), \
             {:.1} B of index state per content (issue target <= 48), raft log tail {:.0} MiB",
            i + 1,
            state as f64 / distinct.max(1) as f64,
            log as f64 / f64::from(1 << 20)
        );
    }
}
