//! The sending side of a cast session.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use pagecast_pages::{PAGE_SIZE, Page};
use pagecast_proto::{CAST_WIRE_VERSION, MAX_CAST_GROUPS, MAX_CAST_PAGES, v1};

use crate::handshakes::Handshakes;
use crate::pacing::{Aimd, TokenBucket};
use crate::session::*;
use crate::socket::{self, RecvBatch};
use crate::wire::{
    Body, CastKey, Datagram, GroupKey, MAX_CODED, Opening, Replay, ReplayWindow, Sealing, check_of,
    decode, fragment_payload,
};
use pagecast_channel::{Channel, ChannelReader, ChannelWriter, Role, Tls, random_bytes};

/// Pages sent per batch of datagrams (a batch of whole pages, one or two per
/// datagram, fills one 63 KiB GSO send).
const PAGES_PER_BATCH: usize = 14;

/// Bytes the pacer lets go at once. A sleep between batches overshoots
/// (timer slack, a busy host), and the bucket credits the overshoot only up
/// to this, so it holds several batches: on the emulated racks
/// (`scripts/evaluate.sh`, 1 Gbit/s links paced at 0.97) a cast's pages
/// went at 0.91 Gbit/s with one batch's worth (64 KiB) and 0.95 with
/// 256 KiB, which is 2 ms at 1 Gbit/s, well inside a switch's or a
/// shaper's queue.
const PACING_BURST: usize = 256 * 1024;
/// How often the sender tells receivers how far it got.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(2);
/// How long a repair request waits for requests from other receivers, so
/// repairs of pages different receivers lack can share a coded datagram
/// (a receiver asks again at most every 50 ms, see REPAIR_WAIT there).
const COALESCE: Duration = Duration::from_millis(50);
/// Most pending repairs the coder considers at once.
const REPAIR_POOL: usize = 1024;
/// How long receivers have to report a probe.
const PROBE_WAIT: Duration = Duration::from_secs(2);
/// How often a sender waiting for its source's next page looks again
/// (TCP transports; the multicast loop waits on its receivers' events).
const READY_POLL: Duration = Duration::from_millis(1);

enum Event {
    Ready(usize),
    Progress(usize, v1::CastProgress),
    Done(usize, v1::CastDone),
    Probe(usize, v1::CastProbeResult),
    Closed(usize, String),
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Live,
    Unicast(String),
    Dropped(String),
    Done {
        at: Instant,
        ok: bool,
        unicast: Option<String>,
    },
}

struct Peer {
    id: u32,
    name: String,
    addr: String,
    chain_addr: String,
    /// The name its certificate holds (chain links check it).
    certified: String,
    rcvbuf: u64,
    writer: Option<ChannelWriter>,
    /// Closes its connection while a repair thread holds the writer.
    closer: Option<pagecast_channel::Closer>,
    /// Whether its repair thread is in a send.
    sending: Option<Sending>,
    /// While a send of its repair waits: the bytes its kernel had not
    /// acknowledged when last looked at, and since when that stood.
    unmoved: Option<(usize, Instant)>,
    /// The sender dropped it ([`Peer::cut`]): a repair that failed then
    /// failed because of that.
    cut: bool,
    reader: Option<ChannelReader>,
    state: State,
    contiguous: Vec<u32>,
    last_heard: Instant,
    lagging_since: Option<Instant>,
    groups: Vec<usize>,
    pages: Vec<u32>,
    unicast_pages: u64,
    counters: ReceiverCounters,
    /// It gave up its chain link, for this reason.
    chain_refused: Option<String>,
    /// It gave up passing pages to the next receiver, for this reason
    /// (taken once; `None` again once those after it were moved).
    chain_next_lost: Option<String>,
    /// Its `chain_next_lost` was acted on.
    next_lost_seen: bool,
    /// Since when it has had every page it needs (it reported the last
    /// group held, or its unicast repair was sent): it owes its Done.
    owes_done_since: Option<Instant>,
    /// What it took of the words told to every live receiver.
    told: Taking,
}

/// A receiver's words for the report: at most 200 characters, none of
/// them control characters.
fn printable(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(200).collect()
}

