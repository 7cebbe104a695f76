//! Every metric the agent records: the one list `docs/migration.md`
//! points to (`agent --metrics ADDR` exports them).

/// Gauge: VMs running here.
pub const VMS: &str = "pagecast_agent_vms";
/// Gauge: distinct contents in the content map.
pub const CONTENT_ENTRIES: &str = "pagecast_agent_content_entries";
/// Counter: connections that failed the TLS handshake (no certificate,
/// another CA, expired, silent past the handshake timeout).
pub const REFUSED: &str = "pagecast_agent_refused_total";
/// Counter: requests refused because the caller's role does not allow them.
pub const FORBIDDEN: &str = "pagecast_agent_forbidden_total";
/// Counter: connections turned away because their peer address already
/// had [`crate::server::MAX_CONNECTIONS_PER_PEER`] open, or the agent
/// [`crate::server::MAX_CONNECTIONS`].
pub const OVER_LIMIT: &str = "pagecast_agent_connections_over_limit_total";
/// Counter: requests that did not decode.
pub const BAD_REQUESTS: &str = "pagecast_agent_bad_requests_total";
/// Counter, labels `role` (`source`, `destination`) and `result` (`ok`,
/// `failed`, `in-doubt`): migrations.
pub const MIGRATIONS: &str = "pagecast_migrations_total";
/// Counter, label `outcome` (`released`: it runs at its destination;
/// `resumed`: it runs here again): switchovers in doubt settled by asking
/// the destination.
pub const IN_DOUBT_SETTLED: &str = "pagecast_migrations_in_doubt_settled_total";
/// Histogram: migration downtimes, seconds.
pub const DOWNTIME_SECONDS: &str = "pagecast_migration_downtime_seconds";
/// Counter, label `class` (`pages`, `manifest`): bytes migrations sent.
pub const MIGRATION_BYTES: &str = "pagecast_migration_bytes_total";
/// Counter, label `kind` (`migration`, `cast`, `clone`, `fetch`): every
/// protocol byte this agent sent moving VMs out (migration links with
/// their framing, cast datagrams and control), and the hashes and pages
/// it served to another host's fetch (a rack-mate's short haul, an
/// intermediary's stash, a destination's gathering).
pub const BYTES_SENT: &str = "pagecast_agent_bytes_sent_total";
/// Counter: pages destinations filled from content they held.
pub const PAGES_LOCAL: &str = "pagecast_migration_pages_local_total";
/// Counter: holder deltas sent to the content index (a batch sent again
/// after a lost answer counts again).
pub const INDEX_DELTAS: &str = "pagecast_agent_index_deltas_total";
/// Counter: reconciliations that found the index holding something else
/// than the agent believed, and corrected it.
pub const RECONCILIATIONS: &str = "pagecast_agent_index_reconciliations_total";
/// Counter: seconds the content index was unreachable (added when it is
/// reachable again).
pub const INDEX_UNREACHABLE_SECONDS: &str = "pagecast_agent_index_unreachable_seconds_total";
/// Gauge: frames the index does not show as they are (hot, or waiting for
/// the update bound).
pub const HOT_PAGES: &str = "pagecast_agent_hot_pages";
/// Gauge: bytes this host keeps for scatter-gather jobs as an
/// intermediary (pages fetched from sources and not yet gathered).
pub const STASH_BYTES: &str = "pagecast_agent_stash_bytes";
/// Gauge: contents whose listing in the index is behind the agent's.
pub const PUBLISH_BACKLOG: &str = "pagecast_agent_index_backlog";
/// Histogram: seconds from a refresh of the content map until the index
/// acknowledged all it changed (publish lag).
pub const PUBLISH_LAG_SECONDS: &str = "pagecast_agent_index_lag_seconds";

/// Counts a migration out that went through, whatever the VM's kind.
pub(crate) fn migrated(rep: &pagecast_proto::v1::MigrateResult) {
    use ::metrics::{counter, histogram};
    counter!(MIGRATIONS, "role" => "source", "result" => "ok").increment(1);
    histogram!(DOWNTIME_SECONDS).record(rep.downtime_ms / 1e3);
    counter!(MIGRATION_BYTES, "class" => "pages").increment(rep.bytes_pages);
    counter!(MIGRATION_BYTES, "class" => "manifest").increment(rep.bytes_manifest);
    counter!(PAGES_LOCAL).increment(rep.pages_local);
    counter!(BYTES_SENT, "kind" => "migration").increment(rep.bytes_sent);
}
