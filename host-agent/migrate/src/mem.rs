//! The engine without KVM or sockets: an in-memory link between the two
//! sides ([`link_pair`]) and a source VM over synthetic memory whose guest
//! writes pages at a set rate while it runs ([`SyntheticSource`]). The
//! engine's tests run on them on any machine; so can anyone studying the
//! protocol.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagecast_channel::AuthError;
use pagecast_memory::kvm::{VcpuState, VmError};
use pagecast_memory::synth::SyntheticMemory;
use pagecast_memory::{DirtyBitmap, GuestMemory, MemoryError, Page, Region};
use pagecast_pages::SplitMix64;
use pagecast_proto::v1::migrate_frame::Body;

use crate::{CastOutcome, Caster, MigrationError, MigrationLink, SourceVm};

/// Two ends of an in-memory link: what one sends, the other receives.
pub fn link_pair() -> (MemLink, MemLink) {
    let (a_tx, b_rx) = mpsc::channel();
    let (b_tx, a_rx) = mpsc::channel();
    let a = MemLink {
        tx: Some(a_tx),
        rx: a_rx,
        sent: Arc::new(AtomicU64::new(0)),
        cut_after: None,
    };
    let b = MemLink {
        tx: Some(b_tx),
        rx: b_rx,
        sent: Arc::new(AtomicU64::new(0)),
        cut_after: None,
    };
    (a, b)
}

/// One end of [`link_pair`].
pub struct MemLink {
    tx: Option<Sender<Body>>,
    rx: Receiver<Body>,
    sent: Arc<AtomicU64>,
    cut_after: Option<u64>,
}

fn closed() -> MigrationError {
    MigrationError::Link(AuthError::Closed {
        peer: "in-memory link".into(),
    })
}

impl MemLink {
    /// Breaks the link once this end has sent `n` more frames (as a peer
    /// that dies there would: the other end sees it closed).
    pub fn cut_after(mut self, n: u64) -> Self {
        self.cut_after = Some(self.sent.load(Ordering::Relaxed) + n);
        self
    }

    /// Frames this end sent.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Breaks the link now.
    pub fn cut(&mut self) {
        self.tx = None;
    }
}

impl MigrationLink for MemLink {
    fn send(&mut self, body: Body) -> Result<(), MigrationError> {
        let n = self.sent.fetch_add(1, Ordering::Relaxed) + 1;
        if self.cut_after.is_some_and(|c| n > c) {
            self.tx = None;
        }
        let tx = self.tx.as_ref().ok_or_else(closed)?;
        tx.send(body).map_err(|_| closed())
    }

    fn recv(&mut self, timeout: Option<Duration>) -> Result<Body, MigrationError> {
        match timeout {
            Some(t) => self.rx.recv_timeout(t).map_err(|e| match e {
                RecvTimeoutError::Timeout => MigrationError::Timeout {
                    peer: self.peer(),
                    what: "frame",
                    after: t,
                },
                RecvTimeoutError::Disconnected => closed(),
            }),
            None => self.rx.recv().map_err(|_| closed()),
        }
    }

    fn poll_frame(&mut self) -> Result<Option<Body>, MigrationError> {
        match self.rx.try_recv() {
            Ok(b) => Ok(Some(b)),
            Err(std::sync::mpsc::TryRecvError::Empty) => Ok(None),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => Err(closed()),
        }
    }
}

/// A source VM over synthetic memory. Its guest (a thread) rewrites pages
/// of a working set at `rate` pages a second while it runs, slowed by the
/// engine's throttle; pausing waits for the write in progress to end, so
/// memory is quiescent once [`SourceVm::pause`] returns.
pub struct SyntheticSource {
    name: String,
    memory: SyntheticMemory,
    rate: u64,
    working_set: std::ops::Range<u64>,
    paused: AtomicBool,
    throttle: AtomicU8,
    stop: AtomicBool,
    /// Held by the guest while it writes a page.
    gate: Mutex<()>,
    /// Pages the guest wrote.
    written: AtomicU64,
    /// Times the VM was paused and resumed.
    pauses: AtomicU64,
    resumes: AtomicU64,
}

impl SyntheticSource {
    /// A VM named `name` over `memory`, its guest idle.
    pub fn new(name: &str, memory: SyntheticMemory) -> Arc<Self> {
        Self::dirtying(name, memory, 0, 0..0)
    }

