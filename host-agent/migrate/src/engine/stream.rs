//! The transfer of a VM that migrates itself (QEMU): its own stream, with
//! its own rounds, auto-converge, switchover and device state, relayed to
//! every destination as it comes, each page a destination holds sent as
//! its 32-byte hash. Pages are hashed once whatever the number of
//! destinations; each destination has its own sending thread, so parsing
//! the stream and sending overlap.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_pages::{ContentKey, PageHash};
use pagecast_proto::v1;
use pagecast_qemu::return_path::ReturnPath;
use pagecast_qemu::{PAGE, Sink, StreamError, StreamStats};

use super::{Body, Class, DestState, Fleet, Transfer};
use crate::{Caster, Hold, MigrationError, MigrationLink, wire_len};

/// Stream bytes per part sent to a destination.
const PART_BYTES: usize = 256 << 10;
/// Most held pages per part.
const PART_HELD: usize = 4096;
/// Parts queued per destination's sending thread.
const PARTS_IN_FLIGHT: usize = 8;
/// Longest a destination may take, once the stream ended, to say its VM
/// runs (it waits up to a minute for its QEMU to load the devices).
const LOAD_WAIT: Duration = Duration::from_secs(75);
/// How often an idle sending thread looks for the destination's return
/// path.
const RETURN_POLL: Duration = Duration::from_millis(10);

/// A VM's stream as its source started it.
pub struct Started {
    /// The stream.
    pub input: Box<dyn Read + Send>,
    /// Where the destination's answers go back to the VM, if it asked for
    /// them (QEMU's return path): the first destination's are relayed,
    /// checked, as they come.
    pub back: Option<Box<dyn Write + Send>>,
}

/// A VM's own migration stream, as the engine relays it.
pub trait StreamSource {
    /// Has the VM start its stream and returns it. `cancelled` says why to
    /// give up waiting for it, if the job was stopped.
    fn start(
        &mut self,
        cancelled: &mut dyn FnMut() -> Option<String>,
    ) -> Result<Started, MigrationError>;

    /// After the stream ended: how the source saw its end.
    fn settled(&mut self) -> Result<StreamEnd, MigrationError>;
}

/// How a stream ended at its source.
#[derive(Debug, Clone, Default)]
pub struct StreamEnd {
    /// The source says everything went (QEMU: `completed`).
    pub completed: bool,
    /// The source's word for where it stands (QEMU's migration status).
    pub status: String,
    /// The guest's pause as the source measured it, ms.
    pub downtime_ms: f64,
    /// The source's word decides where the guest runs: a destination's
    /// Resumed says only that its QEMU took the stream (libvirt starts the
    /// guest there once it knows the source completed).
    pub decides: bool,
    /// With `decides`: the source could not tell how it ended.
    pub unknown: bool,
}

/// The relay's state between stages.
pub(crate) struct Relay<'a> {
    source: &'a mut dyn StreamSource,
    stats: StreamStats,
    /// Per destination: its answer, if it came while the stream was sent.
    early: std::collections::HashMap<usize, Body>,
}

impl<'a> Relay<'a> {
    pub fn new(source: &'a mut dyn StreamSource) -> Self {
        Relay {
            source,
            stats: StreamStats::default(),
            early: Default::default(),
        }
    }
}

/// A link taken by its sending thread.
struct Detached;

impl MigrationLink for Detached {
    fn send(&mut self, _: Body) -> Result<(), MigrationError> {
        Err(MigrationError::Protocol("the link is busy sending".into()))
    }
    fn recv(&mut self, _: Option<Duration>) -> Result<Body, MigrationError> {
        Err(MigrationError::Protocol("the link is busy sending".into()))
    }
}

/// What a sending thread did.
struct Sent<'l> {
    link: Box<dyn MigrationLink + 'l>,
    bytes: u64,
    error: Option<MigrationError>,
    /// The stream's last part was handed to the link, or its tail had
    /// begun (the destination may have all of it and run the VM even if
    /// the link then failed).
    last_tried: bool,
    /// A frame other than the return path that came meanwhile (the
    /// destination's answer), for the commit to read first.
    early: Option<Body>,
}

/// The return path of one destination, relayed to the source VM (`to`) or,
/// for the other destinations of a clone, dropped.
struct Back {
    to: Option<Box<dyn Write + Send>>,
    check: ReturnPath,
}

