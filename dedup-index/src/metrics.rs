//! Every metric an index replica records: the one list `docs/index.md`
//! points to (`index serve --metrics ADDR` exports them).

/// Counter: commands proposed to raft by this replica as leader.
pub const PROPOSALS: &str = "pagecast_index_proposals_total";
/// Counter: log entries committed and applied.
pub const COMMITS: &str = "pagecast_index_commits_total";
/// Histogram: seconds to apply one batch of committed entries.
pub const APPLY_SECONDS: &str = "pagecast_index_apply_seconds";
/// Gauge, label `shard`: entries in the shard's raft log.
pub const LOG_ENTRIES: &str = "pagecast_index_log_entries";
/// Counter: snapshots sent to lagging followers.
pub const SNAPSHOTS_SENT: &str = "pagecast_index_snapshots_sent_total";
/// Counter: snapshots received and applied.
pub const SNAPSHOTS_RECEIVED: &str = "pagecast_index_snapshots_received_total";
/// Counter: connections that failed the TLS handshake (no certificate,
/// another CA, expired, silent too long).
pub const REFUSED: &str = "pagecast_index_refused_total";
/// Counter: requests or raft links refused for the caller's role or for
/// writing another host's records.
pub const FORBIDDEN: &str = "pagecast_index_forbidden_total";
/// Counter: connections turned away at the per-peer or total cap.
pub const OVER_LIMIT: &str = "pagecast_index_connections_over_limit_total";
