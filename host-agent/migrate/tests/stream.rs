//! The engine relaying a VM's own migration stream (a QEMU VM's), over
//! in-memory links and a sample stream written as QEMU writes one: no
//! QEMU, no sockets. These pin that every destination gets the exact
//! stream, the pages it holds as hashes, and that a stream whose end went
//! unconfirmed leaves the source paused, in doubt, never resumed, and
//! that a source waiting on its return path hears its destination.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_memory::synth::{SynthSpec, SyntheticMemory, SyntheticVm};
use pagecast_memory::{DirtyBitmap, GuestMemory, MemoryError, Page, Region};
use pagecast_migrate::mem::{MemLink, NoCasts, link_pair};
use pagecast_migrate::*;
use pagecast_pages::{ContentKey, PAGE_SIZE, PageHash};
use pagecast_proto::v1;
use pagecast_proto::v1::migrate_frame::Body;
use pagecast_qemu::stream::sample::{Rec, write};

/// Frames of the sample VM whose page is filled with one byte: frame `i`
/// with byte `i + 1`.
const FILLED: u64 = 24;

fn memory() -> SyntheticMemory {
    let mem = SyntheticVm::new(SynthSpec::new("idle", 1, 1 << 20).unwrap())
        .unwrap()
        .materialize(None)
        .unwrap();
    for f in 0..FILLED {
        mem.write_page(f, &[f as u8 + 1; PAGE_SIZE]).unwrap();
    }
    let _ = mem.take_dirty();
    mem
}

/// The stream QEMU would send for that memory: every filled page, some
/// twice (a later round), zero pages, and device state.
fn stream() -> Vec<u8> {
    let mut recs: Vec<Rec> = (0..FILLED).map(|f| Rec::Page(0, f, f as u8 + 1)).collect();
    recs.push(Rec::Zero(0, 200));
    recs.push(Rec::Eos);
    recs.extend((0..4).map(|f| Rec::Page(0, f, f as u8 + 1)));
    // A page rewritten since the manifest: no destination holds it.
    recs.push(Rec::Page(0, 5, 0xee));
    write(&[("pc.ram", 1 << 20)], &recs, true)
}

/// A VM that migrates itself: the engine reads its memory for the
/// manifest; its stream comes from [`Sample`].
struct Adopted {
    mem: SyntheticMemory,
    resumes: AtomicU64,
}

/// The adopted VM every test moves, never resumed yet, and a fingerprinter.
fn adopted() -> (Adopted, Fingerprinter) {
    let vm = Adopted {
        mem: memory(),
        resumes: AtomicU64::new(0),
    };
    (vm, Fingerprinter::new(2).unwrap())
}

impl GuestMemory for Adopted {
    fn write_page(&self, f: u64, d: &Page) -> Result<(), MemoryError> {
        self.mem.write_page(f, d)
    }
    fn take_dirty(&self) -> Result<DirtyBitmap, MemoryError> {
        Ok(DirtyBitmap::new(self.page_count()))
    }
    fn mark_dirty(&self, _: &DirtyBitmap) -> Result<(), MemoryError> {
        Ok(())
    }
    fn region(&self) -> &Region {
        self.mem.region()
    }
}

impl SourceVm for Adopted {
    fn name(&self) -> &str {
        "q1"
    }
    fn origin(&self) -> String {
        "sample".into()
    }
    fn dirty_rate(&self) -> u64 {
        0
    }
    fn resume(&self) {
        self.resumes.fetch_add(1, Ordering::SeqCst);
    }
    fn set_throttle(&self, _: u8) {}
    fn kind(&self) -> v1::VmKind {
        v1::VmKind::Qemu
    }
}

/// The sample stream as a source hands it out.
struct Sample {
    bytes: Vec<u8>,
    started: bool,
}

