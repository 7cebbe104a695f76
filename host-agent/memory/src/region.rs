//! One page-aligned mapping of guest memory, read and written only through
//! volatile copies.
//!
//! Guest memory is shared with whoever else can write it: a running vCPU,
//! another host thread filling pages, another process mapping the same
//! image. Rust references (`&[u8]`) over such memory would be a data race
//! in Rust's memory model, so the region never hands one out: every access
//! is a copy through rust-vmm's `vm-memory` (`MmapRegion`, `VolatileSlice`),
//! the access layer cloud-hypervisor and firecracker use for guest memory.
//! A copy may still catch a page mid-write; pagecast never trusts such a
//! copy for long, because every page written after it is read shows up in
//! the dirty log and is read again, and every page used as content is
//! hash-checked.

use std::fs::File;
use std::path::Path;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

use crate::{MemoryError, PAGE_SIZE, Page};

/// A page-aligned mapping that holds guest memory: anonymous memory (for
/// synthetic and KVM guests) or a memory-mapped image file.
pub struct Region {
    /// Missing-page faults of this memory, caught while a post-copy
    /// completes it: kept as long as the memory, so that no frame still
    /// missing ever reads as zero to a guest running on it.
    userfault: Option<std::sync::Arc<crate::Userfault>>,
    map: MmapRegion<()>,
    len: usize,
    writable: bool,
    kind: &'static str,
}

fn vm_err(what: &str, bytes: u64, e: vm_memory::mmap::MmapRegionError) -> MemoryError {
    let source = match e {
        vm_memory::mmap::MmapRegionError::Mmap(io) => io,
        other => std::io::Error::other(other.to_string()),
    };
    MemoryError::Map {
        what: what.to_owned(),
        bytes,
        source,
    }
}

