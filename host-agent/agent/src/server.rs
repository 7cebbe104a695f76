//! The agent's network side: a tokio accept loop that authenticates each
//! connection, reads one [`v1::AgentRequest`] and answers it. Anything that
//! touches guest memory or hashes pages runs on blocking threads (the
//! hashing itself on the agent's rayon pool), never on the runtime.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::counter;

use pagecast_channel::{AuthError, Channel, Role};
use pagecast_proto::v1;
use pagecast_proto::v1::RefusalCode;
use tokio::net::TcpListener;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::{Agent, AgentConfig, AgentError};
use pagecast_channel::AsyncChannel;
use pagecast_channel::gate::{Arrival, Gate, Limits};
use pagecast_migrate::{ChannelLink, MigrationError, Progress};

mod requests;

type Resp = v1::agent_response::Body;

/// How long a client has to send its request once authenticated.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most authenticated connections open at once from one peer address
/// (handshakes under way are bounded apart: [`MAX_HANDSHAKES_PER_PEER`]).
pub const MAX_CONNECTIONS_PER_PEER: usize = 256;
/// Most authenticated connections open at once.
pub const MAX_CONNECTIONS: usize = 4096;

/// Handshakes under way from one peer address, and in all: past either,
/// the oldest handshake (of that address, or of all) is dropped to make
/// room, so peers that connect and say nothing hold no slot a real client
/// needs ([`pagecast_channel::gate`]).
pub const MAX_HANDSHAKES_PER_PEER: usize = 64;
/// See [`MAX_HANDSHAKES_PER_PEER`].
pub const MAX_HANDSHAKES: usize = 2048;

fn gate() -> Arc<Gate> {
    Gate::new(Limits {
        handshakes_per_peer: MAX_HANDSHAKES_PER_PEER,
        handshakes: MAX_HANDSHAKES,
        open_per_peer: MAX_CONNECTIONS_PER_PEER,
        open: MAX_CONNECTIONS,
    })
}

/// How often the content map takes in pages the VMs dirtied.
pub const CONTENT_REFRESH: Duration = Duration::from_secs(1);
/// How long a stopping agent waits for the index to hear that its VMs are
/// gone.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);
/// At most this many progress reports per second reach a migrating client.
const PROGRESS_PER_SECOND: u32 = 10;

/// Runs an agent until SIGINT or SIGTERM. `ready` is called with the bound
/// control address once the agent accepts connections.
pub fn serve(config: AgentConfig, ready: impl FnOnce(SocketAddr)) -> Result<(), AgentError> {
    let mut agent = Agent::new(
        &config.name,
        config.tls.clone(),
        config.data.clone(),
        config.threads,
    )?;
    if let Some((addrs, meta)) = config.index.clone() {
        agent.set_index(addrs, meta);
    }
    agent.set_domain_secret(config.domain_secret.clone());
    agent.set_capacity(config.capacity_bytes);
    agent.set_hold_silence(config.hold_silence);
    if let Some(l) = config.libvirt.clone() {
        agent.set_libvirt(l);
    }
    agent.set_cast_iface(
        config
            .cast_iface
            .unwrap_or_else(|| crate::job::default_cast_iface(&config.listen)),
    );
    let agent = Arc::new(agent);
    let mut publisher = None;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pagecast-agent")
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    let span = info_span!("agent", host = %config.name);
    let result = rt.block_on(
        async {
            let listener =
                TcpListener::bind(config.listen)
                    .await
                    .map_err(|source| AgentError::Bind {
                        addr: config.listen.to_string(),
                        source,
                    })?;
            pagecast_channel::gate::deepen_backlog(&listener).map_err(|source| {
                AgentError::Bind {
                    addr: config.listen.to_string(),
                    source,
                }
            })?;
            let local = listener.local_addr().map_err(|source| AgentError::Bind {
                addr: config.listen.to_string(),
                source,
            })?;
            if let Some(m) = config.metrics {
                metrics_exporter_prometheus::PrometheusBuilder::new()
                    .with_http_listener(m)
                    .install()
                    .map_err(|e| AgentError::Metrics(format!("{m}: {e}")))?;
                info!("metrics on http://{m}/metrics");
            }
            info!("listening on {local}");
            if let Some(link) = agent.index_link() {
                link.set_address(local.to_string());
                // The publisher: its own thread, so a slow or unreachable index
                // never holds up the runtime.
                let a = agent.clone();
                let span = tracing::Span::current();
                publisher = Some(
                    std::thread::Builder::new()
                        .name("pagecast-publish".into())
                        .spawn(move || span.in_scope(|| a.publish_loop())),
                );
            }
            ready(local);
            tokio::spawn(refresher(agent.clone()).in_current_span());
            tokio::spawn(in_doubt_resolver(agent.clone()).in_current_span());
            let gate = gate();
            let stop = shutdown_signal();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    s = &mut stop => {
                        info!("{s}: stopping {} VM(s) and exiting", agent.vm_list().vms.len());
                        return Ok::<(), AgentError>(());
                    }
                    a = listener.accept() => match a {
                        Ok((stream, from)) => arrive(&gate, &agent, stream, from),
                        Err(e) => {
                            // Out of descriptors and the like: back off, keep serving.
                            warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                }
            }
        }
        .instrument(span.clone()),
    );
    let _g = span.enter();
    stop(&agent, publisher);
    rt.shutdown_timeout(Duration::from_secs(5));
    result
}

