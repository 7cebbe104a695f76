//! Pure planning for pagecast: where evacuated VMs go, which destinations
//! share a multicast group, in what order groups are sent, and what a plan
//! costs on every link. The crate does no I/O. Nothing is implemented yet;
//! see the project's open issues.