/// Whether anonymous memory mapped from now on is offered to KSM.
static MERGEABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Offers (or stops offering) the anonymous guest memory this process maps
/// from now on to the kernel's same-page merging (`MADV_MERGEABLE`): pages
/// a destination filled with content its residents also hold can then be
/// merged back into one physical page. Off unless the process turns it on
/// (`pagecast agent` does, unless `--no-ksm`). Regions already mapped keep
/// what they were given.
pub fn set_mergeable(on: bool) {
    MERGEABLE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether anonymous guest memory mapped now is offered to KSM.
fn mergeable() -> bool {
    MERGEABLE.load(std::sync::atomic::Ordering::Relaxed)
}

impl Region {
    /// Maps `len` bytes of zeroed anonymous memory, populated up front (every
    /// page faulted in, so a later write by a guest is a write to an existing
    /// page). `len` must be a non-zero multiple of the page size.
    pub fn anonymous(len: u64) -> Result<Self, MemoryError> {
        Self::anonymous_with(len, libc::MAP_POPULATE)
    }

    /// As [`Region::anonymous`], not populated: mapping is instant, and the
    /// pages are faulted in as they are written or by [`Region::populate`]
    /// (which a region must go through before a guest runs on it).
    pub fn anonymous_unpopulated(len: u64) -> Result<Self, MemoryError> {
        Self::anonymous_with(len, 0)
    }

    /// Faults in every page of the region for writing without changing its
    /// contents, so it is safe while other threads write the region.
    pub fn populate(&self) -> Result<(), MemoryError> {
        // Small steps: each holds the address space's lock for reading, and
        // every mmap, mprotect and thread start of the process (malloc
        // growing its heap included) waits behind a step in progress.
        const STEP: usize = 2 << 20;
        let mut at = 0;
        while at < self.len {
            let n = STEP.min(self.len - at);
            // SAFETY: the range lies inside this mapping, which lives as long
            // as `self`; MADV_POPULATE_WRITE only faults pages in (as a write
            // of nothing would), it never changes their contents.
            let r = unsafe {
                libc::madvise(self.as_ptr().add(at).cast(), n, libc::MADV_POPULATE_WRITE)
            };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(MemoryError::Map {
                        what: "populating guest memory".into(),
                        bytes: self.len as u64,
                        source: e,
                    });
                }
                // A kernel before 5.14: an atomic no-op write per page.
                for page in (at..at + n).step_by(PAGE_SIZE) {
                    // SAFETY: `page` is inside the mapping and aligned; an
                    // atomic OR of zero writes the byte's own value, so it
                    // races with no other writer's data.
                    unsafe {
                        std::sync::atomic::AtomicU8::from_ptr(self.as_ptr().add(page))
                            .fetch_or(0, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            at += n;
        }
        Ok(())
    }

    /// Keeps `uf` (registered on this region) until the region is dropped.
    pub fn keep_userfault(&mut self, uf: std::sync::Arc<crate::Userfault>) {
        self.userfault = Some(uf);
    }

    /// Whether this memory arrived by post-copy (see
    /// [`Region::keep_userfault`]): until the arrival says it is complete,
    /// frames of it may be missing.
    pub fn postcopy(&self) -> bool {
        self.userfault.is_some()
    }

    /// The faults of its post-copy, if it arrived so.
    pub fn userfault(&self) -> Option<std::sync::Arc<crate::Userfault>> {
        self.userfault.clone()
    }

    /// Its post-copy failed: a guest on it must not run on.
    pub fn postcopy_failed(&self) -> bool {
        self.userfault.as_ref().is_some_and(|u| u.failed())
    }

    /// Drops `frames` of anonymous memory: each reads as zero again, and
    /// is missing (absent until next touched) for [`crate::Userfault`].
    /// Runs of consecutive frames go in one call each: every call costs
    /// a TLB flush on each CPU running the process, and a post-copy
    /// switchover drops tens of thousands of frames inside the VM's pause.
    pub fn discard(&self, frames: &[u64]) -> Result<(), MemoryError> {
        if self.kind != "anonymous" {
            return Err(MemoryError::ReadOnly);
        }
        if let Some(&f) = frames.iter().find(|&&f| f >= self.pages()) {
            return Err(MemoryError::FrameOutOfRange {
                frame: f,
                pages: self.pages(),
            });
        }
        for (first, count) in runs(frames) {
            let len = count as usize * PAGE_SIZE;
            // SAFETY: the run lies inside this private anonymous mapping
            // (every frame was checked against its size above), which lives
            // as long as `self`; MADV_DONTNEED on it only drops its
            // contents (they read as zero afterwards), which every reader of
            // the region copies through volatile accesses.
            let r = unsafe {
                libc::madvise(
                    self.as_ptr().add(first as usize * PAGE_SIZE).cast(),
                    len,
                    libc::MADV_DONTNEED,
                )
            };
            if r != 0 {
                return Err(MemoryError::Map {
                    what: "dropping guest pages".into(),
                    bytes: len as u64,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    fn anonymous_with(len: u64, populate: libc::c_int) -> Result<Self, MemoryError> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE as u64) {
            return Err(MemoryError::Map {
                what: "guest memory".into(),
                bytes: len,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "size must be a non-zero multiple of 4096",
                ),
            });
        }
        let size = usize::try_from(len).map_err(|_| MemoryError::Map {
            what: "guest memory".into(),
            bytes: len,
            source: std::io::Error::from(std::io::ErrorKind::OutOfMemory),
        })?;
        let map = MmapRegionBuilder::new(size)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | populate)
            .build()
            .map_err(|e| vm_err("guest memory", len, e))?;
        if mergeable() {
            // SAFETY: the range is exactly the mapping just made, which
            // `map` owns; MADV_MERGEABLE changes no contents, only lets the
            // kernel share identical pages copy-on-write. A kernel without
            // KSM answers EINVAL, and the memory simply stays unmerged.
            unsafe {
                libc::madvise(map.as_ptr().cast(), size, libc::MADV_MERGEABLE);
            }
        }
        Ok(Region {
            userfault: None,
            map,
            len: size,
            writable: true,
            kind: "anonymous",
        })
    }

    /// Maps an open image file of `len` bytes (already validated), read-only
    /// or shared-writable.
    pub(crate) fn file(
        file: &File,
        path: &Path,
        len: u64,
        writable: bool,
    ) -> Result<Self, MemoryError> {
        let what = path.display().to_string();
        let size = usize::try_from(len).map_err(|_| MemoryError::Map {
            what: what.clone(),
            bytes: len,
            source: std::io::Error::from(std::io::ErrorKind::OutOfMemory),
        })?;
        let own = file.try_clone().map_err(|source| MemoryError::Map {
            what: what.clone(),
            bytes: len,
            source,
        })?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let map = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(own, 0))
            .with_mmap_prot(prot)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(|e| vm_err(&what, len, e))?;
        Ok(Region {
            userfault: None,
            map,
            len: size,
            writable,
            kind: if writable {
                "file (shared)"
            } else {
                "file (read-only)"
            },
        })
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        (self.len / PAGE_SIZE) as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has no bytes (never true for a constructed region).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether [`write_page`](Region::write_page) is allowed.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Address of the first byte, for handing the region to KVM.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    fn offset(&self, frame: u64) -> Result<usize, MemoryError> {
        if frame >= self.pages() {
            return Err(MemoryError::FrameOutOfRange {
                frame,
                pages: self.pages(),
            });
        }
        Ok(frame as usize * PAGE_SIZE)
    }

    fn range(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(MemoryError::FrameOutOfRange {
                frame: (offset.saturating_add(len) / PAGE_SIZE) as u64,
                pages: self.pages(),
            }),
        }
    }

    fn slice(&self, offset: usize, len: usize) -> vm_memory::VolatileSlice<'_, ()> {
        self.map
            .get_slice(offset, len)
            .expect("range checked against the mapping's length")
    }

    /// Copies page `frame` into `out`.
    pub fn read_page(&self, frame: u64, out: &mut Page) -> Result<(), MemoryError> {
        let at = self.offset(frame)?;
        self.slice(at, PAGE_SIZE).copy_to(&mut out[..]);
        Ok(())
    }

    /// Copies the pages from `first` on into `out` (a whole number of
    /// pages), in one volatile copy.
    pub fn read_pages(&self, first: u64, out: &mut [u8]) -> Result<(), MemoryError> {
        assert!(out.len().is_multiple_of(PAGE_SIZE), "whole pages");
        let at = self.offset(first)?;
        self.read_bytes(at, out)
    }

    /// Overwrites page `frame` with `data`.
    pub fn write_page(&self, frame: u64, data: &Page) -> Result<(), MemoryError> {
        if !self.writable {
            return Err(MemoryError::ReadOnly);
        }
        let at = self.offset(frame)?;
        self.slice(at, PAGE_SIZE).copy_from(&data[..]);
        Ok(())
    }

    /// Copies `data` into the region starting at byte `offset`; used to load
    /// an image or a program into fresh guest memory.
    pub fn write_bytes(&self, offset: usize, data: &[u8]) -> Result<(), MemoryError> {
        if !self.writable {
            return Err(MemoryError::ReadOnly);
        }
        self.range(offset, data.len())?;
        if !data.is_empty() {
            self.slice(offset, data.len()).copy_from(data);
        }
        Ok(())
    }

    /// Copies bytes starting at `offset` into `out`.
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) -> Result<(), MemoryError> {
        self.range(offset, out.len())?;
        if !out.is_empty() {
            self.slice(offset, out.len()).copy_to(out);
        }
        Ok(())
    }

    /// Which kind of mapping backs the region (for diagnostics).
    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // Before the mapping goes: nothing may place a page at its
        // addresses any more (another mapping may take them).
        if let Some(u) = &self.userfault {
            u.gone();
        }
    }
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("kind", &self.kind())
            .field("len", &self.len)
            .finish()
    }
}

