//! A blocking client of the agent's control API over mutual TLS: one
//! connection per request (a migration or a cast reports on its own until
//! it ends).

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use pagecast_channel::{Channel, Tls};
use pagecast_proto::v1;

use crate::ClientError;
use crate::answers::{self, AnswerError};

type Resp = v1::agent_response::Body;
type Req = v1::agent_request::Body;

/// How long to wait to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for an answer (a large synthetic VM takes a while to
/// boot).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a migration under way may go without a report before its agent
/// counts as failed.
pub const MIGRATION_SILENCE: Duration = Duration::from_secs(30);

/// One authenticated connection to an agent.
pub struct AgentClient {
    addr: String,
    ch: Channel,
}

impl AgentClient {
    /// Connects to the agent at `addr` (HOST:PORT) over mutual TLS with the
    /// identity `tls`; the agent must present a host certificate.
    pub fn connect(addr: &str, tls: &Tls) -> Result<Self, ClientError> {
        let connect_err = |source| ClientError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let mut last = None;
        let addrs = addr.to_socket_addrs().map_err(connect_err)?;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    let ch = Channel::client(s, tls)?;
                    pagecast_channel::require(
                        ch.identity(),
                        &[pagecast_channel::Role::Host],
                        ch.peer(),
                        "serve as an agent",
                    )?;
                    ch.set_read_timeout(Some(ANSWER_TIMEOUT))?;
                    return Ok(AgentClient {
                        addr: addr.to_owned(),
                        ch,
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(connect_err(last.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the name resolves to no address",
            )
        })))
    }

    /// Waits at most `d` for each answer from now on.
    pub fn with_answer_timeout(self, d: Duration) -> Result<Self, ClientError> {
        self.ch.set_read_timeout(Some(d))?;
        Ok(self)
    }

    /// The agent's address as given.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The agent's name (from the handshake).
    pub fn agent_name(&self) -> &str {
        self.ch.peer_name()
    }

    fn send(&mut self, body: Req) -> Result<(), ClientError> {
        Ok(self.ch.send(&v1::AgentRequest { body: Some(body) })?)
    }

    fn recv(&mut self) -> Result<Resp, ClientError> {
        let r: v1::AgentResponse = self.ch.recv("agent response")?;
        answers::body(r).map_err(|e| answer_error(&self.addr, e))
    }

    fn unexpected(&self, what: impl std::fmt::Debug) -> ClientError {
        ClientError::Unexpected {
            addr: self.addr.clone(),
            what: format!("{what:?}"),
        }
    }

    /// Starts a VM.
    pub fn vm_start(mut self, r: v1::VmStartRequest) -> Result<v1::VmInfo, ClientError> {
        self.send(Req::VmStart(r))?;
        match self.recv()? {
            Resp::Vm(v) => Ok(v),
            other => Err(self.unexpected(other)),
        }
    }

    /// Adopts a QEMU VM.
    pub fn vm_adopt(mut self, r: v1::VmAdoptRequest) -> Result<v1::VmInfo, ClientError> {
        self.send(Req::VmAdopt(r))?;
        match self.recv()? {
            Resp::Vm(v) => Ok(v),
            other => Err(self.unexpected(other)),
        }
    }

    /// Where the VM `name` stands at this agent (asked host to host after
    /// an unconfirmed switchover).
    pub fn whereabouts(mut self, name: &str, job: &str) -> Result<v1::Whereabouts, ClientError> {
        self.send(Req::Whereabouts(v1::VmWhereabouts {
            vm: name.to_owned(),
            job: job.to_owned(),
        }))?;
        match self.recv()? {
            Resp::Whereabouts(w) => match v1::Whereabouts::try_from(w.state) {
                Ok(w) if w != v1::Whereabouts::Unspecified => Ok(w),
                _ => Err(self.unexpected(format!("whereabouts {}", w.state))),
            },
            other => Err(self.unexpected(other)),
        }
    }

    /// Lists the VMs.
    pub fn vm_list(mut self) -> Result<v1::VmList, ClientError> {
        self.send(Req::VmList(v1::VmListRequest {}))?;
        match self.recv()? {
            Resp::List(l) => Ok(l),
            other => Err(self.unexpected(other)),
        }
    }

    /// Stops a VM.
    pub fn vm_stop(mut self, name: &str) -> Result<v1::VmInfo, ClientError> {
        self.send(Req::VmStop(v1::VmStopRequest {
            name: name.to_owned(),
        }))?;
        match self.recv()? {
            Resp::Vm(v) => Ok(v),
            other => Err(self.unexpected(other)),
        }
    }

    /// Changes a VM's page-write rate.
    pub fn vm_set(mut self, name: &str, dirty_rate: u64) -> Result<v1::VmInfo, ClientError> {
        self.send(Req::VmSet(v1::VmSetRequest {
            name: name.to_owned(),
            dirty_rate,
        }))?;
        match self.recv()? {
            Resp::Vm(v) => Ok(v),
            other => Err(self.unexpected(other)),
        }
    }

    /// What the index should list for this agent's host, from a fresh hash
    /// of its VMs' memory, for an index of `shards` shards.
    pub fn audit(
        mut self,
        shards: u32,
        ledger_only: bool,
    ) -> Result<v1::AuditResponse, ClientError> {
        self.send(Req::Audit(v1::AuditRequest {
            shards,
            ledger_only,
        }))?;
        match self.recv()? {
            Resp::Audit(a) => Ok(a),
            other => Err(self.unexpected(other)),
        }
    }

    /// Starts a migration and returns the connection it reports on (for a
    /// held migration: [`HeldMigration::go`] releases it).
    pub fn start_migrate(mut self, r: v1::MigrateRequest) -> Result<HeldMigration, ClientError> {
        self.send(Req::Migrate(r))?;
        let (reader, writer) = self.ch.split()?;
        // A migration reports at least every 2 s (also while held); an agent
        // silent this long is dead or frozen.
        reader.set_read_timeout(Some(MIGRATION_SILENCE))?;
        Ok(HeldMigration {
            addr: self.addr,
            reports: answers::MigrationReports::default(),
            reader,
            writer: std::sync::Arc::new(std::sync::Mutex::new(writer)),
        })
    }

    /// The distinct contents of a VM as the agent's content map holds them
    /// now: hashes, frames, non-zero frames, memory bytes.
    /// Only an operator may read it; `job` names the job it is read for,
    /// for the agent's log (empty: for planning).
    pub fn vm_content(mut self, name: &str, job: &str) -> Result<VmContentAnswer, ClientError> {
        self.send(Req::VmContent(v1::VmContentRequest {
            name: name.to_owned(),
            job: job.to_owned(),
        }))?;
        let mut parts = answers::ContentParts::default();
        loop {
            let r: v1::AgentResponse = self.ch.recv("agent response")?;
            if let Some(all) = parts.push(r).map_err(|e| answer_error(&self.addr, e))? {
                return Ok(all);
            }
        }
    }

    /// Asks the agent to send a cast; returns where receivers connect and
    /// the connection the result comes on.
    pub fn cast_send(
        mut self,
        r: v1::CastSendRequest,
    ) -> Result<(v1::CastOpen, CastWait), ClientError> {
        self.send(Req::CastSend(r))?;
        match self.recv()? {
            Resp::CastOpen(o) => Ok((o, CastWait { client: self })),
            other => Err(self.unexpected(other)),
        }
    }

    /// Asks the agent to receive a cast into a job's arriving VMs.
    pub fn cast_recv(mut self, r: v1::CastRecvRequest) -> Result<v1::CastResult, ClientError> {
        self.send(Req::CastRecv(r))?;
        match self.recv()? {
            Resp::CastResult(c) => Ok(c),
            other => Err(self.unexpected(other)),
        }
    }

    /// Asks the agent to clone a VM, calling `progress` with its reports.
    pub fn clone_vm(
        mut self,
        r: v1::CloneRequest,
        progress: &mut dyn FnMut(&v1::MigrateProgress),
    ) -> Result<v1::CloneResult, ClientError> {
        self.send(Req::Clone(r))?;
        loop {
            match self.recv()? {
                Resp::Progress(p) => progress(&p),
                Resp::CloneResult(c) => return Ok(c),
                other => return Err(self.unexpected(other)),
            }
        }
    }

    /// Opens (or joins) a job on the agent: true if it is new there.
    pub fn open_job(mut self, r: v1::JobOpen) -> Result<bool, ClientError> {
        self.send(Req::JobOpen(r))?;
        match self.recv()? {
            Resp::JobOpened(o) => Ok(o.newly),
            other => Err(self.unexpected(other)),
        }
    }

    /// Closes a job on the agent: true if it was open there.
    pub fn close_job(mut self, job: &str) -> Result<bool, ClientError> {
        self.send(Req::JobClose(v1::JobClose {
            job: job.to_owned(),
        }))?;
        match self.recv()? {
            Resp::JobOpened(o) => Ok(o.newly),
            other => Err(self.unexpected(other)),
        }
    }

    /// Releases (or, `abort`, gives up) the held migration of `vm` in
    /// `job`, from any connection.
    pub fn go(mut self, job: &str, vm: &str, abort: bool, reason: &str) -> Result<(), ClientError> {
        self.send(Req::Go(v1::JobGo {
            abort,
            reason: reason.to_owned(),
            job: job.to_owned(),
            vm: vm.to_owned(),
        }))?;
        match self.recv()? {
            Resp::GoTaken(_) => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }

    /// Cancels a gang job on the agent.
    pub fn cancel_job(mut self, job: &str) -> Result<bool, ClientError> {
        self.send(Req::CancelJob(v1::CancelJobRequest {
            job: job.to_owned(),
        }))?;
        match self.recv()? {
            Resp::Cancelled(c) => Ok(c.newly),
            other => Err(self.unexpected(other)),
        }
    }

    /// Asks the agent to fetch pages from a rack-mate into a job's arriving
    /// VMs.
    pub fn fetch(mut self, r: v1::FetchRequest) -> Result<v1::FetchResult, ClientError> {
        self.send(Req::Fetch(r))?;
        match self.recv()? {
            Resp::FetchResult(f) => Ok(f),
            other => Err(self.unexpected(other)),
        }
    }
}

