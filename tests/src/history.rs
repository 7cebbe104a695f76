//! A recorded history of concurrent operations on the index, and a checker
//! of it.
//!
//! Every key the tests use is a register that one writer moves through
//! strictly increasing values: a content's frames held by one host (a
//! fresh content per write, so its only value is 1 and a write applied
//! twice shows as 2), or a VM record's version (kept in its `frames`
//! field). Each operation is recorded with the real time it was invoked
//! and completed:
//! - a write of value `v`: acknowledged (`Ok`), refused (`Failed`: known
//!   not applied), or `Unknown` (the client gave up: applied or not);
//! - a read that returned value `x` (0: absent).
//!
//! [`check`] verifies, for each key, given its value read after the run:
//! - exactly once: the final value is the last acknowledged write's, or a
//!   later write's whose outcome is unknown; never a value no write had
//!   (a write applied twice), never less (an acknowledged write lost);
//! - no stale read: a read returns at least the value of every write
//!   acknowledged before the read was invoked;
//! - no read from the future: a read returns only a value whose write was
//!   invoked before the read completed;
//! - no read going back: a read returns at least what any read that
//!   completed before it was invoked returned.
//!
//! For registers a single writer only moves forward, these are what
//! linearizability asks of reads and writes.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How a write ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged: applied.
    Ok,
    /// Refused: not applied.
    Failed,
    /// No answer in time: applied or not.
    Unknown,
}

/// What an operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Wrote `value`, with this outcome.
    Write {
        /// The value written.
        value: u64,
        /// How it ended.
        outcome: Outcome,
    },
    /// Read `value` (0: absent).
    Read {
        /// The value read.
        value: u64,
    },
}

/// One operation: on `key`, by client `process`, invoked and completed at
/// these times since the history began.
#[derive(Clone, Debug)]
pub struct Op {
    /// The client that made it (for messages).
    pub process: usize,
    /// The register it was on.
    pub key: String,
    /// What it did.
    pub kind: Kind,
    /// When it was invoked, since the history began.
    pub invoked: Duration,
    /// When it completed.
    pub completed: Duration,
}

/// Operations recorded by concurrent clients.
pub struct History {
    start: Instant,
    ops: Mutex<Vec<Op>>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    /// An empty history starting now.
    pub fn new() -> Self {
        History {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
        }
    }

    /// Records an operation invoked at `invoked` that completes now.
    pub fn record(&self, process: usize, key: &str, kind: Kind, invoked: Instant) {
        let op = Op {
            process,
            key: key.to_owned(),
            kind,
            invoked: invoked.saturating_duration_since(self.start),
            completed: self.start.elapsed(),
        };
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    /// Every operation recorded so far.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What [`check`] looked at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Registers.
    pub keys: usize,
    /// Writes acknowledged.
    pub acknowledged: usize,
    /// Writes whose outcome is unknown.
    pub unknown: usize,
    /// Writes refused.
    pub failed: usize,
    /// Reads.
    pub reads: usize,
    /// Everything found wrong, one line each.
    pub violations: Vec<String>,
}

/// Checks `ops` against `finals` (each key's value read after the run; a
/// key missing there reads 0).
pub fn check(ops: &[Op], finals: &BTreeMap<String, u64>) -> Checked {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(&op.key).or_default().push(op);
    }
    let mut c = Checked {
        keys: by_key.len(),
        ..Checked::default()
    };
    for (key, ops) in by_key {
        let fin = finals.get(key).copied().unwrap_or(0);
        check_key(key, &ops, fin, &mut c);
    }
    c
}

/// One key's writes, by value.
struct Writes<'a> {
    all: BTreeMap<u64, &'a Op>,
    /// Acknowledged ones, by completion: (completed, value).
    acked: Vec<(Duration, u64)>,
}

impl<'a> Writes<'a> {
    fn of(key: &str, ops: &[&'a Op], c: &mut Checked) -> Self {
        let mut all = BTreeMap::new();
        let mut acked = Vec::new();
        for op in ops {
            if let Kind::Write { value, outcome } = op.kind {
                if all.insert(value, *op).is_some() {
                    c.violations.push(format!(
                        "{key}: value {value} written twice (a bad history)"
                    ));
                }
                match outcome {
                    Outcome::Ok => {
                        c.acknowledged += 1;
                        acked.push((op.completed, value));
                    }
                    Outcome::Unknown => c.unknown += 1,
                    Outcome::Failed => c.failed += 1,
                }
            }
        }
        acked.sort_unstable();
        Writes { all, acked }
    }

    /// Whether `v` is a value this key may hold: 0, or one a write that was
    /// not refused wrote.
    fn possible(&self, v: u64) -> bool {
        v == 0
            || self.all.get(&v).is_some_and(|w| {
                !matches!(
                    w.kind,
                    Kind::Write {
                        outcome: Outcome::Failed,
                        ..
                    }
                )
            })
    }

    /// The largest value acknowledged before `t` (0 if none).
    fn acked_before(&self, t: Duration) -> u64 {
        let n = self.acked.partition_point(|(done, _)| *done < t);
        self.acked[..n].iter().map(|(_, v)| *v).max().unwrap_or(0)
    }
}

fn check_key(key: &str, ops: &[&Op], fin: u64, c: &mut Checked) {
    let w = Writes::of(key, ops, c);
    let last_acked = w.acked.iter().map(|(_, v)| *v).max().unwrap_or(0);
    if !w.possible(fin) {
        c.violations.push(format!(
            "{key}: ends at {fin}, a value no write that may have been applied wrote \
             (applied twice, or a refused write applied)"
        ));
    } else if fin < last_acked {
        c.violations.push(format!(
            "{key}: ends at {fin}, below the acknowledged {last_acked} (an acknowledged write lost)"
        ));
    }
    let mut reads: Vec<(&Op, u64)> = ops
        .iter()
        .filter_map(|op| match op.kind {
            Kind::Read { value } => Some((*op, value)),
            _ => None,
        })
        .collect();
    c.reads += reads.len();
    for (r, x) in &reads {
        let floor = w.acked_before(r.invoked);
        if !w.possible(*x) {
            c.violations.push(format!(
                "{key}: read {x} at {:?}, a value no write that may have been applied wrote",
                r.invoked
            ));
        } else if *x < floor {
            c.violations.push(format!(
                "{key}: stale read of {x} invoked at {:?} by client {}, after {floor} was \
                 acknowledged",
                r.invoked, r.process
            ));
        } else if *x > 0 && w.all[x].invoked > r.completed {
            c.violations.push(format!(
                "{key}: read {x} completed at {:?}, before its write was invoked at {:?}",
                r.completed, w.all[x].invoked
            ));
        }
    }
    // No read going back: by completion, the largest value read so far.
    reads.sort_by_key(|(r, _)| r.completed);
    let mut seen: Vec<(Duration, u64)> = Vec::with_capacity(reads.len());
    let mut top = 0;
    for (r, x) in &reads {
        top = top.max(*x);
        seen.push((r.completed, top));
    }
    for (r, x) in &reads {
        let n = seen.partition_point(|(done, _)| *done < r.invoked);
        if let Some(&(_, before)) = n.checked_sub(1).and_then(|i| seen.get(i))
            && *x < before
        {
            c.violations.push(format!(
                "{key}: read {x} invoked at {:?} by client {}, after a read that had \
                 completed returned {before}",
                r.invoked, r.process
            ));
        }
    }
}
