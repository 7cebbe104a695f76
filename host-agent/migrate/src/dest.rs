//! The destination side of a migration.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagecast_pages::{ContentKey, PAGE_SIZE, Page, PageHash, is_zero_page};
use pagecast_proto::v1::RefusalCode;
use pagecast_proto::{
    MAX_MIGRATE_PAGES_PER_FRAME, MAX_NEED_HASHES_PER_FRAME, MIGRATE_WIRE_VERSION, v1,
};
use serde::Serialize;

use crate::postcopy::Gather;
use crate::{LocalContent, MigrationError, MigrationLink, REPLY_TIMEOUT, table_digest};
use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_memory::kvm::{MAX_MEMORY_BYTES, MIN_MEMORY_BYTES, VcpuState};
use pagecast_memory::manifest::ManifestDecoder;
use pagecast_memory::{MemoryError, Region};

type Body = v1::migrate_frame::Body;

/// What a migration did, from the destination's side.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct IncomingReport {
    /// The VM's name.
    pub vm: String,
    /// Frames filled from pages this host already held.
    pub pages_local: u64,
    /// Frames filled from pages received.
    pub pages_received: u64,
    /// The guest's progress counter once resumed.
    pub progress: u64,
    /// From the source's switchover message to resuming, as seen here
    /// (post-copy: to the last page arriving).
    pub switchover_ms: f64,
    /// The VM resumed here before every page arrived (post-copy).
    pub postcopy: bool,
    /// Post-copy: frames asked for because the guest touched them.
    pub postcopy_requested: u64,
    /// Post-copy: frames filled from contents gathered from hosts other
    /// than the source (a scatter-gather job's intermediaries).
    pub postcopy_gathered: u64,
    /// Post-copy: frames whose contents could not be gathered there and
    /// were asked of the source instead.
    pub postcopy_gather_lost: u64,
    /// Why the first of those could not be gathered ("" if none).
    pub postcopy_gather_error: String,
    /// Seconds from accepting the migration to its manifest read in full.
    pub manifest_s: f64,
    /// Seconds the copies of what this host held took (in a gang job,
    /// while the source held, after the first needs went back).
    pub local_fill_s: f64,
    /// A post-copy switchover's steps here, in milliseconds since the
    /// source's switchover message (all zero for pre-copy).
    pub resume: ResumeSteps,
}

/// When each step of a post-copy switchover ended at the destination, in
/// milliseconds since the source's switchover message: where a pause
/// longer than the downtime target went.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct ResumeSteps {
    /// The missing frames' list and the vCPU state read.
    pub read_ms: f64,
    /// The frames held checked against the source's digest, and Ready
    /// sent.
    pub checked_ms: f64,
    /// The source's Commit heard.
    pub commit_ms: f64,
    /// The memory free of other users and faulted in.
    pub memory_ms: f64,
    /// The VM started.
    pub started_ms: f64,
}

/// A VM arriving here, while its memory fills: the engine writes pages it
/// receives into it, and a gang job's casts and fetches (other threads)
/// write pages they bring for it, each page hash-checked by whoever brings
/// it. Shared through [`SlotEvents`] while the migration runs.
pub struct IncomingSlot {
    vm: String,
    /// The VM's dedup domain ("" for the cluster-wide one) and its key:
    /// every page is checked with it.
    domain: String,
    key: ContentKey,
    region: Region,
    state: Mutex<SlotState>,
}

struct SlotState {
    /// Hash of what each frame holds (None until filled).
    table: Vec<Option<PageHash>>,
    /// Per content the manifest names: its frames.
    frames_of: HashMap<PageHash, Vec<u64>>,
    /// A frame already holding each content (for copies).
    here: HashMap<PageHash, u64>,
    /// Frames filled by others (casts, fetches).
    filled_by_others: u64,
}

impl IncomingSlot {
    fn new(vm: &str, domain: (&str, ContentKey), region: Region) -> Self {
        let pages = region.pages() as usize;
        let (domain, key) = domain;
        IncomingSlot {
            vm: vm.to_owned(),
            domain: domain.to_owned(),
            key,
            region,
            state: Mutex::new(SlotState {
                table: vec![None; pages],
                frames_of: HashMap::new(),
                here: HashMap::new(),
                filled_by_others: 0,
            }),
        }
    }

    /// A landing slot for contents a gang job brings to a VM whose memory
    /// is not this host's to write (an adopted QEMU VM arriving through
    /// its stream proxy): one scratch frame per content in `wants`, which
    /// the job's casts and fetches fill, hash-checked, and
    /// [`IncomingSlot::copy`] reads back.
    pub fn landing(
        vm: &str,
        domain: (&str, ContentKey),
        wants: &[PageHash],
    ) -> Result<Self, MemoryError> {
        let region = Region::anonymous_unpopulated((wants.len().max(1) * PAGE_SIZE) as u64)?;
        let slot = Self::new(vm, domain, region);
        {
            let mut st = slot.lock();
            for (i, h) in wants.iter().enumerate() {
                st.frames_of.entry(*h).or_default().push(i as u64);
            }
        }
        Ok(slot)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        crate::lock(&self.state)
    }

    /// The VM's name.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// The key of the arriving VM's dedup domain: whoever brings a page
    /// checks it with this key.
    pub fn key(&self) -> &ContentKey {
        &self.key
    }

    /// The arriving VM's dedup domain ("" for the cluster-wide one).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Whether some frame still waits for content `h`.
    pub fn wants(&self, h: &PageHash) -> bool {
        let st = self.lock();
        st.frames_of
            .get(h)
            .is_some_and(|fs| fs.iter().any(|&f| st.table[f as usize].is_none()))
    }

    /// Contents some frame still waits for.
    pub fn missing(&self) -> Vec<PageHash> {
        let st = self.lock();
        let mut v: Vec<PageHash> = st
            .frames_of
            .iter()
            .filter(|(_, fs)| fs.iter().any(|&f| st.table[f as usize].is_none()))
            .map(|(h, _)| *h)
            .collect();
        v.sort_unstable();
        v
    }

    /// Writes `page`, whose hash the caller checked is `h`, into every frame
    /// still waiting for `h`; returns how many.
    pub fn fill(&self, h: &PageHash, page: &Page) -> Result<u64, MemoryError> {
        let mut st = self.lock();
        let Some(frames) = st.frames_of.get(h).cloned() else {
            return Ok(0);
        };
        let mut n = 0;
        for f in frames {
            if st.table[f as usize].is_none() {
                self.region.write_page(f, page)?;
                st.table[f as usize] = Some(*h);
                n += 1;
            }
        }
        if n > 0 {
            let first = st.frames_of[h][0];
            st.here.entry(*h).or_insert(first);
            st.filled_by_others += n;
        }
        Ok(n)
    }

