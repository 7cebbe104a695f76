//! A cast's pages, read out of this host's VMs while the session sends
//! them.
//!
//! A source agent used to read every page of a cast before the first one
//! left (0.1-1.2 s per cast on the emulated racks, on two shared cores).
//! Now the session's page list is fixed from the content map (a lookup per
//! page, no read) and a thread of its own reads the pages, in the order
//! the sender sends them, a step at a time: the sender sends each step
//! once it is read. A page whose content left this host between the lookup
//! and its read (its VM wrote over it, or went away) is withdrawn: its
//! receivers settle it without data, and the migration that needs it
//! takes it from its source's rounds like any page a cast did not bring.

use std::io;
use std::net::TcpListener;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use pagecast_multicast::{CastError, Groups, PageEntry, PageSource, SendReport, SenderConfig};
use pagecast_pages::{PAGE_SIZE, Page};

use crate::Agent;

/// Pages read per step: a step's pages become ready to send together
/// (256 KiB, a fraction of a millisecond to read).
const STEP: usize = 64;

/// One step's pages, read.
struct Step<'b> {
    data: &'b [u8],
    /// Bit `k`: page `k` of the step was withdrawn (its bytes are not
    /// its content).
    withdrawn: u64,
}

/// A cast's pages: every entry known at the start, the contents read by
/// [`Streamed::read_into`] while the session runs.
pub struct Streamed<'b> {
    entries: Vec<PageEntry>,
    frames: u64,
    steps: Vec<OnceLock<Step<'b>>>,
    /// Pages read (or withdrawn) from the first: whole steps, in order.
    ready: AtomicU32,
    /// The reading is over (every page read, stopped, or it failed): what
    /// was not read counts as withdrawn.
    over: AtomicBool,
    stop: AtomicBool,
}

/// What [`Streamed::read_into`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReadFigures {
    /// Pages read.
    pub read: u64,
    /// Pages withdrawn (their content was no longer here).
    pub withdrawn: u64,
    /// Seconds from the start of the reading to its end.
    pub secs: f64,
    /// CPU-seconds the reading thread spent.
    pub cpu: f64,
}

/// Marks the reading over however it ends, a panic included, so the
/// session never waits for pages no one reads.
struct Over<'a>(&'a AtomicBool);

impl Drop for Over<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

impl<'b> Streamed<'b> {
    /// The cast of `entries` (each keyed by its place in the request), in
    /// the order the sender sends them; nothing read yet.
    pub fn new(entries: Vec<PageEntry>) -> Self {
        let steps = entries.len().div_ceil(STEP);
        Streamed {
            // Keys need not come in order.
            frames: entries.iter().map(|e| e.key + 1).max().unwrap_or(0),
            entries,
            steps: (0..steps).map(|_| OnceLock::new()).collect(),
            ready: AtomicU32::new(0),
            over: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        }
    }

    /// Bytes a buffer for [`Streamed::read_into`] must have.
    pub fn buffer_len(&self) -> usize {
        self.entries.len() * PAGE_SIZE
    }

    /// Reads every page from this host's VMs into `buf` (of
    /// [`Streamed::buffer_len`] bytes), hash-checked, a step at a time,
    /// each step ready to send once read; until all are read or
    /// [`Streamed::stop`] is called. Pages the host no longer holds are
    /// withdrawn.
    ///
    /// # Panics
    /// If `buf` is not [`Streamed::buffer_len`] bytes.
    pub fn read_into(&self, agent: &Agent, buf: &'b mut [u8]) -> ReadFigures {
        assert_eq!(buf.len(), self.buffer_len(), "a buffer of every page");
        let _over = Over(&self.over);
        let (t0, cpu0) = (std::time::Instant::now(), crate::sync::thread_cpu_s());
        let mut fig = ReadFigures::default();
        for (s, chunk) in buf.chunks_mut(STEP * PAGE_SIZE).enumerate() {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let mut withdrawn = 0u64;
            for (k, page) in chunk.chunks_exact_mut(PAGE_SIZE).enumerate() {
                let page: &mut Page = page.try_into().expect("a page's bytes");
                let hash = &self.entries[s * STEP + k].hash;
                if agent.copy_any(hash, page).is_some() {
                    fig.read += 1;
                } else {
                    withdrawn |= 1 << k;
                    fig.withdrawn += 1;
                }
            }
            let data: &'b [u8] = chunk;
            let _ = self.steps[s].set(Step { data, withdrawn });
            let through = ((s + 1) * STEP).min(self.entries.len());
            self.ready.store(through as u32, Ordering::Release);
        }
        fig.secs = t0.elapsed().as_secs_f64();
        fig.cpu = crate::sync::thread_cpu_s() - cpu0;
        fig
    }

