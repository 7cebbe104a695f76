//! The agents' control API as its callers see it.
//!
//! - [`AgentApi`]: every request a caller makes of an agent, one call per
//!   request, to the agent at an address (`HOST:PORT`). The coordinator,
//!   the CLI and the tests drive agents through it; the coordinator's unit
//!   tests drive an in-memory cluster that implements it.
//! - [`Remote`]: the implementation over the network: one connection per
//!   request, mutual TLS, the caller's identity ([`client::AgentClient`]).
//! - [`answers`]: the answers, checked and bounded before they are used.
//! - [`ClientError`]: why a call failed, with the refusal code to decide on.
//!
//! This crate carries none of the daemon's weight (KVM, QEMU, tokio): a
//! program that only drives agents builds without it.

pub mod answers;
pub mod client;
mod error;

use std::sync::Arc;
use std::time::Duration;

use pagecast_channel::Tls;
use pagecast_proto::v1;

pub use client::{AgentClient, MigrationEvent, VmContentAnswer};
pub use error::ClientError;

/// A migration under way: its reports, one at a time, until its result.
pub trait Migration: Send {
    /// The next report (a held list comes whole).
    fn next_event(&mut self) -> Result<MigrationEvent, ClientError>;
    /// A way to release or stop it from another thread.
    fn control(&self) -> Arc<dyn MigrationControl>;
}

/// Releases or stops a migration under way.
pub trait MigrationControl: Send + Sync {
    /// Releases a held migration (or, with `abort`, gives it up; sent after
    /// the release, `abort` stops the migration before its switchover: the
    /// VM stays at its source).
    fn go(&self, abort: bool, reason: &str) -> Result<(), ClientError>;

    /// Tells the agent the coordinator lives: a held migration that hears
    /// nothing from its coordinator for the agent's hold silence (30 s by
    /// default) is abandoned. Sent about once a second while it is held.
    fn keep_alive(&self) -> Result<(), ClientError> {
        Ok(())
    }
}

/// A cast under way at its sender: its result, when it ends.
pub trait CastPending: Send {
    /// Waits for the cast's result.
    fn result(self: Box<Self>) -> Result<v1::CastResult, ClientError>;
}

/// Every request a caller makes of an agent.
pub trait AgentApi: Send + Sync {
    /// The agent's VMs.
    fn vm_list(&self, agent: &str) -> Result<v1::VmList, ClientError>;
    /// The distinct contents of a VM as the agent's content map holds them.
    /// `job` names the job it is read for.
    fn vm_content(&self, agent: &str, vm: &str, job: &str) -> Result<VmContentAnswer, ClientError>;
    /// Starts a migration (held for a gang job if `r.hold`).
    fn migrate(
        &self,
        agent: &str,
        r: v1::MigrateRequest,
    ) -> Result<Box<dyn Migration>, ClientError>;
    /// Starts a cast at its sender, answered within `within`: where
    /// receivers connect, and its result to come.
    fn cast_send(
        &self,
        agent: &str,
        r: v1::CastSendRequest,
        within: Duration,
    ) -> Result<(v1::CastOpen, Box<dyn CastPending>), ClientError>;
    /// Receives a cast into a job's arriving VMs; its result within `within`.
    fn cast_recv(
        &self,
        agent: &str,
        r: v1::CastRecvRequest,
        within: Duration,
    ) -> Result<v1::CastResult, ClientError>;
    /// Fetches pages from a rack-mate into a job's arriving VMs; its result
    /// within `within`.
    fn fetch(
        &self,
        agent: &str,
        r: v1::FetchRequest,
        within: Duration,
    ) -> Result<v1::FetchResult, ClientError>;
    /// Clones a VM to the request's targets, reporting progress.
    fn clone_vm(
        &self,
        agent: &str,
        r: v1::CloneRequest,
        progress: &mut dyn FnMut(&v1::MigrateProgress),
    ) -> Result<v1::CloneResult, ClientError>;
    /// Cancels a job on the agent: true if it was not cancelled before.
    fn cancel_job(&self, agent: &str, job: &str) -> Result<bool, ClientError>;
    /// Opens (or joins) a job on the agent: true if it is new there.
    fn open_job(&self, agent: &str, r: v1::JobOpen) -> Result<bool, ClientError>;
    /// Closes a job on the agent: true if it was open there.
    fn close_job(&self, agent: &str, job: &str) -> Result<bool, ClientError>;
}