impl Back {
    /// Checks and relays `data`; an error fails this destination. What
    /// the check refuses never reaches the source VM: it hears that its
    /// destination failed (`SHUT` 1), fails its migration and runs on.
    fn relay(&mut self, data: &[u8]) -> Result<(), MigrationError> {
        if let Err(e) = self.check.push(data) {
            if let Some(to) = &mut self.to {
                let shut =
                    pagecast_qemu::return_path::message(pagecast_qemu::return_path::RP_SHUT, 1);
                let _ = to.write_all(&shut);
            }
            return Err(MigrationError::Stream {
                code: v1::RefusalCode::Invalid,
                reason: format!("the destination's QEMU answered: {e}"),
            });
        }
        if let Some(to) = &mut self.to {
            to.write_all(data).map_err(|e| MigrationError::Stream {
                code: v1::RefusalCode::Internal,
                reason: format!("relaying the destination's answer to the source QEMU: {e}"),
            })?;
        }
        Ok(())
    }
}

/// Sends `rx`'s parts on `link`; between parts, and while none comes,
/// relays what the destination sends back (QEMU's return path: a source
/// QEMU waits for its destination's word before it ends the stream).
fn sender<'l>(
    mut link: Box<dyn MigrationLink + 'l>,
    rx: Receiver<(v1::StreamPart, bool)>,
    mut back: Back,
) -> Sent<'l> {
    let mut sent = Sent {
        link: Box::new(Detached),
        bytes: 0,
        error: None,
        last_tried: false,
        early: None,
    };
    let mut ended = false;
    let error = loop {
        match rx.recv_timeout(RETURN_POLL) {
            Ok((p, tail)) => {
                // Once a part of the tail went, the destination may hold
                // all of the stream.
                sent.last_tried = p.last || tail;
                let body = Body::Stream(p);
                let n = wire_len(&body);
                if let Err(e) = link.send(body) {
                    // A destination that gave up says so before it goes:
                    // its Abort, if it came, is the answer, not the failure.
                    if let Ok(Some(Body::Abort(a))) = link.poll_frame() {
                        sent.early = Some(Body::Abort(a));
                        sent.last_tried = false;
                        break None;
                    }
                    break Some(e);
                }
                sent.bytes += n;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => ended = true,
        }
        if ended {
            break None;
        }
        if sent.early.is_some() {
            continue;
        }
        match link.poll_frame() {
            Ok(None) => {}
            Ok(Some(Body::ReturnPath(r))) => {
                if let Err(e) = back.relay(&r.data) {
                    sent.link = link;
                    sent.error = Some(e);
                    return sent;
                }
            }
            // The destination gave up (its QEMU refused the stream): it
            // runs nothing, and nothing more goes to it.
            Ok(Some(Body::Abort(a))) => {
                sent.early = Some(Body::Abort(a));
                break None;
            }
            // The answer to a keep-alive sent while others were waited
            // on: no answer.
            Ok(Some(Body::KeepAlive(_))) => {}
            Ok(Some(other)) => sent.early = Some(other),
            Err(e) => break Some(e),
        }
    };
    sent.link = link;
    sent.error = error;
    sent
}

