//! Reliable one-to-many page transport for pagecast.
//!
//! This crate will carry pages from one sender to many receivers: UDP
//! multicast with NACK repair, pacing, slowest-receiver flow control and
//! per-datagram authentication, with a TCP chain where multicast is not
//! available. It knows nothing about the content index. Nothing is
//! implemented yet; see the project's open issues.
