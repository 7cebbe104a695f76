//! The stages every migration runs before its transfer: table, offer,
//! local fill, hold, cast and refill, and the order of all of them.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_memory::manifest::Manifest;
use pagecast_pages::{PAGE_SIZE, PageHash};
use pagecast_proto::{MAX_MANIFEST_CHUNK_FRAMES, MIGRATE_WIRE_VERSION, v1};

use super::{Body, Class, Fleet, Mode, Transfer};
use crate::{Caster, Hold, HoldPoll, MigrationError, Switchover, wire_len};

/// How often a held source tells the destinations it is alive, and
/// expects the same back.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);

/// Every stage in order.
pub(super) fn run(
    fleet: &mut Fleet,
    transfer: &mut dyn Transfer,
    hold: &mut Option<&mut dyn Hold>,
    caster: &mut Option<&mut dyn Caster>,
    fp: &Fingerprinter,
) -> Result<(), MigrationError> {
    table(fleet, fp)?;
    offer(
        fleet,
        hold.as_ref().is_some_and(|h| h.holds()) || caster.is_some(),
    );
    fleet.any_left()?;
    needs(fleet);
    fleet.any_left()?;
    let mut refill = false;
    if let Some(h) = hold.as_deref_mut().filter(|h| h.holds()) {
        held(fleet, h)?;
        refill = true;
    }
    if let Some(c) = caster.as_deref_mut() {
        cast_lacking(fleet, c);
        refill = true;
    }
    if refill {
        for i in fleet.alive() {
            fleet.send(i, Body::Refill(v1::Refill {}), Class::Control);
        }
        needs(fleet);
        fleet.any_left()?;
    }
    if fleet.opts.switchover == Switchover::Postcopy && !fleet.postcopy_offered() {
        return Err(MigrationError::Refused {
            code: v1::RefusalCode::Invalid,
            reason: postcopy_refusal(fleet.mode, fleet.rounds).into(),
        });
    }
    transfer.transfer(fleet, hold, caster, fp)?;
    fleet.any_left()?;
    transfer.commit(fleet)?;
    transfer.postcopy(fleet)?;
    fleet.tell(v1::MigratePhase::Done);
    Ok(())
}

/// Why `--switchover postcopy` cannot be had for a run of `mode`
/// (`rounds`: the engine's own rounds carry the pages).
pub fn postcopy_refusal(mode: Mode, rounds: bool) -> &'static str {
    if mode == Mode::Clone {
        "post-copy is for moves: a clone's source runs on, so its memory keeps changing \
         under the copies (use --switchover precopy or auto)"
    } else if !rounds {
        "post-copy is not offered for adopted QEMU VMs: their memory travels in QEMU's own \
         stream (use --switchover precopy or auto)"
    } else {
        "post-copy is not possible here"
    }
}

/// The hash of every frame: the VM's own map if it keeps one current
/// (read after the dirty log was reset, so anything written later goes in
/// a pre-copy round), else a fresh hash of all memory.
fn table(fleet: &mut Fleet, fp: &Fingerprinter) -> Result<(), MigrationError> {
    let pages = fleet.vm.page_count();
    fleet.take_dirty()?;
    fleet.table = match fleet.vm.current_hashes() {
        Some(t) if t.len() as u64 == pages => t,
        _ => {
            fleet.tell(v1::MigratePhase::Fingerprinting);
            let key = fleet.vm.content_key();
            fp.pool()
                .install(|| fp.fingerprint(fleet.vm, &key, &|_| {}))
                .hashes
        }
    };
    fleet.report.nonzero_pages = fleet.table.iter().filter(|h| !h.is_zero_page()).count() as u64;
    Ok(())
}

