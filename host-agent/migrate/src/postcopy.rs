//! The destination's side of post-copy: the VM starts on memory whose
//! missing frames are absent; a guest's first touch of one is caught
//! ([`Userfault`]) and asked for (`PageRequest`), while the source pushes
//! every missing frame anyway. Each page is hash-checked on arrival, and
//! the table of what arrived must match the source's digest at the end.
//!
//! Three threads share the work: the caller's starts the VM (which may
//! itself touch missing frames), one turns faults into frame numbers, and
//! one owns the link, asking for faulted frames and placing pages.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pagecast_memory::{Region, Userfault};
use pagecast_pages::{ContentKey, PageHash};
use pagecast_proto::{MAX_NEED_HASHES_PER_FRAME, v1};

use crate::dest::checked;
use crate::{MigrationError, MigrationLink};

type Body = v1::migrate_frame::Body;

/// How long the link thread waits for a frame before it looks for faults
/// again: the most a fault waits before it is asked for.
const POLL: Duration = Duration::from_millis(1);

/// What post-copy did at the destination.
#[derive(Debug, Default, Clone)]
pub(crate) struct Finished {
    /// The guest's progress counter once it resumed.
    pub progress: u64,
    /// Frames asked for because the guest (or the host) touched them.
    pub requested: u64,
    /// Frames placed since Commit (before and after the VM resumed).
    pub placed: u64,
}

/// What stands for a missing frame's hash in the digest checked before
/// Ready (no page hashes to it: it is not a BLAKE3 output anyone chose).
pub(crate) const MASKED: PageHash = PageHash::from_bytes([0xff; 32]);

/// The frames still to come, as the source lists them after a post-copy
/// switchover (each inside memory, none twice, at most every frame), and
/// the digest of the table with those frames [`MASKED`].
pub(crate) fn read_missing(
    next: &mut dyn FnMut() -> Result<Body, MigrationError>,
    pages: u64,
) -> Result<(Vec<u64>, Vec<u8>), MigrationError> {
    let mut seen = HashSet::new();
    loop {
        let m = match next()? {
            Body::PostcopyMissing(m) => m,
            other => {
                return Err(MigrationError::Protocol(format!(
                    "expected the post-copy frame list, got {other:?}"
                )));
            }
        };
        for &f in &m.frames {
            if f >= pages || !seen.insert(f) {
                return Err(MigrationError::Protocol(format!(
                    "post-copy frame list names frame {f} (of {pages}) out of range or twice"
                )));
            }
        }
        if m.last {
            if m.digest.len() != 32 {
                return Err(MigrationError::Protocol(
                    "the post-copy frame list ends without its 32-byte digest".into(),
                ));
            }
            let mut v: Vec<u64> = seen.into_iter().collect();
            v.sort_unstable();
            return Ok((v, m.digest.to_vec()));
        }
    }
}

/// Starts the VM on `region` with `missing` frames absent and completes
/// its memory: `table` holds the hash of every other frame. `start` runs
/// the VM and returns its progress counter. Returns once every frame is
/// there and the table matches the source's digest; an error after
/// `start` succeeded leaves a VM that cannot run on
/// ([`MigrationError::PostcopyLost`] or a failed verification).
pub(crate) fn complete(
    link: &mut dyn MigrationLink,
    key: &ContentKey,
    mut region: Region,
    mut table: Vec<Option<PageHash>>,
    missing: &[u64],
    timeout: Duration,
    start: &mut dyn FnMut(Region) -> Result<u64, String>,
) -> Result<Finished, MigrationError> {
    // Registered first, then dropped: a frame dropped before the region is
    // registered could be filled in between (the kernel merging it into a
    // huge page) and would then never fault.
    let prepared = Userfault::register(&region).and_then(|uf| {
        region.discard(missing)?;
        Ok(uf)
    });
    let uf = match prepared {
        Ok(uf) => Arc::new(uf),
        // Nothing ran yet: the source hears the VM did not start.
        Err(e) => return Err(MigrationError::Start(format!("post-copy: {e}"))),
    };
    for &f in missing {
        table[f as usize] = None;
    }
    region.keep_userfault(uf.clone());
    let stop = AtomicBool::new(false);
    let (uf_ref, stop_ref) = (&*uf, &stop);
    let (faults_tx, faults_rx) = mpsc::channel::<u64>();
    let (started_tx, started_rx) = mpsc::channel::<Result<u64, String>>();
    std::thread::scope(|s| {
        let catcher = s.spawn(|| catch(&uf, &stop, faults_tx));
        let serving = s.spawn(move || {
            let mut l = Serve {
                link,
                key,
                uf: uf_ref,
                table,
                left: missing.len(),
                asked: HashSet::new(),
                timeout,
                done: Finished::default(),
            };
            let r = l.run(&faults_rx, &started_rx);
            if r.is_err() {
                // The guest never runs on: marked failed, its vCPU is held
                // at its next exit until the caller stops it. Whoever waits
                // on a frame that will never come (the vCPU inside KVM,
                // whose wait no signal interrupts, or a start reading the
                // guest) is let go by the release below: until that exit
                // the guest may read zeros where pages were missing, and
                // nothing it does is kept.
                uf_ref.fail();
            }
            // Done or failed, nothing is handled any more: memory dropped
            // later must not wait for a handler.
            uf_ref.release();
            stop_ref.store(true, Ordering::Relaxed);
            r.map(|()| l.done)
        });
        let started = start(region);
        let failed_start = started.is_err();
        let _ = started_tx.send(started);
        let r = serving.join().unwrap_or_else(|_| {
            Err(MigrationError::Protocol(
                "the post-copy link thread panicked".into(),
            ))
        });
        stop.store(true, Ordering::Relaxed);
        let _ = catcher.join();
        match r {
            Ok(done) => Ok(done),
            Err(MigrationError::PostcopyLost(why)) if failed_start => {
                Err(MigrationError::Start(why))
            }
            // The VM runs on memory it can no longer complete, or that
            // does not match its source: either way it cannot run on, and
            // the error says which.
            Err(e @ (MigrationError::PostcopyLost(_) | MigrationError::Verification(_))) => Err(e),
            Err(e) => Err(MigrationError::PostcopyLost(e.to_string())),
        }
    })
}

