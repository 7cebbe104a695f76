//! One handler per request. A connection that passed [`super::admit`]
//! (authenticated, its request read, the caller's role allowed) becomes a
//! [`Call`], and [`dispatch`] hands it to the handler of its request.

use std::sync::Arc;

use pagecast_channel::{AsyncChannel, Channel, Identity};
use pagecast_proto::v1;
use pagecast_proto::v1::RefusalCode;
use tracing::{debug, info, info_span, warn};

use super::{Resp, error, implicit_job, job_peer, reply, send_blocking};
use crate::{Agent, AgentError};

/// An admitted request's connection, its caller and its agent.
pub(super) struct Call {
    pub agent: Arc<Agent>,
    pub ch: AsyncChannel,
    pub who: Identity,
    /// The caller's address, for logs.
    pub peer: String,
    /// Its connection's slot, held while it is served.
    pub _slot: pagecast_channel::gate::Admitted,
}

impl Call {
    /// Answers once and ends the call.
    async fn answer(mut self, body: Resp) {
        reply(&mut self.ch, body).await;
    }

    /// Runs `f` on a blocking thread with the connection turned blocking
    /// (for requests answered by a stream of frames).
    async fn blocking(self, what: &str, f: impl FnOnce(Arc<Agent>, Channel) + Send + 'static) {
        match self.ch.into_blocking() {
            Ok(ch) => {
                let a = self.agent;
                let _ = tokio::task::spawn_blocking(move || f(a, ch)).await;
            }
            Err(e) => warn!("{what} from {}: {e}", self.peer),
        }
    }

    /// Runs `f` on a blocking thread and answers what it returns.
    async fn answer_blocking(
        self,
        f: impl FnOnce(&Agent) -> Result<Resp, AgentError> + Send + 'static,
    ) {
        let a = self.agent.clone();
        let res = tokio::task::spawn_blocking(move || f(&a)).await;
        let body = match res {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => Resp::Error(e.to_proto()),
            Err(e) => error(RefusalCode::Internal, e),
        };
        self.answer(body).await;
    }

    /// The job `id` as this agent knows it, or the refusal sent.
    async fn job(&mut self, id: &str) -> Option<Arc<crate::jobs::Job>> {
        match self.agent.jobs().get(id) {
            Ok(j) => Some(j),
            Err(e) => {
                reply(&mut self.ch, Resp::Error(e.to_proto())).await;
                None
            }
        }
    }

    /// Opens (or joins) job `id` for the caller with `peers`, or sends the
    /// refusal.
    async fn open(&mut self, id: &str, peers: &[v1::JobPeer]) -> Option<Arc<crate::jobs::Job>> {
        match self.agent.jobs().open(id, &self.who, peers, None) {
            Ok((j, _)) => Some(j),
            Err(e) => {
                reply(&mut self.ch, Resp::Error(e.to_proto())).await;
                None
            }
        }
    }
}

/// Hands an admitted request to its handler.
pub(super) async fn dispatch(call: Call, body: v1::agent_request::Body) {
    use v1::agent_request::Body as B;
    match body {
        B::Whereabouts(q) => whereabouts(call, q).await,
        B::VmList(_) => call.answer_blocking(|a| Ok(Resp::List(a.vm_list()))).await,
        B::VmStart(r) => vm_start(call, r).await,
        B::VmSet(r) => {
            call.answer_blocking(move |a| a.vm_set(&r).map(Resp::Vm))
                .await
        }
        B::Audit(r) => {
            call.answer_blocking(move |a| Ok(Resp::Audit(a.audit(r.shards, r.ledger_only)?)))
                .await
        }
        B::VmStop(r) => {
            call.answer_blocking(move |a| {
                let info = a.vm_stop(&r.name)?;
                info!("stopped VM {}", info.name);
                Ok(Resp::Vm(info))
            })
            .await
        }
        B::VmAdopt(r) => {
            call.answer_blocking(move |a| a.vm_adopt(&r).map(Resp::Vm))
                .await
        }
        B::Migrate(r) => migrate(call, r).await,
        B::Clone(r) => clone(call, r).await,
        B::JobOpen(r) => job_open(call, r).await,
        B::JobClose(r) => {
            let newly = call.agent.jobs().close(&r.job);
            if newly {
                info!("job {} closed by {}", r.job, call.who);
            }
            call.answer(Resp::JobOpened(v1::JobOpened { newly })).await
        }
        B::CancelJob(r) => {
            let newly = call.agent.cancel_job(&r.job);
            if newly {
                info!("job {} cancelled", r.job);
            }
            call.answer(Resp::Cancelled(v1::JobCancelled { newly }))
                .await
        }
        B::Go(g) => go(call, g).await,
        B::KeepAlive(_) => {
            call.answer(error(
                RefusalCode::Invalid,
                "a keep-alive belongs on a held migration's own connection",
            ))
            .await
        }
        B::VmContent(r) => vm_content(call, r).await,
        B::CastSend(r) => cast_send(call, r).await,
        B::CastRecv(r) => cast_recv(call, r).await,
        B::Fetch(r) => fetch(call, r).await,
        B::FetchPages(r) => fetch_pages(call, r).await,
        B::Incoming(i) => incoming(call, i).await,
    }
}

