//! Raw RAM image files.
//!
//! The format is the one QEMU writes for `-object
//! memory-backend-file,mem-path=FILE,size=N,share=on`: guest physical memory,
//! byte for byte, with no header. Any length that is a non-zero multiple of
//! 4 KiB is accepted. The file is memory-mapped, so scanning a large image
//! costs page cache, not heap; the file must not be truncated while mapped.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::lease::{Lease, Still};
use crate::{AtomicBitmap, DirtyBitmap, GuestMemory, MemoryError, PAGE_SIZE, Page, Region};

/// Largest image accepted: 4 TiB.
pub const MAX_IMAGE_BYTES: u64 = 4 << 40;

/// A memory-mapped raw RAM image.
pub struct ImageFile {
    path: PathBuf,
    region: Region,
    dirty: AtomicBitmap,
    /// The open file (read-only images only: a lease needs it).
    file: Option<File>,
    /// A read lease while the image is hashed ([`ImageFile::take_lease`]).
    lease: OnceLock<Lease>,
}

impl ImageFile {
    /// Opens an image read-only; [`GuestMemory::write_page`] fails with
    /// [`MemoryError::ReadOnly`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, MemoryError> {
        Self::open_with(path.as_ref(), false)
    }

    /// Opens an image for reading and writing; writes go to the file.
    pub fn open_writable(path: impl AsRef<Path>) -> Result<Self, MemoryError> {
        Self::open_with(path.as_ref(), true)
    }

    fn open_with(path: &Path, writable: bool) -> Result<Self, MemoryError> {
        let len = check_image(path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| MemoryError::Open {
                path: path.to_owned(),
                source,
            })?;
        let region = Region::file(&file, path, len, writable)?;
        Ok(ImageFile {
            path: path.to_owned(),
            dirty: AtomicBitmap::new(region.pages()),
            region,
            file: (!writable).then_some(file),
            lease: OnceLock::new(),
        })
    }

    /// Takes a read lease on a read-only image, so that hashing reads its
    /// mapping in place ([`GuestMemory::hold_still`]) instead of copying
    /// it out: true if the kernel granted one (nobody has the file open
    /// for writing, and this process may lease it; the `lease` module's
    /// docs say when it cannot). A writer opening the file meanwhile
    /// waits until the pages being read in place are done.
    pub fn take_lease(&self) -> bool {
        if self.lease.get().is_some() {
            return true;
        }
        match self.file.as_ref().and_then(Lease::take) {
            Some(l) => self.lease.set(l).is_ok(),
            None => false,
        }
    }

    /// Releases the lease, if any: reads copy again, writers go on.
    pub fn release_lease(&self) {
        if let Some(l) = self.lease.get() {
            l.release();
        }
    }

    /// Pages read in place under a lease so far.
    pub fn pages_in_place(&self) -> u64 {
        self.lease.get().map_or(0, Lease::pages_in_place)
    }

    /// Whether a writer has asked for the file since the lease was taken.
    pub fn lease_broken(&self) -> bool {
        self.lease.get().is_some_and(Lease::broken)
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Length in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.region.len() as u64
    }
}

/// Checks that `path` names a usable image and returns its length: a regular
/// file, non-empty, a whole number of pages, within [`MAX_IMAGE_BYTES`].
pub fn check_image(path: &Path) -> Result<u64, MemoryError> {
    let meta = std::fs::metadata(path).map_err(|source| MemoryError::Open {
        path: path.to_owned(),
        source,
    })?;
    if meta.is_dir() {
        return Err(MemoryError::IsDirectory {
            path: path.to_owned(),
        });
    }
    if !meta.is_file() {
        return Err(MemoryError::NotAFile {
            path: path.to_owned(),
        });
    }
    let len = meta.len();
    if len == 0 {
        return Err(MemoryError::Empty {
            path: path.to_owned(),
        });
    }
    if !len.is_multiple_of(PAGE_SIZE as u64) {
        return Err(MemoryError::NotPageMultiple {
            path: path.to_owned(),
            len,
        });
    }
    if len > MAX_IMAGE_BYTES {
        return Err(MemoryError::TooLarge {
            path: path.to_owned(),
            len,
            max: MAX_IMAGE_BYTES,
        });
    }
    // Opening proves readability before any mapping is attempted.
    File::open(path).map_err(|source| MemoryError::Open {
        path: path.to_owned(),
        source,
    })?;
    Ok(len)
}

