//! raft-rs [`Storage`] for one shard, kept in the replica's RocksDB.
//!
//! Entries live in the `log` family under `L | shard | index`, each value
//! the entry's term (8 bytes, little-endian) then the entry as raft-rs
//! encodes it, so the terms of the whole live log are read at start-up
//! without decoding entries and kept in memory (8 bytes per entry; the log
//! is compacted every few hundred entries). Hard state, conf state and the
//! compaction point live in the `raft` family.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};

use crate::keys::{self, StateKind};
use crate::snapshot_in::Descriptor;
use crate::store::{CF_LOG, CF_RAFT, Store, StoreError};

#[derive(Default)]
struct LogState {
    hard: HardState,
    conf: ConfState,
    compacted_index: u64,
    compacted_term: u64,
    /// Terms of entries `compacted_index + 1 ..= last_index`.
    terms: VecDeque<u64>,
}

/// The raft log and state of one shard.
pub struct ShardStorage {
    store: Arc<Store>,
    shard: u32,
    st: RefCell<LogState>,
}

fn corrupt(what: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what,
        detail: e.to_string(),
    }
}

fn other(e: StoreError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl ShardStorage {
    /// Opens shard `shard`'s log; a shard never started gets a conf state
    /// with `voters` as its members.
    pub fn open(store: Arc<Store>, shard: u32, voters: &[u64]) -> Result<Self, StoreError> {
        let raft_cf = store.cf(CF_RAFT);
        let db = store.db();
        if db
            .get_cf(raft_cf, keys::raft_state(shard, StateKind::Restoring))?
            .is_some()
        {
            forget_half_installed(&store, shard)?;
        }
        let mut st = LogState::default();
        if let Some(v) = db.get_cf(raft_cf, keys::raft_state(shard, StateKind::HardState))? {
            st.hard = HardState::parse_from_bytes(&v).map_err(|e| corrupt("hard state", e))?;
        }
        match db.get_cf(raft_cf, keys::raft_state(shard, StateKind::ConfState))? {
            Some(v) => {
                st.conf = ConfState::parse_from_bytes(&v).map_err(|e| corrupt("conf state", e))?;
            }
            None => {
                st.conf = ConfState::from((voters.to_vec(), vec![]));
                let mut w = rocksdb::WriteOptions::default();
                w.set_sync(true);
                db.put_cf_opt(
                    raft_cf,
                    keys::raft_state(shard, StateKind::ConfState),
                    st.conf.write_to_bytes().expect("encodes"),
                    &w,
                )?;
            }
        }
        if let Some(v) = db.get_cf(raft_cf, keys::raft_state(shard, StateKind::Compacted))? {
            if v.len() != 16 {
                return Err(corrupt("compaction point", "wrong length"));
            }
            st.compacted_index = u64::from_le_bytes(v[..8].try_into().expect("8"));
            st.compacted_term = u64::from_le_bytes(v[8..].try_into().expect("8"));
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(keys::log(shard + 1, 0).to_vec());
        let from = keys::log(shard, st.compacted_index + 1);
        let entries = db.iterator_cf_opt(
            store.cf(CF_LOG),
            ro,
            IteratorMode::From(&from, Direction::Forward),
        );
        for (expect, kv) in (st.compacted_index + 1..).zip(entries) {
            let (k, v) = kv?;
            let (_, index) = keys::parse_log(&k).ok_or_else(|| corrupt("log key", "bad key"))?;
            if index != expect || v.len() < 8 {
                return Err(corrupt(
                    "log",
                    format!("entry {index} where {expect} was expected"),
                ));
            }
            st.terms
                .push_back(u64::from_le_bytes(v[..8].try_into().expect("8")));
        }
        Ok(ShardStorage {
            store,
            shard,
            st: RefCell::new(st),
        })
    }

    /// The last index in the log (or the compaction point when empty).
    pub fn last(&self) -> u64 {
        let st = self.st.borrow();
        st.compacted_index + st.terms.len() as u64
    }

    /// The first index still in the log.
    pub fn first(&self) -> u64 {
        self.st.borrow().compacted_index + 1
    }

    /// The stored hard state.
    pub fn hard_state(&self) -> HardState {
        self.st.borrow().hard.clone()
    }

    /// Appends `entries` (replacing any conflicting tail) and stores `hs`,
    /// in one synced write.
    pub fn append(&self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        let cf = self.store.cf(CF_LOG);
        let mut st = self.st.borrow_mut();
        if let Some(first) = entries.first() {
            let last = st.compacted_index + st.terms.len() as u64;
            if first.index <= st.compacted_index {
                return Err(corrupt(
                    "append",
                    format!(
                        "entry {} is at or before the compaction point {}",
                        first.index, st.compacted_index
                    ),
                ));
            }
            if first.index > last + 1 {
                return Err(corrupt(
                    "append",
                    format!("gap: entry {} after {last}", first.index),
                ));
            }
            if first.index <= last {
                wb.delete_range_cf(
                    cf,
                    keys::log(self.shard, first.index),
                    keys::log(self.shard, last + 1),
                );
            }
            for e in entries {
                let mut v = Vec::with_capacity(8 + e.compute_size() as usize);
                v.extend_from_slice(&e.term.to_le_bytes());
                e.write_to_vec(&mut v).expect("encodes");
                wb.put_cf(cf, keys::log(self.shard, e.index), v);
            }
        }
        if let Some(hs) = hs {
            wb.put_cf(
                self.store.cf(CF_RAFT),
                keys::raft_state(self.shard, StateKind::HardState),
                hs.write_to_bytes().expect("encodes"),
            );
        }
        self.store
            .db()
            .write_opt(wb, &self.store.log_write_options())?;
        if let Some(first) = entries.first() {
            let keep = (first.index - st.compacted_index - 1) as usize;
            st.terms.truncate(keep);
            st.terms.extend(entries.iter().map(|e| e.term));
        }
        if let Some(hs) = hs {
            st.hard = hs.clone();
        }
        Ok(())
    }

    /// Records a new commit index (after `advance`).
    pub fn set_commit(&self, commit: u64) -> Result<(), StoreError> {
        let mut st = self.st.borrow_mut();
        st.hard.commit = commit;
        self.store.db().put_cf_opt(
            self.store.cf(CF_RAFT),
            keys::raft_state(self.shard, StateKind::HardState),
            st.hard.write_to_bytes().expect("encodes"),
            &self.store.log_write_options(),
        )?;
        Ok(())
    }

    /// Stores the shard's members after a configuration change.
    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), StoreError> {
        let mut st = self.st.borrow_mut();
        self.store.db().put_cf_opt(
            self.store.cf(CF_RAFT),
            keys::raft_state(self.shard, StateKind::ConfState),
            cs.write_to_bytes().expect("encodes"),
            &self.store.log_write_options(),
        )?;
        st.conf = cs.clone();
        Ok(())
    }

    /// Replaces the shard's state and log by `snap`, whose state was
    /// staged whole beforehand ([`crate::snapshot_in::stage`]): a synced
    /// write marks the shard as restoring and removes its state and log,
    /// the staged table files are ingested, and a second synced write sets
    /// the raft state to the snapshot's and clears the mark. A replica
    /// stopped in between finds the mark at start and begins the shard
    /// empty ([`ShardStorage::open`]), to be sent a snapshot again.
    pub fn apply_snapshot(&self, snap: &Snapshot) -> Result<(), StoreError> {
        let meta = snap.get_metadata();
        let d = Descriptor::decode(&snap.data)
            .filter(|d| d.shard == self.shard && d.index == meta.index && d.term == meta.term)
            .ok_or_else(|| corrupt("snapshot", "its data is not this shard's descriptor"))?;
        if !crate::snapshot_in::staged(&self.store, d) {
            return Err(crate::snapshot_in::not_staged(d));
        }
        let rcf = self.store.cf(CF_RAFT);
        let mut wb = WriteBatch::default();
        wb.put_cf(
            rcf,
            keys::raft_state(self.shard, StateKind::Restoring),
            meta.index.to_le_bytes(),
        );
        self.store.clear_state(self.shard, &mut wb);
        wb.delete_range_cf(
            self.store.cf(CF_LOG),
            keys::log(self.shard, 0),
            keys::log(self.shard + 1, 0),
        );
        self.store
            .db()
            .write_opt(wb, &self.store.log_write_options())?;
        let dir = crate::snapshot_in::dir_of(&self.store, d);
        self.store.ingest_staged(&dir)?;
        let mut st = self.st.borrow_mut();
        let mut hard = st.hard.clone();
        hard.commit = hard.commit.max(meta.index);
        hard.term = hard.term.max(meta.term);
        let mut wb = WriteBatch::default();
        wb.put_cf(
            rcf,
            keys::raft_state(self.shard, StateKind::HardState),
            hard.write_to_bytes().expect("encodes"),
        );
        wb.put_cf(
            rcf,
            keys::raft_state(self.shard, StateKind::ConfState),
            meta.get_conf_state().write_to_bytes().expect("encodes"),
        );
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&meta.index.to_le_bytes());
        c[8..].copy_from_slice(&meta.term.to_le_bytes());
        wb.put_cf(rcf, keys::raft_state(self.shard, StateKind::Compacted), c);
        wb.delete_cf(rcf, keys::raft_state(self.shard, StateKind::Restoring));
        self.store
            .db()
            .write_opt(wb, &self.store.log_write_options())?;
        self.store.clear_staging(self.shard);
        st.hard = hard;
        st.conf = meta.get_conf_state().clone();
        st.compacted_index = meta.index;
        st.compacted_term = meta.term;
        st.terms.clear();
        Ok(())
    }

    /// Drops log entries up to and including `to`, which must be applied.
    pub fn compact(&self, to: u64) -> Result<(), StoreError> {
        let mut st = self.st.borrow_mut();
        let last = st.compacted_index + st.terms.len() as u64;
        if to <= st.compacted_index || to > last {
            return Ok(());
        }
        let term = st.terms[(to - st.compacted_index - 1) as usize];
        let mut wb = WriteBatch::default();
        wb.delete_range_cf(
            self.store.cf(CF_LOG),
            keys::log(self.shard, st.compacted_index + 1),
            keys::log(self.shard, to + 1),
        );
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&to.to_le_bytes());
        c[8..].copy_from_slice(&term.to_le_bytes());
        wb.put_cf(
            self.store.cf(CF_RAFT),
            keys::raft_state(self.shard, StateKind::Compacted),
            c,
        );
        self.store
            .db()
            .write_opt(wb, &self.store.log_write_options())?;
        let n = (to - st.compacted_index) as usize;
        st.terms.drain(..n);
        st.compacted_index = to;
        st.compacted_term = term;
        Ok(())
    }
}