    /// Copies content `h` from a frame of this VM that holds it, checking
    /// the copy's hash; false if none does.
    pub fn copy(&self, h: &PageHash, out: &mut Page) -> bool {
        let f = {
            let st = self.lock();
            match st.here.get(h) {
                Some(&f) if st.table[f as usize] == Some(*h) => f,
                _ => return false,
            }
        };
        self.region.read_page(f, out).is_ok() && self.key.hash_page(out) == *h
    }

    /// Whether a frame of this VM already holds content `h`.
    pub fn holds(&self, h: &PageHash) -> bool {
        let st = self.lock();
        st.here
            .get(h)
            .is_some_and(|&f| st.table[f as usize] == Some(*h))
    }

    /// Writes `page` (content `h`, checked by the caller) into `frames`,
    /// which no other writer fills (the local copies' own frames): the
    /// pages are written, and faulted in, without the slot's lock, which
    /// the job's casts take for every page (the copies run at a lower
    /// priority and must not keep them waiting); the table says so after.
    fn write_frames(&self, frames: &[u64], h: PageHash, page: &Page) -> Result<(), MemoryError> {
        for &f in frames {
            self.region.write_page(f, page)?;
        }
        let mut st = self.lock();
        for &f in frames {
            st.table[f as usize] = Some(h);
        }
        if let Some(&f) = frames.first() {
            st.here.insert(h, f);
        }
        Ok(())
    }

    /// Lets `frames` wait for content `h` with the frames the job's
    /// transfers and the migration fill.
    fn wait_for(&self, h: PageHash, frames: &[u64]) {
        self.lock()
            .frames_of
            .entry(h)
            .or_default()
            .extend_from_slice(frames);
    }

    /// Frames filled by a gang job's casts and fetches.
    pub fn filled_by_others(&self) -> u64 {
        self.lock().filled_by_others
    }

    /// Copies frame `f` as it is now.
    pub fn read_frame(&self, f: u64, out: &mut Page) -> Result<(), MemoryError> {
        self.region.read_page(f, out)
    }

    /// Writes `page` (content `h`, checked by the caller) into frame `f`.
    pub fn write_frame(&self, f: u64, h: PageHash, page: &Page) -> Result<(), MemoryError> {
        if f >= self.region.pages() {
            return Err(MemoryError::FrameOutOfRange {
                frame: f,
                pages: self.region.pages(),
            });
        }
        self.write(f, h, page)
    }

    fn write(&self, f: u64, h: PageHash, page: &Page) -> Result<(), MemoryError> {
        let mut st = self.lock();
        self.region.write_page(f, page)?;
        st.table[f as usize] = Some(h);
        if !h.is_zero_page() {
            st.here.insert(h, f);
        }
        Ok(())
    }
}

/// The threads preparing an arriving VM's memory (faulting it in,
/// copying what this host holds), at low priority (nice 10) while they run
/// beside the job's transfers, which the whole job waits for on a busy
/// host; once the migration waits for them instead (the source's refill,
/// or the rounds), [`Background::hurry`] puts them back at normal
/// priority.
#[derive(Default)]
struct Background {
    /// Thread ids of those running at low priority.
    tids: Mutex<Vec<libc::pid_t>>,
    /// The migration waits for them: new ones start at normal priority.
    hurried: AtomicBool,
}

/// A thread's place in [`Background`]: leaving it (the thread ends) takes
/// the thread's id out, so a later id that reuses it is never touched.
struct BackgroundThread<'a> {
    of: &'a Background,
    tid: libc::pid_t,
}

impl Drop for BackgroundThread<'_> {
    fn drop(&mut self) {
        crate::lock(&self.of.tids).retain(|&t| t != self.tid);
    }
}

/// Sets thread `tid`'s nice value; false if the kernel refused (raising a
/// priority takes CAP_SYS_NICE).
fn set_nice(tid: libc::pid_t, nice: libc::c_int) -> bool {
    // SAFETY: setpriority on a thread id of this process changes only how
    // the scheduler weighs that thread; an id no longer in use fails with
    // ESRCH.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) == 0 }
}

impl Background {
    /// Lowers the calling thread to nice 10, unless the migration already
    /// waits for it; it stays in until the guard drops.
    fn enter(&self) -> BackgroundThread<'_> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let mut tids = crate::lock(&self.tids);
        if !self.hurried.load(Ordering::Relaxed) {
            set_nice(tid, 10);
            tids.push(tid);
        }
        BackgroundThread { of: self, tid }
    }

    /// Puts every thread in back at normal priority (nice 0), and those
    /// that enter later stay there: the migration now waits for them.
    /// Without CAP_SYS_NICE they stay at nice 10.
    fn hurry(&self) {
        let tids = crate::lock(&self.tids);
        self.hurried.store(true, Ordering::Relaxed);
        for &t in tids.iter() {
            set_nice(t, 0);
        }
    }
}

/// The frames of an arriving VM this host can fill from pages it holds,
/// by content, in the order of their first frames (planned by lookups;
/// [`LocalPlan::fill`] copies them).
#[derive(Default)]
struct LocalPlan {
    contents: Vec<(PageHash, Vec<u64>)>,
}

/// What [`LocalPlan::fill`] did.
struct Copied {
    /// Frames filled.
    frames: u64,
    /// Contents that could not be copied after all (changed or gone
    /// since the lookup), or were not copied because the fill stopped:
    /// their frames now wait with the others.
    lost: Vec<PageHash>,
    /// Seconds the copies took.
    secs: f64,
}

impl LocalPlan {
    /// Frames planned.
    fn frames(&self) -> u64 {
        self.contents.iter().map(|(_, fs)| fs.len() as u64).sum()
    }

    /// Copies each content once from `local` (hash-checked there) into
    /// all its frames. What cannot be copied, and everything left once
    /// `stop` is set, waits in `slot` for the job's transfers or the
    /// migration.
    fn fill(
        &self,
        slot: &IncomingSlot,
        local: &dyn LocalContent,
        stop: &AtomicBool,
    ) -> Result<Copied, MemoryError> {
        let t = Instant::now();
        let mut page = [0u8; PAGE_SIZE];
        let mut done = Copied {
            frames: 0,
            lost: Vec::new(),
            secs: 0.0,
        };
        for (h, frames) in &self.contents {
            if !stop.load(Ordering::Relaxed) && local.copy(&slot.key, h, &mut page) {
                slot.write_frames(frames, *h, &page)?;
                done.frames += frames.len() as u64;
            } else {
                slot.wait_for(*h, frames);
                done.lost.push(*h);
            }
        }
        done.secs = t.elapsed().as_secs_f64();
        Ok(done)
    }
}