/// `MigrateBegin`, its answer and the manifest, to each destination.
/// `held`: the destinations wait for a Refill after their first needs.
fn offer(fleet: &mut Fleet, held: bool) {
    fleet.tell(v1::MigratePhase::Manifest);
    let pages = fleet.vm.page_count();
    let clone = fleet.mode == Mode::Clone;
    let begin_postcopy = fleet.postcopy_offered();
    let explicit = fleet.opts.switchover == Switchover::Postcopy;
    for i in 0..fleet.dests.len() {
        let begin = v1::MigrateBegin {
            version: MIGRATE_WIRE_VERSION as i32,
            vm: fleet.dests[i].t.name.clone(),
            memory_bytes: pages * PAGE_SIZE as u64,
            dirty_rate: fleet.vm.dirty_rate(),
            source: String::new(),
            verify_full: fleet.opts.verify_full,
            origin: if clone {
                format!("clone of {}", fleet.vm.name())
            } else {
                fleet.vm.origin()
            },
            job: fleet.opts.job.clone(),
            no_local: fleet.opts.no_local,
            per_frame: fleet.opts.per_frame,
            held,
            domain: fleet.vm.domain().to_owned(),
            domain_check: fleet.vm.content_key().check(),
            kind: fleet.vm.kind() as i32,
            connect: fleet.opts.connect.clone(),
            postcopy: begin_postcopy,
            clone,
            vm_generation_id: fleet.opts.vm_generation_id.clone(),
        };
        fleet.send(i, Body::Begin(begin), Class::Control);
        // Each answer is read before the next Begin: a destination that
        // accepted waits for its manifest on its own reply timeout, so
        // asking all first would let one frozen destination use up every
        // other's (this way, only the timeouts of those before it).
        match fleet.expect(i, "answer to the migration request") {
            Some(Body::Accept(a)) if a.ok && !a.postcopy && begin_postcopy && explicit => {
                fleet.fail(
                    i,
                    MigrationError::Refused {
                        code: v1::RefusalCode::Refused,
                        reason: "the destination cannot take post-copy (userfaultfd is not \
                                 permitted there: run its agent as root, or set \
                                 vm.unprivileged_userfaultfd=1); use --switchover precopy or auto"
                            .into(),
                    },
                );
            }
            Some(Body::Accept(a)) if a.ok => fleet.dests[i].postcopy = a.postcopy,
            Some(Body::Accept(a)) => fleet.fail(
                i,
                MigrationError::Refused {
                    code: v1::RefusalCode::try_from(a.code).unwrap_or(v1::RefusalCode::Refused),
                    reason: a.reason,
                },
            ),
            Some(other) => fleet.fail(
                i,
                MigrationError::Protocol(format!("expected accept, got {other:?}")),
            ),
            None => {}
        }
    }
    let mut manifest = Manifest {
        vm: String::new(),
        hashes: std::mem::take(&mut fleet.table),
    };
    for i in fleet.alive() {
        manifest.vm = fleet.dests[i].t.name.clone();
        fleet.send(i, Body::ManifestHeader(manifest.header()), Class::Manifest);
        for c in manifest.chunks(MAX_MANIFEST_CHUNK_FRAMES) {
            fleet.send(i, Body::ManifestChunk(c), Class::Manifest);
        }
    }
    fleet.table = manifest.hashes;
}

/// Each destination's answer: the contents it lacks, and the frames it
/// filled from what it held.
fn needs(fleet: &mut Fleet) {
    let mut local = 0;
    // Every destination owes its list from now: read one after another,
    // those that froze together cost one reply timeout, not one each.
    let since = (Instant::now(), fleet.opts.reply_timeout);
    for i in fleet.alive() {
        if let Some((n, filled, gathering)) = read_needs(fleet, i, since) {
            fleet.dests[i].needs = n;
            fleet.dests[i].gathering = gathering;
            local += filled;
        }
    }
    fleet.report.pages_local = local;
    fleet.prog.pages_local = local;
}

/// One batch of NeedHashes frames from destination `i` (up to `last`):
/// the contents, the frames it filled itself, and the frames it will
/// gather from other hosts after a post-copy switchover.
/// The first frame is owed since `since`; each later one within the
/// reply timeout of the one before.
fn read_needs(
    fleet: &mut Fleet,
    i: usize,
    since: (Instant, Duration),
) -> Option<(Vec<PageHash>, u64, u64)> {
    let pages = fleet.table.len();
    let mut needed: Vec<PageHash> = Vec::new();
    let mut first = true;
    loop {
        let what = "list of needed pages";
        let next = if first {
            fleet.expect_since(i, what, since)
        } else {
            fleet.expect(i, what)
        };
        first = false;
        match next? {
            Body::Need(n) if n.hashes.len() % 32 == 0 => {
                needed.extend(
                    n.hashes
                        .chunks_exact(32)
                        .map(|h| PageHash::try_from(h).expect("32 bytes")),
                );
                if needed.len() > pages {
                    fleet.fail(
                        i,
                        MigrationError::Protocol("more needed pages than frames".into()),
                    );
                    return None;
                }
                if n.last && n.gathering > 0 && !fleet.dests[i].postcopy {
                    fleet.fail(
                        i,
                        MigrationError::Protocol(
                            "a destination that refused post-copy says it will gather pages".into(),
                        ),
                    );
                    return None;
                }
                if n.last {
                    let cap = pages as u64;
                    return Some((needed, n.filled_locally.min(cap), n.gathering.min(cap)));
                }
            }
            Body::Need(_) => {
                fleet.fail(
                    i,
                    MigrationError::Protocol("needed hashes are not 32-byte multiples".into()),
                );
                return None;
            }
            other => {
                fleet.fail(
                    i,
                    MigrationError::Protocol(format!("expected needed pages, got {other:?}")),
                );
                return None;
            }
        }
    }
}