/// A connection accepted: its handshake enters the gate (which may drop
/// older idle ones) and it is served on a task of its own.
fn arrive(gate: &Arc<Gate>, agent: &Arc<Agent>, stream: tokio::net::TcpStream, from: SocketAddr) {
    let evicted = Arc::new(tokio::sync::Notify::new());
    let wake = evicted.clone();
    let (arrival, dropped) = gate.arrive(from.ip(), Box::new(move || wake.notify_one()));
    if dropped > 0 {
        counter!(crate::metrics::OVER_LIMIT).increment(dropped as u64);
    }
    tokio::spawn(connection(agent.clone(), stream, (arrival, evicted)).in_current_span());
}

/// Stops the agent's VMs and lets the publisher withdraw them from the
/// index for a moment (what it cannot send now, the next start withdraws).
fn stop(agent: &Agent, publisher: Option<std::io::Result<std::thread::JoinHandle<()>>>) {
    agent.shutdown();
    if let Some(link) = agent.index_link() {
        let until = Instant::now() + SHUTDOWN_FLUSH;
        while !link.ledger().idle() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        link.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        link.notify();
    }
    if let Some(Ok(p)) = publisher {
        // A call to an index that does not answer may hold it for its
        // deadline: wait a little, then exit without it.
        let until = Instant::now() + Duration::from_secs(2);
        while !p.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        if p.is_finished() {
            let _ = p.join();
        }
    }
}

async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            return tokio::select! {
                _ = tokio::signal::ctrl_c() => "interrupted",
                _ = term.recv() => "terminated",
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "interrupted"
}

async fn refresher(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(CONTENT_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let a = agent.clone();
        if tokio::task::spawn_blocking(move || a.refresh_content())
            .await
            .is_err()
        {
            error!("content refresh panicked");
        }
    }
}

/// Every second, settles the VMs whose switchover went unconfirmed and
/// whose time to ask their destination has come.
async fn in_doubt_resolver(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let a = agent.clone();
        if tokio::task::spawn_blocking(move || a.resolve_in_doubt())
            .await
            .is_err()
        {
            error!("settling switchovers in doubt panicked");
        }
    }
}

/// A job id for a migration whose request named none.
fn implicit_job(vm: &str) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("migrate:{vm}:{ms}")
}

/// A peer of a job, as a request names it.
fn job_peer(host: &str, role: v1::JobRole) -> v1::JobPeer {
    v1::JobPeer {
        host: host.to_owned(),
        role: role as i32,
        vms: Vec::new(),
    }
}

fn error(code: RefusalCode, e: impl std::fmt::Display) -> Resp {
    Resp::Error(v1::AgentError {
        code: code as i32,
        message: e.to_string(),
    })
}

async fn reply(ch: &mut AsyncChannel, body: Resp) {
    let _ = ch.send(&v1::AgentResponse { body: Some(body) }).await;
}

/// The roles that may make a request.
fn allowed(body: &v1::agent_request::Body) -> (&'static [Role], &'static str) {
    use v1::agent_request::Body as B;
    const ANY: &[Role] = &[Role::Reader, Role::Operator, Role::Host];
    match body {
        B::VmList(_) => (ANY, "list VMs"),
        B::Audit(_) => (ANY, "audit the agent"),
        B::VmContent(_) => (
            &[Role::Operator],
            "read a VM's page list (a reader sees counts in vm list)",
        ),
        B::FetchPages(_) => (&[Role::Host], "fetch pages (host to host)"),
        B::Incoming(_) => (&[Role::Host], "migrate a VM in (host to host)"),
        B::VmAdopt(_) => (&[Role::Operator], "adopt QEMU VMs"),
        B::VmStart(_) => (&[Role::Operator], "start VMs"),
        B::VmStop(_) => (&[Role::Operator], "stop VMs"),
        B::VmSet(_) => (&[Role::Operator], "change VMs"),
        B::Migrate(_) => (&[Role::Operator], "migrate VMs"),
        B::Clone(_) => (&[Role::Operator], "clone VMs"),
        B::CancelJob(_) => (&[Role::Operator], "cancel jobs"),
        B::Go(_) | B::KeepAlive(_) => (&[Role::Operator], "release held migrations"),
        B::JobOpen(_) | B::JobClose(_) => (&[Role::Operator], "open and close jobs"),
        B::CastSend(_) | B::CastRecv(_) => (&[Role::Operator], "start casts"),
        B::Fetch(_) => (&[Role::Operator], "order fetches"),
        B::Whereabouts(_) => (&[Role::Host], "ask where a VM stands (host to host)"),
    }
}

