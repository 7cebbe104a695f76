//! The destination side of a migration.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pagecast_pages::{PAGE_SIZE, Page, PageHash, hash_pages, is_zero_page};
use pagecast_proto::v1::RefusalCode;
use pagecast_proto::{
    MAX_MIGRATE_PAGES_PER_FRAME, MAX_NEED_HASHES_PER_FRAME, MAX_VM_NAME_BYTES, WIRE_VERSION, v1,
};
use serde::Serialize;

use crate::{LocalContent, MigrationError, MigrationLink, table_digest};
use pagecast_memory::Region;
use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_memory::kvm::{MAX_MEMORY_BYTES, MIN_MEMORY_BYTES, VcpuState};
use pagecast_memory::manifest::ManifestDecoder;

type Body = v1::migrate_frame::Body;

/// What a migration did, from the destination's side.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct IncomingReport {
    /// The VM's name.
    pub vm: String,
    /// Frames filled from pages this host already held.
    pub pages_local: u64,
    /// Frames filled from pages received.
    pub pages_received: u64,
    /// The guest's progress counter once resumed.
    pub progress: u64,
    /// From the source's switchover message to resuming, as seen here.
    pub switchover_ms: f64,
}

struct In<'a> {
    link: &'a mut dyn MigrationLink,
    timeout: Duration,
    /// The new VM's memory, until it is handed to `start`.
    region: Option<Region>,
    /// Hash of what each frame holds (None until filled).
    table: Vec<Option<PageHash>>,
    report: IncomingReport,
}

/// Receives a migration announced by `begin` over `link`: reserves memory,
/// fills what `local` holds, takes the rest, and at switchover checks that
/// every frame's hash matches the source's before answering Ready. On
/// Commit it hands memory and vCPU state to `start`, which resumes the VM
/// and returns its progress counter. On any failure nothing is kept.
pub fn migrate_in(
    link: &mut dyn MigrationLink,
    begin: &v1::MigrateBegin,
    local: &dyn LocalContent,
    fp: &Fingerprinter,
    start: &mut dyn FnMut(Region, VcpuState) -> Result<u64, String>,
) -> Result<IncomingReport, MigrationError> {
    let refuse = |link: &mut dyn MigrationLink, code: RefusalCode, why: String| {
        let _ = link.send(Body::Accept(v1::MigrateAccept {
            ok: false,
            reason: why.clone(),
            code: code as i32,
        }));
        Err(MigrationError::Refused { code, reason: why })
    };
    if begin.version != WIRE_VERSION as i32 {
        return refuse(
            link,
            RefusalCode::Invalid,
            format!("wire version {} is not supported", begin.version),
        );
    }
    let bytes = begin.memory_bytes;
    if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&bytes)
        || !bytes.is_multiple_of(PAGE_SIZE as u64)
    {
        return refuse(
            link,
            RefusalCode::Invalid,
            format!("memory of {bytes} bytes is out of range"),
        );
    }
    if begin.vm.is_empty() || begin.vm.len() > MAX_VM_NAME_BYTES {
        return refuse(link, RefusalCode::Invalid, "bad VM name".into());
    }
    let region = match Region::anonymous(bytes) {
        Ok(r) => r,
        Err(e) => return refuse(link, RefusalCode::Internal, e.to_string()),
    };
    link.send(Body::Accept(v1::MigrateAccept {
        ok: true,
        ..Default::default()
    }))?;
    let pages = region.pages();
    let mut st = In {
        link,
        timeout: Duration::from_secs(30),
        table: vec![None; pages as usize],
        region: Some(region),
        report: IncomingReport {
            vm: begin.vm.clone(),
            ..IncomingReport::default()
        },
    };
    let r = st.run(begin, local, fp, start);
    if let Err(e) = &r {
        let _ = st.link.send(Body::Abort(e.to_abort()));
    }
    r
}

