//! The receiving side of a cast session.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use metrics::counter;
use pagecast_pages::{ContentKey, PAGE_SIZE, Page, PageHash};
use pagecast_proto::{
    CAST_WIRE_VERSION, MAX_CAST_GROUP_RANGES, MAX_CAST_GROUPS, MAX_CAST_PAGES, MAX_MANIFEST_FRAMES,
    v1,
};

use crate::handshakes::Handshakes;
use crate::relay::{LinkFlags, MAX_RELAY_WAIT, Relay};
use crate::session::*;
use crate::socket::{self, RecvBatch};
use crate::wire::{
    Body, CastKey, Check, Datagram, GroupKey, MAX_NACK_RANGES, MAX_TAGS, Opening, Replay,
    ReplayWindow, Sealing, WireError, check_of, decode,
};
use pagecast_channel::{AuthError, Channel, ChannelWriter, Role, Tls, random_bytes};

const PROGRESS_EVERY: Duration = Duration::from_millis(5);
/// Don't ask again for a page just asked for. The sender ignores a NACK
/// for a page it repaired after the NACK's `seen_through`, so asking again
/// too early costs a datagram, never a duplicate repair.
const REPAIR_WAIT: Duration = Duration::from_millis(50);
/// Don't ask for what another receiver asked for this recently.
const SUPPRESS: Duration = Duration::from_millis(30);
/// Random delay before a NACK, so one receiver's NACK can suppress others'.
const BACKOFF_MIN_MS: u64 = 4;
const BACKOFF_SPAN_MS: u64 = 16;
/// Most pages being reassembled from fragments at once.
const MAX_ASSEMBLIES: usize = 4096;
const PROBE_LISTEN: Duration = Duration::from_secs(1);

enum Ctl {
    Start(v1::CastStart),
    Probe(v1::CastProbe),
    Page(v1::CastPage),
    Finish(v1::CastFinish),
    Closed(String),
}

/// Where a chain link leaves its predecessor's sending half, so that the
/// session can close the link from its own thread.
type ChainCloser = std::sync::Arc<std::sync::Mutex<Option<ChannelWriter>>>;

enum ChainEv {
    Page(v1::CastPage),
    Finish,
    /// The link to the predecessor failed (it never came, went silent,
    /// broke, or sent what a link does not carry): the rest must come by
    /// unicast.
    Closed(String),
    /// The successor could not be reached, failed, or took nothing for the
    /// relay's wait and was given up: pages are still taken, and the
    /// receivers after this one give their links up and take the rest by
    /// unicast.
    NoSuccessor(String),
}

struct MemberGroup {
    index: usize,
    addr: SocketAddrV4,
    /// The group's key (its datagrams are sealed under it).
    key: GroupKey,
    /// Our place among its members: where our tag is in the sender's
    /// datagrams.
    slot: usize,
    pages: Vec<u32>,
    contiguous: u32,
    heard_through: u32,
    nack_due: Option<Instant>,
}

struct State<'a> {
    sink: &'a mut dyn PageSink,
    /// Frame and hash of each page, learnt as it arrives.
    entries: Vec<Option<PageEntry>>,
    frames: u64,
    needed: Vec<bool>,
    held: Vec<bool>,
    /// The dedup domains the pages are named in (each is checked with them).
    content_keys: Vec<ContentKey>,
    need_count: u32,
    /// Pages settled: held, or withdrawn by the sender.
    held_count: u32,
    /// Of those, withdrawn (settled without their data).
    withdrawn_count: u32,
    groups: Vec<MemberGroup>,
    by_index: HashMap<usize, usize>,
    /// Our own key, shared with the sender only.
    member_key: CastKey,
    /// Why the chain link was given up (a page that did not check, or the
    /// predecessor failed): nothing more is taken from it, and the sender
    /// is told.
    chain_refused: Option<String>,
    /// Why it gave up passing pages to the next receiver, told to the
    /// sender with every report from then on.
    chain_next_lost: Option<String>,
    /// The place after the last page the chain brought.
    chain_next: u32,
    session: u64,
    id: u32,
    frag: usize,
    frags: u8,
    replay: HashMap<u32, ReplayWindow>,
    assembly: HashMap<u32, (Box<Page>, u8)>,
    requested: HashMap<(usize, u32), Instant>,
    others: Vec<(Instant, usize, u32, u32)>,
    probes: HashSet<u32>,
    counters: ReceiverCounters,
    pages_main: u64,
    pages_unicast: u64,
    bytes: u64,
    last_heard: Instant,
    seq: u64,
    seen_through: u64,
}

fn protocol(peer: &str, why: impl Into<String>) -> CastError {
    CastError::Protocol {
        peer: peer.to_owned(),
        why: why.into(),
    }
}

fn backoff() -> Duration {
    let mut b = [0u8; 2];
    let _ = random_bytes(&mut b);
    Duration::from_millis(BACKOFF_MIN_MS + u64::from(u16::from_be_bytes(b)) % BACKOFF_SPAN_MS)
}

impl<'a> State<'a> {
    /// A receiver's state at the start of a session `w` planned as `plan`.
    fn new(
        sink: &'a mut dyn PageSink,
        cfg: &ReceiverConfig,
        w: &v1::CastWelcome,
        plan: SessionPlan,
    ) -> State<'a> {
        let total = plan.needed.len();
        let need_count = plan.needed.iter().filter(|&&n| n).count() as u32;
        let by_index = plan
            .groups
            .iter()
            .enumerate()
            .map(|(i, g)| (g.index, i))
            .collect();
        let frag = w.fragment_payload as usize;
        State {
            sink,
            held: vec![false; total],
            entries: vec![None; total],
            frames: w.image_frames,
            content_keys: cfg.content_keys.clone(),
            needed: plan.needed,
            need_count,
            held_count: 0,
            withdrawn_count: 0,
            groups: plan.groups,
            by_index,
            member_key: plan.member_key,
            chain_refused: None,
            chain_next_lost: None,
            chain_next: 0,
            session: w.session_id,
            id: w.receiver_id,
            frag,
            frags: PAGE_SIZE.div_ceil(frag) as u8,
            replay: HashMap::new(),
            assembly: HashMap::new(),
            requested: HashMap::new(),
            others: Vec::new(),
            probes: HashSet::new(),
            counters: ReceiverCounters::default(),
            pages_main: 0,
            pages_unicast: 0,
            bytes: 0,
            last_heard: Instant::now(),
            seq: 0,
            seen_through: 0,
        }
    }
}