/// How long a bookkeeping request (a job's opening, closing or
/// cancelling; an agent's VM list) waits for its answer: the agent
/// answers those from memory at once, so one that has not answered in
/// this time is frozen or cut off, and a coordinator telling many agents
/// must not wait on it for [`client::ANSWER_TIMEOUT`].
pub const QUICK_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a source agent may take to open a cast session and say where
/// (it lists the cast's pages from its content map and answers; the pages
/// are read while the session runs).
pub const CAST_OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// How many agents requests to many agents (a job's opening, closing and
/// cancelling; VM lists; a clone's targets; VMs in doubt) go to at once.
pub const AT_ONCE: usize = 32;

/// `call` on each of `items`, [`AT_ONCE`] at a time, the results in their
/// order: for requests to many agents where one that is frozen must cost
/// one request's deadline per [`AT_ONCE`] agents, not one each.
pub fn at_once<I: Sync, T: Send>(items: &[I], call: impl Fn(&I) -> T + Sync) -> Vec<T> {
    let call = &call;
    let mut out = Vec::with_capacity(items.len());
    for some in items.chunks(AT_ONCE) {
        std::thread::scope(|s| {
            let running: Vec<_> = some.iter().map(|i| s.spawn(move || call(i))).collect();
            out.extend(
                running
                    .into_iter()
                    .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
            );
        });
    }
    out
}

/// The agents over the network, as the holder of `tls`.
#[derive(Clone)]
pub struct Remote {
    tls: Tls,
}

impl Remote {
    /// Calls agents with the identity `tls`.
    pub fn new(tls: Tls) -> Self {
        Remote { tls }
    }

    fn connect(&self, agent: &str) -> Result<AgentClient, ClientError> {
        AgentClient::connect(agent, &self.tls)
    }

    /// A connection for a bookkeeping request ([`QUICK_ANSWER_TIMEOUT`]).
    fn for_job(&self, agent: &str) -> Result<AgentClient, ClientError> {
        self.connect(agent)?
            .with_answer_timeout(QUICK_ANSWER_TIMEOUT)
    }
}

struct RemoteMigration {
    m: client::HeldMigration,
}

impl Migration for RemoteMigration {
    fn next_event(&mut self) -> Result<MigrationEvent, ClientError> {
        self.m.next_event()
    }
    fn control(&self) -> Arc<dyn MigrationControl> {
        Arc::new(self.m.handle())
    }
}

impl MigrationControl for client::MigrationHandle {
    fn go(&self, abort: bool, reason: &str) -> Result<(), ClientError> {
        client::MigrationHandle::go(self, abort, reason)
    }
    fn keep_alive(&self) -> Result<(), ClientError> {
        client::MigrationHandle::keep_alive(self)
    }
}

impl CastPending for client::CastWait {
    fn result(self: Box<Self>) -> Result<v1::CastResult, ClientError> {
        client::CastWait::result(*self)
    }
}

impl AgentApi for Remote {
    fn vm_list(&self, agent: &str) -> Result<v1::VmList, ClientError> {
        self.for_job(agent)?.vm_list()
    }

    fn vm_content(&self, agent: &str, vm: &str, job: &str) -> Result<VmContentAnswer, ClientError> {
        // A QEMU VM's memory is hashed afresh for it, which can take
        // minutes: the answer has client::ANSWER_TIMEOUT.
        self.connect(agent)?.vm_content(vm, job)
    }

