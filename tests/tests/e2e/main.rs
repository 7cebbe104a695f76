//! pagecast's cross-crate tests, one test binary (one link): the
//! `pagecast` binary run as operators run it, clusters of index replicas
//! and agents as processes on loopback, killed and frozen, QEMU guests,
//! network namespaces, packet captures. Each module is one area; a test
//! that needs something the machine may lack asks `pagecast_testkit`
//! first (docs/testing.md).

mod agent_cli;
mod capture;
mod cast_cli;
mod evacuate;
mod evaluate;
mod host_faults;
mod index_cli;
mod index_history;
mod index_snapshot;
mod libvirt;
mod live_index;
mod plan_cli;
mod qemu;
mod scan_reference;