    /// A VM whose guest rewrites pages of `working_set` at `rate` pages a
    /// second, starting now.
    pub fn dirtying(
        name: &str,
        memory: SyntheticMemory,
        rate: u64,
        working_set: std::ops::Range<u64>,
    ) -> Arc<Self> {
        let vm = Arc::new(SyntheticSource {
            name: name.to_owned(),
            memory,
            rate,
            working_set,
            paused: AtomicBool::new(false),
            throttle: AtomicU8::new(0),
            stop: AtomicBool::new(false),
            gate: Mutex::new(()),
            written: AtomicU64::new(0),
            pauses: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
        });
        if rate > 0 && !vm.working_set.is_empty() {
            let g = Arc::downgrade(&vm);
            std::thread::spawn(move || guest(&g));
        }
        vm
    }

    /// Whether it is paused now.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Pages its guest wrote so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Times it was resumed.
    pub fn resumes(&self) -> u64 {
        self.resumes.load(Ordering::Relaxed)
    }

    /// Stops its guest for good (also when dropped).
    pub fn stop_guest(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Drop for SyntheticSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The guest's loop: one page at a time, at the paced rate, while the VM
/// lives.
fn guest(vm: &std::sync::Weak<SyntheticSource>) {
    let mut rng = SplitMix64::new(0x6e57);
    let start = Instant::now();
    let mut done = 0u64;
    let mut page: Box<Page> = Box::new([0; pagecast_pages::PAGE_SIZE]);
    loop {
        let Some(v) = vm.upgrade() else { return };
        if v.stop.load(Ordering::SeqCst) {
            return;
        }
        let pct = u64::from(v.throttle.load(Ordering::Relaxed).min(99));
        let rate = (v.rate * (100 - pct) / 100).max(1);
        let due = start + Duration::from_secs_f64(done as f64 / rate as f64);
        let now = Instant::now();
        if due > now {
            drop(v);
            std::thread::sleep((due - now).min(Duration::from_millis(5)));
            continue;
        }
        {
            let _g = crate::lock(&v.gate);
            if !v.paused.load(Ordering::SeqCst) {
                let ws = &v.working_set;
                let frame = ws.start + rng.below(ws.end - ws.start);
                rng.fill(&mut page[..64]);
                if v.memory.write_page(frame, &page).is_ok() {
                    v.written.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        done += 1;
    }
}

impl GuestMemory for SyntheticSource {
    fn write_page(&self, frame: u64, data: &Page) -> Result<(), MemoryError> {
        self.memory.write_page(frame, data)
    }
    fn take_dirty(&self) -> Result<DirtyBitmap, MemoryError> {
        self.memory.take_dirty()
    }
    fn mark_dirty(&self, pages: &DirtyBitmap) -> Result<(), MemoryError> {
        self.memory.mark_dirty(pages)
    }
    fn region(&self) -> &Region {
        self.memory.region()
    }
}

impl SourceVm for SyntheticSource {
    fn name(&self) -> &str {
        &self.name
    }
    fn origin(&self) -> String {
        "synthetic".into()
    }
    fn dirty_rate(&self) -> u64 {
        self.rate
    }
    fn pause(&self) -> Result<(), VmError> {
        self.paused.store(true, Ordering::SeqCst);
        // A write in progress ends before this returns.
        drop(crate::lock(&self.gate));
        self.pauses.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.resumes.fetch_add(1, Ordering::Relaxed);
    }
    fn vcpu_state(&self) -> Result<VcpuState, VmError> {
        Ok(VcpuState {
            regs: Default::default(),
            sregs: Default::default(),
        })
    }
    fn set_throttle(&self, pct: u8) {
        self.throttle.store(pct, Ordering::Relaxed);
    }
}

/// A caster that casts nothing: a clone's pages all go over its links.
pub struct NoCasts;

impl Caster for NoCasts {
    fn cast(
        &mut self,
        _: &[u64],
        _: &[Vec<usize>],
        _: bool,
        _: &[String],
        _: &mut dyn FnMut(usize, &str) -> Result<(), MigrationError>,
    ) -> Result<CastOutcome, MigrationError> {
        Err(MigrationError::Protocol("no casts here".into()))
    }
}