/// Whether a repair thread is in a send (the silence check times how long
/// the receiver's kernel then acknowledges nothing: [`Peer::repair_unmoved_for`]).
#[derive(Clone, Default)]
struct Sending(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Sending {
    /// Runs `send`, marked as in a send meanwhile.
    fn during<T>(&self, send: impl FnOnce() -> T) -> T {
        use std::sync::atomic::Ordering;
        self.0.store(true, Ordering::Release);
        let r = send();
        self.0.store(false, Ordering::Release);
        r
    }

    fn active(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Peer {
    /// How long a send of its repair has waited with nothing acknowledged
    /// by the receiver's kernel meanwhile (zero outside a send).
    fn repair_unmoved_for(&mut self, now: Instant) -> Duration {
        let waiting = self.sending.as_ref().is_some_and(Sending::active);
        let unacked = self.closer.as_ref().and_then(|c| c.unacked_bytes().ok());
        let (Some(unacked), true) = (unacked, waiting) else {
            self.unmoved = None;
            return Duration::ZERO;
        };
        match self.unmoved {
            Some((was, since)) if was == unacked => now.duration_since(since),
            _ => {
                self.unmoved = Some((unacked, now));
                Duration::ZERO
            }
        }
    }

    /// Takes back what its unicast repair thread held, and names the
    /// repair's failure as the cause of its drop (its connection closed
    /// because of it) unless the sender cut it for a reason of its own.
    fn repaired(&mut self, r: Repaired) {
        (self.writer, self.unicast_pages) = (r.writer, r.pages);
        if let (Some(why), State::Dropped(then) | State::Unicast(then)) = (r.failed, &self.state)
            && !self.cut
        {
            self.state = State::Dropped(format!("unicast repair given up: {why} ({then})"));
        }
    }

    /// Tells it how the session ended for it and closes its control
    /// connection; returns the bytes sent over that connection.
    fn goodbye(&mut self) -> u64 {
        let (ok, reason) = match &self.state {
            State::Done { ok: true, .. } => (true, String::new()),
            State::Done { ok: false, .. } => (false, "digest mismatch".into()),
            State::Dropped(r) | State::Unicast(r) => (false, r.clone()),
            State::Live => (false, "did not finish".into()),
        };
        let Some(w) = self.writer.as_mut() else {
            return 0;
        };
        // Not waited for on one that takes nothing (a receiver dropped
        // for silence whose buffers are full).
        let finish = frame(v1::cast_frame::Body::Finish(v1::CastFinish { ok, reason }));
        let _ = w.send_unless_stalled(&finish, TELL_STALL);
        w.shutdown();
        w.sent_bytes()
    }

    /// How it ended, and when it completed (seconds after `start`).
    fn outcome(&self, start: Instant) -> (PeerStatus, Option<f64>) {
        let since = |at: &Instant| Some(at.duration_since(start).as_secs_f64());
        match &self.state {
            State::Done {
                at,
                ok: true,
                unicast: None,
            } => (PeerStatus::Complete, since(at)),
            State::Done {
                at,
                ok: true,
                unicast: Some(r),
            } => (PeerStatus::Unicast { reason: r.clone() }, since(at)),
            State::Done { at, ok: false, .. } => (PeerStatus::Corrupt, since(at)),
            State::Dropped(r) | State::Unicast(r) => {
                (PeerStatus::Dropped { reason: r.clone() }, None)
            }
            State::Live => (
                PeerStatus::Dropped {
                    reason: "did not finish".into(),
                },
                None,
            ),
        }
    }

    /// Its line of the session's report, given its `outcome`.
    fn report(
        &self,
        (status, completion): (PeerStatus, Option<f64>),
        multicast: bool,
    ) -> PeerReport {
        let page_bytes = self.pages.len() as f64 * PAGE_SIZE as f64;
        let joined = if multicast {
            self.groups.len() as u32
        } else {
            0
        };
        PeerReport {
            id: self.id,
            name: self.name.clone(),
            addr: self.addr.clone(),
            goodput_bps: completion.map(|s| page_bytes * 8.0 / s.max(1e-9)),
            completion_s: completion,
            pages: self.pages.len() as u32,
            unicast_pages: self.unicast_pages,
            joins: joined,
            leaves: if matches!(status, PeerStatus::Dropped { .. }) {
                0
            } else {
                joined
            },
            counters: self.counters.clone(),
            status,
        }
    }

    /// Drops it for `why` and closes its connection, whoever holds the
    /// writer: a repair thread sending to it fails at once instead of at
    /// its write limit (the session would otherwise wait for that thread
    /// at its end).
    fn cut(&mut self, why: String) {
        self.state = State::Dropped(why);
        self.cut = true;
        counter!(crate::metrics::RECEIVERS_DROPPED).increment(1);
        if let Some(w) = &self.writer {
            w.shutdown();
        }
        if let Some(c) = &self.closer {
            c.shutdown();
        }
    }
}

struct Group {
    addr: SocketAddrV4,
    pages: Vec<u32>,
    members: Vec<usize>,
}

/// `(first, count)` pairs covering `pages` in order.
fn ranges(pages: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    for &p in pages {
        let n = out.len();
        if n >= 2 && out[n - 2] + out[n - 1] == p {
            out[n - 1] += 1;
        } else {
            out.extend([p, 1]);
        }
    }
    out
}

fn welcome_groups(groups: &[Group], peer: usize, keys: &Keys) -> Vec<v1::CastGroup> {
    groups
        .iter()
        .enumerate()
        .map(|(gi, g)| {
            let slot = g.members.iter().position(|&m| m == peer);
            let member = slot.is_some();
            v1::CastGroup {
                addr: g.addr.to_string(),
                page_ranges: if member { ranges(&g.pages) } else { Vec::new() },
                member,
                len: g.pages.len() as u32,
                key: if member {
                    keys.groups[gi].bytes().to_vec().into()
                } else {
                    Default::default()
                },
                slot: slot.unwrap_or(0) as u32,
            }
        })
        .collect()
}

/// A page to repair, `(group, index)`, and who asked for it (a bit per
/// receiver, see [`requester`]).
type Request = ((u32, u32), u64);

/// Groups pages to repair into repair datagrams: up to `max_units`, each
/// one page, or (with `coding`) up to [`MAX_CODED`] pages of one group whose
/// requester sets are pairwise disjoint, so no receiver lacks two pages of
/// a unit. Greedy in page order. Returns the units and the pages left over.
fn repair_units(
    mut pool: Vec<Request>,
    coding: bool,
    max_units: usize,
) -> (Vec<Vec<(u32, u32)>>, Vec<Request>) {
    let mut units = Vec::new();
    while !pool.is_empty() && units.len() < max_units {
        let (first, mut union) = pool.remove(0);
        let mut unit = vec![first];
        let mut k = 0;
        while coding && k < pool.len() && unit.len() < MAX_CODED {
            let ((group, _), mask) = pool[k];
            if group == first.0 && mask & union == 0 {
                union |= mask;
                unit.push(pool.remove(k).0);
            } else {
                k += 1;
            }
        }
        units.push(unit);
    }
    (units, pool)
}

/// A receiver's bit in a repair's requester set (all bits where there are
/// more receivers than bits: such a repair is never coded with another).
fn requester(from: u32) -> u64 {
    match from {
        1..=64 => 1 << (from - 1),
        _ => u64::MAX,
    }
}

/// Runs a session as its sender: waits for the receivers, hands them the
/// session key and page list, moves every page to each of them once per
/// link, and reports. `progress` is called with pages sent so far.
pub fn send(
    cfg: &SenderConfig,
    groups: Groups,
    src: &dyn PageSource,
    tls: &Tls,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<SendReport, CastError> {
    let listener = TcpListener::bind(cfg.control)
        .map_err(CastError::io(format!("listening on {}", cfg.control)))?;
    send_on(listener, cfg, groups, src, tls, progress)
}

/// [`send`] on a control listener the caller bound (to learn its port
/// before receivers connect).
pub fn send_on(
    listener: TcpListener,
    cfg: &SenderConfig,
    groups: Groups,
    src: &dyn PageSource,
    tls: &Tls,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<SendReport, CastError> {
    let total = src.pages();
    let groups = checked_groups(cfg, groups, total)?;
    // 1. Receivers connect and authenticate; the session goes on with
    // those that joined in time.
    let began = Instant::now();
    let (slots, refused) = accept_receivers(listener, cfg, tls)?;
    session(cfg, (slots, refused, began), groups, src, tls, progress)
}

/// A session's receivers seated, welcomed and sent every page, once they
/// connected (`accepted`: their slots, how many were refused, and when
/// the session began).
fn session(
    cfg: &SenderConfig,
    (slots, refused, began): (Vec<Option<Joined>>, u64, Instant),
    groups: Vec<Group>,
    src: &dyn PageSource,
    tls: &Tls,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<SendReport, CastError> {
    let total = src.pages();
    let joined_s = began.elapsed().as_secs_f64();
    let Seated {
        mut peers,
        groups,
        missing,
    } = seat(cfg, slots, groups)?;
    // 2. The session key, groups and page list.
    let shape = SessionShape::new(cfg, &peers, &groups)?;
    welcome(&mut peers, &groups, src, &shape)?;
    let (tx, rx) = mpsc::channel::<Event>();
    std::thread::scope(|scope| -> Result<SendReport, CastError> {
        for (i, p) in peers.iter_mut().enumerate() {
            let reader = p.reader.take().expect("reader present");
            let tx = tx.clone();
            scope.spawn(move || read_peer(i, reader, tx));
        }
        drop(tx);
        // 3. Wait until every receiver has joined its groups: a datagram
        // sent before would be lost to it and cost a repair.
        wait_ready(cfg, &mut peers, &rx);
        let ready_s = began.elapsed().as_secs_f64();
        // 4. Probe multicast where asked to decide. Probes take sequence
        // numbers from the same counter as everything the sender multicasts:
        // receivers' replay windows follow one sequence per sender.
        let mut seq = 0u64;
        let transport = match cfg.transport {
            TransportChoice::Multicast => Transport::Multicast,
            TransportChoice::Chain => Transport::Chain,
            TransportChoice::Auto => probe(
                cfg,
                &groups,
                &mut peers,
                &rx,
                shape.session_id,
                &shape.keys,
                &mut seq,
            )?,
        };
        start(
            transport,
            &mut peers,
            &tls.identity().name,
            cfg.silent_after,
        )?;
        // 5. The pages.
        let report = shape.report(cfg, transport, total, (refused, joined_s, ready_s));
        let mut run = Run {
            cfg,
            groups: &groups,
            src,
            peers: &mut peers,
            rx: &rx,
            session_id: shape.session_id,
            keys: &shape.keys,
            frag: shape.frag,
            pack: shape.pack,
            window: shape.window,
            seq,
            report,
            started: Instant::now(),
            progress,
            sharing: Default::default(),
        };
        run.report.setup_s = began.elapsed().as_secs_f64();
        let unicast = match transport {
            Transport::Multicast => run.multicast(scope, tls)?,
            Transport::Chain => run.chain(scope, tls)?,
        };
        let mut report = run.finish(unicast);
        report
            .receivers
            .extend(missing.iter().map(|name| not_joined(cfg, name)));
        Ok(report)
    })
}

/// The report of a receiver that did not join in time.
fn not_joined(cfg: &SenderConfig, name: &str) -> PeerReport {
    PeerReport {
        id: 0,
        name: name.to_owned(),
        addr: String::new(),
        status: PeerStatus::Dropped {
            reason: format!(
                "did not join (the others had joined and waited up to {:?} more)",
                cfg.join_grace
            ),
        },
        completion_s: None,
        goodput_bps: None,
        pages: 0,
        unicast_pages: 0,
        joins: 0,
        leaves: 0,
        counters: ReceiverCounters::default(),
    }
}

/// The session's groups, checked against its pages and receivers.
fn checked_groups(cfg: &SenderConfig, groups: Groups, total: u32) -> Result<Vec<Group>, CastError> {
    if total > MAX_CAST_PAGES {
        return Err(CastError::Config(format!(
            "{total} pages; a session carries at most {MAX_CAST_PAGES}"
        )));
    }
    if cfg.receivers == 0 {
        return Err(CastError::Config(
            "a session needs at least one receiver".into(),
        ));
    }
    if !cfg.expected.is_empty() && cfg.expected.len() != cfg.receivers {
        return Err(CastError::Config(format!(
            "{} receivers expected by name, {} in all",
            cfg.expected.len(),
            cfg.receivers
        )));
    }
    let groups: Vec<Group> = match groups {
        Groups::Single(addr) => vec![Group {
            addr,
            pages: (0..total).collect(),
            members: (0..cfg.receivers).collect(),
        }],
        Groups::Plan(p) => p
            .into_iter()
            .map(|g| Group {
                addr: g.addr,
                pages: g.pages,
                members: g.members,
            })
            .collect(),
    };
    if groups.is_empty() || groups.len() > MAX_CAST_GROUPS {
        return Err(CastError::Config(format!(
            "{} groups; a session has 1 to {MAX_CAST_GROUPS}",
            groups.len()
        )));
    }
    for g in &groups {
        if !g.addr.ip().is_multicast() {
            return Err(CastError::Config(format!(
                "{} is not an IPv4 multicast address",
                g.addr
            )));
        }
        if let Some(&p) = g.pages.iter().find(|&&p| p >= total) {
            return Err(CastError::Config(format!(
                "group {} lists page {p} of {total}",
                g.addr
            )));
        }
        if let Some(&m) = g.members.iter().find(|&&m| m >= cfg.receivers) {
            return Err(CastError::Config(format!(
                "group {} lists receiver {m} of {}",
                g.addr, cfg.receivers
            )));
        }
    }
    Ok(groups)
}

/// A receiver that joined: its channel and its hello.
type Joined = (Channel, v1::CastHello);

/// How often receivers that joined hear that the sender waits for others.
const WAITING_EVERY: Duration = Duration::from_secs(1);

/// Waits for the receivers to connect, authenticate and say hello: until
/// every one has, or the accept timeout passes, or (once one has joined)
/// [`SenderConfig::join_grace`] passes after the latest join. Handshakes
/// run on threads of their own ([`Handshakes`]: a peer that connects and
/// says nothing is dropped at the handshake timeout, or sooner to make
/// room), and those joined hear each second that the sender is waiting, so
/// they do not give it up. Returns each slot's receiver (`None`: it did
/// not join) and how many were refused; fails only if none joined.
fn accept_receivers(
    listener: TcpListener,
    cfg: &SenderConfig,
    tls: &Tls,
) -> Result<(Vec<Option<Joined>>, u64), CastError> {
    let mut refused = 0u64;
    let mut refuse = || {
        refused += 1;
        counter!(crate::metrics::REFUSED).increment(1);
    };
    let mut slots: Vec<Option<Joined>> = (0..cfg.receivers).map(|_| None).collect();
    let deadline = Instant::now() + cfg.accept_timeout;
    let mut last_join: Option<Instant> = None;
    let mut last_word = Instant::now();
    listener
        .set_nonblocking(true)
        .map_err(CastError::io("control listener"))?;
    let handshakes: Handshakes<Joined> = Handshakes::new();
    let shake = {
        let tls = tls.clone();
        move |s| accept_peer(s, &tls)
    };
    let joined = |slots: &[Option<Joined>]| slots.iter().filter(|s| s.is_some()).count();
    loop {
        while let Some(res) = handshakes.done() {
            let Ok((ch, hello)) = res else {
                refuse();
                continue;
            };
            let certified = ch.identity().name.clone();
            match slot_of(cfg, &slots, &hello, &certified) {
                Some(idx) => {
                    slots[idx] = Some((ch, hello));
                    last_join = Some(Instant::now());
                }
                None => refuse(),
            }
        }
        // Everyone is in, or the wait for the rest is over.
        let all = joined(&slots) >= cfg.receivers;
        let now = Instant::now();
        let over = now > deadline || last_join.is_some_and(|t| now > t + cfg.join_grace);
        if over && joined(&slots) == 0 {
            return Err(CastError::Accept {
                got: 0,
                want: cfg.receivers,
                waited: cfg.accept_timeout,
            });
        }
        if all || over {
            break;
        }
        if last_word.elapsed() >= WAITING_EVERY {
            last_word = Instant::now();
            tell_waiting(&mut slots, cfg.receivers);
        }
        if !all && !over {
            handshakes.accept(&listener, &shake)?;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((slots, refused))
}

/// Tells each receiver that joined that the sender still waits for others;
/// one that cannot be told loses its slot (it may join again).
fn tell_waiting(slots: &mut [Option<Joined>], expected: usize) {
    let joined = slots.iter().filter(|s| s.is_some()).count() as u32;
    for s in slots.iter_mut() {
        let Some((ch, _)) = s else { continue };
        let word = frame(v1::cast_frame::Body::Waiting(v1::CastWaiting {
            joined,
            expected: expected as u32,
        }));
        if ch.send(&word).is_err() {
            *s = None;
        }
    }
}

/// The slot a receiver's hello takes: where the caller named its
/// receivers, the slot of the name its certificate holds (`certified`),
/// which its hello must also say; else the first free one, if no slot
/// holds the same certificate. `None` refuses it (another job's receiver,
/// a name not expected, a hello that claims another's name, a slot
/// already taken, or a certificate already seated: one certificate in two
/// slots could stand on both sides of an honest receiver on the chain).
fn slot_of(
    cfg: &SenderConfig,
    slots: &[Option<Joined>],
    hello: &v1::CastHello,
    certified: &str,
) -> Option<usize> {
    if !cfg.job.is_empty() && hello.job != cfg.job {
        return None;
    }
    if cfg.expected.is_empty() {
        let seated = |s: &Option<Joined>| {
            s.as_ref()
                .is_some_and(|(ch, _)| ch.identity().name == certified)
        };
        if slots.iter().any(seated) {
            return None;
        }
        return slots.iter().position(Option::is_none);
    }
    if hello.name != certified {
        return None;
    }
    match cfg.expected.iter().position(|n| n == certified) {
        Some(i) if slots[i].is_none() => Some(i),
        _ => None,
    }
}

/// How long a word to every live receiver in turn (a withdrawal during
/// the chain's feed) may wait on one of them while its kernel takes
/// nothing, and the window its pace is judged over: one whose control
/// connection's buffers are full and that acknowledges no byte for that
/// long has stopped reading it (an honest receiver reads it on a thread of
/// its own), and one that takes less than [`MIN_TAKE_RATE`] over a window
/// of waiting, in one send or across many, reads it too slowly to wait
/// for.
const TELL_STALL: Duration = Duration::from_secs(1);

/// Who takes part in a session once the joining is over.
struct Seated {
    /// Those that joined, numbered anew in slot order.
    peers: Vec<Peer>,
    /// The groups with only them as members (a group left with no member
    /// is not sent).
    groups: Vec<Group>,
    /// The names of the slots that did not join.
    missing: Vec<String>,
}

/// Seats the receivers that joined (see [`Seated`]).
fn seat(
    cfg: &SenderConfig,
    slots: Vec<Option<Joined>>,
    groups: Vec<Group>,
) -> Result<Seated, CastError> {
    let mut renumbered = vec![None; slots.len()];
    let mut missing = Vec::new();
    let mut n = 0;
    for (i, s) in slots.iter().enumerate() {
        if s.is_some() {
            renumbered[i] = Some(n);
            n += 1;
        } else {
            missing.push(
                cfg.expected
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("receiver {}", i + 1)),
            );
        }
    }
    let groups: Vec<Group> = groups
        .into_iter()
        .filter_map(|mut g| {
            g.members = g
                .members
                .iter()
                .filter_map(|&m| renumbered.get(m).copied().flatten())
                .collect();
            (!g.members.is_empty()).then_some(g)
        })
        .collect();
    if groups.is_empty() {
        return Err(CastError::Config(format!(
            "the receivers that joined need none of the pages; missing: {}",
            missing.join(", ")
        )));
    }
    let peers = slots
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(idx, (ch, hello))| new_peer(idx, ch, hello, &groups))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Seated {
        peers,
        groups,
        missing,
    })
}

/// Receiver `idx` as its hello introduced it: its groups and pages.
fn new_peer(
    idx: usize,
    ch: Channel,
    hello: v1::CastHello,
    groups: &[Group],
) -> Result<Peer, CastError> {
    let member: Vec<usize> = (0..groups.len())
        .filter(|&g| groups[g].members.contains(&idx))
        .collect();
    let mut pages: Vec<u32> = member
        .iter()
        .flat_map(|&g| groups[g].pages.iter().copied())
        .collect();
    pages.sort_unstable();
    pages.dedup();
    let certified = ch.identity().name.clone();
    let (reader, writer) = ch.split()?;
    Ok(Peer {
        id: idx as u32 + 1,
        name: hello.name,
        addr: writer.peer().to_owned(),
        chain_addr: hello.chain_addr,
        certified,
        rcvbuf: hello.rcvbuf_bytes,
        writer: Some(writer),
        closer: None,
        sending: None,
        unmoved: None,
        cut: false,
        reader: Some(reader),
        state: State::Live,
        contiguous: vec![0; groups.len()],
        last_heard: Instant::now(),
        lagging_since: None,
        groups: member,
        pages,
        unicast_pages: 0,
        chain_refused: None,
        chain_next_lost: None,
        next_lost_seen: false,
        owes_done_since: None,
        told: Taking::alone(),
        counters: ReceiverCounters::default(),
    })
}

/// A session's keys: each group's (secrecy: only its members get it) and
/// each receiver's own (origin: shared with the sender only). See the
/// wire module.
struct Keys {
    /// By group.
    groups: Vec<GroupKey>,
    /// By receiver (peer index).
    members: Vec<CastKey>,
    /// By group: its members' keys in member order, the tags its
    /// datagrams carry.
    tags: Vec<Vec<CastKey>>,
}

impl Keys {
    fn new(groups: &[Group], peers: usize) -> Result<Keys, CastError> {
        let fresh = || -> Result<CastKey, CastError> {
            let mut k = [0u8; 32];
            random_bytes(&mut k)?;
            Ok(k)
        };
        let groups_keys = groups
            .iter()
            .map(|_| fresh().map(GroupKey::new))
            .collect::<Result<_, _>>()?;
        let members: Vec<CastKey> = (0..peers).map(|_| fresh()).collect::<Result<_, _>>()?;
        let tags = groups
            .iter()
            .map(|g| g.members.iter().map(|&m| members[m]).collect())
            .collect();
        Ok(Keys {
            groups: groups_keys,
            members,
            tags,
        })
    }

    /// What the sender seals a datagram to group `g` with.
    fn sealing(&self, g: usize) -> Sealing<'_> {
        Sealing {
            key: &self.groups[g],
            tags: &self.tags[g],
        }
    }

    /// What opens a NACK to group `group` from receiver `from`: that
    /// group's key and that receiver's tag, if it is a member.
    fn nack_opening(&self, groups: &[Group], group: u32, from: u32) -> Option<Opening<'_>> {
        let g = groups.get(group as usize)?;
        let m = (from as usize).checked_sub(1)?;
        if !g.members.contains(&m) {
            return None;
        }
        Some(Opening {
            key: &self.groups[group as usize],
            tag: Some((0, &self.members[m])),
        })
    }
}

/// What every datagram of a session shares: its keys and id, fragment
/// size, pages per datagram, and the window of pages in flight.
struct SessionShape {
    keys: Keys,
    session_id: u64,
    frag: usize,
    pack: usize,
    window: u32,
}

impl SessionShape {
    fn new(
        cfg: &SenderConfig,
        peers: &[Peer],
        groups: &[Group],
    ) -> Result<SessionShape, CastError> {
        let keys = Keys::new(groups, peers.len())?;
        // Datagrams carry a tag per member of their group: room for the
        // largest group's.
        let tags = groups.iter().map(|g| g.members.len()).max().unwrap_or(0);
        let mut sid = [0u8; 8];
        random_bytes(&mut sid)?;
        let mtu = match cfg.mtu {
            Some(m) => m,
            None => socket::interface_mtu(cfg.iface)
                .map_err(CastError::io(format!("finding the MTU of {}", cfg.iface)))?,
        };
        let largest = fragment_payload(mtu, tags);
        if largest < crate::wire::MIN_FRAGMENT {
            return Err(CastError::Config(format!(
                "MTU {mtu} is too small to carry pages"
            )));
        }
        // Fragments of equal size (the last padded), so every data datagram
        // of a session has one length and batches go out with GSO.
        let frag = PAGE_SIZE.div_ceil(PAGE_SIZE.div_ceil(largest));
        // Whole pages per datagram where the MTU allows more than one.
        let pack = if frag == PAGE_SIZE {
            crate::wire::pages_per_datagram(mtu, tags).max(1)
        } else {
            1
        };
        // Keep the pages in flight within the smallest receive buffer (with
        // a quarter spare for repairs and heartbeats).
        let smallest = peers.iter().map(|p| p.rcvbuf).min().unwrap_or(0) as usize;
        let fits = (smallest * 3 / 4 / socket::page_cost(frag, pack)).max(16) as u32;
        Ok(SessionShape {
            keys,
            session_id: u64::from_be_bytes(sid),
            frag,
            pack,
            window: cfg.window.min(fits),
        })
    }

    /// A session's report before its first page: how it will move its
    /// pages, and how long the receivers took to join (`joined_s`) and to
    /// be in their groups (`ready_s`); `refused`: connections refused.
    fn report(
        &self,
        cfg: &SenderConfig,
        transport: Transport,
        total: u32,
        (refused, joined_s, ready_s): (u64, f64, f64),
    ) -> SendReport {
        SendReport {
            transport,
            pages: total,
            page_bytes: total as u64 * PAGE_SIZE as u64,
            bytes_first: 0,
            bytes_repair: 0,
            bytes_unicast: 0,
            bytes_control: 0,
            bytes_heartbeat: 0,
            nacks: 0,
            repairs: 0,
            coded_repairs: 0,
            datagrams: 0,
            fragments: PAGE_SIZE.div_ceil(self.frag) as u32,
            pages_per_datagram: self.pack as u32,
            window: self.window,
            duration_s: 0.0,
            paced_s: 0.0,
            rate_cuts: 0,
            lowest_rate_bps: cfg.rate_bps.unwrap_or(0),
            waited_s: 0.0,
            unread_s: 0.0,
            socket_s: 0.0,
            refused,
            withdrawn: 0,
            joined_s,
            ready_s,
            setup_s: 0.0,
            receivers: Vec::new(),
        }
    }
}

/// Hands each receiver its own key, its groups (with the keys of its own)
/// and the page list.
fn welcome(
    peers: &mut [Peer],
    groups: &[Group],
    src: &dyn PageSource,
    shape: &SessionShape,
) -> Result<(), CastError> {
    for (idx, p) in peers.iter_mut().enumerate() {
        let w = p
            .writer
            .as_mut()
            .expect("writer present until the session runs");
        w.send(&frame(v1::cast_frame::Body::Welcome(v1::CastWelcome {
            version: CAST_WIRE_VERSION as i32,
            receiver_id: p.id,
            session_id: shape.session_id,
            member_key: shape.keys.members[idx].to_vec().into(),
            fragment_payload: shape.frag as u32,
            total_pages: src.pages(),
            groups: welcome_groups(groups, idx, &shape.keys),
            image_frames: src.frames(),
        })))?;
    }
    Ok(())
}

/// Passes receiver `i`'s frames on as events until it closes.
fn read_peer(i: usize, mut reader: ChannelReader, tx: mpsc::Sender<Event>) {
    use v1::cast_frame::Body as F;
    loop {
        let ev = match reader.recv::<v1::CastFrame>("cast frame") {
            Ok(v1::CastFrame { body: Some(b) }) => match b {
                F::Progress(x) => Event::Progress(i, x),
                F::Done(x) => Event::Done(i, x),
                F::ProbeResult(x) => Event::Probe(i, x),
                F::Ready(_) => Event::Ready(i),
                other => Event::Closed(i, format!("unexpected frame {other:?}")),
            },
            Ok(other) => Event::Closed(i, format!("unexpected frame {other:?}")),
            Err(e) => Event::Closed(i, e.to_string()),
        };
        let last = matches!(ev, Event::Closed(..));
        if tx.send(ev).is_err() || last {
            return;
        }
    }
}

/// Waits until every receiver says it is ready, or has left, or its time
/// (the silence limit) is up; the late are dropped.
fn wait_ready(cfg: &SenderConfig, peers: &mut [Peer], rx: &mpsc::Receiver<Event>) {
    let mut ready = vec![false; peers.len()];
    let deadline = Instant::now() + cfg.silent_after;
    while ready.iter().any(|r| !r) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::Ready(i)) => ready[i] = true,
            Ok(Event::Closed(i, why)) => {
                peers[i].state = State::Dropped(format!("left before the start: {why}"));
                ready[i] = true;
            }
            Ok(_) => {}
            Err(_) => {
                for (i, r) in ready.iter_mut().enumerate() {
                    if !*r {
                        peers[i].state =
                            State::Dropped(format!("not ready within {:?}", cfg.silent_after));
                        if let Some(w) = &peers[i].writer {
                            w.shutdown();
                        }
                        *r = true;
                    }
                }
            }
        }
    }
}