/// Where a VM stands, for a host whose switchover to or from here went
/// unconfirmed.
async fn whereabouts(call: Call, q: v1::VmWhereabouts) {
    if call.agent.jobs().known(&q.job).is_none() {
        // Answered all the same: jobs do not outlive a restart, and a VM
        // in doubt must be settled after one.
        debug!(
            "{} asks about VM {:?} of job {:?}, unknown here",
            call.who, q.vm, q.job
        );
    }
    let state = call.agent.whereabouts(&q.vm);
    info!(
        "{} asked where VM {:?} stands: {}",
        call.who,
        q.vm,
        state.as_str_name()
    );
    call.answer(Resp::Whereabouts(v1::VmWhereaboutsAnswer {
        state: state as i32,
    }))
    .await
}

async fn vm_start(call: Call, r: v1::VmStartRequest) {
    let who = call.who.name.clone();
    call.answer_blocking(move |a| match a.vm_start(&r) {
        Ok(info) => {
            info!("started VM {} ({}) for {who}", info.name, info.origin);
            Ok(Resp::Vm(info))
        }
        Err(e) => {
            warn!("could not start VM {:?}: {e}", r.name);
            Err(e)
        }
    })
    .await
}

/// Starts (or joins) the job at the source, then runs the migration. A
/// request naming no job runs as a job of its own here, which its
/// destination refuses unless told of it (`pagecast migrate` tells it).
async fn migrate(mut call: Call, mut r: v1::MigrateRequest) {
    if r.job.is_empty() {
        r.job = implicit_job(&r.vm);
    }
    let peers = [job_peer(&r.to, v1::JobRole::Destination)];
    let Some(job) = call.open(&r.job.clone(), &peers).await else {
        return;
    };
    let span = info_span!("migration", vm = %r.vm, to = %r.to, job = %r.job, role = "source");
    call.blocking("migration request", move |a, ch| {
        span.in_scope(|| super::migrate_out(&a, ch, r, job))
    })
    .await
}

async fn clone(mut call: Call, r: v1::CloneRequest) {
    let peers: Vec<v1::JobPeer> = r
        .targets
        .iter()
        .map(|t| job_peer(&t.addr, v1::JobRole::Destination))
        .collect();
    if call.open(&r.job.clone(), &peers).await.is_none() {
        return;
    }
    let span = info_span!("clone", vm = %r.vm, job = %r.job);
    call.blocking("clone request", move |a, ch| {
        span.in_scope(|| super::clone_out(&a, ch, &r))
    })
    .await
}

/// Opens (or joins) a job: on a blocking thread, since a job may list
/// tens of thousands of arriving VMs to check and keep.
async fn job_open(call: Call, r: v1::JobOpen) {
    let who = call.who.clone();
    call.answer_blocking(move |a| {
        let newly = a.open_job(&r, &who)?;
        if newly {
            info!(
                "job {} opened by {who} with {} peer(s)",
                r.job,
                r.peers.len()
            );
        }
        Ok(Resp::JobOpened(v1::JobOpened { newly }))
    })
    .await
}

/// A go alone names its job and VM.
async fn go(call: Call, g: v1::JobGo) {
    let body = match call.agent.jobs().get(&g.job) {
        Ok(j) if j.go(&g.vm, g.abort, &g.reason) => Resp::GoTaken(v1::GoTaken {}),
        Ok(_) => error(
            RefusalCode::NotFound,
            format!("job {}: no migration of VM {:?} is held here", g.job, g.vm),
        ),
        Err(e) => Resp::Error(e.to_proto()),
    };
    call.answer(body).await
}

