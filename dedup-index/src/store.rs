//! One replica's RocksDB: the raft log and state of every shard, and the
//! state machine the log builds (holder lists, hosts, VMs, writer
//! sessions).
//!
//! Column families, one per concern: `log` (raft entries), `raft` (hard
//! state, conf state, compaction point), `meta` (applied index and
//! counters, sessions, hosts, VMs) and `holders` (one holder list per
//! distinct hash). Keys come from [`crate::keys`]. Applying committed
//! entries writes every state change and the new applied index in one
//! `WriteBatch`, so a crash leaves the shard at some applied index, never
//! between two.
//!
//! Holder deltas are blind writes: applying one never reads the content's
//! holder list. Each apply writes, per content it touches, one RocksDB
//! merge operand ([`crate::holders::Changes`]), and RocksDB folds the
//! operands into the list when it is read or compacted
//! ([`crate::holders::merge`]); a list left with no holder is an empty
//! value, which compaction drops. What a delta changes besides the list is
//! linear in the delta (a host's frames and digest, the shard's frames) or
//! taken from the writer's own account (a host's distinct contents, from
//! the delta's `before`), so nothing else needs the list either.

use std::collections::HashMap;

use std::path::Path;

use pagecast_proto::refusal;
use pagecast_proto::v1::{
    HostInfo, Refusal, RefusalCode, VmRecord, VmState, WriteResponse, index_command::Op,
};
use rocksdb::compaction_filter::Decision as CompactionDecision;
use rocksdb::merge_operator::MergeOperands;
use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options,
    ReadOptions, WriteBatch, WriteOptions,
};

use crate::command::{Command, Delta, deltas_of};
use crate::holders::{self, Changes, HolderList, HoldingSum, HoldingsPage};
use crate::keys::{self, StateKind};
use crate::snapshot;
use crate::{PageHash, Sketch};

/// Column family of raft log entries.
pub const CF_LOG: &str = "log";
/// Column family of raft state records.
pub const CF_RAFT: &str = "raft";
/// Column family of applied indexes, sessions, hosts and VMs.
pub const CF_META: &str = "meta";
/// Column family of holder lists.
pub const CF_HOLDERS: &str = "holders";

/// The directory, inside a replica's data directory, of its snapshot
/// checkpoints (`out`) and staged incoming snapshots (`in`).
pub const SNAPSHOTS_DIR: &str = "pagecast-snapshots";

/// Longest host or VM name.
pub const MAX_NAME: usize = pagecast_proto::MAX_VM_NAME_BYTES;
/// Most VMs one host report lists.
pub const MAX_REPORTED_VMS: usize = 4096;
/// Longest address or rack name in a host report.
pub const MAX_FIELD: usize = 256;

/// Errors of the replica's storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB failed.
    #[error("storage: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// A stored record does not decode.
    #[error("storage: corrupt {what} record: {detail}")]
    Corrupt {
        /// Which record.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The directory was created for another replica or shard count.
    #[error(
        "{dir}: this directory belongs to replica {id} of a {shards}-shard cluster, not replica {want_id} of {want_shards}"
    )]
    Identity {
        /// The directory.
        dir: String,
        /// Replica id recorded there.
        id: u64,
        /// Shard count recorded there.
        shards: u32,
        /// Replica id asked for.
        want_id: u64,
        /// Shard count asked for.
        want_shards: u32,
    },
    /// A snapshot's bytes are malformed.
    #[error("snapshot: {0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// A shard's applied index and the counters kept with it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Last applied raft index.
    pub index: u64,
    /// Its term.
    pub term: u64,
    /// Sum of all holders' frames.
    pub frames: u64,
    /// Next host number (shard 0 only).
    pub next_host: u32,
}