/// Tells each live receiver the transport (a chain runs through the
/// receivers still in the session); in a chain, also whom it takes
/// pages from (the sender, `me`, for the first) and whom it passes them to,
/// by certificate name, and how long it waits for that one to take a page
/// ([`crate::relay::relay_wait`], from the silence limit `silent`).
fn start(
    transport: Transport,
    peers: &mut [Peer],
    me: &str,
    silent: Duration,
) -> Result<(), CastError> {
    let live: Vec<usize> = (0..peers.len())
        .filter(|&i| peers[i].state == State::Live)
        .collect();
    if transport == Transport::Chain && live.iter().any(|&i| peers[i].chain_addr.is_empty()) {
        return Err(CastError::Config(
            "a receiver offered no chain address".into(),
        ));
    }
    for (k, &i) in live.iter().enumerate() {
        let chained = transport == Transport::Chain;
        let (next, next_name) = match live.get(k + 1) {
            Some(&n) if chained => (peers[n].chain_addr.clone(), peers[n].certified.clone()),
            _ => (String::new(), String::new()),
        };
        let prev = match k.checked_sub(1) {
            _ if !chained => String::new(),
            None => me.to_owned(),
            Some(j) => peers[live[j]].certified.clone(),
        };
        let wait = crate::relay::relay_wait(silent, CHAIN_SLACK, live.len(), live.len() - k - 1);
        let p = &mut peers[i];
        let start = frame(v1::cast_frame::Body::Start(v1::CastStart {
            transport: match transport {
                Transport::Multicast => v1::CastTransport::Multicast as i32,
                Transport::Chain => v1::CastTransport::Chain as i32,
            },
            chain_next: next,
            chain_prev: prev,
            chain_next_name: next_name,
            chain_relay_wait_ms: if chained {
                u32::try_from(wait.as_millis()).unwrap_or(u32::MAX)
            } else {
                0
            },
        }));
        if let Err(e) = p.writer.as_mut().expect("writer").send(&start) {
            p.cut(format!("lost before the start: {e}"));
        }
        p.last_heard = Instant::now();
    }
    Ok(())
}

