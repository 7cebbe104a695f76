//! Which replicas vote in which shard: where a new cluster puts each
//! shard's voters, and the moves (`index rebalance`) that bring a running
//! cluster to an even spread over the replicas allowed.
//!
//! Pure: no I/O, the same answer on every replica and every operator's
//! machine.

use std::collections::{BTreeMap, BTreeSet};

/// The shard every replica votes in: it holds the host and VM records,
/// which each replica reads to judge a host's writes to any shard.
pub const EVERYWHERE: u32 = 0;

/// How many of `allowed` replicas vote in `shard` when each shard has
/// `per_shard` (0: all).
fn wanted(shard: u32, allowed: usize, per_shard: usize) -> usize {
    if per_shard == 0 || shard == EVERYWHERE {
        allowed
    } else {
        per_shard.min(allowed)
    }
}

/// The voters of shard `shard` in a new cluster of `members` (any order):
/// `per_shard` consecutive members in id order, starting `shard *
/// per_shard` along, so shards spread evenly; every member for shard
/// [`EVERYWHERE`], or when `per_shard` is 0 or at least the members'
/// count.
pub fn initial_voters(members: &[u64], shard: u32, per_shard: usize) -> Vec<u64> {
    let mut ids: Vec<u64> = members.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let n = ids.len();
    if wanted(shard, n, per_shard) >= n {
        return ids;
    }
    let start = shard as usize * per_shard;
    let mut v: Vec<u64> = (0..per_shard).map(|j| ids[(start + j) % n]).collect();
    v.sort_unstable();
    v
}

/// One step of a rebalance in one shard: add a voter (if any), let it
/// catch up, then remove the one it replaces (if any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// The shard.
    pub shard: u32,
    /// The replica to add.
    pub add: Option<u64>,
    /// The replica it replaces.
    pub remove: Option<u64>,
}

/// The moves that give every shard `per_shard` voters among `allowed`
/// (fewer if fewer are allowed), spread so that no two allowed replicas'
/// shard counts differ by more than one, moving as few voters as that
/// takes. `current[s]` lists shard `s`'s voters now. Voters outside
/// `allowed` (a replica being retired) are replaced first.
pub fn rebalance(allowed: &[u64], current: &[Vec<u64>], per_shard: usize) -> Vec<Move> {
    let allowed: BTreeSet<u64> = allowed.iter().copied().collect();
    let mut voters: Vec<BTreeSet<u64>> = current
        .iter()
        .map(|v| v.iter().copied().collect())
        .collect();
    let mut load: BTreeMap<u64, usize> = allowed.iter().map(|m| (*m, 0)).collect();
    for v in &voters {
        for m in v {
            if let Some(l) = load.get_mut(m) {
                *l += 1;
            }
        }
    }
    let mut moves = Vec::new();
    // The least loaded allowed replica not voting in `v`.
    let pick = |load: &BTreeMap<u64, usize>, v: &BTreeSet<u64>| {
        load.iter()
            .filter(|(m, _)| !v.contains(m))
            .min_by_key(|(m, l)| (**l, **m))
            .map(|(m, _)| *m)
    };
    for (s, v) in voters.iter_mut().enumerate() {
        let want = wanted(s as u32, allowed.len(), per_shard);
        // Replace voters that are not allowed, then fill up to `want`.
        let outside: Vec<u64> = v.iter().filter(|m| !allowed.contains(m)).copied().collect();
        for old in outside {
            let kept = v.len() - 1;
            let Some(new) = (kept < want).then(|| pick(&load, v)).flatten() else {
                moves.push(Move {
                    shard: s as u32,
                    add: None,
                    remove: Some(old),
                });
                v.remove(&old);
                continue;
            };
            moves.push(Move {
                shard: s as u32,
                add: Some(new),
                remove: Some(old),
            });
            v.remove(&old);
            v.insert(new);
            *load.get_mut(&new).expect("allowed") += 1;
        }
        while v.len() < want {
            let Some(new) = pick(&load, v) else { break };
            moves.push(Move {
                shard: s as u32,
                add: Some(new),
                remove: None,
            });
            v.insert(new);
            *load.get_mut(&new).expect("allowed") += 1;
        }
    }
    // Even out: move a shard from the most loaded replica to the least
    // loaded one that does not vote there, while they differ by two.
    while let Some((hi, lo)) = uneven(&load) {
        let Some(s) = voters
            .iter()
            .position(|v| v.contains(&hi) && !v.contains(&lo))
        else {
            break;
        };
        moves.push(Move {
            shard: s as u32,
            add: Some(lo),
            remove: Some(hi),
        });
        voters[s].remove(&hi);
        voters[s].insert(lo);
        *load.get_mut(&hi).expect("allowed") -= 1;
        *load.get_mut(&lo).expect("allowed") += 1;
    }
    moves
}

