//! Adopted QEMU VMs: unmodified QEMU guests whose RAM lives in a shared
//! file, and their migration through pagecast as a stream proxy.
//!
//! The agent maps an adopted VM's memory file read-only and hashes all of
//! it every [`RESCAN`] (longer for VMs whose scan is slow; it cannot see
//! QEMU's dirty log), so its content map and the index's listing of it may
//! be up to that stale; every use of a
//! page is hash-checked, so staleness costs bytes, never correctness.
//!
//! Migration: the source agent offers the destination the distinct
//! contents of the source VM; the destination sets aside (copies, checked)
//! those it holds and says which; the source agent has its QEMU migrate to
//! a local Unix socket, parses the stream ([`pagecast_qemu::stream`]) and
//! sends every byte in order to the destination agent, a RAM page whose
//! content was set aside as its 32-byte hash; the destination agent
//! rebuilds the exact stream into its QEMU (started with `-incoming defer`,
//! pointed at a local socket with `migrate-incoming`). QEMU keeps its own
//! rounds, auto-converge and downtime limit. On the libvirt route libvirt
//! starts both ends: the source QEMU migrates to a loopback TCP port the
//! source agent listens on, and the destination agent connects to the
//! loopback port where libvirt's destination QEMU (not adopted) listens.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagecast_channel::{Channel, wire_bytes};
use pagecast_memory::{GuestMemory, ImageFile, MemoryError, Page};
use pagecast_migrate::{Hold, Progress};
use pagecast_pages::{ContentKey, PageHash};
use pagecast_proto::v1;
use pagecast_qemu::{PAGE, Qmp, Sink, StreamError};
use serde_json::json;
use tracing::{info, warn};

use crate::hosted::{Backend, Hosted, Look, Outbound};
use crate::sync::lock;
use crate::{Agent, AgentError};

/// How often an adopted VM's memory is hashed again, at most: a VM whose
/// scan takes longer than a twentieth of this is scanned every twenty scan
/// durations instead, so scanning costs at most 5% of the hashing threads.
pub const RESCAN: Duration = Duration::from_secs(5);
/// Hashes per offer message.
const OFFER_PART: usize = 8192;
/// Stream bytes per part sent to the destination.
const PART_BYTES: usize = 256 << 10;
/// Longest the proxy waits for either QEMU or the peer agent to move.
const STALL: Duration = Duration::from_secs(60);
/// Stream parts queued for the sending thread (each PART_BYTES).
const PARTS_IN_FLIGHT: usize = 8;
/// Hash-checked copies of offered contents a destination holds.
type Stash = HashMap<PageHash, Box<Page>>;
/// Most distinct contents a libvirt-route offer may list (the destination
/// has no adopted VM to bound it by): 64 GiB of distinct memory.
const MAX_ROUTE_OFFER: usize = 16 << 20;

/// An adopted QEMU VM: QEMU runs the guest, this agent reads its RAM file
/// (mapped read-only) and speaks QMP to it.
pub struct QemuBackend {
    qmp: PathBuf,
    image: ImageFile,
    last_scan: Mutex<Option<Instant>>,
    /// How long the last scan took.
    scan_took: Mutex<Duration>,
}