impl State<'_> {
    /// Stores page `page` if it is wanted, new, and hashes to `check` (the
    /// full hash it computes becomes the page's entry).
    fn store(
        &mut self,
        page: u32,
        key: u64,
        check: Check,
        data: &Page,
        main: bool,
    ) -> Result<bool, CastError> {
        self.store_tagged(page, (key, check), data, main, None)
    }

    /// [`State::store`], for a page that came down the chain under the
    /// sender's tag for hash `expect` (Some): taken only if its bytes hash
    /// to exactly that; one that does not gives the chain link up.
    fn store_tagged(
        &mut self,
        page: u32,
        (key, check): (u64, Check),
        data: &Page,
        main: bool,
        expect: Option<&PageHash>,
    ) -> Result<bool, CastError> {
        let p = page as usize;
        if p >= self.entries.len() || !self.needed[p] {
            return Ok(false);
        }
        if self.held[p] {
            self.counters.duplicates += 1;
            return Ok(false);
        }
        let hash = self
            .content_keys
            .iter()
            .map(|k| k.hash_page(data))
            .find(|h| check_of(h) == check);
        let hash = hash.filter(|h| key < self.frames && expect.is_none_or(|e| e == h));
        let Some(hash) = hash else {
            self.counters.bad_hash += 1;
            counter!(crate::metrics::BAD_HASH).increment(1);
            if expect.is_some() {
                self.refuse_chain("a page came down it with bytes that do not match its hash");
            }
            return Ok(false);
        };
        let entry = PageEntry { key, hash };
        self.sink.put(&entry, data).map_err(CastError::Sink)?;
        self.entries[p] = Some(entry);
        self.held[p] = true;
        self.held_count += 1;
        if main {
            self.pages_main += 1;
        } else {
            self.pages_unicast += 1;
        }
        self.advance_contiguous();
        Ok(true)
    }

    /// Gives the chain link up for `why` (the first reason is kept).
    fn refuse_chain(&mut self, why: &str) {
        self.chain_refused.get_or_insert_with(|| why.to_owned());
    }

    /// Settles page `page` without its data, if it is wanted and not held:
    /// the sender withdrew it (its content left the sender before it could
    /// be read; whoever uses the session's pages takes it from elsewhere).
    fn withdraw(&mut self, page: u32) {
        let p = page as usize;
        if p >= self.entries.len() || !self.needed[p] || self.held[p] {
            return;
        }
        self.held[p] = true;
        self.held_count += 1;
        self.withdrawn_count += 1;
        self.advance_contiguous();
    }

    /// Moves each group's contiguous mark past the pages settled.
    fn advance_contiguous(&mut self) {
        for g in self.groups.iter_mut() {
            while (g.contiguous as usize) < g.pages.len()
                && self.held[g.pages[g.contiguous as usize] as usize]
            {
                g.contiguous += 1;
            }
        }
    }

    /// A page a chain link passed on: stored if it checks. A withdrawal is
    /// not taken from a link: only the sender withdraws a page, over our
    /// control connection, so a predecessor cannot settle pages it never
    /// sent us.
    ///
    /// The tag is checked first, over the page's place, frame and hash as
    /// the message names them (no hashing), so every page the sender put
    /// on the chain counts as coming through, needed here or not; true if
    /// this one did.
    fn chain_page(&mut self, p: &v1::CastPage) -> Result<bool, CastError> {
        if p.withdrawn || self.chain_refused.is_some() {
            return Ok(false);
        }
        let Some((key, _, data)) = page_of(p) else {
            self.refuse_chain("a malformed page came down it");
            return Ok(false);
        };
        let named = PageHash::try_from(p.hash.as_ref()).expect("page_of checked it");
        let tag = (self.session, p.page, key);
        if !crate::wire::chain_tag_ok(&self.member_key, tag, &named, &p.tags, self.id) {
            self.counters.forged += 1;
            self.refuse_chain("a page came down it under a tag that is not the sender's");
            return Ok(false);
        }
        // The sender puts each page on the chain once, in order: a page
        // again, or out of order, is a replay.
        if p.page < self.chain_next {
            self.refuse_chain("a page came down it again, or out of order");
            return Ok(false);
        }
        self.chain_next = p.page.saturating_add(1);
        self.store_tagged(p.page, (key, check_of(&named)), data, true, Some(&named))?;
        Ok(true)
    }

    /// A page that came over TCP (chain or unicast repair): stored, or
    /// settled if the sender withdrew it.
    fn tcp_page(&mut self, p: &v1::CastPage, main: bool, peer: &str) -> Result<(), CastError> {
        if p.withdrawn {
            if !p.data.is_empty() {
                return Err(protocol(peer, "a withdrawn page with data"));
            }
            self.withdraw(p.page);
            return Ok(());
        }
        let Some((key, check, data)) = page_of(p) else {
            return Err(protocol(peer, "malformed page"));
        };
        self.store(p.page, key, check, data, main)?;
        Ok(())
    }

    fn datagram(&mut self, buf: &mut [u8]) -> Result<(), CastError> {
        let Some(d) = self.admit(buf) else {
            return Ok(());
        };
        match d.body {
            Body::Data {
                group,
                index,
                fragment,
                fragments,
                pages,
                payload,
            } => {
                let Some(ids) = self.page_ids(group, index, pages.len()) else {
                    return Ok(());
                };
                if fragments == 1 {
                    for (k, (&page, &(key, check))) in ids.iter().zip(&pages).enumerate() {
                        let data: &Page = payload[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]
                            .try_into()
                            .expect("a whole page");
                        self.store(page, key, check, data, true)?;
                    }
                    return Ok(());
                }
                let (key, check) = pages[0];
                self.fragment(ids[0], key, check, (fragment, fragments), payload)?;
            }
            Body::Coded {
                group,
                pages,
                payload,
            } => self.coded(group, &pages, payload)?,
            Body::Heartbeat {
                group,
                sent_through,
                ..
            } => {
                if let Some(&gi) = self.by_index.get(&(group as usize)) {
                    let g = &mut self.groups[gi];
                    g.heard_through = g.heard_through.max(sent_through.min(g.pages.len() as u32));
                }
            }
            Body::Nack { group, ranges, .. } => {
                if let Some(&gi) = self.by_index.get(&(group as usize)) {
                    let now = Instant::now();
                    for (a, c) in ranges {
                        self.others.push((now, gi, a, a.saturating_add(c)));
                    }
                }
            }
            Body::Probe { nonce, .. } => {
                self.probes.insert(nonce);
            }
            Body::Withdrawn {
                group,
                index,
                count,
            } => {
                let Some(ids) = self.page_ids(group, index, count as usize) else {
                    return Ok(());
                };
                for page in ids {
                    self.withdraw(page);
                }
            }
        }
        Ok(())
    }

    /// A datagram of one of our groups that opens, is the sender's (its
    /// tag for us checked) or another member's NACK, is not our own, and is
    /// fresh; the rest are counted (stale, forged, replayed) and dropped.
    fn admit<'b>(&mut self, buf: &'b mut [u8]) -> Option<Datagram<'b>> {
        self.bytes += buf.len() as u64;
        let (groups, by_index, member_key) = (&self.groups, &self.by_index, &self.member_key);
        let opening = |group: u32, from: u32| {
            let g = &groups[*by_index.get(&(group as usize))?];
            Some(Opening {
                key: &g.key,
                // Another member's NACK carries a tag only the sender can
                // check; it serves only to hold back our own NACKs.
                tag: (from == 0).then_some((g.slot, member_key)),
            })
        };
        let d = match decode(buf, self.session, opening) {
            Ok(d) if d.from == 0 || matches!(d.body, Body::Nack { .. }) => d,
            Ok(_) => {
                // Data, repairs, heartbeats or probes in a member's name.
                self.counters.forged += 1;
                counter!(crate::metrics::DROPPED, "why" => "forged").increment(1);
                return None;
            }
            // Another group's traffic on a port we share with it.
            Err(WireError::NoKey { .. }) => return None,
            Err(WireError::Stale { .. }) => {
                self.counters.stale += 1;
                counter!(crate::metrics::DROPPED, "why" => "stale").increment(1);
                return None;
            }
            Err(_) => {
                self.counters.forged += 1;
                counter!(crate::metrics::DROPPED, "why" => "forged").increment(1);
                return None;
            }
        };
        if d.from == self.id {
            return None;
        }
        if self.replay.entry(d.from).or_default().check(d.seq) != Replay::Fresh {
            self.counters.replayed += 1;
            counter!(crate::metrics::DROPPED, "why" => "replayed").increment(1);
            return None;
        }
        if d.from == 0 {
            self.last_heard = Instant::now();
            self.seen_through = self.seen_through.max(d.seq);
        }
        Some(d)
    }

    /// The session page numbers of `count` pages from `index` of `group`
    /// (`None`: not a group of ours, another receiver's traffic on a shared
    /// port; or out of its range, counted forged).
    fn page_ids(&mut self, group: u32, index: u32, count: usize) -> Option<Vec<u32>> {
        let &gi = self.by_index.get(&(group as usize))?;
        let g = &self.groups[gi];
        let ids: Option<Vec<u32>> = (0..count as u32)
            .map(|k| g.pages.get(index.checked_add(k)? as usize).copied())
            .collect();
        if ids.is_none() {
            self.counters.forged += 1;
        }
        ids
    }

    /// One fragment of page `page`; the page is stored once all its
    /// fragments are in.
    fn fragment(
        &mut self,
        page: u32,
        key: u64,
        check: Check,
        (fragment, fragments): (u8, u8),
        payload: &[u8],
    ) -> Result<(), CastError> {
        // Every fragment carries `frag` bytes; the last is padded.
        if fragments != self.frags || payload.len() != self.frag {
            self.counters.forged += 1;
            return Ok(());
        }
        if self.held[page as usize] {
            if fragment == 0 {
                self.counters.duplicates += 1;
            }
            return Ok(());
        }
        if !self.assembly.contains_key(&page) && self.assembly.len() >= MAX_ASSEMBLIES {
            // Bounded memory: forget the lowest page's fragments (it will be
            // NACKed and resent).
            if let Some(&k) = self.assembly.keys().min() {
                self.assembly.remove(&k);
            }
        }
        let (buf, mask) = self
            .assembly
            .entry(page)
            .or_insert_with(|| (Box::new([0u8; PAGE_SIZE]), 0));
        let at = fragment as usize * self.frag;
        let n = self.frag.min(PAGE_SIZE - at);
        buf[at..at + n].copy_from_slice(&payload[..n]);
        *mask |= 1 << fragment;
        if *mask == ((1u16 << fragments) - 1) as u8 {
            let (buf, _) = self.assembly.remove(&page).expect("present");
            self.store(page, key, check, &buf, true)?;
        }
        Ok(())
    }

    /// A coded repair: the XOR of pages of one group. If we lack exactly
    /// one of them, XORing out the ones we hold leaves it (checked against
    /// its hash by `store`).
    fn coded(
        &mut self,
        group: u32,
        pages: &[(u32, u64, Check)],
        payload: &[u8],
    ) -> Result<(), CastError> {
        let Some(&gi) = self.by_index.get(&(group as usize)) else {
            return Ok(());
        };
        let mut resolved = Vec::with_capacity(pages.len());
        for &(index, key, check) in pages {
            let Some(&page) = self.groups[gi].pages.get(index as usize) else {
                self.counters.forged += 1;
                return Ok(());
            };
            resolved.push((page, key, check));
        }
        let missing: Vec<&(u32, u64, Check)> = resolved
            .iter()
            .filter(|(p, ..)| !self.held[*p as usize])
            .collect();
        match missing.len() {
            0 => self.counters.duplicates += 1,
            1 => {
                let (page, key, check) = *missing[0];
                let mut buf: Box<Page> = Box::new(payload.try_into().expect("a whole page"));
                let mut other = [0u8; PAGE_SIZE];
                for (p, k, _) in &resolved {
                    if *p != page {
                        self.sink.get(*k, &mut other).map_err(CastError::Sink)?;
                        for (b, o) in buf.iter_mut().zip(other.iter()) {
                            *b ^= o;
                        }
                    }
                }
                self.store(page, key, check, &buf, true)?;
            }
            _ => self.counters.undecodable += 1,
        }
        Ok(())
    }

    /// Sends NACKs for pages the sender has passed but we lack, after a
    /// random backoff, leaving out what someone asked for just now.
    fn nacks(&mut self, socks: &BTreeMap<u16, UdpSocket>) -> Result<(), CastError> {
        let now = Instant::now();
        self.others
            .retain(|(t, ..)| now.duration_since(*t) < SUPPRESS);
        self.requested
            .retain(|_, t| now.duration_since(*t) < REPAIR_WAIT);
        for gi in 0..self.groups.len() {
            let g = &self.groups[gi];
            let missing = (g.contiguous..g.heard_through)
                .filter(|&i| {
                    !self.held[g.pages[i as usize] as usize]
                        && !self.requested.contains_key(&(gi, i))
                })
                .take(1);
            if missing.count() == 0 {
                continue;
            }
            let due = *self.groups[gi].nack_due.get_or_insert(now + backoff());
            if now < due {
                continue;
            }
            self.groups[gi].nack_due = None;
            let g = &self.groups[gi];
            let mut ranges: Vec<(u32, u32)> = Vec::new();
            let mut suppressed = false;
            for i in g.contiguous..g.heard_through {
                if self.held[g.pages[i as usize] as usize] || self.requested.contains_key(&(gi, i))
                {
                    continue;
                }
                if self
                    .others
                    .iter()
                    .any(|&(_, og, a, b)| og == gi && (a..b).contains(&i))
                {
                    suppressed = true;
                    continue;
                }
                match ranges.last_mut() {
                    Some((a, c)) if *a + *c == i => *c += 1,
                    _ => {
                        if ranges.len() == MAX_NACK_RANGES {
                            break;
                        }
                        ranges.push((i, 1));
                    }
                }
            }
            if suppressed {
                self.counters.nacks_suppressed += 1;
            }
            if ranges.is_empty() {
                continue;
            }
            for &(a, c) in &ranges {
                for i in a..a + c {
                    self.requested.insert((gi, i), now);
                }
            }
            self.seq += 1;
            let mut b = Vec::new();
            Datagram {
                session: self.session,
                seq: self.seq,
                from: self.id,
                body: Body::Nack {
                    group: g.index as u32,
                    seen_through: self.seen_through,
                    ranges,
                },
            }
            .encode(
                &Sealing {
                    key: &g.key,
                    tags: std::slice::from_ref(&self.member_key),
                },
                &mut b,
            );
            let nack_port = g.addr.port().wrapping_add(1);
            let sock = &socks[&nack_port];
            socket::send_batch(sock, &[&b], SocketAddrV4::new(*g.addr.ip(), nack_port))
                .map_err(CastError::io("sending a NACK"))?;
            self.counters.nacks_sent += 1;
            counter!(crate::metrics::NACKS_SENT).increment(1);
        }
        Ok(())
    }

    fn progress(&self) -> v1::CastProgress {
        let g = self
            .groups
            .iter()
            .find(|g| (g.contiguous as usize) < g.pages.len());
        v1::CastProgress {
            group: g.map_or(u32::MAX, |g| g.index as u32),
            contiguous: g.map_or(0, |g| g.contiguous),
            held: self.held_count,
            chain_refused: self.chain_refused.clone().unwrap_or_default(),
            chain_next_lost: self.chain_next_lost.clone().unwrap_or_default(),
        }
    }

    fn complete(&self) -> bool {
        self.held_count == self.need_count
    }

    fn done(&self) -> v1::CastDone {
        let held: Vec<PageEntry> = self
            .entries
            .iter()
            .zip(&self.needed)
            .filter(|(_, n)| **n)
            .filter_map(|(e, _)| *e)
            .collect();
        v1::CastDone {
            digest: digest(held.iter()).to_vec().into(),
            pages: self.held_count,
            withdrawn: self.withdrawn_count,
            forged: self.counters.forged,
            replayed: self.counters.replayed,
            stale: self.counters.stale,
            bad_hash: self.counters.bad_hash,
            duplicates: self.counters.duplicates,
            nacks_sent: self.counters.nacks_sent,
            nacks_suppressed: self.counters.nacks_suppressed,
            undecodable: self.counters.undecodable,
        }
    }
}

