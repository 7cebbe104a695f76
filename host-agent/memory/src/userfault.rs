//! Missing-page faults of a [`Region`], delivered to this process through
//! Linux's userfaultfd, for post-copy: a guest resumes on memory whose
//! missing frames are absent (never faulted in, or dropped with
//! [`Region::discard`]), and each first touch of such a frame, by a vCPU
//! inside KVM or by any host thread, waits until the frame is placed with
//! [`Userfault::place`].
//!
//! The structures and request numbers below are the kernel's user ABI
//! (`include/uapi/linux/userfaultfd.h`), which the `libc` crate does not
//! carry.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::{MemoryError, PAGE_SIZE, Page, Region};

const UFFD_API: u64 = 0xAA;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
// _IOWR(0xAA, 0x3F, struct uffdio_api)
const UFFDIO_API: u64 = 0xC018_AA3F;
// _IOWR(0xAA, 0x00, struct uffdio_register)
const UFFDIO_REGISTER: u64 = 0xC020_AA00;
// _IOR(0xAA, 0x01, struct uffdio_range)
const UFFDIO_UNREGISTER: u64 = 0x8010_AA01;
// _IOR(0xAA, 0x02, struct uffdio_range)
const UFFDIO_WAKE: u64 = 0x8010_AA02;
// _IOWR(0xAA, 0x03, struct uffdio_copy)
const UFFDIO_COPY: u64 = 0xC028_AA03;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffd_msg`: 32 bytes, an event and its arguments.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    /// For a page fault: flags, address, thread id (and padding).
    arg: [u64; 3],
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);

fn os(what: &str, bytes: u64) -> impl FnOnce(std::io::Error) -> MemoryError + '_ {
    move |source| MemoryError::Map {
        what: what.to_owned(),
        bytes,
        source,
    }
}

/// The missing-page faults of one region. Dropping it (closing the
/// descriptor) unregisters the region: frames still missing then read as
/// zero, so [`Region::keep_userfault`] keeps it as long as the memory.
pub struct Userfault {
    fd: OwnedFd,
    base: u64,
    len: u64,
    /// The region is gone (unmapped or about to be): nothing may be placed
    /// or unregistered by address any more. Held across each such call.
    gone: std::sync::Mutex<bool>,
    released: std::sync::atomic::AtomicBool,
    failed: std::sync::atomic::AtomicBool,
}

impl Userfault {
    /// Registers every frame of `region` for missing-page faults. The
    /// region must outlive the returned value's use ([`Userfault::place`]
    /// on a region that is gone fails; it never writes elsewhere: the
    /// kernel checks the range is still registered).
    pub fn register(region: &Region) -> Result<Self, MemoryError> {
        let len = region.len() as u64;
        // SAFETY: userfaultfd(2) takes flags only and returns a new file
        // descriptor or -1.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(os(
                "userfaultfd (post-copy needs it: run as root, or set vm.unprivileged_userfaultfd=1)",
                len,
            )(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a file descriptor this call just opened and
        // nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`,
        // which `api` is, laid out as the kernel's.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) } != 0 {
            return Err(os("userfaultfd handshake", len)(
                std::io::Error::last_os_error(),
            ));
        }
        let base = region.as_ptr() as u64;
        let mut reg = UffdioRegister {
            range: UffdioRange { start: base, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct
        // uffdio_register`; the range is the region's own mapping.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } != 0 {
            return Err(os("registering guest memory for post-copy", len)(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Userfault {
            fd,
            base,
            len,
            gone: std::sync::Mutex::new(false),
            released: std::sync::atomic::AtomicBool::new(false),
            failed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether this process may catch missing-page faults at all (opens a
    /// descriptor, shakes hands and closes it).
    pub fn available() -> Result<(), MemoryError> {
        let region = Region::anonymous_unpopulated(PAGE_SIZE as u64)?;
        Userfault::register(&region).map(drop)
    }

    /// Frames of the region.
    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE as u64
    }

    /// Waits up to `timeout` for faults and returns the frames faulted on
    /// (a frame may repeat: each waiting thread reports its own fault).
    pub fn faults(&self, timeout: Duration, out: &mut Vec<u64>) -> Result<(), MemoryError> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(os("waiting for post-copy faults", self.len)(e));
        }
        let mut msgs = [UffdMsg::default(); 32];
        loop {
            // SAFETY: reads whole `uffd_msg`s into a buffer of that type
            // and of that size.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr().cast(),
                    std::mem::size_of_val(&msgs),
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(()),
                    _ => Err(os("reading post-copy faults", self.len)(e)),
                };
            }
            let count = n as usize / std::mem::size_of::<UffdMsg>();
            for m in &msgs[..count] {
                if m.event != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let at = m.arg[1];
                if at >= self.base && at < self.base + self.len {
                    out.push((at - self.base) / PAGE_SIZE as u64);
                }
            }
            if count < msgs.len() {
                return Ok(());
            }
        }
    }

    /// Places `page` in missing frame `frame` and wakes whoever waits on it.
    /// Returns false if the frame was no longer missing (placed before);
    /// its waiters are woken all the same.
    pub fn place(&self, frame: u64, page: &Page) -> Result<bool, MemoryError> {
        if frame >= self.pages() {
            return Err(MemoryError::FrameOutOfRange {
                frame,
                pages: self.pages(),
            });
        }
        let dst = self.base + frame * PAGE_SIZE as u64;
        let gone = self.gone.lock().unwrap_or_else(|e| e.into_inner());
        if *gone {
            return Err(os("placing a post-copy page", self.len)(
                std::io::Error::new(std::io::ErrorKind::NotFound, "the guest memory is gone"),
            ));
        }
        loop {
            let mut c = UffdioCopy {
                dst,
                src: page.as_ptr() as u64,
                len: PAGE_SIZE as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads and writes one `struct uffdio_copy`;
            // it copies PAGE_SIZE bytes from `page`, which is that long, to
            // `dst`, which lies in this region: `gone` is held, and the
            // region marks it before it is unmapped (`Region`'s drop), so
            // the range is still this region's mapping.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
            if r == 0 {
                return Ok(true);
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EEXIST) => {
                    self.wake(dst)?;
                    return Ok(false);
                }
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                _ => return Err(os("placing a post-copy page", self.len)(e)),
            }
        }
    }

    /// Stops catching faults: every thread waiting on a missing frame
    /// goes on, and missing frames read as zero from now on. Once every
    /// frame is there (nothing can fault any more, and memory dropped later
    /// must not wait for a handler that is gone), or for a guest that
    /// cannot be completed, so that it can be stopped. The region must
    /// still be mapped. (Dropping the last handle does the same for
    /// whatever is still registered.)
    pub fn release(&self) {
        let gone = self.gone.lock().unwrap_or_else(|e| e.into_inner());
        if *gone
            || self
                .released
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let mut r = UffdioRange {
            start: self.base,
            len: self.len,
        };
        // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`, which
        // is this region's mapping (`gone` is held and unset). A failure
        // leaves the range registered until the descriptor closes.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut r) };
        drop(gone);
    }

    /// Whether faults are still caught (not released).
    pub fn active(&self) -> bool {
        !self.released.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Marks the memory as one that can no longer be completed: a guest
    /// running on it must not run on (see [`Userfault::failed`]).
    pub fn fail(&self) {
        self.failed
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether [`Userfault::fail`] was called.
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The region is going away: every later call by address does nothing
    /// (waits for one in progress first).
    pub(crate) fn gone(&self) {
        *self.gone.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    fn wake(&self, at: u64) -> Result<(), MemoryError> {
        let mut r = UffdioRange {
            start: at,
            len: PAGE_SIZE as u64,
        };
        // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut r) } != 0 {
            return Err(os("waking a post-copy fault", self.len)(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread touching missing frames waits until each is placed, then
    /// reads what was placed; frames placed before the touch and frames
    /// never dropped do not fault at all.
    #[test]
    fn a_touch_of_a_missing_frame_waits_for_its_page() {
        let region = Region::anonymous(8 * PAGE_SIZE as u64).unwrap();
        let kept = [7u8; PAGE_SIZE];
        region.write_page(0, &kept).unwrap();
        region.discard(&[2, 3, 5]).unwrap();
        let uf = Userfault::register(&region).unwrap();
        let early = [5u8; PAGE_SIZE];
        assert!(uf.place(5, &early).unwrap());
        assert!(!uf.place(5, &early).unwrap(), "placed twice");
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut p = [0u8; PAGE_SIZE];
                let mut got = Vec::new();
                for f in [0, 5, 2, 3] {
                    region.read_page(f, &mut p).unwrap();
                    got.push(p[100]);
                }
                got
            });
            let mut faulted = Vec::new();
            let mut placed = 0;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while placed < 2 {
                assert!(std::time::Instant::now() < deadline, "no faults");
                let mut now = Vec::new();
                uf.faults(Duration::from_millis(50), &mut now).unwrap();
                for f in now {
                    faulted.push(f);
                    if uf.place(f, &[f as u8 * 10; PAGE_SIZE]).unwrap() {
                        placed += 1;
                    }
                }
            }
            assert_eq!(reader.join().unwrap(), vec![7, 5, 20, 30]);
            faulted.dedup();
            assert_eq!(faulted, vec![2, 3], "only the missing frames fault");
        });
        assert!(uf.place(8, &early).is_err(), "beyond the region");
    }

    /// Memory a post-copy completes says so; once released a frame never
    /// placed reads as zero; once the region is gone nothing is placed.
    #[test]
    fn released_faults_read_zero_and_a_gone_region_takes_no_page() {
        let mut region = Region::anonymous(4 * PAGE_SIZE as u64).unwrap();
        assert!(!region.postcopy());
        region.discard(&[2]).unwrap();
        let uf = std::sync::Arc::new(Userfault::register(&region).unwrap());
        region.keep_userfault(uf.clone());
        assert!(region.postcopy() && uf.active() && !region.postcopy_failed());
        uf.fail();
        assert!(region.postcopy_failed());
        uf.release();
        uf.release();
        assert!(!uf.active());
        // Released: a frame never placed reads as zero instead of waiting.
        let mut p = [1u8; PAGE_SIZE];
        region.read_page(2, &mut p).unwrap();
        assert!(p.iter().all(|&b| b == 0));
        drop(region);
        assert!(
            uf.place(1, &[3u8; PAGE_SIZE]).is_err(),
            "placed into memory that is gone"
        );
    }
}