/// What the destination engine tells its caller about the arriving VM's
/// slot: it exists (a gang job's casts may now fill it) and it is gone.
pub trait SlotEvents {
    /// The slot is ready: its manifest is known and the local fill done.
    fn opened(&mut self, slot: &Arc<IncomingSlot>);
    /// The slot is closing: nobody else may write it any more.
    fn closed(&mut self, slot: &Arc<IncomingSlot>);
    /// The source invites this destination to the cast whose sender listens
    /// on `control`: receive it into `slot` (by content, or `by_frame`) and
    /// return the frames filled. Blocks until the cast ends.
    fn join_cast(
        &mut self,
        slot: &Arc<IncomingSlot>,
        control: &str,
        by_frame: bool,
    ) -> Result<u64, String> {
        let _ = (slot, control, by_frame);
        Err("this destination cannot join casts".into())
    }
    /// After a gang job's hold, for a VM that may switch over by
    /// post-copy: which of the contents `still` lacking the job will have
    /// this host gather from other hosts once the VM runs here, and from
    /// where. The source is not asked for those.
    fn gather(&mut self, slot: &Arc<IncomingSlot>, still: &[PageHash]) -> Option<Gather> {
        let _ = (slot, still);
        None
    }
}

/// No gang job: nobody else fills the slot.
pub struct NoSlotEvents;

impl SlotEvents for NoSlotEvents {
    fn opened(&mut self, _: &Arc<IncomingSlot>) {}
    fn closed(&mut self, _: &Arc<IncomingSlot>) {}
}

/// How an arriving VM's memory is laid out while it fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// The VM's own memory, frame for frame (a micro-VM this host runs).
    Frames,
    /// One scratch frame per distinct content the manifest names (an
    /// adopted QEMU VM: its memory is its QEMU's to write, and QEMU's own
    /// stream says where each page goes).
    Contents,
}

/// Largest guest an arriving QEMU VM may have (its stream parser's bound).
const MAX_CONTENTS_MEMORY: u64 = 16 << 40;

/// An arriving VM after the part of the exchange every kind shares: the
/// offer accepted, the manifest read, what this host held filled in, the
/// needs answered, and (a gang job's hold) what the job brought taken in
/// and the needs answered again. What follows is the kind's own:
/// [`Arrival::rounds`] for a micro-VM, a QEMU stream for a QEMU VM.
pub struct Arrival<'a> {
    link: &'a mut dyn MigrationLink,
    timeout: Duration,
    slot: Arc<IncomingSlot>,
    report: IncomingReport,
    /// Faulting in the arriving VM's memory, off the handshake's path.
    populating: Option<std::thread::JoinHandle<Result<(), pagecast_memory::MemoryError>>>,
    /// Every page of the memory is faulted in.
    faulted_in: bool,
    /// The VM runs here: whatever fails now, the source must not hear
    /// Abort (it would resume its copy).
    started: bool,
    /// This host accepted post-copy.
    postcopy: bool,
    /// Contents to gather from other hosts after a post-copy switchover.
    gather: Option<Gather>,
    /// The threads faulting in and filling its memory at low priority.
    background: Arc<Background>,
}

/// Refuses a migration at its first frame.
fn refuse<T>(
    link: &mut dyn MigrationLink,
    code: RefusalCode,
    why: String,
) -> Result<T, MigrationError> {
    let _ = link.send(Body::Accept(v1::MigrateAccept {
        ok: false,
        reason: why.clone(),
        code: code as i32,
        postcopy: false,
    }));
    Err(MigrationError::Refused { code, reason: why })
}

/// Checks a migration's first frame; returns the key of its domain here.
fn check_begin(
    begin: &v1::MigrateBegin,
    local: &dyn LocalContent,
    shape: Shape,
) -> Result<ContentKey, (RefusalCode, String)> {
    if begin.version != MIGRATE_WIRE_VERSION as i32 {
        return Err((
            RefusalCode::Invalid,
            format!(
                "wire version {} is not supported (this agent speaks {})",
                begin.version, MIGRATE_WIRE_VERSION as i32
            ),
        ));
    }
    let bytes = begin.memory_bytes;
    let range = match shape {
        Shape::Frames => MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES,
        Shape::Contents => PAGE_SIZE as u64..=MAX_CONTENTS_MEMORY,
    };
    if !range.contains(&bytes) || !bytes.is_multiple_of(PAGE_SIZE as u64) {
        return Err((
            RefusalCode::Invalid,
            format!("memory of {bytes} bytes is out of range"),
        ));
    }
    if !pagecast_proto::name_ok(&begin.vm) {
        return Err((
            RefusalCode::Invalid,
            format!("VM name {:?}: use {}", begin.vm, pagecast_proto::NAME_RULE),
        ));
    }
    let key = local
        .domain_key(&begin.domain)
        .map_err(|why| (RefusalCode::Refused, why))?;
    if key.check() != begin.domain_check {
        return Err((
            RefusalCode::Refused,
            format!(
                "dedup domain {:?}: this host's key differs from the source's (the two hosts \
                 hold different domain secrets)",
                pagecast_pages::domain::normalize(&begin.domain)
            ),
        ));
    }
    Ok(key)
}