fn frame(body: v1::cast_frame::Body) -> v1::CastFrame {
    v1::CastFrame { body: Some(body) }
}

/// The frame, check and content of a page sent over TCP, if well formed.
fn page_of(p: &v1::CastPage) -> Option<(u64, Check, &Page)> {
    let data = <&Page>::try_from(p.data.as_ref()).ok()?;
    let hash = PageHash::try_from(p.hash.as_ref()).ok()?;
    Some((p.key, check_of(&hash), data))
}

/// Joins a session as a receiver: authenticates to the sender, learns the
/// session, takes pages by multicast (with NACK repair) or the chain,
/// verifies each against its hash into `sink`, and reports. On any failure
/// the sink is aborted, so no partial output is left behind.
pub fn receive(
    cfg: &ReceiverConfig,
    tls: &Tls,
    sink: &mut dyn PageSink,
    progress: &dyn Fn(u64, u64),
) -> Result<RecvReport, CastError> {
    let r = receive_inner(cfg, tls, sink, progress);
    if r.is_err() {
        sink.abort();
    }
    r
}

fn receive_inner(
    cfg: &ReceiverConfig,
    tls: &Tls,
    sink: &mut dyn PageSink,
    progress: &dyn Fn(u64, u64),
) -> Result<RecvReport, CastError> {
    let (mut ch, chain_listener, w) = handshake(cfg, tls)?;
    let peer = ch.peer().to_owned();
    let plan = SessionPlan::of(&peer, &w)?;
    sink.begin(w.image_frames).map_err(CastError::Sink)?;
    let mut joined = Joined::groups(cfg, &plan.groups)?;
    ch.send(&frame(v1::cast_frame::Body::Ready(v1::CastReady {
        joined: joined.joins,
    })))?;
    let mut st = State::new(sink, cfg, &w, plan);
    ch.set_read_timeout(None)?;
    let (reader, writer) = ch.split()?;
    let (tx, rx) = mpsc::channel::<Ctl>();
    let ctl_thread = std::thread::spawn(move || read_control(reader, tx));
    let mut run = Session {
        cfg,
        tls,
        peer,
        writer,
        ctl: rx,
        chain_listener,
        rb: RecvBatch::default(),
        pending_probe: None,
        transport: None,
        started: Instant::now(),
        last_progress: Instant::now(),
        chain_rx: None,
        chain_thread: None,
        chain_closer: ChainCloser::default(),
        done_sent: false,
        leaves: 0,
        finished: None,
        finish_time: None,
        control_closed: None,
        chain_broken: None,
        chain_through: None,
        link_flags: LinkFlags::default(),
    };
    run.run(&mut st, &mut joined, progress)?;
    run.writer.shutdown();
    let _ = ctl_thread.join();
    // A predecessor still sending (or trickling a frame a byte at a time),
    // or a successor the link waits on, would otherwise hold the link's
    // thread.
    run.chain_rx = None;
    run.link_flags.ended.store(true, Ordering::Release);
    if let Some(w) = run
        .chain_closer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        w.shutdown();
    }
    if let Some(t) = run.chain_thread.take() {
        let _ = t.join();
    }
    st.sink.finish().map_err(CastError::Sink)?;
    Ok(RecvReport {
        transport: run.transport.unwrap_or(Transport::Multicast),
        id: st.id,
        pages: st.held_count - st.withdrawn_count,
        withdrawn: st.withdrawn_count,
        page_bytes: u64::from(st.held_count - st.withdrawn_count) * PAGE_SIZE as u64,
        pages_main: st.pages_main,
        pages_unicast: st.pages_unicast,
        bytes_received: st.bytes,
        joins: joined.joins,
        leaves: run.leaves,
        duration_s: run
            .finish_time
            .unwrap_or_else(Instant::now)
            .duration_since(run.started)
            .as_secs_f64(),
        counters: st.counters,
        chain_broken: run.chain_broken,
    })
}