impl StreamSource for Sample {
    fn start(&mut self, _: &mut dyn FnMut() -> Option<String>) -> Result<Started, MigrationError> {
        self.started = true;
        Ok(Started {
            input: Box::new(Cursor::new(self.bytes.clone())),
            back: None,
        })
    }
    fn settled(&mut self) -> Result<StreamEnd, MigrationError> {
        Ok(StreamEnd {
            completed: true,
            status: "completed".into(),
            downtime_ms: 12.0,
            ..StreamEnd::default()
        })
    }
}

/// Pages a destination holds, by content.
struct Holds(HashMap<PageHash, Box<Page>>);

impl Holds {
    /// The filled pages of frames `frames`.
    fn frames(frames: std::ops::Range<u64>) -> Self {
        Holds(
            frames
                .map(|f| {
                    let p = Box::new([f as u8 + 1; PAGE_SIZE]);
                    (ContentKey::CLUSTER.hash_page(&p), p)
                })
                .collect(),
        )
    }
}

impl LocalContent for Holds {
    fn copy(&self, _: &ContentKey, h: &PageHash, out: &mut Page) -> bool {
        match self.0.get(h) {
            Some(p) => {
                out.copy_from_slice(&p[..]);
                true
            }
            None => false,
        }
    }
}

/// What a destination did with the stream.
struct Got {
    /// The stream as rebuilt (held pages put back).
    bytes: Vec<u8>,
    /// Pages that came as hashes.
    held: u64,
    /// Bytes of page data that travelled.
    data: u64,
}

/// A destination: the shared front, then the stream's parts rebuilt;
/// answers Resumed if `confirm`.
fn destination(mut link: MemLink, holds: &Holds, confirm: bool) -> Result<Got, MigrationError> {
    let begin = match link.recv(Some(Duration::from_secs(10)))? {
        Body::Begin(b) => b,
        other => panic!("expected begin, got {other:?}"),
    };
    assert_eq!(begin.kind, v1::VmKind::Qemu as i32);
    let mut arrival = receive_front(&mut link, &begin, holds, &mut NoSlotEvents, Shape::Contents)?;
    let slot = arrival.slot().clone();
    let mut got = Got {
        bytes: Vec::new(),
        held: 0,
        data: 0,
    };
    let mut page = [0u8; PAGE_SIZE];
    loop {
        let p = match arrival.next_frame()? {
            Body::Stream(p) => p,
            other => panic!("expected the stream, got {other:?}"),
        };
        let mut at = 0;
        for (i, &pos) in p.held_at.iter().enumerate() {
            let h = PageHash::try_from(&p.held[32 * i..32 * i + 32]).unwrap();
            assert!(slot.copy(&h, &mut page), "named a page not set aside");
            got.bytes.extend_from_slice(&p.data[at..pos as usize]);
            got.bytes.extend_from_slice(&page);
            at = pos as usize;
            got.held += 1;
        }
        got.bytes.extend_from_slice(&p.data[at..]);
        got.data += p.data.len() as u64;
        if p.last {
            break;
        }
    }
    if confirm {
        arrival.started();
        arrival.send(Body::Resumed(v1::Resumed { progress: 0 }))?;
    }
    // Stay until the source is done with the link.
    let _ = link.recv(Some(Duration::from_secs(2)));
    Ok(got)
}