/// Serves one connection: admits its request, then hands it to its
/// handler.
async fn connection(
    agent: Arc<Agent>,
    stream: tokio::net::TcpStream,
    arrival: (Arrival, Arc<tokio::sync::Notify>),
) {
    if let Some((call, body)) = admit(agent, stream, arrival).await {
        requests::dispatch(call, body).await;
    }
}

/// Authenticates a connection, reads its one request and checks that the
/// caller's role may make it; refusals are answered and counted here.
async fn admit(
    agent: Arc<Agent>,
    stream: tokio::net::TcpStream,
    (arrival, evicted): (Arrival, Arc<tokio::sync::Notify>),
) -> Option<(requests::Call, v1::agent_request::Body)> {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    let t0 = Instant::now();
    let handshake = tokio::select! {
        r = AsyncChannel::server(stream, agent.tls()) => r,
        () = evicted.notified() => {
            debug!("dropped {peer}'s handshake to make room for newer ones");
            return None;
        }
    };
    let mut ch = match handshake {
        Ok(ch) => ch,
        Err(e) => {
            counter!(crate::metrics::REFUSED).increment(1);
            warn!("refused {peer}: {e}");
            return None;
        }
    };
    let slot = match arrival.admit() {
        Ok(s) => s,
        // Counted when it was dropped.
        Err(pagecast_channel::gate::Refused::Evicted) => return None,
        Err(e) => {
            counter!(crate::metrics::OVER_LIMIT).increment(1);
            warn!("turned away {peer} ({}): {e}", ch.peer_name());
            return None;
        }
    };
    let body = match ch
        .recv::<v1::AgentRequest>("request", REQUEST_TIMEOUT)
        .await
    {
        Ok(v1::AgentRequest { body: Some(b) }) => b,
        Ok(v1::AgentRequest { body: None }) => {
            counter!(crate::metrics::BAD_REQUESTS).increment(1);
            let why = "malformed request: it names no operation";
            reply(&mut ch, error(RefusalCode::Invalid, why)).await;
            return None;
        }
        Err(e) => {
            counter!(crate::metrics::BAD_REQUESTS).increment(1);
            warn!("bad request from {} ({peer}): {e}", ch.peer_name());
            if !matches!(e, AuthError::Closed { .. } | AuthError::Io { .. }) {
                let why = format!("malformed request: {e}");
                reply(&mut ch, error(RefusalCode::Invalid, why)).await;
            }
            return None;
        }
    };
    let who = ch.identity().clone();
    debug!(
        "{who} ({peer}) asks to {}: handshake and request in {:.3} s",
        allowed(&body).1,
        t0.elapsed().as_secs_f64()
    );
    if let Some(why) = forbidden(&who, &body) {
        counter!(crate::metrics::FORBIDDEN).increment(1);
        warn!("refused a request from {peer}: {why}");
        reply(&mut ch, error(RefusalCode::Forbidden, why)).await;
        return None;
    }
    let call = requests::Call {
        agent,
        ch,
        who,
        peer,
        _slot: slot,
    };
    Some((call, body))
}

/// Why `who` may not make request `body`, if it may not.
fn forbidden(who: &pagecast_channel::Identity, body: &v1::agent_request::Body) -> Option<String> {
    let (roles, what) = allowed(body);
    if !roles.contains(&who.role) {
        return Some(format!("{who} may not {what}"));
    }
    match body {
        v1::agent_request::Body::Incoming(v1::MigrateIncoming { source, .. })
            if *source != who.name =>
        {
            Some(format!("{who} may not migrate a VM in as host {source:?}"))
        }
        _ => None,
    }
}

fn send_blocking(ch: &mut Channel, body: Resp) -> Result<(), AgentError> {
    Ok(ch.send(&v1::AgentResponse { body: Some(body) })?)
}