/// Connects to the sender, says hello (with a chain listener ready) and
/// reads its welcome.
fn handshake(
    cfg: &ReceiverConfig,
    tls: &Tls,
) -> Result<(Channel, TcpListener, v1::CastWelcome), CastError> {
    let chain_listener = TcpListener::bind((cfg.iface, 0))
        .map_err(CastError::io(format!("chain listener on {}", cfg.iface)))?;
    let chain_addr = chain_listener
        .local_addr()
        .map_err(CastError::io("chain listener"))?;
    let stream = TcpStream::connect_timeout(&cfg.control, Duration::from_secs(10)).map_err(
        CastError::io(format!("connecting to the sender at {}", cfg.control)),
    )?;
    let mut ch = Channel::client(stream, tls)?;
    pagecast_channel::require(ch.identity(), &[Role::Host], ch.peer(), "send a cast")?;
    let rcvbuf = socket::receive_buffer().map_err(CastError::io("measuring the receive buffer"))?;
    ch.send(&frame(v1::cast_frame::Body::Hello(v1::CastHello {
        version: CAST_WIRE_VERSION as i32,
        name: cfg.name.clone(),
        chain_addr: chain_addr.to_string(),
        rcvbuf_bytes: rcvbuf as u64,
        job: cfg.job.clone(),
    })))?;
    // The sender says it is waiting (for other receivers) about once a
    // second; a sender silent this long is gone.
    ch.set_read_timeout(Some(cfg.silent_after))?;
    loop {
        let f: v1::CastFrame = ch.recv("welcome").map_err(|e| match e {
            AuthError::Closed { peer } => protocol(
                &peer,
                "closed the connection before welcoming this receiver: it refused it \
                 (another job's receiver, a name it does not expect, or a certificate \
                 already taking part), or it went away",
            ),
            e => e.into(),
        })?;
        match f.body {
            Some(v1::cast_frame::Body::Waiting(_)) => continue,
            Some(v1::cast_frame::Body::Welcome(w)) => return Ok((ch, chain_listener, w)),
            _ => return Err(protocol(ch.peer(), "expected a welcome")),
        }
    }
}

