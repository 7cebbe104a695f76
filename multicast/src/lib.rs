//! Reliable one-to-many page transport for pagecast.
//!
//! A *cast session* moves a set of pages (each with its BLAKE3 hash) from one
//! sender to many receivers so that every page crosses the sender's link
//! once, whatever the number of receivers. It knows nothing about the
//! content index.
//!
//! ```text
//! sender                                         receiver (each of N)
//!   | <- TCP connect, mutual auth (cluster secret) -|
//!   | <---------------- CastHello {name, chain_addr}|
//!   | CastWelcome {id, session, wrapped key,        |
//!   |              groups, fragment size} --------> |  join member groups
//!   | CastPages {frames, hashes} x k -------------> |
//!   | CastProbe {nonce} --------------------------> |
//!   | ~~ UDP probe datagrams to each group ~~~~~~~> |
//!   | <--------------------- CastProbeResult{heard} |  any deaf: use the chain
//!   | CastStart {multicast | chain} --------------> |
//!   | ~~ data datagrams, paced, windowed ~~~~~~~~~> |  verify each page's hash
//!   | ~~ heartbeats {sent through} ~~~~~~~~~~~~~~~> |
//!   | <~~~~~~~~~~~ NACK {ranges} to the group ~~~~~ |  random backoff; others
//!   | ~~ repairs (multicast) ~~~~~~~~~~~~~~~~~~~~~> |  hearing it stay quiet
//!   | <----------------- CastProgress (every 5 ms)  |  window = slowest live
//!   | CastPage (unicast repair of a slow one) ----> |
//!   | <-------------------- CastDone {digest, ...}  |
//!   | CastFinish {ok} ----------------------------> |  write the image
//! ```
//!
//! Control frames are authenticated ([`auth`]); datagrams carry a MAC under
//! the per-session key and a sequence number checked against a replay
//! window ([`wire`]). Where multicast is unavailable the pages travel a
//! pipelined TCP chain through the receivers instead, each keeping and
//! forwarding every page, so the sender still sends each page once.

pub mod auth;
pub mod pacing;
pub mod receiver;
pub mod sender;
pub mod session;
pub mod socket;
pub mod wire;

pub use auth::{AuthError, Channel, ChannelReader, ChannelWriter, Secret};
pub use receiver::receive;
pub use sender::send;
pub use session::*;
