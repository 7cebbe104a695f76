//! A large shard written straight into replicas' data directories, so that
//! snapshot tests and benchmarks start where a long ingest would have left
//! them: replicas 1 and 2 of a one-shard cluster hold `n` holder lists at
//! raft index [`AT`] with their logs compacted there, and replica 3 holds
//! nothing (its leader can only send it a snapshot).

use std::path::Path;
use std::sync::Arc;

use pagecast_index::keys;
use pagecast_index::raftlog::ShardStorage;
use pagecast_index::store::{CF_HOLDERS, Store};
use raft::eraftpb::{Entry, HardState};

/// The raft index both full replicas start at.
pub const AT: u64 = 5;
/// Its term.
pub const TERM: u64 = 2;

/// The holder key of the `i`th of `n` hashes: spread evenly over the hash
/// space in order, the rest of its bytes from BLAKE3, never the zero page.
pub fn key(i: u64, n: u64) -> [u8; 33] {
    let step = u64::MAX / n.max(1);
    let mut k = [0u8; 33];
    k[0] = keys::HOLDERS;
    k[1..9].copy_from_slice(&(i * step).to_be_bytes());
    k[9..].copy_from_slice(&blake3::hash(&i.to_le_bytes()).as_bytes()[..24]);
    k[32] |= 1;
    k
}

/// Writes `n` holder lists (one holder each, hosts 1 to 16, one frame)
/// into one table file at `path`; returns its bytes.
pub fn write_table(path: &Path, n: u64) -> u64 {
    let opts = rocksdb::Options::default();
    let mut w = rocksdb::SstFileWriter::create(&opts);
    w.open(path).expect("a table file");
    for i in 0..n {
        let host = (i % 16 + 1) as u8;
        w.put(key(i, n), [host, 1]).expect("keys in order");
    }
    w.finish().expect("the table file");
    std::fs::metadata(path).expect("the table file").len()
}

/// Gives `dir` (replica `id` of a one-shard cluster of replicas 1 to 3)
/// the holder lists of `table` at index [`AT`], term [`TERM`], its log
/// compacted there. The table file is hard-linked, not copied.
pub fn prepare(dir: &Path, id: u64, table: &Path) {
    std::fs::create_dir_all(dir).expect("a data directory");
    let store = Arc::new(Store::open(dir, id, 1, true).expect("a store"));
    let link = dir.join("prepared-holders.sst");
    std::fs::hard_link(table, &link).expect("a link to the table file");
    let mut o = rocksdb::IngestExternalFileOptions::default();
    o.set_move_files(true);
    store
        .db()
        .ingest_external_file_cf_opts(store.cf(CF_HOLDERS), &o, vec![link])
        .expect("the table ingested");
    let log = ShardStorage::open(store.clone(), 0, &[1, 2, 3]).expect("the shard's log");
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
    log.append(&entries, Some(&hs)).expect("entries");
    let empty: Vec<(u64, Option<pagecast_index::command::Command>)> =
        (1..=AT).map(|i| (i, None)).collect();
    store.apply(0, &empty, TERM).expect("applied");
    log.compact(AT).expect("compacted");
}

/// Prepares `root/replica1` and `root/replica2` (where
/// [`crate::cluster::IndexCluster::start`] looks) with `n` holder lists;
/// returns the bytes of their table file.
pub fn prepare_two(root: &Path, n: u64) -> u64 {
    let table = root.join("holders.sst");
    let bytes = write_table(&table, n);
    for id in 1..=2 {
        prepare(&root.join(format!("replica{id}")), id, &table);
    }
    std::fs::remove_file(&table).expect("the table file removed");
    bytes
}

/// Peak resident memory of process `pid` (`VmHWM`), in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