/// What a welcome says, checked: our own key, the pages this receiver
/// needs and the groups it is a member of (with their keys).
struct SessionPlan {
    member_key: CastKey,
    needed: Vec<bool>,
    groups: Vec<MemberGroup>,
}

impl SessionPlan {
    fn of(peer: &str, w: &v1::CastWelcome) -> Result<SessionPlan, CastError> {
        if w.version != CAST_WIRE_VERSION as i32 {
            return Err(protocol(
                peer,
                format!(
                    "cast wire version {} (this build speaks {})",
                    w.version, CAST_WIRE_VERSION as i32
                ),
            ));
        }
        if w.total_pages > MAX_CAST_PAGES
            || w.image_frames > MAX_MANIFEST_FRAMES
            || w.groups.is_empty()
            || w.groups.len() > MAX_CAST_GROUPS
        {
            return Err(protocol(peer, "session sizes out of range"));
        }
        if !(crate::wire::MIN_FRAGMENT as u32..=PAGE_SIZE as u32).contains(&w.fragment_payload) {
            return Err(protocol(
                peer,
                format!("fragment size {}", w.fragment_payload),
            ));
        }
        let member_key: CastKey = w
            .member_key
            .as_ref()
            .try_into()
            .map_err(|_| protocol(peer, "member key is not 32 bytes"))?;
        let mut needed = vec![false; w.total_pages as usize];
        let mut groups = Vec::new();
        for (index, g) in w.groups.iter().enumerate() {
            if g.member {
                groups.push(member_group(peer, index, g, &mut needed)?);
            }
        }
        Ok(SessionPlan {
            member_key,
            needed,
            groups,
        })
    }
}

/// Checks a welcome as a receiver does before joining: the pages it would
/// take in across its groups (at most the session's `total_pages`, since
/// no page is listed twice), or why it is refused. For fuzzing and tests.
pub fn check_welcome(peer: &str, w: &v1::CastWelcome) -> Result<usize, CastError> {
    let plan = SessionPlan::of(peer, w)?;
    Ok(plan.groups.iter().map(|g| g.pages.len()).sum())
}

/// Group `index` of a welcome, checked, its pages marked in `needed`.
fn member_group(
    peer: &str,
    index: usize,
    g: &v1::CastGroup,
    needed: &mut [bool],
) -> Result<MemberGroup, CastError> {
    let total = needed.len();
    let addr: SocketAddrV4 = g
        .addr
        .parse()
        .map_err(|_| protocol(peer, format!("group address {:?}", g.addr)))?;
    if !addr.ip().is_multicast() {
        return Err(protocol(peer, format!("{addr} is not a multicast group")));
    }
    let key: CastKey = g
        .key
        .as_ref()
        .try_into()
        .map_err(|_| protocol(peer, format!("group {addr}: key is not 32 bytes")))?;
    if g.slot as usize >= MAX_TAGS {
        return Err(protocol(
            peer,
            format!("group {addr}: member place {}", g.slot),
        ));
    }
    if !g.page_ranges.len().is_multiple_of(2) || g.page_ranges.len() / 2 > MAX_CAST_GROUP_RANGES {
        return Err(protocol(
            peer,
            format!("group {addr}: malformed page ranges"),
        ));
    }
    let mut pages = Vec::with_capacity((g.len as usize).min(total));
    for r in g.page_ranges.chunks_exact(2) {
        let (first, count) = (r[0] as usize, r[1] as usize);
        if count == 0 || first + count > total || pages.len() + count > g.len as usize {
            return Err(protocol(
                peer,
                format!("group {addr}: page range {first}+{count} out of bounds"),
            ));
        }
        // Each page goes out in one group: a range that overlaps one
        // already listed (in this group or another) is refused, so what a
        // welcome makes a receiver allocate is bounded by its pages.
        if needed[first..first + count].iter().any(|&n| n) {
            return Err(protocol(
                peer,
                format!("group {addr}: page range {first}+{count} overlaps another"),
            ));
        }
        needed[first..first + count].fill(true);
        pages.extend(first as u32..(first + count) as u32);
    }
    if pages.len() != g.len as usize {
        return Err(protocol(
            peer,
            format!(
                "group {addr}: {} pages listed, {} announced",
                pages.len(),
                g.len
            ),
        ));
    }
    Ok(MemberGroup {
        index,
        addr,
        key: GroupKey::new(key),
        slot: g.slot as usize,
        pages,
        contiguous: 0,
        heard_through: 0,
        nack_due: None,
    })
}

/// The sockets of the groups joined: data on each group's port, NACKs on
/// the next.
struct Joined {
    ports: BTreeMap<u16, Vec<Ipv4Addr>>,
    data: Vec<UdpSocket>,
    nacks: BTreeMap<u16, UdpSocket>,
    joins: u32,
}

impl Joined {
    fn groups(cfg: &ReceiverConfig, groups: &[MemberGroup]) -> Result<Joined, CastError> {
        let mut ports: BTreeMap<u16, Vec<Ipv4Addr>> = BTreeMap::new();
        for g in groups {
            ports.entry(g.addr.port()).or_default().push(*g.addr.ip());
        }
        let mut data = Vec::new();
        let mut nacks: BTreeMap<u16, UdpSocket> = BTreeMap::new();
        let mut joins = 0u32;
        for (&port, addrs) in &ports {
            let d = socket::group_socket(port, addrs, cfg.iface, cfg.ttl)
                .map_err(CastError::io(format!("joining groups on port {port}")))?;
            d.set_read_timeout(Some(Duration::from_millis(2)))
                .map_err(CastError::io("data socket"))?;
            data.push(d);
            let n = socket::group_socket(port.wrapping_add(1), addrs, cfg.iface, cfg.ttl).map_err(
                CastError::io(format!("joining groups on port {}", port.wrapping_add(1))),
            )?;
            n.set_nonblocking(true)
                .map_err(CastError::io("NACK socket"))?;
            nacks.insert(port.wrapping_add(1), n);
            joins += addrs.len() as u32;
        }
        counter!(crate::metrics::JOINS).increment(u64::from(joins));
        Ok(Joined {
            ports,
            data,
            nacks,
            joins,
        })
    }

    /// Leaves every data group; returns how many it left.
    fn leave(&mut self, iface: Ipv4Addr) -> u32 {
        let mut leaves = 0;
        for (d, (_, addrs)) in self.data.iter().zip(&self.ports) {
            for a in addrs {
                if socket::leave(d, *a, iface).is_ok() {
                    leaves += 1;
                }
            }
        }
        self.data.clear();
        leaves
    }
}