impl Transfer for Relay<'_> {
    fn transfer(
        &mut self,
        fleet: &mut Fleet,
        hold: &mut Option<&mut dyn Hold>,
        _caster: &mut Option<&mut dyn Caster>,
        _fp: &Fingerprinter,
    ) -> Result<(), MigrationError> {
        fleet.check_cancel(hold)?;
        fleet.tell(v1::MigratePhase::QemuStream);
        let alive = fleet.alive();
        let held = held_sets(fleet, &alive);
        let held_count = held.iter().map(|h| h.len() as u64).sum();
        let mut cancelled = || hold.as_deref_mut().and_then(|h| h.cancelled());
        let started = self.source.start(&mut cancelled)?;
        let mut input = std::io::BufReader::with_capacity(256 << 10, started.input);
        let mut to_source = started.back;
        let key = fleet.vm.content_key();
        let links: Vec<Box<dyn MigrationLink + '_>> = alive
            .iter()
            .map(|&i| std::mem::replace(&mut fleet.dests[i].t.link, Box::new(Detached)))
            .collect();
        let (parsed, outs, sent) = std::thread::scope(|scope| {
            let mut outs = Vec::with_capacity(links.len());
            let mut threads = Vec::with_capacity(links.len());
            for (link, held) in links.into_iter().zip(held) {
                let (tx, rx) = sync_channel(PARTS_IN_FLIGHT);
                // The first destination's answers reach the source VM.
                let back = Back {
                    to: to_source.take(),
                    check: ReturnPath::new(),
                };
                threads.push(scope.spawn(move || sender(link, rx, back)));
                outs.push(Out::new(tx, held));
            }
            let mut fan = Fan {
                key,
                outs,
                cancelled: &mut cancelled,
            };
            let parsed = pagecast_qemu::proxy(&mut input, &mut fan);
            if parsed.is_ok() {
                fan.flush(true);
            }
            let outs: Vec<u64> = fan.outs.into_iter().map(|o| o.pages_held).collect();
            let sent: Vec<Sent> = threads
                .into_iter()
                .map(|t| t.join().expect("a sending thread panicked"))
                .collect();
            (parsed, outs, sent)
        });
        // What each destination held is its share of the stream's pages.
        fleet.report.pages_local = 0;
        fleet.report.contents_local = held_count;
        for (k, (s, pages_held)) in sent.into_iter().zip(outs).enumerate() {
            let i = alive[k];
            fleet.dests[i].t.link = s.link;
            if let Some(b) = s.early {
                self.early.insert(i, b);
            }
            fleet.count(s.bytes, Class::Pages);
            fleet.report.pages_local += pages_held;
            match s.error {
                // The last part may have gone: it may run there.
                Some(e) if s.last_tried => {
                    fleet.dests[i].state = DestState::InDoubt(e.to_string());
                }
                Some(e) => fleet.fail(i, e),
                None => {}
            }
        }
        self.stats = match parsed {
            Ok(st) => st,
            Err(StreamError::Stopped(why)) => return Err(MigrationError::Cancelled(why)),
            Err(e @ StreamError::Unsupported { .. }) => {
                return Err(MigrationError::Stream {
                    code: v1::RefusalCode::Invalid,
                    reason: e.to_string(),
                });
            }
            // Every destination failed; each says why.
            Err(StreamError::Sink(_)) => return fleet.any_left(),
            Err(e) => {
                return Err(MigrationError::Stream {
                    code: v1::RefusalCode::Internal,
                    reason: e.to_string(),
                });
            }
        };
        // The destinations may run the VM as soon as their stream ends.
        fleet.committed = true;
        fleet.report.nonzero_pages = self.stats.pages;
        fleet.report.pages_sent = self.stats.pages * alive.len() as u64 - fleet.report.pages_local;
        Ok(())
    }

    fn commit(&mut self, fleet: &mut Fleet) -> Result<(), MigrationError> {
        let end = self.source.settled();
        // Every destination owes its answer from now: those that froze
        // together cost one wait, not one each.
        let by = Instant::now() + LOAD_WAIT;
        for i in fleet.alive() {
            let d = &mut fleet.dests[i];
            let answer = match self.early.remove(&i) {
                Some(b) => Ok(b),
                None => super::recv_by(&mut *d.t.link, by, LOAD_WAIT),
            };
            d.state = match answer {
                Ok(Body::Resumed(r)) => {
                    d.progress_after = r.progress;
                    DestState::Done
                }
                // Its QEMU refused the stream: the guest does not run there.
                Ok(Body::Abort(a)) => DestState::Failed(MigrationError::from_abort(a)),
                Ok(other) => DestState::InDoubt(format!("expected resumed, got {other:?}")),
                Err(e) => DestState::InDoubt(e.to_string()),
            };
        }
        let end = end?;
        fleet.report.downtime_ms = end.downtime_ms;
        if !end.completed {
            for d in &mut fleet.dests {
                if matches!(d.state, DestState::Done) && !end.decides {
                    // Its QEMU runs the guest: the source's status is late.
                    continue;
                }
                if matches!(d.state, DestState::Live | DestState::Done) {
                    let reason = format!("the source QEMU says the migration is {}", end.status);
                    d.state = if end.unknown {
                        DestState::InDoubt(reason)
                    } else {
                        DestState::Failed(MigrationError::Stream {
                            code: v1::RefusalCode::Internal,
                            reason,
                        })
                    };
                }
            }
        }
        Ok(())
    }
}