/// Holds for a gang job, keeping every link alive both ways, until the
/// job says go (or abort, or a destination falls silent).
fn held(fleet: &mut Fleet, hold: &mut dyn Hold) -> Result<(), MigrationError> {
    fleet.tell(v1::MigratePhase::Held);
    let mut needed: Vec<PageHash> = fleet
        .dests
        .iter()
        .filter(|d| d.live())
        .flat_map(|d| d.needs.iter().copied())
        .collect();
    needed.sort_unstable();
    needed.dedup();
    hold.needs(&needed, fleet.report.pages_local)?;
    let timeout = fleet.opts.reply_timeout;
    let mut last_sent = Instant::now();
    let mut last_told = Instant::now();
    let mut heard: Vec<Instant> = vec![Instant::now(); fleet.dests.len()];
    loop {
        if last_told.elapsed() >= Duration::from_secs(2) {
            // Whoever holds us hears we are alive too.
            fleet.tell(v1::MigratePhase::Held);
            last_told = Instant::now();
        }
        match hold.poll() {
            HoldPoll::Go => return Ok(()),
            HoldPoll::Abort(why) => return Err(MigrationError::Cancelled(why)),
            HoldPoll::Wait => {}
        }
        // Often enough that an answer comes well within the reply
        // timeout, however short it is set.
        if last_sent.elapsed() >= KEEPALIVE_EVERY.min(timeout / 4) {
            for i in fleet.alive() {
                fleet.send(i, Body::KeepAlive(v1::KeepAlive {}), Class::Control);
            }
            last_sent = Instant::now();
        }
        let alive = fleet.alive();
        let wait = Duration::from_millis(100) / alive.len().max(1) as u32;
        for i in alive {
            listen_held(fleet, i, wait, &mut heard[i]);
            if fleet.dests[i].live() && heard[i].elapsed() > timeout {
                fleet.fail(
                    i,
                    MigrationError::Timeout {
                        peer: fleet.dests[i].t.link.peer(),
                        what: "keep-alive while held",
                        after: timeout,
                    },
                );
            }
        }
        fleet.any_left()?;
    }
}

/// What destination `i` says while held, for up to `wait`.
fn listen_held(fleet: &mut Fleet, i: usize, wait: Duration, heard: &mut Instant) {
    match fleet.dests[i].t.link.recv(Some(wait)) {
        Ok(Body::KeepAlive(_)) => *heard = Instant::now(),
        Ok(Body::Abort(a)) => {
            fleet.dests[i].state = super::DestState::Failed(MigrationError::from_abort(a));
        }
        Ok(other) => fleet.fail(
            i,
            MigrationError::Protocol(format!("unexpected {other:?} while held")),
        ),
        Err(MigrationError::Timeout { .. }) => {}
        Err(e) => fleet.fail(i, e),
    }
}

/// Casts each content some destination lacks once, from the first frame
/// holding it, to the destinations lacking it. A failed cast is not fatal:
/// what it did not deliver travels over the links.
fn cast_lacking(fleet: &mut Fleet, caster: &mut dyn Caster) {
    let alive = fleet.alive();
    let mut lacking: BTreeMap<PageHash, Vec<usize>> = BTreeMap::new();
    for (k, &i) in alive.iter().enumerate() {
        for h in &fleet.dests[i].needs {
            lacking.entry(*h).or_default().push(k);
        }
    }
    if lacking.is_empty() {
        return;
    }
    fleet.tell(v1::MigratePhase::Cast);
    let mut first: HashMap<PageHash, u64> = HashMap::new();
    for (f, h) in fleet.table.iter().enumerate() {
        if lacking.contains_key(h) {
            first.entry(*h).or_insert(f as u64);
        }
    }
    let (mut frames, mut members) = (Vec::new(), Vec::new());
    for (h, who) in lacking {
        if let Some(&f) = first.get(&h) {
            frames.push(f);
            members.push(who);
        }
    }
    let _ = cast(fleet, caster, &frames, &members, false, &alive);
}

/// One cast of `frames` to the destinations `alive` (page `k` to
/// `members[k]`, indexes into `alive`; empty: all), each invited over its
/// link.
pub(super) fn cast(
    fleet: &mut Fleet,
    caster: &mut dyn Caster,
    frames: &[u64],
    members: &[Vec<usize>],
    by_frame: bool,
    alive: &[usize],
) -> Result<crate::CastOutcome, MigrationError> {
    let receivers: Vec<String> = alive
        .iter()
        .map(|&i| fleet.dests[i].t.host.clone())
        .collect();
    let dests = &mut fleet.dests;
    let mut invited = 0u64;
    let out = caster.cast(frames, members, by_frame, &receivers, &mut |r, control| {
        let body = Body::CastJoin(v1::CastJoin {
            control: control.to_owned(),
            by_frame,
        });
        invited += wire_len(&body);
        dests[alive[r]].t.link.send(body)
    });
    fleet.count(invited, Class::Control);
    let out = out?;
    fleet.bytes_cast += out.bytes;
    fleet.prog.bytes_sent = fleet.report.bytes_sent + fleet.bytes_cast;
    Ok(out)
}
