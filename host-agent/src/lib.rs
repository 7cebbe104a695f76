//! The pagecast host agent as a library: guest memory sources,
//! fingerprinting, manifests and the figures `pagecast scan` reports. The
//! `pagecast` binary is a thin command line over it.

pub mod agent;
pub mod castio;
pub mod fingerprint;
pub mod manifest;
pub mod memory;
pub mod migrate;
pub mod scan;
pub mod topology;
pub mod units;
