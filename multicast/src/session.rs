//! What a cast session moves and reports.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use pagecast_pages::{ContentKey, Page, PageHash};
use serde::Serialize;

use pagecast_channel::AuthError;

/// One page of a session: where it goes in the image, and its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry {
    /// Image frame.
    pub key: u64,
    /// BLAKE3 of its content.
    pub hash: PageHash,
}

/// Where a sender reads pages from.
///
/// Every page's frame and hash are known when the session starts; its
/// content may come later. A source that reads its pages while the session
/// runs says how far it got ([`PageSource::ready`]), and a page whose
/// content it could no longer find is withdrawn
/// ([`PageSource::withdrawn`]): the sender tells the page's receivers,
/// which settle it without its data.
pub trait PageSource: Sync {
    /// Pages in the session.
    fn pages(&self) -> u32;
    /// Page `i`'s frame and hash.
    fn entry(&self, i: u32) -> PageEntry;
    /// Page `i`'s content (`i` below [`PageSource::ready`], not withdrawn).
    fn read(&self, i: u32, out: &mut Page) -> io::Result<()>;
    /// Frames of the image the pages come from (the rest are zero).
    fn frames(&self) -> u64;
    /// Pages `0..ready()` can be read or are withdrawn; it only grows, up
    /// to [`PageSource::pages`] (all of them, unless the source reads its
    /// pages while the session runs). The sender sends no page before it
    /// is ready.
    fn ready(&self) -> u32 {
        self.pages()
    }
    /// Whether ready page `i` was withdrawn: its content left the source
    /// before it could be read.
    fn withdrawn(&self, _i: u32) -> bool {
        false
    }
}

/// Where a receiver puts pages.
pub trait PageSink {
    /// Called once, before any page, with the image's size in frames.
    fn begin(&mut self, frames: u64) -> io::Result<()>;
    /// A verified page.
    fn put(&mut self, entry: &PageEntry, data: &Page) -> io::Result<()>;
    /// A page stored earlier (to decode a coded repair against).
    fn get(&mut self, key: u64, out: &mut Page) -> io::Result<()>;
    /// Every page arrived: make the result durable.
    fn finish(&mut self) -> io::Result<()>;
    /// The session failed: discard partial output.
    fn abort(&mut self);
}

/// How pages travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// UDP multicast with NACK repair.
    Multicast,
    /// A pipelined TCP chain through the receivers.
    Chain,
}

/// Which transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportChoice {
    /// Multicast, whatever the probe says.
    Multicast,
    /// The TCP chain.
    Chain,
    /// Multicast if every receiver hears the probe, else the chain.
    Auto,
}

/// A multicast group of a session and the pages sent to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlan {
    /// Group address and data port (NACKs use the next port).
    pub addr: SocketAddrV4,
    /// Receivers in the group, by arrival order (0-based).
    pub members: Vec<usize>,
    /// Pages sent to it, by index into the page source.
    pub pages: Vec<u32>,
}

/// The groups of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Groups {
    /// One group: every receiver, every page.
    Single(SocketAddrV4),
    /// Several groups, sent in order (from the planner's sequence).
    Plan(Vec<GroupPlan>),
}

/// Sender settings.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Where receivers connect.
    pub control: SocketAddr,
    /// The sender's interface address (multicast goes out of it).
    pub iface: Ipv4Addr,
    /// Receivers to wait for.
    pub receivers: usize,
    /// Pacing rate, bits per second (`None`: as fast as flow control allows).
    pub rate_bps: Option<u64>,
    /// With a pacing rate: lower it while receivers lose datagrams and
    /// raise it back when they stop ([`crate::pacing::Aimd`]), so that a
    /// cast shares a congested link; off, the cast holds its rate.
    pub loss_control: bool,
    /// Transport.
    pub transport: TransportChoice,
    /// Multicast TTL.
    pub ttl: u32,
    /// Path MTU (`None`: the interface's).
    pub mtu: Option<usize>,
    /// Most pages the sender runs ahead of the slowest live receiver.
    pub window: u32,
    /// How long to wait for every receiver to connect.
    pub accept_timeout: Duration,
    /// Once one receiver has joined, how long the others have after the
    /// latest join: past it (or past `accept_timeout`), the session goes
    /// on with those joined and reports the rest as dropped (a member
    /// frozen before or during its join holds no one up).
    pub join_grace: Duration,
    /// A receiver blocking the window this long moves to unicast repair.
    pub slow_after: Duration,
    /// A receiver silent this long is dropped.
    pub silent_after: Duration,
    /// The sender's name in handshakes and reports.
    pub name: String,
    /// Receivers by name, in the order group plans number them (empty:
    /// numbered in order of arrival). Others are refused.
    pub expected: Vec<String>,
    /// The job the session belongs to: a receiver whose hello names
    /// another is refused (empty: any).
    pub job: String,
}

