//! Adopted QEMU VMs: unmodified QEMU guests whose RAM lives in a shared
//! file, migrated by relaying QEMU's own migration stream.
//!
//! The agent maps an adopted VM's memory file read-only and hashes all of
//! it every [`RESCAN`] (longer for VMs whose scan is slow; it cannot see
//! QEMU's dirty log), so its content map and the index's listing of it may
//! be up to that stale; every use of a page is hash-checked, so staleness
//! costs bytes, never correctness.
//!
//! Migration runs on the one engine ([`pagecast_migrate::engine`]) as
//! every VM's does: the manifest (from the last scan), each destination's
//! local fill into scratch frames of the contents it holds, a gang job's
//! hold and casts. Then, instead of the engine's own rounds, the source
//! agent has its QEMU migrate to a local Unix socket and the engine relays
//! the stream ([`pagecast_qemu::stream`]), every RAM page a destination
//! holds as its 32-byte hash; the destination agent rebuilds the exact
//! stream into its QEMU (started with `-incoming defer`, pointed at a local
//! socket with `migrate-incoming`). QEMU keeps its own rounds,
//! auto-converge and downtime limit. On the libvirt route libvirt starts
//! both ends: the source QEMU migrates to a loopback TCP port the source
//! agent listens on, and the destination agent connects to the loopback
//! port where libvirt's destination QEMU (not adopted) listens.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagecast_memory::{DirtyBitmap, GuestMemory, ImageFile, MemoryError, Page, Region};
use pagecast_migrate::{
    Arrival, ChannelLink, Hold, How, IncomingReport, IncomingSlot, MigrateOptions, MigrationError,
    MigrationLink, NoSlotEvents, Progress, Shape, SlotEvents, SourceVm, Started, StreamEnd,
    StreamSource,
};
use pagecast_pages::{ContentKey, PageHash};
use pagecast_proto::v1;
use pagecast_qemu::{PAGE, Qmp};
use serde_json::json;
use tracing::info;

use crate::hosted::{Backend, Hosted, Look, Outbound};
use crate::job::{JobCancel, JobContent, JobSlots};
use crate::sync::lock;
use crate::{Agent, AgentError};

/// How often an adopted VM's memory is hashed again, at most: a VM whose
/// scan takes longer than a twentieth of this is scanned every twenty scan
/// durations instead, so scanning costs at most 5% of the hashing threads.
pub const RESCAN: Duration = Duration::from_secs(5);
/// Largest stream part a destination takes.
const MAX_PART_BYTES: usize = (256 << 10) + PAGE;
/// Longest the relay waits for either QEMU or the peer agent to move.
const STALL: Duration = Duration::from_secs(60);
/// Stream parts queued for the writing thread at a destination.
const PARTS_IN_FLIGHT: usize = 8;

/// An adopted QEMU VM: QEMU runs the guest, this agent reads its RAM file
/// (mapped read-only) and speaks QMP to it.
pub struct QemuBackend {
    qmp: PathBuf,
    image: ImageFile,
    /// The libvirt domain it is, if libvirt runs it here.
    libvirt_domain: Option<String>,
    /// What sets it apart from other guests, as QEMU last said.
    seen: Mutex<Seen>,
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

/// What sets an adopted QEMU VM apart from other guests: its VM generation
/// ID (the `vmgenid` device's GUID, "" without one) and its network cards'
/// MAC addresses.
#[derive(Clone, Debug, Default)]
struct Seen {
    generation_id: String,
    /// (card, MAC), in QEMU's order.
    macs: Vec<(String, String)>,
}

impl Seen {
    /// Asks QEMU; what it cannot say stays empty.
    fn ask(q: &mut Qmp) -> Seen {
        Seen {
            generation_id: q.vm_generation_id().ok().flatten().unwrap_or_default(),
            macs: q.macs().unwrap_or_default(),
        }
    }
}

/// How long a guest has to let go of a network card being replaced.
const UNPLUG_WAIT: Duration = Duration::from_secs(10);
/// Cards replaced at most per clone: their waits fit well inside the 75 s
/// the source gives a destination to say its VM runs.
const MAX_REPLUGS: usize = 4;

/// Gives a clone's network cards back the MACs its QEMU was started with
/// (`started`): QEMU's stream carried the source's, which the guest's
/// driver also holds in its own memory, so changing QEMU's idea of it would
/// not do. Each such card is unplugged (the guest lets go of it: ACPI PCI
/// hotplug) and plugged again, on the same slot and network backend, with
/// its own MAC, and the guest takes it as a new card. A card without an id
/// of its own, or one the guest does not let go of within
/// [`UNPLUG_WAIT`], keeps the source's MAC (the report says so).
fn own_macs(q: &mut Qmp, started: &[(String, String)], vm: &str) {
    let now = q.macs().unwrap_or_default();
    if now
        .iter()
        .all(|(c, m)| started.iter().all(|(sc, sm)| sc != c || sm == m))
    {
        return;
    }
    // A paused guest cannot let go of a card.
    if q.status().ok().as_deref() != Some("running") {
        tracing::warn!(
            "clone {vm}: its guest is not running, so its network cards keep their source's MACs"
        );
        return;
    }
    for (card, mac) in now.into_iter().take(MAX_REPLUGS) {
        let Some((_, own)) = started.iter().find(|(c, _)| *c == card) else {
            continue;
        };
        if *own == mac {
            continue;
        }
        match replug(q, &card, own) {
            Ok(()) => info!(
                "clone {vm}: network card {card} now has its own MAC {own}, not its source's {mac}"
            ),
            Err(why) => tracing::warn!(
                "clone {vm}: network card {card} keeps its source's MAC {mac}: {why}"
            ),
        }
    }
}

/// Unplugs card `id` and plugs it again with MAC `mac`.
fn replug(q: &mut Qmp, id: &str, mac: &str) -> Result<(), String> {
    let path = format!("/machine/peripheral/{id}");
    let get = |q: &mut Qmp, p: &str| -> Result<serde_json::Value, String> {
        q.qom_get(&path, p)
            .map_err(|e| format!("it has no id of its own to replug it by ({e})"))
    };
    let driver = get(q, "type")?;
    let netdev = get(q, "netdev")?;
    let devfn = get(q, "addr")?.as_u64().unwrap_or(0);
    let bus = get(q, "parent_bus")?;
    let (Some(driver), Some(netdev), Some(bus)) = (driver.as_str(), netdev.as_str(), bus.as_str())
    else {
        return Err("QEMU did not say its type, network backend and bus".into());
    };
    // The bus by its id: the last part of its path.
    let bus = bus.rsplit('/').next().unwrap_or(bus).to_owned();
    let (driver, netdev) = (driver.to_owned(), netdev.to_owned());
    q.execute("device_del", json!({ "id": id }))
        .map_err(|e| format!("unplugging it: {e}"))?;
    let gone = q
        .wait_event("DEVICE_DELETED", |d| d["device"] == id, UNPLUG_WAIT)
        .map_err(|e| e.to_string())?;
    if !gone {
        return Err(format!(
            "the guest did not let go of it within {UNPLUG_WAIT:?} (no ACPI PCI hotplug?)"
        ));
    }
    q.execute(
        "device_add",
        json!({
            "driver": driver,
            "id": id,
            "netdev": netdev,
            "mac": mac,
            "bus": bus,
            "addr": format!("{:x}.{:x}", devfn >> 3, devfn & 7),
        }),
    )
    .map_err(|e| format!("LOST: it was unplugged and could not be plugged again: {e}"))?;
    Ok(())
}

impl Backend for QemuBackend {
    fn kind(&self) -> v1::VmKind {
        v1::VmKind::Qemu
    }