impl QemuBackend {
    /// A QMP connection. QEMU serves one QMP client at a time: while
    /// another holds the socket, this retries for a few seconds.
    fn qmp(&self) -> Result<Qmp, AgentError> {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            match Qmp::connect(&self.qmp) {
                Ok(q) => return Ok(q),
                Err(e) if Instant::now() > until => {
                    return Err(AgentError::Qemu(format!(
                        "{e} (does another client hold QEMU's only QMP connection?)"
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Whether the last scan is older than `age` (or there was none).
    fn scanned_before(&self, age: Duration) -> bool {
        lock(&self.last_scan).is_none_or(|t| t.elapsed() >= age)
    }
}

impl Backend for QemuBackend {
    fn kind(&self) -> v1::VmKind {
        v1::VmKind::Qemu
    }

    fn memory(&self) -> &dyn GuestMemory {
        &self.image
    }

    /// QEMU's dirty log is not this agent's to read: all memory is hashed
    /// again every [`RESCAN`] (every twenty scan durations for a VM whose
    /// scan is slow) while the guest runs here, and at once when asked.
    fn look(&self, state: v1::HostedVmState, force: bool) -> Result<Look, MemoryError> {
        let guest_here = matches!(
            state,
            v1::HostedVmState::Running
                | v1::HostedVmState::MigratingOut
                | v1::HostedVmState::Cloning
        );
        let every = RESCAN.max(*lock(&self.scan_took) * 20);
        Ok(if !guest_here {
            Look::NotDue
        } else if force || state == v1::HostedVmState::Running && self.scanned_before(every) {
            Look::All
        } else {
            Look::NotDue
        })
    }

    fn reset_look(&self) {}

    fn scanned(&self, took: Duration) {
        *lock(&self.scan_took) = took;
        *lock(&self.last_scan) = Some(Instant::now());
    }

    fn exact(&self) -> bool {
        false
    }

    fn set_dirty_rate(&self, _rate: u64) -> Result<(), AgentError> {
        Err(AgentError::BadRequest(
            "a QEMU VM's guest writes as it does: only micro-VMs are paced by the agent".into(),
        ))
    }

    fn migrate_out(
        &self,
        out: Outbound<'_>,
        r: &v1::MigrateRequest,
        progress: &mut dyn FnMut(&Progress),
        hold: Option<&mut dyn Hold>,
    ) -> Result<(v1::MigrateResult, String), AgentError> {
        // QEMU reports nothing the proxy could pass on but its stream.
        progress(&Progress {
            phase: v1::MigratePhase::QemuStream,
            ..Progress::default()
        });
        let res = self.qemu_out(out, r, Instant::now(), hold)?;
        info!("migrated QEMU VM {} to {}", r.vm, r.to);
        Ok((res, r.to.clone()))
    }

    fn clone_out(
        &self,
        out: Outbound<'_>,
        r: &v1::CloneRequest,
        _progress: &mut dyn FnMut(&Progress),
    ) -> Result<v1::CloneResult, AgentError> {
        let res = self.qemu_clone_run(out, r);
        // The source runs on, resumed if QEMU stopped it at the stream's end.
        let t = Instant::now();
        resume_source(self);
        let mut res = res?;
        res.downtime_ms += t.elapsed().as_secs_f64() * 1e3;
        Ok(res)
    }

    /// QEMU's own semantics: a failed migration leaves the source running;
    /// if QEMU had finished sending and stopped, it runs again here.
    fn recover(&self) {
        resume_source(self);
    }

    fn resume(&self) {
        resume_source(self);
    }

    fn receive_stream(
        &self,
        into: Outbound<'_>,
        ch: &mut Channel,
        inc: &v1::QemuIncoming,
    ) -> Result<v1::QemuDone, AgentError> {
        self.qemu_in_run(into, ch, inc)
    }
}

/// Makes sure the source QEMU runs: cancels a migration still under way
/// and resumes a guest QEMU stopped after sending everything.
fn resume_source(a: &QemuBackend) {
    let Ok(mut q) = a.qmp() else {
        return;
    };
    match q.migration() {
        Ok((s, _)) if s == "active" || s == "setup" || s == "pre-switchover" => {
            let _ = q.execute("migrate_cancel", json!({}));
        }
        _ => {}
    }
    // Cancelling takes a moment to settle.
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        match q.status().as_deref() {
            Ok("running") => break,
            Ok("postmigrate") | Ok("paused") => {
                let _ = q.execute("cont", json!({}));
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Has QEMU migrate to a Unix socket of ours at `sock` and returns the
/// connection its stream comes on.
fn start_stream(q: &mut Qmp, sock: &Path) -> Result<UnixStream, AgentError> {
    let _ = std::fs::remove_file(sock);
    let listener = UnixListener::bind(sock)
        .map_err(|e| AgentError::Qemu(format!("cannot listen on {}: {e}", sock.display())))?;
    q.execute(
        "migrate",
        json!({ "uri": format!("unix:{}", sock.display()) }),
    )
    .map_err(qemu_err)?;
    listener.set_nonblocking(true).map_err(qemu_err)?;
    let input = accept_within(
        || listener.accept().map(|(s, _)| s),
        Duration::from_secs(10),
        || None,
        || "QEMU did not connect to the migration socket within 10 s".into(),
    )?;
    input.set_nonblocking(false).map_err(qemu_err)?;
    input.set_read_timeout(Some(STALL)).map_err(qemu_err)?;
    Ok(input)
}

/// QEMU's connection on a non-blocking listener (`accept`), polled until
/// `wait` has passed (`late` says why that fails) or `stopped` has a
/// reason.
fn accept_within<S>(
    mut accept: impl FnMut() -> std::io::Result<S>,
    wait: Duration,
    mut stopped: impl FnMut() -> Option<String>,
    late: impl FnOnce() -> String,
) -> Result<S, AgentError> {
    let deadline = Instant::now() + wait;
    loop {
        match accept() {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(why) = stopped() {
                    return Err(AgentError::Qemu(why));
                }
                if Instant::now() > deadline {
                    return Err(AgentError::Qemu(late()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(qemu_err(e)),
        }
    }
}

/// Waits until QEMU's migration has left its running states (at most
/// 10 s) and returns its status and QEMU's account of it.
fn settled_migration(q: &mut Qmp) -> Result<(String, serde_json::Value), AgentError> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, m) = q.migration().map_err(qemu_err)?;
        if s != "active" && s != "setup" && s != "device" || Instant::now() > until {
            return Ok((s, m));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `addr` as a loopback socket address: the libvirt route's ports carry a
/// QEMU stream between QEMU and its own host's agent only.
fn loopback(addr: &str, flag: &str) -> Result<SocketAddr, AgentError> {
    let at: SocketAddr = addr
        .parse()
        .map_err(|_| AgentError::BadRequest(format!("{flag} {addr:?} is not ADDR:PORT")))?;
    if !at.ip().is_loopback() || at.port() == 0 {
        return Err(AgentError::BadRequest(format!(
            "{flag} {addr}: QEMU's stream goes to or from this host only, so give a loopback address and a port (127.0.0.1:49152)"
        )));
    }
    Ok(at)
}

/// Waits on `l` for QEMU's migration stream (libvirt starts it) for at
/// most `wait`, or until the operator stops the migration.
fn accept_qemu<'h>(
    l: &TcpListener,
    wait: Duration,
    mut hold: Option<&mut (dyn pagecast_migrate::Hold + 'h)>,
) -> Result<TcpStream, AgentError> {
    l.set_nonblocking(true).map_err(qemu_err)?;
    let at = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let s = accept_within(
        || l.accept().map(|(s, _)| s),
        wait,
        || {
            hold.as_deref_mut()
                .and_then(|h| h.cancelled())
                .map(|why| format!("the migration was stopped before QEMU connected: {why}"))
        },
        || {
            format!(
                "QEMU did not migrate to tcp:{at} within {wait:?} (start it with virsh migrate --migrateuri tcp:{at})"
            )
        },
    )?;
    s.set_nonblocking(false).map_err(qemu_err)?;
    s.set_read_timeout(Some(STALL)).map_err(qemu_err)?;
    Ok(s)
}

/// Refuses a migration stream the proxy cannot carry, naming the
/// capability to turn off.
fn check_capabilities(q: &mut Qmp, name: &str) -> Result<(), AgentError> {
    let caps = q.capabilities().map_err(qemu_err)?;
    if let Some((cap, why)) = pagecast_qemu::refused_capability(&caps) {
        return Err(AgentError::BadRequest(format!(
            "QEMU VM {name} has migration capability {cap:?} on, which {why}; pagecast cannot carry that stream: turn it off (migrate-set-capabilities {cap} false) and migrate again"
        )));
    }
    Ok(())
}

fn qemu_err(e: impl std::fmt::Display) -> AgentError {
    AgentError::Qemu(e.to_string())
}

impl Agent {
    /// Takes on a running QEMU VM (or, with `incoming`, one waiting for a
    /// migration).
    pub fn vm_adopt(&self, r: &v1::VmAdoptRequest) -> Result<v1::VmInfo, AgentError> {
        if !pagecast_proto::name_ok(&r.name) {
            return Err(AgentError::BadName(r.name.clone()));
        }
        let key = self.domain_key(&r.domain)?;
        let image = ImageFile::open(&r.memory_file).map_err(|e| {
            AgentError::BadRequest(format!(
                "--memory-file {}: {e} (start QEMU with -object memory-backend-file,...,mem-path=FILE,share=on)",
                r.memory_file
            ))
        })?;
        let mut q = Qmp::connect(Path::new(&r.qmp))
            .map_err(|e| AgentError::BadRequest(format!("--qmp {}: {e}", r.qmp)))?;
        let status = q.status().map_err(qemu_err)?;
        if r.incoming != (status == "inmigrate") {
            return Err(AgentError::BadRequest(if r.incoming {
                format!(
                    "--incoming: QEMU at {} is {status:?}, not waiting for a migration (start it with -incoming defer)",
                    r.qmp
                )
            } else {
                format!(
                    "QEMU at {} waits for a migration (-incoming): adopt it with --incoming",
                    r.qmp
                )
            }));
        }
        let pages = image.page_count();
        let vm = Arc::new(Hosted::new(
            &r.name,
            format!("qemu {}", r.memory_file),
            (&r.domain, key),
            if r.incoming {
                v1::HostedVmState::Incoming
            } else {
                v1::HostedVmState::Running
            },
            Box::new(QemuBackend {
                qmp: PathBuf::from(&r.qmp),
                image,
                last_scan: Mutex::new(None),
                scan_took: Mutex::new(Duration::ZERO),
            }),
        ));
        let info = vm.info();
        if r.incoming {
            // Nothing to hash until its stream arrives.
            self.arrived(&vm)?;
        } else {
            self.register(vm)?;
        }
        info!(
            "adopted QEMU VM {} ({}, {} MiB, {status})",
            r.name,
            r.qmp,
            pages >> 8
        );
        Ok(info)
    }

    /// Receives a QEMU VM's migration stream for the adopted incoming VM
    /// of the same name (or, on the libvirt route, for a QEMU this agent
    /// has not adopted) and feeds it to that QEMU.
    pub fn qemu_migrate_in(&self, mut ch: Channel, inc: &v1::QemuIncoming) {
        let res = self.qemu_in(&mut ch, inc);
        let body = match res {
            Ok(done) => v1::qemu_frame::Body::Done(done),
            Err(e) => {
                warn!("incoming QEMU migration of {} failed: {e}", inc.vm);
                v1::qemu_frame::Body::Done(v1::QemuDone {
                    ok: false,
                    error: Some(e.refusal()),
                    ..v1::QemuDone::default()
                })
            }
        };
        let _ = ch.send(&frame(body));
    }

    fn qemu_in(
        &self,
        ch: &mut Channel,
        inc: &v1::QemuIncoming,
    ) -> Result<v1::QemuDone, AgentError> {
        if !inc.connect.is_empty() {
            return self.qemu_in_route(ch, inc);
        }
        let vm = self.hosted(&inc.vm).map_err(|_| {
            AgentError::BadRequest(format!(
                "no QEMU VM {:?} waits here: start QEMU with -incoming defer and adopt it with `pagecast vm adopt --incoming --name {}`",
                inc.vm, inc.vm
            ))
        })?;
        vm.change(v1::HostedVmState::Incoming, v1::HostedVmState::MigratingIn)?;
        let into = Outbound {
            agent: self,
            vm: &vm,
        };
        let res = vm.backend.receive_stream(into, ch, inc);
        if res.as_ref().is_ok_and(|d| d.ok) {
            vm.set_state(v1::HostedVmState::Running);
            self.index(&vm);
        } else {
            vm.set_state(v1::HostedVmState::Incoming);
        }
        res
    }

    /// Sets aside hash-checked copies of the offered contents this host
    /// holds (under `key`) and tells the source which.
    fn set_aside(
        &self,
        ch: &mut Channel,
        offer: &[PageHash],
        key: ContentKey,
    ) -> Result<(Stash, Vec<u8>), AgentError> {
        let mut stash = Stash::new();
        let mut bits = vec![0u8; offer.len().div_ceil(8)];
        let mut page: Page = [0; PAGE];
        for (i, h) in offer.iter().enumerate() {
            if self.copy_any(h, &mut page) == Some(key) {
                stash.insert(*h, Box::new(page));
                bits[i / 8] |= 1 << (i % 8);
            }
        }
        ch.send(&frame(v1::qemu_frame::Body::Held(v1::QemuHeld {
            bits: bits.clone().into(),
            count: stash.len() as u64,
        })))?;
        Ok((stash, bits))
    }

    /// The libvirt route's destination: a QEMU this agent has not adopted
    /// listens on `inc.connect` (libvirt started it with `-incoming tcp:`);
    /// the stream is rebuilt into it with the pages this host holds. QEMU
    /// here is libvirt's to watch: the stream ending is this side's end.
    fn qemu_in_route(
        &self,
        ch: &mut Channel,
        inc: &v1::QemuIncoming,
    ) -> Result<v1::QemuDone, AgentError> {
        let at = loopback(&inc.connect, "the destination QEMU's address")?;
        if !inc.job.is_empty() {
            return Err(AgentError::BadRequest(
                "a QEMU VM migrated by libvirt moves on its own, not in a gang job".into(),
            ));
        }
        let domain = pagecast_pages::domain::normalize(&inc.domain);
        let key = self.domain_key(domain)?;
        if inc.domain_check[..] != key.check().to_be_bytes()[..] {
            return Err(AgentError::BadRequest(format!(
                "VM {} is in domain {domain:?}, whose key differs here: the two hosts hold different domain secrets",
                inc.vm
            )));
        }
        ch.set_read_timeout(Some(STALL))?;
        let offer = receive_offer(ch, MAX_ROUTE_OFFER)?;
        let (stash, _) = self.set_aside(ch, &offer, key)?;
        // The first part comes once the source QEMU has connected, by
        // when libvirt's QEMU here listens.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = loop {
            match TcpStream::connect_timeout(&at, Duration::from_secs(2)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(AgentError::Qemu(format!(
                        "cannot reach the destination QEMU on tcp:{at}: {e} (is it listening, -incoming tcp:{at}?)"
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        out.set_write_timeout(Some(STALL)).map_err(qemu_err)?;
        let (bytes, local) = feed(ch, &mut out, &stash)?;
        let _ = out.shutdown(std::net::Shutdown::Write);
        // QEMU closes its end once it has loaded the stream (or exits if
        // it refused it).
        let _ = out.set_read_timeout(Some(Duration::from_secs(10)));
        let mut sink = [0u8; 64];
        while matches!(out.read(&mut sink), Ok(n) if n > 0) {}
        info!(
            "QEMU VM {} handed to the QEMU on tcp:{at}: {bytes} stream bytes, {local} pages from this host",
            inc.vm
        );
        Ok(v1::QemuDone {
            ok: true,
            error: None,
            pages_local: local,
            stream_bytes: bytes,
        })
    }
}

impl QemuBackend {
    fn qemu_out(
        &self,
        out: Outbound<'_>,
        r: &v1::MigrateRequest,
        started: Instant,
        hold: Option<&mut dyn pagecast_migrate::Hold>,
    ) -> Result<v1::MigrateResult, AgentError> {
        let (agent, a) = (out.agent, out.vm);
        // The libvirt route: someone else starts QEMU's migration towards
        // a loopback port of ours, and the destination's QEMU listens on
        // one of its host.
        let route = if r.qemu_listen.is_empty() {
            None
        } else {
            if r.hold {
                return Err(AgentError::BadRequest(
                    "a QEMU VM migrated by libvirt (--qemu-listen) moves on its own, not in a gang job".into(),
                ));
            }
            let at = loopback(&r.qemu_listen, "--qemu-listen")?;
            loopback(&r.qemu_connect, "--qemu-connect")?;
            let l = TcpListener::bind(at).map_err(|source| AgentError::Bind {
                addr: at.to_string(),
                source,
            })?;
            Some(l)
        };
        let mut q = self.qmp()?;
        check_capabilities(&mut q, &a.name)?;
        // What it holds: the last scan if it is recent (every page is
        // hashed again as it streams, so a content changed since only
        // travels whole), else a fresh one.
        if self.scanned_before(RESCAN) {
            agent.current_hashes(a);
        }
        let mut offer: Vec<PageHash> = lock(&a.seen)
            .iter()
            .filter(|h| !h.is_zero_page())
            .copied()
            .collect();
        offer.sort_unstable();
        offer.dedup();

        let job = if r.hold { r.job.as_str() } else { "" };
        let (mut ch, mut held, mut sent) = self.offer_to(
            out,
            &r.to,
            &a.name,
            job,
            &r.qemu_connect,
            &offer,
            "receive a migrated QEMU VM",
        )?;
        let dest = ch.peer_name().to_owned();
        let mut hold = hold;
        if r.hold
            && let Some(hold) = hold.as_deref_mut()
        {
            // A gang job: the coordinator learns what the destination
            // lacks, has the job's casts and fetches bring it, then says go.
            let needs: Vec<PageHash> = offer
                .iter()
                .filter(|h| !held.contains(h))
                .copied()
                .collect();
            hold.needs(&needs, held.len() as u64)
                .map_err(|e| AgentError::Qemu(format!("telling the coordinator: {e}")))?;
            loop {
                match hold.poll() {
                    pagecast_migrate::HoldPoll::Go => break,
                    pagecast_migrate::HoldPoll::Abort(why) => {
                        return Err(AgentError::Qemu(format!(
                            "the gang job stopped before the migration: {why}"
                        )));
                    }
                    pagecast_migrate::HoldPoll::Wait => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            sent += send(
                &mut ch,
                &frame(v1::qemu_frame::Body::Recheck(v1::QemuRecheck {})),
            )?;
            held = held_set(&mut ch, &dest, &offer)?;
        }
        info!(
            "migrating QEMU VM {} to {dest}: it holds {} of {} distinct contents ({:.0} ms to find out)",
            a.name,
            held.len(),
            offer.len(),
            started.elapsed().as_secs_f64() * 1e3
        );

        // QEMU migrates to a socket of ours: one we name, or, on the
        // libvirt route, the port libvirt names (QMP is let go meanwhile:
        // QEMU serves one client at a time).
        let mut _cleanup = None;
        let input: Box<dyn Read> = match &route {
            None => {
                let sock = socket_path(agent, &a.name, "out");
                _cleanup = Some(RemoveOnDrop(sock.clone()));
                Box::new(start_stream(&mut q, &sock)?)
            }
            Some(l) => {
                drop(q);
                let wait = Duration::from_secs(match r.qemu_wait_s {
                    0 => 300,
                    s => u64::from(s),
                });
                info!(
                    "QEMU VM {}: waiting up to {wait:?} for its QEMU to migrate to tcp:{}",
                    a.name, r.qemu_listen
                );
                let s = accept_qemu(l, wait, hold.as_deref_mut())?;
                // Whoever started it set QEMU's capabilities just before.
                q = self.qmp()?;
                check_capabilities(&mut q, &a.name)?;
                Box::new(s)
            }
        };
        // Parsing QEMU's stream and sending its parts overlap: a thread
        // sends while QEMU goes on writing (a few parts in flight).
        let (tx, rx) = std::sync::mpsc::sync_channel::<v1::QemuStreamPart>(PARTS_IN_FLIGHT);
        let mut input = std::io::BufReader::with_capacity(256 << 10, input);
        let (st, flushed, pages_held, link) = std::thread::scope(|scope| {
            let chan = &mut ch;
            let sender = scope.spawn(move || -> (u64, Option<AgentError>) {
                let mut n = 0;
                for p in rx {
                    match send(chan, &frame(v1::qemu_frame::Body::Part(p))) {
                        Ok(b) => n += b,
                        Err(e) => return (n, Some(e)),
                    }
                }
                (n, None)
            });
            let mut sink = PartSink {
                tx,
                hold,
                key: a.key,
                held: &held,
                data: Vec::with_capacity(PART_BYTES + PAGE),
                held_at: Vec::new(),
                held_hashes: Vec::new(),
                pages_held: 0,
            };
            let st = pagecast_qemu::proxy(&mut input, &mut sink);
            let flushed = if st.is_ok() { sink.flush(true) } else { Ok(()) };
            let pages_held = sink.pages_held;
            drop(sink);
            let link = sender.join().unwrap_or((0, None));
            (st, flushed, pages_held, link)
        });
        sent += link.0;
        let st = match st {
            Ok(st) => st,
            Err(e @ StreamError::Unsupported { .. }) => {
                return Err(AgentError::BadRequest(e.to_string()));
            }
            Err(StreamError::Stopped(why)) => {
                return Err(AgentError::Migration(
                    pagecast_migrate::MigrationError::Cancelled(format!(
                        "{why}; the VM runs on here"
                    )),
                ));
            }
            Err(e @ StreamError::Sink(_)) => {
                // The destination hung up: its reason, if it gave one.
                let _ = ch.set_read_timeout(Some(Duration::from_secs(2)));
                return Err(match recv(&mut ch) {
                    Ok(v1::qemu_frame::Body::Done(d)) if !d.ok => AgentError::Qemu(format!(
                        "the destination {dest} stopped the migration: {}",
                        pagecast_proto::refusal_text(&d.error)
                    )),
                    _ => match link.1 {
                        Some(l) => AgentError::Qemu(format!("sending to the destination: {l}")),
                        None => AgentError::Qemu(e.to_string()),
                    },
                });
            }
            Err(e) => return Err(AgentError::Qemu(e.to_string())),
        };
        if let Some(e) = link.1 {
            return Err(e);
        }
        flushed?;
        drop(input);
        let done = match recv(&mut ch)? {
            v1::qemu_frame::Body::Done(d) => d,
            v1::qemu_frame::Body::Error(e) => {
                return Err(AgentError::Remote {
                    addr: dest,
                    code: v1::RefusalCode::try_from(e.code).unwrap_or(v1::RefusalCode::Internal),
                    message: e.message,
                });
            }
            other => return Err(unexpected(&dest, &other)),
        };
        // QEMU's own account: completed, with its downtime.
        let (status, m) = settled_migration(&mut q)?;
        let out = v1::MigrateResult {
            ok: done.ok && status == "completed",
            error: if !done.ok {
                Some(pagecast_proto::refusal(
                    done.error
                        .as_ref()
                        .map_or(v1::RefusalCode::Internal, |e| e.kind()),
                    format!(
                        "the destination's QEMU did not take the stream: {}",
                        pagecast_proto::refusal_text(&done.error)
                    ),
                ))
            } else if status != "completed" {
                Some(pagecast_proto::refusal(
                    v1::RefusalCode::Internal,
                    format!("the source QEMU says the migration is {status}"),
                ))
            } else {
                None
            },
            pages_local: pages_held,
            contents_local: held.len() as u64,
            kind: v1::VmKind::Qemu as i32,
            bytes_sent: sent,
            pages_sent: st.pages - pages_held,
            nonzero_pages: st.pages,
            downtime_ms: m["downtime"].as_f64().unwrap_or(0.0),
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            verified: false,
            ..v1::MigrateResult::default()
        };
        info!(
            "QEMU stream of {}: {} bytes, {} pages ({} sent as hashes), {} zero pages; {} bytes to {dest}; {:.0} ms in all",
            a.name,
            st.bytes,
            st.pages,
            pages_held,
            st.zero_pages,
            sent,
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(out)
    }

    fn qemu_clone_run(
        &self,
        out: Outbound<'_>,
        r: &v1::CloneRequest,
    ) -> Result<v1::CloneResult, AgentError> {
        let (agent, a) = (out.agent, out.vm);
        if r.targets.is_empty() {
            return Err(AgentError::BadRequest(
                "a clone needs at least one target".into(),
            ));
        }
        let started = Instant::now();
        let mut q = self.qmp()?;
        check_capabilities(&mut q, &a.name)?;
        agent.current_hashes(a);
        let mut frame_of: HashMap<PageHash, u64> = HashMap::new();
        for (f, h) in lock(&a.seen).iter().enumerate() {
            if !h.is_zero_page() {
                frame_of.entry(*h).or_insert(f as u64);
            }
        }
        let mut offer: Vec<PageHash> = frame_of.keys().copied().collect();
        offer.sort_unstable();
        let job = if r.job.is_empty() {
            format!("clone-{}", a.name)
        } else {
            r.job.clone()
        };

        // Every target: its channel, what it holds, how it ends.
        struct Target {
            name: String,
            ch: Option<Channel>,
            peer: String,
            held: HashSet<PageHash>,
            error: String,
        }
        impl FanTarget for Target {
            fn channel(&mut self) -> Option<&mut Channel> {
                self.ch.as_mut()
            }
            fn holds(&self, h: &PageHash) -> bool {
                self.held.contains(h)
            }
            fn fail(&mut self, why: String) {
                self.error = why;
            }
        }
        let mut sent = 0u64;
        let mut targets: Vec<Target> = Vec::new();
        for t in &r.targets {
            let mut x = Target {
                name: t.name.clone(),
                ch: None,
                peer: t.addr.clone(),
                held: HashSet::new(),
                error: String::new(),
            };
            let opened = self.offer_to(
                out,
                &t.addr,
                &t.name,
                &job,
                "",
                &offer,
                "receive a cloned QEMU VM",
            );
            match opened {
                Ok((ch, held, n)) => {
                    x.peer = ch.peer_name().to_owned();
                    x.ch = Some(ch);
                    x.held = held;
                    sent += n;
                }
                Err(e) => x.error = e.to_string(),
            }
            targets.push(x);
        }
        let live: Vec<usize> = (0..targets.len())
            .filter(|&i| targets[i].ch.is_some())
            .collect();
        if live.is_empty() {
            return Err(AgentError::Qemu(format!(
                "no target could be reached: {}",
                targets
                    .iter()
                    .map(|t| format!("{}: {}", t.name, t.error))
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }

        // One cast of every content some live target lacks, each page to
        // the targets lacking it.
        let mut frames = Vec::new();
        let mut members = Vec::new();
        for h in &offer {
            let m: Vec<usize> = live
                .iter()
                .enumerate()
                .filter(|(_, ti)| !targets[**ti].held.contains(h))
                .map(|(k, _)| k)
                .collect();
            if !m.is_empty() {
                frames.push(frame_of[h]);
                members.push(m);
            }
        }
        let mut cast_bytes = 0;
        if !frames.is_empty() {
            let receivers: Vec<String> = live.iter().map(|&i| targets[i].peer.clone()).collect();
            let mut caster = crate::job::AgentCaster {
                agent,
                vm: &self.image,
                key: a.key,
                rate_bps: (r.bandwidth_bps > 0).then_some(r.bandwidth_bps),
                job: job.clone(),
                casts: 0,
            };
            let mut invite =
                |k: usize, control: &str| -> Result<(), pagecast_migrate::MigrationError> {
                    let ch = targets[live[k]].ch.as_mut().expect("live");
                    ch.send(&frame(v1::qemu_frame::Body::Join(v1::QemuJoin {
                        control: control.to_owned(),
                    })))
                    .map_err(pagecast_migrate::MigrationError::Link)
                };
            match pagecast_migrate::Caster::cast(
                &mut caster,
                &frames,
                &members,
                false,
                &receivers,
                &mut invite,
            ) {
                Ok(o) => cast_bytes = o.bytes,
                // Its pages then travel in the stream.
                Err(e) => warn!("the clone's cast of {} failed: {e}", a.name),
            }
        }
        for &i in &live {
            let t = &mut targets[i];
            let ch = t.ch.as_mut().expect("live");
            let again = send(
                ch,
                &frame(v1::qemu_frame::Body::Recheck(v1::QemuRecheck {})),
            )
            .and_then(|n| Ok((n, held_set(ch, &t.peer, &offer)?)));
            match again {
                Ok((n, held)) => {
                    sent += n;
                    t.held = held;
                }
                Err(e) => {
                    t.error = e.to_string();
                    t.ch = None;
                }
            }
        }

        // QEMU's stream, to every target at once.
        let sock = socket_path(agent, &a.name, "clone");
        let _cleanup = RemoveOnDrop(sock.clone());
        let input = start_stream(&mut q, &sock)?;
        let mut input = std::io::BufReader::with_capacity(256 << 10, input);
        let mut outs: Vec<(usize, PartSinkState)> = targets
            .iter()
            .enumerate()
            .filter(|(_, t)| t.ch.is_some())
            .map(|(i, _)| (i, PartSinkState::default()))
            .collect();
        let mut fan = FanSink {
            key: a.key,
            targets: &mut targets,
            outs: &mut outs,
        };
        let st = pagecast_qemu::proxy(&mut input, &mut fan).map_err(|e| match e {
            StreamError::Unsupported { .. } => AgentError::BadRequest(e.to_string()),
            other => AgentError::Qemu(other.to_string()),
        })?;
        fan.finish();
        drop(input);
        for (i, o) in &outs {
            sent += o.sent;
            let t = &mut targets[*i];
            let Some(ch) = t.ch.as_mut() else { continue };
            match recv(ch) {
                Ok(v1::qemu_frame::Body::Done(d)) if d.ok => {}
                Ok(v1::qemu_frame::Body::Done(d)) => {
                    t.error = pagecast_proto::refusal_text(&d.error).to_owned()
                }
                Ok(other) => t.error = unexpected(&t.peer, &other).to_string(),
                Err(e) => t.error = e.to_string(),
            }
        }
        let (status, m) = settled_migration(&mut q)?;
        drop(q);
        let clones: Vec<v1::CloneOne> = targets
            .iter()
            .map(|t| v1::CloneOne {
                name: t.name.clone(),
                host: t.peer.clone(),
                ok: t.error.is_empty() && t.ch.is_some() && status == "completed",
                verified: false,
                error: if status != "completed" && t.error.is_empty() {
                    Some(pagecast_proto::refusal(
                        v1::RefusalCode::Internal,
                        format!("the source QEMU says the migration is {status}"),
                    ))
                } else if t.error.is_empty() {
                    None
                } else {
                    Some(pagecast_proto::refusal(
                        v1::RefusalCode::Unavailable,
                        t.error.clone(),
                    ))
                },
            })
            .collect();
        info!(
            "cloned QEMU VM {} to {} target(s): stream of {} bytes, {} pages; {} bytes cast, {} bytes in all",
            a.name,
            clones.iter().filter(|c| c.ok).count(),
            st.bytes,
            st.pages,
            cast_bytes,
            sent + cast_bytes
        );
        let ok = clones.iter().all(|c| c.ok);
        Ok(v1::CloneResult {
            ok,
            error: (!ok).then(|| {
                pagecast_proto::refusal(v1::RefusalCode::Unavailable, "some clones failed")
            }),
            bytes_sent: sent + cast_bytes,
            bytes_cast: cast_bytes,
            downtime_ms: m["downtime"].as_f64().unwrap_or(0.0),
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            rounds: 0,
            clones,
        })
    }

    /// Receives a clone's cast into a landing slot.
    fn join_qemu_cast(
        agent: &Agent,
        slot: &Arc<pagecast_migrate::IncomingSlot>,
        control: &str,
    ) -> Result<u64, String> {
        let control: std::net::SocketAddr = control
            .parse()
            .map_err(|_| format!("bad cast address {control:?}"))?;
        let mut cfg =
            pagecast_multicast::ReceiverConfig::new(control, agent.cast_iface(), agent.name());
        cfg.silent_after = Duration::from_secs(10);
        cfg.content_keys = vec![*slot.key()];
        let mut sink = crate::job::SlotSink::new(vec![slot.clone()]);
        pagecast_multicast::receive(&cfg, agent.tls(), &mut sink, &|_, _| {})
            .map_err(|e| e.to_string())?;
        Ok(sink.filled)
    }

    /// Opens a QEMU migration of adopted VM `a` to the agent at `to`, into
    /// its waiting QEMU `vm` (in gang job `job`, "" for none), and offers
    /// it `offer`: the channel, the offered contents it holds, the bytes
    /// sent.
    #[allow(clippy::too_many_arguments)]
    fn offer_to(
        &self,
        out: Outbound<'_>,
        to: &str,
        vm: &str,
        job: &str,
        connect: &str,
        offer: &[PageHash],
        what: &str,
    ) -> Result<(Channel, HashSet<PageHash>, u64), AgentError> {
        let (agent, a) = (out.agent, out.vm);
        let mut ch = agent.connect_host(to, what)?;
        let peer = ch.peer_name().to_owned();
        ch.send(&v1::AgentRequest {
            body: Some(v1::agent_request::Body::QemuIncoming(v1::QemuIncoming {
                source: agent.name().to_owned(),
                vm: vm.to_owned(),
                domain: a.domain.clone(),
                domain_check: a.key.check().to_be_bytes().to_vec().into(),
                job: job.to_owned(),
                connect: connect.to_owned(),
            })),
        })?;
        ch.set_read_timeout(Some(STALL))?;
        let mut sent = 0;
        let mut chunks = offer.chunks(OFFER_PART).peekable();
        loop {
            let c = chunks.next().unwrap_or(&[]);
            let last = chunks.peek().is_none();
            let f = frame(v1::qemu_frame::Body::Offer(v1::QemuOffer {
                hashes: pagecast_pages::packed::pack(c).into(),
                last,
            }));
            sent += send(&mut ch, &f)?;
            if last {
                break;
            }
        }
        let held = held_set(&mut ch, &peer, offer)?;
        Ok((ch, held, sent))
    }

    fn qemu_in_run(
        &self,
        into: Outbound<'_>,
        ch: &mut Channel,
        inc: &v1::QemuIncoming,
    ) -> Result<v1::QemuDone, AgentError> {
        let (agent, a) = (into.agent, into.vm);
        if pagecast_pages::domain::normalize(&inc.domain) != a.domain
            || inc.domain_check[..] != a.key.check().to_be_bytes()[..]
        {
            return Err(AgentError::BadRequest(format!(
                "VM {} is in domain {:?} at the source and {:?} here, or the two hosts hold different domain secrets",
                inc.vm, inc.domain, a.domain
            )));
        }
        ch.set_read_timeout(Some(STALL))?;
        let peer = ch.peer_name().to_owned();
        // The offer, and what of it this host sets aside.
        let offer = receive_offer(ch, self.image.page_count() as usize)?;
        let (mut stash, mut bits) = agent.set_aside(ch, &offer, a.key)?;
        let mut page: Page = [0; PAGE];
        // In a gang job, the job's casts and fetches bring what it lacks
        // into a landing slot until the source asks again.
        if !inc.job.is_empty() {
            let lacking: Vec<PageHash> = offer
                .iter()
                .enumerate()
                .filter(|(i, _)| bits[i / 8] & (1 << (i % 8)) == 0)
                .map(|(_, h)| *h)
                .collect();
            let slot = Arc::new(
                pagecast_migrate::IncomingSlot::landing(&a.name, (&a.domain, a.key), &lacking)
                    .map_err(|e| AgentError::Qemu(format!("a landing slot: {e}")))?,
            );
            agent.jobs().open_slot(&inc.job, &slot);
            let _close = CloseSlot(agent, inc.job.clone(), slot.clone());
            // The whole job's transfers run before the go: wait long.
            ch.set_read_timeout(Some(Duration::from_secs(600)))?;
            let mut next = recv(ch)?;
            while let v1::qemu_frame::Body::Join(j) = &next {
                // A clone's cast: receive it into the landing slot.
                let filled = Self::join_qemu_cast(agent, &slot, &j.control);
                if let Err(e) = filled {
                    warn!(
                        "QEMU VM {}: the clone's cast failed here ({e}); its pages come in the stream",
                        a.name
                    );
                }
                next = recv(ch)?;
            }
            match next {
                v1::qemu_frame::Body::Recheck(_) => {
                    for (i, h) in offer.iter().enumerate() {
                        if bits[i / 8] & (1 << (i % 8)) == 0 && slot.copy(h, &mut page) {
                            stash.insert(*h, Box::new(page));
                            bits[i / 8] |= 1 << (i % 8);
                        }
                    }
                    ch.send(&frame(v1::qemu_frame::Body::Held(v1::QemuHeld {
                        bits: bits.into(),
                        count: stash.len() as u64,
                    })))?;
                }
                other => return Err(unexpected(&peer, &other)),
            }
            ch.set_read_timeout(Some(STALL))?;
        }

        // The waiting QEMU listens on a socket of ours.
        let sock = socket_path(agent, &a.name, "in");
        let _ = std::fs::remove_file(&sock);
        let _cleanup = RemoveOnDrop(sock.clone());
        let mut q = self.qmp()?;
        q.execute(
            "migrate-incoming",
            json!({ "uri": format!("unix:{}", sock.display()) }),
        )
        .map_err(qemu_err)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = loop {
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(AgentError::Qemu(format!(
                        "cannot reach QEMU's incoming socket {}: {e}",
                        sock.display()
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        out.set_write_timeout(Some(STALL)).map_err(qemu_err)?;
        let (bytes, local) = feed(ch, &mut out, &stash)?;
        let _ = out.shutdown(std::net::Shutdown::Write);
        // QEMU loads the devices and resumes the guest.
        let until = Instant::now() + STALL;
        loop {
            let (m, _) = q.migration().map_err(qemu_err)?;
            let status = q.status().map_err(qemu_err)?;
            if m == "failed" {
                return Err(AgentError::Qemu(
                    "the destination QEMU refused the migration stream (see its log)".into(),
                ));
            }
            if status == "running" || (m == "completed" && status == "paused") {
                break;
            }
            if Instant::now() > until {
                return Err(AgentError::Qemu(format!(
                    "the destination QEMU is still {status} (migration {m}) 60 s after the stream ended"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        info!(
            "QEMU VM {} arrived: {bytes} stream bytes, {local} pages from this host",
            a.name
        );
        Ok(v1::QemuDone {
            ok: true,
            error: None,
            pages_local: local,
            stream_bytes: bytes,
        })
    }
}

/// Reads the source's offer of distinct contents (at most `most`).
fn receive_offer(ch: &mut Channel, most: usize) -> Result<Vec<PageHash>, AgentError> {
    let peer = ch.peer_name().to_owned();
    let mut offer: Vec<PageHash> = Vec::new();
    loop {
        let o = match recv(ch)? {
            v1::qemu_frame::Body::Offer(o) => o,
            other => return Err(unexpected(&peer, &other)),
        };
        if o.hashes.len() % 32 != 0 || offer.len() + o.hashes.len() / 32 > most {
            return Err(AgentError::BadRequest(format!(
                "an offer of more contents than the VM has pages ({most})"
            )));
        }
        offer.extend(
            o.hashes
                .chunks_exact(32)
                .map(|h| PageHash::try_from(h).expect("32 bytes")),
        );
        if o.last {
            return Ok(offer);
        }
    }
}

/// Feeds the source's stream parts into `out`, the pages sent as hashes
/// from `stash`; returns the stream's bytes and the pages from here.
/// Receiving and writing overlap: a thread writes to QEMU while the next
/// parts arrive.
fn feed(
    ch: &mut Channel,
    out: &mut (dyn Write + Send),
    stash: &Stash,
) -> Result<(u64, u64), AgentError> {
    let peer = ch.peer_name().to_owned();
    let (tx, rx) = std::sync::mpsc::sync_channel::<v1::QemuStreamPart>(PARTS_IN_FLIGHT);
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<(u64, u64), AgentError> {
            let mut bytes = 0u64;
            let mut local = 0u64;
            for p in rx {
                let mut at = 0usize;
                for (i, &pos) in p.held_at.iter().enumerate() {
                    let pos = pos as usize;
                    if pos < at || pos > p.data.len() {
                        return Err(AgentError::BadRequest(
                            "a stream part with pages out of order".into(),
                        ));
                    }
                    let h = PageHash::try_from(&p.held[32 * i..32 * i + 32]).expect("32 bytes");
                    let pg = stash.get(&h).ok_or_else(|| {
                        AgentError::BadRequest(
                            "the source named a page this host did not set aside".into(),
                        )
                    })?;
                    write_all(out, &p.data[at..pos])?;
                    write_all(out, &pg[..])?;
                    bytes += (pos - at + PAGE) as u64;
                    at = pos;
                    local += 1;
                }
                write_all(out, &p.data[at..])?;
                bytes += (p.data.len() - at) as u64;
            }
            Ok((bytes, local))
        });
        let mut failed = None;
        loop {
            let p = match recv(ch) {
                Ok(v1::qemu_frame::Body::Part(p)) => p,
                Ok(other) => {
                    failed = Some(unexpected(&peer, &other));
                    break;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            if p.held.len() != 32 * p.held_at.len() || p.data.len() > PART_BYTES + PAGE {
                failed = Some(AgentError::BadRequest("a malformed stream part".into()));
                break;
            }
            let last = p.last;
            // The writer stopped (its error below), or the stream ended.
            if tx.send(p).is_err() || last {
                break;
            }
        }
        drop(tx);
        let wrote = writer
            .join()
            .unwrap_or_else(|_| Err(AgentError::Qemu("the stream writer failed".into())));
        match (wrote, failed) {
            (Err(e), _) | (Ok(_), Some(e)) => Err(e),
            (Ok(x), None) => Ok(x),
        }
    })
}

/// The destination's answer to an offer: the offered contents it holds.
fn held_set(
    ch: &mut Channel,
    dest: &str,
    offer: &[PageHash],
) -> Result<HashSet<PageHash>, AgentError> {
    let held = match recv(ch)? {
        v1::qemu_frame::Body::Held(h) => h,
        other => return Err(unexpected(dest, &other)),
    };
    if held.bits.len() != offer.len().div_ceil(8) {
        return Err(AgentError::Unexpected {
            addr: dest.to_owned(),
            what: "a held-set of the wrong length".into(),
        });
    }
    Ok(offer
        .iter()
        .enumerate()
        .filter(|(i, _)| held.bits[i / 8] & (1 << (i % 8)) != 0)
        .map(|(_, h)| *h)
        .collect())
}

fn write_all(out: &mut dyn Write, b: &[u8]) -> Result<(), AgentError> {
    out.write_all(b)
        .map_err(|e| AgentError::Qemu(format!("writing to the destination QEMU: {e}")))
}

fn frame(body: v1::qemu_frame::Body) -> v1::QemuFrame {
    v1::QemuFrame { body: Some(body) }
}

fn send(ch: &mut Channel, f: &v1::QemuFrame) -> Result<u64, AgentError> {
    use prost::Message;
    ch.send(f)?;
    Ok(wire_bytes(f.encoded_len()))
}

fn recv(ch: &mut Channel) -> Result<v1::qemu_frame::Body, AgentError> {
    let f: v1::QemuFrame = ch.recv("QEMU migration frame")?;
    f.body
        .ok_or_else(|| AgentError::BadRequest("an empty QEMU migration frame".into()))
}

fn unexpected(peer: &str, b: &v1::qemu_frame::Body) -> AgentError {
    let what = match b {
        v1::qemu_frame::Body::Offer(_) => "an offer",
        v1::qemu_frame::Body::Held(_) => "a held-set",
        v1::qemu_frame::Body::Part(_) => "a stream part",
        v1::qemu_frame::Body::Done(_) => "a result",
        v1::qemu_frame::Body::Recheck(_) => "a recheck",
        v1::qemu_frame::Body::Join(_) => "a cast invitation",
        v1::qemu_frame::Body::Error(e) => {
            return AgentError::Qemu(format!("{peer}: {}", e.message));
        }
    };
    AgentError::Unexpected {
        addr: peer.to_owned(),
        what: format!("{what} out of turn"),
    }
}

/// A socket path for VM `name`'s migration (`dir`: in or out), in the
/// agent's data directory or the temporary directory.
fn socket_path(agent: &Agent, name: &str, dir: &str) -> PathBuf {
    let base = agent.data.clone().unwrap_or_else(std::env::temp_dir);
    base.join(format!("qemu-{name}-{dir}-{}.sock", std::process::id()))
}

/// Closes a landing slot (no cast may write it any more) when dropped.
struct CloseSlot<'a>(&'a Agent, String, Arc<pagecast_migrate::IncomingSlot>);
impl Drop for CloseSlot<'_> {
    fn drop(&mut self) {
        self.0.jobs().close_slot(&self.1, &self.2);
    }
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One clone target's part being built.
#[derive(Default)]
struct PartSinkState {
    data: Vec<u8>,
    held_at: Vec<u32>,
    held: Vec<u8>,
    sent: u64,
    failed: bool,
}

/// The stream to every clone target, each with the pages it holds as
/// hashes. A target whose link fails is dropped; the others go on.
struct FanSink<'a, T> {
    key: ContentKey,
    targets: &'a mut [T],
    outs: &'a mut Vec<(usize, PartSinkState)>,
}

trait FanTarget {
    fn channel(&mut self) -> Option<&mut Channel>;
    fn holds(&self, h: &PageHash) -> bool;
    fn fail(&mut self, why: String);
}

impl<T: FanTarget> FanSink<'_, T> {
    fn flush(&mut self, last: bool) {
        for (i, o) in self.outs.iter_mut() {
            if o.failed {
                continue;
            }
            let p = v1::QemuStreamPart {
                data: std::mem::take(&mut o.data).into(),
                held_at: std::mem::take(&mut o.held_at),
                held: std::mem::take(&mut o.held).into(),
                last,
            };
            let t = &mut self.targets[*i];
            let res = match t.channel() {
                Some(ch) => send(ch, &frame(v1::qemu_frame::Body::Part(p))),
                None => Err(AgentError::Qemu("no link".into())),
            };
            match res {
                Ok(n) => o.sent += n,
                Err(e) => {
                    o.failed = true;
                    t.fail(format!("sending the stream: {e}"));
                }
            }
        }
    }

    fn finish(&mut self) {
        self.flush(true);
    }

    fn full(&mut self) {
        if self
            .outs
            .iter()
            .any(|(_, o)| !o.failed && (o.data.len() >= PART_BYTES || o.held_at.len() >= 4096))
        {
            self.flush(false);
        }
    }
}

impl<T: FanTarget> Sink for FanSink<'_, T> {
    fn raw(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let longest = self
                .outs
                .iter()
                .filter(|(_, o)| !o.failed)
                .map(|(_, o)| o.data.len())
                .max()
                .unwrap_or(0);
            let n = rest.len().min(PART_BYTES.saturating_sub(longest).max(1));
            for (_, o) in self.outs.iter_mut() {
                if !o.failed {
                    o.data.extend_from_slice(&rest[..n]);
                }
            }
            rest = &rest[n..];
            self.full();
        }
        if self.outs.iter().all(|(_, o)| o.failed) {
            return Err(StreamError::Sink("every clone target failed".into()));
        }
        Ok(())
    }

    fn page(&mut self, _block: &str, _offset: u64, page: &[u8; PAGE]) -> Result<(), StreamError> {
        let h = self.key.hash_page(page);
        for (i, o) in self.outs.iter_mut() {
            if o.failed {
                continue;
            }
            if !h.is_zero_page() && self.targets[*i].holds(&h) {
                o.held_at.push(o.data.len() as u32);
                o.held.extend_from_slice(h.as_bytes());
            } else {
                o.data.extend_from_slice(page);
            }
        }
        self.full();
        Ok(())
    }
}

/// Batches the stream into parts, pages the destination set aside as
/// hashes.
struct PartSink<'a, 'h> {
    /// To the thread that sends parts to the destination.
    tx: std::sync::mpsc::SyncSender<v1::QemuStreamPart>,
    /// Asked at every part whether the client stopped the migration
    /// (Ctrl-C, `pagecast cancel`).
    hold: Option<&'a mut (dyn pagecast_migrate::Hold + 'h)>,
    key: ContentKey,
    held: &'a HashSet<PageHash>,
    data: Vec<u8>,
    held_at: Vec<u32>,
    held_hashes: Vec<u8>,
    pages_held: u64,
}

impl PartSink<'_, '_> {
    fn flush(&mut self, last: bool) -> Result<(), AgentError> {
        let p = v1::QemuStreamPart {
            data: std::mem::take(&mut self.data).into(),
            held_at: std::mem::take(&mut self.held_at),
            held: std::mem::take(&mut self.held_hashes).into(),
            last,
        };
        self.tx
            .send(p)
            .map_err(|_| AgentError::Qemu("the link to the destination failed".into()))
    }

    fn full(&mut self) -> Result<(), StreamError> {
        if self.data.len() >= PART_BYTES || self.held_at.len() >= 4096 {
            if let Some(why) = self.hold.as_deref_mut().and_then(|h| h.cancelled()) {
                return Err(StreamError::Stopped(why));
            }
            self.flush(false)
                .map_err(|e| StreamError::Sink(format!("sending to the destination: {e}")))?;
        }
        Ok(())
    }
}

impl Sink for PartSink<'_, '_> {
    fn raw(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = rest
                .len()
                .min(PART_BYTES.saturating_sub(self.data.len()).max(1));
            self.data.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            self.full()?;
        }
        Ok(())
    }

    fn page(&mut self, _block: &str, _offset: u64, page: &[u8; PAGE]) -> Result<(), StreamError> {
        // Nothing held there: no page need be named.
        let h = if self.held.is_empty() {
            PageHash::ZERO_PAGE
        } else {
            self.key.hash_page(page)
        };
        if !h.is_zero_page() && self.held.contains(&h) {
            self.held_at.push(self.data.len() as u32);
            self.held_hashes.extend_from_slice(h.as_bytes());
            self.pages_held += 1;
        } else {
            self.data.extend_from_slice(page);
        }
        self.full()
    }
}