/// `frames` as runs of consecutive frames, (first, count), in order and
/// each frame once.
fn runs(frames: &[u64]) -> Vec<(u64, u64)> {
    let mut sorted = frames.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for f in sorted {
        match out.last_mut() {
            Some((first, count)) if *first + *count == f => *count += 1,
            _ => out.push((f, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_go_in_runs_each_once() {
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(
            runs(&[9, 3, 4, 5, 5, 0, 10, 12]),
            vec![(0, 1), (3, 3), (9, 2), (12, 1)]
        );
    }

    #[test]
    fn discarded_runs_read_as_zero_and_the_rest_stays() {
        let r = Region::anonymous(16 * PAGE_SIZE as u64).unwrap();
        for f in 0..16u64 {
            r.write_page(f, &[f as u8 + 1; PAGE_SIZE]).unwrap();
        }
        r.discard(&[7, 2, 3, 4, 15, 3]).unwrap();
        let mut p = [0u8; PAGE_SIZE];
        for f in 0..16u64 {
            r.read_page(f, &mut p).unwrap();
            let dropped = [2, 3, 4, 7, 15].contains(&f);
            let want = if dropped { 0 } else { f as u8 + 1 };
            assert!(p.iter().all(|&b| b == want), "frame {f}");
        }
        assert!(matches!(
            r.discard(&[1, 16]),
            Err(MemoryError::FrameOutOfRange { frame: 16, .. })
        ));
        r.read_page(1, &mut p).unwrap();
        assert_eq!(p[0], 2, "nothing dropped when a frame is out of range");
    }

    /// The kernel's flags of the mapping that starts at `addr`
    /// (`/proc/self/smaps`, its `VmFlags` line).
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        while let Some(l) = lines.next() {
            let start = l.split('-').next().unwrap_or("");
            if usize::from_str_radix(start, 16).ok() == Some(addr) {
                for l in lines.by_ref() {
                    if let Some(f) = l.strip_prefix("VmFlags:") {
                        return f.trim().to_owned();
                    }
                }
            }
        }
        panic!("no mapping at {addr:#x}");
    }

    #[test]
    fn guest_memory_is_offered_to_ksm_only_when_asked() {
        use pagecast_testkit::{Need, needs};
        if !needs(
            "guest_memory_is_offered_to_ksm_only_when_asked",
            &[Need::Ksm],
        ) {
            return;
        }
        set_mergeable(false);
        let plain = Region::anonymous(16 * PAGE_SIZE as u64).unwrap();
        set_mergeable(true);
        let merged = Region::anonymous(16 * PAGE_SIZE as u64).unwrap();
        set_mergeable(false);
        let flags = |r: &Region| vm_flags(r.map.as_ptr() as usize);
        assert!(
            !flags(&plain).split(' ').any(|f| f == "mg"),
            "{}",
            flags(&plain)
        );
        assert!(
            flags(&merged).split(' ').any(|f| f == "mg"),
            "{}",
            flags(&merged)
        );
    }
}