    /// Stops [`Streamed::read_into`] at its next step (the session ended
    /// early).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn step(&self, i: u32) -> Option<&Step<'b>> {
        self.steps[i as usize / STEP].get()
    }
}

/// Sends a cast of `entries` (in the order they go) on `listener` with
/// `cfg` and `groups`, reading the pages on a thread of its own while the
/// session runs: the session's result, and what the reading did.
pub fn send_as_read(
    agent: &Agent,
    listener: TcpListener,
    cfg: &SenderConfig,
    groups: Groups,
    entries: Vec<PageEntry>,
) -> (Result<SendReport, CastError>, ReadFigures) {
    let src = Streamed::new(entries);
    let mut buf = vec![0u8; src.buffer_len()];
    advise_huge(&mut buf);
    std::thread::scope(|sc| {
        let reader = std::thread::Builder::new()
            .name("pagecast-cast-read".into())
            .spawn_scoped(sc, || src.read_into(agent, &mut buf));
        let res = match &reader {
            Ok(_) => {
                pagecast_multicast::send_on(listener, cfg, groups, &src, agent.tls(), &|_, _| {})
            }
            Err(e) => Err(CastError::Config(format!(
                "cannot start reading the cast's pages: {e}"
            ))),
        };
        src.stop();
        let read = reader.ok().and_then(|t| t.join().ok()).unwrap_or_default();
        (res, read)
    })
}

/// Asks the kernel to back `buf`'s allocation (its length and spare
/// capacity) with transparent huge pages, best before it is first
/// written: faulting in a fresh staging buffer 4 KiB at a time is most of
/// a cast's staging (docs/evaluation.md, "Where the CPU goes").
pub(crate) fn advise_huge(buf: &mut Vec<u8>) {
    const HUGE: usize = 2 << 20;
    let start = buf.as_mut_ptr() as usize;
    let end = start + buf.capacity();
    let (a, b) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
    if b > a {
        // SAFETY: [a, b) lies inside the allocation `buf` owns;
        // MADV_HUGEPAGE changes only how the kernel backs those pages, not
        // their contents or mapping.
        unsafe {
            libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE);
        }
    }
}

impl PageSource for Streamed<'_> {
    fn pages(&self) -> u32 {
        self.entries.len() as u32
    }
    fn entry(&self, i: u32) -> PageEntry {
        self.entries[i as usize]
    }
    fn read(&self, i: u32, out: &mut Page) -> io::Result<()> {
        let step = self
            .step(i)
            .filter(|s| s.withdrawn >> (i as usize % STEP) & 1 == 0)
            .ok_or_else(|| io::Error::other(format!("page {i} of the cast was not read")))?;
        let at = i as usize % STEP * PAGE_SIZE;
        out.copy_from_slice(&step.data[at..at + PAGE_SIZE]);
        Ok(())
    }
    fn frames(&self) -> u64 {
        self.frames
    }
    fn ready(&self) -> u32 {
        if self.over.load(Ordering::Acquire) {
            return self.pages();
        }
        self.ready.load(Ordering::Acquire)
    }
    fn withdrawn(&self, i: u32) -> bool {
        match self.step(i) {
            Some(s) => s.withdrawn >> (i as usize % STEP) & 1 == 1,
            // Never read: the reading is over without it.
            None => self.over.load(Ordering::Acquire),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagecast_pages::PageHash;

    fn entries(n: usize) -> Vec<PageEntry> {
        (0..n)
            .map(|i| PageEntry {
                key: (n - i) as u64,
                hash: PageHash::from_bytes([i as u8; 32]),
            })
            .collect()
    }

    /// Before any page is read none is ready; once the reading is over
    /// without reading them, every page is ready and withdrawn, so a
    /// session never waits for pages no one will read.
    #[test]
    fn pages_not_read_when_the_reading_ends_are_withdrawn() {
        let s = Streamed::new(entries(STEP * 2 + 5));
        assert_eq!(s.ready(), 0);
        assert!(!s.withdrawn(0));
        assert_eq!(s.frames(), (STEP * 2 + 5) as u64 + 1);
        drop(Over(&s.over));
        assert_eq!(s.ready(), s.pages());
        assert!((0..s.pages()).all(|i| s.withdrawn(i)));
        let mut page = [0u8; PAGE_SIZE];
        assert!(s.read(3, &mut page).is_err());
    }
}