    fn status(&self, info: &mut v1::VmInfo) {
        info.libvirt_domain = self.libvirt_domain.clone().unwrap_or_default();
        let seen = lock(&self.seen).clone();
        info.identity = seen.generation_id;
        info.macs = seen.macs.into_iter().map(|(_, mac)| mac).collect();
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
        crate::refuse_postcopy(r.switchover, pagecast_migrate::engine::Mode::Move, false)?;
        let virsh = self.virsh(out.agent, &out.vm.name, r)?;
        let route = route(r, virsh.is_some())?;
        check_capabilities(&mut self.qmp()?, &out.vm.name, route.is_some())?;
        let ch = out
            .agent
            .open_incoming(&r.to, &r.job, "receive a migrated QEMU VM")?;
        let dest = ch.peer_name().to_owned();
        let opts = MigrateOptions {
            job: r.job.clone(),
            connect: r.qemu_connect.clone(),
            ..MigrateOptions::default()
        };
        let src = Outgoing { out, q: self };
        let mut stream = Stream::new(self, out, "out", route);
        stream.virsh = virsh;
        let rep = pagecast_migrate::move_one(
            &src,
            Box::new(ChannelLink::new(ch)),
            &out.agent.fp,
            &opts,
            progress,
            hold,
            How::Stream(&mut stream),
        )?;
        info!(
            "migrated QEMU VM {} to {dest}: {} pages, {} of them sent as hashes, {} bytes",
            out.vm.name, rep.nonzero_pages, rep.pages_local, rep.bytes_sent
        );
        Ok((rep.to_proto(), dest))
    }

    fn clone_out(
        &self,
        out: Outbound<'_>,
        r: &v1::CloneRequest,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<v1::CloneResult, AgentError> {
        crate::refuse_postcopy(r.switchover, pagecast_migrate::engine::Mode::Clone, false)?;
        check_capabilities(&mut self.qmp()?, &out.vm.name, false)?;
        let (targets, failed) = out.agent.clone_targets(r);
        let opts = MigrateOptions {
            bandwidth_bps: (r.bandwidth_bps > 0).then_some(r.bandwidth_bps),
            job: r.job.clone(),
            vm_generation_id: lock(&self.seen).generation_id.clone(),
            ..MigrateOptions::default()
        };
        let src = Outgoing { out, q: self };
        let mut caster = crate::job::AgentCaster {
            agent: out.agent,
            vm: &self.image,
            key: out.vm.key,
            rate_bps: opts.bandwidth_bps,
            job: r.job.clone(),
            casts: 0,
        };
        let mut cancel = JobCancel::new(out.agent.jobs().get(&r.job)?);
        let mut stream = Stream::new(self, out, "clone", None);
        let rep = pagecast_migrate::clone_out(
            &src,
            targets,
            &mut caster,
            &out.agent.fp,
            &opts,
            progress,
            Some(&mut cancel),
            How::Stream(&mut stream),
        );
        // QEMU checks its own stream; no digest travels.
        Ok(crate::clone_result(&rep, failed, false))
    }

    fn resume(&self) {
        resume_source(self);
    }

    fn receive(
        &self,
        into: Outbound<'_>,
        link: &mut dyn MigrationLink,
        begin: &v1::MigrateBegin,
        job: &Arc<crate::jobs::Job>,
    ) -> Result<IncomingReport, AgentError> {
        self.receive_stream(into, link, begin, job)
    }
}

/// An adopted VM on its way out, as the engine reads it: its RAM file and
/// the content map's last scan of it.
struct Outgoing<'a> {
    out: Outbound<'a>,
    q: &'a QemuBackend,
}

impl GuestMemory for Outgoing<'_> {
    fn write_page(&self, frame: u64, data: &Page) -> Result<(), MemoryError> {
        self.q.image.write_page(frame, data)
    }
    fn take_dirty(&self) -> Result<DirtyBitmap, MemoryError> {
        // QEMU's dirty log is QEMU's: its own stream carries what changed.
        Ok(DirtyBitmap::new(self.page_count()))
    }
    fn mark_dirty(&self, _: &DirtyBitmap) -> Result<(), MemoryError> {
        Ok(())
    }
    fn region(&self) -> &Region {
        self.q.image.region()
    }
}

