//! One page-aligned mapping of guest memory.

use std::fs::File;
use std::path::Path;

use memmap2::{Mmap, MmapMut, MmapOptions};

use super::{MemoryError, PAGE_SIZE, Page};

enum Backing {
    Anonymous(#[allow(dead_code)] MmapMut),
    FileReadOnly(#[allow(dead_code)] Mmap),
    FileShared(#[allow(dead_code)] MmapMut),
}

/// A page-aligned mapping that holds guest memory: anonymous memory (for
/// synthetic and KVM guests) or a memory-mapped image file.
///
/// Guest memory is shared with whoever else can write it: a running vCPU,
/// or another host thread filling pages. Reads may therefore observe a page
/// mid-write; pagecast never trusts such a read for long, because every page
/// written after it is read shows up in the dirty log and is read again.
pub struct Region {
    backing: Backing,
    ptr: *mut u8,
    len: usize,
    writable: bool,
}

// SAFETY: `Region` owns its mapping; the raw pointer is only an alias of
// memory the mapping keeps alive for the Region's lifetime. Access through
// `&Region` is to plain bytes, where concurrent writers are expected (see the
// type's docs) and no reference to the bytes is held across calls.
unsafe impl Send for Region {}
// SAFETY: as for `Send`: methods taking `&self` copy bytes in or out of the
// mapping with raw-pointer copies and never hand out `&mut` to it.
unsafe impl Sync for Region {}

impl Region {
    /// Maps `len` bytes of zeroed anonymous memory, populated up front (every
    /// page faulted in, so a later write by a guest is a write to an existing
    /// page). `len` must be a non-zero multiple of the page size.
    pub fn anonymous(len: u64) -> Result<Self, MemoryError> {
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
        let mut map = MmapOptions::new()
            .len(size)
            .populate()
            .map_anon()
            .map_err(|source| MemoryError::Map {
                what: "guest memory".into(),
                bytes: len,
                source,
            })?;
        let ptr = map.as_mut_ptr();
        Ok(Region {
            backing: Backing::Anonymous(map),
            ptr,
            len: size,
            writable: true,
        })
    }

    /// Maps an open image file of `len` bytes (already validated), read-only
    /// or shared-writable.
    pub(super) fn file(
        file: &File,
        path: &Path,
        len: u64,
        writable: bool,
    ) -> Result<Self, MemoryError> {
        let map_err = |source| MemoryError::Map {
            what: path.display().to_string(),
            bytes: len,
            source,
        };
        let size = usize::try_from(len)
            .map_err(|_| map_err(std::io::Error::from(std::io::ErrorKind::OutOfMemory)))?;
        if writable {
            // SAFETY: the mapping is of a regular file we opened read-write.
            // Another process truncating it would fault our accesses; an
            // image is not expected to change under pagecast, as documented
            // on `ImageFile`.
            let mut map = unsafe { MmapOptions::new().len(size).map_mut(file) }.map_err(map_err)?;
            let ptr = map.as_mut_ptr();
            Ok(Region {
                backing: Backing::FileShared(map),
                ptr,
                len: size,
                writable: true,
            })
        } else {
            // SAFETY: as above, for a read-only mapping.
            let map = unsafe { MmapOptions::new().len(size).map(file) }.map_err(map_err)?;
            let ptr = map.as_ptr() as *mut u8;
            Ok(Region {
                backing: Backing::FileReadOnly(map),
                ptr,
                len: size,
                writable: false,
            })
        }
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
        self.ptr
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

    /// Copies page `frame` into `out`.
    pub fn read_page(&self, frame: u64, out: &mut Page) -> Result<(), MemoryError> {
        let at = self.offset(frame)?;
        // SAFETY: `at + PAGE_SIZE <= len` (checked by `offset`), the mapping
        // is alive for `self`'s lifetime, and `out` cannot overlap it (it is
        // a `&mut` to memory we do not hand out).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), out.as_mut_ptr(), PAGE_SIZE) };
        Ok(())
    }

    /// Overwrites page `frame` with `data`.
    pub fn write_page(&self, frame: u64, data: &Page) -> Result<(), MemoryError> {
        if !self.writable {
            return Err(MemoryError::ReadOnly);
        }
        let at = self.offset(frame)?;
        // SAFETY: in bounds as in `read_page`; the mapping is writable
        // (checked above). `data` may not alias the region: callers pass
        // their own buffers, and a page copied onto itself would still be a
        // plain byte copy.
        unsafe { std::ptr::copy(data.as_ptr(), self.ptr.add(at), PAGE_SIZE) };
        Ok(())
    }

    /// The whole region as bytes, for hashing in place.
    ///
    /// # Safety
    /// The caller must tolerate the bytes changing while it reads them (a
    /// running guest may write them): it may only hash or copy them, and
    /// must treat what it computed from them as stale once the pages show up
    /// in the dirty log. No `&mut` to the region may exist meanwhile; the
    /// region never hands one out.
    pub unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping covers `len` bytes from `ptr` for `self`'s
        // lifetime; concurrent modification is the caller's contract.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Copies `data` into the region starting at byte `offset`; used to load
    /// an image or a program into fresh guest memory.
    pub fn write_bytes(&self, offset: usize, data: &[u8]) -> Result<(), MemoryError> {
        if !self.writable {
            return Err(MemoryError::ReadOnly);
        }
        let end = offset.checked_add(data.len()).filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(MemoryError::FrameOutOfRange {
                frame: ((offset + data.len()) / PAGE_SIZE) as u64,
                pages: self.pages(),
            });
        }
        // SAFETY: `offset + data.len() <= len` (checked above) and the
        // mapping is writable; `data` is caller memory, copied bytewise.
        unsafe { std::ptr::copy(data.as_ptr(), self.ptr.add(offset), data.len()) };
        Ok(())
    }

    /// Copies bytes starting at `offset` into `out`.
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) -> Result<(), MemoryError> {
        let end = offset.checked_add(out.len()).filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(MemoryError::FrameOutOfRange {
                frame: ((offset + out.len()) / PAGE_SIZE) as u64,
                pages: self.pages(),
            });
        }
        // SAFETY: `offset + out.len() <= len` (checked above); `out` is a
        // `&mut` the caller owns, so it does not overlap the mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Which kind of mapping backs the region (for diagnostics).
    pub fn kind(&self) -> &'static str {
        match self.backing {
            Backing::Anonymous(_) => "anonymous",
            Backing::FileReadOnly(_) => "file (read-only)",
            Backing::FileShared(_) => "file (shared)",
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