#[test]
fn every_destination_gets_the_exact_stream_with_what_it_holds_as_hashes() {
    let (vm, fp) = adopted();
    let original = stream();
    // One destination holds the first half of the filled pages, one the
    // second, one nothing.
    let holds = [
        Holds::frames(0..FILLED / 2),
        Holds::frames(FILLED / 2..FILLED),
        Holds::frames(0..0),
    ];
    let mut sample = Sample {
        bytes: original.clone(),
        started: false,
    };
    let (report, got) = std::thread::scope(|s| {
        let mut targets = Vec::new();
        let mut dests = Vec::new();
        for (i, h) in holds.iter().enumerate() {
            let (a, b) = link_pair();
            targets.push(CloneTarget {
                name: format!("c{i}"),
                host: format!("h{i}"),
                link: Box::new(a),
            });
            dests.push(s.spawn(move || destination(b, h, true)));
        }
        let report = clone_out(
            &vm,
            targets,
            &mut NoCasts,
            &fp,
            &MigrateOptions::default(),
            &mut |_| {},
            None,
            How::Stream(&mut sample),
        );
        let got: Vec<Got> = dests
            .into_iter()
            .map(|d| d.join().unwrap().unwrap())
            .collect();
        (report, got)
    });
    assert!(sample.started);
    assert!(report.clones.iter().all(|c| c.ok), "{:?}", report.clones);
    assert_eq!(
        vm.resumes.load(Ordering::SeqCst),
        1,
        "a clone's source runs on"
    );
    for (i, g) in got.iter().enumerate() {
        assert!(
            g.bytes == original,
            "destination {i} rebuilt another stream"
        );
    }
    // Each held half is named by hash (the four pages sent again in the
    // later round too, for the first); the rewritten page never is.
    assert_eq!(got[0].held, FILLED / 2 + 4);
    assert_eq!(got[1].held, FILLED / 2);
    assert_eq!(got[2].held, 0);
    let page = PAGE_SIZE as u64;
    assert!(
        got[2].data - got[0].data >= (FILLED / 2 + 4) * page,
        "held pages did not travel as data: {} vs {} bytes",
        got[0].data,
        got[2].data
    );
}

#[test]
fn a_move_whose_end_goes_unconfirmed_is_in_doubt_and_the_source_never_resumes() {
    let (vm, fp) = adopted();
    let mut sample = Sample {
        bytes: stream(),
        started: false,
    };
    let opts = MigrateOptions {
        reply_timeout: Duration::from_millis(500),
        ..MigrateOptions::default()
    };
    let holds = Holds::frames(0..4);
    let (a, b) = link_pair();
    let (res, got) = std::thread::scope(|s| {
        let d = s.spawn(|| destination(b, &holds, false));
        let res = move_one(
            &vm,
            Box::new(a),
            &fp,
            &opts,
            &mut |_| {},
            None,
            How::Stream(&mut sample),
        );
        (res, d.join().unwrap())
    });
    assert!(got.is_ok(), "the destination got the whole stream");
    match res {
        Err(MigrationError::InDoubt(_)) => {}
        other => panic!("expected in doubt, got {other:?}"),
    }
    assert_eq!(
        vm.resumes.load(Ordering::SeqCst),
        0,
        "the source resumed a VM that may run at its destination"
    );
}

#[test]
fn a_destination_that_fails_mid_stream_leaves_the_source_running() {
    let (vm, fp) = adopted();
    // Long enough for several parts.
    let mut recs: Vec<Rec> = (0..200u64)
        .map(|f| Rec::Page(0, f, (f % 250) as u8))
        .collect();
    recs.push(Rec::Eos);
    recs.extend((0..200u64).map(|f| Rec::Page(0, f, (f % 250) as u8)));
    let mut sample = Sample {
        bytes: write(&[("pc.ram", 1 << 20)], &recs, true),
        started: false,
    };
    let (a, b) = link_pair();
    // The link breaks once the source has sent its offer (begin, manifest
    // header and chunk) and the first part of the stream: the rest of the
    // stream never goes, so the destination cannot run the VM.
    let a = a.cut_after(4);
    let res = std::thread::scope(|s| {
        let d = s.spawn(move || {
            let holds = Holds::frames(0..0);
            destination(b, &holds, true)
        });
        let res = move_one(
            &vm,
            Box::new(a),
            &fp,
            &MigrateOptions::default(),
            &mut |_| {},
            None,
            How::Stream(&mut sample),
        );
        let _ = d.join().unwrap();
        res
    });
    assert!(
        res.is_err() && !matches!(res, Err(MigrationError::InDoubt(_))),
        "{res:?}"
    );
    assert_eq!(vm.resumes.load(Ordering::SeqCst), 1, "the source runs on");
}