impl SourceVm for Outgoing<'_> {
    fn name(&self) -> &str {
        &self.out.vm.name
    }
    fn origin(&self) -> String {
        self.out.vm.origin.clone()
    }
    fn dirty_rate(&self) -> u64 {
        0
    }
    /// QEMU's own semantics: a failed migration leaves the source running;
    /// if QEMU had finished sending and stopped, it runs again here.
    fn resume(&self) {
        resume_source(self.q);
    }
    fn set_throttle(&self, _pct: u8) {
        // QEMU throttles its own guest (auto-converge).
    }
    /// The last scan if it is recent (every page is hashed again as it
    /// streams, so a content changed since only travels whole), else a
    /// fresh one.
    fn current_hashes(&self) -> Option<Vec<PageHash>> {
        if self.q.scanned_before(RESCAN) {
            return self.out.agent.current_hashes(self.out.vm);
        }
        let seen = lock(&self.out.vm.seen);
        (seen.len() as u64 == self.page_count()).then(|| seen.clone())
    }
    fn domain(&self) -> &str {
        &self.out.vm.domain
    }
    fn content_key(&self) -> ContentKey {
        self.out.vm.key
    }
    fn kind(&self) -> v1::VmKind {
        v1::VmKind::Qemu
    }
}

impl QemuBackend {
    /// Checks that a clone arriving into this waiting QEMU does not share
    /// its source's VM generation ID (`source`, "" if it has no vmgenid):
    /// the guest reseeds its random numbers and resets what it derived from
    /// them only when the ID changes.
    fn distinct_from(&self, source: &str) -> Result<(), AgentError> {
        if source.is_empty() {
            return Ok(());
        }
        let here = lock(&self.seen).generation_id.clone();
        if here.is_empty() {
            return Err(AgentError::BadRequest(
                "the clone's QEMU has no vmgenid device and its source has one: start it with -device vmgenid,guid=auto".into(),
            ));
        }
        if here == source.to_ascii_lowercase() {
            return Err(AgentError::BadRequest(format!(
                "the clone's QEMU has its source's VM generation ID {here}: the clone would not know it is a copy; start it with -device vmgenid,guid=auto"
            )));
        }
        Ok(())
    }

    /// The migration libvirt runs for this agent, if `r` names the
    /// destination's libvirt: checked against this VM and this host.
    fn virsh(
        &self,
        agent: &Agent,
        name: &str,
        r: &v1::MigrateRequest,
    ) -> Result<Option<Virsh>, AgentError> {
        if r.libvirt_to.is_empty() {
            return Ok(None);
        }
        let Some(domain) = &self.libvirt_domain else {
            return Err(AgentError::BadRequest(format!(
                "QEMU VM {name} is no libvirt domain here (adopt it with --libvirt-domain)"
            )));
        };
        let Some(libvirt) = agent.libvirt() else {
            return Err(AgentError::BadRequest(
                "this agent drives no libvirt (start it with --libvirt URI)".into(),
            ));
        };
        let to = libvirt_uri(&r.libvirt_to)?;
        let listen = loopback(&r.qemu_listen, "--qemu-listen")?;
        let connect = loopback(&r.qemu_connect, "the destination QEMU's address")?;
        // libvirt's destination QEMU listens on the port of --migrateuri.
        if listen.port() != connect.port() {
            return Err(AgentError::BadRequest(format!(
                "libvirt's destination QEMU listens on the port its source migrates to: {listen} and {connect} differ"
            )));
        }
        Ok(Some(Virsh {
            local: libvirt.local.clone(),
            domain: domain.clone(),
            to: to.to_owned(),
            migrateuri: format!("tcp:{listen}"),
            listen_address: connect.ip().to_string(),
            child: None,
        }))
    }
}

/// `to` if it is a libvirt URI of a remote QEMU daemon that takes no
/// options: `qemu+tls://`, `qemu+tcp://` or `qemu+ssh://`, then
/// `[USER@]HOST[:PORT]` (letters, digits, `.-_` and an IPv6 address in
/// brackets), then `/system` or `/session`, nothing else. A destination
/// host names this URI, and the source's virsh connects to it: a query
/// string could make virsh run a program of the destination's choosing
/// (`?command=`, `qemu+ext://`), so none is taken.
pub fn libvirt_uri(to: &str) -> Result<&str, AgentError> {
    let bad = || {
        AgentError::BadRequest(format!(
            "{to:?} is not a libvirt URI pagecast uses (qemu+tls://HOST/system, qemu+tcp://, qemu+ssh://USER@HOST/system; no query)"
        ))
    };
    if to.len() > 255 {
        return Err(bad());
    }
    let rest = ["qemu+tls://", "qemu+tcp://", "qemu+ssh://"]
        .iter()
        .find_map(|p| to.strip_prefix(p))
        .ok_or_else(bad)?;
    let (authority, path) = rest.split_once('/').ok_or_else(bad)?;
    if path != "system" && path != "session" {
        return Err(bad());
    }
    let host = match authority.split_once('@') {
        Some((user, host)) if to.starts_with("qemu+ssh://") => {
            let user_ok = !user.is_empty()
                && user
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            if !user_ok {
                return Err(bad());
            }
            host
        }
        Some(_) => return Err(bad()),
        None => authority,
    };
    let host_ok = !host.is_empty()
        && !host.starts_with('-')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_:[]".contains(c));
    if !host_ok {
        return Err(bad());
    }
    Ok(to)
}

/// Most bytes of virsh's error kept for the report.
const VIRSH_SAID: usize = 4096;
/// Longest `virsh migrate` may take once QEMU's stream ended: libvirt's
/// finish and confirm steps.
const VIRSH_WAIT: Duration = Duration::from_secs(90);

/// A live migration of a libvirt domain, run by this host's libvirt:
/// `virsh -c LOCAL migrate --live --persistent --undefinesource --domain
/// DOMAIN --desturi TO --migrateuri tcp:ADDR:PORT --listen-address ADDR`
/// (the domain's definition moves with it, so that it does not start here
/// again after the maintenance), whose QEMU streams to this agent's
/// loopback port, and whose destination QEMU listens on the destination
/// host's.
struct Virsh {
    local: String,
    domain: String,
    to: String,
    migrateuri: String,
    listen_address: String,
    child: Option<std::process::Child>,
}