/// Receives what every kind of arriving VM shares, up to the moment its
/// own transfer starts (see [`Arrival`]). `shape` says how its memory is
/// held meanwhile. On any failure the source is told (Abort) and nothing
/// is kept.
pub fn receive_front<'a>(
    link: &'a mut dyn MigrationLink,
    begin: &v1::MigrateBegin,
    local: &dyn LocalContent,
    events: &mut dyn SlotEvents,
    shape: Shape,
) -> Result<Arrival<'a>, MigrationError> {
    let key = match check_begin(begin, local, shape) {
        Ok(k) => k,
        Err((code, why)) => return refuse(link, code, why),
    };
    // A micro-VM's memory is mapped now and populated by a thread after
    // the answer: faulting in a large VM's memory on a busy host takes
    // seconds, which the source would otherwise wait for. A QEMU VM's
    // scratch frames wait for the manifest (they are one per content).
    let region = match shape {
        Shape::Frames => match Region::anonymous_unpopulated(begin.memory_bytes) {
            Ok(r) => Some(r),
            Err(e) => return refuse(link, RefusalCode::Internal, e.to_string()),
        },
        Shape::Contents => None,
    };
    // Post-copy needs userfaultfd here: without it (no privilege), the
    // source is told so and switches over by pre-copy.
    let postcopy =
        begin.postcopy && shape == Shape::Frames && pagecast_memory::Userfault::available().is_ok();
    link.send(Body::Accept(v1::MigrateAccept {
        ok: true,
        postcopy,
        ..Default::default()
    }))?;
    let mut arrival = Arrival {
        link,
        timeout: REPLY_TIMEOUT,
        slot: Arc::new(IncomingSlot::new(
            &begin.vm,
            (&begin.domain, key),
            Region::anonymous(PAGE_SIZE as u64)?,
        )),
        report: IncomingReport {
            vm: begin.vm.clone(),
            ..IncomingReport::default()
        },
        populating: None,
        faulted_in: false,
        started: false,
        postcopy,
        gather: None,
        background: Arc::default(),
    };
    if let Some(region) = region {
        arrival.slot = Arc::new(IncomingSlot::new(&begin.vm, (&begin.domain, key), region));
        let filling = arrival.slot.clone();
        let background = arrival.background.clone();
        arrival.populating = std::thread::Builder::new()
            .name("pagecast-populate".into())
            .spawn(move || {
                let _low = background.enter();
                filling.region.populate()
            })
            .ok();
    }
    let mut opened = false;
    let r = arrival.front(begin, local, events, shape, key, &mut opened);
    if let Err(e) = &r {
        if opened {
            events.closed(&arrival.slot);
        }
        if !e.link_is_gone() {
            let _ = arrival.link.send(Body::Abort(e.to_abort()));
        }
    }
    r.map(|()| arrival)
}

/// Receives a migration announced by `begin` over `link`: reserves memory,
/// fills what `local` holds, takes the rest, and at switchover checks that
/// every frame's hash matches the source's before answering Ready. On
/// Commit it hands memory and vCPU state to `start`, which resumes the VM
/// and returns its progress counter. On any failure nothing is kept.
pub fn migrate_in(
    link: &mut dyn MigrationLink,
    begin: &v1::MigrateBegin,
    local: &dyn LocalContent,
    fp: &Fingerprinter,
    start: &mut dyn FnMut(Region, VcpuState) -> Result<u64, String>,
) -> Result<IncomingReport, MigrationError> {
    migrate_in_job(link, begin, local, fp, &mut NoSlotEvents, start)
}

/// [`migrate_in`], telling `events` when the arriving VM's memory can be
/// filled by others (a gang job's casts and fetches) and when it can no
/// longer.
pub fn migrate_in_job(
    link: &mut dyn MigrationLink,
    begin: &v1::MigrateBegin,
    local: &dyn LocalContent,
    fp: &Fingerprinter,
    events: &mut dyn SlotEvents,
    start: &mut dyn FnMut(Region, VcpuState) -> Result<u64, String>,
) -> Result<IncomingReport, MigrationError> {
    let mut arrival = receive_front(link, begin, local, events, Shape::Frames)?;
    let r = arrival.rounds(begin, fp, events, start);
    if let Err(e) = &r {
        arrival.fail(events, e);
    }
    r
}

