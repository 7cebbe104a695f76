//! A blocking client of the agent's control API, for the CLI and for tools
//! that drive agents.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use pagecast_channel::{Channel, Secret};
use pagecast_proto::v1;

use crate::AgentError;

type Resp = v1::agent_response::Body;
type Req = v1::agent_request::Body;

/// How long to wait to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for an answer (a large synthetic VM takes a while to
/// boot; a migration sends progress at least this often).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

/// One authenticated connection to an agent.
pub struct AgentClient {
    addr: String,
    ch: Channel,
}

impl AgentClient {
    /// Connects to the agent at `addr` (HOST:PORT) and authenticates as
    /// `name` with the cluster secret.
    pub fn connect(addr: &str, secret: &Secret, name: &str) -> Result<Self, AgentError> {
        let connect_err = |source| AgentError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let mut last = None;
        let addrs = addr.to_socket_addrs().map_err(connect_err)?;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    let ch = Channel::client(s, secret, name)?;
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

    /// The agent's address as given.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The agent's name (from the handshake).
    pub fn agent_name(&self) -> &str {
        self.ch.peer_name()
    }

    fn send(&mut self, body: Req) -> Result<(), AgentError> {
        Ok(self.ch.send(&v1::AgentRequest { body: Some(body) })?)
    }

    fn recv(&mut self) -> Result<Resp, AgentError> {
        let r: v1::AgentResponse = self.ch.recv("agent response")?;
        match r.body {
            Some(Resp::Error(e)) => Err(AgentError::Remote {
                addr: self.addr.clone(),
                code: v1::RefusalCode::try_from(e.code).unwrap_or(v1::RefusalCode::Unspecified),
                message: e.message,
            }),
            Some(b) => Ok(b),
            None => Err(self.unexpected("an empty response")),
        }
    }

    fn unexpected(&self, what: impl std::fmt::Debug) -> AgentError {
        AgentError::Unexpected {
            addr: self.addr.clone(),
            what: format!("{what:?}"),
        }
    }

    /// Starts a VM.
    pub fn vm_start(mut self, r: v1::VmStartRequest) -> Result<v1::VmInfo, AgentError> {
        self.send(Req::VmStart(r))?;
        match self.recv()? {
            Resp::Vm(v) => Ok(v),
            other => Err(self.unexpected(other)),
        }
    }

    /// Lists the VMs.
    pub fn vm_list(mut self) -> Result<v1::VmList, AgentError> {
        self.send(Req::VmList(v1::VmListRequest {}))?;
        match self.recv()? {
            Resp::List(l) => Ok(l),
            other => Err(self.unexpected(other)),
        }
    }

    /// Stops a VM.
    pub fn vm_stop(mut self, name: &str) -> Result<v1::VmInfo, AgentError> {
        self.send(Req::VmStop(v1::VmStopRequest {
            name: name.to_owned(),
        }))?;
        match self.recv()? {
            Resp::Vm(v) => Ok(v),
            other => Err(self.unexpected(other)),
        }
    }

    /// Changes a VM's page-write rate.
    pub fn vm_set(mut self, name: &str, dirty_rate: u64) -> Result<v1::VmInfo, AgentError> {
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
    ) -> Result<v1::AuditResponse, AgentError> {
        self.send(Req::Audit(v1::AuditRequest {
            shards,
            ledger_only,
        }))?;
        match self.recv()? {
            Resp::Audit(a) => Ok(a),
            other => Err(self.unexpected(other)),
        }
    }

    /// Asks the agent to migrate a VM, calling `progress` with each report
    /// until the result arrives. A failed migration is a result with
    /// `ok == false`, not an error: errors are about this connection.
    pub fn migrate(
        mut self,
        r: v1::MigrateRequest,
        progress: &mut dyn FnMut(&v1::MigrateProgress),
    ) -> Result<v1::MigrateResult, AgentError> {
        self.send(Req::Migrate(r))?;
        loop {
            match self.recv()? {
                Resp::Progress(p) => progress(&p),
                Resp::Result(r) => return Ok(r),
                other => return Err(self.unexpected(other)),
            }
        }
    }
}
