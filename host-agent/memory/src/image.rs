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
    /// A read lease while the image is hashed ([`ImageFile::take_lease`]):
    /// asked for once (None: refused).
    lease: OnceLock<Option<Lease>>,
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
    /// it out: true if the kernel granted one and it is still open
    /// (nobody had the file open for writing, and this process may lease
    /// it; the `lease` module's docs say when it cannot). A writer opening
    /// the file meanwhile waits until the blocks being read in place are
    /// done.
    pub fn take_lease(&self) -> bool {
        // Asked for once, whoever asks first: a second lease on the same
        // open file would be the same kernel lease, and dropping it would
        // give up the first.
        self.lease
            .get_or_init(|| self.file.as_ref().and_then(Lease::take))
            .as_ref()
            .is_some_and(Lease::open)
    }

    fn leased(&self) -> Option<&Lease> {
        self.lease.get().and_then(Option::as_ref)
    }

    /// Gives the lease up, if any, once the blocks being read in place are
    /// done: reads copy again, and a waiting writer goes on.
    pub fn release_lease(&self) {
        if let Some(l) = self.leased() {
            l.release();
        }
    }

    /// Whether the kernel still grants this image's lease (false once a
    /// writer asked for the file or the lease was given up).
    pub fn lease_granted(&self) -> bool {
        self.leased().is_some_and(Lease::granted)
    }

    /// Pages read in place under a lease so far.
    pub fn pages_in_place(&self) -> u64 {
        self.leased().map_or(0, Lease::pages_in_place)
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
        let lease = self.leased()?;
        let end = first.checked_add(pages as u64)?;
        if end > self.region.pages() || !lease.enter() {
            return None;
        }
        // SAFETY: the range lies inside the mapping (checked above), which
        // lives as long as `self`, mapped read-only and shared from a file
        // this process opened read-only. `enter` found the kernel's read
        // lease on it held and unbroken, and the lease is not given up
        // while the returned guard lives (the last guard out of a broken
        // or released lease gives it up). While the kernel holds the
        // lease, a process opening the file for writing or truncating it
        // waits, so the bytes do not change under this reference. This
        // rests on one assumption (the `lease` module's docs): the guard
        // ends within `lease-break-time` (at least 5 s, checked when the
        // lease is taken) of a break, after which the kernel lets a writer
        // in regardless. Guards are crate-private in use: the fingerprinter
        // holds one for a block's hashing and keeps the hashes only if the
        // lease held throughout (`Still::kept`).
        let bytes = unsafe {
            std::slice::from_raw_parts(
                self.region.as_ptr().add(first as usize * PAGE_SIZE),
                pages * PAGE_SIZE,
            )
        };
        Some(Still::new(bytes, lease, pages as u64))
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

    /// An image of varied content (every seventh page zero) in a
    /// directory of its own, and its hashes computed from memory this
    /// process owns.
    struct Varied {
        _dir: tempfile::TempDir,
        path: PathBuf,
        want: Vec<pagecast_pages::PageHash>,
        fp: crate::fingerprint::Fingerprinter,
        key: pagecast_pages::ContentKey,
    }

    fn varied(pages: usize) -> Varied {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.raw");
        let mut bytes = vec![0u8; pages * PAGE_SIZE];
        let mut rng = pagecast_pages::SplitMix64::new(7);
        for (i, p) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
            if i % 7 != 0 {
                for w in p.chunks_exact_mut(8) {
                    w.copy_from_slice(&rng.next_u64().to_le_bytes());
                }
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        let fp = crate::fingerprint::Fingerprinter::new(2).unwrap();
        let key = pagecast_pages::ContentKey::CLUSTER;
        let mut want = vec![pagecast_pages::PageHash::ZERO_PAGE; pages];
        fp.fingerprint_bytes(&bytes, &key, &mut want, &|_| {});
        Varied {
            _dir: dir,
            path,
            want,
            fp,
            key,
        }
    }

    /// A varied image of `pages` pages, opened and leased; None where
    /// `test` may skip for want of leases.
    fn leased(test: &str, pages: usize) -> Option<(Varied, ImageFile)> {
        if !leases(test) {
            return None;
        }
        let v = varied(pages);
        let img = ImageFile::open(&v.path).unwrap();
        assert!(img.take_lease(), "a lease on a file this test owns");
        Some((v, img))
    }

    /// Fingerprints `v`'s image the way scan does.
    fn fingerprinted(v: &Varied) -> crate::fingerprint::FingerprintedImage {
        crate::fingerprint::fingerprint_images(&[&v.path], &[v.key], &v.fp, &mut |_, _| {}, &|_| {})
            .unwrap()
            .remove(0)
    }

    /// Whether this machine can run the lease tests (a skip only where
    /// `PAGECAST_REQUIRE` allows it).
    fn leases(test: &str) -> bool {
        pagecast_testkit::needs(test, &[pagecast_testkit::Need::Leases])
    }

    /// An open for writing that does not wait: refused (`WouldBlock`)
    /// while a read lease holds, and starting its break.
    fn write_now(path: &Path) -> std::io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
    }

    fn refused(r: std::io::Result<File>) -> bool {
        matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// An image nobody writes is leased and hashed in place, to the hashes
    /// of the same bytes copied.
    #[test]
    fn a_leased_image_is_hashed_in_place_to_the_same_hashes() {
        if !leases("a_leased_image_is_hashed_in_place_to_the_same_hashes") {
            return;
        }
        let v = varied(600);
        let got = fingerprinted(&v);
        assert_eq!(got.fingerprints.hashes, v.want);
        assert_eq!(got.pages_in_place, 600, "every page read in place");
        assert!(!got.image.lease_granted(), "the lease was given up after");
    }

    /// An image open for writing elsewhere (here by this very process)
    /// gets no lease and is copied out, to the same hashes.
    #[test]
    fn an_image_open_for_writing_is_copied_not_leased() {
        let v = varied(100);
        let writer = OpenOptions::new().write(true).open(&v.path).unwrap();
        let got = fingerprinted(&v);
        assert_eq!(got.fingerprints.hashes, v.want);
        assert_eq!(got.pages_in_place, 0, "no page read in place");
        drop(writer);
    }

    /// A writer is held off while a block is read in place and let on as
    /// soon as it is done (not after the kernel's 45 s); that block's
    /// hashes are not kept, and from then on the image is copied, to the
    /// right hashes. A process that opens for writing and waits (`sh`,
    /// appending) goes on once the block is done.
    #[test]
    fn a_writer_waits_only_until_the_block_read_in_place_is_done() {
        let Some((v, img)) = leased(
            "a_writer_waits_only_until_the_block_read_in_place_is_done",
            64,
        ) else {
            return;
        };
        let path = &v.path;
        let still = img.hold_still(0, 32).expect("held still under the lease");
        assert!(refused(write_now(path)), "a writer is refused while leased");
        assert!(!img.lease_granted(), "the refused open broke the lease");
        assert!(
            img.hold_still(32, 32).is_none(),
            "nothing more in place once broken"
        );
        assert!(refused(write_now(path)), "held off while the block is read");
        let mut waiting = std::process::Command::new("sh")
            .args(["-c", "printf x >> \"$0\"", path.to_str().unwrap()])
            .spawn()
            .unwrap();
        assert!(
            !still.kept(),
            "a block read while the lease broke is not kept"
        );
        assert!(write_now(path).is_ok(), "let on once the block is done");
        let t = std::time::Instant::now();
        let status = loop {
            if let Some(s) = waiting.try_wait().unwrap() {
                break s;
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "sh still waits"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(status.success());
        let got = v.fp.fingerprint(&img, &v.key, &|_| {});
        assert_eq!(got.hashes, v.want);
        assert_eq!(img.pages_in_place(), 0, "nothing kept from in place");
    }

    /// Giving the lease up while a block is read in place keeps the
    /// kernel's lease until that block is done.
    #[test]
    fn a_lease_given_up_mid_block_holds_writers_off_until_the_block_is_done() {
        let Some((v, img)) = leased(
            "a_lease_given_up_mid_block_holds_writers_off_until_the_block_is_done",
            8,
        ) else {
            return;
        };
        let path = &v.path;
        let still = img.hold_still(0, 8).expect("held still under the lease");
        img.release_lease();
        assert!(!img.take_lease(), "a lease given up is not open again");
        assert!(img.hold_still(0, 8).is_none());
        assert!(refused(write_now(path)), "held off while the block is read");
        drop(still);
        assert!(write_now(path).is_ok(), "let on once the block is done");
    }

    /// With two blocks in flight when the lease breaks, the writer is let
    /// on only once the last of them is done.
    #[test]
    fn the_last_block_out_of_a_broken_lease_lets_the_writer_on() {
        let Some((v, img)) = leased(
            "the_last_block_out_of_a_broken_lease_lets_the_writer_on",
            16,
        ) else {
            return;
        };
        let path = &v.path;
        let first = img.hold_still(0, 8).expect("first block");
        let second = img.hold_still(8, 8).expect("second block");
        assert!(refused(write_now(path)), "refused while leased");
        assert!(!first.kept());
        assert!(
            refused(write_now(path)),
            "held off while the second is read"
        );
        assert!(!second.kept());
        assert!(write_now(path).is_ok(), "let on once both are done");
    }
}
