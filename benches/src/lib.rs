//! Shared helpers of pagecast's benchmark harnesses.

/// The median of `v` (sorted in place); 0 for an empty slice.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// An environment variable parsed as a number, or a default.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User plus system CPU seconds this process has used so far, all threads.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given, which is a
    // zeroed, properly aligned `rusage` owned by this frame.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(ru.ru_utime) + s(ru.ru_stime)
}

/// A free TCP port on 127.0.0.1.
pub use pagecast_tests::cluster::free_port;

/// The baseline the content index is measured against: the same holder
/// deltas written straight into RocksDB (one column family, no
/// compression), one synced `WriteBatch` of `batch` deltas at a time, one
/// writer thread per list. Returns deltas per second.
pub fn raw_rocksdb(all: &[Vec<pagecast_proto::v1::HolderDelta>], batch: usize) -> f64 {
    let d = tempfile::tempdir().expect("a temporary directory");
    let mut o = rocksdb::Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    o.set_compression_type(rocksdb::DBCompressionType::None);
    let cf_name = pagecast_index::store::CF_HOLDERS;
    let db = rocksdb::DB::open_cf(&o, d.path(), [cf_name]).expect("RocksDB");
    let cf = db.cf_handle(cf_name).expect("column family");
    let mut w = rocksdb::WriteOptions::default();
    w.set_sync(true);
    let n: usize = all.iter().map(Vec::len).sum();
    let t = std::time::Instant::now();
    std::thread::scope(|s| {
        for ds in all {
            let (db, cf, w) = (&db, &cf, &w);
            s.spawn(move || {
                for chunk in ds.chunks(batch) {
                    let mut wb = rocksdb::WriteBatch::default();
                    for d in chunk {
                        let mut k = [0u8; 33];
                        k[0] = b'h';
                        k[1..].copy_from_slice(&d.hash);
                        let mut v = [0u8; 12];
                        v[..4].copy_from_slice(&d.host.to_le_bytes());
                        v[4..].copy_from_slice(&d.frames.to_le_bytes());
                        wb.put_cf(cf, k, v);
                    }
                    db.write_opt(wb, w).expect("RocksDB write");
                }
            });
        }
    });
    n as f64 / t.elapsed().as_secs_f64()
}

/// Starts `n` index replicas in this process (`replica::start`, as `index
/// serve` runs them: raft log synced, compaction after 512 entries or 32
/// MiB), each on a free loopback port with data under `root` and a
/// certificate from `ca`; returns them and their addresses, in id order.
pub fn start_replicas(
    root: &std::path::Path,
    ca: &pagecast_channel::ca::Authority,
    n: u64,
    shards: u32,
) -> (Vec<pagecast_index::replica::Replica>, Vec<String>) {
    use pagecast_index::replica::{self, ReplicaConfig};
    let peers: std::collections::BTreeMap<u64, String> = (1..=n)
        .map(|i| (i, format!("127.0.0.1:{}", free_port())))
        .collect();
    let reps = (1..=n)
        .map(|id| {
            replica::start(ReplicaConfig {
                id,
                listen: peers[&id].clone(),
                peers: peers.clone(),
                data: root.join(format!("r{id}")),
                shards,
                sync: true,
                compact_after: 512,
                compact_bytes: 32 << 20,
                raft_log_level: slog::Level::Warning,
                tls: ca
                    .issue(&format!("index-{id}"), pagecast_channel::Role::Index, 1)
                    .expect("a replica certificate"),
                part_deadline: replica::PART_DEADLINE,
                join: false,
                // Every replica votes in every shard, as when these
                // figures were first measured.
                voters_per_shard: 0,
            })
            .expect("a replica starts")
        })
        .collect();
    (reps, peers.into_values().collect())
}