fn frame(body: v1::cast_frame::Body) -> v1::CastFrame {
    v1::CastFrame { body: Some(body) }
}

/// The digest a receiver of `pages` must end with (over the entries of
/// those not withdrawn, in page order) and how many of them were
/// withdrawn. Called once every page has been sent: each is ready then.
fn ended_with(src: &dyn PageSource, pages: &[u32]) -> ([u8; 32], u32) {
    let held: Vec<PageEntry> = pages
        .iter()
        .filter(|&&p| !src.withdrawn(p))
        .map(|&p| src.entry(p))
        .collect();
    (digest(held.iter()), (pages.len() - held.len()) as u32)
}

/// Page `id` as a TCP frame (unicast repair or chain), with its frame and
/// hash: its content, or none where the source withdrew it. Waits until
/// the source has it ready.
fn page_frame(src: &dyn PageSource, id: u32, page: &mut Page) -> io::Result<v1::CastFrame> {
    while src.ready() <= id {
        std::thread::sleep(READY_POLL);
    }
    let e = src.entry(id);
    let withdrawn = src.withdrawn(id);
    if !withdrawn {
        src.read(id, page)?;
    }
    Ok(frame(v1::cast_frame::Body::Page(v1::CastPage {
        page: id,
        data: if withdrawn {
            Default::default()
        } else {
            page.to_vec().into()
        },
        key: e.key,
        hash: e.hash.as_bytes().to_vec().into(),
        withdrawn,
        tags: Default::default(),
    })))
}

fn accept_peer(stream: TcpStream, tls: &Tls) -> Result<(Channel, v1::CastHello), CastError> {
    let mut ch = Channel::server(stream, tls)?;
    pagecast_channel::require(ch.identity(), &[Role::Host], ch.peer(), "receive a cast")?;
    ch.set_read_timeout(Some(pagecast_channel::HANDSHAKE_TIMEOUT))?;
    let f: v1::CastFrame = ch.recv("hello")?;
    let Some(v1::cast_frame::Body::Hello(hello)) = f.body else {
        return Err(CastError::Protocol {
            peer: ch.peer().to_owned(),
            why: "first frame is not a hello".into(),
        });
    };
    if hello.version != CAST_WIRE_VERSION as i32 {
        return Err(CastError::Protocol {
            peer: ch.peer().to_owned(),
            why: format!(
                "cast wire version {} (this build speaks {})",
                hello.version, CAST_WIRE_VERSION as i32
            ),
        });
    }
    ch.set_read_timeout(None)?;
    Ok((ch, hello))
}

fn probe(
    cfg: &SenderConfig,
    groups: &[Group],
    peers: &mut [Peer],
    rx: &mpsc::Receiver<Event>,
    session_id: u64,
    keys: &Keys,
    seq: &mut u64,
) -> Result<Transport, CastError> {
    let mut n = [0u8; 4];
    random_bytes(&mut n)?;
    let nonce = u32::from_be_bytes(n);
    for p in peers.iter_mut().filter(|p| p.state == State::Live) {
        if let Err(e) = p
            .writer
            .as_mut()
            .expect("writer")
            .send(&frame(v1::cast_frame::Body::Probe(v1::CastProbe { nonce })))
        {
            p.cut(format!("lost during the probe: {e}"));
        }
    }
    let sock = socket::sender_socket(cfg.iface, cfg.ttl)
        .map_err(CastError::io(format!("multicast socket on {}", cfg.iface)))?;
    // Receivers already gone count as having heard (they do not vote).
    let mut heard: Vec<Option<bool>> = peers
        .iter()
        .map(|p| (p.state != State::Live).then_some(true))
        .collect();
    let deadline = Instant::now() + PROBE_WAIT;
    let mut next_probe = Instant::now();
    while heard.iter().any(Option::is_none) && Instant::now() < deadline {
        if Instant::now() >= next_probe {
            for (gi, g) in groups.iter().enumerate() {
                let mut b = Vec::new();
                *seq += 1;
                Datagram {
                    session: session_id,
                    seq: *seq,
                    from: 0,
                    body: Body::Probe {
                        group: gi as u32,
                        nonce,
                    },
                }
                .encode(&keys.sealing(gi), &mut b);
                // A send failure means multicast does not work here.
                let _ = socket::send_batch(&sock, &[&b], g.addr);
            }
            next_probe = Instant::now() + Duration::from_millis(100);
        }
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(Event::Probe(i, r)) if r.nonce == nonce => heard[i] = Some(r.heard),
            Ok(Event::Closed(i, why)) => {
                peers[i].state = State::Dropped(why);
                heard[i] = Some(true);
            }
            _ => {}
        }
    }
    Ok(if heard.iter().all(|h| *h == Some(true)) {
        Transport::Multicast
    } else {
        Transport::Chain
    })
}

/// Where a multicast run stands: its sockets, pacing, what was sent of
/// each group, and the repairs receivers asked for.
struct Flow {
    sock: UdpSocket,
    nack_socks: Vec<UdpSocket>,
    bucket: Option<TokenBucket>,
    /// The paced rate lowered while receivers lose datagrams, raised back
    /// when they stop (a paced cast only).
    aimd: Option<Aimd>,
    /// Whether the kernel takes GSO sends (cleared on the first refusal).
    gso: bool,
    replay: HashMap<u32, ReplayWindow>,
    /// Pages to repair and which receivers asked for each.
    repair: BTreeMap<(u32, u32), u64>,
    /// When the oldest request still waiting came in.
    oldest_request: Option<Instant>,
    /// Sequence number of the last datagram of each page's latest repair:
    /// a NACK whose sender had not yet seen that far was sent before the
    /// repair could arrive, and is ignored for that page.
    repaired_at: HashMap<(u32, u32), u64>,
    rb: RecvBatch,
    page: Page,
    /// The group being sent.
    g: usize,
    /// Pages sent of each group.
    next: Vec<u32>,
    last_beat: Instant,
    last_check: Instant,
    /// Pages of all groups, and sent so far.
    total: u64,
    sent_pages: u64,
    /// Withdrawn pages asked for again, `(group, index)`: each is told
    /// withdrawn again with the next batch.
    withdrawn_asked: BTreeSet<(u32, u32)>,
}

impl Flow {
    fn open(cfg: &SenderConfig, groups: &[Group]) -> Result<Flow, CastError> {
        let sock = socket::sender_socket(cfg.iface, cfg.ttl)
            .map_err(CastError::io(format!("multicast socket on {}", cfg.iface)))?;
        let mut by_port: HashMap<u16, Vec<Ipv4Addr>> = HashMap::new();
        for g in groups {
            by_port
                .entry(g.addr.port().wrapping_add(1))
                .or_default()
                .push(*g.addr.ip());
        }
        let mut nack_socks = Vec::new();
        for (port, addrs) in by_port {
            let s = socket::group_socket(port, &addrs, cfg.iface, cfg.ttl)
                .map_err(CastError::io(format!("NACK socket on port {port}")))?;
            s.set_nonblocking(true)
                .map_err(CastError::io("NACK socket"))?;
            nack_socks.push(s);
        }
        Ok(Flow {
            sock,
            nack_socks,
            bucket: cfg
                .rate_bps
                .map(|r| TokenBucket::new(r, PACING_BURST, Instant::now())),
            aimd: cfg
                .rate_bps
                .filter(|_| cfg.loss_control)
                .map(|r| Aimd::new(r, Instant::now())),
            gso: true,
            replay: HashMap::new(),
            repair: BTreeMap::new(),
            oldest_request: None,
            repaired_at: HashMap::new(),
            rb: RecvBatch::default(),
            page: [0u8; PAGE_SIZE],
            g: 0,
            next: vec![0; groups.len()],
            last_beat: Instant::now(),
            last_check: Instant::now(),
            total: groups.iter().map(|g| g.pages.len() as u64).sum(),
            sent_pages: 0,
            withdrawn_asked: BTreeSet::new(),
        })
    }

    /// Repairs to send now: once the oldest request has waited
    /// [`COALESCE`] (or the pool is full). Repairs of one group whose
    /// requesters are disjoint are XORed together (`coding`): each
    /// receiver lacks at most one of them and rebuilds it from the others,
    /// so one datagram repairs several receivers.
    fn ripe_repairs(&mut self, coding: bool) -> Vec<Vec<(u32, u32)>> {
        let mut pool: Vec<((u32, u32), u64)> = Vec::new();
        let ripe = self.oldest_request.is_some_and(|t| t.elapsed() >= COALESCE)
            || self.repair.len() >= REPAIR_POOL;
        while ripe && pool.len() < REPAIR_POOL {
            let Some(r) = self.repair.pop_first() else {
                break;
            };
            pool.push(r);
        }
        let (units, rest) = repair_units(pool, coding, PAGES_PER_BATCH);
        for (p, m) in rest {
            *self.repair.entry(p).or_default() |= m;
        }
        if self.repair.is_empty() {
            self.oldest_request = None;
        } else if ripe {
            // What is left has waited as long as what went out.
            self.oldest_request = Some(Instant::now() - COALESCE);
        }
        units
    }
}

/// One batch's datagrams: repairs and new pages by group, and their bytes.
#[derive(Default)]
struct Outgoing {
    repairs: Vec<(usize, Vec<u8>)>,
    pages: Vec<(usize, Vec<u8>)>,
    bytes: usize,
}

