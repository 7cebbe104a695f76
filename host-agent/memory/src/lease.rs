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
//! process that opens the file for writing (or truncates it) waits in the
//! kernel until the lease is released, or until `lease-break-time` passes
//! (`/proc/sys/fs/lease-break-time`, 45 s by default). A writer that opens
//! with `O_NONBLOCK` is refused (`EWOULDBLOCK`) instead of waiting.
//!
//! No signal is involved: the lease's owner is cleared, so a break is
//! signalled to no one, and each block of pages asks the kernel whether
//! the lease still holds (`F_GETLEASE`) before it is read in place and
//! again after it was hashed. A block read while a break began is hashed
//! again from a copy; once broken, the lease is released as soon as the
//! blocks being read are done, and the rest is copied. So a writer waits
//! for at most the blocks in flight: one block of 32 pages per hashing
//! thread (not timed on its own; longer where the pages must first be
//! read from disk).
//!
//! Leases are asked for only on local filesystems (ext4, XFS, btrfs,
//! tmpfs, hugetlbfs, F2FS): on a network or FUSE filesystem a lease may
//! keep out only this host's writers. Where no lease can be had (the file
//! is open for writing, the caller neither owns it nor has `CAP_LEASE`,
//! another filesystem, `lease-break-time` under 5 s, or something in the
//! process handles `SIGURG`), the image is copied, as it always was.
//!
//! The assumption in-place reading rests on: a block is done within
//! `lease-break-time` of a break. Past that the kernel lets the writer in
//! whatever this process does, so a block still being read then (a
//! process stopped mid-block for longer than that) would overlap the
//! writer; its hashes would be taken again from a copy, but the reads
//! themselves would have raced. A writer waits for at most the blocks in
//! flight while an image is hashed; the lease is given up as soon as the
//! image is hashed.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Filesystems whose leases keep out every writer (`statfs` magic, the
/// low 32 bits: a 32-bit `f_type` is signed).
const LOCAL_FILESYSTEMS: [u32; 6] = [
    0xEF53,      // ext2/3/4
    0x5846_5342, // XFS
    0x9123_683E, // btrfs
    0x0102_1994, // tmpfs
    0x9584_58F6, // hugetlbfs
    0xF2F5_2010, // F2FS
];

/// A signal whose default action is to ignore it, for the lease's I/O
/// signal in the moment before its owner is cleared.
const QUIET_SIGNAL: libc::c_int = libc::SIGURG;

/// `fcntl`'s command that picks a descriptor's I/O signal (Linux's
/// `F_SETSIG`, which the libc crate does not name).
const F_SETSIG: libc::c_int = 10;

/// Whether `file` lies on a filesystem in [`LOCAL_FILESYSTEMS`].
fn on_local_filesystem(file: &File) -> bool {
    // SAFETY: fstatfs fills the zeroed struct we own from a descriptor we
    // own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    LOCAL_FILESYSTEMS.contains(&(st.f_type as u32))
}

/// The least `lease-break-time` leases are taken under: the kernel lets a
/// writer in after that long whatever this process does, and a block must
/// be done well within it.
const LEAST_BREAK_TIME_S: u64 = 5;

/// Whether the kernel's wait for a broken lease is at least
/// [`LEAST_BREAK_TIME_S`] (`/proc/sys/fs/lease-break-time`).
fn break_time_long_enough() -> bool {
    std::fs::read_to_string("/proc/sys/fs/lease-break-time")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|t| t >= LEAST_BREAK_TIME_S)
}

/// Whether the quiet signal is still ignored by default in this process.
fn quiet_signal_ignored() -> bool {
    // SAFETY: sigaction with a null new action only reads the current one
    // into `old`, a zeroed struct we own.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::sigaction(QUIET_SIGNAL, std::ptr::null(), &mut old) }) == 0
        && old.sa_sigaction == libc::SIG_DFL
}

/// Where the in-place reading of a lease stands.
#[derive(Debug, Default)]
struct State {
    /// Blocks being read in place right now.
    inflight: usize,
    /// No more blocks in place (broken or released); the kernel's lease
    /// goes once `inflight` is 0.
    closed: bool,
    /// The kernel's lease was given up (`F_UNLCK`).
    unlocked: bool,
}

/// A read lease on one open file, while it is hashed.
#[derive(Debug)]
pub struct Lease {
    file: File,
    state: Mutex<State>,
    /// Pages read (and kept) in place under this lease.
    in_place: AtomicU64,
}