impl raft::Storage for ShardStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let st = self.st.borrow();
        Ok(RaftState::new(st.hard.clone(), st.conf.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let st = self.st.borrow();
        if low <= st.compacted_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        let last = st.compacted_index + st.terms.len() as u64;
        if high > last + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out = Vec::with_capacity((high - low) as usize);
        if low == high {
            return Ok(out);
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(keys::log(self.shard, high).to_vec());
        let mut size = 0u64;
        let from = keys::log(self.shard, low);
        for kv in self.store.db().iterator_cf_opt(
            self.store.cf(CF_LOG),
            ro,
            IteratorMode::From(&from, Direction::Forward),
        ) {
            let (_, v) = kv.map_err(|e| other(e.into()))?;
            let e = Entry::parse_from_bytes(&v[8..]).map_err(|e| other(corrupt("log entry", e)))?;
            size += e.compute_size() as u64;
            if !out.is_empty() && size > max_size {
                break;
            }
            out.push(e);
        }
        if out.is_empty() || out[0].index != low {
            return Err(other(corrupt("log", format!("entry {low} missing"))));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let st = self.st.borrow();
        if idx == st.compacted_index {
            return Ok(st.compacted_term);
        }
        if idx < st.compacted_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match st.terms.get((idx - st.compacted_index - 1) as usize) {
            Some(t) => Ok(*t),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let applied = self.store.applied(self.shard).map_err(other)?;
        if applied.index < request_index || applied.index == 0 {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        // The state itself is streamed from a checkpoint in parts; the
        // snapshot raft sends names it (crate::snapshot_in).
        // A follower continues from the snapshot with the log after it,
        // so a checkpoint older than the log's start is of no use.
        let at_least = request_index.max(self.st.borrow().compacted_index);
        let Some(c) = self.store.checkpoint(self.shard, at_least).map_err(other)? else {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        };
        let d = Descriptor {
            shard: self.shard,
            index: c.index,
            term: c.term,
        };
        let mut snap = Snapshot {
            data: d.encode().into(),
            ..Default::default()
        };
        // The members as of the snapshot's index: the checkpoint's.
        let conf = match c.raft_state(StateKind::ConfState).map_err(other)? {
            Some(v) => {
                ConfState::parse_from_bytes(&v).map_err(|e| other(corrupt("conf state", e)))?
            }
            None => self.st.borrow().conf.clone(),
        };
        let meta = snap.mut_metadata();
        meta.index = c.index;
        meta.term = c.term;
        meta.set_conf_state(conf);
        Ok(snap)
    }
}

/// A shard whose snapshot was being installed when the replica stopped:
/// its state, log and compaction point are removed and its commit index
/// set to zero (its term and vote stay), so that it starts empty and its
/// leader sends it a snapshot again.
fn forget_half_installed(store: &Store, shard: u32) -> Result<(), StoreError> {
    let rcf = store.cf(CF_RAFT);
    let db = store.db();
    let mut wb = WriteBatch::default();
    store.clear_state(shard, &mut wb);
    wb.delete_range_cf(
        store.cf(CF_LOG),
        keys::log(shard, 0),
        keys::log(shard + 1, 0),
    );
    if let Some(v) = db.get_cf(rcf, keys::raft_state(shard, StateKind::HardState))? {
        let mut hard = HardState::parse_from_bytes(&v).map_err(|e| corrupt("hard state", e))?;
        hard.commit = 0;
        wb.put_cf(
            rcf,
            keys::raft_state(shard, StateKind::HardState),
            hard.write_to_bytes().expect("encodes"),
        );
    }
    wb.delete_cf(rcf, keys::raft_state(shard, StateKind::Compacted));
    wb.delete_cf(rcf, keys::raft_state(shard, StateKind::Restoring));
    db.write_opt(wb, &store.log_write_options())?;
    tracing::warn!(
        "shard {shard}: a snapshot was being installed when this replica stopped; \
         the shard starts empty and is sent one again"
    );
    Ok(())
}

/// The raft-rs `Storage` contract, against a real RocksDB in a temporary
/// directory: what raft-rs's own `MemStorage` tests check, and restart.
#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64, size: usize) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; size].into(),
            ..Default::default()
        }
    }

    fn open(dir: &std::path::Path) -> ShardStorage {
        let store = Arc::new(Store::open(dir, 1, 2, false).unwrap());
        ShardStorage::open(store, 1, &[1, 2, 3]).unwrap()
    }

    /// Entries 3..=5 with terms 3, 4, 5 after a compaction at (3, 3).
    fn storage(dir: &std::path::Path) -> ShardStorage {
        let s = open(dir);
        s.append(
            &[
                entry(1, 1, 10),
                entry(2, 2, 10),
                entry(3, 3, 10),
                entry(4, 4, 10),
                entry(5, 5, 10),
            ],
            None,
        )
        .unwrap();
        s.compact(3).unwrap();
        s
    }

    fn is(r: raft::Result<impl std::fmt::Debug>, e: StorageError) -> bool {
        matches!(r, Err(raft::Error::Store(x)) if x == e)
    }

    #[test]
    fn a_new_shard_has_its_voters_and_an_empty_log() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        let st = s.initial_state().unwrap();
        assert!(st.initialized());
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 0));
        assert_eq!(s.term(0).unwrap(), 0);
        assert!(is(s.term(1), StorageError::Unavailable));
        assert!(
            s.entries(1, 1, None, GetEntriesContext::empty(false))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn term_compacted_and_unavailable() {
        let d = tempfile::tempdir().unwrap();
        let s = storage(d.path());
        assert!(is(s.term(2), StorageError::Compacted));
        assert_eq!(s.term(3).unwrap(), 3);
        assert_eq!(s.term(4).unwrap(), 4);
        assert_eq!(s.term(5).unwrap(), 5);
        assert!(is(s.term(6), StorageError::Unavailable));
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (4, 5));
    }

    #[test]
    fn entries_respect_bounds_and_size_limits() {
        let d = tempfile::tempdir().unwrap();
        let s = storage(d.path());
        let ctx = || GetEntriesContext::empty(false);
        assert!(is(s.entries(2, 6, None, ctx()), StorageError::Compacted));
        assert!(is(s.entries(3, 4, None, ctx()), StorageError::Compacted));
        assert!(is(s.entries(4, 7, None, ctx()), StorageError::Unavailable));
        let all = s.entries(4, 6, None, ctx()).unwrap();
        assert_eq!(
            all.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
            vec![(4, 4), (5, 5)]
        );
        let one = all[0].compute_size() as u64;
        // A limit below one entry still returns one.
        assert_eq!(s.entries(4, 6, Some(0), ctx()).unwrap().len(), 1);
        assert_eq!(s.entries(4, 6, Some(one), ctx()).unwrap().len(), 1);
        assert_eq!(s.entries(4, 6, Some(2 * one - 1), ctx()).unwrap().len(), 1);
        assert_eq!(s.entries(4, 6, Some(2 * one), ctx()).unwrap().len(), 2);
        assert_eq!(s.entries(4, 6, None, ctx()).unwrap()[1].data.len(), 10);
    }

    #[test]
    fn append_replaces_a_conflicting_tail_and_refuses_gaps() {
        let d = tempfile::tempdir().unwrap();
        let s = storage(d.path());
        s.append(&[entry(5, 6, 1), entry(6, 6, 1)], None).unwrap();
        assert_eq!(s.term(5).unwrap(), 6);
        assert_eq!(s.last_index().unwrap(), 6);
        s.append(&[entry(5, 7, 1)], None).unwrap();
        assert_eq!(s.last_index().unwrap(), 5);
        assert!(is(s.term(6), StorageError::Unavailable));
        assert!(s.append(&[entry(9, 7, 1)], None).is_err());
        assert!(s.append(&[entry(2, 7, 1)], None).is_err());
        let got = s
            .entries(4, 6, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.iter().map(|e| e.term).collect::<Vec<_>>(), vec![4, 7]);
    }

    #[test]
    fn state_survives_a_restart() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = storage(d.path());
            let hs = HardState {
                term: 5,
                vote: 2,
                commit: 4,
                ..Default::default()
            };
            s.append(&[entry(6, 5, 3)], Some(&hs)).unwrap();
        }
        let s = open(d.path());
        let st = s.initial_state().unwrap();
        assert_eq!(
            (st.hard_state.term, st.hard_state.vote, st.hard_state.commit),
            (5, 2, 4)
        );
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (4, 6));
        assert_eq!(s.term(3).unwrap(), 3);
        assert_eq!(s.term(6).unwrap(), 5);
    }

    #[test]
    fn snapshots_need_applied_state_and_replace_the_log() {
        let d = tempfile::tempdir().unwrap();
        let s = storage(d.path());
        // Nothing applied yet: raft must retry later.
        assert!(is(
            s.snapshot(1, 2),
            StorageError::SnapshotTemporarilyUnavailable
        ));
        let cmd = pagecast_proto::v1::IndexCommand::default();
        s.store
            .apply(1, &[(4, None), (5, Some(cmd.into()))], 5)
            .unwrap();
        let snap = s.snapshot(4, 2).unwrap();
        assert_eq!(
            (snap.get_metadata().index, snap.get_metadata().term),
            (5, 5)
        );
        assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2, 3]);
        assert!(is(
            s.snapshot(6, 2),
            StorageError::SnapshotTemporarilyUnavailable
        ));

        let d2 = tempfile::tempdir().unwrap();
        let t = open(d2.path());
        t.append(&[entry(1, 1, 1), entry(2, 1, 1)], None).unwrap();
        // Not staged: refused, nothing changed.
        assert!(t.apply_snapshot(&snap).is_err());
        assert_eq!(t.last_index().unwrap(), 2);
        let desc = Descriptor::decode(&snap.data).unwrap();
        crate::snapshot_in::stage(&t.store, desc, |after| {
            s.store
                .snapshot_part(1, 5, after, 64)
                .map_err(|e| e.to_string())
        })
        .unwrap();
        t.apply_snapshot(&snap).unwrap();
        assert_eq!((t.first_index().unwrap(), t.last_index().unwrap()), (6, 5));
        assert_eq!(t.term(5).unwrap(), 5);
        assert!(is(t.term(4), StorageError::Compacted));
        assert_eq!(t.store.applied(1).unwrap().index, 5);
        assert_eq!(t.initial_state().unwrap().hard_state.commit, 5);
        assert!(!t.store.staging_dir(1, 5).exists(), "staging is cleared");
    }

    #[test]
    fn a_snapshot_half_installed_leaves_the_shard_empty_at_restart() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = storage(d.path());
            let hs = HardState {
                term: 5,
                vote: 2,
                commit: 5,
                ..Default::default()
            };
            s.append(&[], Some(&hs)).unwrap();
            s.store
                .db()
                .put_cf(
                    s.store.cf(CF_RAFT),
                    keys::raft_state(1, StateKind::Restoring),
                    9u64.to_le_bytes(),
                )
                .unwrap();
        }
        let s = open(d.path());
        let st = s.initial_state().unwrap();
        assert_eq!(
            (st.hard_state.term, st.hard_state.vote, st.hard_state.commit),
            (5, 2, 0)
        );
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 0));
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
    }
}
