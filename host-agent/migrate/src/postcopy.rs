//! The destination's side of post-copy: the VM starts on memory whose
//! missing frames are absent; a guest's first touch of one is caught
//! ([`Userfault`]) and asked for (`PageRequest`), while the source pushes
//! every missing frame anyway. Each page is hash-checked on arrival, and
//! the table of what arrived must match the source's digest at the end.
//!
//! Three threads share the work: the caller's starts the VM (which may
//! itself touch missing frames), one turns faults into frame numbers, and
//! one owns the link, asking for faulted frames and placing pages.
//!
//! In a scatter-gather job some missing frames are not the source's to
//! send: their contents sit on other hosts (intermediaries), and a fourth
//! thread gathers them from there ([`Gather`]), the contents of faulted
//! frames first. A content it cannot get is asked of the source, whose
//! paused memory holds every frame until post-copy ends.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pagecast_memory::{Region, Userfault};
use pagecast_pages::{ContentKey, Page, PageHash};
use pagecast_proto::{MAX_NEED_HASHES_PER_FRAME, v1};

use crate::dest::checked;
use crate::{MigrationError, MigrationLink};

type Body = v1::migrate_frame::Body;

/// How long the link thread waits for a frame before it looks for faults
/// again: the most a fault waits before it is asked for.
const POLL: Duration = Duration::from_millis(1);

/// How often a destination gathering from other hosts tells its waiting
/// source it lives.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);

/// What post-copy did at the destination.
#[derive(Debug, Default, Clone)]
pub(crate) struct Finished {
    /// The guest's progress counter once it resumed.
    pub progress: u64,
    /// Frames asked for because the guest (or the host) touched them.
    pub requested: u64,
    /// Frames placed since Commit (before and after the VM resumed).
    pub placed: u64,
    /// Frames placed from contents gathered from other hosts.
    pub gathered: u64,
    /// Frames whose contents could not be gathered, asked of the source.
    pub gather_lost: u64,
    /// Why the first of those could not be.
    pub gather_error: Option<String>,
}

/// Where an arriving VM's contents can be had other than from its
/// source: a scatter-gather job's intermediaries.
pub trait GatherSource: Send {
    /// Fetches each content of `hashes` it can, handing every page to
    /// `got` (the caller checks it against its hash). A content not handed
    /// over is asked of the source; an error means nothing more will come
    /// from here.
    fn fetch(
        &mut self,
        hashes: &[PageHash],
        got: &mut dyn FnMut(PageHash, &Page),
    ) -> Result<(), String>;
}

/// What an arriving VM gathers after its post-copy switchover instead of
/// asking its source for it.
pub struct Gather {
    /// The contents.
    pub contents: HashSet<PageHash>,
    /// Where from.
    pub source: Box<dyn GatherSource>,
}

/// Contents asked of a [`GatherSource`] at once: a faulted frame waits at
/// most for one such batch ahead of it (1 MiB).
const GATHER_BATCH: usize = 256;

/// What the gathering thread hands the link thread.
enum Gathered {
    Page(PageHash, Box<Page>),
    /// Contents it could not get, and why.
    Lost(Vec<PageHash>, String),
}