impl Applied {
    fn encode(&self) -> [u8; 36] {
        let mut b = [0u8; 36];
        b[..8].copy_from_slice(&self.index.to_le_bytes());
        b[8..16].copy_from_slice(&self.term.to_le_bytes());
        // Bytes 16..24 held a count of distinct hashes, which blind writes
        // cannot keep; they stay zero ([`Store::count_distinct`] counts).
        b[24..32].copy_from_slice(&self.frames.to_le_bytes());
        b[32..].copy_from_slice(&self.next_host.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<Self, StoreError> {
        if b.len() != 36 {
            return Err(StoreError::Corrupt {
                what: "applied",
                detail: format!("{} bytes", b.len()),
            });
        }
        let u = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8"));
        Ok(Applied {
            index: u(0..8),
            term: u(8..16),
            frames: u(24..32),
            next_host: u32::from_le_bytes(b[32..].try_into().expect("4")),
        })
    }
}

/// The outcome of applying one command: refusals carry a code.
pub type CommandResult = Result<WriteResponse, Refusal>;

fn invalid(m: impl Into<String>) -> Refusal {
    refusal(RefusalCode::Invalid, m)
}

fn refused(m: impl Into<String>) -> Refusal {
    refusal(RefusalCode::Refused, m)
}

fn not_found(m: impl Into<String>) -> Refusal {
    refusal(RefusalCode::NotFound, m)
}

/// One replica's database.
pub struct Store {
    db: DB,
    shards: u32,
    sync: bool,
    dir: std::path::PathBuf,
    /// Per shard, the checkpoint its last snapshot is served from.
    checkpoints: std::sync::Mutex<HashMap<u32, std::sync::Arc<ShardCheckpoint>>>,
}

/// A consistent copy of the whole database (RocksDB hard-links its files),
/// open read-only, from which one shard's snapshot is streamed in parts
/// while the live database moves on. Removed from disk when dropped.
pub struct ShardCheckpoint {
    /// The shard whose snapshot this is.
    pub shard: u32,
    /// The shard's applied index in it: the snapshot's index.
    pub index: u64,
    /// Its term.
    pub term: u64,
    dir: std::path::PathBuf,
    db: Option<DB>,
    made: std::time::Instant,
    last_used: std::sync::Mutex<std::time::Instant>,
}

impl ShardCheckpoint {
    /// A raft state record of the shard as the checkpoint holds it (its
    /// conf state at the snapshot's index, say).
    pub fn raft_state(&self, kind: StateKind) -> Result<Option<Vec<u8>>, StoreError> {
        let db = self.db.as_ref().expect("open while held");
        let cf = db
            .cf_handle(CF_RAFT)
            .expect("column families are created at open");
        Ok(db.get_cf(cf, keys::raft_state(self.shard, kind))?)
    }
}

impl Drop for ShardCheckpoint {
    fn drop(&mut self) {
        drop(self.db.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A checkpoint is replaced by a newer one only once it is this old and
/// no part of it was asked for this long ([`CHECKPOINT_IDLE`]): a replica
/// fetching a large shard is not cut off by the leader's next snapshot.
pub const CHECKPOINT_REUSE: std::time::Duration = std::time::Duration::from_secs(600);
/// See [`CHECKPOINT_REUSE`].
pub const CHECKPOINT_IDLE: std::time::Duration = std::time::Duration::from_secs(60);
/// Bytes of records in one snapshot part.
pub const SNAPSHOT_PART_BYTES: usize = 2 << 20;

/// One part of a shard's snapshot: records in the snapshot encoding, and
/// where the next part starts (`None`: this was the last).
pub type SnapshotPart = (Vec<u8>, Option<Vec<u8>>);

fn db_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    o.set_max_background_jobs(2);
    o.set_keep_log_file_num(4);
    // Each shard's node thread writes its own batches, sorted by key.
    // Written one after another, a batch's inserts reuse the skip list's
    // last position (it walks from there, not from the top); written
    // concurrently, every insert searches from the top.
    o.set_allow_concurrent_memtable_write(false);
    o
}

fn descriptors() -> impl Iterator<Item = ColumnFamilyDescriptor> {
    [CF_LOG, CF_RAFT, CF_META, CF_HOLDERS]
        .into_iter()
        .map(|n| ColumnFamilyDescriptor::new(n, cf_options(n)))
}

/// The applied record of `shard` in `db`.
fn read_applied(db: &DB, shard: u32) -> Result<Applied, StoreError> {
    let cf = db
        .cf_handle(CF_META)
        .expect("column families are created at open");
    match db.get_cf(cf, keys::applied(shard))? {
        Some(v) => Applied::decode(&v),
        None => Ok(Applied::default()),
    }
}

/// The ranges a shard's snapshot carries, in the order it carries them:
/// its holder lists, then its meta ranges (all increasing).
fn snapshot_ranges(shard: u32, shards: u32) -> Vec<(snapshot::Column, Vec<u8>, Vec<u8>)> {
    let (lo, hi) = keys::holders_range(shard, shards);
    let mut r = vec![(snapshot::Column::Holders, lo, hi)];
    for (lo, hi) in keys::meta_ranges(shard) {
        r.push((snapshot::Column::Meta, lo, hi));
    }
    r
}

pub(crate) fn cf_options(kind: &str) -> Options {
    let mut o = Options::default();
    o.set_compression_type(rocksdb::DBCompressionType::None);
    if kind == CF_HOLDERS || kind == CF_META {
        let mut t = BlockBasedOptions::default();
        t.set_bloom_filter(10.0, false);
        t.set_block_size(16 << 10);
        o.set_block_based_table_factory(&t);
    }
    if kind == CF_HOLDERS {
        o.set_merge_operator(
            "pagecast-holders-v1",
            |_key: &[u8], base: Option<&[u8]>, ops: &MergeOperands| {
                // A list that does not decode is corruption: RocksDB
                // reports it as such to the read or compaction.
                holders::merge(base, ops.iter()).ok()
            },
            |_key: &[u8], _base: Option<&[u8]>, ops: &MergeOperands| {
                // Change lists in order, concatenated: exact, whatever
                // base they later meet.
                Some(ops.iter().flatten().copied().collect())
            },
        );
        o.set_compaction_filter(
            "pagecast-empty-holders",
            |_level: u32, _key: &[u8], value: &[u8]| {
                if value.is_empty() {
                    CompactionDecision::Remove
                } else {
                    CompactionDecision::Keep
                }
            },
        );
        o.set_level_compaction_dynamic_level_bytes(true);
        // No bloom filter on the last level, which holds most lists: with
        // blind writes nothing reads a list to apply a delta, and a lookup
        // mostly asks for content some host holds, where a filter only
        // costs its 1.25 bytes a key.
        o.set_optimize_filters_for_hits(true);
        // Most page hashes are new: a bloom filter over the memtable's keys
        // answers most lookups without walking its skip list.
        o.set_memtable_whole_key_filtering(true);
        o.set_memtable_prefix_bloom_ratio(0.1);
    }
    o
}

pub(crate) fn name_ok(n: &str) -> bool {
    pagecast_proto::name_ok(n)
}

impl Store {
    /// Opens (creating if needed) the database of replica `id` of a
    /// `shards`-shard cluster in `dir`. `sync` makes every raft log write
    /// wait for the disk.
    pub fn open(dir: &Path, id: u64, shards: u32, sync: bool) -> Result<Self, StoreError> {
        let db = DB::open_cf_descriptors(&db_options(), dir, descriptors())?;
        // Checkpoints and staged snapshots of a previous run are stale.
        let _ = std::fs::remove_dir_all(dir.join(SNAPSHOTS_DIR));
        let s = Store {
            db,
            shards,
            sync,
            dir: dir.to_path_buf(),
            checkpoints: Default::default(),
        };
        let key = keys::raft_state(0, StateKind::Identity);
        let mut want = [0u8; 12];
        want[..8].copy_from_slice(&id.to_le_bytes());
        want[8..].copy_from_slice(&shards.to_le_bytes());
        match s.db.get_cf(s.cf(CF_RAFT), key)? {
            Some(v) if v == want => {}
            Some(v) if v.len() == 12 => {
                return Err(StoreError::Identity {
                    dir: dir.display().to_string(),
                    id: u64::from_le_bytes(v[..8].try_into().expect("8")),
                    shards: u32::from_le_bytes(v[8..].try_into().expect("4")),
                    want_id: id,
                    want_shards: shards,
                });
            }
            Some(_) => {
                return Err(StoreError::Corrupt {
                    what: "identity",
                    detail: "wrong length".into(),
                });
            }
            None => {
                let mut w = WriteOptions::default();
                w.set_sync(true);
                s.db.put_cf_opt(s.cf(CF_RAFT), key, want, &w)?;
            }
        }
        Ok(s)
    }

    /// The shard count.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The RocksDB handle.
    pub fn db(&self) -> &DB {
        &self.db
    }

    /// A column family handle.
    pub fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    /// Write options for raft log and state.
    pub fn log_write_options(&self) -> WriteOptions {
        let mut w = WriteOptions::default();
        w.set_sync(self.sync);
        w
    }

    /// The applied index and counters of `shard`.
    pub fn applied(&self, shard: u32) -> Result<Applied, StoreError> {
        match self.db.get_cf(self.cf(CF_META), keys::applied(shard))? {
            Some(v) => Applied::decode(&v),
            None => Ok(Applied::default()),
        }
    }

    fn session(&self, shard: u32, client: u64) -> Result<u64, StoreError> {
        Ok(
            match self
                .db
                .get_cf(self.cf(CF_META), keys::session(shard, client))?
            {
                Some(v) if v.len() == 8 => u64::from_le_bytes(v[..].try_into().expect("8")),
                Some(_) => {
                    return Err(StoreError::Corrupt {
                        what: "session",
                        detail: "wrong length".into(),
                    });
                }
                None => 0,
            },
        )
    }

    /// The holder lists of `hashes`, in order.
    pub fn holders(&self, hashes: &[PageHash]) -> Result<Vec<HolderList>, StoreError> {
        let ks: Vec<[u8; 33]> = hashes.iter().map(keys::holders).collect();
        let got = self
            .db
            .batched_multi_get_cf(self.cf(CF_HOLDERS), &ks, false);
        got.into_iter()
            .map(|r| match r? {
                Some(v) => HolderList::decode(&v).map_err(|e| StoreError::Corrupt {
                    what: "holders",
                    detail: e.to_string(),
                }),
                None => Ok(HolderList::default()),
            })
            .collect()
    }

    fn meta_get<M: prost::Message + Default>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<M>, StoreError> {
        match self.db.get_cf(self.cf(CF_META), key)? {
            Some(v) => M::decode(&v[..])
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    what,
                    detail: e.to_string(),
                }),
            None => Ok(None),
        }
    }

    fn scan_meta<M: prost::Message + Default>(
        &self,
        prefix: u8,
        what: &'static str,
    ) -> Result<Vec<M>, StoreError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(vec![prefix + 1]);
        let mut out = Vec::new();
        let it = self.db.iterator_cf_opt(
            self.cf(CF_META),
            ro,
            IteratorMode::From(&[prefix], Direction::Forward),
        );
        for kv in it {
            let (_, v) = kv?;
            out.push(M::decode(&v[..]).map_err(|e| StoreError::Corrupt {
                what,
                detail: e.to_string(),
            })?);
        }
        Ok(out)
    }

    /// Every VM record (shard 0's state).
    pub fn vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let mut v: Vec<VmRecord> = self.scan_meta(keys::VM, "vm")?;
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// Every host record (shard 0's state).
    pub fn hosts(&self) -> Result<Vec<HostInfo>, StoreError> {
        self.scan_meta(keys::HOST, "host")
    }

    /// What each host holds in `shard` (`host` 0: every host), summed.
    pub fn holdings(&self, shard: u32, host: u32) -> Result<Vec<(u32, HoldingSum)>, StoreError> {
        let (lo, hi) = if host == 0 {
            (keys::holding(shard, 0), keys::holding(shard + 1, 0))
        } else {
            let mut hi = keys::holding(shard, host);
            hi[6] = hi[6].wrapping_add(1);
            if hi[6] == 0 {
                hi = keys::holding(shard, host.saturating_add(1));
            }
            (keys::holding(shard, host), hi)
        };
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(hi.to_vec());
        let mut out = Vec::new();
        for kv in self.db.iterator_cf_opt(
            self.cf(CF_META),
            ro,
            IteratorMode::From(&lo, Direction::Forward),
        ) {
            let (k, v) = kv?;
            let corrupt = || StoreError::Corrupt {
                what: "holding",
                detail: format!("{} bytes", v.len()),
            };
            let (_, h) = keys::parse_holding(&k).ok_or_else(corrupt)?;
            out.push((h, HoldingSum::decode(&v).ok_or_else(corrupt)?));
        }
        Ok(out)
    }

    /// Up to `limit` (hash, frames) pairs host `host` holds in `shard`, in
    /// hash order after `after`, scanning at most `scan` holder lists;
    /// returns them and where to go on (`None`: the end of the shard).
    pub fn list_holdings(
        &self,
        shard: u32,
        host: u32,
        after: Option<PageHash>,
        limit: usize,
        scan: usize,
    ) -> Result<HoldingsPage, StoreError> {
        let (lo, hi) = keys::holders_range(shard, self.shards);
        let start = match after {
            Some(a) => {
                let mut k = keys::holders(&a).to_vec();
                // The smallest key after `a`'s.
                k.push(0);
                k
            }
            None => lo,
        };
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(hi);
        let mut out = Vec::new();
        let mut last = None;
        for (scanned, kv) in self
            .db
            .iterator_cf_opt(
                self.cf(CF_HOLDERS),
                ro,
                IteratorMode::From(&start, Direction::Forward),
            )
            .enumerate()
        {
            let (k, v) = kv?;
            let h = keys::parse_holders(&k).ok_or_else(|| StoreError::Corrupt {
                what: "holders key",
                detail: format!("{} bytes", k.len()),
            })?;
            if out.len() >= limit || scanned >= scan {
                return Ok((out, last));
            }
            let l = HolderList::decode(&v).map_err(|e| StoreError::Corrupt {
                what: "holders",
                detail: e.to_string(),
            })?;
            let f = l.frames_of(host);
            if f > 0 {
                out.push((h, f));
            }
            last = Some(h);
        }
        Ok((out, None))
    }

    /// Applies committed commands of `shard`, in order, and records
    /// `index`/`term` as applied, in one write. `commands` holds, for each
    /// entry, its decoded command or `None` for an empty entry.
    pub fn apply(
        &self,
        shard: u32,
        entries: &[(u64, Option<Command>)],
        term: u64,
    ) -> Result<Vec<CommandResult>, StoreError> {
        let Some(&(last, _)) = entries.last() else {
            return Ok(Vec::new());
        };
        let mut a = Apply {
            store: self,
            shard,
            applied: self.applied(shard)?,
            changes: Vec::new(),
            meta: HashMap::new(),
            sessions: HashMap::new(),
        };
        let mut results = Vec::with_capacity(entries.len());
        for (index, cmd) in entries {
            let Some(cmd) = cmd else {
                results.push(Ok(WriteResponse::default()));
                continue;
            };
            results.push(a.command(*index, cmd)?);
        }
        a.applied.index = last;
        a.applied.term = term;
        let mut wb = WriteBatch::default();
        let hcf = self.cf(CF_HOLDERS);
        // One merge operand per content touched, in key order: the
        // memtable's skip list then finds each insert's place next to the
        // previous one instead of from its top. The sort is stable, so a
        // content's changes stay in the order they came.
        a.changes.sort_by_key(|c| c.0);
        let mut op = Changes::default();
        for (i, (k, host, d)) in a.changes.iter().enumerate() {
            op.push(*host, *d);
            if a.changes.get(i + 1).is_none_or(|next| next.0 != *k) {
                wb.merge_cf(hcf, k, op.as_bytes());
                op.clear();
            }
        }
        let mcf = self.cf(CF_META);
        for (k, v) in &a.meta {
            match v {
                Some(v) => wb.put_cf(mcf, k, v),
                None => wb.delete_cf(mcf, k),
            }
        }
        for (c, s) in &a.sessions {
            wb.put_cf(mcf, keys::session(shard, *c), s.to_le_bytes());
        }
        wb.put_cf(mcf, keys::applied(shard), a.applied.encode());
        self.db.write_opt(wb, &WriteOptions::default())?;
        Ok(results)
    }

    /// The checkpoint of `shard` a snapshot of index `at_least` or later
    /// is served from: the current one if it is that recent and either
    /// young or still being read, else a new one of the database as it is
    /// now. `None` while the shard has applied nothing.
    pub fn checkpoint(
        &self,
        shard: u32,
        at_least: u64,
    ) -> Result<Option<std::sync::Arc<ShardCheckpoint>>, StoreError> {
        let mut map = self.checkpoints.lock().expect("not poisoned");
        if let Some(c) = map.get(&shard) {
            let busy = c.last_used.lock().expect("not poisoned").elapsed() < CHECKPOINT_IDLE;
            if c.index >= at_least && (c.made.elapsed() < CHECKPOINT_REUSE || busy) {
                return Ok(Some(c.clone()));
            }
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let out = self.dir.join(SNAPSHOTS_DIR).join("out");
        std::fs::create_dir_all(&out).map_err(|e| StoreError::Corrupt {
            what: "snapshot directory",
            detail: format!("{}: {e}", out.display()),
        })?;
        let dir = out.join(format!("shard-{shard}-{nanos}"));
        rocksdb::checkpoint::Checkpoint::new(&self.db)?.create_checkpoint(&dir)?;
        let mut c = ShardCheckpoint {
            shard,
            index: 0,
            term: 0,
            dir,
            db: None,
            made: std::time::Instant::now(),
            last_used: std::sync::Mutex::new(std::time::Instant::now()),
        };
        let db = DB::open_cf_descriptors_read_only(&db_options(), &c.dir, descriptors(), false)?;
        let applied = read_applied(&db, shard)?;
        c.db = Some(db);
        c.index = applied.index;
        c.term = applied.term;
        if applied.index == 0 {
            return Ok(None);
        }
        let c = std::sync::Arc::new(c);
        map.insert(shard, c.clone());
        Ok(Some(c))
    }

    /// The part of `shard`'s snapshot `index` after `after` (empty: the
    /// first part), records up to about `max_bytes` (the replica serves
    /// [`SNAPSHOT_PART_BYTES`]), read from its checkpoint. `Ok(None)` when
    /// this replica no longer has that snapshot (the one asking starts
    /// again from the next).
    pub fn snapshot_part(
        &self,
        shard: u32,
        index: u64,
        after: &[u8],
        max_bytes: usize,
    ) -> Result<Option<SnapshotPart>, StoreError> {
        let c = match self.checkpoints.lock().expect("not poisoned").get(&shard) {
            Some(c) if c.index == index => c.clone(),
            _ => return Ok(None),
        };
        *c.last_used.lock().expect("not poisoned") = std::time::Instant::now();
        let db = c.db.as_ref().expect("open while held");
        let ranges = snapshot_ranges(shard, self.shards);
        let (from_range, from_key) = match after.split_first() {
            None => (0, None),
            Some((&r, k)) if usize::from(r) < ranges.len() => (usize::from(r), Some(k)),
            Some(_) => {
                return Err(StoreError::Corrupt {
                    what: "snapshot part request",
                    detail: "no such range".into(),
                });
            }
        };
        let mut out = Vec::new();
        for (r, (column, lo, hi)) in ranges.iter().enumerate().skip(from_range) {
            let start = match from_key {
                Some(k) if r == from_range => {
                    // The smallest key after the last one sent.
                    let mut s = k.to_vec();
                    s.push(0);
                    s
                }
                _ => lo.clone(),
            };
            let cf = match column {
                snapshot::Column::Holders => CF_HOLDERS,
                snapshot::Column::Meta => CF_META,
            };
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(hi.clone());
            ro.fill_cache(false);
            let handle = db
                .cf_handle(cf)
                .expect("column families are created at open");
            for kv in db.iterator_cf_opt(handle, ro, IteratorMode::From(&start, Direction::Forward))
            {
                let (k, v) = kv?;
                // A holder list with no holder left is no record.
                if *column == snapshot::Column::Holders && v.is_empty() {
                    continue;
                }
                snapshot::encode_record(&mut out, *column, &k, &v);
                if out.len() >= max_bytes {
                    let mut next = vec![r as u8];
                    next.extend_from_slice(&k);
                    return Ok(Some((out, Some(next))));
                }
            }
        }
        Ok(Some((out, None)))
    }

    /// The members (`ID=HOST:PORT,...`) configuration changes left, if any
    /// were applied on this replica.
    pub fn members(&self) -> Result<Option<String>, StoreError> {
        match self
            .db
            .get_cf(self.cf(CF_RAFT), keys::raft_state(0, StateKind::Members))?
        {
            Some(v) => String::from_utf8(v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    what: "members",
                    detail: e.to_string(),
                }),
            None => Ok(None),
        }
    }

    /// Records the members after a configuration change.
    pub fn set_members(&self, members: &str) -> Result<(), StoreError> {
        let mut w = WriteOptions::default();
        w.set_sync(true);
        self.db.put_cf_opt(
            self.cf(CF_RAFT),
            keys::raft_state(0, StateKind::Members),
            members.as_bytes(),
            &w,
        )?;
        Ok(())
    }

    /// Where snapshots received for `shard` are staged before they are
    /// installed.
    pub fn staging_dir(&self, shard: u32, index: u64) -> std::path::PathBuf {
        self.dir
            .join(SNAPSHOTS_DIR)
            .join("in")
            .join(format!("shard-{shard}-{index}"))
    }

    /// Removes every staged snapshot of `shard`.
    pub fn clear_staging(&self, shard: u32) {
        let root = self.dir.join(SNAPSHOTS_DIR).join("in");
        let prefix = format!("shard-{shard}-");
        if let Ok(rd) = std::fs::read_dir(&root) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// Adds to `wb` the removal of `shard`'s whole state machine (its
    /// holder lists and meta ranges), before a snapshot replaces it.
    pub fn clear_state(&self, shard: u32, wb: &mut WriteBatch) {
        for (column, lo, hi) in snapshot_ranges(shard, self.shards) {
            let cf = match column {
                snapshot::Column::Holders => CF_HOLDERS,
                snapshot::Column::Meta => CF_META,
            };
            wb.delete_range_cf(self.cf(cf), &lo, &hi);
        }
    }

    /// Moves a staged snapshot's table files (written by
    /// [`crate::snapshot_in::stage`]) into the database: the holder lists'
    /// files (disjoint, in key order) in one ingestion, then the meta file.
    pub fn ingest_staged(&self, dir: &Path) -> Result<(), StoreError> {
        let io = |e: std::io::Error| StoreError::Corrupt {
            what: "staged snapshot",
            detail: format!("{}: {e}", dir.display()),
        };
        let mut holders: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().is_some_and(|n| {
                    n.to_string_lossy()
                        .starts_with(crate::snapshot_in::HOLDERS_PREFIX)
                })
            })
            .collect();
        holders.sort();
        let mut o = rocksdb::IngestExternalFileOptions::default();
        o.set_move_files(true);
        if !holders.is_empty() {
            self.db
                .ingest_external_file_cf_opts(self.cf(CF_HOLDERS), &o, holders)?;
        }
        let meta = dir.join(crate::snapshot_in::META_FILE);
        if meta.exists() {
            self.db
                .ingest_external_file_cf_opts(self.cf(CF_META), &o, vec![meta])?;
        }
        Ok(())
    }