impl Lease {
    /// Takes a read lease on `file` (opened read-only); None where the
    /// kernel or the filesystem refuses one (see the module's docs).
    pub fn take(file: &File) -> Option<Lease> {
        if !on_local_filesystem(file) || !quiet_signal_ignored() || !break_time_long_enough() {
            return None;
        }
        let file = file.try_clone().ok()?;
        let fd = file.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own, with int arguments: a
        // break is signalled (if at all, before the owner is cleared
        // below) by a signal this process ignores; then the lease itself.
        unsafe {
            if libc::fcntl(fd, F_SETSIG, QUIET_SIGNAL) != 0
                || libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) != 0
            {
                return None;
            }
            // No owner: a break is signalled to no one; `holds` asks. Were
            // the owner kept, a break would only send the ignored signal;
            // still, give the lease up rather than keep it half set.
            if libc::fcntl(fd, libc::F_SETOWN, 0) != 0 {
                libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK);
                return None;
            }
        }
        Some(Lease {
            file,
            state: Mutex::new(State::default()),
            in_place: AtomicU64::new(0),
        })
    }

    /// Whether the kernel still grants the lease unbroken.
    fn holds(&self) -> bool {
        // SAFETY: fcntl on a descriptor we own; F_GETLEASE takes no
        // argument. A lease being broken reports the type it is broken to.
        (unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_GETLEASE) }) == libc::F_RDLCK
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives up the kernel's lease once no block is read in place.
    fn unlock_if_idle(&self, st: &mut State) {
        if st.closed && st.inflight == 0 && !st.unlocked {
            st.unlocked = true;
            // SAFETY: fcntl on a descriptor we own; F_UNLCK ends the lease.
            unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        }
    }

    /// Starts reading a block in place: true while the lease holds (then
    /// [`Lease::exit`] must follow); false once it is broken or released.
    pub fn enter(&self) -> bool {
        let mut st = self.lock();
        if !st.closed && !self.holds() {
            st.closed = true;
        }
        if st.closed {
            self.unlock_if_idle(&mut st);
            return false;
        }
        st.inflight += 1;
        true
    }

    /// Ends a block begun by [`Lease::enter`] of `pages` pages: whether
    /// the lease held throughout (if not, the block's hashes must be taken
    /// again from a copy). The last block out of a broken or released
    /// lease gives it up, letting the writer on.
    pub fn exit(&self, pages: u64) -> bool {
        let mut st = self.lock();
        let held = !st.closed && self.holds();
        if !held {
            st.closed = true;
        }
        st.inflight -= 1;
        self.unlock_if_idle(&mut st);
        if held {
            self.in_place.fetch_add(pages, Ordering::Relaxed);
        }
        held
    }

    /// No more blocks in place: the lease is given up once those being
    /// read are done (at once if none is).
    pub fn release(&self) {
        let mut st = self.lock();
        st.closed = true;
        self.unlock_if_idle(&mut st);
    }

    /// Whether blocks may still be read in place.
    pub fn open(&self) -> bool {
        !self.lock().closed
    }

    /// Whether the kernel still grants the lease (false once a writer asked
    /// for the file, or it was given up).
    pub fn granted(&self) -> bool {
        !self.lock().unlocked && self.holds()
    }

    /// Pages read in place under this lease and kept.
    pub fn pages_in_place(&self) -> u64 {
        self.in_place.load(Ordering::Relaxed)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Every guard borrowed the lease, so none is left.
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        st.closed = true;
        if !st.unlocked {
            st.unlocked = true;
            // SAFETY: fcntl on a descriptor we own; F_UNLCK ends the lease
            // (closing the descriptor would as well).
            unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        }
    }
}

/// A block of a leased image read in place (see
/// [`crate::GuestMemory::hold_still`]).
pub struct Still<'a> {
    bytes: &'a [u8],
    lease: &'a Lease,
    pages: u64,
    done: bool,
}

impl<'a> Still<'a> {
    /// `bytes` (`pages` pages), read under `lease`, which
    /// [`Lease::enter`] admitted.
    pub(crate) fn new(bytes: &'a [u8], lease: &'a Lease, pages: u64) -> Self {
        Still {
            bytes,
            lease,
            pages,
            done: false,
        }
    }

    /// The pages, one after another. Crate-private: what is computed from
    /// them stands only if [`Still::kept`] says so.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.bytes
    }

    /// Ends the block: whether the lease held throughout, so that what was
    /// computed from [`Still::bytes`] stands; if not, it must be taken
    /// again from a copy.
    pub fn kept(mut self) -> bool {
        self.done = true;
        self.lease.exit(self.pages)
    }
}

impl Drop for Still<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.lease.exit(self.pages);
        }
    }
}