    fn migrate(
        &self,
        agent: &str,
        r: v1::MigrateRequest,
    ) -> Result<Box<dyn Migration>, ClientError> {
        let m = self.connect(agent)?.start_migrate(r)?;
        Ok(Box::new(RemoteMigration { m }))
    }

    fn cast_send(
        &self,
        agent: &str,
        r: v1::CastSendRequest,
        within: Duration,
    ) -> Result<(v1::CastOpen, Box<dyn CastPending>), ClientError> {
        // The session's opening comes at once; its result at its end.
        let (open, wait) = self
            .connect(agent)?
            .with_answer_timeout(within.min(CAST_OPEN_TIMEOUT))?
            .cast_send(r)?;
        Ok((open, Box::new(wait.within(within)?)))
    }

    fn cast_recv(
        &self,
        agent: &str,
        r: v1::CastRecvRequest,
        within: Duration,
    ) -> Result<v1::CastResult, ClientError> {
        self.connect(agent)?
            .with_answer_timeout(within)?
            .cast_recv(r)
    }

    fn fetch(
        &self,
        agent: &str,
        r: v1::FetchRequest,
        within: Duration,
    ) -> Result<v1::FetchResult, ClientError> {
        self.connect(agent)?.with_answer_timeout(within)?.fetch(r)
    }

    fn clone_vm(
        &self,
        agent: &str,
        r: v1::CloneRequest,
        progress: &mut dyn FnMut(&v1::MigrateProgress),
    ) -> Result<v1::CloneResult, ClientError> {
        // The source reports every second while it clones.
        self.connect(agent)?
            .with_answer_timeout(client::MIGRATION_SILENCE)?
            .clone_vm(r, progress)
    }

    fn cancel_job(&self, agent: &str, job: &str) -> Result<bool, ClientError> {
        self.for_job(agent)?.cancel_job(job)
    }
    fn open_job(&self, agent: &str, r: v1::JobOpen) -> Result<bool, ClientError> {
        self.for_job(agent)?.open_job(r)
    }
    fn close_job(&self, agent: &str, job: &str) -> Result<bool, ClientError> {
        self.for_job(agent)?.close_job(job)
    }
}

#[cfg(test)]
mod remote_tests {
    use std::net::TcpListener;
    use std::time::Instant;

    use pagecast_channel::{Channel, Role, ca::Authority};

    use super::*;

    /// An agent (a real host certificate) that takes a job's request and
    /// then never answers, as one frozen after its handshake would: the
    /// caller gives up at [`QUICK_ANSWER_TIMEOUT`], each request on its own
    /// connection. Before, it waited the 300 s every answer was allowed.
    #[test]
    fn a_job_request_to_an_agent_that_never_answers_gives_up_at_its_deadline() {
        let ca = Authority::generate().unwrap();
        let agent = ca.issue("frozen", Role::Host, 1).unwrap();
        let op = Remote::new(ca.issue("ops", Role::Operator, 1).unwrap());
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming() {
                let Ok(s) = s else { return };
                let Ok(mut ch) = Channel::server(s, &agent) else {
                    continue;
                };
                // The request is read, and nothing is said.
                let _ = ch.recv::<v1::AgentRequest>("request");
                held.push(ch);
            }
        });
        let t = Instant::now();
        std::thread::scope(|s| {
            let calls = [
                s.spawn(|| op.close_job(&addr, "j").map(|_| ())),
                s.spawn(|| op.cancel_job(&addr, "j").map(|_| ())),
                s.spawn(|| {
                    let open = v1::JobOpen {
                        job: "j".into(),
                        ..Default::default()
                    };
                    op.open_job(&addr, open).map(|_| ())
                }),
            ];
            for c in calls {
                assert!(c.join().unwrap().is_err(), "an answer from nobody");
            }
        });
        let took = t.elapsed();
        assert!(took >= QUICK_ANSWER_TIMEOUT, "gave up after {took:?}");
        assert!(
            took < QUICK_ANSWER_TIMEOUT + Duration::from_secs(5),
            "waited {took:?}"
        );
    }
}