    /// The distinct hashes of `shard` with at least one holder, counted by
    /// reading every holder list of the shard (blind writes keep no count).
    pub fn count_distinct(&self, shard: u32) -> Result<u64, StoreError> {
        let (lo, hi) = keys::holders_range(shard, self.shards);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(hi);
        ro.fill_cache(false);
        let mut n = 0;
        for kv in self.db.iterator_cf_opt(
            self.cf(CF_HOLDERS),
            ro,
            IteratorMode::From(&lo, Direction::Forward),
        ) {
            let (_, v) = kv?;
            n += u64::from(!v.is_empty());
        }
        Ok(n)
    }

    /// RocksDB's estimate of the distinct hashes of `shard`: its estimate
    /// of the holder keys of this replica, in the share of the hash space
    /// the shard owns. Merge operands not yet folded count as keys.
    pub fn estimate_distinct(&self, shard: u32) -> Result<u64, StoreError> {
        let all = self
            .db
            .property_int_value_cf(self.cf(CF_HOLDERS), "rocksdb.estimate-num-keys")?
            .unwrap_or(0);
        let (lo, hi) = keys::shard_prefix_range(shard, self.shards);
        Ok(((u128::from(all) * u128::from(hi - lo)) >> 16) as u64)
    }

    /// Bytes of live SST files of each column family.
    pub fn disk_bytes(&self) -> Result<Vec<(&'static str, u64)>, StoreError> {
        let mut out = Vec::new();
        for cf in [CF_LOG, CF_RAFT, CF_META, CF_HOLDERS] {
            let n = self
                .db
                .property_int_value_cf(self.cf(cf), "rocksdb.live-sst-files-size")?
                .unwrap_or(0);
            out.push((cf, n));
        }
        Ok(out)
    }