/// Passes the sender's control frames on as events until it closes or
/// finishes.
fn read_control(mut reader: pagecast_channel::ChannelReader, tx: mpsc::Sender<Ctl>) {
    use v1::cast_frame::Body as F;
    loop {
        let ev = match reader.recv::<v1::CastFrame>("cast frame") {
            Ok(v1::CastFrame { body: Some(b) }) => match b {
                F::Start(s) => Ctl::Start(s),
                F::Probe(p) => Ctl::Probe(p),
                F::Page(p) => Ctl::Page(p),
                F::Finish(f) => Ctl::Finish(f),
                other => Ctl::Closed(format!("unexpected frame {other:?}")),
            },
            Ok(_) => Ctl::Closed("empty frame".into()),
            Err(e) => Ctl::Closed(e.to_string()),
        };
        let last = matches!(ev, Ctl::Closed(_) | Ctl::Finish(_));
        if tx.send(ev).is_err() || last {
            return;
        }
    }
}

/// A receiver's session once it has joined: the control link, the chain
/// (if the sender chose it) and where the session stands.
struct Session<'a> {
    cfg: &'a ReceiverConfig,
    tls: &'a Tls,
    peer: String,
    writer: ChannelWriter,
    ctl: mpsc::Receiver<Ctl>,
    chain_listener: TcpListener,
    rb: RecvBatch,
    pending_probe: Option<(u32, Instant)>,
    transport: Option<Transport>,
    started: Instant,
    last_progress: Instant,
    chain_rx: Option<mpsc::Receiver<ChainEv>>,
    chain_thread: Option<std::thread::JoinHandle<()>>,
    /// The chain link's sending half, to close it from here.
    chain_closer: ChainCloser,
    done_sent: bool,
    leaves: u32,
    finished: Option<v1::CastFinish>,
    finish_time: Option<Instant>,
    control_closed: Option<String>,
    chain_broken: Option<String>,
    /// When the last page the sender tagged came down the chain (from the
    /// start of the chain on).
    chain_through: Option<Instant>,
    /// Set while the chain link waits for its successor to take a page
    /// (the predecessor is not to blame for that time), and by the session
    /// when it ends.
    link_flags: LinkFlags,
}