/// Progress to a client: at most [`PROGRESS_PER_SECOND`] reports a second
/// (every change of phase to held goes at once), and the last one again
/// every second while nothing new comes (a QEMU stream reports nothing
/// the proxy could pass on), so the client can tell a slow migration from
/// a stuck agent.
struct ProgressLink {
    writer: Arc<Mutex<pagecast_channel::ChannelWriter>>,
    last: Mutex<(Option<Instant>, v1::MigrateProgress)>,
    gone: std::sync::atomic::AtomicBool,
}

impl ProgressLink {
    fn new(writer: Arc<Mutex<pagecast_channel::ChannelWriter>>) -> Arc<Self> {
        Arc::new(ProgressLink {
            writer,
            last: Mutex::new((None, v1::MigrateProgress::default())),
            gone: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn send(&self, body: Resp) -> bool {
        let ok = self
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(&v1::AgentResponse { body: Some(body) })
            .is_ok();
        if !ok {
            self.gone.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        ok
    }

    /// Passes `p` on unless one went less than a tenth of a second ago.
    fn progress(&self, p: &Progress) {
        if self.gone.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let gap = Duration::from_secs(1) / PROGRESS_PER_SECOND;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.1 = p.to_proto();
        if last.0.is_some_and(|t| t.elapsed() < gap) && p.phase != v1::MigratePhase::Held {
            return;
        }
        last.0 = Some(Instant::now());
        let msg = last.1;
        drop(last);
        self.send(Resp::Progress(msg));
    }

    /// Re-sends the last report each second nothing else went, until
    /// `stop` is dropped.
    fn heartbeat(
        self: &Arc<Self>,
        stop: std::sync::mpsc::Receiver<()>,
    ) -> std::thread::JoinHandle<()> {
        let me = self.clone();
        std::thread::spawn(move || {
            loop {
                match stop.recv_timeout(Duration::from_millis(250)) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                if me.gone.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let mut last = me.last.lock().unwrap_or_else(|e| e.into_inner());
                if last.0.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                    continue;
                }
                last.0 = Some(Instant::now());
                let msg = last.1;
                drop(last);
                me.send(Resp::Progress(msg));
            }
        })
    }
}

/// Runs a migration out for a client, whatever the VM's kind, streaming
/// progress to it. If the client goes away the migration carries on (its
/// outcome shows in `vm list` and the agent's log), except while it is
/// held for a gang job: then it is abandoned and the VM stays here.
fn migrate_out(agent: &Agent, ch: Channel, r: v1::MigrateRequest, job: Arc<crate::jobs::Job>) {
    info!("migrating {} to {} for {}", r.vm, r.to, ch.peer_name());
    let (reader, writer) = match ch.split() {
        Ok(x) => x,
        Err(e) => {
            warn!("migration of {}: {e}", r.vm);
            return;
        }
    };
    let writer = Arc::new(Mutex::new(writer));
    // A gang job's needs and go travel on this connection.
    let holding = r.hold.then(|| agent.hold_silence());
    let mut hold = crate::job::CoordinatorHold::new(writer.clone(), reader, holding, job, &r.vm);
    let link = ProgressLink::new(writer);
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let beat = link.heartbeat(stopped);
    let res = agent.migrate_out_held(&r, &mut |p| link.progress(p), Some(&mut hold));
    drop(stop);
    let _ = beat.join();
    let result = match res {
        Ok(rep) => {
            info!(
                "migrated {} to {}: {} pages sent, {} filled there, downtime {:.1} ms, total {:.0} ms",
                r.vm, r.to, rep.pages_sent, rep.pages_local, rep.downtime_ms, rep.total_ms
            );
            rep
        }
        Err(e) => {
            let in_doubt = matches!(e, AgentError::Migration(MigrationError::InDoubt(_)));
            warn!("migration of {} to {} failed: {e}", r.vm, r.to);
            v1::MigrateResult {
                ok: false,
                error: Some(e.refusal()),
                in_doubt,
                // The VM's kind, where it is still here, so that a report of
                // a QEMU VM's failure does not read as a micro-VM's.
                kind: agent.hosted(&r.vm).map_or(0, |v| v.info().kind),
                ..Default::default()
            }
        }
    };
    link.send(Resp::Result(result));
}

/// Runs a clone for a client, whatever the VM's kind, streaming progress.
fn clone_out(agent: &Agent, ch: Channel, r: &v1::CloneRequest) {
    let (_reader, writer) = match ch.split() {
        Ok(x) => x,
        Err(e) => {
            warn!("clone of {}: {e}", r.vm);
            return;
        }
    };
    let link = ProgressLink::new(Arc::new(Mutex::new(writer)));
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let beat = link.heartbeat(stopped);
    let res = agent.clone_out(r, &mut |p| link.progress(p));
    drop(stop);
    let _ = beat.join();
    let body = match res {
        Ok(c) => {
            info!(
                "cloned {} to {} host(s): ok {}, downtime {:.1} ms",
                r.vm,
                c.clones.len(),
                c.ok,
                c.downtime_ms
            );
            Resp::CloneResult(c)
        }
        Err(e) => Resp::Error(e.to_proto()),
    };
    link.send(body);
}

fn migrate_in(agent: &Agent, ch: Channel, source: &str, job: &str) {
    let from = format!("{source} ({})", ch.peer());
    debug!("incoming migration from {from} (job {job})");
    let mut link = ChannelLink::new(ch);
    match agent.migrate_in(&mut link, source, job) {
        Ok(rep) => {
            info!(
                "received {} from {from}: {} pages filled locally, {} received, running \
                 (manifest read in {:.2} s, local fill {:.2} s)",
                rep.vm, rep.pages_local, rep.pages_received, rep.manifest_s, rep.local_fill_s
            );
            if rep.postcopy {
                let r = rep.resume;
                info!(
                    "{}: post-copy switchover here, in ms after the source's message: \
                     missing list and vCPU read {:.0}, checked {:.0}, commit heard {:.0}, \
                     memory ready {:.0}, started {:.0}",
                    rep.vm, r.read_ms, r.checked_ms, r.commit_ms, r.memory_ms, r.started_ms
                );
            }
            if rep.postcopy_gathered + rep.postcopy_gather_lost > 0 {
                info!(
                    "{}: {} pages gathered from intermediaries, {} asked of the source instead{}",
                    rep.vm,
                    rep.postcopy_gathered,
                    rep.postcopy_gather_lost,
                    if rep.postcopy_gather_error.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", rep.postcopy_gather_error)
                    }
                );
            }
        }
        Err(e) => warn!("incoming migration from {from} failed, nothing kept: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagecast_channel::Identity;
    use v1::agent_request::Body as B;

    fn who(name: &str, role: Role) -> Identity {
        Identity {
            name: name.into(),
            role,
        }
    }

    #[test]
    fn each_request_is_open_to_its_roles_only() {
        let host = who("h1", Role::Host);
        let op = who("ops", Role::Operator);
        let reader = who("r", Role::Reader);
        let index = who("index-1", Role::Index);
        let list = B::VmList(v1::VmListRequest {});
        for w in [&host, &op, &reader] {
            assert!(forbidden(w, &list).is_none(), "{w} lists VMs");
        }
        assert!(forbidden(&index, &list).is_some());
        let start = B::VmStart(v1::VmStartRequest::default());
        assert!(forbidden(&op, &start).is_none());
        for w in [&host, &reader] {
            let why = forbidden(w, &start).unwrap();
            assert!(why.contains("may not start VMs"), "{why}");
        }
        // Host to host only: an operator does not push a migration in, and
        // a host does not order one.
        let incoming = B::Incoming(v1::MigrateIncoming {
            source: "h1".into(),
            job: "j".into(),
        });
        assert!(forbidden(&host, &incoming).is_none());
        assert!(forbidden(&op, &incoming).is_some());
        assert!(forbidden(&host, &B::Migrate(v1::MigrateRequest::default())).is_some());
        for b in [
            B::JobOpen(v1::JobOpen::default()),
            B::Go(v1::JobGo::default()),
            B::CastRecv(v1::CastRecvRequest::default()),
        ] {
            assert!(forbidden(&host, &b).is_some(), "{b:?}");
            assert!(forbidden(&op, &b).is_none(), "{b:?}");
        }
    }

    #[test]
    fn a_host_migrates_in_under_its_own_name_only() {
        let incoming = |source: &str| {
            B::Incoming(v1::MigrateIncoming {
                source: source.into(),
                job: "j".into(),
            })
        };
        let why = forbidden(&who("h2", Role::Host), &incoming("h1")).unwrap();
        assert!(why.contains("as host \"h1\""), "{why}");
        assert!(forbidden(&who("h1", Role::Host), &incoming("h1")).is_none());
    }

    #[test]
    fn an_implicit_job_names_its_vm() {
        let j = implicit_job("web1");
        let ms = j.strip_prefix("migrate:web1:").unwrap();
        assert!(ms.parse::<u128>().unwrap() > 0, "{j}");
    }
}