impl Virsh {
    /// Starts `virsh migrate`.
    fn start(&mut self) -> Result<(), AgentError> {
        // Named arguments: a name or URI is never read as an option. The
        // definition moves with the domain.
        let child = std::process::Command::new("virsh")
            .args(["-c", &self.local, "migrate", "--live", "--persistent"])
            .args(["--undefinesource", "--domain", &self.domain])
            .args(["--desturi", &self.to])
            .args(["--migrateuri", &self.migrateuri])
            .args(["--listen-address", &self.listen_address])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| {
                AgentError::Qemu(format!("cannot run virsh (package libvirt-clients): {e}"))
            })?;
        info!(
            "QEMU VM {}: virsh -c {} migrate --live --persistent --undefinesource --domain {} --desturi {} --migrateuri {} --listen-address {}",
            self.domain, self.local, self.domain, self.to, self.migrateuri, self.listen_address
        );
        self.child = Some(child);
        Ok(())
    }

    /// virsh's failure, if it has ended and failed (`None` while it runs
    /// or after it succeeded).
    fn failed(&mut self) -> Option<String> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) if !st.success() => Some(self.said(st)),
            _ => None,
        }
    }

    /// Waits for virsh to end (at most `within`): `Err` with what it said
    /// if it failed, or if it did not end (then it is killed, and how the
    /// migration ended is unknown).
    fn wait(&mut self, within: Duration) -> Result<(), VirshEnd> {
        let Some(c) = self.child.as_mut() else {
            return Ok(());
        };
        let until = Instant::now() + within;
        loop {
            match c.try_wait() {
                Ok(Some(st)) if st.success() => return Ok(()),
                Ok(Some(st)) => return Err(VirshEnd::Failed(self.said(st))),
                Ok(None) if Instant::now() > until => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return Err(VirshEnd::Unknown(format!(
                        "unknown: virsh migrate did not end within {within:?}"
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    return Err(VirshEnd::Unknown(format!(
                        "unknown: waiting for virsh: {e}"
                    )));
                }
            }
        }
    }

    fn said(&mut self, st: std::process::ExitStatus) -> String {
        let mut text = String::new();
        if let Some(err) = self.child.as_mut().and_then(|c| c.stderr.as_mut()) {
            let _ = err.take(VIRSH_SAID as u64).read_to_string(&mut text);
        }
        format!("failed: virsh migrate ended with {st}: {}", text.trim())
    }
}

/// How `virsh migrate` ended, when not well.
enum VirshEnd {
    /// It said it failed: libvirt runs the guest at the source.
    Failed(String),
    /// It did not say.
    Unknown(String),
}

impl Drop for Virsh {
    fn drop(&mut self) {
        // A migration given up here: libvirt aborts it when its client
        // goes, and the guest runs on at the source.
        if let Some(c) = self.child.as_mut()
            && matches!(c.try_wait(), Ok(None))
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The libvirt route, if `r` asks for it: the loopback port to wait on for
/// QEMU's stream, and how long. `driven`: this agent starts it through
/// libvirt itself, so it may be held in a gang job.
fn route(
    r: &v1::MigrateRequest,
    driven: bool,
) -> Result<Option<(TcpListener, Duration)>, AgentError> {
    if r.qemu_listen.is_empty() {
        return Ok(None);
    }
    if r.hold && !driven {
        return Err(AgentError::BadRequest(
            "a QEMU VM migrated by libvirt (--qemu-listen) moves on its own, not in a gang job"
                .into(),
        ));
    }
    let at = loopback(&r.qemu_listen, "--qemu-listen")?;
    loopback(&r.qemu_connect, "--qemu-connect")?;
    let l = TcpListener::bind(at).map_err(|source| AgentError::Bind {
        addr: at.to_string(),
        source,
    })?;
    let wait = Duration::from_secs(match r.qemu_wait_s {
        0 => 300,
        s => u64::from(s).min(QEMU_WAIT_MAX.as_secs()),
    });
    Ok(Some((l, wait)))
}

/// QEMU's migration stream, for the engine to relay: QEMU migrates to a
/// socket of ours, or, on the libvirt route, to the port libvirt names.
/// QMP is held only while a stage needs it: QEMU serves one client at a
/// time, and resuming the source after a failure needs its own.
struct Stream<'a> {
    q: &'a QemuBackend,
    name: &'a str,
    qmp: Option<Qmp>,
    route: Option<(TcpListener, Duration)>,
    sock: PathBuf,
    /// On the libvirt route, the migration this agent has libvirt run.
    virsh: Option<Virsh>,
}

impl<'a> Stream<'a> {
    fn new(
        q: &'a QemuBackend,
        out: Outbound<'a>,
        dir: &str,
        route: Option<(TcpListener, Duration)>,
    ) -> Self {
        Stream {
            q,
            name: &out.vm.name,
            qmp: None,
            route,
            sock: socket_path(out.agent, &out.vm.name, dir),
            virsh: None,
        }
    }

    fn qmp(&mut self) -> Result<&mut Qmp, AgentError> {
        if self.qmp.is_none() {
            self.qmp = Some(self.q.qmp()?);
        }
        Ok(self.qmp.as_mut().expect("connected"))
    }
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.sock);
    }
}

fn stream_err(e: AgentError) -> MigrationError {
    MigrationError::Stream {
        code: e.code(),
        reason: e.to_string(),
    }
}