/// Bytes of the stream's tail a source with a return path holds back until
/// its destination said SHUT (QEMU sends its last bytes and closes only
/// then).
const HELD_BACK: usize = 1;

/// A stream whose last bytes come only after the return path brought
/// `SHUT`: as QEMU with the `return-path` capability.
struct Waiting {
    bytes: Vec<u8>,
    /// What the return path brought, as the source VM read it.
    heard: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

/// The return path's end at the source VM.
struct Ear(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Ear {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads the stream; before its last bytes, waits (at most 10 s) for a
/// `SHUT` on the return path, else fails the read.
struct Withheld {
    bytes: Cursor<Vec<u8>>,
    heard: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Read for Withheld {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let len = self.bytes.get_ref().len() as u64;
        let at = self.bytes.position();
        let cut = len - HELD_BACK as u64;
        if at < cut {
            let n = out.len().min((cut - at) as usize);
            return self.bytes.read(&mut out[..n]);
        }
        if at >= len {
            return Ok(0);
        }
        // Everything but the held-back bytes went: wait for SHUT.
        let until = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut rp = pagecast_qemu::return_path::ReturnPath::new();
            rp.push(&self.heard.lock().unwrap())
                .map_err(std::io::Error::other)?;
            if rp.shut().is_some() {
                return self.bytes.read(out);
            }
            if std::time::Instant::now() > until {
                return Err(std::io::Error::other("no SHUT within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl StreamSource for Waiting {
    fn start(&mut self, _: &mut dyn FnMut() -> Option<String>) -> Result<Started, MigrationError> {
        Ok(Started {
            input: Box::new(Withheld {
                bytes: Cursor::new(self.bytes.clone()),
                heard: self.heard.clone(),
            }),
            back: Some(Box::new(Ear(self.heard.clone()))),
        })
    }
    fn settled(&mut self) -> Result<StreamEnd, MigrationError> {
        Ok(StreamEnd {
            completed: true,
            status: "completed".into(),
            downtime_ms: 3.0,
            ..StreamEnd::default()
        })
    }
}

/// A destination that answers on the return path (`answer`) once it has
/// everything but the held-back bytes, then takes the rest.
fn answering(mut link: MemLink, expect: usize, answer: Vec<u8>) -> Result<u64, MigrationError> {
    let begin = match link.recv(Some(Duration::from_secs(10)))? {
        Body::Begin(b) => b,
        other => panic!("expected begin, got {other:?}"),
    };
    let holds = Holds::frames(0..0);
    let mut arrival = receive_front(
        &mut link,
        &begin,
        &holds,
        &mut NoSlotEvents,
        Shape::Contents,
    )?;
    let mut got = 0usize;
    let mut answered = false;
    loop {
        let p = match arrival.next_frame()? {
            Body::Stream(p) => p,
            other => panic!("expected the stream, got {other:?}"),
        };
        got += p.data.len();
        if !answered && got + HELD_BACK >= expect {
            answered = true;
            arrival.send(Body::ReturnPath(v1::ReturnPath {
                data: answer.clone().into(),
            }))?;
        }
        if p.last {
            break;
        }
    }
    arrival.started();
    arrival.send(Body::Resumed(v1::Resumed { progress: 0 }))?;
    let _ = link.recv(Some(Duration::from_secs(2)));
    Ok(got as u64)
}

#[test]
fn a_source_waiting_on_its_return_path_hears_its_destination_and_ends() {
    use pagecast_qemu::return_path::{RP_PONG, RP_SHUT, message};
    let (vm, fp) = adopted();
    let bytes = stream();
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut source = Waiting {
        bytes: bytes.clone(),
        heard: heard.clone(),
    };
    let mut answer = message(RP_PONG, 1).to_vec();
    answer.extend_from_slice(&message(RP_SHUT, 0));
    let (a, b) = link_pair();
    let expect = bytes.len();
    let (res, got) = std::thread::scope(|s| {
        let d = s.spawn(move || answering(b, expect, answer));
        let res = move_one(
            &vm,
            Box::new(a),
            &fp,
            &MigrateOptions::default(),
            &mut |_| {},
            None,
            How::Stream(&mut source),
        );
        (res, d.join().unwrap())
    });
    assert!(res.is_ok(), "{res:?}");
    assert_eq!(got.unwrap(), bytes.len() as u64, "the whole stream went");
    let mut want = message(RP_PONG, 1).to_vec();
    want.extend_from_slice(&message(RP_SHUT, 0));
    assert_eq!(
        *heard.lock().unwrap(),
        want,
        "the source heard its destination"
    );
}

#[test]
fn a_return_path_message_post_copy_would_send_never_reaches_the_source() {
    let (vm, fp) = adopted();
    let bytes = stream();
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut source = Waiting {
        bytes: bytes.clone(),
        heard: heard.clone(),
    };
    // REQ_PAGES (type 4): a destination asking the source QEMU for pages.
    let answer = vec![0, 4, 0, 4, 0, 0, 0, 1];
    let (a, b) = link_pair();
    let expect = bytes.len();
    let res = std::thread::scope(|s| {
        let d = s.spawn(move || answering(b, expect, answer));
        let res = move_one(
            &vm,
            Box::new(a),
            &fp,
            &MigrateOptions {
                reply_timeout: Duration::from_secs(2),
                ..MigrateOptions::default()
            },
            &mut |_| {},
            None,
            How::Stream(&mut source),
        );
        let _ = d.join();
        res
    });
    let err = res.expect_err("the migration must fail");
    assert!(err.to_string().contains("type 4"), "{err}");
    // The source QEMU hears only that its destination failed: it fails its
    // migration and runs on.
    assert_eq!(
        *heard.lock().unwrap(),
        pagecast_qemu::return_path::message(pagecast_qemu::return_path::RP_SHUT, 1)
    );
}

/// A destination whose QEMU refused the stream says Abort, then goes: the
/// source stops sending to it and counts it failed, not in doubt, even
/// though its link then fails while the stream's tail (the devices' state)
/// is going, and the source VM runs on. (Sending on after the Abort, the
/// failed send of a tail part made it in doubt, and the VM stayed paused.)
#[test]
fn a_destination_that_aborts_is_failed_even_if_its_link_then_breaks_in_the_tail() {
    let (vm, fp) = adopted();
    // 2 MiB of device state after RAM: many parts of tail.
    let mut bytes = stream();
    bytes.extend((0..2u32 << 20).map(|i| (i % 251) as u8));
    let mut sample = Sample {
        bytes,
        started: false,
    };
    let (a, mut b) = link_pair();
    let res = std::thread::scope(|s| {
        s.spawn(move || {
            let begin = match b.recv(Some(Duration::from_secs(10))).unwrap() {
                Body::Begin(x) => x,
                other => panic!("expected begin, got {other:?}"),
            };
            let holds = Holds::frames(0..0);
            let mut arrival =
                receive_front(&mut b, &begin, &holds, &mut NoSlotEvents, Shape::Contents).unwrap();
            assert!(matches!(arrival.next_frame().unwrap(), Body::Stream(_)));
            arrival.fail(
                &mut NoSlotEvents,
                &MigrationError::Stream {
                    code: v1::RefusalCode::Invalid,
                    reason: "the destination QEMU refused the stream".into(),
                },
            );
            // Gone before the tail is through: the source's next send fails.
        });
        move_one(
            &vm,
            Box::new(a),
            &fp,
            &MigrateOptions::default(),
            &mut |_| {},
            None,
            How::Stream(&mut sample),
        )
    });
    match res {
        Err(MigrationError::InDoubt(why)) => panic!("an aborted destination is in doubt: {why}"),
        Err(e) => assert!(e.to_string().contains("refused the stream"), "{e}"),
        Ok(r) => panic!("moved to a destination that aborted: {r:?}"),
    }
    assert_eq!(vm.resumes.load(Ordering::SeqCst), 1, "the source runs on");
}