struct Run<'a> {
    cfg: &'a SenderConfig,
    groups: &'a [Group],
    src: &'a dyn PageSource,
    peers: &'a mut Vec<Peer>,
    rx: &'a mpsc::Receiver<Event>,
    session_id: u64,
    keys: &'a Keys,
    frag: usize,
    pack: usize,
    window: u32,
    seq: u64,
    report: SendReport,
    started: Instant,
    progress: &'a (dyn Fn(u64, u64) + Sync),
    /// Receivers being sent pages over TCP at once ([`Taking`]).
    sharing: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// The slowest a receiver may take what it is sent, in bytes per second
/// of the time the sends to it waited: one that reads a frame now and then,
/// each within a frame's write limit, would otherwise hold its unicast
/// repair, or the chain's feed through it, for as long as it likes.
const MIN_TAKE_RATE: f64 = (1u64 << 20) as f64;

/// How much more waiting the chain's feed is judged over than a silence
/// limit: its first receiver's link connects to the next receiver (up to
/// 10 s) and shakes hands (up to 5 s) before it reads a page, and its
/// relay to a next receiver that froze fails only at the 10 s write limit;
/// neither is the first receiver being slow, so the feed does not name it.
/// (The first receiver itself gives its link up when no page comes for
/// half its silence limit, which either can cause: see
/// `docs/transport.md`.)
const CHAIN_SLACK: Duration = Duration::from_secs(15);

/// What a receiver took of what it was sent, timed only while the sends
/// to it ran (so a source that reads slowly is not counted against it),
/// judged in windows of a silence limit of waiting each.
struct Taking {
    waited: Duration,
    bytes: u64,
    /// How many receivers are being sent pages over TCP at once (repairs
    /// and the chain's feed): they share the sender's uplink, and so the
    /// floor (`None`: the floor is not shared).
    sharing: Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
}