impl SenderConfig {
    /// Defaults for a sender on `control` and `iface`.
    pub fn new(control: SocketAddr, iface: Ipv4Addr, receivers: usize) -> Self {
        SenderConfig {
            control,
            iface,
            receivers,
            rate_bps: None,
            loss_control: true,
            transport: TransportChoice::Auto,
            ttl: 1,
            mtu: None,
            window: 8192,
            accept_timeout: Duration::from_secs(60),
            join_grace: Duration::from_secs(10),
            slow_after: Duration::from_secs(3),
            silent_after: Duration::from_secs(5),
            name: "pagecast-sender".into(),
            expected: Vec::new(),
            job: String::new(),
        }
    }
}

/// Receiver settings.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// The sender's control address.
    pub control: SocketAddr,
    /// The receiver's interface address.
    pub iface: Ipv4Addr,
    /// The receiver's name.
    pub name: String,
    /// Multicast TTL for NACKs.
    pub ttl: u32,
    /// Give up if the sender is silent this long.
    pub silent_after: Duration,
    /// The dedup domains the session's pages are named in: a page is taken
    /// if its hash under one of these keys matches (one key, usually; a gang
    /// job's receiver lists the domains of the VMs it fills).
    pub content_keys: Vec<ContentKey>,
    /// The job its hello names (the sender refuses another job's
    /// receivers).
    pub job: String,
}

impl ReceiverConfig {
    /// Defaults for a receiver of `control` on `iface`.
    pub fn new(control: SocketAddr, iface: Ipv4Addr, name: &str) -> Self {
        ReceiverConfig {
            control,
            iface,
            name: name.to_owned(),
            ttl: 1,
            silent_after: Duration::from_secs(10),
            content_keys: vec![ContentKey::CLUSTER],
            job: String::new(),
        }
    }
}

/// How a receiver's session ended, from the sender's side.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum PeerStatus {
    /// Every page arrived and the digest matched.
    Complete,
    /// It finished after being moved to unicast repair.
    Unicast {
        /// Why it was moved.
        reason: String,
    },
    /// It was dropped; the others went on.
    Dropped {
        /// Why.
        reason: String,
    },
    /// It finished but its digest did not match.
    Corrupt,
}

/// Counters a receiver reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReceiverCounters {
    /// Datagrams that did not open (wrong key, altered, or truncated).
    pub forged: u64,
    /// Datagrams whose sequence was seen before.
    pub replayed: u64,
    /// Datagrams of another session.
    pub stale: u64,
    /// Pages whose hash did not match.
    pub bad_hash: u64,
    /// Pages received again after they were held.
    pub duplicates: u64,
    /// NACKs sent.
    pub nacks_sent: u64,
    /// NACKs not sent because another receiver asked first.
    pub nacks_suppressed: u64,
    /// Coded repairs it could not use (it lacked two or more of their pages).
    pub undecodable: u64,
}

/// One receiver in the sender's report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerReport {
    /// Receiver id (1-based).
    pub id: u32,
    /// Its name.
    pub name: String,
    /// Its control address.
    pub addr: String,
    /// How it ended.
    #[serde(flatten)]
    pub status: PeerStatus,
    /// Seconds from the first page sent to its completion.
    pub completion_s: Option<f64>,
    /// Page bytes delivered over its completion time, bits per second.
    pub goodput_bps: Option<f64>,
    /// Pages it had to receive.
    pub pages: u32,
    /// Pages sent to it by unicast repair.
    pub unicast_pages: u64,
    /// Multicast groups it joined and left.
    pub joins: u32,
    /// Groups it left.
    pub leaves: u32,
    /// What it counted.
    pub counters: ReceiverCounters,
}