/// For each destination of `alive`: the contents it holds of those the
/// manifest names (every distinct non-zero content it did not say it
/// lacks).
fn held_sets(fleet: &Fleet, alive: &[usize]) -> Vec<HashSet<PageHash>> {
    let distinct: HashSet<PageHash> = fleet
        .table
        .iter()
        .filter(|h| !h.is_zero_page())
        .copied()
        .collect();
    alive
        .iter()
        .map(|&i| {
            let lacks: HashSet<&PageHash> = fleet.dests[i].needs.iter().collect();
            distinct
                .iter()
                .filter(|h| !lacks.contains(h))
                .copied()
                .collect()
        })
        .collect()
}

/// One destination's part being built.
struct Out {
    tx: Option<SyncSender<(v1::StreamPart, bool)>>,
    /// Its parts are of the stream's tail.
    tail: bool,
    held: HashSet<PageHash>,
    data: Vec<u8>,
    held_at: Vec<u32>,
    hashes: Vec<u8>,
    pages_held: u64,
}

impl Out {
    fn new(tx: SyncSender<(v1::StreamPart, bool)>, held: HashSet<PageHash>) -> Self {
        Out {
            tx: Some(tx),
            tail: false,
            held,
            data: Vec::with_capacity(PART_BYTES + PAGE),
            held_at: Vec::new(),
            hashes: Vec::new(),
            pages_held: 0,
        }
    }

    fn live(&self) -> bool {
        self.tx.is_some()
    }

    fn full(&self) -> bool {
        self.data.len() >= PART_BYTES || self.held_at.len() >= PART_HELD
    }

    /// Hands the part to the sending thread; a thread that stopped (its
    /// link failed) drops this destination from the stream.
    fn flush(&mut self, last: bool) {
        let Some(tx) = &self.tx else { return };
        let p = v1::StreamPart {
            data: std::mem::take(&mut self.data).into(),
            held_at: std::mem::take(&mut self.held_at),
            held: std::mem::take(&mut self.hashes).into(),
            last,
        };
        if tx.send((p, self.tail)).is_err() || last {
            self.tx = None;
        }
    }
}

/// The stream to every destination, each with the pages it holds as
/// hashes.
struct Fan<'a> {
    key: ContentKey,
    outs: Vec<Out>,
    /// Asked at every part: a reason stops the stream (the job was
    /// stopped).
    cancelled: &'a mut dyn FnMut() -> Option<String>,
}

impl Fan<'_> {
    fn flush(&mut self, last: bool) {
        for o in &mut self.outs {
            o.flush(last);
        }
    }

    /// Sends the parts that are full (after asking whether to stop).
    fn full(&mut self) -> Result<(), StreamError> {
        if !self.outs.iter().any(|o| o.live() && o.full()) {
            return Ok(());
        }
        if let Some(why) = (self.cancelled)() {
            return Err(StreamError::Stopped(why));
        }
        for o in self.outs.iter_mut().filter(|o| o.full()) {
            o.flush(false);
        }
        if self.outs.iter().all(|o| !o.live()) {
            return Err(StreamError::Sink("every destination failed".into()));
        }
        Ok(())
    }
}

impl Sink for Fan<'_> {
    fn drain(&mut self) -> Result<(), StreamError> {
        for o in &mut self.outs {
            if !o.data.is_empty() || !o.held_at.is_empty() {
                o.flush(false);
            }
            // What comes from now on is the tail: the devices' state.
            o.tail = true;
        }
        Ok(())
    }

    fn raw(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let longest = self
                .outs
                .iter()
                .filter(|o| o.live())
                .map(|o| o.data.len())
                .max()
                .unwrap_or(0);
            let n = rest.len().min(PART_BYTES.saturating_sub(longest).max(1));
            for o in self.outs.iter_mut().filter(|o| o.live()) {
                o.data.extend_from_slice(&rest[..n]);
            }
            rest = &rest[n..];
            self.full()?;
        }
        Ok(())
    }

    fn page(&mut self, _block: &str, _offset: u64, page: &[u8; PAGE]) -> Result<(), StreamError> {
        // Hashed once, and only if some destination holds anything.
        let h = if self.outs.iter().any(|o| o.live() && !o.held.is_empty()) {
            self.key.hash_page(page)
        } else {
            PageHash::ZERO_PAGE
        };
        for o in self.outs.iter_mut().filter(|o| o.live()) {
            if !h.is_zero_page() && o.held.contains(&h) {
                o.held_at.push(o.data.len() as u32);
                o.hashes.extend_from_slice(h.as_bytes());
                o.pages_held += 1;
            } else {
                o.data.extend_from_slice(page);
            }
        }
        self.full()
    }
}