    /// Flushes memtables and compacts every column family fully.
    pub fn compact_all(&self) -> Result<(), StoreError> {
        for cf in [CF_LOG, CF_RAFT, CF_META, CF_HOLDERS] {
            self.db.flush_cf(self.cf(cf))?;
            let mut o = rocksdb::CompactOptions::default();
            o.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
            self.db
                .compact_range_cf_opt(self.cf(cf), None::<&[u8]>, None::<&[u8]>, &o);
        }
        Ok(())
    }
}

/// Up to this many hosts in one command, a host's running sum is found
/// by a scan rather than a map.
const FEW_HOSTS: usize = 8;

/// The state of one `apply` call: reads see the writes of earlier entries
/// of the same call.
struct Apply<'a> {
    store: &'a Store,
    shard: u32,
    applied: Applied,
    /// The holder changes of this call as they came: holder key, host and
    /// frames added.
    changes: Vec<([u8; 33], u32, i64)>,
    meta: HashMap<Vec<u8>, Option<Vec<u8>>>,
    sessions: HashMap<u64, u64>,
}

impl Apply<'_> {
    fn session(&self, client: u64) -> Result<u64, StoreError> {
        match self.sessions.get(&client) {
            Some(s) => Ok(*s),
            None => self.store.session(self.shard, client),
        }
    }

    fn meta_get<M: prost::Message + Default>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<M>, StoreError> {
        match self.meta.get(key) {
            Some(Some(v)) => M::decode(&v[..])
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    what,
                    detail: e.to_string(),
                }),
            Some(None) => Ok(None),
            None => self.store.meta_get(key, what),
        }
    }

    fn meta_put(&mut self, key: &[u8], m: &impl prost::Message) {
        self.meta.insert(key.to_vec(), Some(m.encode_to_vec()));
    }

    fn command(&mut self, index: u64, cmd: &Command) -> Result<CommandResult, StoreError> {
        let (client, seq) = (cmd.client(), cmd.seq());
        if client != 0 {
            let last = self.session(client)?;
            if seq <= last {
                return Ok(Ok(WriteResponse {
                    duplicate: true,
                    applied_index: index,
                    ..Default::default()
                }));
            }
        }
        let op = match cmd {
            Command::Deltas { deltas, .. } => {
                let r = self.deltas(deltas)?;
                return self.applied_at(index, cmd, r);
            }
            Command::Other(c) => &c.op,
        };
        let r = match op {
            Some(Op::Deltas(d)) => match deltas_of(&d.deltas) {
                Ok(ds) => self.deltas(&ds)?,
                Err((i, len)) => Err(invalid(format!("delta {i}: a hash is 32 bytes, not {len}"))),
            },
            Some(op) if self.shard != 0 => Err(invalid(format!(
                "{} goes to shard 0, not shard {}",
                op_name(op),
                self.shard
            ))),
            Some(Op::RegisterHost(r)) => self.register_host(&r.name)?,
            Some(Op::BeginVm(b)) => match &b.vm {
                Some(vm) => self.begin_vm(index, vm)?,
                None => Err(invalid("begin_vm without a VM")),
            },
            Some(Op::SetVmState(s)) => self.set_vm_state(&s.name, s.host, s.state)?,
            Some(Op::RemoveVm(r)) => self.remove_vm(&r.name, r.host)?,
            Some(Op::HostReport(r)) => self.host_report(r)?,
            Some(Op::PutVm(p)) => match &p.vm {
                Some(vm) => self.put_vm(vm)?,
                None => Err(invalid("put_vm without a VM")),
            },
            Some(Op::DropVm(d)) => self.drop_vm(&d.name, d.host)?,
            Some(Op::MoveVm(m)) => self.move_vm(&m.name, m.from, &m.to)?,
            Some(Op::SetCordon(c)) => self.set_cordon(c)?,
            None => Err(invalid("empty command")),
        };
        self.applied_at(index, cmd, r)
    }

    /// Command `cmd`'s result `r` at `index`. Only an applied command ends
    /// its session's sequence number: a refused one changed nothing, and a
    /// re-send is judged again (and refused again, unless the state it
    /// needed has come about since).
    fn applied_at(
        &mut self,
        index: u64,
        cmd: &Command,
        r: Result<WriteResponse, Refusal>,
    ) -> Result<CommandResult, StoreError> {
        if cmd.client() != 0 && r.is_ok() {
            self.sessions.insert(cmd.client(), cmd.seq());
        }
        Ok(r.map(|mut w| {
            w.applied_index = index;
            w
        }))
    }

    fn deltas(&mut self, deltas: &[Delta]) -> Result<CommandResult, StoreError> {
        let n = self.store.shards;
        let mut parsed = Vec::with_capacity(deltas.len());
        for (i, d) in deltas.iter().enumerate() {
            let h = PageHash::from_bytes(d.hash);
            if crate::keys::shard_of(&h, n) != self.shard {
                return Ok(Err(invalid(format!(
                    "delta {i}: hash {h} is not in shard {}",
                    self.shard
                ))));
            }
            if h.is_zero_page() {
                return Ok(Err(invalid(format!(
                    "delta {i}: the zero page is not indexed"
                ))));
            }
            parsed.push((keys::holders(&h), d.host, d.frames, d.before));
        }
        // A delta is judged by the writer's own account alone: nothing is
        // read, and a refusal refuses the whole command, identically on
        // every replica.
        for (i, (k, host, d, before)) in parsed.iter().enumerate() {
            if before.checked_add_signed(*d).is_none() {
                let h = keys::parse_holders(k).expect("holder key");
                return Ok(Err(refused(format!(
                    "delta {i}: host {host} says it holds {before} frames of {h}, cannot add {d}"
                ))));
            }
        }
        let mut frames = self.applied.frames as i128;
        // Each host's sum: a command names a few hosts (one agent's, or
        // a handful), found by a scan; a map takes over past that.
        let mut sums: Vec<(u32, HoldingSum)> = Vec::new();
        let mut place: HashMap<u32, usize> = HashMap::new();
        for (k, host, d, before) in parsed {
            if d == 0 {
                continue;
            }
            self.changes.push((k, host, d));
            let found = if sums.len() <= FEW_HOSTS {
                sums.iter().position(|s| s.0 == host)
            } else {
                place.get(&host).copied()
            };
            let at = match found {
                Some(at) => at,
                None => {
                    sums.push((host, self.holding(host)?));
                    if sums.len() > FEW_HOSTS {
                        if place.is_empty() {
                            place.extend(sums.iter().enumerate().map(|(i, s)| (s.0, i)));
                        } else {
                            place.insert(host, sums.len() - 1);
                        }
                    }
                    sums.len() - 1
                }
            };
            let hash: [u8; 32] = k[1..].try_into().expect("holder key");
            let after = before.checked_add_signed(d).expect("checked above");
            sums[at].1.change(&hash, before, after);
            frames += i128::from(d);
        }
        for (host, sum) in sums {
            self.set_holding(host, sum);
        }
        self.applied.frames = frames.clamp(0, i128::from(u64::MAX)) as u64;
        Ok(Ok(WriteResponse::default()))
    }

    /// The number of host `name` if it is registered.
    fn registered(&self, name: &str) -> Result<Option<u32>, StoreError> {
        let nk = keys::host_name(name);
        let Some(v) = self
            .meta
            .get(&nk[..])
            .cloned()
            .flatten()
            .or(self.store.db.get_cf(self.store.cf(CF_META), nk)?)
        else {
            return Ok(None);
        };
        let n = u32::from_le_bytes(v[..].try_into().map_err(|_| StoreError::Corrupt {
            what: "host name",
            detail: "wrong length".into(),
        })?);
        Ok(Some(n))
    }

    /// Cordons a registered host or lifts its cordon.
    fn set_cordon(
        &mut self,
        c: &pagecast_proto::v1::SetCordon,
    ) -> Result<CommandResult, StoreError> {
        if c.reason.len() > MAX_FIELD {
            return Ok(Err(invalid(format!(
                "a cordon's reason is at most {MAX_FIELD} bytes"
            ))));
        }
        let Some(host) = self.registered(&c.name)? else {
            return Ok(Err(not_found(format!(
                "host {:?} is not in the index (`pagecast hosts` lists the hosts)",
                c.name
            ))));
        };
        let Some(mut h) = self.host_record(host)? else {
            return Ok(Err(not_found(format!(
                "host number {host} is not registered"
            ))));
        };
        h.cordoned = c.cordoned;
        h.cordon_reason = if c.cordoned {
            c.reason.clone()
        } else {
            String::new()
        };
        self.meta_put(&keys::host(host), &h);
        Ok(Ok(WriteResponse {
            host,
            cordoned: h.cordoned,
            cordon_reason: h.cordon_reason,
            ..Default::default()
        }))
    }

    fn register_host(&mut self, name: &str) -> Result<CommandResult, StoreError> {
        if !name_ok(name) {
            return Ok(Err(invalid(format!(
                "host name {name:?}: use 1 to {MAX_NAME} letters, digits, '-', '_' or '.'"
            ))));
        }
        if let Some(host) = self.registered(name)? {
            return Ok(Ok(WriteResponse {
                host,
                ..Default::default()
            }));
        }
        let nk = keys::host_name(name);
        let host = self.applied.next_host.max(1);
        self.applied.next_host = host + 1;
        self.meta
            .insert(nk.to_vec(), Some(host.to_le_bytes().to_vec()));
        let rec = HostInfo {
            index: host,
            name: name.to_owned(),
            ..Default::default()
        };
        self.meta_put(&keys::host(host), &rec);
        Ok(Ok(WriteResponse {
            host,
            ..Default::default()
        }))
    }

    fn holding(&self, host: u32) -> Result<HoldingSum, StoreError> {
        let key = keys::holding(self.shard, host);
        let raw = match self.meta.get(&key[..]) {
            Some(v) => v.clone(),
            None => self.store.db.get_cf(self.store.cf(CF_META), key)?,
        };
        match raw {
            None => Ok(HoldingSum::default()),
            Some(v) => HoldingSum::decode(&v).ok_or_else(|| StoreError::Corrupt {
                what: "holding",
                detail: format!("{} bytes", v.len()),
            }),
        }
    }

    fn set_holding(&mut self, host: u32, sum: HoldingSum) {
        let key = keys::holding(self.shard, host).to_vec();
        let v = (sum != HoldingSum::default()).then(|| sum.encode().to_vec());
        self.meta.insert(key, v);
    }

    /// The number of host `name`, registering it if it is new.
    fn host_number(&mut self, name: &str) -> Result<Result<u32, Refusal>, StoreError> {
        Ok(self.register_host(name)?.map(|w| w.host))
    }

    fn host_report(
        &mut self,
        r: &pagecast_proto::v1::HostReport,
    ) -> Result<CommandResult, StoreError> {
        let host = match self.host_number(&r.name)? {
            Ok(h) => h,
            Err(e) => return Ok(Err(e)),
        };
        if r.vms.len() > MAX_REPORTED_VMS || r.vms.iter().any(|v| !name_ok(v)) {
            return Ok(Err(invalid(format!(
                "host {}: a report lists at most {MAX_REPORTED_VMS} VMs, each a valid name",
                r.name
            ))));
        }
        if [&r.address, &r.rack, &r.cast_addr]
            .iter()
            .any(|s| s.len() > MAX_FIELD)
        {
            return Ok(Err(invalid(format!(
                "host {}: address, rack and cast address are at most {MAX_FIELD} bytes",
                r.name
            ))));
        }
        let Some(mut h) = self.host_record(host)? else {
            return Ok(Err(not_found(format!(
                "host number {host} is not registered"
            ))));
        };
        h.address = r.address.clone();
        h.rack = r.rack.clone();
        h.link_bps = r.link_bps;
        h.capacity_bytes = r.capacity_bytes;
        h.used_bytes = r.used_bytes;
        h.vm_names = r.vms.clone();
        h.cast_addr = r.cast_addr.clone();
        h.hot_pages = r.hot_pages;
        h.reported_ms = r.reported_ms;
        self.meta_put(&keys::host(host), &h);
        Ok(Ok(WriteResponse {
            host,
            cordoned: h.cordoned,
            cordon_reason: h.cordon_reason,
            ..Default::default()
        }))
    }

    fn put_vm(&mut self, vm: &VmRecord) -> Result<CommandResult, StoreError> {
        if !name_ok(&vm.name) {
            return Ok(Err(invalid(format!(
                "VM name {:?}: use 1 to {MAX_NAME} letters, digits, '-', '_' or '.'",
                vm.name
            ))));
        }
        if let Err(e) = pagecast_pages::domain::check_domain(&vm.domain) {
            return Ok(Err(invalid(format!("VM {}: {e}", vm.name))));
        }
        if Sketch::from_bytes(&vm.sketch).is_err() || vm.digest.len() != 32 {
            return Ok(Err(invalid(format!(
                "VM {}: a record needs a sketch that decodes and a 32-byte digest",
                vm.name
            ))));
        }
        if self.host_record(vm.host)?.is_none() {
            return Ok(Err(not_found(format!(
                "host number {} is not registered",
                vm.host
            ))));
        }
        let key = keys::vm(&vm.name);
        if let Some(old) = self.meta_get::<VmRecord>(&key, "vm")? {
            if old.state != VmState::Running as i32 {
                return Ok(Err(refused(format!(
                    "VM {} is in the index as a loaded image; unload it first",
                    vm.name
                ))));
            }
            // A running VM's record changes hosts only by a move from the
            // host that holds it: another host cannot take it over.
            if old.host != vm.host {
                return Ok(Err(refused(format!(
                    "VM {} is in the index on host number {}: only that host moves or drops its record",
                    vm.name, old.host
                ))));
            }
        }
        let mut rec = vm.clone();
        rec.state = VmState::Running as i32;
        self.meta_put(&key, &rec);
        Ok(Ok(WriteResponse {
            host: vm.host,
            ..Default::default()
        }))
    }

    fn drop_vm(&mut self, name: &str, host: u32) -> Result<CommandResult, StoreError> {
        let key = keys::vm(name);
        match self.meta_get::<VmRecord>(&key, "vm")? {
            Some(rec) if rec.host == host && rec.state == VmState::Running as i32 => {
                self.meta.insert(key.to_vec(), None);
                Ok(Ok(WriteResponse {
                    host,
                    ..Default::default()
                }))
            }
            // Gone already, or another host's now: nothing to do.
            _ => Ok(Ok(WriteResponse {
                host,
                duplicate: true,
                ..Default::default()
            })),
        }
    }

    fn move_vm(&mut self, name: &str, from: u32, to: &str) -> Result<CommandResult, StoreError> {
        let to = match self.host_number(to)? {
            Ok(h) => h,
            Err(e) => return Ok(Err(e)),
        };
        let key = keys::vm(name);
        match self.meta_get::<VmRecord>(&key, "vm")? {
            Some(mut rec) if rec.host == from && rec.state == VmState::Running as i32 => {
                rec.host = to;
                self.meta_put(&key, &rec);
                Ok(Ok(WriteResponse {
                    host: to,
                    ..Default::default()
                }))
            }
            _ => Ok(Ok(WriteResponse {
                host: to,
                duplicate: true,
                ..Default::default()
            })),
        }
    }

    fn host_record(&self, host: u32) -> Result<Option<HostInfo>, StoreError> {
        self.meta_get(&keys::host(host), "host")
    }

    fn begin_vm(&mut self, index: u64, vm: &VmRecord) -> Result<CommandResult, StoreError> {
        if !name_ok(&vm.name) {
            return Ok(Err(invalid(format!(
                "VM name {:?}: use 1 to {MAX_NAME} letters, digits, '-', '_' or '.'",
                vm.name
            ))));
        }
        if let Err(e) = pagecast_pages::domain::check_domain(&vm.domain) {
            return Ok(Err(invalid(format!("VM {}: {e}", vm.name))));
        }
        if Sketch::from_bytes(&vm.sketch).is_err() {
            return Ok(Err(invalid(format!(
                "VM {}: the sketch does not decode",
                vm.name
            ))));
        }
        if vm.digest.len() != 32 {
            return Ok(Err(invalid(format!(
                "VM {}: the digest is 32 bytes",
                vm.name
            ))));
        }
        if self.host_record(vm.host)?.is_none() {
            return Ok(Err(not_found(format!(
                "host number {} is not registered",
                vm.host
            ))));
        }
        let key = keys::vm(&vm.name);
        if let Some(old) = self.meta_get::<VmRecord>(&key, "vm")? {
            if old.state == VmState::Loading as i32
                && old.host == vm.host
                && old.digest == vm.digest
            {
                return Ok(Ok(WriteResponse {
                    host: vm.host,
                    generation: old.generation,
                    duplicate: true,
                    ..Default::default()
                }));
            }
            let on = self
                .host_record(old.host)?
                .map_or_else(|| old.host.to_string(), |h| h.name);
            let state = VmState::try_from(old.state).map_or("unknown", |s| s.as_str_name());
            return Ok(Err(refused(format!(
                "VM {} is already in the index on host {on} ({}){}",
                vm.name,
                state.trim_start_matches("VM_STATE_").to_lowercase(),
                if old.host == vm.host && old.state == VmState::Loading as i32 {
                    " with other content; unload it first"
                } else {
                    "; unload it first"
                }
            ))));
        }
        let mut rec = vm.clone();
        rec.generation = index;
        rec.state = VmState::Loading as i32;
        self.meta_put(&key, &rec);
        Ok(Ok(WriteResponse {
            host: vm.host,
            generation: index,
            ..Default::default()
        }))
    }

    fn set_vm_state(
        &mut self,
        name: &str,
        host: u32,
        state: i32,
    ) -> Result<CommandResult, StoreError> {
        let key = keys::vm(name);
        let Some(mut rec) = self.meta_get::<VmRecord>(&key, "vm")? else {
            return Ok(Err(not_found(format!("VM {name} is not in the index"))));
        };
        if rec.host != host {
            return Ok(Err(refused(format!("VM {name} is on another host"))));
        }
        let ok = matches!(
            (VmState::try_from(rec.state), VmState::try_from(state)),
            (Ok(VmState::Loading), Ok(VmState::Loaded))
                | (Ok(VmState::Loaded), Ok(VmState::Unloading))
        );
        let done = WriteResponse {
            host,
            generation: rec.generation,
            ..Default::default()
        };
        if rec.state == state {
            return Ok(Ok(WriteResponse {
                duplicate: true,
                ..done
            }));
        }
        if !ok {
            return Ok(Err(refused(format!(
                "VM {name}: cannot go from state {} to {}",
                rec.state, state
            ))));
        }
        let Some(mut h) = self.host_record(host)? else {
            return Ok(Err(not_found(format!(
                "host number {host} is not registered"
            ))));
        };
        if state == VmState::Loaded as i32 {
            h.vms += 1;
            h.frames += rec.nonzero_frames;
        } else {
            h.vms = h.vms.saturating_sub(1);
            h.frames = h.frames.saturating_sub(rec.nonzero_frames);
        }
        rec.state = state;
        self.meta_put(&key, &rec);
        self.meta_put(&keys::host(host), &h);
        Ok(Ok(done))
    }

    fn remove_vm(&mut self, name: &str, host: u32) -> Result<CommandResult, StoreError> {
        let key = keys::vm(name);
        let Some(rec) = self.meta_get::<VmRecord>(&key, "vm")? else {
            return Ok(Ok(WriteResponse {
                duplicate: true,
                ..Default::default()
            }));
        };
        if rec.host != host {
            return Ok(Err(refused(format!("VM {name} is on another host"))));
        }
        if rec.state != VmState::Unloading as i32 {
            return Ok(Err(refused(format!(
                "VM {name} is not being unloaded; its holders must be removed first"
            ))));
        }
        self.meta.insert(key.to_vec(), None);
        Ok(Ok(WriteResponse {
            host,
            generation: rec.generation,
            ..Default::default()
        }))
    }
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Deltas(_) => "deltas",
        Op::RegisterHost(_) => "register_host",
        Op::BeginVm(_) => "begin_vm",
        Op::SetVmState(_) => "set_vm_state",
        Op::RemoveVm(_) => "remove_vm",
        Op::HostReport(_) => "host_report",
        Op::PutVm(_) => "put_vm",
        Op::DropVm(_) => "drop_vm",
        Op::MoveVm(_) => "move_vm",
        Op::SetCordon(_) => "set_cordon",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagecast_proto::v1::{HolderDelta, HolderDeltas, IndexCommand};

    fn hash(i: u8) -> PageHash {
        let mut b = [i; 32];
        b[0] = 0;
        b[31] |= 1;
        PageHash::from_bytes(b)
    }

    /// A deltas command as a replica decodes it from its entry.
    fn deltas(seq: u64, ds: &[(u8, u32, i64, u64)]) -> Command {
        let c = deltas_command(seq, ds);
        Command::decode(&prost::Message::encode_to_vec(&c)).expect("decodes")
    }

    /// A deltas command as a writer builds it.
    fn deltas_command(seq: u64, ds: &[(u8, u32, i64, u64)]) -> IndexCommand {
        IndexCommand {
            client: 7,
            seq,
            op: Some(Op::Deltas(HolderDeltas {
                deltas: ds
                    .iter()
                    .map(|&(h, host, frames, before)| HolderDelta {
                        hash: hash(h).as_bytes().to_vec().into(),
                        host,
                        frames,
                        before,
                    })
                    .collect(),
            })),
        }
    }

    fn open(dir: &Path) -> Store {
        Store::open(dir, 1, 1, false).unwrap()
    }

    #[test]
    fn deltas_are_applied_without_reading_the_holder_list() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        // A holder list that does not decode: a read-modify-write would
        // fail on it; a blind write is taken, and the read reports it.
        s.db()
            .put_cf(s.cf(CF_HOLDERS), keys::holders(&hash(1)), [1u8, 0])
            .unwrap();
        let r = s
            .apply(0, &[(1, Some(deltas(1, &[(1, 3, 1, 0)])))], 1)
            .unwrap();
        assert!(r[0].is_ok(), "{r:?}");
        let e = s.holders(&[hash(1)]).unwrap_err();
        assert!(e.to_string().contains("storage"), "{e}");
    }

    #[test]
    fn a_contents_changes_in_one_apply_keep_their_order() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        // Host 3 adds and drops a frame of each of 64 contents four times
        // over, interleaved with the others, and adds one more to the odd
        // ones. A drop folded before its add would clamp at zero and leave
        // a frame behind.
        let mut ds = Vec::new();
        for _ in 0..4 {
            for h in 1..=64u8 {
                ds.push((h, 3, 1, 0));
            }
            for h in 1..=64u8 {
                ds.push((h, 3, -1, 1));
            }
        }
        for h in (1..=64u8).filter(|h| h % 2 == 1) {
            ds.push((h, 3, 1, 0));
        }
        let half = ds.len() / 2;
        let entries = [
            (1, Some(deltas(1, &ds[..half]))),
            (2, Some(deltas(2, &ds[half..]))),
        ];
        let r = s.apply(0, &entries, 1).unwrap();
        assert!(r.iter().all(Result::is_ok), "{r:?}");
        let hashes: Vec<PageHash> = (1..=64u8).map(hash).collect();
        for (i, l) in s.holders(&hashes).unwrap().iter().enumerate() {
            let want: &[(u32, u64)] = if i % 2 == 0 { &[(3, 1)] } else { &[] };
            assert_eq!(l.entries(), want, "content {}", i + 1);
        }
        assert_eq!(s.applied(0).unwrap().frames, 32);
    }

    /// A deltas command the fast path leaves to prost (here: handed over
    /// as prost decoded it) is applied as the fast path's own, and one
    /// with a hash of another length is refused by name.
    #[test]
    fn deltas_from_either_decoder_apply_alike() {
        let ds = [(1, 3, 2, 0), (2, 3, 1, 0), (1, 4, 1, 0), (2, 3, -1, 1)];
        let fast = deltas(1, &ds);
        assert!(matches!(fast, Command::Deltas { .. }));
        let c = deltas_command(1, &ds);
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (open(d1.path()), open(d2.path()));
        a.apply(0, &[(1, Some(fast))], 1).unwrap();
        b.apply(0, &[(1, Some(Command::Other(c.clone())))], 1)
            .unwrap();
        let hs = [hash(1), hash(2)];
        let lists = |s: &Store| -> Vec<Vec<(u32, u64)>> {
            s.holders(&hs)
                .unwrap()
                .iter()
                .map(|l| l.entries().to_vec())
                .collect()
        };
        assert_eq!(lists(&a), lists(&b));
        assert_eq!(lists(&a), vec![vec![(3, 2), (4, 1)], vec![]]);
        for host in [3, 4] {
            assert_eq!(a.holdings(0, host).unwrap(), b.holdings(0, host).unwrap());
        }
        let mut odd = c;
        odd.seq = 2;
        if let Some(Op::Deltas(d)) = &mut odd.op {
            d.deltas[1].hash = vec![5u8; 31].into();
        }
        let decoded = Command::decode(&prost::Message::encode_to_vec(&odd)).unwrap();
        let r = b.apply(0, &[(2, Some(decoded))], 1).unwrap();
        let e = r[0].as_ref().unwrap_err();
        assert!(
            e.message.contains("delta 1: a hash is 32 bytes, not 31"),
            "{e:?}"
        );
    }

    /// A command naming many hosts, interleaved (past the few found by a
    /// scan), leaves each host's sum as commands of one host each do.
    #[test]
    fn sums_of_a_command_of_many_hosts_are_those_of_one_host_at_a_time() {
        let hosts = 1..=20u32;
        let ds: Vec<(u8, u32, i64, u64)> = (1..=5u8)
            .flat_map(|h| hosts.clone().map(move |host| (h, host, i64::from(host), 0)))
            .collect();
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (one, many) = (open(d1.path()), open(d2.path()));
        many.apply(0, &[(1, Some(deltas(1, &ds)))], 1).unwrap();
        let each: Vec<(u64, Option<Command>)> = hosts
            .clone()
            .map(|host| {
                let mine: Vec<_> = ds.iter().copied().filter(|d| d.1 == host).collect();
                (u64::from(host), Some(deltas(u64::from(host), &mine)))
            })
            .collect();
        one.apply(0, &each, 1).unwrap();
        for host in hosts {
            let got = many.holdings(0, host).unwrap();
            assert_eq!(got, one.holdings(0, host).unwrap(), "host {host}");
            assert_eq!(got.len(), 1, "host {host}: {got:?}");
        }
    }

    #[test]
    fn holders_sums_and_snapshots_follow_the_deltas() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        let cmds = [
            deltas(1, &[(1, 3, 2, 0), (2, 3, 1, 0), (1, 4, 1, 0)]),
            deltas(2, &[(1, 3, -2, 2), (2, 5, 4, 0), (3, 3, 1, 0)]),
            // Duplicate of seq 2: changes nothing.
            deltas(2, &[(1, 3, -2, 2), (2, 5, 4, 0), (3, 3, 1, 0)]),
        ];
        let entries: Vec<(u64, Option<Command>)> = cmds
            .iter()
            .enumerate()
            .map(|(i, c)| (i as u64 + 1, Some(c.clone())))
            .collect();
        let r = s.apply(0, &entries, 1).unwrap();
        assert!(r[2].as_ref().unwrap().duplicate);
        let got = s.holders(&[hash(1), hash(2), hash(3), hash(4)]).unwrap();
        assert_eq!(got[0].entries(), &[(4, 1)]);
        assert_eq!(got[1].entries(), &[(3, 1), (5, 4)]);
        assert_eq!(got[2].entries(), &[(3, 1)]);
        assert!(got[3].is_empty());
        assert_eq!(s.count_distinct(0).unwrap(), 3);
        assert_eq!(s.applied(0).unwrap().frames, 7);
        // Host 3 holds hash 2 and hash 3, one frame each.
        let mut want = HoldingSum::default();
        want.change(hash(2).as_bytes(), 0, 1);
        want.change(hash(3).as_bytes(), 0, 1);
        let sums = s.holdings(0, 3).unwrap();
        assert_eq!(sums, vec![(3, want)]);

        // Hash 2 loses every holder: an empty list, no record anywhere.
        let r = s
            .apply(
                0,
                &[(4, Some(deltas(3, &[(2, 3, -1, 1), (2, 5, -4, 4)])))],
                1,
            )
            .unwrap();
        assert!(r[0].is_ok());
        assert!(s.holders(&[hash(2)]).unwrap()[0].is_empty());
        assert_eq!(s.count_distinct(0).unwrap(), 2);
        let page = s.list_holdings(0, 3, None, 10, 100).unwrap();
        assert_eq!(page, (vec![(hash(3), 1)], None));
        // A snapshot, in parts of about 64 bytes, from a checkpoint.
        let c = s.checkpoint(0, 0).unwrap().unwrap();
        assert_eq!(c.index, 4);
        let mut holder_records = 0;
        let mut parts = 0;
        let mut after = Vec::new();
        loop {
            let (records, next) = s.snapshot_part(0, 4, &after, 64).unwrap().unwrap();
            parts += 1;
            holder_records += snapshot::records(0, 1, &records)
                .filter(|r| r.as_ref().unwrap().column == snapshot::Column::Holders)
                .count();
            match next {
                Some(n) => after = n,
                None => break,
            }
        }
        assert_eq!(holder_records, 2, "the emptied list is not carried");
        assert!(parts > 2, "{parts} parts");
        assert!(s.snapshot_part(0, 3, &[], 64).unwrap().is_none());
        s.compact_all().unwrap();
        let live = s
            .db()
            .iterator_cf(s.cf(CF_HOLDERS), IteratorMode::Start)
            .count();
        assert_eq!(live, 2, "compaction drops the emptied list");
        // Later writes do not change the checkpoint's snapshot.
        let sums_at_4 = s.holdings(0, 0).unwrap();
        let r = s
            .apply(0, &[(5, Some(deltas(4, &[(9, 3, 1, 0)])))], 1)
            .unwrap();
        assert!(r[0].is_ok());

        // A replica staging the snapshot and ingesting it reads the same.
        let d2 = tempfile::tempdir().unwrap();
        let t = open(d2.path());
        let desc = crate::snapshot_in::Descriptor {
            shard: 0,
            index: 4,
            term: 1,
        };
        // One holder list a table file: the files are ingested together.
        let n = crate::snapshot_in::stage_in_files(&t, desc, 1, |after| {
            s.snapshot_part(0, 4, after, 64).map_err(|e| e.to_string())
        })
        .unwrap();
        let files = std::fs::read_dir(t.staging_dir(0, 4)).unwrap().count();
        assert_eq!(files, 2 + 1 + 1, "two holder files, meta, done");
        assert!(n >= 2 + 3, "{n} records");
        let mut wb = WriteBatch::default();
        t.clear_state(0, &mut wb);
        t.db().write(wb).unwrap();
        t.ingest_staged(&t.staging_dir(0, 4)).unwrap();
        assert_eq!(t.applied(0).unwrap().index, 4);
        assert!(t.holders(&[hash(9)]).unwrap()[0].is_empty());
        assert_eq!(
            t.holders(&[hash(1), hash(2), hash(3)]).unwrap(),
            s.holders(&[hash(1), hash(2), hash(3)]).unwrap()
        );
        assert_eq!(t.holdings(0, 0).unwrap(), sums_at_4);
    }

    #[test]
    fn a_delta_below_the_writers_own_account_is_refused_whole() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        let r = s
            .apply(
                0,
                &[(1, Some(deltas(1, &[(1, 3, 1, 0), (2, 3, -2, 1)])))],
                1,
            )
            .unwrap();
        let e = r[0].as_ref().unwrap_err();
        assert!(e.message.contains("says it holds 1 frames"), "{e:?}");
        assert!(s.holders(&[hash(1)]).unwrap()[0].is_empty());
        assert!(s.holdings(0, 0).unwrap().is_empty());
        // A writer whose account is wrong cannot take a count below zero:
        // the list stops at zero, and its frames and digest differ from
        // the list's, which the writer's check then finds.
        let r = s
            .apply(0, &[(2, Some(deltas(2, &[(1, 3, -2, 2)])))], 1)
            .unwrap();
        assert!(r[0].is_ok());
        assert!(s.holders(&[hash(1)]).unwrap()[0].is_empty());
        assert_eq!(s.count_distinct(0).unwrap(), 0);
        assert!(
            !s.holdings(0, 3).unwrap()[0]
                .1
                .same_holdings(&HoldingSum::default())
        );
    }
}
