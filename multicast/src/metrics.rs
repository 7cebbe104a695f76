//! Every metric the transport records: the one list `docs/transport.md`
//! points to. Counters unless said otherwise; recorded through the
//! `metrics` crate, exported by whichever process installs a recorder.

/// Datagram bytes the sender sent.
pub const BYTES_SENT: &str = "pagecast_cast_bytes_sent_total";
/// Pages repaired by multicast.
pub const REPAIRS: &str = "pagecast_cast_repairs_total";
/// NACKs the sender received.
pub const NACKS: &str = "pagecast_cast_nacks_total";
/// NACKs a receiver sent.
pub const NACKS_SENT: &str = "pagecast_cast_nacks_sent_total";
/// Datagrams a receiver dropped, by `why`: `stale`, `forged`, `replayed`.
pub const DROPPED: &str = "pagecast_cast_dropped_total";
/// Pages whose hash did not match their check.
pub const BAD_HASH: &str = "pagecast_cast_bad_hash_total";
/// Control connections refused (authentication).
pub const REFUSED: &str = "pagecast_cast_refused_total";
/// Receivers dropped from a session.
pub const RECEIVERS_DROPPED: &str = "pagecast_cast_receivers_dropped_total";
/// Receivers moved to unicast repair.
pub const UNICAST_RECEIVERS: &str = "pagecast_cast_unicast_receivers_total";
/// Multicast groups joined.
pub const JOINS: &str = "pagecast_cast_joins_total";
/// Gauge, label `receiver`: pages the sender is ahead of that receiver's
/// contiguous progress.
pub const RECEIVER_LAG: &str = "pagecast_cast_receiver_lag_pages";
