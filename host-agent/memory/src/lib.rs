//! Guest memory: where pagecast reads it from, how it tracks what changed,
//! and what it knows about its content.
//!
//! Everything pagecast reads guest memory from implements [`GuestMemory`]:
//! raw RAM image files ([`ImageFile`]), synthetic VMs with a known sharing
//! model ([`synth`]) and live KVM micro-VMs ([`kvm::MicroVm`]). Each is
//! backed by one page-aligned mapping ([`Region`]) that is only ever read
//! and written through volatile copies (a running vCPU may write it at any
//! moment), and each tracks which pages changed since the last call to
//! [`GuestMemory::take_dirty`].
//!
//! [`fingerprint`] hashes memory on a rayon pool (zero pages flagged, never
//! hashed); [`manifest`] is the frame -> hash table that travels with a
//! migration, with its bounded decoder.

mod dirty;
pub mod fingerprint;
mod image;
pub mod kvm;
mod lease;
pub mod manifest;
mod region;
pub mod synth;
mod userfault;

use std::path::PathBuf;

pub use dirty::{AtomicBitmap, DirtyBitmap};
pub use image::{ImageFile, MAX_IMAGE_BYTES};
pub use lease::Still;
pub use pagecast_pages::{PAGE_SIZE, Page};
pub use region::{Region, set_mergeable};
pub use userfault::Userfault;

/// Errors of guest memory sources. Messages are one line and name the file
/// or the frame involved.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The image could not be opened or inspected.
    #[error("{}: cannot open: {source}", path.display())]
    Open {
        /// The image path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The path is a directory.
    #[error("{}: is a directory, not a memory image", path.display())]
    IsDirectory {
        /// The path.
        path: PathBuf,
    },
    /// The path is neither a regular file nor a directory.
    #[error("{}: not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The image has no bytes.
    #[error("{}: empty file, not a memory image", path.display())]
    Empty {
        /// The path.
        path: PathBuf,
    },
    /// The image length is not a whole number of pages.
    #[error("{}: length {len} bytes is not a multiple of the {PAGE_SIZE}-byte page size", path.display())]
    NotPageMultiple {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
    /// The image is larger than pagecast accepts.
    #[error("{}: {len} bytes is more than the {max}-byte limit for a memory image", path.display())]
    TooLarge {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Mapping a file or anonymous memory failed.
    #[error("{what}: cannot map {bytes} bytes: {source}")]
    Map {
        /// What was being mapped (a path or "guest memory").
        what: String,
        /// Size of the mapping.
        bytes: u64,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A frame number beyond the end of memory.
    #[error("frame {frame} is outside guest memory of {pages} pages")]
    FrameOutOfRange {
        /// The frame asked for.
        frame: u64,
        /// Pages in the memory.
        pages: u64,
    },
    /// A write to memory opened read-only.
    #[error("guest memory is read-only")]
    ReadOnly,
    /// A dirty bitmap of the wrong shape.
    #[error("dirty bitmap of {got} words does not fit {pages} pages ({expected} words)")]
    BitmapShape {
        /// Words received.
        got: usize,
        /// Words expected.
        expected: usize,
        /// Pages covered.
        pages: u64,
    },
    /// A dirty bitmap with bits set beyond the last page.
    #[error("dirty bitmap marks frame {frame}, beyond the last of {pages} pages")]
    BitmapOverrun {
        /// First frame out of range.
        frame: u64,
        /// Pages covered.
        pages: u64,
    },
    /// Reading the KVM dirty log failed.
    #[error("cannot read the KVM dirty log of slot {slot}: {source}")]
    DirtyLog {
        /// The memory slot.
        slot: u32,
        /// What KVM said.
        #[source]
        source: std::io::Error,
    },
}

/// A source of guest memory: fixed length, page-granular reads and writes,
/// and a record of pages dirtied since the last call to
/// [`take_dirty`](GuestMemory::take_dirty).
pub trait GuestMemory: Send + Sync {
    /// Number of 4 KiB pages.
    fn page_count(&self) -> u64 {
        self.region().pages()
    }

    /// Copies page `frame` into `out`.
    fn read_page(&self, frame: u64, out: &mut Page) -> Result<(), MemoryError> {
        self.region().read_page(frame, out)
    }

    /// Overwrites page `frame` and records it as dirty.
    fn write_page(&self, frame: u64, data: &Page) -> Result<(), MemoryError>;

    /// Pages dirtied since the previous call (by the guest or by
    /// [`write_page`](GuestMemory::write_page)); the record starts afresh.
    /// A caller that fails to act on a returned page must hand it back with
    /// [`mark_dirty`](GuestMemory::mark_dirty), or the change is lost.
    fn take_dirty(&self) -> Result<DirtyBitmap, MemoryError>;

    /// Marks pages dirty again, typically because sending them failed.
    fn mark_dirty(&self, pages: &DirtyBitmap) -> Result<(), MemoryError>;

    /// The mapping that holds the memory, for hashing it in place.
    fn region(&self) -> &Region;

    /// Pages `first..first + pages` to read in place, where nobody can
    /// write them while the returned guard lives (an image file under a
    /// read lease); None where they must be copied out first.
    fn hold_still(&self, _first: u64, _pages: usize) -> Option<Still<'_>> {
        None
    }
}