/// What [`AgentClient::vm_content`] answers.
#[derive(Debug, Clone, Default)]
pub struct VmContentAnswer {
    /// Distinct non-zero contents, sorted.
    pub hashes: Vec<pagecast_pages::PageHash>,
    /// Guest frames.
    pub frames: u64,
    /// Non-zero frames.
    pub nonzero_frames: u64,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// Distinct pages its guest rewrites a second (0: not measured yet).
    pub rewrite_pages_per_s: f64,
    /// Its kind.
    pub kind: v1::VmKind,
}

/// A cast under way: its result comes on this connection.
pub struct CastWait {
    client: AgentClient,
}

impl CastWait {
    /// Waits at most `d` for the result from now on.
    pub fn within(self, d: Duration) -> Result<Self, ClientError> {
        Ok(CastWait {
            client: self.client.with_answer_timeout(d)?,
        })
    }

    /// Waits for the cast's result.
    pub fn result(mut self) -> Result<v1::CastResult, ClientError> {
        match self.client.recv()? {
            Resp::CastResult(c) => Ok(c),
            other => Err(self.client.unexpected(other)),
        }
    }
}

/// What a migration under way reports.
#[derive(Debug, Clone)]
pub enum MigrationEvent {
    /// Progress.
    Progress(v1::MigrateProgress),
    /// It is held: the destination lacks these contents, having filled
    /// this many frames from what it holds.
    Held(Vec<pagecast_pages::PageHash>, u64),
    /// It ended.
    Result(v1::MigrateResult),
}