/// Turns missing-page faults into frame numbers until told to stop.
fn catch(uf: &Userfault, stop: &AtomicBool, out: mpsc::Sender<u64>) {
    let mut frames = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        frames.clear();
        if uf.faults(Duration::from_millis(20), &mut frames).is_err() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        for &f in &frames {
            if out.send(f).is_err() {
                return;
            }
        }
    }
}

/// The link's side of post-copy.
struct Serve<'a> {
    link: &'a mut dyn MigrationLink,
    key: &'a ContentKey,
    uf: &'a Userfault,
    table: Vec<Option<PageHash>>,
    /// Missing frames not placed yet.
    left: usize,
    asked: HashSet<u64>,
    timeout: Duration,
    done: Finished,
}

impl Serve<'_> {
    fn run(
        &mut self,
        faults: &mpsc::Receiver<u64>,
        started: &mpsc::Receiver<Result<u64, String>>,
    ) -> Result<(), MigrationError> {
        let mut resumed = false;
        let mut digest: Option<Vec<u8>> = None;
        let mut heard = Instant::now();
        loop {
            if !resumed {
                match started.try_recv() {
                    Ok(Ok(progress)) => {
                        resumed = true;
                        self.done.progress = progress;
                        self.link.send(Body::Resumed(v1::Resumed { progress }))?;
                    }
                    Ok(Err(why)) => {
                        let e = MigrationError::Start(why.clone());
                        let _ = self.link.send(Body::Abort(e.to_abort()));
                        return Err(MigrationError::PostcopyLost(why));
                    }
                    Err(_) => {}
                }
            }
            self.ask(faults)?;
            if resumed
                && self.left == 0
                && let Some(d) = digest.take()
            {
                return self.verdict(&d);
            }
            match self.link.recv(Some(POLL)) {
                Ok(Body::Pages(p)) => {
                    heard = Instant::now();
                    self.place(&p)?;
                }
                Ok(Body::Digest(d)) => {
                    heard = Instant::now();
                    digest = Some(d.digest.to_vec());
                }
                Ok(Body::KeepAlive(_)) => heard = Instant::now(),
                Ok(Body::Abort(a)) => {
                    return Err(MigrationError::PostcopyLost(format!(
                        "{} aborted: {}",
                        self.link.peer(),
                        a.reason
                    )));
                }
                Ok(other) => {
                    return Err(MigrationError::PostcopyLost(format!(
                        "unexpected {other:?} during post-copy"
                    )));
                }
                Err(MigrationError::Timeout { .. }) => {
                    if heard.elapsed() >= self.timeout {
                        return Err(MigrationError::PostcopyLost(format!(
                            "{} sent nothing for {:?} with {} frames still missing",
                            self.link.peer(),
                            self.timeout,
                            self.left
                        )));
                    }
                }
                Err(e) => return Err(MigrationError::PostcopyLost(e.to_string())),
            }
        }
    }

    /// Asks for every faulted frame not yet there nor asked for.
    fn ask(&mut self, faults: &mpsc::Receiver<u64>) -> Result<(), MigrationError> {
        let mut want = Vec::new();
        while let Ok(f) = faults.try_recv() {
            let missing = self.table.get(f as usize).is_some_and(Option::is_none);
            if missing && self.asked.insert(f) {
                want.push(f);
            }
        }
        for chunk in want.chunks(MAX_NEED_HASHES_PER_FRAME) {
            self.done.requested += chunk.len() as u64;
            self.link.send(Body::PageRequest(v1::PageRequest {
                frames: chunk.to_vec(),
            }))?;
        }
        Ok(())
    }

    /// Places each page of `p` in its frame if that frame is still missing
    /// (a frame both asked for and pushed arrives twice).
    fn place(&mut self, p: &v1::Pages) -> Result<(), MigrationError> {
        let pages = checked(self.key, &p.hashes, &p.data, p.frames.len())?;
        for (&f, (page, h)) in p.frames.iter().zip(pages) {
            match self.table.get(f as usize) {
                Some(None) => {
                    // A missing frame that turns out present was filled by
                    // something else: its content cannot be trusted.
                    if !self.uf.place(f, page)? {
                        return Err(MigrationError::Verification(format!(
                            "frame {f} was filled while it was missing"
                        )));
                    }
                    self.table[f as usize] = Some(h);
                    self.left -= 1;
                    self.done.placed += 1;
                }
                Some(Some(_)) => {}
                None => {
                    return Err(MigrationError::Protocol(format!(
                        "post-copy page for frame {f}, beyond memory"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every frame is there: the table must be the source's.
    fn verdict(&mut self, digest: &[u8]) -> Result<(), MigrationError> {
        let ok = digest == crate::digest_of(self.table.iter().map(|h| h.expect("all there")));
        let e = MigrationError::Verification(
            "page hashes after post-copy differ from the source's".into(),
        );
        self.link.send(Body::PostcopyDone(v1::PostcopyDone {
            ok,
            reason: if ok { String::new() } else { e.to_string() },
            code: if ok { 0 } else { e.code() as i32 },
        }))?;
        if ok { Ok(()) } else { Err(e) }
    }
}
