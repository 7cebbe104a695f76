//! Every metric the agent records: the one list `docs/migration.md`
//! points to (`agent --metrics ADDR` exports them).

/// Gauge: VMs running here.
pub const VMS: &str = "pagecast_agent_vms";
/// Gauge: distinct contents in the content map.
pub const CONTENT_ENTRIES: &str = "pagecast_agent_content_entries";
/// Counter: connections that failed authentication.
pub const REFUSED: &str = "pagecast_agent_refused_total";
/// Counter: requests that did not decode.
pub const BAD_REQUESTS: &str = "pagecast_agent_bad_requests_total";
/// Counter, labels `role` (`source`, `destination`) and `result` (`ok`,
/// `failed`, `in-doubt`): migrations.
pub const MIGRATIONS: &str = "pagecast_migrations_total";
/// Histogram: migration downtimes, seconds.
pub const DOWNTIME_SECONDS: &str = "pagecast_migration_downtime_seconds";
/// Counter, label `class` (`pages`, `manifest`): bytes migrations sent.
pub const MIGRATION_BYTES: &str = "pagecast_migration_bytes_total";
/// Counter: pages destinations filled from content they held.
pub const PAGES_LOCAL: &str = "pagecast_migration_pages_local_total";
