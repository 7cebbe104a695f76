//! Read leases on image files: the kernel's promise that nobody writes a
//! file while it is hashed, so its mapping can be hashed in place instead
//! of copied out first.
//!
//! An image may be the memory file of a running QEMU guest, and reading
//! memory another process writes through a shared reference is a data
//! race; so images are copied out a few pages at a time (a volatile copy)
//! unless a lease holds. A read lease (`fcntl(F_SETLEASE, F_RDLCK)`) is
//! granted only while no process has the file open for writing (a
//! writable shared mapping keeps its file open), and once granted, a
//! process that opens the file for writing (or truncates it) waits in
//! the kernel until the lease is released, at most `lease-break-time`
//! seconds (`/proc/sys/fs/lease-break-time`, 45 by default). The break is
//! told to this process by `SIGIO`: the handler installed here marks
//! every lease broken; pages being hashed in place at that moment finish,
//! the last of them releases the lease, and the rest of the image is
//! copied as before. So a writer waits for at most one unit of hashing.
//!
//! Where no lease can be had (the file is open for writing elsewhere, the
//! caller neither owns it nor has `CAP_LEASE`, the filesystem has no
//! leases, or something else in the process handles `SIGIO`), the image
//! is copied, as it always was.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Counted up by the `SIGIO` handler: some lease of this process is
/// being broken (the signal does not say which, so every lease taken
/// before counts as broken).
static BREAKS: AtomicU64 = AtomicU64::new(0);
/// Whether this module's handler is the process's `SIGIO` handler.
static HANDLER: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();

extern "C" fn on_sigio(_: libc::c_int) {
    // Async-signal-safe: one atomic add.
    BREAKS.fetch_add(1, Ordering::SeqCst);
}

/// Installs the `SIGIO` handler once, if nothing else handles `SIGIO`
/// (its default action would end the process at the first break).
fn install_handler() -> bool {
    INSTALL.call_once(|| {
        // SAFETY: sigaction with a null new action only reads the current
        // one into `old`, a zeroed struct we own.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::sigaction(libc::SIGIO, std::ptr::null(), &mut old) } != 0 {
            return;
        }
        if old.sa_sigaction != libc::SIG_DFL {
            // Someone else's handler (or SIGIO ignored, which would hide
            // breaks): no leases.
            return;
        }
        // SAFETY: a zeroed sigaction is a valid start; the handler only
        // stores to an atomic, which is async-signal-safe; sa_mask is
        // emptied with sigemptyset on memory we own.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_sigio as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: as above.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: installs a valid action for SIGIO; `old` is ours.
        if unsafe { libc::sigaction(libc::SIGIO, &sa, std::ptr::null_mut()) } == 0 {
            HANDLER.store(true, Ordering::SeqCst);
        }
    });
    HANDLER.load(Ordering::SeqCst)
}

/// A read lease on one open file, while it is hashed.
#[derive(Debug)]
pub struct Lease {
    file: File,
    /// [`BREAKS`] when the lease was asked for: any later break counts.
    seen: u64,
    /// Units reading the mapping in place right now.
    inflight: AtomicUsize,
    released: AtomicBool,
    /// Pages read in place under this lease.
    in_place: AtomicU64,
}

impl Lease {
    /// Takes a read lease on `file` (opened read-only); None where the
    /// kernel or the process refuses one (see the module's docs).
    pub fn take(file: &File) -> Option<Lease> {
        if !install_handler() {
            return None;
        }
        let file = file.try_clone().ok()?;
        // Read before asking: a break signalled once the lease is granted
        // counts against it.
        let seen = BREAKS.load(Ordering::SeqCst);
        // SAFETY: fcntl on a descriptor we own; F_SETLEASE takes an int.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
        (r == 0).then(|| Lease {
            file,
            seen,
            inflight: AtomicUsize::new(0),
            released: AtomicBool::new(false),
            in_place: AtomicU64::new(0),
        })
    }

    /// Starts reading `pages` pages in place: true while the lease holds
    /// (then [`Lease::exit`] must follow); false once it is broken or
    /// released.
    pub fn enter(&self, pages: u64) -> bool {
        if self.released.load(Ordering::SeqCst) {
            return false;
        }
        self.inflight.fetch_add(1, Ordering::SeqCst);
        if self.broken() || self.released.load(Ordering::SeqCst) {
            self.exit();
            return false;
        }
        self.in_place.fetch_add(pages, Ordering::Relaxed);
        true
    }

    /// Ends a read begun by [`Lease::enter`]; the last one out of a
    /// broken lease releases it, letting the writer on.
    pub fn exit(&self) {
        if self.inflight.fetch_sub(1, Ordering::SeqCst) == 1 && self.broken() {
            self.release();
        }
    }

    /// Releases the lease (once); later [`Lease::enter`]s fail.
    pub fn release(&self) {
        if !self.released.swap(true, Ordering::SeqCst) {
            // SAFETY: fcntl on a descriptor we own; F_UNLCK ends the lease.
            unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        }
    }

    /// Pages read in place under this lease.
    pub fn pages_in_place(&self) -> u64 {
        self.in_place.load(Ordering::Relaxed)
    }

    /// Whether a break was signalled since the lease was taken.
    pub fn broken(&self) -> bool {
        BREAKS.load(Ordering::SeqCst) != self.seen
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.release();
    }
}

/// Pages of a leased image read in place: nobody can write them while
/// this lives (see [`crate::GuestMemory::hold_still`]).
pub struct Still<'a> {
    bytes: &'a [u8],
    lease: &'a Lease,
}

impl<'a> Still<'a> {
    /// `bytes`, read under `lease`, which [`Lease::enter`] admitted.
    pub(crate) fn new(bytes: &'a [u8], lease: &'a Lease) -> Self {
        Still { bytes, lease }
    }

    /// The pages, one after another.
    pub fn bytes(&self) -> &[u8] {
        self.bytes
    }
}

impl Drop for Still<'_> {
    fn drop(&mut self) {
        self.lease.exit();
    }
}
