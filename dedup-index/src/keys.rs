//! Every key the index writes to RocksDB, in one place.
//!
//! Keys are fixed-size and big-endian so that RocksDB's bytewise order is
//! the numeric order, and each begins with a prefix byte naming its
//! namespace, so a namespace (or one shard's part of one) is a contiguous
//! key range. The column family a key lives in is given beside each
//! namespace; the prefix is kept even where the family alone would tell,
//! so a key read out of context still says what it is.
//!
//! | prefix | family   | key after the prefix              | value                         |
//! |--------|----------|-----------------------------------|-------------------------------|
//! | `L`    | `log`    | shard u16, index u64              | raft-rs `Entry`               |
//! | `S`    | `raft`   | shard u16, kind u8                | hard state, conf state, ...   |
//! | `A`    | `meta`   | shard u16                         | applied index, counters       |
//! | `C`    | `meta`   | shard u16, client u64             | last applied sequence number  |
//! | `N`    | `meta`   | BLAKE3(host name)[..16]           | host number u32               |
//! | `O`    | `meta`   | host number u32                   | host record                   |
//! | `V`    | `meta`   | BLAKE3(VM name)[..16]             | VM record                     |
//! | `H`    | `meta`   | shard u16, host number u32        | what the host holds there ([`crate::holders::HoldingSum`]) |
//! | `h`    | `holders`| page hash (32 bytes)              | holder list ([`crate::holders`]) |
//!
//! Shards split the hash space by prefix: shard `s` of `n` owns the hashes
//! whose first two bytes, read as a number `p`, satisfy `p * n >> 16 == s`,
//! so every shard's holders are one contiguous range of `h` keys.

use crate::PageHash;

/// Namespace prefix of raft log entries.
pub const LOG: u8 = b'L';
/// Namespace prefix of raft state records.
pub const RAFT_STATE: u8 = b'S';
/// Namespace prefix of a shard's applied index and counters.
pub const APPLIED: u8 = b'A';
/// Namespace prefix of writer sessions.
pub const SESSION: u8 = b'C';
/// Namespace prefix of host name -> number records.
pub const HOST_NAME: u8 = b'N';
/// Namespace prefix of host records.
pub const HOST: u8 = b'O';
/// Namespace prefix of VM records.
pub const VM: u8 = b'V';
/// Namespace prefix of per-host holding totals.
pub const HOLDING: u8 = b'H';
/// Namespace prefix of holder lists.
pub const HOLDERS: u8 = b'h';

/// Most shards a cluster may have.
pub const MAX_SHARDS: u32 = 256;

/// What a raft state record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum StateKind {
    /// raft-rs `HardState`.
    HardState = 1,
    /// raft-rs `ConfState`.
    ConfState = 2,
    /// The index and term of the last compaction or applied snapshot.
    Compacted = 3,
    /// The shard count and replica id the directory was created with.
    Identity = 4,
    /// Set while a snapshot is being installed (its index): a replica that
    /// finds it at start was stopped half-way and starts the shard empty.
    Restoring = 5,
    /// The replica's members (`ID=HOST:PORT,...`) after configuration
    /// changes (kept under shard 0; it is the replica's, not a shard's).
    Members = 6,
}

/// The shard of `n` that owns `hash`.
pub fn shard_of(hash: &PageHash, n: u32) -> u32 {
    let b = hash.as_bytes();
    let p = u32::from(u16::from_be_bytes([b[0], b[1]]));
    (p * n) >> 16
}

/// The first two-byte hash prefix shard `s` of `n` owns, and one past its
/// last (65,536 for the last shard).
pub fn shard_prefix_range(s: u32, n: u32) -> (u32, u32) {
    // Smallest p with p * n >> 16 >= s is ceil(s * 65536 / n).
    let lo = (s << 16).div_ceil(n);
    let hi = ((s + 1) << 16).div_ceil(n);
    (lo, hi.min(1 << 16))
}