impl GuestMemory for ImageFile {
    fn write_page(&self, frame: u64, data: &Page) -> Result<(), MemoryError> {
        self.region.write_page(frame, data)?;
        self.dirty.mark(frame)
    }

    fn take_dirty(&self) -> Result<DirtyBitmap, MemoryError> {
        Ok(self.dirty.take())
    }

    fn mark_dirty(&self, pages: &DirtyBitmap) -> Result<(), MemoryError> {
        self.dirty.mark_all(pages)
    }

    fn region(&self) -> &Region {
        &self.region
    }

    fn hold_still(&self, first: u64, pages: usize) -> Option<Still<'_>> {
        let lease = self.lease.get()?;
        let end = first.checked_add(pages as u64)?;
        if end > self.region.pages() || !lease.enter(pages as u64) {
            return None;
        }
        // SAFETY: the range lies inside the mapping (checked above), which
        // lives as long as `self`; it is mapped read-only and shared from
        // a file this process opened read-only, on which it holds a read
        // lease that `enter` found neither broken nor released and that
        // stays held while the returned guard lives (the last guard out of
        // a broken lease releases it). While the lease holds, the kernel
        // makes any process opening the file for writing, or truncating
        // it, wait, so no writer can exist: the bytes do not change under
        // the shared reference. The kernel's wait is bounded
        // (`lease-break-time`, 45 s by default); a guard lives for one
        // unit of hashing, well under a millisecond, unless this process
        // is stopped meanwhile for longer than that.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                self.region.as_ptr().add(first as usize * PAGE_SIZE),
                pages * PAGE_SIZE,
            )
        };
        Some(Still::new(bytes, lease))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_images_with_a_named_reason() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<(PathBuf, &str)> = {
            let empty = dir.path().join("empty.raw");
            std::fs::write(&empty, b"").unwrap();
            let odd = dir.path().join("odd.raw");
            std::fs::write(&odd, vec![1u8; PAGE_SIZE + 1]).unwrap();
            let sub = dir.path().join("a-directory");
            std::fs::create_dir(&sub).unwrap();
            vec![
                (empty, "empty file"),
                (odd, "not a multiple of the 4096-byte page size"),
                (sub, "is a directory"),
                (dir.path().join("missing.raw"), "cannot open"),
                (PathBuf::from("/dev/null"), "not a regular file"),
            ]
        };
        for (path, want) in cases {
            let msg = match ImageFile::open(&path) {
                Ok(_) => panic!("{} opened", path.display()),
                Err(e) => e.to_string(),
            };
            assert!(msg.contains(want), "{msg:?} should say {want:?}");
            assert!(
                msg.starts_with(&path.display().to_string()),
                "{msg:?} names the file"
            );
            assert!(!msg.contains('\n'), "one line: {msg:?}");
        }
    }

    #[test]
    fn reads_writes_and_tracks_dirty_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.raw");
        let mut bytes = vec![0u8; 4 * PAGE_SIZE];
        bytes[PAGE_SIZE + 7] = 0xab;
        std::fs::write(&path, &bytes).unwrap();

        let ro = ImageFile::open(&path).unwrap();
        assert_eq!(ro.page_count(), 4);
        let mut page = [0u8; PAGE_SIZE];
        ro.read_page(1, &mut page).unwrap();
        assert_eq!(page[7], 0xab);
        assert!(matches!(
            ro.write_page(0, &page),
            Err(MemoryError::ReadOnly)
        ));
        assert!(matches!(
            ro.read_page(4, &mut page),
            Err(MemoryError::FrameOutOfRange { frame: 4, pages: 4 })
        ));
        drop(ro);

        let rw = ImageFile::open_writable(&path).unwrap();
        rw.write_page(3, &page).unwrap();
        rw.write_page(2, &page).unwrap();
        let d = rw.take_dirty().unwrap();
        assert_eq!(d.iter().collect::<Vec<_>>(), vec![2, 3]);
        assert!(rw.take_dirty().unwrap().is_empty());
        drop(rw);
        let after = std::fs::read(&path).unwrap();
        assert_eq!(
            after[3 * PAGE_SIZE + 7],
            0xab,
            "shared mapping writes the file"
        );
    }

    /// `pages` pages of varied content (every seventh zero) written to
    /// `path`, and their hashes computed from memory this process owns.
    fn varied_image(path: &Path, pages: usize) -> (Vec<pagecast_pages::PageHash>, ContentKeyed) {
        let mut bytes = vec![0u8; pages * PAGE_SIZE];
        let mut rng = pagecast_pages::SplitMix64::new(7);
        for (i, p) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
            if i % 7 != 0 {
                for w in p.chunks_exact_mut(8) {
                    w.copy_from_slice(&rng.next_u64().to_le_bytes());
                }
            }
        }
        std::fs::write(path, &bytes).unwrap();
        let fp = crate::fingerprint::Fingerprinter::new(2).unwrap();
        let key = pagecast_pages::ContentKey::CLUSTER;
        let mut want = vec![pagecast_pages::PageHash::ZERO_PAGE; pages];
        fp.fingerprint_bytes(&bytes, &key, &mut want, &|_| {});
        (want, (fp, key))
    }

    type ContentKeyed = (
        crate::fingerprint::Fingerprinter,
        pagecast_pages::ContentKey,
    );

    /// An image nobody writes is leased and hashed in place, to the hashes
    /// of the same bytes copied. (Each test is a process of its own under
    /// nextest, so no other test's lease break reaches this one.)
    #[test]
    fn a_leased_image_is_hashed_in_place_to_the_same_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("still.raw");
        let (want, (fp, key)) = varied_image(&path, 600);
        let got =
            crate::fingerprint::fingerprint_images(&[&path], &[key], &fp, &mut |_, _| {}, &|_| {})
                .unwrap();
        assert_eq!(got[0].fingerprints.hashes, want);
        assert_eq!(got[0].pages_in_place, 600, "every page read in place");
    }

    /// An image open for writing elsewhere (here by this very process)
    /// gets no lease and is copied out, to the same hashes.
    #[test]
    fn an_image_open_for_writing_is_copied_not_leased() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("written.raw");
        let (want, (fp, key)) = varied_image(&path, 100);
        let writer = OpenOptions::new().write(true).open(&path).unwrap();
        let got =
            crate::fingerprint::fingerprint_images(&[&path], &[key], &fp, &mut |_, _| {}, &|_| {})
                .unwrap();
        assert_eq!(got[0].fingerprints.hashes, want);
        assert_eq!(got[0].pages_in_place, 0, "no page read in place");
        drop(writer);
    }

    /// A process opening a leased image for writing waits while pages are
    /// read in place, and goes on as soon as they are done (not after the
    /// kernel's 45 s): from then on the image is copied.
    #[test]
    fn a_writer_waits_only_until_the_pages_read_in_place_are_done() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leased.raw");
        let (want, (fp, key)) = varied_image(&path, 64);
        let img = ImageFile::open(&path).unwrap();
        assert!(img.take_lease(), "a lease on a file this test owns");
        let still = img.hold_still(0, 32).expect("held still under the lease");
        let mut writer = std::process::Command::new("sh")
            .args(["-c", "printf x >> \"$0\"", path.to_str().unwrap()])
            .spawn()
            .unwrap();
        let t = std::time::Instant::now();
        while !img.lease_broken() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "no break signalled"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            writer.try_wait().unwrap().is_none(),
            "the writer waits while pages are read in place"
        );
        assert!(
            img.hold_still(32, 32).is_none(),
            "nothing more in place once broken"
        );
        drop(still);
        let released = std::time::Instant::now();
        let status = loop {
            if let Some(s) = writer.try_wait().unwrap() {
                break s;
            }
            assert!(
                released.elapsed() < std::time::Duration::from_secs(10),
                "the writer still waits after the pages in place were done"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(status.success());
        // Copied now, to the right hashes, and nothing more in place.
        let got = fp.fingerprint(&img, &key, &|_| {});
        assert_eq!(got.hashes, want);
        assert_eq!(img.pages_in_place(), 32);
    }
}
