//! The coordinator: the part of pagecast that executes a plan.
//!
//! Planning (`pagecast-scheduler`) is pure: it turns hosts, VMs and their
//! content into placements, multicast groups, a sending order and a cost.
//! Executing a plan is the opposite: it asks the content index what runs
//! where, drives the host agents (which stay engines: they own guest
//! memory, the dirty log and the migration protocol), opens one-to-many
//! page casts, and follows every VM until it is verified at its
//! destination or back, running, at its source.
//!
//! This crate is the room for that work; it holds no code yet. Today
//! `pagecast migrate` moves one VM between two agents and `pagecast plan`
//! prints what a gang evacuation would send, but nothing runs a plan.