impl Taking {
    fn new(sharing: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Self {
        Taking {
            waited: Duration::ZERO,
            bytes: 0,
            sharing: Some(sharing),
        }
    }

    /// Held to the whole [`MIN_TAKE_RATE`].
    fn alone() -> Self {
        Taking {
            waited: Duration::ZERO,
            bytes: 0,
            sharing: None,
        }
    }

    /// Counts a send that wrote `bytes` and took `waited`.
    fn count(&mut self, waited: Duration, bytes: u64) {
        self.waited += waited;
        self.bytes += bytes;
    }

    /// Runs `send`, which returns its result and the bytes it wrote, and
    /// counts how long it took.
    fn send<T>(&mut self, send: impl FnOnce() -> (T, u64)) -> T {
        let t = Instant::now();
        let (r, bytes) = send();
        self.waited += t.elapsed();
        self.bytes += bytes;
        r
    }

    /// [`MIN_TAKE_RATE`], shared among the receivers sent pages at once.
    fn floor(&self) -> f64 {
        let n = self
            .sharing
            .as_ref()
            .map_or(1, |s| s.load(std::sync::atomic::Ordering::Relaxed));
        MIN_TAKE_RATE / n.max(1) as f64
    }

    /// Why the receiver is too slow to wait for: the sends to it waited
    /// `over` since the last window, and it took less than the floor over
    /// them. Each window is judged on its own, so bytes taken fast at
    /// first (or into the socket buffers) earn no time to trickle the rest.
    fn too_slow(&mut self, over: Duration) -> Option<String> {
        if self.waited < over {
            return None;
        }
        let (rate, floor) = (self.bytes as f64 / self.waited.as_secs_f64(), self.floor());
        let verdict = (rate < floor).then(|| {
            format!(
                "took {:.0} KiB/s while the sends to it waited {:.1?} (at least {:.0} KiB/s is asked)",
                rate / 1024.0,
                self.waited,
                floor / 1024.0
            )
        });
        (self.waited, self.bytes) = (Duration::ZERO, 0);
        verdict
    }
}

/// One more receiver sent pages over TCP for as long as it lives.
struct Sharing(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Sharing {
    fn join(n: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Sharing(n.clone())
    }
}

impl Drop for Sharing {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How a receiver's unicast repair ended.
#[derive(Default)]
struct Repaired {
    /// Its control connection, for the goodbye (none once it failed).
    writer: Option<ChannelWriter>,
    /// Pages sent.
    pages: u64,
    /// Bytes sent.
    bytes: u64,
    /// Why it was given up.
    failed: Option<String>,
}

type UnicastJoin<'s> = std::thread::ScopedJoinHandle<'s, Repaired>;

impl<'a> Run<'a> {
    /// Handles receiver events; returns false once no receiver is live.
    fn events(&mut self, wait: Duration) {
        let mut first = true;
        loop {
            let ev = if first && !wait.is_zero() {
                self.rx.recv_timeout(wait).ok()
            } else {
                self.rx.try_recv().ok()
            };
            first = false;
            let Some(ev) = ev else { return };
            match ev {
                Event::Progress(i, p) => {
                    let peer = &mut self.peers[i];
                    peer.last_heard = Instant::now();
                    if peer.chain_refused.is_none() && !p.chain_refused.is_empty() {
                        // Its words, bounded: they go into the report.
                        peer.chain_refused = Some(printable(&p.chain_refused));
                    }
                    if !peer.next_lost_seen && !p.chain_next_lost.is_empty() {
                        peer.next_lost_seen = true;
                        peer.chain_next_lost = Some(printable(&p.chain_next_lost));
                    }
                    let g = (p.group as usize).min(self.groups.len());
                    for earlier in 0..g {
                        peer.contiguous[earlier] = self.groups[earlier].pages.len() as u32;
                    }
                    if g < self.groups.len() {
                        let c = p.contiguous.min(self.groups[g].pages.len() as u32);
                        peer.contiguous[g] = peer.contiguous[g].max(c);
                    }
                }
                Event::Done(i, d) => {
                    let peer = &mut self.peers[i];
                    let (digest, withdrawn) = ended_with(self.src, &peer.pages);
                    let ok = d.digest.as_ref() == digest
                        && d.pages as usize == peer.pages.len()
                        && d.withdrawn == withdrawn;
                    peer.counters = ReceiverCounters {
                        forged: d.forged,
                        replayed: d.replayed,
                        stale: d.stale,
                        bad_hash: d.bad_hash,
                        duplicates: d.duplicates,
                        nacks_sent: d.nacks_sent,
                        nacks_suppressed: d.nacks_suppressed,
                        undecodable: d.undecodable,
                    };
                    let unicast = match &peer.state {
                        State::Unicast(r) => Some(r.clone()),
                        _ => None,
                    };
                    if !matches!(peer.state, State::Dropped(_)) {
                        peer.state = State::Done {
                            at: Instant::now(),
                            ok,
                            unicast,
                        };
                    }
                    for g in 0..self.groups.len() {
                        peer.contiguous[g] = self.groups[g].pages.len() as u32;
                    }
                }
                Event::Probe(..) | Event::Ready(_) => {}
                Event::Closed(i, why) => {
                    let peer = &mut self.peers[i];
                    if matches!(peer.state, State::Live | State::Unicast(_)) {
                        peer.state = State::Dropped(format!("connection lost: {why}"));
                        counter!(crate::metrics::RECEIVERS_DROPPED).increment(1);
                    }
                }
            }
        }
    }

    fn silent_check(&mut self) {
        let now = Instant::now();
        let limit = self.cfg.silent_after;
        for p in self.peers.iter_mut() {
            if matches!(p.state, State::Live | State::Unicast(_))
                && now.duration_since(p.last_heard) > limit
            {
                p.cut(format!("silent for {limit:?}"));
            }
        }
        self.stalled_repairs();
    }

    /// Gives up each repair with a send that waited a silence limit while
    /// the receiver's kernel acknowledged nothing: it took nothing over
    /// that window, under any floor, and is given up now, not when that
    /// send fails at its write limit. (A slow receiver still acknowledges
    /// bytes; its pace is the guard's to judge.)
    fn stalled_repairs(&mut self) {
        let (now, limit) = (Instant::now(), self.cfg.silent_after);
        for p in self.peers.iter_mut() {
            if matches!(p.state, State::Unicast(_)) && p.repair_unmoved_for(now) > limit {
                p.cut(format!(
                    "unicast repair given up: took nothing for {limit:?} (one send waited that long)"
                ));
            }
        }
    }

    /// Drops every receiver that has had every page it needs for the
    /// silence limit and still has not said it is done (its Done verifies
    /// what it holds, so an honest one says it within moments): one that
    /// stays otherwise alive, its progress reports coming, would hold the
    /// session open until the job's deadline. A receiver owes its Done once
    /// its unicast repair was sent (a finished thread in `unicast`), or,
    /// over multicast, once it reported the last group held (marked by the
    /// caller).
    fn done_check(&mut self, unicast: &[(usize, UnicastJoin<'_>)]) {
        let now = Instant::now();
        for (i, j) in unicast {
            if j.is_finished() {
                self.peers[*i].owes_done_since.get_or_insert(now);
            }
        }
        for p in self.peers.iter_mut() {
            if matches!(p.state, State::Live | State::Unicast(_))
                && p.owes_done_since
                    .is_some_and(|t| now.duration_since(t) > self.cfg.silent_after)
            {
                p.cut(format!(
                    "had every page for {:?} and did not say it was done",
                    self.cfg.silent_after
                ));
            }
        }
    }

    fn all_finished(&self) -> bool {
        self.peers
            .iter()
            .all(|p| matches!(p.state, State::Done { .. } | State::Dropped(_)))
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Encodes `count` consecutive pages of group `g` from index `idx` as
    /// one datagram (whole pages), or page `idx` as its fragments (where a
    /// page exceeds the MTU; `count` is then 1), appended to `out`; returns
    /// the bytes encoded.
    fn page_datagrams(
        &mut self,
        g: usize,
        idx: u32,
        count: usize,
        out: &mut Vec<Vec<u8>>,
        page: &mut Page,
    ) -> Result<usize, CastError> {
        let mut entries = Vec::with_capacity(count);
        let whole = self.frag == PAGE_SIZE;
        let mut payload: Vec<u8> = Vec::with_capacity(if whole { count * PAGE_SIZE } else { 0 });
        for i in 0..count as u32 {
            let id = self.groups[g].pages[(idx + i) as usize];
            self.src
                .read(id, page)
                .map_err(|source| CastError::Source { page: id, source })?;
            let e = self.src.entry(id);
            entries.push((e.key, check_of(&e.hash)));
            if whole {
                payload.extend_from_slice(&page[..]);
            }
        }
        let mut bytes = 0;
        if whole {
            let mut b = Vec::with_capacity(payload.len() + 128);
            let seq = self.next_seq();
            Datagram {
                session: self.session_id,
                seq,
                from: 0,
                body: Body::Data {
                    group: g as u32,
                    index: idx,
                    fragment: 0,
                    fragments: 1,
                    pages: entries,
                    payload: &payload,
                },
            }
            .encode(&self.keys.sealing(g), &mut b);
            bytes += b.len();
            out.push(b);
            return Ok(bytes);
        }
        debug_assert_eq!(count, 1, "fragmented pages travel one at a time");
        let frags = PAGE_SIZE.div_ceil(self.frag);
        let mut padded = [0u8; PAGE_SIZE];
        for f in 0..frags {
            let at = f * self.frag;
            let piece: &[u8] = if at + self.frag <= PAGE_SIZE {
                &page[at..at + self.frag]
            } else {
                let n = PAGE_SIZE - at;
                padded[..n].copy_from_slice(&page[at..]);
                padded[n..self.frag].fill(0);
                &padded[..self.frag]
            };
            let mut b = Vec::with_capacity(piece.len() + 96);
            let seq = self.next_seq();
            Datagram {
                session: self.session_id,
                seq,
                from: 0,
                body: Body::Data {
                    group: g as u32,
                    index: idx,
                    fragment: f as u8,
                    fragments: frags as u8,
                    pages: entries.clone(),
                    payload: piece,
                },
            }
            .encode(&self.keys.sealing(g), &mut b);
            bytes += b.len();
            out.push(b);
        }
        Ok(bytes)
    }

    /// Encodes the XOR of the pages `unit` (indices of group `g`) as one
    /// coded repair appended to `out`; returns its size.
    fn coded_datagram(
        &mut self,
        g: usize,
        unit: &[(u32, u32)],
        out: &mut Vec<Vec<u8>>,
        page: &mut Page,
    ) -> Result<usize, CastError> {
        let mut xor = [0u8; PAGE_SIZE];
        let mut pages = Vec::with_capacity(unit.len());
        for &(_, idx) in unit {
            let id = self.groups[g].pages[idx as usize];
            self.src
                .read(id, page)
                .map_err(|source| CastError::Source { page: id, source })?;
            for (x, b) in xor.iter_mut().zip(page.iter()) {
                *x ^= b;
            }
            let e = self.src.entry(id);
            pages.push((idx, e.key, check_of(&e.hash)));
        }
        let seq = self.next_seq();
        let mut b = Vec::with_capacity(PAGE_SIZE + 64 + 44 * unit.len());
        Datagram {
            session: self.session_id,
            seq,
            from: 0,
            body: Body::Coded {
                group: g as u32,
                pages,
                payload: &xor,
            },
        }
        .encode(&self.keys.sealing(g), &mut b);
        let n = b.len();
        out.push(b);
        Ok(n)
    }

    fn heartbeat(&mut self, sock: &UdpSocket, g: usize, sent: u32) -> Result<(), CastError> {
        let len = self.groups[g].pages.len() as u32;
        let mut b = Vec::new();
        let seq = self.next_seq();
        Datagram {
            session: self.session_id,
            seq,
            from: 0,
            body: Body::Heartbeat {
                group: g as u32,
                sent_through: sent,
                group_len: len,
                done: sent == len,
            },
        }
        .encode(&self.keys.sealing(g), &mut b);
        self.report.bytes_heartbeat += b.len() as u64;
        socket::send_batch(sock, &[&b], self.groups[g].addr)
            .map_err(CastError::io("sending a heartbeat"))
    }

    /// Moves receiver `i` to unicast repair: a thread sends it, over its
    /// control connection, every page of its groups from `g` on that it may
    /// lack, and ends once the receiver has acknowledged them (or closes
    /// the connection if it stops taking them).
    fn demote<'s>(
        &mut self,
        scope: &'s std::thread::Scope<'s, '_>,
        i: usize,
        g: usize,
        why: String,
    ) -> Option<UnicastJoin<'s>>
    where
        'a: 's,
    {
        let peer = &mut self.peers[i];
        let mut w = peer.writer.take()?;
        peer.closer = w.closer().ok();
        let sending = Sending::default();
        peer.sending = Some(sending.clone());
        peer.state = State::Unicast(why);
        counter!(crate::metrics::UNICAST_RECEIVERS).increment(1);
        let mut pages: Vec<u32> = Vec::new();
        for &pg in &peer.groups {
            if pg < g {
                continue;
            }
            let from = if pg == g {
                peer.contiguous[pg] as usize
            } else {
                0
            };
            pages.extend(self.groups[pg].pages[from..].iter().copied());
        }
        let (src, slow_over) = (self.src, self.cfg.silent_after);
        let sharing = Sharing::join(&self.sharing);
        Some(scope.spawn(move || {
            let mut page = [0u8; PAGE_SIZE];
            let before = w.sent_bytes();
            let mut sent = 0u64;
            let mut taking = Taking::new(sharing.0.clone());
            let failed = |w: ChannelWriter, pages, why| {
                // A frame cut short leaves the stream unusable: closed,
                // so the receiver's reader ends and it is dropped.
                w.shutdown();
                Repaired {
                    bytes: w.sent_bytes() - before,
                    pages,
                    failed: Some(why),
                    writer: None,
                }
            };
            for id in pages {
                let why = match page_frame(src, id, &mut page) {
                    Err(e) => Some(format!("page {id} could not be read: {e}")),
                    Ok(f) => match taking.send(|| {
                        let b = w.sent_bytes();
                        let r = sending.during(|| w.send(&f));
                        (r, w.sent_bytes() - b)
                    }) {
                        Err(e) => Some(e.to_string()),
                        Ok(()) => taking.too_slow(slow_over),
                    },
                };
                if let Some(why) = why {
                    return failed(w, sent, why);
                }
                sent += 1;
            }
            // Done once the receiver has the pages, not once they left for
            // the socket buffers: its Done is owed from here
            // (`Run::done_check`). The wait allows the write limit plus
            // what the buffers hold at the floor.
            let left = w.unacked_bytes().unwrap_or(0) as f64 / taking.floor();
            let within =
                pagecast_channel::WRITE_TIMEOUT + Duration::from_secs_f64(left.min(3600.0));
            let drained = w.drain(within);
            drop(sharing);
            if let Err(e) = drained {
                return failed(w, sent, e.to_string());
            }
            Repaired {
                bytes: w.sent_bytes() - before,
                pages: sent,
                failed: None,
                writer: Some(w),
            }
        }))
    }

    fn multicast<'s>(
        &mut self,
        scope: &'s std::thread::Scope<'s, '_>,
        _tls: &Tls,
    ) -> Result<Vec<(usize, UnicastJoin<'s>)>, CastError>
    where
        'a: 's,
    {
        let mut f = Flow::open(self.cfg, self.groups)?;
        let mut unicast: Vec<(usize, UnicastJoin<'s>)> = Vec::new();
        self.started = Instant::now();
        loop {
            self.events(Duration::ZERO);
            self.hear_nacks(&mut f)?;
            if f.last_check.elapsed() > Duration::from_millis(20) {
                f.last_check = Instant::now();
                self.silent_check();
                if f.g == self.groups.len() {
                    // Every live receiver reported every group held.
                    for p in self.peers.iter_mut() {
                        if p.state == State::Live {
                            p.owes_done_since.get_or_insert(f.last_check);
                        }
                    }
                }
                self.done_check(&unicast);
                // Receivers holding the window back for too long go unicast.
                for m in self.slow_receivers(&f) {
                    let why = format!("held the window back for over {:?}", self.cfg.slow_after);
                    if let Some(j) = self.demote(scope, m, f.g, why) {
                        unicast.push((m, j));
                    }
                }
            }
            self.advance(&mut f);
            if f.g == self.groups.len() && self.all_finished() {
                break;
            }
            if self
                .peers
                .iter()
                .all(|p| matches!(p.state, State::Dropped(_)))
            {
                break;
            }
            let units = f.ripe_repairs(self.frag == PAGE_SIZE);
            let again = std::mem::take(&mut f.withdrawn_asked);
            let batch = self.new_pages(&mut f);
            if batch.is_empty() && units.is_empty() && again.is_empty() {
                if f.g < self.groups.len() && f.last_beat.elapsed() >= HEARTBEAT_EVERY {
                    self.heartbeat(&f.sock, f.g, f.next[f.g])?;
                    f.last_beat = Instant::now();
                }
                let unread = self.unread(&f);
                let t = Instant::now();
                self.events(Duration::from_millis(1));
                let waited = t.elapsed().as_secs_f64();
                self.report.waited_s += waited;
                if unread {
                    self.report.unread_s += waited;
                }
                continue;
            }
            let out = self.encode(&mut f, &units, &again, &batch)?;
            self.send_out(&mut f, out)?;
            (self.progress)(f.sent_pages, f.total);
            if f.last_beat.elapsed() >= HEARTBEAT_EVERY && f.g < self.groups.len() {
                self.heartbeat(&f.sock, f.g, f.next[f.g])?;
                f.last_beat = Instant::now();
            }
        }
        Ok(unicast)
    }

    /// Takes in the NACKs receivers multicast on the groups' NACK ports:
    /// each page asked for (sent already, and not repaired since the
    /// asker's `seen_through`) joins the repairs with the asker's bit.
    fn hear_nacks(&mut self, f: &mut Flow) -> Result<(), CastError> {
        for s in &f.nack_socks {
            loop {
                let n = socket::recv_batch(s, &mut f.rb).map_err(CastError::io("reading NACKs"))?;
                if n == 0 {
                    break;
                }
                for k in 0..n {
                    let Some(buf) = f.rb.get_mut(k) else { continue };
                    // Opened under the NACK's group key and checked as
                    // its member's: a member cannot ask in another's name.
                    let (keys, groups) = (self.keys, self.groups);
                    let Ok(d) = decode(buf, self.session_id, |g, from| {
                        keys.nack_opening(groups, g, from)
                    }) else {
                        continue;
                    };
                    if d.from == 0
                        || f.replay.entry(d.from).or_default().check(d.seq) != Replay::Fresh
                    {
                        continue;
                    }
                    let Body::Nack {
                        group,
                        seen_through,
                        ranges,
                    } = d.body
                    else {
                        continue;
                    };
                    let Some(grp) = self.groups.get(group as usize) else {
                        continue;
                    };
                    self.report.nacks += 1;
                    counter!(crate::metrics::NACKS).increment(1);
                    let sent = f.next[group as usize];
                    let mut lost = 0;
                    for (a, c) in ranges {
                        for idx in a..a.saturating_add(c).min(sent).min(grp.pages.len() as u32) {
                            if self.src.withdrawn(grp.pages[idx as usize]) {
                                // Told again, never coded with pages.
                                f.withdrawn_asked.insert((group, idx));
                            } else if f
                                .repaired_at
                                .get(&(group, idx))
                                .is_none_or(|&r| r <= seen_through)
                            {
                                let asked = f.repair.entry((group, idx)).or_default();
                                if *asked == 0 {
                                    lost += 1;
                                }
                                *asked |= requester(d.from);
                                f.oldest_request.get_or_insert_with(Instant::now);
                            }
                        }
                    }
                    if let Some(a) = f.aimd.as_mut() {
                        a.lost(lost);
                    }
                }
            }
        }
        Ok(())
    }

    /// The live receivers of the current group that have held the window
    /// back for longer than the config allows.
    fn slow_receivers(&mut self, f: &Flow) -> Vec<usize> {
        let g = f.g;
        if g >= self.groups.len() {
            return Vec::new();
        }
        let now = Instant::now();
        let mut slow = Vec::new();
        for &m in &self.groups[g].members {
            let p = &mut self.peers[m];
            if p.state != State::Live {
                continue;
            }
            let lag = f.next[g].saturating_sub(p.contiguous[g]);
            gauge!(crate::metrics::RECEIVER_LAG, "receiver" => p.name.clone()).set(f64::from(lag));
            if lag >= self.window {
                let since = *p.lagging_since.get_or_insert(now);
                if now.duration_since(since) > self.cfg.slow_after {
                    slow.push(m);
                }
            } else {
                p.lagging_since = None;
            }
        }
        slow
    }

    /// Moves past groups that are sent and that every live member holds.
    fn advance(&self, f: &mut Flow) {
        while f.g < self.groups.len() {
            let g = f.g;
            let len = self.groups[g].pages.len() as u32;
            let all = self.groups[g]
                .members
                .iter()
                .all(|&m| self.peers[m].state != State::Live || self.peers[m].contiguous[g] >= len);
            if f.next[g] == len && all {
                f.g += 1;
            } else {
                break;
            }
        }
    }

    /// New pages of the current group within the window (at most a batch).
    fn new_pages(&self, f: &mut Flow) -> Vec<(usize, u32)> {
        let mut batch: Vec<(usize, u32)> = Vec::new();
        let g = f.g;
        if g >= self.groups.len() {
            return batch;
        }
        let len = self.groups[g].pages.len() as u32;
        let base = self.groups[g]
            .members
            .iter()
            .filter(|&&m| self.peers[m].state == State::Live)
            .map(|&m| self.peers[m].contiguous[g])
            .min()
            .unwrap_or(len);
        let end = len.min(base.saturating_add(self.window));
        let ready = self.src.ready();
        while batch.len() < PAGES_PER_BATCH
            && f.next[g] < end
            && self.groups[g].pages[f.next[g] as usize] < ready
        {
            batch.push((g, f.next[g]));
            f.next[g] += 1;
        }
        batch
    }

    /// Whether the next page of the group being sent is not ready yet (the
    /// source is still reading it; the window may be full as well).
    fn unread(&self, f: &Flow) -> bool {
        let g = f.g;
        g < self.groups.len()
            && self.groups[g]
                .pages
                .get(f.next[g] as usize)
                .is_some_and(|&p| p >= self.src.ready())
    }

    /// Tells group `g` that `count` pages from `idx` are withdrawn, as a
    /// datagram appended to `out`; returns its size.
    fn withdrawn_datagram(
        &mut self,
        g: usize,
        idx: u32,
        count: u32,
        out: &mut Vec<Vec<u8>>,
    ) -> usize {
        let seq = self.next_seq();
        let mut b = Vec::with_capacity(96);
        Datagram {
            session: self.session_id,
            seq,
            from: 0,
            body: Body::Withdrawn {
                group: g as u32,
                index: idx,
                count,
            },
        }
        .encode(&self.keys.sealing(g), &mut b);
        let n = b.len();
        out.push(b);
        n
    }

    /// Whether page `idx` of group `g` was withdrawn by the source.
    fn withdrawn(&self, g: usize, idx: u32) -> bool {
        self.src.withdrawn(self.groups[g].pages[idx as usize])
    }

    /// Repair units, withdrawn pages asked for again, then new pages as
    /// datagrams (consecutive pages of a group share a datagram where it
    /// fits; a run of withdrawn ones is told in one).
    fn encode(
        &mut self,
        f: &mut Flow,
        units: &[Vec<(u32, u32)>],
        again: &BTreeSet<(u32, u32)>,
        batch: &[(usize, u32)],
    ) -> Result<Outgoing, CastError> {
        let mut out = Outgoing::default();
        for &(g, idx) in again {
            let mut dgs = Vec::new();
            let bytes = self.withdrawn_datagram(g as usize, idx, 1, &mut dgs);
            out.bytes += bytes;
            self.report.bytes_repair += bytes as u64;
            out.repairs.extend(dgs.into_iter().map(|d| (g as usize, d)));
        }
        for unit in units {
            let rg = unit[0].0 as usize;
            let mut dgs = Vec::new();
            let bytes = if unit.len() == 1 {
                self.page_datagrams(rg, unit[0].1, 1, &mut dgs, &mut f.page)?
            } else {
                self.report.coded_repairs += 1;
                self.coded_datagram(rg, unit, &mut dgs, &mut f.page)?
            };
            for &(ug, ui) in unit {
                f.repaired_at.insert((ug, ui), self.seq);
            }
            out.bytes += bytes;
            self.report.bytes_repair += bytes as u64;
            self.report.repairs += unit.len() as u64;
            counter!(crate::metrics::REPAIRS).increment(unit.len() as u64);
            out.repairs.extend(dgs.into_iter().map(|d| (rg, d)));
        }
        let mut k = 0;
        while k < batch.len() {
            let (bg, idx) = batch[k];
            let withdrawn = self.withdrawn(bg, idx);
            // A run: of withdrawn pages (told in one datagram), or of pages
            // a datagram carries together.
            let most = if withdrawn { batch.len() } else { self.pack };
            let mut n = 1;
            while n < most
                && k + n < batch.len()
                && batch[k + n] == (bg, idx + n as u32)
                && self.withdrawn(bg, idx + n as u32) == withdrawn
            {
                n += 1;
            }
            let mut dgs = Vec::new();
            let bytes = if withdrawn {
                self.report.withdrawn += n as u32;
                self.withdrawn_datagram(bg, idx, n as u32, &mut dgs)
            } else {
                self.page_datagrams(bg, idx, n, &mut dgs, &mut f.page)?
            };
            out.bytes += bytes;
            self.report.bytes_first += bytes as u64;
            f.sent_pages += n as u64;
            if let Some(a) = f.aimd.as_mut() {
                a.sent(n as u64);
            }
            out.pages.extend(dgs.into_iter().map(|d| (bg, d)));
            k += n;
        }
        Ok(out)
    }

    /// Paces, then sends repairs one by one and pages in runs per group
    /// address (one GSO send per run where the kernel allows).
    fn send_out(&mut self, f: &mut Flow, out: Outgoing) -> Result<(), CastError> {
        if let (Some(a), Some(b)) = (f.aimd.as_mut(), f.bucket.as_mut()) {
            if let Some(r) = a.tick(Instant::now()) {
                b.set_rate(r);
            }
            self.report.rate_cuts = a.cuts();
            self.report.lowest_rate_bps = a.lowest() as u64;
        }
        if let Some(b) = f.bucket.as_mut() {
            let t = Instant::now();
            loop {
                let d = b.delay(out.bytes, Instant::now());
                if d.is_zero() {
                    break;
                }
                std::thread::sleep(d);
            }
            self.report.paced_s += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        for (rg, d) in &out.repairs {
            socket::send_batch(&f.sock, &[d], self.groups[*rg].addr)
                .map_err(CastError::io("sending repairs"))?;
        }
        let dgs = &out.pages;
        let mut start = 0;
        while start < dgs.len() {
            let grp = dgs[start].0;
            let end = dgs[start..]
                .iter()
                .position(|d| d.0 != grp)
                .map_or(dgs.len(), |p| start + p);
            let refs: Vec<&[u8]> = dgs[start..end].iter().map(|d| d.1.as_slice()).collect();
            socket::send_segments(&f.sock, &refs, self.groups[grp].addr, &mut f.gso)
                .map_err(CastError::io("sending pages"))?;
            start = end;
        }
        self.report.socket_s += t.elapsed().as_secs_f64();
        counter!(crate::metrics::BYTES_SENT).increment(out.bytes as u64);
        Ok(())
    }

    /// The chain's first link: receiver `head`, by its certificate.
    fn first_link(&self, head: usize, tls: &Tls) -> Result<Channel, String> {
        let first = &self.peers[head].chain_addr;
        let stream = crate::session::connect(first)
            .map_err(|e| format!("connecting the chain to {first}: {e}"))?;
        let link = Channel::client(stream, tls).map_err(|e| e.to_string())?;
        pagecast_channel::require(link.identity(), &[Role::Host], link.peer(), "relay a cast")
            .map_err(|e| e.to_string())?;
        if link.identity().name != self.peers[head].certified {
            return Err(format!(
                "the chain's first link at {first} is {}, not this receiver",
                link.identity()
            ));
        }
        Ok(link)
    }

    /// Every page down the chain through `link` (receiver `head`), until
    /// the end or the link fails (then `head` takes the rest by unicast,
    /// and is dropped if its control connection is gone too). Receivers
    /// that give their links up meanwhile are sent theirs by unicast at
    /// once, not after the feed.
    fn feed_chain<'s>(
        &mut self,
        (link, head): (&mut Channel, usize),
        scope: &'s std::thread::Scope<'s, '_>,
        unicast: &mut Vec<(usize, UnicastJoin<'s>)>,
    ) -> Result<(), CastError>
    where
        'a: 's,
    {
        let mut page = [0u8; PAGE_SIZE];
        let total = self.src.pages();
        self.started = Instant::now();
        let mut looked = Instant::now();
        let _feeding = Sharing::join(&self.sharing);
        let mut taking = Taking::new(self.sharing.clone());
        for i in 0..total {
            if matches!(self.peers[head].state, State::Dropped(_)) {
                // The first receiver was dropped meanwhile (it stopped
                // reading its control connection, say): it passes nothing
                // on, so its link is not written to again, and those after
                // it take the rest by unicast.
                let why = format!("chain broken at receiver {} (dropped)", self.peers[head].id);
                self.demote_from(scope, head + 1, &why, unicast);
                break;
            }
            let mut f = page_frame(self.src, i, &mut page)
                .map_err(|source| CastError::Source { page: i, source })?;
            if let Some(v1::cast_frame::Body::Page(p)) = &mut f.body
                && !p.withdrawn
            {
                p.tags = self.chain_tags(p).into();
            }
            if self.src.withdrawn(i) {
                // Told by the sender itself, over each receiver's control
                // connection: receivers take no withdrawal a chain link
                // passes on, so a receiver up the chain cannot settle
                // pages for those after it.
                self.report.withdrawn += 1;
                self.tell_live(&f);
                (self.progress)(i as u64 + 1, total as u64);
                self.look_around(&mut looked, i, scope, unicast);
                continue;
            }
            let sent = taking.send(|| {
                let b = link.sent_bytes();
                let r = link.send(&f);
                (r, link.sent_bytes() - b)
            });
            if let Err(e) = sent {
                // The first receiver is gone, or gave its link up: the
                // rest go to it by unicast (and to those after it, as
                // their links close and they give them up).
                if self.peers[head].state == State::Live
                    && let Some(j) = self.demote(scope, head, 0, format!("chain link lost: {e}"))
                {
                    unicast.push((head, j));
                }
                break;
            }
            let over = self.cfg.silent_after + CHAIN_SLACK;
            if let Some(why) = taking.too_slow(over) {
                // A first receiver that takes the chain's pages too slowly
                // holds every receiver: all take the rest by unicast (the
                // slow one's repair is held to the same pace).
                let why = format!("the chain's first receiver {why}");
                self.demote_from(scope, head, &why, unicast);
                break;
            }
            let tags = match &f.body {
                Some(v1::cast_frame::Body::Page(p)) => p.tags.len() as u64,
                _ => 0,
            };
            self.report.bytes_first += PAGE_SIZE as u64 + 32 + tags;
            (self.progress)(i as u64 + 1, total as u64);
            self.look_around(&mut looked, i, scope, unicast);
        }
        Ok(())
    }

    /// Between the feed's pages (page `i` just sent or told), every 256
    /// pages or 100 ms since it last `looked`: takes the receivers'
    /// reports, moves those that gave their links up to unicast, and gives
    /// up repairs that stalled.
    fn look_around<'s>(
        &mut self,
        looked: &mut Instant,
        i: u32,
        scope: &'s std::thread::Scope<'s, '_>,
        unicast: &mut Vec<(usize, UnicastJoin<'s>)>,
    ) where
        'a: 's,
    {
        if i.is_multiple_of(256) || looked.elapsed() >= Duration::from_millis(100) {
            *looked = Instant::now();
            self.events(Duration::ZERO);
            self.demote_refused(scope, unicast);
            self.stalled_repairs();
        }
    }

    /// A receiver that gave its chain link up (a page that did not check,
    /// or a predecessor that failed or passed nothing of ours on): it and
    /// every live receiver after it take the rest by unicast; one that gave
    /// up its next receiver: every live receiver after it.
    fn demote_refused<'s>(
        &mut self,
        scope: &'s std::thread::Scope<'s, '_>,
        unicast: &mut Vec<(usize, UnicastJoin<'s>)>,
    ) where
        'a: 's,
    {
        let refused = self
            .peers
            .iter()
            .position(|p| p.chain_refused.is_some() && p.state == State::Live);
        if let Some(r) = refused {
            let why = format!(
                "receiver {} gave up its chain link: {}",
                self.peers[r].id,
                self.peers[r].chain_refused.as_deref().unwrap_or_default()
            );
            self.demote_from(scope, r, &why, unicast);
        }
        // A receiver that gave up the next one: those after it take the
        // rest by unicast (a frozen next receiver passes nothing on, and a
        // trickling one keeps those after it waiting at its pace).
        let lost = self.peers.iter().position(|p| p.chain_next_lost.is_some());
        if let Some(r) = lost {
            let lost = self.peers[r].chain_next_lost.take().unwrap_or_default();
            let why = format!(
                "receiver {} gave up passing pages to the next receiver: {lost}",
                self.peers[r].id
            );
            self.demote_from(scope, r + 1, &why, unicast);
        }
    }

    /// Moves every live receiver from `from` on down the chain to unicast
    /// repair of all its pages, for `why`.
    fn demote_from<'s>(
        &mut self,
        scope: &'s std::thread::Scope<'s, '_>,
        from: usize,
        why: &str,
        unicast: &mut Vec<(usize, UnicastJoin<'s>)>,
    ) where
        'a: 's,
    {
        for i in from..self.peers.len() {
            if self.peers[i].state == State::Live
                && let Some(j) = self.demote(scope, i, 0, why.to_owned())
            {
                unicast.push((i, j));
            }
        }
    }

    /// The tags chain page `p` carries: one per receiver, in receiver-id
    /// order, under its own key.
    fn chain_tags(&self, p: &v1::CastPage) -> Vec<u8> {
        let hash = self.src.entry(p.page).hash;
        (0..self.peers.len())
            .flat_map(|i| {
                crate::wire::chain_tag(&self.keys.members[i], self.session_id, p.page, p.key, &hash)
            })
            .collect()
    }

    /// Sends `f` over every live receiver's control connection. One whose
    /// kernel takes less than [`MIN_TAKE_RATE`] over a [`TELL_STALL`] of
    /// waiting, in this send or across the words told before (it stopped
    /// reading, or reads slowly, and its buffers are full), is dropped and
    /// its connection closed: it holds up the others (and the chain's
    /// feed) for about that long.
    fn tell_live(&mut self, f: &v1::CastFrame) {
        let least = MIN_TAKE_RATE as usize;
        for p in self.peers.iter_mut().filter(|p| p.state == State::Live) {
            let Some(w) = p.writer.as_mut() else {
                continue;
            };
            let (t, acked) = (Instant::now(), w.acked_while_waiting());
            let sent = w.send_unless_slow(f, TELL_STALL, least);
            // Only sends that waited are judged across words, by what the
            // receiver's kernel acknowledged meanwhile: a quick send's
            // time is mostly this thread's own (preempted, say), not the
            // receiver's pace.
            let took = t.elapsed();
            if took >= TELL_STALL / 4 {
                p.told.count(took, w.acked_while_waiting() - acked);
            }
            let why = match sent {
                Err(e) => format!("connection lost: {e}"),
                Ok(()) => match p.told.too_slow(TELL_STALL) {
                    Some(why) => format!("too slow to tell: {why}"),
                    None => continue,
                },
            };
            p.cut(why);
        }
    }

    fn chain<'s>(
        &mut self,
        scope: &'s std::thread::Scope<'s, '_>,
        tls: &Tls,
    ) -> Result<Vec<(usize, UnicastJoin<'s>)>, CastError>
    where
        'a: 's,
    {
        let Some(head) = self.peers.iter().position(|p| p.state == State::Live) else {
            return Ok(Vec::new());
        };
        // A first link that cannot be reached, or is not the receiver it
        // claims, drops that receiver: the rest come by unicast below.
        let mut unicast = Vec::new();
        match self.first_link(head, tls) {
            Ok(mut link) => {
                self.feed_chain((&mut link, head), scope, &mut unicast)?;
                // A goodbye only: a first receiver that takes it slowly
                // does not hold up the wait for everyone's Done (one
                // dropped is not told).
                if !matches!(self.peers[head].state, State::Dropped(_)) {
                    let _ = link.set_write_limit(Duration::from_secs(1));
                    let _ = link.send(&frame(v1::cast_frame::Body::Finish(v1::CastFinish {
                        ok: true,
                        reason: String::new(),
                    })));
                }
            }
            Err(why) => self.peers[head].state = State::Dropped(why),
        }
        // Wait for every receiver; downstream of a dropped one, repair by
        // unicast from what each has reported. An honest chain empties
        // within moments of the feed's end: a receiver still on it half a
        // silence limit later is held up by a link before it (one that
        // trickles the sender's pages, say), and takes the rest by
        // unicast.
        let fed = Instant::now();
        loop {
            self.events(Duration::from_millis(5));
            self.silent_check();
            self.done_check(&unicast);
            self.demote_refused(scope, &mut unicast);
            if fed.elapsed() > self.cfg.silent_after / 2 {
                let why = format!(
                    "still on the chain {:?} after its feed ended",
                    self.cfg.silent_after / 2
                );
                self.demote_from(scope, 0, &why, &mut unicast);
            }
            let broken = self
                .peers
                .iter()
                .position(|p| matches!(p.state, State::Dropped(_)));
            if let Some(b) = broken {
                let why = format!("chain broken at receiver {}", self.peers[b].id);
                self.demote_from(scope, b + 1, &why, &mut unicast);
            }
            if self.all_finished() {
                break;
            }
        }
        Ok(unicast)
    }

    /// Ends the session: waits for the unicast repairs, says goodbye to
    /// every receiver still connected and reports each.
    fn finish<'s>(mut self, unicast: Vec<(usize, UnicastJoin<'s>)>) -> SendReport {
        let duration = self.started.elapsed().as_secs_f64();
        for (i, j) in unicast {
            let r = j.join().unwrap_or_default();
            self.report.bytes_unicast += r.bytes;
            self.peers[i].repaired(r);
        }
        let multicast = self.report.transport == Transport::Multicast;
        for p in self.peers.iter_mut() {
            self.report.bytes_control += p.goodbye();
            let outcome = p.outcome(self.started);
            self.report.receivers.push(p.report(outcome, multicast));
        }
        // Every datagram the sender encoded, probes included, took a sequence
        // number, and every one was sent.
        self.report.datagrams = self.seq;
        // Unicast repairs went over control connections; count them apart.
        self.report.bytes_control = self
            .report
            .bytes_control
            .saturating_sub(self.report.bytes_unicast);
        self.report.duration_s = duration;
        self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver's words reach the report with no control characters and
    /// at most 200 characters, whatever it sent.
    #[test]
    fn a_receivers_words_are_printable_and_bounded() {
        assert_eq!(printable("gave up\n\x1b[31mred\u{7}"), "gave up[31mred");
        assert_eq!(printable(&"é".repeat(500)).chars().count(), 200);
    }

    /// A receiver's pace is judged once the sends to it waited the window,
    /// each window on its own (bytes taken fast before earn no time to
    /// trickle after), against a floor shared by those sent to at once.
    #[test]
    fn a_receivers_pace_is_judged_per_window_against_a_shared_floor() {
        use std::sync::atomic::Ordering::Relaxed;
        let sharing = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(1));
        let w = Duration::from_secs(5);
        let mut t = Taking::new(sharing.clone());
        let mib = 1u64 << 20;
        let took = |t: &mut Taking, bytes: u64, secs: u64| {
            t.waited += Duration::from_secs(secs);
            t.bytes += bytes;
        };
        took(&mut t, 0, 4);
        assert_eq!(t.too_slow(w), None, "not yet a window of waiting");
        took(&mut t, 100 * mib, 1);
        assert_eq!(t.too_slow(w), None, "20 MiB/s");
        // A new window: the 100 MiB before count for nothing.
        took(&mut t, mib, 5);
        assert!(t.too_slow(w).is_some_and(|why| why.contains("205 KiB/s")));
        // Four receivers at once: a quarter of the floor each.
        sharing.store(4, Relaxed);
        took(&mut t, 2 * mib, 5);
        assert_eq!(t.too_slow(w), None, "410 KiB/s, above 256 KiB/s");
        took(&mut t, mib / 2, 5);
        assert!(t.too_slow(w).is_some(), "102 KiB/s, under a quarter");
        let _ = Sharing::join(&sharing);
        assert_eq!(sharing.load(Relaxed), 4, "a share ends with its receiver");
    }
    use proptest::prelude::*;

    #[test]
    fn disjoint_requesters_share_a_repair() {
        // Receiver 1 lacks pages 0 and 2, receiver 2 page 1, receiver 3
        // page 3; page 5 is in another group.
        let pool = vec![
            ((0, 0), requester(1)),
            ((0, 1), requester(2)),
            ((0, 2), requester(1)),
            ((0, 3), requester(3)),
            ((1, 5), requester(2)),
        ];
        let (units, rest) = repair_units(pool.clone(), true, 16);
        assert_eq!(
            units,
            vec![vec![(0, 0), (0, 1), (0, 3)], vec![(0, 2)], vec![(1, 5)]]
        );
        assert!(rest.is_empty());
        let (plain, _) = repair_units(pool, false, 16);
        assert_eq!(
            plain.len(),
            5,
            "without coding every page is its own repair"
        );
        assert_eq!(requester(100), u64::MAX, "too many receivers: never coded");
    }

    proptest! {
        #[test]
        fn units_are_decodable_by_every_requester(
            pool in proptest::collection::btree_map((0u32..3, 0u32..200), 1u64..64, 0..120),
            max in 1usize..20,
        ) {
            let pool: Vec<((u32, u32), u64)> = pool.into_iter().collect();
            let n = pool.len();
            let (units, rest) = repair_units(pool.clone(), true, max);
            prop_assert!(units.len() <= max);
            let mut seen: Vec<(u32, u32)> = units.iter().flatten().copied().chain(rest.iter().map(|r| r.0)).collect();
            seen.sort_unstable();
            prop_assert_eq!(seen.len(), n, "every page once, in a unit or left over");
            let mask: HashMap<(u32, u32), u64> = pool.into_iter().collect();
            for u in &units {
                prop_assert!(u.len() <= MAX_CODED);
                prop_assert!(u.iter().all(|p| p.0 == u[0].0), "one group per unit");
                let mut union = 0u64;
                for p in u {
                    prop_assert_eq!(union & mask[p], 0, "a receiver would lack two pages of {:?}", u);
                    union |= mask[p];
                }
            }
        }
    }
}