/// What a sender did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SendReport {
    /// The transport used.
    pub transport: Transport,
    /// Pages in the session.
    pub pages: u32,
    /// Page bytes (pages x 4096).
    pub page_bytes: u64,
    /// Bytes of first sends (datagrams, or the chain's first link).
    pub bytes_first: u64,
    /// Bytes of multicast repairs.
    pub bytes_repair: u64,
    /// Bytes of unicast repairs over control connections.
    pub bytes_unicast: u64,
    /// Control bytes sent (handshakes excluded).
    pub bytes_control: u64,
    /// Heartbeat and probe bytes.
    pub bytes_heartbeat: u64,
    /// NACKs received.
    pub nacks: u64,
    /// Pages repaired by multicast.
    pub repairs: u64,
    /// Repair datagrams that carried the XOR of several pages.
    pub coded_repairs: u64,
    /// Fragments per page (1 where a page fits the MTU).
    pub fragments: u32,
    /// Whole pages per data datagram (2 where the MTU allows).
    pub pages_per_datagram: u32,
    /// UDP datagrams sent (each costs 42 bytes of Ethernet, IPv4 and UDP
    /// headers on the wire beyond the bytes counted here).
    pub datagrams: u64,
    /// Pages the sender let run ahead of the slowest receiver (the
    /// configured window, capped by the smallest receive buffer).
    pub window: u32,
    /// Wall time from the first page sent to the end, seconds.
    pub duration_s: f64,
    /// Of that, seconds waiting for the rate limit (pacing).
    pub paced_s: f64,
    /// Times the paced rate was cut because receivers lost more than 5% of
    /// an interval's pages (`pacing::Aimd`).
    pub rate_cuts: u64,
    /// The lowest rate the cast was paced to, bits per second (its given
    /// rate unless cut; 0 when unpaced).
    pub lowest_rate_bps: u64,
    /// Of that, seconds with nothing to send: the window full until the
    /// slowest receiver reports progress, or the last pages awaiting
    /// every receiver's word.
    pub waited_s: f64,
    /// Of that, seconds waiting for the source to read the next page
    /// (one that reads its pages while the session runs).
    pub unread_s: f64,
    /// Of that, seconds in the socket calls that send pages (the kernel's
    /// share, a full local queue's retries included).
    pub socket_s: f64,
    /// Connections refused for failing authentication.
    pub refused: u64,
    /// Withdrawals the first pass sent (pages the source could not read,
    /// which their receivers settled without data), counted per group a
    /// page is in (the chain: once per page).
    pub withdrawn: u32,
    /// Seconds from the session's start until its receivers had joined
    /// (connected, authenticated and said hello), or the wait for them
    /// was over.
    pub joined_s: f64,
    /// Seconds from the session's start until its receivers had joined
    /// their groups (welcomed, and said they were ready).
    pub ready_s: f64,
    /// Seconds from the session's start to its first page: the joining,
    /// then the welcome, the receivers joining their groups, the probe
    /// where the transport is probed, and the start.
    pub setup_s: f64,
    /// Per receiver.
    pub receivers: Vec<PeerReport>,
}

/// What a receiver got.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecvReport {
    /// The transport used.
    pub transport: Transport,
    /// This receiver's id.
    pub id: u32,
    /// Pages it held at the end (withdrawn ones not counted).
    pub pages: u32,
    /// Pages the sender withdrew, settled without their data (the sink
    /// never saw them).
    pub withdrawn: u32,
    /// Page bytes.
    pub page_bytes: u64,
    /// Pages that came by multicast (or chain).
    pub pages_main: u64,
    /// Pages that came by unicast repair.
    pub pages_unicast: u64,
    /// Datagram bytes received.
    pub bytes_received: u64,
    /// Groups joined.
    pub joins: u32,
    /// Groups left.
    pub leaves: u32,
    /// Seconds from the start message to the last page.
    pub duration_s: f64,
    /// What it counted.
    pub counters: ReceiverCounters,
    /// Why the chain link into this receiver broke, if it did (the rest
    /// then came by unicast repair).
    pub chain_broken: Option<String>,
}

/// Errors of cast sessions.
#[derive(Debug, thiserror::Error)]
pub enum CastError {
    /// Authentication or control framing failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Not every receiver connected in time.
    #[error("only {got} of {want} receivers connected within {waited:?}")]
    Accept {
        /// Connected.
        got: usize,
        /// Expected.
        want: usize,
        /// How long we waited.
        waited: Duration,
    },
    /// The peer broke the protocol.
    #[error("{peer}: protocol error: {why}")]
    Protocol {
        /// Who.
        peer: String,
        /// What.
        why: String,
    },
    /// Bad settings.
    #[error("{0}")]
    Config(String),
    /// The page source failed.
    #[error("reading page {page}: {source}")]
    Source {
        /// The page.
        page: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The sink failed.
    #[error("storing pages: {0}")]
    Sink(#[source] io::Error),
    /// The sender ended the session without this receiver completing.
    #[error("the sender ended the session: {0}")]
    Ended(String),
    /// Nothing heard from the peer for too long.
    #[error("{peer}: silent for {after:?}")]
    Silent {
        /// Who.
        peer: String,
        /// How long.
        after: Duration,
    },
}

impl CastError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> CastError {
        let what = what.into();
        move |source| CastError::Io { what, source }
    }
}

/// The digest a receiver reports: BLAKE3 over (frame, hash) of each page it
/// holds, in page order.
pub fn digest<'a>(entries: impl Iterator<Item = &'a PageEntry>) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for e in entries {
        h.update(&e.key.to_be_bytes());
        h.update(e.hash.as_bytes());
    }
    *h.finalize().as_bytes()
}

/// How long opening a TCP connection to a peer of a cast may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `addr` (`host:port`) within [`CONNECT_TIMEOUT`].
pub fn connect(addr: &str) -> io::Result<std::net::TcpStream> {
    use std::net::ToSocketAddrs;
    let sa = addr.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{addr}: no address"))
    })?;
    std::net::TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT)
}