impl Arrival<'_> {
    fn mem(&self) -> &Region {
        &self.slot.region
    }

    /// The arriving VM's memory as it fills (for a QEMU VM: one frame per
    /// content).
    pub fn slot(&self) -> &Arc<IncomingSlot> {
        &self.slot
    }

    /// What arrived so far.
    pub fn report(&mut self) -> &mut IncomingReport {
        &mut self.report
    }

    /// Sends `body` to the source.
    pub fn send(&mut self, body: Body) -> Result<(), MigrationError> {
        self.link.send(body)
    }

    /// Ends a failed arrival: the slot closes, and the source hears why
    /// unless the VM already runs here (then it is left to ask).
    pub fn fail(&mut self, events: &mut dyn SlotEvents, e: &MigrationError) {
        events.closed(&self.slot);
        if !self.started && !e.link_is_gone() {
            let _ = self.link.send(Body::Abort(e.to_abort()));
        }
    }

    /// How long to wait for each frame from now on (a relayed stream may
    /// pause longer than the reply timeout while its source works).
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// Marks the VM as running here (see [`Arrival::fail`]).
    pub fn started(&mut self) {
        self.started = true;
    }

    /// The next frame; keep-alives from a holding source are answered and
    /// skipped.
    pub fn next_frame(&mut self) -> Result<Body, MigrationError> {
        loop {
            match self.link.recv(Some(self.timeout))? {
                Body::Abort(a) => return Err(MigrationError::from_abort(a)),
                Body::KeepAlive(_) => {
                    self.link.send(Body::KeepAlive(v1::KeepAlive {}))?;
                }
                b => return Ok(b),
            }
        }
    }

    /// As [`Arrival::next_frame`], but `None` if no frame came within
    /// `within`; a keep-alive is answered and returned (the source lives).
    pub fn wait_frame(&mut self, within: Duration) -> Result<Option<Body>, MigrationError> {
        match self.link.wait_frame(within)? {
            Some(Body::Abort(a)) => Err(MigrationError::from_abort(a)),
            Some(Body::KeepAlive(k)) => {
                self.link.send(Body::KeepAlive(v1::KeepAlive {}))?;
                Ok(Some(Body::KeepAlive(k)))
            }
            other => Ok(other),
        }
    }

    /// Sends the contents still missing, in NeedHashes frames, and
    /// (`gathering`) the frames to be gathered elsewhere; the frames
    /// filled here count `copying` more, about to be copied.
    fn send_needs(
        &mut self,
        needed: &[PageHash],
        gathering: u64,
        copying: u64,
    ) -> Result<(), MigrationError> {
        let mut chunks = needed.chunks(MAX_NEED_HASHES_PER_FRAME).peekable();
        loop {
            let chunk = chunks.next().unwrap_or(&[]);
            let last = chunks.peek().is_none();
            let mut hashes = Vec::with_capacity(chunk.len() * 32);
            for h in chunk {
                hashes.extend_from_slice(h.as_bytes());
            }
            self.link.send(Body::Need(v1::NeedHashes {
                hashes: hashes.into(),
                last,
                filled_locally: if last {
                    self.report.pages_local + copying + self.slot.filled_by_others()
                } else {
                    0
                },
                gathering: if last { gathering } else { 0 },
            }))?;
            if last {
                return Ok(());
            }
        }
    }

    /// Reads the manifest (`frames` of them, for VM `vm`).
    fn manifest(&mut self, vm: &str, frames: u64) -> Result<Vec<PageHash>, MigrationError> {
        let header = match self.next_frame()? {
            Body::ManifestHeader(h) => h,
            other => {
                return Err(MigrationError::Protocol(format!(
                    "expected a manifest, got {other:?}"
                )));
            }
        };
        if header.frames != frames || header.vm != vm {
            return Err(MigrationError::Protocol(format!(
                "manifest of {} frames for {:?}; expected {frames} frames of {vm:?}",
                header.frames, header.vm
            )));
        }
        let mut dec = ManifestDecoder::new(&header)?;
        while dec.received() < frames {
            match self.next_frame()? {
                Body::ManifestChunk(c) => dec.push(&c)?,
                other => {
                    return Err(MigrationError::Protocol(format!(
                        "expected a manifest chunk, got {other:?}"
                    )));
                }
            }
        }
        Ok(dec.finish()?.hashes)
    }

    /// Plans a VM's own frames: zero frames are done (fresh memory is
    /// zero); the frames whose content this host holds (unless told not to
    /// reuse anything) go in the returned [`LocalPlan`], by lookups only,
    /// for [`LocalPlan::fill`] to copy; every other frame waits for its
    /// content, and those contents are returned, sorted.
    fn plan_frames(
        &mut self,
        manifest: &[PageHash],
        local: &dyn LocalContent,
        no_local: bool,
    ) -> (Vec<PageHash>, LocalPlan) {
        let key = self.slot.key;
        let mut frames_of: HashMap<PageHash, Vec<u64>> = HashMap::new();
        let mut held: HashMap<PageHash, Vec<u64>> = HashMap::new();
        let mut zero = Vec::new();
        for (f, h) in manifest.iter().enumerate() {
            let f = f as u64;
            if h.is_zero_page() {
                zero.push(f);
            } else if let Some(fs) = held.get_mut(h) {
                fs.push(f);
            } else if let Some(fs) = frames_of.get_mut(h) {
                fs.push(f);
            } else if !no_local && local.holds(&key, h) {
                held.insert(*h, vec![f]);
            } else {
                frames_of.insert(*h, vec![f]);
            }
        }
        let mut needed: Vec<PageHash> = frames_of.keys().copied().collect();
        needed.sort_unstable();
        {
            let mut st = self.slot.lock();
            for f in zero {
                st.table[f as usize] = Some(PageHash::ZERO_PAGE);
            }
            st.frames_of = frames_of;
        }
        let mut contents: Vec<(PageHash, Vec<u64>)> = held.into_iter().collect();
        // In frame order: the copies then write the VM's memory front to
        // back.
        contents.sort_unstable_by_key(|(_, fs)| fs[0]);
        (needed, LocalPlan { contents })
    }

    /// Makes the scratch frames of a QEMU VM, one per distinct content of
    /// the manifest, and fills those this host holds. Frames filled count
    /// the VM's frames holding those contents. Returns what is still
    /// needed.
    fn fill_contents(
        &mut self,
        begin: &v1::MigrateBegin,
        manifest: &[PageHash],
        local: &dyn LocalContent,
        key: ContentKey,
    ) -> Result<Vec<PageHash>, MigrationError> {
        let mut count: HashMap<PageHash, u64> = HashMap::new();
        for h in manifest.iter().filter(|h| !h.is_zero_page()) {
            *count.entry(*h).or_default() += 1;
        }
        let mut distinct: Vec<PageHash> = count.keys().copied().collect();
        distinct.sort_unstable();
        self.slot = Arc::new(IncomingSlot::landing(
            &begin.vm,
            (&begin.domain, key),
            &distinct,
        )?);
        let mut page = [0u8; PAGE_SIZE];
        let mut needed = Vec::new();
        for (i, h) in distinct.iter().enumerate() {
            if !begin.no_local && local.copy(&key, h, &mut page) {
                self.slot.write(i as u64, *h, &page)?;
                self.report.pages_local += count[h];
            } else {
                needed.push(*h);
            }
        }
        Ok(needed)
    }

    /// Everything up to the kind's own transfer (see [`receive_front`]).
    fn front(
        &mut self,
        begin: &v1::MigrateBegin,
        local: &dyn LocalContent,
        events: &mut dyn SlotEvents,
        shape: Shape,
        key: ContentKey,
        opened: &mut bool,
    ) -> Result<(), MigrationError> {
        let frames = begin.memory_bytes / PAGE_SIZE as u64;
        let t = std::time::Instant::now();
        let manifest = self.manifest(&begin.vm, frames)?;
        self.report.manifest_s = t.elapsed().as_secs_f64();
        let (mut needed, plan) = match shape {
            Shape::Frames => self.plan_frames(&manifest, local, begin.no_local),
            Shape::Contents => (
                self.fill_contents(begin, &manifest, local, key)?,
                LocalPlan::default(),
            ),
        };
        drop(manifest);
        if !begin.job.is_empty() {
            events.opened(&self.slot);
            *opened = true;
        }
        if !begin.held {
            let copied = self.fill_alive(&plan, local)?;
            self.report.pages_local += copied.frames;
            self.report.local_fill_s = copied.secs;
            needed.extend(copied.lost);
            needed.sort_unstable();
            self.send_needs(&needed, 0, 0)?;
            return Ok(());
        }
        // A gang job: the needs go out at once, with the frames about to be
        // filled here counted as filled, and the copies run while the
        // source holds (and the job's casts fill the rest); a content that
        // could no longer be copied waits with the others for the refill.
        self.send_needs(&needed, 0, plan.frames())?;
        let copied = self.copy_while_held(&plan, local, events)?;
        self.report.pages_local += copied.frames;
        self.report.local_fill_s = copied.secs;
        // Faulting a VM's memory in ran in the background meanwhile: it
        // ends here, before the rounds, never inside the switchover's pause.
        if shape == Shape::Frames {
            self.populated(true)?;
        }
        let mut still = self.slot.missing();
        let mut gathering = 0;
        if self.postcopy
            && shape == Shape::Frames
            && let Some(g) = events.gather(&self.slot, &still)
        {
            still.retain(|h| !g.contents.contains(h));
            gathering = self
                .gather_frames(&g)
                .values()
                .map(|fs| fs.len() as u64)
                .sum();
            self.gather = Some(g);
        }
        self.send_needs(&still, gathering, 0)
    }

    /// Copies `plan` on a thread of its own while this one tells the
    /// source that this side lives ([`Arrival::alive_until`]): the source
    /// waits for the needs that follow on its reply timeout, which only
    /// silence runs out, and a large fill can take longer.
    fn fill_alive(
        &mut self,
        plan: &LocalPlan,
        local: &dyn LocalContent,
    ) -> Result<Copied, MigrationError> {
        let stop = AtomicBool::new(false);
        let slot = self.slot.clone();
        std::thread::scope(|s| {
            let copier = std::thread::Builder::new()
                .name("pagecast-local-fill".into())
                .spawn_scoped(s, || plan.fill(&slot, local, &stop));
            let Ok(t) = copier else {
                // No thread: copy here, without telling.
                return Ok(plan.fill(&slot, local, &stop)?);
            };
            let waited = self.alive_until(&|| t.is_finished());
            stop.store(waited.is_err(), Ordering::Relaxed);
            let copied = t.join().map_err(|_| {
                MigrationError::Protocol("filling from local pages panicked".into())
            })?;
            waited?;
            Ok(copied?)
        })
    }

    /// Copies `plan` on a thread of its own while this one waits for the
    /// source's refill, joining the casts it is invited to meanwhile;
    /// the frames copied. A failure here stops the copies.
    fn copy_while_held(
        &mut self,
        plan: &LocalPlan,
        local: &dyn LocalContent,
        events: &mut dyn SlotEvents,
    ) -> Result<Copied, MigrationError> {
        let stop = AtomicBool::new(false);
        let slot = self.slot.clone();
        let background = self.background.clone();
        std::thread::scope(|s| {
            let copier = std::thread::Builder::new()
                .name("pagecast-local-fill".into())
                .spawn_scoped(s, || {
                    let _low = background.enter();
                    plan.fill(&slot, local, &stop)
                });
            let mut waited = self.until_refill(events);
            // The casts are over: the rest of the job waits for the copies
            // and the faulting-in now.
            self.background.hurry();
            if waited.is_ok()
                && let Ok(t) = &copier
            {
                waited = self.alive_until(&|| t.is_finished());
            }
            stop.store(waited.is_err(), Ordering::Relaxed);
            let copied = match copier {
                Ok(t) => t.join().map_err(|_| {
                    MigrationError::Protocol("filling from local pages panicked".into())
                })?,
                // No thread: copy here, after the wait.
                Err(_) => plan.fill(&slot, local, &stop),
            };
            waited?;
            Ok(copied?)
        })
    }

    /// Waits until `done`, telling the source five times a second that
    /// this side lives: after its Refill it waits for the needs with a
    /// reply timeout (its own setting, a second or more) that only silence
    /// runs out, and the copies and the faulting-in, at nice 10 on a busy
    /// host, can take longer than that.
    fn alive_until(&mut self, done: &dyn Fn() -> bool) -> Result<(), MigrationError> {
        let mut told = Instant::now();
        while !done() {
            std::thread::sleep(Duration::from_millis(10));
            if told.elapsed() >= Duration::from_millis(200) {
                self.link.send(Body::KeepAlive(v1::KeepAlive {}))?;
                told = Instant::now();
            }
        }
        Ok(())
    }

    /// Reads frames until the source's Refill, joining the casts it
    /// invites to meanwhile.
    fn until_refill(&mut self, events: &mut dyn SlotEvents) -> Result<(), MigrationError> {
        loop {
            match self.next_frame()? {
                Body::Refill(_) => return Ok(()),
                Body::CastJoin(j) => self.join(events, &j),
                other => {
                    return Err(MigrationError::Protocol(format!(
                        "expected refill after a hold, got {other:?}"
                    )));
                }
            }
        }
    }

    /// The frames still missing whose contents `g` gathers, by content.
    fn gather_frames(&self, g: &Gather) -> HashMap<PageHash, Vec<u64>> {
        let st = self.slot.lock();
        g.contents
            .iter()
            .filter_map(|h| {
                let fs: Vec<u64> = st
                    .frames_of
                    .get(h)?
                    .iter()
                    .copied()
                    .filter(|&f| st.table[f as usize].is_none())
                    .collect();
                (!fs.is_empty()).then_some((*h, fs))
            })
            .collect()
    }

    /// A micro-VM's transfer: pages until switchover, then the rest, the
    /// vCPU and the digest; Ready, Commit, and the VM starts here.
    pub fn rounds(
        &mut self,
        begin: &v1::MigrateBegin,
        fp: &Fingerprinter,
        events: &mut dyn SlotEvents,
        start: &mut dyn FnMut(Region, VcpuState) -> Result<u64, String>,
    ) -> Result<IncomingReport, MigrationError> {
        let mut switched: Option<Instant> = None;
        let mut vcpu: Option<VcpuState> = None;
        loop {
            match self.next_frame()? {
                Body::ByHash(b) => self.by_hash(&b)?,
                Body::Pages(p) => self.pages(&p)?,
                Body::Switchover(s) if s.postcopy => {
                    return self.postcopy(begin, events, Instant::now(), start);
                }
                Body::Switchover(_) => switched = Some(Instant::now()),
                Body::CastJoin(j) => self.join(events, &j),
                Body::Vcpu(v) => vcpu = Some(VcpuState::from_bytes(&v.regs, &v.sregs)?),
                Body::Digest(d) => {
                    let Some(state) = vcpu.take() else {
                        return Err(MigrationError::Protocol("digest before vCPU state".into()));
                    };
                    let verdict = self.verify(&d, begin.verify_full, fp);
                    self.ready(&verdict)?;
                    verdict?;
                    match self.next_frame()? {
                        Body::Commit(_) => {}
                        other => {
                            return Err(MigrationError::Protocol(format!(
                                "expected commit, got {other:?}"
                            )));
                        }
                    }
                    return self.start(events, state, switched, start);
                }
                other => {
                    return Err(MigrationError::Protocol(format!(
                        "unexpected {other:?} during migration"
                    )));
                }
            }
        }
    }

    /// A post-copy switchover: the frames still to come and the vCPU
    /// state; Ready once every other frame is here, and at Commit the VM
    /// starts while the missing frames arrive ([`crate::postcopy`]).
    fn postcopy(
        &mut self,
        begin: &v1::MigrateBegin,
        events: &mut dyn SlotEvents,
        switched: Instant,
        start: &mut dyn FnMut(Region, VcpuState) -> Result<u64, String>,
    ) -> Result<IncomingReport, MigrationError> {
        if !begin.postcopy {
            return Err(MigrationError::Protocol(
                "a post-copy switchover in a migration offered without post-copy".into(),
            ));
        }
        let pages = self.mem().pages();
        // The first working set (Pages) comes before the missing list.
        let mut next = || loop {
            match self.next_frame()? {
                Body::Pages(p) => self.pages(&p)?,
                other => return Ok(other),
            }
        };
        let (missing, masked) = crate::postcopy::read_missing(&mut next, pages)?;
        let state = match self.next_frame()? {
            Body::Vcpu(v) => VcpuState::from_bytes(&v.regs, &v.sregs)?,
            other => {
                return Err(MigrationError::Protocol(format!(
                    "expected the vCPU state, got {other:?}"
                )));
            }
        };
        let ms = || switched.elapsed().as_secs_f64() * 1e3;
        self.report.resume.read_ms = ms();
        // Frames this host gathers elsewhere: those still missing whose
        // contents the job placed on other hosts (the source counts them
        // as sent; one it sent since, or lists, is not gathered).
        let listed: HashSet<u64> = missing.iter().copied().collect();
        let gathering = self.gather.take().map(|g| {
            let mut frames = self.gather_frames(&g);
            for fs in frames.values_mut() {
                fs.retain(|f| !listed.contains(f));
            }
            frames.retain(|_, fs| !fs.is_empty());
            (g, frames)
        });
        let pending: HashMap<u64, PageHash> = gathering
            .iter()
            .flat_map(|(_, fr)| fr.iter())
            .flat_map(|(h, fs)| fs.iter().map(move |&f| (f, *h)))
            .collect();
        // Every other frame is here and is the source's, checked before
        // the VM may run on it.
        let verdict = self.held_before_postcopy(&missing, &pending, &masked);
        self.ready(&verdict)?;
        verdict?;
        self.report.resume.checked_ms = ms();
        let table = self.slot.lock().table.clone();
        let mut missing = missing;
        missing.extend(pending.keys().copied());
        missing.sort_unstable();
        match self.next_frame()? {
            Body::Commit(_) => {}
            other => {
                return Err(MigrationError::Protocol(format!(
                    "expected commit, got {other:?}"
                )));
            }
        }
        self.report.resume.commit_ms = ms();
        crate::failpoint::hit(crate::failpoint::Point::DestCommit)?;
        events.closed(&self.slot);
        let key = self.slot.key;
        let region = self.take_region()?;
        self.report.resume.memory_ms = ms();
        let mut state = Some(state);
        let mut started_ms = 0.0;
        let mut run = |region: Region| match state.take() {
            Some(s) => {
                let r = start(region, s);
                started_ms = ms();
                r
            }
            None => Err("started twice".into()),
        };
        let timeout = self.timeout;
        let done = crate::postcopy::complete(
            self.link, &key, region, table, &missing, gathering, timeout, &mut run,
        );
        self.started = !matches!(done, Err(MigrationError::Start(_)));
        let done = done?;
        self.report.resume.started_ms = started_ms;
        self.report.progress = done.progress;
        self.report.switchover_ms = switched.elapsed().as_secs_f64() * 1e3;
        self.report.pages_received += done.placed;
        self.report.postcopy = true;
        self.report.postcopy_requested = done.requested;
        self.report.postcopy_gathered = done.gathered;
        self.report.postcopy_gather_lost = done.gather_lost;
        self.report.postcopy_gather_error = done.gather_error.unwrap_or_default();
        Ok(self.report.clone())
    }

    /// Checks the digest and says whether the VM is ready to commit.
    fn ready(&mut self, verdict: &Result<(), MigrationError>) -> Result<(), MigrationError> {
        self.link.send(Body::Ready(v1::Ready {
            ok: verdict.is_ok(),
            reason: verdict
                .as_ref()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
            code: verdict.as_ref().err().map_or(0, |e| e.code() as i32),
        }))
    }

    /// Before a post-copy resume: every frame not in `missing` is here or
    /// `pending` (to be gathered: its content as the manifest said), and
    /// the table with the `missing` frames masked has the source's digest.
    fn held_before_postcopy(
        &self,
        missing: &[u64],
        pending: &HashMap<u64, PageHash>,
        masked: &[u8],
    ) -> Result<(), MigrationError> {
        let st = self.slot.lock();
        let mut listed = vec![false; st.table.len()];
        for &f in missing {
            listed[f as usize] = true;
        }
        let at = |f: usize| st.table[f].or_else(|| pending.get(&(f as u64)).copied());
        if let Some(f) = (0..st.table.len()).find(|&f| !listed[f] && at(f).is_none()) {
            return Err(MigrationError::Verification(format!(
                "frame {f} never arrived and is not in the post-copy list"
            )));
        }
        let held = crate::digest_of((0..st.table.len()).map(|f| match at(f) {
            Some(h) if !listed[f] => h,
            _ => crate::postcopy::MASKED,
        }));
        if held != masked {
            return Err(MigrationError::Verification(
                "the frames held before post-copy differ from the source's".into(),
            ));
        }
        Ok(())
    }

    /// Committed: the VM starts here on its memory and vCPU state.
    fn start(
        &mut self,
        events: &mut dyn SlotEvents,
        state: VcpuState,
        switched: Option<Instant>,
        start: &mut dyn FnMut(Region, VcpuState) -> Result<u64, String>,
    ) -> Result<IncomingReport, MigrationError> {
        crate::failpoint::hit(crate::failpoint::Point::DestCommit)?;
        events.closed(&self.slot);
        let region = self.take_region()?;
        let progress = start(region, state).map_err(MigrationError::Start)?;
        self.started = true;
        crate::failpoint::hit(crate::failpoint::Point::DestResumed)?;
        self.report.progress = progress;
        self.report.switchover_ms = switched.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
        self.link.send(Body::Resumed(v1::Resumed { progress }))?;
        Ok(self.report.clone())
    }

    fn by_hash(&mut self, b: &v1::PagesByHash) -> Result<(), MigrationError> {
        let n = b.hashes.len() / 32;
        for (page, h) in checked(&self.slot.key, &b.hashes, &b.data, n)? {
            if !self.slot.lock().frames_of.contains_key(&h) {
                return Err(MigrationError::Protocol(format!(
                    "received {h}, which no frame needs"
                )));
            }
            self.report.pages_received += self.slot.fill(&h, page)?;
        }
        Ok(())
    }

    /// Joins a cast the source invites to. A cast that fails is not fatal:
    /// the source sends what it could not deliver over this link.
    fn join(&mut self, events: &mut dyn SlotEvents, j: &v1::CastJoin) {
        match events.join_cast(&self.slot, &j.control, j.by_frame) {
            Ok(n) => self.report.pages_received += n,
            Err(e) => {
                let _ = e;
            }
        }
    }

    /// Waits until every page of the arriving VM's memory is faulted in
    /// (populating it here if no thread does); `tell_source`: telling the
    /// source meanwhile that this side lives ([`Arrival::alive_until`]).
    fn populated(&mut self, tell_source: bool) -> Result<(), MigrationError> {
        self.background.hurry();
        let populating = self.populating.take();
        if tell_source && let Some(t) = &populating {
            self.alive_until(&|| t.is_finished())?;
        }
        match populating.map(|t| t.join()) {
            Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e.into()),
            Some(Err(_)) => Err(MigrationError::Protocol(
                "populating the arriving VM's memory panicked".into(),
            )),
            None if self.faulted_in => Ok(()),
            // The thread could not be spawned: populate here.
            None => Ok(self.slot.region.populate()?),
        }
        .inspect(|()| self.faulted_in = true)
    }

    /// The memory back from the slot once nobody else holds it, every page
    /// faulted in (a guest must not run on unpopulated memory: a page it
    /// faults in first can be missing from the dirty log).
    fn take_region(&mut self) -> Result<Region, MigrationError> {
        /// How long a switchover waits for a transfer to let go of the
        /// arriving VM's memory.
        const SHARED_WAIT: Duration = Duration::from_secs(2);
        self.populated(false)?;
        let placeholder = Arc::new(IncomingSlot::new(
            &self.slot.vm,
            (&self.slot.domain, self.slot.key),
            Region::anonymous(PAGE_SIZE as u64)?,
        ));
        let mut slot = std::mem::replace(&mut self.slot, placeholder);
        // A cast or a local copy may hold the slot for the page it is
        // writing or reading (casts hold it weakly between pages): wait
        // that out, briefly.
        let deadline = std::time::Instant::now() + SHARED_WAIT;
        loop {
            match Arc::try_unwrap(slot) {
                Ok(IncomingSlot { region, state, .. }) => {
                    // The slot's tables hold an allocation per content:
                    // freeing them took 20-35 ms for 512 MiB, inside the
                    // downtime.
                    std::thread::spawn(move || drop(state));
                    return Ok(region);
                }
                Err(back) if std::time::Instant::now() < deadline => {
                    slot = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => {
                    return Err(MigrationError::Protocol(format!(
                        "the arriving VM's memory is still shared with a cast after {SHARED_WAIT:?}"
                    )));
                }
            }
        }
    }

    fn pages(&mut self, p: &v1::Pages) -> Result<(), MigrationError> {
        let n = p.frames.len();
        let pages = checked(&self.slot.key, &p.hashes, &p.data, n)?;
        for (&f, (page, h)) in p.frames.iter().zip(pages) {
            if f >= self.mem().pages() {
                return Err(MigrationError::Protocol(format!(
                    "page for frame {f} beyond memory"
                )));
            }
            self.slot.write(f, h, page)?;
            self.report.pages_received += 1;
        }
        Ok(())
    }

    fn verify(&self, d: &v1::Digest, full: bool, fp: &Fingerprinter) -> Result<(), MigrationError> {
        let st = self.slot.lock();
        let mut table = Vec::with_capacity(st.table.len());
        for (f, h) in st.table.iter().enumerate() {
            match h {
                Some(h) => table.push(*h),
                None => {
                    return Err(MigrationError::Verification(format!(
                        "frame {f} never arrived"
                    )));
                }
            }
        }
        drop(st);
        if d.digest.as_ref() != table_digest(&table) {
            return Err(MigrationError::Verification(
                "page hashes differ from the source's".into(),
            ));
        }
        if full {
            let hashes = fp
                .fingerprint_region(self.mem(), &self.slot.key, &|_| {})
                .hashes;
            if hashes != table || d.full.as_ref() != table_digest(&hashes) {
                return Err(MigrationError::Verification(
                    "memory hashed in full differs from the source's".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Checks a batch of page contents against their hashes (with the SIMD
/// kernel), returning the pages.
pub(crate) fn checked<'b>(
    key: &ContentKey,
    hashes: &[u8],
    data: &'b [u8],
    n: usize,
) -> Result<Vec<(&'b Page, PageHash)>, MigrationError> {
    if n > MAX_MIGRATE_PAGES_PER_FRAME || hashes.len() != n * 32 || data.len() != n * PAGE_SIZE {
        return Err(MigrationError::Protocol(format!(
            "page batch of {n} pages with {} hash bytes and {} data bytes",
            hashes.len(),
            data.len()
        )));
    }
    let pages: Vec<&Page> = data
        .chunks_exact(PAGE_SIZE)
        .map(|p| p.try_into().expect("page"))
        .collect();
    let mut got = vec![PageHash::ZERO_PAGE; n];
    key.hash_pages(&pages, &mut got);
    let mut out = Vec::with_capacity(n);
    for (i, p) in pages.into_iter().enumerate() {
        let want = PageHash::try_from(&hashes[i * 32..(i + 1) * 32]).expect("32 bytes");
        let ok = if want.is_zero_page() {
            is_zero_page(p)
        } else {
            got[i] == want
        };
        if !ok {
            return Err(MigrationError::Verification(format!(
                "a received page does not match its hash {want}"
            )));
        }
        out.push((p, want));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice_of(tid: libc::pid_t) -> libc::c_int {
        // SAFETY: getpriority only reads the thread's nice value.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) }
    }

    /// Threads preparing an arriving VM run at nice 10 until the migration
    /// waits for them, then at nice 0, and so do those that start after.
    #[test]
    fn background_threads_run_at_normal_priority_once_the_migration_waits_for_them() {
        // Raising a thread's priority back to nice 0 takes CAP_SYS_NICE.
        if !pagecast_testkit::needs(
            "background_threads_run_at_normal_priority_once_the_migration_waits_for_them",
            &[pagecast_testkit::Need::Root],
        ) {
            return;
        }
        let bg = Background::default();
        let (entered, hurried) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                let _low = bg.enter();
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                let before = nice_of(tid);
                entered.wait();
                hurried.wait();
                (before, nice_of(tid))
            });
            entered.wait();
            bg.hurry();
            hurried.wait();
            assert_eq!(t.join().unwrap(), (10, 0));
            let late = s.spawn(|| {
                let _low = bg.enter();
                // SAFETY: gettid has no preconditions.
                nice_of(unsafe { libc::gettid() })
            });
            assert_eq!(late.join().unwrap(), 0);
        });
        assert!(
            crate::lock(&bg.tids).is_empty(),
            "threads that ended are out"
        );
    }
}