/// Gathers `order`'s contents from `src`, those sent on `urgent` first,
/// until all were tried or `stop` is set.
fn gather(
    src: &mut dyn GatherSource,
    mut order: VecDeque<PageHash>,
    urgent: &mpsc::Receiver<PageHash>,
    out: &mpsc::Sender<Gathered>,
    stop: &AtomicBool,
) {
    let mut tried: HashSet<PageHash> = HashSet::new();
    while !stop.load(Ordering::Relaxed) {
        let mut batch = Vec::with_capacity(GATHER_BATCH);
        while batch.len() < GATHER_BATCH {
            match urgent.try_recv() {
                Ok(h) if tried.insert(h) => batch.push(h),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        while batch.len() < GATHER_BATCH {
            match order.pop_front() {
                Some(h) if tried.insert(h) => batch.push(h),
                Some(_) => {}
                None => break,
            }
        }
        if batch.is_empty() {
            return;
        }
        let mut got: HashSet<PageHash> = HashSet::with_capacity(batch.len());
        let r = src.fetch(&batch, &mut |h, page| {
            if batch.contains(&h) && got.insert(h) {
                let _ = out.send(Gathered::Page(h, Box::new(*page)));
            }
        });
        let lost: Vec<PageHash> = batch.into_iter().filter(|h| !got.contains(h)).collect();
        match r {
            Ok(()) => {
                if !lost.is_empty() {
                    let _ = out.send(Gathered::Lost(lost, "not held there".into()));
                }
            }
            Err(why) => {
                let mut lost = lost;
                lost.extend(order.drain(..).filter(|h| !tried.contains(h)));
                let _ = out.send(Gathered::Lost(lost, why));
                return;
            }
        }
    }
}

/// What stands for a missing frame's hash in the digest checked before
/// Ready (no page hashes to it: it is not a BLAKE3 output anyone chose).
pub(crate) const MASKED: PageHash = PageHash::from_bytes([0xff; 32]);

/// The frames still to come, as the source lists them after a post-copy
/// switchover (each inside memory, none twice, at most every frame), and
/// the digest of the table with those frames [`MASKED`].
pub(crate) fn read_missing(
    next: &mut dyn FnMut() -> Result<Body, MigrationError>,
    pages: u64,
) -> Result<(Vec<u64>, Vec<u8>), MigrationError> {
    let mut seen = HashSet::new();
    loop {
        let m = match next()? {
            Body::PostcopyMissing(m) => m,
            other => {
                return Err(MigrationError::Protocol(format!(
                    "expected the post-copy frame list, got {other:?}"
                )));
            }
        };
        for &f in &m.frames {
            if f >= pages || !seen.insert(f) {
                return Err(MigrationError::Protocol(format!(
                    "post-copy frame list names frame {f} (of {pages}) out of range or twice"
                )));
            }
        }
        if m.last {
            if m.digest.len() != 32 {
                return Err(MigrationError::Protocol(
                    "the post-copy frame list ends without its 32-byte digest".into(),
                ));
            }
            let mut v: Vec<u64> = seen.into_iter().collect();
            v.sort_unstable();
            return Ok((v, m.digest.to_vec()));
        }
    }
}

/// Starts the VM on `region` with `missing` frames absent and completes
/// its memory: `table` holds the hash of every other frame. `start` runs
/// the VM and returns its progress counter. Returns once every frame is
/// there and the table matches the source's digest; an error after
/// `start` succeeded leaves a VM that cannot run on
/// ([`MigrationError::PostcopyLost`] or a failed verification).
/// `gathering`: the missing frames (included in `missing`) to be had from
/// `Gather`'s hosts rather than the source, by content.
#[allow(clippy::too_many_arguments)]
pub(crate) fn complete(
    link: &mut dyn MigrationLink,
    key: &ContentKey,
    mut region: Region,
    mut table: Vec<Option<PageHash>>,
    missing: &[u64],
    gathering: Option<(Gather, HashMap<PageHash, Vec<u64>>)>,
    timeout: Duration,
    start: &mut dyn FnMut(Region) -> Result<u64, String>,
) -> Result<Finished, MigrationError> {
    // Registered first, then dropped: a frame dropped before the region is
    // registered could be filled in between (the kernel merging it into a
    // huge page) and would then never fault.
    let prepared = Userfault::register(&region).and_then(|uf| {
        region.discard(missing)?;
        Ok(uf)
    });
    let uf = match prepared {
        Ok(uf) => Arc::new(uf),
        // Nothing ran yet: the source hears the VM did not start.
        Err(e) => return Err(MigrationError::Start(format!("post-copy: {e}"))),
    };
    for &f in missing {
        table[f as usize] = None;
    }
    region.keep_userfault(uf.clone());
    let stop = AtomicBool::new(false);
    let (uf_ref, stop_ref) = (&*uf, &stop);
    let (faults_tx, faults_rx) = mpsc::channel::<u64>();
    let (started_tx, started_rx) = mpsc::channel::<Result<u64, String>>();
    let (urgent_tx, urgent_rx) = mpsc::channel::<PageHash>();
    let (gathered_tx, gathered_rx) = mpsc::channel::<Gathered>();
    let Owed {
        mut source,
        frames: gather_frames,
        of: gather_of,
        awaiting,
        order,
    } = Owed::of(missing, gathering);
    std::thread::scope(|s| {
        let catcher = s.spawn(|| catch(&uf, &stop, faults_tx));
        let gatherer = source.as_mut().map(|src| {
            let stop = &stop;
            s.spawn(move || gather(&mut **src, order, &urgent_rx, &gathered_tx, stop))
        });
        let serving = s.spawn(move || {
            let mut l = Serve {
                link,
                key,
                uf: uf_ref,
                table,
                left: missing.len(),
                asked: HashSet::new(),
                awaiting,
                gather_frames,
                gather_of,
                urgent: urgent_tx,
                timeout,
                done: Finished::default(),
            };
            let r = l.run(&faults_rx, &started_rx, &gathered_rx);
            if r.is_err() {
                // The guest never runs on: marked failed, its vCPU is held
                // at its next exit until the caller stops it. Whoever waits
                // on a frame that will never come (the vCPU inside KVM,
                // whose wait no signal interrupts, or a start reading the
                // guest) is let go by the release below: until that exit
                // the guest may read zeros where pages were missing, and
                // nothing it does is kept.
                uf_ref.fail();
            }
            // Done or failed, nothing is handled any more: memory dropped
            // later must not wait for a handler.
            uf_ref.release();
            stop_ref.store(true, Ordering::Relaxed);
            r.map(|()| l.done)
        });
        let started = start(region);
        let failed_start = started.is_err();
        let _ = started_tx.send(started);
        let r = serving.join().unwrap_or_else(|_| {
            Err(MigrationError::Protocol(
                "the post-copy link thread panicked".into(),
            ))
        });
        stop.store(true, Ordering::Relaxed);
        let _ = catcher.join();
        if let Some(g) = gatherer {
            let _ = g.join();
        }
        outcome(r, failed_start)
    })
}

/// Post-copy's end as the caller hears it: a start that failed, or a VM
/// that cannot run on (post-copy lost, or a failed verification).
fn outcome(
    r: Result<Finished, MigrationError>,
    failed_start: bool,
) -> Result<Finished, MigrationError> {
    match r {
        Ok(done) => Ok(done),
        Err(MigrationError::PostcopyLost(why)) if failed_start => Err(MigrationError::Start(why)),
        // The VM runs on memory it can no longer complete, or that does
        // not match its source: either way it cannot run on, and the error
        // says which.
        Err(e @ (MigrationError::PostcopyLost(_) | MigrationError::Verification(_))) => Err(e),
        Err(e) => Err(MigrationError::PostcopyLost(e.to_string())),
    }
}

/// Who owes each missing frame: the source, or (by content) the hosts a
/// [`Gather`] names.
struct Owed {
    source: Option<Box<dyn GatherSource>>,
    /// Frames to gather, by content, and their content by frame.
    frames: HashMap<PageHash, Vec<u64>>,
    of: HashMap<u64, PageHash>,
    /// Frames the source is to send.
    awaiting: HashSet<u64>,
    /// The contents to gather, in the order asked for.
    order: VecDeque<PageHash>,
}

impl Owed {
    fn of(missing: &[u64], gathering: Option<(Gather, HashMap<PageHash, Vec<u64>>)>) -> Owed {
        let (source, frames) = match gathering {
            Some((g, frames)) => (Some(g.source), frames),
            None => (None, HashMap::new()),
        };
        let of: HashMap<u64, PageHash> = frames
            .iter()
            .flat_map(|(h, fs)| fs.iter().map(move |&f| (f, *h)))
            .collect();
        let awaiting = missing
            .iter()
            .copied()
            .filter(|f| !of.contains_key(f))
            .collect();
        let mut order: Vec<PageHash> = frames.keys().copied().collect();
        order.sort_unstable();
        Owed {
            source,
            frames,
            of,
            awaiting,
            order: order.into(),
        }
    }
}

/// Turns missing-page faults into frame numbers until told to stop.
fn catch(uf: &Userfault, stop: &AtomicBool, out: mpsc::Sender<u64>) {
    let mut frames = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        frames.clear();
        if uf.faults(Duration::from_millis(20), &mut frames).is_err() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        for &f in &frames {
            if out.send(f).is_err() {
                return;
            }
        }
    }
}

/// The link's side of post-copy.
struct Serve<'a> {
    link: &'a mut dyn MigrationLink,
    key: &'a ContentKey,
    uf: &'a Userfault,
    table: Vec<Option<PageHash>>,
    /// Missing frames not placed yet.
    left: usize,
    asked: HashSet<u64>,
    /// Missing frames the source is to send, not placed yet: while any is
    /// left, the source's silence is a failure.
    awaiting: HashSet<u64>,
    /// Frames still to be gathered from other hosts, by content.
    gather_frames: HashMap<PageHash, Vec<u64>>,
    gather_of: HashMap<u64, PageHash>,
    /// Contents of faulted frames, for the gathering thread to get first.
    urgent: mpsc::Sender<PageHash>,
    timeout: Duration,
    done: Finished,
}