/// A migration under way, reporting on its connection.
pub struct HeldMigration {
    addr: String,
    reports: answers::MigrationReports,
    reader: pagecast_channel::ChannelReader,
    writer: std::sync::Arc<std::sync::Mutex<pagecast_channel::ChannelWriter>>,
}

/// A way to release or stop a migration under way from another thread.
#[derive(Clone)]
pub struct MigrationHandle {
    writer: std::sync::Arc<std::sync::Mutex<pagecast_channel::ChannelWriter>>,
}

impl MigrationHandle {
    /// Releases a held migration (or, with `abort`, gives it up; sent after
    /// the release, `abort` stops the migration before its switchover). The
    /// VM then stays at its source.
    pub fn go(&self, abort: bool, reason: &str) -> Result<(), ClientError> {
        Ok(self
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(&v1::AgentRequest {
                body: Some(Req::Go(v1::JobGo {
                    abort,
                    reason: reason.to_owned(),
                    ..v1::JobGo::default()
                })),
            })?)
    }
}

impl MigrationHandle {
    /// Tells the agent the coordinator lives (see
    /// `MigrationControl::keep_alive`): a small frame, sent only while
    /// nothing else holds the connection's writer.
    pub fn keep_alive(&self) -> Result<(), ClientError> {
        let mut w = match self.writer.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
        };
        Ok(w.send(&v1::AgentRequest {
            body: Some(Req::KeepAlive(v1::JobKeepAlive {})),
        })?)
    }
}

impl HeldMigration {
    /// A handle to release or stop it from another thread.
    pub fn handle(&self) -> MigrationHandle {
        MigrationHandle {
            writer: self.writer.clone(),
        }
    }

    /// The next report (a Held list comes whole).
    pub fn next_event(&mut self) -> Result<MigrationEvent, ClientError> {
        loop {
            let r: v1::AgentResponse = self.reader.recv("migration report")?;
            if let Some(e) = self
                .reports
                .push(r)
                .map_err(|e| answer_error(&self.addr, e))?
            {
                return Ok(e);
            }
        }
    }
}

/// An answer refused by [`answers`], as a failure of the agent at `addr`.
fn answer_error(addr: &str, e: AnswerError) -> ClientError {
    match e {
        AnswerError::Remote { code, message } => ClientError::Refused {
            addr: addr.to_owned(),
            code,
            message,
        },
        other => ClientError::Unexpected {
            addr: addr.to_owned(),
            what: other.to_string(),
        },
    }
}