/// A VM's content map: every distinct page hash, for an operator
/// planning (readers see counts in `vm list`; no host needs another's
/// list).
async fn vm_content(call: Call, r: v1::VmContentRequest) {
    info!(
        "page list of VM {} for {} (job {:?})",
        r.name, call.who, r.job
    );
    call.blocking(
        "content request",
        move |a, mut ch| match crate::job::vm_content(&a, &r.name) {
            Ok(parts) => {
                for p in parts {
                    if send_blocking(&mut ch, Resp::Content(p)).is_err() {
                        break;
                    }
                }
            }
            Err(e) => {
                let _ = send_blocking(&mut ch, Resp::Error(e.to_proto()));
            }
        },
    )
    .await
}

/// Runs a cast at its sender: where receivers connect, then the result.
async fn cast_send(mut call: Call, r: v1::CastSendRequest) {
    let peers: Vec<v1::JobPeer> = r
        .receivers
        .iter()
        .map(|h| job_peer(h, v1::JobRole::Destination))
        .collect();
    if call.open(&r.job.clone(), &peers).await.is_none() {
        return;
    }
    let span = info_span!("cast", job = %r.job, role = "sender");
    call.blocking("cast request", move |a, mut ch| {
        span.in_scope(|| {
            let res = crate::job::cast_send(&a, &r, &mut |b| send_blocking(&mut ch, b));
            let body = match res {
                Ok(c) => {
                    if c.ok {
                        info!("cast for job {} sent, {} bytes", r.job, c.bytes_sent);
                    } else {
                        warn!(
                            "cast for job {} failed: {}",
                            r.job,
                            pagecast_proto::refusal_text(&c.error)
                        );
                    }
                    Resp::CastResult(c)
                }
                Err(e) => Resp::Error(e.to_proto()),
            };
            let _ = send_blocking(&mut ch, body);
        })
    })
    .await
}

async fn cast_recv(mut call: Call, r: v1::CastRecvRequest) {
    let Some(job) = call.job(&r.job).await else {
        return;
    };
    let span = info_span!("cast", job = %r.job, role = "receiver");
    call.answer_blocking(move |a| {
        span.in_scope(|| crate::job::cast_recv(a, &job, &r).map(Resp::CastResult))
    })
    .await
}

async fn fetch(mut call: Call, r: v1::FetchRequest) {
    let Some(job) = call.job(&r.job).await else {
        return;
    };
    call.answer_blocking(move |a| Ok(Resp::FetchResult(crate::job::fetch(a, &job, &r))))
        .await
}

/// Serves a rack-mate's fetch: one connection may ask several times, a
/// list at a time, each list within a job this agent knows.
async fn fetch_pages(call: Call, r: v1::FetchPagesRequest) {
    let who = call.who.clone();
    call.blocking("fetch request", move |a, mut ch| {
        let mut next = Some(r);
        while let Some(r) = next.take() {
            let served = a
                .jobs()
                .get(&r.job)
                .and_then(|j| {
                    // A destination (of a rack-mate, or gathering from an
                    // intermediary) or an intermediary taking a source's
                    // pages.
                    j.admit(&who, v1::JobRole::Destination, "fetch pages")
                        .or_else(|e| {
                            j.admit(&who, v1::JobRole::Intermediary, "fetch pages")
                                .map_err(|_| e)
                        })
                        .map(|()| j)
                })
                .and_then(|j| Ok((j, crate::job::hashes_of(&r.hashes)?)))
                .and_then(|(j, h)| {
                    crate::job::serve_fetch(&a, &j, &r.domain, &h, &mut |b| {
                        send_blocking(&mut ch, b)
                    })
                });
            if let Err(e) = served {
                let _ = send_blocking(&mut ch, Resp::Error(e.to_proto()));
                return;
            }
            let _ = ch.set_read_timeout(Some(super::REQUEST_TIMEOUT));
            if let Ok(v1::AgentRequest {
                body: Some(v1::agent_request::Body::FetchPages(r)),
            }) = ch.recv("fetch request")
            {
                next = Some(r);
            }
        }
    })
    .await
}

async fn incoming(call: Call, i: v1::MigrateIncoming) {
    let span = info_span!("migration", from = %i.source, role = "destination");
    call.blocking("incoming migration", move |a, ch| {
        span.in_scope(|| super::migrate_in(&a, ch, &i.source, &i.job))
    })
    .await
}
