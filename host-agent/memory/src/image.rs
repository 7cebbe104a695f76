//! Raw RAM image files.
//!
//! The format is the one QEMU writes for `-object
//! memory-backend-file,mem-path=FILE,size=N,share=on`: guest physical memory,
//! byte for byte, with no header. Any length that is a non-zero multiple of
//! 4 KiB is accepted. The file is memory-mapped, so scanning a large image
//! costs page cache, not heap; the file must not be truncated while mapped.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::{AtomicBitmap, DirtyBitmap, GuestMemory, MemoryError, PAGE_SIZE, Page, Region};

/// Largest image accepted: 4 TiB.
pub const MAX_IMAGE_BYTES: u64 = 4 << 40;

/// A memory-mapped raw RAM image.
pub struct ImageFile {
    path: PathBuf,
    region: Region,
    dirty: AtomicBitmap,
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
        })
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
}