impl In<'_> {
    fn mem(&self) -> &Region {
        self.region
            .as_ref()
            .expect("memory is held until the VM starts")
    }

    fn next(&mut self) -> Result<Body, MigrationError> {
        match self.link.recv(Some(self.timeout))? {
            Body::Abort(a) => Err(MigrationError::from_abort(a)),
            b => Ok(b),
        }
    }

    fn run(
        &mut self,
        begin: &v1::MigrateBegin,
        local: &dyn LocalContent,
        fp: &Fingerprinter,
        start: &mut dyn FnMut(Region, VcpuState) -> Result<u64, String>,
    ) -> Result<IncomingReport, MigrationError> {
        let pages = self.mem().pages();
        // The manifest.
        let header = match self.next()? {
            Body::ManifestHeader(h) => h,
            other => {
                return Err(MigrationError::Protocol(format!(
                    "expected a manifest, got {other:?}"
                )));
            }
        };
        if header.frames != pages || header.vm != begin.vm {
            return Err(MigrationError::Protocol(format!(
                "manifest of {} frames for {:?}; expected {pages} frames of {:?}",
                header.frames, header.vm, begin.vm
            )));
        }
        let mut dec = ManifestDecoder::new(&header)?;
        while dec.received() < pages {
            match self.next()? {
                Body::ManifestChunk(c) => dec.push(&c)?,
                other => {
                    return Err(MigrationError::Protocol(format!(
                        "expected a manifest chunk, got {other:?}"
                    )));
                }
            }
        }
        let manifest = dec.finish()?;

        // Fill what this host holds; a content already copied into the new
        // VM is copied within it.
        let mut frames_of: HashMap<PageHash, Vec<u64>> = HashMap::new();
        let mut here: HashMap<PageHash, u64> = HashMap::new();
        let mut page = [0u8; PAGE_SIZE];
        for (f, h) in manifest.hashes.iter().enumerate() {
            let f = f as u64;
            if h.is_zero_page() {
                // Fresh memory is zero.
                self.table[f as usize] = Some(PageHash::ZERO_PAGE);
                continue;
            }
            let filled = match here.get(h) {
                Some(&g) => {
                    self.mem().read_page(g, &mut page)?;
                    true
                }
                None => local.copy(h, &mut page),
            };
            if filled {
                self.mem().write_page(f, &page)?;
                self.table[f as usize] = Some(*h);
                here.entry(*h).or_insert(f);
                self.report.pages_local += 1;
            } else {
                frames_of.entry(*h).or_default().push(f);
            }
        }
        let mut needed: Vec<PageHash> = frames_of.keys().copied().collect();
        needed.sort_unstable();
        let mut chunks = needed.chunks(MAX_NEED_HASHES_PER_FRAME).peekable();
        loop {
            let chunk = chunks.next().unwrap_or(&[]);
            let last = chunks.peek().is_none();
            let mut hashes = Vec::with_capacity(chunk.len() * 32);
            for h in chunk {
                hashes.extend_from_slice(h.as_bytes());
            }
            self.link.send(Body::Need(v1::NeedHashes {
                hashes: hashes.into(),
                last,
                filled_locally: if last { self.report.pages_local } else { 0 },
            }))?;
            if last {
                break;
            }
        }

        // Pages until switchover, then the rest, the vCPU and the digest.
        let mut switched: Option<Instant> = None;
        let mut vcpu: Option<VcpuState> = None;
        loop {
            match self.next()? {
                Body::ByHash(b) => self.by_hash(&b, &frames_of)?,
                Body::Pages(p) => self.pages(&p)?,
                Body::Switchover(_) => switched = Some(Instant::now()),
                Body::Vcpu(v) => vcpu = Some(VcpuState::from_bytes(&v.regs, &v.sregs)?),
                Body::Digest(d) => {
                    let verdict = self.verify(&d, begin.verify_full, fp);
                    let ok = verdict.is_ok();
                    self.link.send(Body::Ready(v1::Ready {
                        ok,
                        reason: verdict
                            .as_ref()
                            .err()
                            .map(|e| e.to_string())
                            .unwrap_or_default(),
                        code: verdict.as_ref().err().map_or(0, |e| e.code() as i32),
                    }))?;
                    verdict?;
                    let Some(state) = vcpu.take() else {
                        return Err(MigrationError::Protocol("digest before vCPU state".into()));
                    };
                    match self.next()? {
                        Body::Commit(_) => {}
                        other => {
                            return Err(MigrationError::Protocol(format!(
                                "expected commit, got {other:?}"
                            )));
                        }
                    }
                    let region = self
                        .region
                        .take()
                        .expect("memory is held until the VM starts");
                    let progress = start(region, state).map_err(MigrationError::Start)?;
                    self.report.progress = progress;
                    self.report.switchover_ms =
                        switched.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
                    self.link.send(Body::Resumed(v1::Resumed { progress }))?;
                    return Ok(self.report.clone());
                }
                other => {
                    return Err(MigrationError::Protocol(format!(
                        "unexpected {other:?} during migration"
                    )));
                }
            }
        }
    }

    /// Checks a batch of page contents against their hashes (with the SIMD
    /// kernel), returning the pages.
    fn checked<'b>(
        hashes: &[u8],
        data: &'b [u8],
        n: usize,
    ) -> Result<Vec<(&'b Page, PageHash)>, MigrationError> {
        if n > MAX_MIGRATE_PAGES_PER_FRAME || hashes.len() != n * 32 || data.len() != n * PAGE_SIZE
        {
            return Err(MigrationError::Protocol(format!(
                "page batch of {n} pages with {} hash bytes and {} data bytes",
                hashes.len(),
                data.len()
            )));
        }
        let pages: Vec<&Page> = data
            .chunks_exact(PAGE_SIZE)
            .map(|p| p.try_into().expect("page"))
            .collect();
        let mut got = vec![PageHash::ZERO_PAGE; n];
        hash_pages(&pages, &mut got);
        let mut out = Vec::with_capacity(n);
        for (i, p) in pages.into_iter().enumerate() {
            let want = PageHash::try_from(&hashes[i * 32..(i + 1) * 32]).expect("32 bytes");
            let ok = if want.is_zero_page() {
                is_zero_page(p)
            } else {
                got[i] == want
            };
            if !ok {
                return Err(MigrationError::Verification(format!(
                    "a received page does not match its hash {want}"
                )));
            }
            out.push((p, want));
        }
        Ok(out)
    }

    fn by_hash(
        &mut self,
        b: &v1::PagesByHash,
        frames_of: &HashMap<PageHash, Vec<u64>>,
    ) -> Result<(), MigrationError> {
        let n = b.hashes.len() / 32;
        for (page, h) in Self::checked(&b.hashes, &b.data, n)? {
            let Some(frames) = frames_of.get(&h) else {
                return Err(MigrationError::Protocol(format!(
                    "received {h}, which no frame needs"
                )));
            };
            for &f in frames {
                self.mem().write_page(f, page)?;
                self.table[f as usize] = Some(h);
                self.report.pages_received += 1;
            }
        }
        Ok(())
    }

    fn pages(&mut self, p: &v1::Pages) -> Result<(), MigrationError> {
        let n = p.frames.len();
        let pages = Self::checked(&p.hashes, &p.data, n)?;
        for (&f, (page, h)) in p.frames.iter().zip(pages) {
            if f >= self.mem().pages() {
                return Err(MigrationError::Protocol(format!(
                    "page for frame {f} beyond memory"
                )));
            }
            self.mem().write_page(f, page)?;
            self.table[f as usize] = Some(h);
            self.report.pages_received += 1;
        }
        Ok(())
    }

    fn verify(&self, d: &v1::Digest, full: bool, fp: &Fingerprinter) -> Result<(), MigrationError> {
        let mut table = Vec::with_capacity(self.table.len());
        for (f, h) in self.table.iter().enumerate() {
            match h {
                Some(h) => table.push(*h),
                None => {
                    return Err(MigrationError::Verification(format!(
                        "frame {f} never arrived"
                    )));
                }
            }
        }
        if d.digest.as_ref() != table_digest(&table) {
            return Err(MigrationError::Verification(
                "page hashes differ from the source's".into(),
            ));
        }
        if full {
            let hashes = fp.fingerprint_region(self.mem(), &|_| {}).hashes;
            if hashes != table || d.full.as_ref() != table_digest(&hashes) {
                return Err(MigrationError::Verification(
                    "memory hashed in full differs from the source's".into(),
                ));
            }
        }
        Ok(())
    }
}