/// Key of raft log entry `index` of `shard`.
pub fn log(shard: u32, index: u64) -> [u8; 11] {
    let mut k = [0u8; 11];
    k[0] = LOG;
    k[1..3].copy_from_slice(&(shard as u16).to_be_bytes());
    k[3..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Decodes a log key into (shard, index).
pub fn parse_log(k: &[u8]) -> Option<(u32, u64)> {
    if k.len() != 11 || k[0] != LOG {
        return None;
    }
    let shard = u16::from_be_bytes([k[1], k[2]]);
    let index = u64::from_be_bytes(k[3..].try_into().ok()?);
    Some((u32::from(shard), index))
}

/// Key of a raft state record of `shard`.
pub fn raft_state(shard: u32, kind: StateKind) -> [u8; 4] {
    let s = (shard as u16).to_be_bytes();
    [RAFT_STATE, s[0], s[1], kind as u8]
}

/// Key of the applied index and counters of `shard`.
pub fn applied(shard: u32) -> [u8; 3] {
    let s = (shard as u16).to_be_bytes();
    [APPLIED, s[0], s[1]]
}

/// Key of writer `client`'s session on `shard`.
pub fn session(shard: u32, client: u64) -> [u8; 11] {
    let mut k = [0u8; 11];
    k[0] = SESSION;
    k[1..3].copy_from_slice(&(shard as u16).to_be_bytes());
    k[3..].copy_from_slice(&client.to_be_bytes());
    k
}

/// The range of session keys of `shard`.
pub fn session_range(shard: u32) -> ([u8; 11], [u8; 11]) {
    (session(shard, 0), session(shard + 1, 0))
}

fn name_key(prefix: u8, name: &str) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = prefix;
    k[1..].copy_from_slice(&blake3::hash(name.as_bytes()).as_bytes()[..16]);
    k
}

/// Key of the number of host `name`.
pub fn host_name(name: &str) -> [u8; 17] {
    name_key(HOST_NAME, name)
}

/// Key of host record `host`.
pub fn host(host: u32) -> [u8; 5] {
    let h = host.to_be_bytes();
    [HOST, h[0], h[1], h[2], h[3]]
}

/// Key of VM record `name`.
pub fn vm(name: &str) -> [u8; 17] {
    name_key(VM, name)
}

/// Key of what host `host` holds in `shard`, summed.
pub fn holding(shard: u32, host: u32) -> [u8; 7] {
    let mut k = [0u8; 7];
    k[0] = HOLDING;
    k[1..3].copy_from_slice(&(shard as u16).to_be_bytes());
    k[3..].copy_from_slice(&host.to_be_bytes());
    k
}

/// The host number a holding key names.
pub fn parse_holding(k: &[u8]) -> Option<(u32, u32)> {
    if k.len() != 7 || k[0] != HOLDING {
        return None;
    }
    let shard = u16::from_be_bytes([k[1], k[2]]);
    let host = u32::from_be_bytes(k[3..].try_into().ok()?);
    Some((u32::from(shard), host))
}

/// Key of the holder list of `hash`.
pub fn holders(hash: &PageHash) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = HOLDERS;
    k[1..].copy_from_slice(hash.as_bytes());
    k
}

/// The hash a holder key names.
pub fn parse_holders(k: &[u8]) -> Option<PageHash> {
    if k.len() != 33 || k[0] != HOLDERS {
        return None;
    }
    Some(PageHash::from_bytes(k[1..].try_into().ok()?))
}

/// The holder keys shard `s` of `n` owns: `[lo, hi)`. `hi` is one byte
/// past the namespace for the last shard.
pub fn holders_range(s: u32, n: u32) -> (Vec<u8>, Vec<u8>) {
    let (lo, hi) = shard_prefix_range(s, n);
    let lo_k = vec![HOLDERS, (lo >> 8) as u8, lo as u8];
    let hi_k = if hi >= 1 << 16 {
        vec![HOLDERS + 1]
    } else {
        vec![HOLDERS, (hi >> 8) as u8, hi as u8]
    };
    (lo_k, hi_k)
}