impl Session<'_> {
    /// Takes datagrams, chain pages and control frames until the session
    /// ends: the sender's finish, or a lost control link after everything
    /// was verified and reported.
    fn run(
        &mut self,
        st: &mut State<'_>,
        joined: &mut Joined,
        progress: &dyn Fn(u64, u64),
    ) -> Result<(), CastError> {
        loop {
            self.datagrams(st, joined)?;
            self.chain_pages(st)?;
            self.control(st)?;
            self.report(st, joined, progress)?;
            if self.ended(st)? {
                return Ok(());
            }
        }
    }

    fn datagrams(&mut self, st: &mut State<'_>, joined: &Joined) -> Result<(), CastError> {
        for d in &joined.data {
            let n = socket::recv_batch(d, &mut self.rb).map_err(CastError::io("receiving"))?;
            for k in 0..n {
                if let Some(buf) = self.rb.get_mut(k) {
                    st.datagram(buf)?;
                } else {
                    st.counters.forged += 1;
                }
            }
        }
        for s in joined.nacks.values() {
            let n =
                socket::recv_batch(s, &mut self.rb).map_err(CastError::io("receiving NACKs"))?;
            for k in 0..n {
                if let Some(buf) = self.rb.get_mut(k) {
                    st.datagram(buf)?;
                }
            }
        }
        if joined.data.is_empty() {
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Takes what the chain link passed on. The link is given up (and the
    /// sender told at once, so that it sends the rest by unicast) when a
    /// page does not check, the link fails, or no page the sender tagged
    /// came for half the silence limit while pages are missing (whatever
    /// else the predecessor sends meanwhile, or after it ended the chain:
    /// it is not the sender speaking, and keeps no one waiting).
    fn chain_pages(&mut self, st: &mut State<'_>) -> Result<(), CastError> {
        let Some(crx) = &self.chain_rx else {
            return Ok(());
        };
        while let Ok(ev) = crx.try_recv() {
            match ev {
                ChainEv::Page(p) => {
                    if st.chain_page(&p)? {
                        st.last_heard = Instant::now();
                        self.chain_through = Some(Instant::now());
                    }
                }
                // Pages still missing may be withdrawals the sender tells
                // over the control connection; an early end the timer
                // below catches.
                ChainEv::Finish => {}
                ChainEv::Closed(why) => {
                    if !st.complete() {
                        st.refuse_chain(&format!("the link from its predecessor failed: {why}"));
                    }
                    self.chain_broken = Some(why);
                }
                ChainEv::NoSuccessor(why) => {
                    // Said at once: the sender moves those after it to
                    // unicast rather than wait for them to starve.
                    st.chain_next_lost.get_or_insert_with(|| why.clone());
                    self.chain_broken = Some(why);
                    self.writer
                        .send(&frame(v1::cast_frame::Body::Progress(st.progress())))?;
                }
            }
            if st.chain_refused.is_some() {
                break;
            }
        }
        // While the successor holds the link (for at most the relay's
        // wait), no page comes, through no fault of the predecessor's or
        // the sender's.
        if self.link_flags.held.load(Ordering::Acquire) {
            self.chain_through = Some(Instant::now());
            st.last_heard = Instant::now();
        }
        let within = self.cfg.silent_after / 2;
        if !st.complete() && self.chain_through.is_some_and(|t| t.elapsed() > within) {
            st.refuse_chain(&format!(
                "its predecessor passed on no page of the sender's for {within:?}"
            ));
        }
        if let Some(why) = &st.chain_refused {
            // Say so at once, and let the link go: it ends when it next
            // hands a page over, and forwards nothing more.
            self.chain_broken.get_or_insert_with(|| why.clone());
            self.chain_rx = None;
            self.writer
                .send(&frame(v1::cast_frame::Body::Progress(st.progress())))?;
        }
        Ok(())
    }

    fn control(&mut self, st: &mut State<'_>) -> Result<(), CastError> {
        while let Ok(ev) = self.ctl.try_recv() {
            st.last_heard = Instant::now();
            match ev {
                Ctl::Probe(p) => {
                    self.pending_probe = Some((p.nonce, Instant::now() + PROBE_LISTEN))
                }
                Ctl::Start(s) => self.start(s)?,
                Ctl::Page(p) => st.tcp_page(&p, false, &self.peer)?,
                Ctl::Finish(f) => self.finished = Some(f),
                Ctl::Closed(why) => self.control_closed = Some(why),
            }
        }
        if let Some((nonce, deadline)) = self.pending_probe {
            let heard = st.probes.contains(&nonce);
            if heard || Instant::now() >= deadline {
                self.writer.send(&frame(v1::cast_frame::Body::ProbeResult(
                    v1::CastProbeResult { nonce, heard },
                )))?;
                self.pending_probe = None;
            }
        }
        Ok(())
    }

    /// The sender's start: multicast, or a chain link to run.
    fn start(&mut self, s: v1::CastStart) -> Result<(), CastError> {
        self.started = Instant::now();
        if s.transport != v1::CastTransport::Chain as i32 {
            self.transport = Some(Transport::Multicast);
            return Ok(());
        }
        self.transport = Some(Transport::Chain);
        let (ctx, crx) = mpsc::sync_channel(1024);
        self.chain_rx = Some(crx);
        let listener = self
            .chain_listener
            .try_clone()
            .map_err(CastError::io("chain listener"))?;
        let tls = self.tls.clone();
        let silent = self.cfg.silent_after;
        self.chain_through = Some(Instant::now());
        let ends = (ctx, self.chain_closer.clone(), self.link_flags.clone());
        self.chain_thread = Some(std::thread::spawn(move || {
            chain_link(listener, &tls, &s, silent, ends)
        }));
        Ok(())
    }

    /// NACKs, progress, and once every page is held, done (and the groups
    /// left).
    fn report(
        &mut self,
        st: &mut State<'_>,
        joined: &mut Joined,
        progress: &dyn Fn(u64, u64),
    ) -> Result<(), CastError> {
        if self.transport.is_none() || self.done_sent {
            return Ok(());
        }
        if self.transport == Some(Transport::Multicast) {
            st.nacks(&joined.nacks)?;
        }
        if self.last_progress.elapsed() >= PROGRESS_EVERY {
            self.writer
                .send(&frame(v1::cast_frame::Body::Progress(st.progress())))?;
            self.last_progress = Instant::now();
            progress(u64::from(st.held_count), u64::from(st.need_count));
        }
        if st.complete() {
            self.finish_time = Some(Instant::now());
            self.writer
                .send(&frame(v1::cast_frame::Body::Done(st.done())))?;
            self.done_sent = true;
            progress(u64::from(st.held_count), u64::from(st.need_count));
            self.leaves = joined.leave(self.cfg.iface);
        }
        Ok(())
    }

    /// Whether the session is over (an error if it ended badly).
    fn ended(&self, st: &State<'_>) -> Result<bool, CastError> {
        if let Some(f) = &self.finished {
            if !f.ok || !self.done_sent {
                return Err(CastError::Ended(if f.reason.is_empty() {
                    "incomplete".into()
                } else {
                    f.reason.clone()
                }));
            }
            return Ok(true);
        }
        if let Some(why) = &self.control_closed {
            // Everything verified and reported: the pages are good even if
            // the sender went away before saying goodbye.
            if self.done_sent {
                return Ok(true);
            }
            return Err(CastError::Ended(format!("control connection lost: {why}")));
        }
        if st.last_heard.elapsed() > self.cfg.silent_after {
            // Everything verified and reported: a sender that another
            // receiver holds up (or that went away) undoes none of it.
            if self.done_sent {
                return Ok(true);
            }
            return Err(CastError::Silent {
                peer: self.peer.clone(),
                after: self.cfg.silent_after,
            });
        }
        Ok(false)
    }
}

/// The chain predecessor named `prev` (by certificate; "" for any host),
/// connected to `listener` within `within`, unless the session `ended`
/// first (its pages came by unicast: it waits for no predecessor then).
/// Connections from anyone else are dropped and the wait goes on;
/// handshakes run on threads of their own ([`Handshakes`]), so a peer that
/// connects and says nothing holds up neither the predecessor nor the
/// deadline.
fn chain_predecessor(
    listener: &TcpListener,
    tls: &Tls,
    (prev, ended): (&str, &AtomicBool),
    within: Duration,
) -> Result<Channel, String> {
    let deadline = Instant::now() + within;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let handshakes = Handshakes::new();
    let shake = {
        let tls = tls.clone();
        move |s| -> Result<Channel, CastError> {
            let ch = Channel::server(s, &tls)?;
            pagecast_channel::require(ch.identity(), &[Role::Host], ch.peer(), "relay a cast")?;
            Ok(ch)
        }
    };
    loop {
        handshakes
            .accept(listener, &shake)
            .map_err(|e| e.to_string())?;
        while let Some(r) = handshakes.done() {
            match r {
                Ok(ch) if prev.is_empty() || ch.identity().name == prev => return Ok(ch),
                _ => counter!(crate::metrics::REFUSED).increment(1),
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the chain predecessor {prev:?} did not connect within {within:?}"
            ));
        }
        if ended.load(Ordering::Acquire) {
            return Err(format!(
                "the session ended before the chain predecessor {prev:?} connected"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// How long the link waits for its successor to take a frame (what the
/// start names, bounded; a quarter of the silence limit if it names none).
fn relay_wait_of(start: &v1::CastStart, silent: Duration) -> Duration {
    match start.chain_relay_wait_ms {
        0 => silent / 4,
        ms => Duration::from_millis(ms.into()).min(MAX_RELAY_WAIT),
    }
}

/// What a chain link hands back: its events, where it leaves its
/// predecessor's sending half, and the flags it shares with the session.
type LinkEnds = (mpsc::SyncSender<ChainEv>, ChainCloser, LinkFlags);

/// One link of the TCP chain: take pages from the predecessor the start
/// names (no other), pass each to the successor it names through a
/// [`Relay`] (which gives a successor up that takes nothing for the
/// start's wait) and hand it to the main loop. A predecessor that does not
/// connect, or goes silent, for `silent` ends the link (the sender repairs
/// by unicast).
fn chain_link(
    listener: TcpListener,
    tls: &Tls,
    start: &v1::CastStart,
    silent: Duration,
    (tx, closer, flags): LinkEnds,
) {
    let prev = match chain_predecessor(&listener, tls, (&start.chain_prev, &flags.ended), silent) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(ChainEv::Closed(e));
            return;
        }
    };
    let _ = prev.set_read_timeout(Some(silent));
    let Ok((mut prev, prev_w)) = prev.split() else {
        let _ = tx.send(ChainEv::Closed("cannot split the link".into()));
        return;
    };
    // The session closes the link when it ends, whatever the predecessor
    // is doing (a read times out per read, not per frame).
    *closer.lock().unwrap_or_else(|p| p.into_inner()) = Some(prev_w);
    // Connecting to the successor is the relay's own work: the link takes
    // pages meanwhile.
    let mut relay = (!start.chain_next.is_empty()).then(|| {
        let wait = relay_wait_of(start, silent);
        let next = (start.chain_next.clone(), start.chain_next_name.clone());
        Relay::start(next, tls, wait, flags)
    });
    loop {
        let f = match prev.recv::<v1::CastFrame>("chain frame") {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.send(ChainEv::Closed(e.to_string()));
                return;
            }
        };
        // A successor that failed or froze: the sender repairs it and
        // everyone after it by unicast.
        if let Some(r) = relay.as_mut()
            && let Err(why) = r.pass(f.clone())
        {
            relay = None;
            if tx.send(ChainEv::NoSuccessor(why)).is_err() {
                return;
            }
        }
        let ev = match f.body {
            Some(v1::cast_frame::Body::Page(p)) => ChainEv::Page(p),
            Some(v1::cast_frame::Body::Finish(_)) => ChainEv::Finish,
            _ => ChainEv::Closed("unexpected chain frame".into()),
        };
        let finish = matches!(ev, ChainEv::Finish);
        if tx.send(ev).is_err() {
            return;
        }
        if finish {
            if let Some(Err(why)) = relay.map(Relay::drain) {
                let _ = tx.send(ChainEv::NoSuccessor(why));
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn welcome(total: u32, groups: Vec<(u32, Vec<u32>)>) -> v1::CastWelcome {
        v1::CastWelcome {
            version: CAST_WIRE_VERSION as i32,
            total_pages: total,
            fragment_payload: PAGE_SIZE as u32,
            member_key: vec![7; 32].into(),
            groups: groups
                .into_iter()
                .enumerate()
                .map(|(i, (len, page_ranges))| v1::CastGroup {
                    addr: format!("239.1.1.{}:41000", i + 1),
                    member: true,
                    len,
                    page_ranges,
                    key: vec![i as u8; 32].into(),
                    slot: 0,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn overlapping_page_ranges_are_refused_before_anything_is_allocated() {
        // Two disjoint groups are fine.
        let ok = welcome(10, vec![(4, vec![0, 4]), (6, vec![4, 6])]);
        assert_eq!(check_welcome("s", &ok).unwrap(), 10);
        // The same pages in two groups: once an allocation of every
        // group's length (4 Mi pages x 1,024 groups made 16 GiB).
        let twice = welcome(10, vec![(10, vec![0, 10]), (10, vec![0, 10])]);
        let e = check_welcome("s", &twice).unwrap_err().to_string();
        assert!(e.contains("overlaps another"), "{e}");
        // Overlapping ranges within one group.
        let within = welcome(10, vec![(8, vec![0, 4, 2, 4])]);
        let e = check_welcome("s", &within).unwrap_err().to_string();
        assert!(e.contains("overlaps another"), "{e}");
    }

    struct NoSink;

    impl PageSink for NoSink {
        fn begin(&mut self, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn put(&mut self, _: &PageEntry, _: &Page) -> std::io::Result<()> {
            Ok(())
        }
        fn get(&mut self, _: u64, _: &mut Page) -> std::io::Result<()> {
            Err(std::io::Error::other("none"))
        }
        fn finish(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn abort(&mut self) {}
    }

    /// A withdrawal settles a page only from the sender, over the control
    /// connection; one a chain link passes on is ignored (a receiver up the
    /// chain cannot settle pages for those after it).
    #[test]
    fn only_the_sender_withdraws_a_page_a_chain_link_cannot() {
        let w = welcome(4, vec![(4, vec![0, 4])]);
        let mut w = w;
        w.image_frames = 8;
        let plan = SessionPlan::of("s", &w).unwrap();
        let mut sink = NoSink;
        let cfg = ReceiverConfig::new("127.0.0.1:1".parse().unwrap(), Ipv4Addr::LOCALHOST, "r");
        let mut st = State::new(&mut sink, &cfg, &w, plan);
        let withdrawn = |page| v1::CastPage {
            page,
            withdrawn: true,
            ..Default::default()
        };
        st.chain_page(&withdrawn(1)).unwrap();
        assert_eq!((st.held_count, st.withdrawn_count), (0, 0));
        st.tcp_page(&withdrawn(1), false, "s").unwrap();
        assert_eq!((st.held_count, st.withdrawn_count), (1, 1));
        // A withdrawal that carries data is refused.
        let mut bad = withdrawn(2);
        bad.data = vec![0u8; PAGE_SIZE].into();
        assert!(st.tcp_page(&bad, false, "s").is_err());
    }

    fn page(n: u32) -> v1::CastFrame {
        frame(v1::cast_frame::Body::Page(v1::CastPage {
            page: n,
            ..Default::default()
        }))
    }

    /// A chain link takes pages only from the predecessor its start names
    /// (by certificate): a host that connects first is dropped; one that
    /// never comes ends the link within the silence limit. Before, the
    /// link took whichever host connected first and waited for it forever.
    #[test]
    fn a_chain_link_takes_pages_only_from_its_named_predecessor() {
        let ca = pagecast_channel::ca::Authority::generate().unwrap();
        let [me, pred, intruder] =
            ["me", "pred", "intruder"].map(|n| ca.issue(n, Role::Host, 1).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::sync_channel(16);
        let start = v1::CastStart {
            transport: v1::CastTransport::Chain as i32,
            chain_prev: "pred".into(),
            ..Default::default()
        };
        let link = {
            let me = me.clone();
            std::thread::spawn(move || {
                chain_link(
                    listener,
                    &me,
                    &start,
                    Duration::from_secs(5),
                    (tx, ChainCloser::default(), Default::default()),
                )
            })
        };
        let feed = |tls: &Tls, n: u32| {
            let s = TcpStream::connect(addr).unwrap();
            let mut ch = Channel::client(s, tls).unwrap();
            let _ = ch.send(&page(n));
            let _ = ch.send(&frame(v1::cast_frame::Body::Finish(
                v1::CastFinish::default(),
            )));
            ch
        };
        // Connections that never start TLS, ahead of everyone: before,
        // the link took handshakes one at a time, 5 s each, and the
        // predecessor's own handshake timed out behind them.
        let _silent: Vec<_> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let _intruder = feed(&intruder, 666);
        let _pred = feed(&pred, 7);
        match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
            ChainEv::Page(p) => assert_eq!(p.page, 7, "a page from the intruder"),
            ChainEv::Finish => panic!("finished before any page"),
            ChainEv::Closed(e) | ChainEv::NoSuccessor(e) => panic!("{e}"),
        }
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            ChainEv::Finish
        ));
        link.join().unwrap();
        // A predecessor that never connects ends the link.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (tx, rx) = mpsc::sync_channel(16);
        let start = v1::CastStart {
            transport: v1::CastTransport::Chain as i32,
            chain_prev: "pred".into(),
            ..Default::default()
        };
        chain_link(
            listener,
            &me,
            &start,
            Duration::from_millis(300),
            (tx, ChainCloser::default(), Default::default()),
        );
        match rx.recv().unwrap() {
            ChainEv::Closed(e) => assert!(e.contains("did not connect"), "{e}"),
            _ => panic!("expected the link to end"),
        }
    }

    /// The relay wait a start names is taken as named up to a minute; a
    /// start that names none (an older sender) gets a quarter of the
    /// receiver's silence limit.
    #[test]
    fn a_start_names_the_relay_wait_within_bounds() {
        let silent = Duration::from_secs(10);
        let start = |ms| v1::CastStart {
            chain_relay_wait_ms: ms,
            ..Default::default()
        };
        assert_eq!(relay_wait_of(&start(0), silent), silent / 4);
        assert_eq!(
            relay_wait_of(&start(1250), silent),
            Duration::from_millis(1250)
        );
        assert_eq!(relay_wait_of(&start(u32::MAX), silent), MAX_RELAY_WAIT);
    }

    proptest! {
        /// Whatever the welcome says, a receiver plans at most the
        /// session's pages.
        #[test]
        fn a_welcome_never_plans_more_pages_than_the_session_has(
            total in 1u32..512,
            groups in proptest::collection::vec(
                proptest::collection::vec((0u32..512, 1u32..128), 1..6),
                1..6,
            ),
        ) {
            // Each group's length agrees with its ranges, so only the
            // overlap check stands between ranges that repeat pages and a
            // plan larger than the session.
            let groups = groups
                .into_iter()
                .map(|rs| {
                    let len = rs.iter().map(|r| r.1).sum();
                    (len, rs.into_iter().flat_map(|(a, c)| [a, c]).collect())
                })
                .collect();
            let w = welcome(total, groups);
            if let Ok(pages) = check_welcome("s", &w) {
                prop_assert!(pages <= total as usize);
            }
        }
    }
}
