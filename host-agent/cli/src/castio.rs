//! Images as cast page sources and sinks: what `pagecast cast` sends and
//! writes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use pagecast_multicast::{PageEntry, PageSink, PageSource};
use pagecast_pages::{PAGE_SIZE, Page};

use pagecast_memory::fingerprint::{Fingerprinter, fingerprint_images};
use pagecast_memory::{GuestMemory, ImageFile, MemoryError};

/// The non-zero pages of a raw image.
pub struct ImageSource {
    image: ImageFile,
    entries: Vec<PageEntry>,
}

impl ImageSource {
    /// Opens and fingerprints an image; zero pages are left out (the
    /// receiver writes zeros there).
    pub fn open(
        path: &Path,
        fp: &Fingerprinter,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Self, MemoryError> {
        let img = fingerprint_images(
            &[path],
            &[pagecast_pages::ContentKey::CLUSTER],
            fp,
            &mut |_, _| {},
            progress,
        )?
        .pop()
        .expect("one image");
        let image = img.image;
        let entries = img
            .fingerprints
            .hashes
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_zero_page())
            .map(|(frame, h)| PageEntry {
                key: frame as u64,
                hash: *h,
            })
            .collect();
        Ok(ImageSource { image, entries })
    }

    /// Pages of the image, zero ones included.
    pub fn frames(&self) -> u64 {
        self.image.page_count()
    }
}

impl PageSource for ImageSource {
    fn pages(&self) -> u32 {
        self.entries.len() as u32
    }

    fn entry(&self, i: u32) -> PageEntry {
        self.entries[i as usize]
    }

    fn read(&self, i: u32, out: &mut Page) -> io::Result<()> {
        self.image
            .read_page(self.entries[i as usize].key, out)
            .map_err(io::Error::other)
    }

    fn frames(&self) -> u64 {
        self.image.page_count()
    }
}

/// Writes received pages into an image file, through a temporary file in
/// the same directory that replaces the target only once every page has
/// arrived; a failed session leaves the target untouched.
pub struct ImageSink {
    target: PathBuf,
    tmp: Option<tempfile::NamedTempFile>,
}

impl ImageSink {
    /// A sink that will write `target`.
    pub fn new(target: &Path) -> Self {
        ImageSink {
            target: target.to_owned(),
            tmp: None,
        }
    }

    fn file(&self) -> io::Result<&File> {
        self.tmp
            .as_ref()
            .map(|t| t.as_file())
            .ok_or_else(|| io::Error::other("pages before the session began"))
    }
}

impl PageSink for ImageSink {
    fn begin(&mut self, frames: u64) -> io::Result<()> {
        let dir = self
            .target
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        // A sparse file: zero pages cost nothing.
        tmp.as_file().set_len(frames * PAGE_SIZE as u64)?;
        self.tmp = Some(tmp);
        Ok(())
    }

    fn put(&mut self, e: &PageEntry, data: &Page) -> io::Result<()> {
        self.file()?.write_all_at(data, e.key * PAGE_SIZE as u64)
    }

    fn get(&mut self, key: u64, out: &mut Page) -> io::Result<()> {
        self.file()?.read_exact_at(out, key * PAGE_SIZE as u64)
    }

    fn finish(&mut self) -> io::Result<()> {
        let tmp = self
            .tmp
            .take()
            .ok_or_else(|| io::Error::other("finish before begin"))?;
        tmp.as_file().sync_all()?;
        tmp.persist(&self.target).map_err(|e| e.error)?;
        Ok(())
    }

    fn abort(&mut self) {
        // Dropping the temporary file deletes it.
        self.tmp = None;
    }
}