/// The meta keys that belong to `shard` in a snapshot: its applied record,
/// sessions and holding totals, and for shard 0 the hosts and VMs.
pub fn meta_ranges(shard: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
    let (a, b) = session_range(shard);
    let mut r = vec![
        (applied(shard).to_vec(), applied(shard + 1).to_vec()),
        (a.to_vec(), b.to_vec()),
        (holding(shard, 0).to_vec(), holding(shard + 1, 0).to_vec()),
    ];
    if shard == 0 {
        for p in [HOST_NAME, HOST, VM] {
            r.push((vec![p], vec![p + 1]));
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hash_with_prefix(p: u16, rest: u8) -> PageHash {
        let mut b = [rest; 32];
        b[..2].copy_from_slice(&p.to_be_bytes());
        PageHash::from_bytes(b)
    }

    #[test]
    fn log_keys_sort_by_shard_then_index() {
        let keys = [
            log(0, 1),
            log(0, 2),
            log(0, 255),
            log(0, 256),
            log(0, u64::MAX),
            log(1, 0),
            log(300, 7),
        ];
        for w in keys.windows(2) {
            assert!(w[0] < w[1], "{:?} !< {:?}", w[0], w[1]);
        }
        assert_eq!(parse_log(&log(300, 7)), Some((300, 7)));
        assert_eq!(parse_log(&host(1)), None);
    }

    #[test]
    fn namespaces_do_not_overlap() {
        let prefixes = [
            LOG, RAFT_STATE, APPLIED, SESSION, HOST_NAME, HOST, VM, HOLDERS,
        ];
        let mut sorted = prefixes.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), prefixes.len());
        assert_eq!(session(0, 1)[0], SESSION);
        assert_eq!(vm("a")[0], VM);
        assert_ne!(
            vm("a")[1..],
            host_name("a")[1..]
                .iter()
                .map(|b| b ^ 1)
                .collect::<Vec<_>>()[..]
        );
    }

    #[test]
    fn every_shard_boundary_is_exact() {
        for n in [1u32, 2, 3, 4, 7, 16, 256] {
            let mut expect_lo = 0;
            for s in 0..n {
                let (lo, hi) = shard_prefix_range(s, n);
                assert_eq!(lo, expect_lo, "n={n} s={s}");
                assert!(hi > lo);
                assert_eq!(shard_of(&hash_with_prefix(lo as u16, 0), n), s);
                assert_eq!(shard_of(&hash_with_prefix((hi - 1) as u16, 0xff), n), s);
                expect_lo = hi;
            }
            assert_eq!(expect_lo, 1 << 16);
        }
    }

    proptest! {
        #[test]
        fn holder_key_order_is_hash_order(a in any::<[u8; 32]>(), b in any::<[u8; 32]>()) {
            let (ha, hb) = (PageHash::from_bytes(a), PageHash::from_bytes(b));
            prop_assert_eq!(holders(&ha).cmp(&holders(&hb)), a.cmp(&b));
            prop_assert_eq!(parse_holders(&holders(&ha)), Some(ha));
        }

        #[test]
        fn a_hash_is_inside_its_shards_range(a in any::<[u8; 32]>(), n in 1u32..=MAX_SHARDS) {
            let h = PageHash::from_bytes(a);
            let s = shard_of(&h, n);
            prop_assert!(s < n);
            let (lo, hi) = holders_range(s, n);
            let k = holders(&h);
            prop_assert!(k.as_slice() >= lo.as_slice() && k.as_slice() < hi.as_slice());
        }

        #[test]
        fn session_and_log_keys_are_ordered(s in 0u32..1000, a in any::<u64>(), b in any::<u64>()) {
            prop_assert_eq!(session(s, a).cmp(&session(s, b)), a.cmp(&b));
            prop_assert_eq!(log(s, a).cmp(&log(s, b)), a.cmp(&b));
            prop_assert!(session(s, a) < session(s + 1, 0));
            let (lo, hi) = session_range(s);
            prop_assert!(session(s, a) >= lo && session(s, a) < hi);
        }
    }
}