/// The most and the least loaded replicas, if their loads differ by two
/// or more.
fn uneven(load: &BTreeMap<u64, usize>) -> Option<(u64, u64)> {
    let (&hi, &hl) = load
        .iter()
        .max_by_key(|(m, l)| (**l, std::cmp::Reverse(**m)))?;
    let (&lo, &ll) = load.iter().min_by_key(|(m, l)| (**l, **m))?;
    (hl > ll + 1).then_some((hi, lo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn apply(current: &[Vec<u64>], moves: &[Move]) -> Vec<BTreeSet<u64>> {
        let mut v: Vec<BTreeSet<u64>> = current
            .iter()
            .map(|v| v.iter().copied().collect())
            .collect();
        for m in moves {
            let s = &mut v[m.shard as usize];
            if let Some(a) = m.add {
                assert!(s.insert(a), "{m:?} adds a voter already there");
            }
            if let Some(r) = m.remove {
                assert!(s.remove(&r), "{m:?} removes a voter not there");
            }
        }
        v
    }

    #[test]
    fn a_new_cluster_spreads_its_shards() {
        let members = [5, 1, 3, 2, 4];
        let mut load = BTreeMap::<u64, usize>::new();
        assert_eq!(initial_voters(&members, 0, 3), vec![1, 2, 3, 4, 5]);
        for s in 1..16 {
            let v = initial_voters(&members, s, 3);
            assert_eq!(v.len(), 3);
            for m in v {
                *load.entry(m).or_default() += 1;
            }
        }
        let (lo, hi) = (load.values().min().unwrap(), load.values().max().unwrap());
        assert!(hi - lo <= 1, "{load:?}");
        assert_eq!(initial_voters(&[1, 2, 3], 7, 3), vec![1, 2, 3]);
        assert_eq!(initial_voters(&[1, 2, 3], 7, 0), vec![1, 2, 3]);
    }

    #[test]
    fn a_retired_replica_is_replaced_and_a_new_one_takes_its_share() {
        let members = [1, 2, 3, 4, 5];
        let current: Vec<Vec<u64>> = (0..16).map(|s| initial_voters(&members, s, 3)).collect();
        // Replica 6 joins, replica 2 retires.
        let moves = rebalance(&[1, 3, 4, 5, 6], &current, 3);
        let after = apply(&current, &moves);
        assert_eq!(after[0], BTreeSet::from([1, 3, 4, 5, 6]));
        assert!(after[1..].iter().all(|v| v.len() == 3 && !v.contains(&2)));
        let six = after.iter().filter(|v| v.contains(&6)).count();
        assert!(six >= 9, "replica 6 votes in {six} of 16 shards");
        // Each move adds before it removes: 2's shards, then evening out.
        let twos = current.iter().filter(|v| v.contains(&2)).count();
        assert!(moves.len() <= twos + 3, "{} moves", moves.len());
        // Already even: nothing to do.
        assert!(
            rebalance(
                &[1, 3, 4, 5, 6],
                &after
                    .iter()
                    .map(|v| v.iter().copied().collect())
                    .collect::<Vec<_>>(),
                3
            )
            .is_empty()
        );
    }

    proptest! {
        #[test]
        fn every_shard_ends_with_its_voters_and_loads_even(
            n in 1usize..8,
            shards in 1u32..40,
            k in 1usize..5,
            retire in proptest::collection::vec(any::<bool>(), 8),
            extra in 0usize..3,
        ) {
            let members: Vec<u64> = (1..=n as u64).collect();
            let current: Vec<Vec<u64>> =
                (0..shards).map(|s| initial_voters(&members, s, k)).collect();
            let mut allowed: Vec<u64> = members
                .iter()
                .copied()
                .filter(|m| !retire[*m as usize - 1])
                .collect();
            allowed.extend((0..extra).map(|i| 100 + i as u64));
            let moves = rebalance(&allowed, &current, k);
            let after = apply(&current, &moves);
            let mut load: BTreeMap<u64, usize> = allowed.iter().map(|m| (*m, 0)).collect();
            for (s, v) in after.iter().enumerate() {
                let want = if s == 0 { allowed.len() } else { k.min(allowed.len()) };
                prop_assert!(v.iter().all(|m| allowed.contains(m)));
                prop_assert_eq!(v.len(), want);
                for m in v {
                    *load.get_mut(m).unwrap() += 1;
                }
            }
            if let (Some(lo), Some(hi)) = (load.values().min(), load.values().max()) {
                prop_assert!(hi - lo <= 1, "{:?}", load);
            }
        }
    }
}