impl StreamSource for Stream<'_> {
    fn start(
        &mut self,
        cancelled: &mut dyn FnMut() -> Option<String>,
    ) -> Result<Started, MigrationError> {
        let Some((l, wait)) = &self.route else {
            let sock = self.sock.clone();
            let q = self.qmp().map_err(stream_err)?;
            let input = start_stream(q, &sock).map_err(stream_err);
            self.qmp = None;
            let input = input?;
            let back = return_path(input.try_clone(), |s| s.set_write_timeout(Some(STALL)))?;
            return Ok(Started {
                input: Box::new(input),
                back: Some(back),
            });
        };
        // QMP is let go meanwhile: QEMU serves one client at a time, and
        // whoever starts the migration needs it.
        self.qmp = None;
        info!(
            "QEMU VM {}: waiting up to {wait:?} for its QEMU to migrate to tcp:{}",
            self.name,
            l.local_addr().map(|a| a.to_string()).unwrap_or_default()
        );
        if let Some(v) = &mut self.virsh {
            v.start().map_err(stream_err)?;
        }
        let virsh = &mut self.virsh;
        let mut stopped = || cancelled().or_else(|| virsh.as_mut().and_then(Virsh::failed));
        let s = accept_qemu(l, *wait, &mut stopped).map_err(stream_err)?;
        // Whoever started it set QEMU's capabilities just before.
        let name = self.name;
        let checked = check_capabilities(self.qmp().map_err(stream_err)?, name, true);
        self.qmp = None;
        checked.map_err(|e| MigrationError::Stream {
            code: v1::RefusalCode::Invalid,
            reason: e.to_string(),
        })?;
        let back = return_path(s.try_clone(), |c| c.set_write_timeout(Some(STALL)))?;
        Ok(Started {
            input: Box::new(s),
            back: Some(back),
        })
    }

    fn settled(&mut self) -> Result<StreamEnd, MigrationError> {
        let settled = self.qmp().and_then(settled_migration);
        self.qmp = None;
        let Some(v) = &mut self.virsh else {
            let (status, m) = settled.map_err(stream_err)?;
            return Ok(StreamEnd {
                completed: status == "completed",
                status,
                downtime_ms: m["downtime"].as_f64().unwrap_or(0.0),
                ..StreamEnd::default()
            });
        };
        // libvirt ends it: its confirm step stops the source QEMU (QMP may
        // be gone by now), and virsh says how it went.
        let downtime_ms = settled
            .as_ref()
            .map_or(0.0, |(_, m)| m["downtime"].as_f64().unwrap_or(0.0));
        Ok(match v.wait(VIRSH_WAIT) {
            Ok(()) => StreamEnd {
                completed: true,
                status: "completed".into(),
                downtime_ms,
                decides: true,
                unknown: false,
            },
            Err(VirshEnd::Failed(why)) => StreamEnd {
                completed: false,
                status: why,
                downtime_ms,
                decides: true,
                unknown: false,
            },
            // Killed while libvirt may have been finishing it.
            Err(VirshEnd::Unknown(why)) => StreamEnd {
                completed: false,
                status: why,
                downtime_ms,
                decides: true,
                unknown: true,
            },
        })
    }
}

/// The source QEMU's end of its return path: the connection its stream
/// comes on, written the other way (QEMU reads its destination's answers
/// there when its `return-path` capability is on).
fn return_path<S: Write + Send + 'static>(
    clone: std::io::Result<S>,
    limit: impl FnOnce(&S) -> std::io::Result<()>,
) -> Result<Box<dyn Write + Send>, MigrationError> {
    let s = clone.map_err(|e| stream_err(qemu_err(e)))?;
    limit(&s).map_err(|e| stream_err(qemu_err(e)))?;
    Ok(Box::new(s))
}

