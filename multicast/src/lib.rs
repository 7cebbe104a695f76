//! Reliable one-to-many page transport for pagecast.
//!
//! A *cast session* moves a set of pages (each with its BLAKE3 hash) from one
//! sender to many receivers so that every page crosses the sender's link
//! once, whatever the number of receivers. It knows nothing about the
//! content index.
//!
//! ```text
//! sender                                         receiver (each of N)
//!   | <- TCP connect, mutual TLS (cluster CA) ------|
//!   | <------ CastHello {name, job, chain_addr, rcvbuf}
//!   | CastWelcome {id, session, session key,        |
//!   |   groups as page ranges, fragment size} ----> |  join member groups
//!   | <------------------------------ CastReady     |
//!   | CastProbe {nonce} --------------------------> |  (transport auto)
//!   | ~~ UDP probe datagrams to each group ~~~~~~~> |
//!   | <--------------------- CastProbeResult{heard} |  any deaf: the chain
//!   | CastStart {multicast | chain} --------------> |
//!   | ~~ data {frame, check, page}, paced ~~~~~~~~> |  hash-check each page
//!   | ~~ heartbeats {sent through} ~~~~~~~~~~~~~~~> |
//!   | <~~~~~~~~~ NACK {ranges, seen through} ~~~~~~ |  random backoff; others
//!   | ~~ repairs, XOR-coded across receivers ~~~~~> |  hearing it stay quiet
//!   | <----------------- CastProgress (every 5 ms)  |  window = slowest live
//!   | CastPage (unicast repair of a slow one) ----> |
//!   | <-------------------- CastDone {digest, ...}  |
//!   | CastFinish {ok} ----------------------------> |  keep the pages
//! ```
//!
//! Control frames travel on the mutual-TLS channel of
//! `pagecast-channel`; datagrams are encrypted and authenticated
//! (AES-256-GCM) under their group's key and carry a sequence
//! number checked against a replay window ([`wire`]). See `docs/transport.md` for the design as a whole. Where multicast is unavailable the pages travel a
//! pipelined TCP chain through the receivers instead, each keeping and
//! forwarding every page, so the sender still sends each page once.

mod handshakes;
pub mod metrics;
pub mod pacing;
pub mod receiver;
mod relay;
pub mod sender;
pub mod session;
pub mod socket;
pub mod wire;

pub use receiver::receive;
pub use sender::{send, send_on};
pub use session::*;