impl Serve<'_> {
    fn run(
        &mut self,
        faults: &mpsc::Receiver<u64>,
        started: &mpsc::Receiver<Result<u64, String>>,
        gathered: &mpsc::Receiver<Gathered>,
    ) -> Result<(), MigrationError> {
        let mut resumed = false;
        let mut digest: Option<Vec<u8>> = None;
        let mut heard = Instant::now();
        let mut told = Instant::now();
        loop {
            while let Ok(g) = gathered.try_recv() {
                if self.gathered(g)? {
                    // The source, silent since its digest, is asked again:
                    // its answer has the reply timeout from now.
                    heard = Instant::now();
                }
            }
            if !self.gather_frames.is_empty() && told.elapsed() >= KEEPALIVE_EVERY {
                // The source waits for the end while pages come from
                // elsewhere: it hears this host lives.
                self.link.send(Body::KeepAlive(v1::KeepAlive {}))?;
                told = Instant::now();
            }
            if !resumed {
                match started.try_recv() {
                    Ok(Ok(progress)) => {
                        resumed = true;
                        self.done.progress = progress;
                        crate::failpoint::hit(crate::failpoint::Point::DestResumed)?;
                        self.link.send(Body::Resumed(v1::Resumed { progress }))?;
                    }
                    Ok(Err(why)) => {
                        let e = MigrationError::Start(why.clone());
                        let _ = self.link.send(Body::Abort(e.to_abort()));
                        return Err(MigrationError::PostcopyLost(why));
                    }
                    Err(_) => {}
                }
            }
            self.ask(faults)?;
            if resumed
                && self.left == 0
                && let Some(d) = digest.take()
            {
                return self.verdict(&d);
            }
            match self.link.recv(Some(POLL)) {
                Ok(Body::Pages(p)) => {
                    heard = Instant::now();
                    self.place(&p)?;
                }
                Ok(Body::Digest(d)) => {
                    heard = Instant::now();
                    digest = Some(d.digest.to_vec());
                }
                Ok(Body::KeepAlive(_)) => heard = Instant::now(),
                Ok(Body::Abort(a)) => {
                    return Err(MigrationError::PostcopyLost(format!(
                        "{} aborted: {}",
                        self.link.peer(),
                        a.reason
                    )));
                }
                Ok(other) => {
                    return Err(MigrationError::PostcopyLost(format!(
                        "unexpected {other:?} during post-copy"
                    )));
                }
                Err(MigrationError::Timeout { .. }) => {
                    // Once the source has sent all it was to send, only a
                    // page asked of it keeps the clock running.
                    let owed = digest.is_none() || !self.awaiting.is_empty();
                    if owed && heard.elapsed() >= self.timeout {
                        return Err(MigrationError::PostcopyLost(format!(
                            "{} sent nothing for {:?} with {} frames still missing",
                            self.link.peer(),
                            self.timeout,
                            self.left
                        )));
                    }
                }
                Err(e) => return Err(MigrationError::PostcopyLost(e.to_string())),
            }
        }
    }

    /// Asks for every faulted frame not yet there nor asked for: of the
    /// gathering thread if its content is to be gathered, else of the
    /// source.
    fn ask(&mut self, faults: &mpsc::Receiver<u64>) -> Result<(), MigrationError> {
        let mut want = Vec::new();
        while let Ok(f) = faults.try_recv() {
            let missing = self.table.get(f as usize).is_some_and(Option::is_none);
            if missing && self.asked.insert(f) {
                match self.gather_of.get(&f) {
                    Some(h) if self.gather_frames.contains_key(h) => {
                        self.done.requested += 1;
                        let _ = self.urgent.send(*h);
                    }
                    _ => want.push(f),
                }
            }
        }
        self.done.requested += want.len() as u64;
        self.request(&want)
    }

    /// Asks the source for `frames`.
    fn request(&mut self, frames: &[u64]) -> Result<(), MigrationError> {
        for chunk in frames.chunks(MAX_NEED_HASHES_PER_FRAME) {
            self.link.send(Body::PageRequest(v1::PageRequest {
                frames: chunk.to_vec(),
            }))?;
        }
        Ok(())
    }

    /// Places each page of `p` in its frame if that frame is still missing
    /// (a frame both asked for and pushed arrives twice).
    fn place(&mut self, p: &v1::Pages) -> Result<(), MigrationError> {
        let pages = checked(self.key, &p.hashes, &p.data, p.frames.len())?;
        for (&f, (page, h)) in p.frames.iter().zip(pages) {
            if f >= self.table.len() as u64 {
                return Err(MigrationError::Protocol(format!(
                    "post-copy page for frame {f}, beyond memory"
                )));
            }
            self.place_one(f, page, h)?;
        }
        Ok(())
    }

    /// Places `page` (checked to be `h`) in frame `f` if it is missing.
    fn place_one(&mut self, f: u64, page: &Page, h: PageHash) -> Result<bool, MigrationError> {
        if self.table[f as usize].is_some() {
            return Ok(false);
        }
        // A missing frame that turns out present was filled by something
        // else: its content cannot be trusted.
        if !self.uf.place(f, page)? {
            return Err(MigrationError::Verification(format!(
                "frame {f} was filled while it was missing"
            )));
        }
        self.table[f as usize] = Some(h);
        self.awaiting.remove(&f);
        self.left -= 1;
        self.done.placed += 1;
        Ok(true)
    }

    /// A content gathered (placed in every frame still waiting for it, if
    /// it hashes to what it was asked for) or lost (its frames asked of the
    /// source). True if the source was asked for frames.
    fn gathered(&mut self, g: Gathered) -> Result<bool, MigrationError> {
        let lost = match g {
            Gathered::Page(h, page) if self.key.hash_page(&page) == h => {
                for f in self.gather_frames.remove(&h).unwrap_or_default() {
                    if self.place_one(f, &page, h)? {
                        self.done.gathered += 1;
                    }
                }
                return Ok(false);
            }
            Gathered::Page(h, _) => {
                let why = format!("the page gathered for {h} has another content");
                self.done.gather_error.get_or_insert(why);
                vec![h]
            }
            Gathered::Lost(hashes, why) => {
                self.done.gather_error.get_or_insert(why);
                hashes
            }
        };
        let mut frames = Vec::new();
        for h in lost {
            for f in self.gather_frames.remove(&h).unwrap_or_default() {
                if self.table[f as usize].is_none() {
                    self.awaiting.insert(f);
                    self.asked.insert(f);
                    frames.push(f);
                }
            }
        }
        self.done.gather_lost += frames.len() as u64;
        self.request(&frames)?;
        Ok(!frames.is_empty())
    }

    /// Every frame is there: the table must be the source's.
    fn verdict(&mut self, digest: &[u8]) -> Result<(), MigrationError> {
        let ok = digest == crate::digest_of(self.table.iter().map(|h| h.expect("all there")));
        let e = MigrationError::Verification(
            "page hashes after post-copy differ from the source's".into(),
        );
        self.link.send(Body::PostcopyDone(v1::PostcopyDone {
            ok,
            reason: if ok { String::new() } else { e.to_string() },
            code: if ok { 0 } else { e.code() as i32 },
        }))?;
        if ok { Ok(()) } else { Err(e) }
    }
}