fn resume_source(a: &QemuBackend) {
    let Ok(mut q) = a.qmp() else {
        return;
    };
    match q.migration() {
        // "device": its devices' state went and it waits for its
        // destination's word on the return path.
        Ok((s, _)) if s == "active" || s == "setup" || s == "pre-switchover" || s == "device" => {
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
pub(crate) fn loopback(addr: &str, flag: &str) -> Result<SocketAddr, AgentError> {
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
fn accept_qemu(
    l: &TcpListener,
    wait: Duration,
    cancelled: &mut dyn FnMut() -> Option<String>,
) -> Result<TcpStream, AgentError> {
    l.set_nonblocking(true).map_err(qemu_err)?;
    let at = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let s = accept_within(
        || l.accept().map(|(s, _)| s),
        wait,
        || cancelled().map(|why| format!("the migration was stopped before QEMU connected: {why}")),
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
/// `libvirt`: libvirt runs this migration, so its return path is carried.
fn check_capabilities(q: &mut Qmp, name: &str, libvirt: bool) -> Result<(), AgentError> {
    let caps = q.capabilities().map_err(qemu_err)?;
    let allowed: &[&str] = if libvirt {
        &[pagecast_qemu::RETURN_PATH]
    } else {
        &[]
    };
    if let Some((cap, why)) = pagecast_qemu::refused_capability(&caps, allowed) {
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
        self.check_cordon(r.force)?;
        if !pagecast_proto::name_ok(&r.name) {
            return Err(AgentError::BadName(r.name.clone()));
        }
        let key = self.domain_key(&r.domain)?;
        if !r.libvirt_domain.is_empty() {
            if r.incoming {
                return Err(AgentError::BadRequest(
                    "--libvirt-domain: libvirt starts the destination's QEMU of a domain itself; adopt only the running one".into(),
                ));
            }
            if !pagecast_proto::name_ok(&r.libvirt_domain) {
                return Err(AgentError::BadName(r.libvirt_domain.clone()));
            }
        }
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
                libvirt_domain: (!r.libvirt_domain.is_empty()).then(|| r.libvirt_domain.clone()),
                seen: Mutex::new(Seen::ask(&mut q)),
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
}

impl QemuBackend {
    /// Receives a QEMU VM's migration into the waiting QEMU of this
    /// adopted VM: the shared front of every arrival (its contents this
    /// host holds set aside, a gang job's casts and fetches), then the
    /// stream, rebuilt with those pages, into QEMU; Resumed once the guest
    /// runs.
    fn receive_stream(
        &self,
        into: Outbound<'_>,
        link: &mut dyn MigrationLink,
        begin: &v1::MigrateBegin,
        job: &Arc<crate::jobs::Job>,
    ) -> Result<IncomingReport, AgentError> {
        let (agent, vm) = (into.agent, into.vm);
        if begin.memory_bytes != vm.memory_bytes()
            || pagecast_pages::domain::normalize(&begin.domain) != vm.domain
        {
            return refuse_begin(
                link,
                AgentError::BadRequest(format!(
                    "VM {} has {} bytes in domain {:?} at the source and {} bytes in {:?} here",
                    begin.vm,
                    begin.memory_bytes,
                    begin.domain,
                    vm.memory_bytes(),
                    vm.domain
                )),
            );
        }
        if begin.clone
            && let Err(e) = self.distinct_from(&begin.vm_generation_id)
        {
            return refuse_begin(link, e);
        }
        let local = JobContent { agent, job };
        let mut events = JobSlots {
            agent,
            job: job.clone(),
        };
        let mut arrival =
            pagecast_migrate::receive_front(link, begin, &local, &mut events, Shape::Contents)?;
        let sock = socket_path(agent, &vm.name, "in");
        let _cleanup = RemoveOnDrop(sock.clone());
        let loaded = self.load(&mut arrival, &sock, begin.clone.then_some(vm.name.as_str()));
        end_arrival(&mut arrival, &mut events, loaded, |bytes, held| {
            format!(
                "QEMU VM {} arrived: {bytes} stream bytes, {held} pages from this host",
                vm.name
            )
        })
    }

    /// Points the waiting QEMU at a socket of ours, feeds it the stream,
    /// and waits until it runs the guest; a clone (`clone`: its name) then
    /// gets its network cards' own MACs back ([`own_macs`]).
    fn load(
        &self,
        arrival: &mut Arrival<'_>,
        sock: &Path,
        clone: Option<&str>,
    ) -> Result<(u64, u64), AgentError> {
        let started = lock(&self.seen).macs.clone();
        let _ = std::fs::remove_file(sock);
        let mut q = self.qmp()?;
        q.execute(
            "migrate-incoming",
            json!({ "uri": format!("unix:{}", sock.display()) }),
        )
        .map_err(qemu_err)?;
        let mut out = connect_within(Duration::from_secs(10), || UnixStream::connect(sock))
            .map_err(|e| {
                AgentError::Qemu(format!(
                    "cannot reach QEMU's incoming socket {}: {e}",
                    sock.display()
                ))
            })?;
        out.set_write_timeout(Some(STALL)).map_err(qemu_err)?;
        let answers = out
            .try_clone()
            .and_then(|c| c.set_read_timeout(Some(Duration::from_secs(1))).map(|()| c))
            .map_err(qemu_err)?;
        let answers = Answers::read(answers);
        let fed = feed(arrival, &mut out, &answers, None)?;
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
                if let Some(name) = clone {
                    own_macs(&mut q, &started, name);
                }
                // What its guest now is, after the stream's device state.
                *lock(&self.seen) = Seen::ask(&mut q);
                return Ok(fed);
            }
            if Instant::now() > until {
                return Err(AgentError::Qemu(format!(
                    "the destination QEMU is still {status} (migration {m}) 60 s after the stream ended"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Refuses a migration at its begin, with `e`'s code and text.
pub(crate) fn refuse_begin<T>(
    link: &mut dyn MigrationLink,
    e: AgentError,
) -> Result<T, AgentError> {
    let _ = link.send(v1::migrate_frame::Body::Accept(v1::MigrateAccept {
        ok: false,
        reason: e.to_string(),
        code: e.code() as i32,
        postcopy: false,
    }));
    Err(e)
}

/// An agent's failure as the migration's, for the Abort the source hears.
fn to_migration(e: &AgentError) -> MigrationError {
    match e {
        AgentError::Migration(MigrationError::Cancelled(w)) => MigrationError::Cancelled(w.clone()),
        other => MigrationError::Aborted {
            code: other.code(),
            reason: other.to_string(),
        },
    }
}

/// Connects with `connect` until it works or `wait` has passed.
fn connect_within<S>(
    wait: Duration,
    mut connect: impl FnMut() -> std::io::Result<S>,
) -> std::io::Result<S> {
    let deadline = Instant::now() + wait;
    loop {
        match connect() {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl Agent {
    /// Receives a QEMU VM for a QEMU this agent has not adopted, listening
    /// on `begin.connect` (libvirt started it with `-incoming tcp:`): the
    /// stream is rebuilt into it with the pages this host holds. QEMU here
    /// is libvirt's to watch: the stream ending is this side's end.
    pub(crate) fn qemu_route_in(
        &self,
        link: &mut dyn MigrationLink,
        begin: &v1::MigrateBegin,
        job: &Arc<crate::jobs::Job>,
    ) -> Result<IncomingReport, AgentError> {
        // Only a QEMU the operator named in the job: never another local
        // port a source names.
        let at = match loopback(&begin.connect, "the destination QEMU's address")
            .and_then(|at| job.admit_qemu(at).map(|()| at))
        {
            Ok(a) => a,
            Err(e) => return refuse_begin(link, e),
        };
        // Held in a gang job (an evacuation the source agent has libvirt
        // run): the job's casts and fetches land here as for any arrival.
        let (local, mut slots, mut none) = (
            JobContent { agent: self, job },
            JobSlots {
                agent: self,
                job: job.clone(),
            },
            NoSlotEvents,
        );
        let (content, events): (&dyn pagecast_migrate::LocalContent, &mut dyn SlotEvents) =
            if begin.held {
                (&local, &mut slots)
            } else {
                (self, &mut none)
            };
        let mut arrival =
            pagecast_migrate::receive_front(link, begin, content, events, Shape::Contents)?;
        let fed = route_feed(&mut arrival, at);
        end_arrival(&mut arrival, events, fed, |bytes, held| {
            format!(
                "QEMU VM {} handed to the QEMU on tcp:{at}: {bytes} stream bytes, {held} pages from this host",
                begin.vm
            )
        })
    }
}

/// Ends an arrival whose stream went to QEMU (`fed`: the stream's bytes
/// and the pages this host supplied): its slot let go, started and
/// `Resumed` sent; or failed, nothing kept.
fn end_arrival(
    arrival: &mut Arrival<'_>,
    events: &mut dyn SlotEvents,
    fed: Result<(u64, u64), AgentError>,
    done: impl FnOnce(u64, u64) -> String,
) -> Result<IncomingReport, AgentError> {
    let (bytes, held) = match fed {
        Ok(f) => f,
        Err(e) => {
            arrival.fail(events, &to_migration(&e));
            return Err(e);
        }
    };
    events.closed(arrival.slot());
    arrival.started();
    arrival.send(v1::migrate_frame::Body::Resumed(v1::Resumed {
        progress: 0,
    }))?;
    info!("{}", done(bytes, held));
    let rep = arrival.report();
    rep.pages_local = held;
    Ok(rep.clone())
}

/// The libvirt route's feeding: the stream into the QEMU listening on
/// `at`, which closes its end once it has loaded it (or exits if it
/// refused it).
fn route_feed(arrival: &mut Arrival<'_>, at: SocketAddr) -> Result<(u64, u64), AgentError> {
    // The stream's first part comes once the source QEMU has connected, by
    // when libvirt's QEMU here listens (libvirt prepares it first); a held
    // arrival waits for its job's casts before that, and the source waits
    // at most QEMU_WAIT_MAX for someone to start libvirt's migration.
    let first = next_part(arrival, None, QEMU_WAIT_MAX + STALL)?;
    let mut out = connect_within(Duration::from_secs(10), || {
        TcpStream::connect_timeout(&at, Duration::from_secs(2))
    })
    .map_err(|e| {
        AgentError::Qemu(format!(
            "cannot reach the destination QEMU on tcp:{at}: {e} (is it listening, -incoming tcp:{at}?)"
        ))
    })?;
    out.set_write_timeout(Some(STALL)).map_err(qemu_err)?;
    let answers = out
        .try_clone()
        .and_then(|c| c.set_read_timeout(Some(Duration::from_secs(1))).map(|()| c))
        .map_err(qemu_err)?;
    let answers = Answers::read(answers);
    let fed = feed(arrival, &mut out, &answers, Some(first))?;
    let _ = out.shutdown(std::net::Shutdown::Write);
    answers.closed_within(Duration::from_secs(10));
    Ok(fed)
}

/// Longest a source waits for its QEMU to connect on the libvirt route
/// (`--qemu-wait` is held to it), and (with [`STALL`]) a destination for
/// the stream's first part there (a source that gives up sooner says so).
const QEMU_WAIT_MAX: Duration = Duration::from_secs(1200);

/// The stream's next part: keep-alives of a holding source answered, and
/// what this host's QEMU answered (`answers`) relayed between frames; a
/// source that sends nothing for `limit` fails the arrival, and so does a
/// malformed part.
fn next_part(
    arrival: &mut Arrival<'_>,
    answers: Option<&Answers>,
    limit: Duration,
) -> Result<v1::StreamPart, AgentError> {
    let mut heard = Instant::now();
    // Answers are relayed within this; with none to relay, waiting is
    // cheaper.
    let poll = if answers.is_some() {
        ANSWER_POLL
    } else {
        Duration::from_millis(200)
    };
    loop {
        while let Some(data) = answers.and_then(|a| a.rx.try_recv().ok()) {
            arrival.send(v1::migrate_frame::Body::ReturnPath(v1::ReturnPath {
                data: data.into(),
            }))?;
        }
        match arrival.wait_frame(poll)? {
            None if heard.elapsed() > limit => {
                return Err(AgentError::Migration(MigrationError::Timeout {
                    peer: "the source".into(),
                    what: "stream part",
                    after: limit,
                }));
            }
            None => {}
            // A holding source is alive.
            Some(v1::migrate_frame::Body::KeepAlive(_)) => heard = Instant::now(),
            Some(v1::migrate_frame::Body::Stream(p)) => {
                if p.held.len() != 32 * p.held_at.len() || p.data.len() > MAX_PART_BYTES {
                    return Err(AgentError::BadRequest("a malformed stream part".into()));
                }
                return Ok(p);
            }
            Some(other) => {
                return Err(AgentError::BadRequest(format!(
                    "expected the stream, got {other:?}"
                )));
            }
        }
    }
}

/// Most bytes of one return-path frame.
const MAX_ANSWER: usize = 64 << 10;
/// How long the feeding waits for a part before it relays what its QEMU
/// answered.
const ANSWER_POLL: Duration = Duration::from_millis(10);

/// What the QEMU here writes back on its migration socket (its return
/// path, when the source turned it on), read by a thread of its own until
/// QEMU closes its end or this is dropped.
struct Answers {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Answers {
    /// Reads `s`, which must have a read timeout (the thread looks at its
    /// stop flag between reads).
    fn read<S: Read + Send + 'static>(mut s: S) -> Answers {
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; MAX_ANSWER];
            while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::Interrupted
                        ) => {}
                    Err(_) => break,
                }
            }
        });
        Answers { rx, stop }
    }

    /// Whether QEMU closed its end within `wait` (what it still said is
    /// dropped: nobody waits for it any more).
    fn closed_within(&self, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(_) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return true,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return false,
            }
        }
    }
}

impl Drop for Answers {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Feeds the source's stream parts into `out`, each page named by its hash
/// copied from the arrival's scratch frames, and relays what QEMU answers
/// (`answers`) to the source; returns the stream's bytes and the pages
/// from this host. Receiving and writing overlap: a thread writes to QEMU
/// while the next parts arrive.
fn feed(
    arrival: &mut Arrival<'_>,
    out: &mut (dyn Write + Send),
    answers: &Answers,
    first: Option<v1::StreamPart>,
) -> Result<(u64, u64), AgentError> {
    arrival.set_timeout(STALL);
    let slot = arrival.slot().clone();
    let (tx, rx) = std::sync::mpsc::sync_channel::<v1::StreamPart>(PARTS_IN_FLIGHT);
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || write_parts(rx, &slot, out));
        let last = first.as_ref().is_some_and(|p| p.last);
        let failed = match first.map(|p| tx.send(p)) {
            // The writer stopped at once: its error comes from it.
            Some(Err(_)) => None,
            _ if last => None,
            _ => receive_parts(arrival, &tx, answers).err(),
        };
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

/// Hands the stream's parts to the writer until the last, relaying QEMU's
/// answers between them; a source silent for [`STALL`] fails it.
fn receive_parts(
    arrival: &mut Arrival<'_>,
    tx: &std::sync::mpsc::SyncSender<v1::StreamPart>,
    answers: &Answers,
) -> Result<(), AgentError> {
    loop {
        let p = next_part(arrival, Some(answers), STALL)?;
        let last = p.last;
        // The writer stopped (its error comes from it), or the stream ended.
        if tx.send(p).is_err() || last {
            return Ok(());
        }
    }
}

/// Writes stream parts into `out`, each held page copied from `slot`.
fn write_parts(
    rx: std::sync::mpsc::Receiver<v1::StreamPart>,
    slot: &Arc<IncomingSlot>,
    out: &mut (dyn Write + Send),
) -> Result<(u64, u64), AgentError> {
    let mut bytes = 0u64;
    let mut local = 0u64;
    let mut page: Page = [0; PAGE];
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
            if !slot.copy(&h, &mut page) {
                return Err(AgentError::BadRequest(
                    "the source named a page this host did not set aside".into(),
                ));
            }
            write_all(out, &p.data[at..pos])?;
            write_all(out, &page)?;
            bytes += (pos - at + PAGE) as u64;
            at = pos;
            local += 1;
        }
        write_all(out, &p.data[at..])?;
        bytes += (p.data.len() - at) as u64;
    }
    Ok((bytes, local))
}

fn write_all(out: &mut dyn Write, b: &[u8]) -> Result<(), AgentError> {
    out.write_all(b)
        .map_err(|e| AgentError::Qemu(format!("writing to the destination QEMU: {e}")))
}

/// A socket path for VM `name`'s migration (`dir`: in, out or clone), in
/// the agent's data directory or the temporary directory.
fn socket_path(agent: &Agent, name: &str, dir: &str) -> PathBuf {
    let base = agent.data.clone().unwrap_or_else(std::env::temp_dir);
    base.join(format!("qemu-{name}-{dir}-{}.sock", std::process::id()))
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_libvirt_route_takes_loopback_ports_only() {
        assert_eq!(
            loopback("127.0.0.1:49152", "--qemu-listen").unwrap(),
            "127.0.0.1:49152".parse::<SocketAddr>().unwrap()
        );
        assert!(loopback("[::1]:49152", "--qemu-listen").is_ok());
        for (bad, says) in [
            ("10.0.0.1:49152", "loopback"),
            ("127.0.0.1:0", "loopback"),
            ("localhost", "is not ADDR:PORT"),
            ("", "is not ADDR:PORT"),
        ] {
            let e = loopback(bad, "--qemu-connect").unwrap_err().to_string();
            assert!(
                e.contains("--qemu-connect") && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_libvirt_migration_is_no_gang_member_and_checks_both_ends() {
        let mut r = v1::MigrateRequest {
            qemu_listen: "127.0.0.1:0".into(),
            ..Default::default()
        };
        // No listen address: the agent's own route, nothing bound here.
        assert!(
            route(&v1::MigrateRequest::default(), false)
                .unwrap()
                .is_none()
        );
        r.hold = true;
        let e = route(&r, false).unwrap_err().to_string();
        assert!(e.contains("not in a gang job"), "{e}");
        r.hold = false;
        r.qemu_listen = "127.0.0.1:1".into();
        r.qemu_connect = "192.0.2.1:5".into();
        let e = route(&r, false).unwrap_err().to_string();
        assert!(e.contains("--qemu-connect"), "{e}");
        // A free port of our own: bound, with the default wait.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        r.qemu_listen = format!("127.0.0.1:{port}");
        r.qemu_connect = "127.0.0.1:49153".into();
        let (l, wait) = route(&r, false).unwrap().unwrap();
        assert_eq!(l.local_addr().unwrap().port(), port);
        assert_eq!(wait, Duration::from_secs(300));
        r.qemu_wait_s = 7;
        drop(l);
        let (l, wait) = route(&r, false).unwrap().unwrap();
        assert_eq!(wait, Duration::from_secs(7));
        drop(l);
        // One this agent has libvirt run may be held in a job.
        r.hold = true;
        assert!(route(&r, true).unwrap().is_some());
    }

    #[test]
    fn a_libvirt_uri_names_a_remote_daemon_and_nothing_else() {
        for good in [
            "qemu+tls://host-b/system",
            "qemu+tcp://10.0.0.2:16509/system",
            "qemu+ssh://root@host-b/system",
            "qemu+tls://[fd00::2]/session",
        ] {
            assert!(libvirt_uri(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "--p2p",
            "qemu:///system",
            "qemu+ext:///system?command=/bin/sh",
            "qemu+ssh://b/system?command=/tmp/x",
            "qemu+ssh://b/system?netcat=/tmp/x",
            "qemu+tls://b/system?no_verify=1",
            "qemu+tcp://b/system --unsafe",
            "qemu+tls://-oProxyCommand=x/system",
            "qemu+tls://user@b/system",
            "qemu+tcp://b/other",
            "qemu+tcp://b/system\n",
        ] {
            assert!(libvirt_uri(bad).is_err(), "{bad:?}");
        }
        assert!(libvirt_uri(&format!("qemu+tcp://{}/system", "q".repeat(300))).is_err());
    }

    #[test]
    fn waiting_for_a_stream_ends_on_a_stop_or_the_deadline() {
        let would_block = || -> std::io::Result<()> { Err(std::io::ErrorKind::WouldBlock.into()) };
        // Stopped: the reason comes back at once.
        let t = Instant::now();
        let e = accept_within(
            would_block,
            Duration::from_secs(30),
            || Some("cancelled by the operator".into()),
            || "late".into(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("cancelled by the operator"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        // Nothing comes: the deadline's message.
        let e = accept_within(
            would_block,
            Duration::from_millis(50),
            || None,
            || "no stream within 50 ms".into(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no stream within 50 ms"), "{e}");
        // A real error ends the wait; a connection is returned.
        let e = accept_within(
            || -> std::io::Result<()> { Err(std::io::ErrorKind::PermissionDenied.into()) },
            Duration::from_secs(30),
            || None,
            || "late".into(),
        )
        .unwrap_err();
        assert!(matches!(e, AgentError::Qemu(_)), "{e}");
        let mut n = 0;
        let got = accept_within(
            || {
                n += 1;
                if n < 3 {
                    Err(std::io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(n)
                }
            },
            Duration::from_secs(30),
            || None,
            || "late".into(),
        )
        .unwrap();
        assert_eq!(got, 3);
    }
}
