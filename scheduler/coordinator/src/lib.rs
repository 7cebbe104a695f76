//! The coordinator: executes gang jobs (`pagecast evacuate`, `pagecast
//! clone`) over the running cluster.
//!
//! Planning (`pagecast-scheduler`) is pure; this crate does the I/O around
//! it. It reads the cluster from the content index (hosts, racks, links,
//! capacities, running VMs and their sketches), asks source agents for the
//! exact contents of the VMs that move (from their content maps, not a
//! fresh hash), asks the index which hosts hold those contents, plans, and
//! then drives the agents, which stay engines:
//!
//! ```text
//! coordinator          source agents              destination agents
//!  | migrate (held) ----> | begin, manifest --------> | fill what it holds
//!  |                      | <----- what it lacks ----- | (hash-checked)
//!  | <---- Held(needs) -- |                           |
//!  | plan the casts: each missing content once, from one source, to
//!  | every destination lacking it; rack-mates' contents short-haul
//!  | cast send ---------> | ~~ multicast ~~~~~~~~~~~> | into the arriving
//!  | cast recv / fetch -----------------------------> | VMs' memory
//!  | go ----------------> | refill, round 0 (the rest), pre-copy rounds,
//!  |                      | switchover, verify, resume there, release here
//!  | <---- result ------- |                           |
//! ```
//!
//! Every failure before a VM's switchover leaves it running at its source:
//! a held migration whose coordinator goes away is abandoned by its agent,
//! a dead or frozen destination fails its migrations within the keep-alive
//! timeout, a receiver that falls behind gets its pages by unicast. Running
//! the same evacuation again moves what is still at the sources.
//!
//! See `docs/evacuation.md` for the sequence, who sends what to whom, and
//! the failure table.

pub mod clone;
pub mod evacuate;
pub mod fake;
pub mod index;
pub mod report;
pub mod view;

pub use clone::{CloneSpec, clone};
pub use evacuate::{EvacuateSpec, Method, evacuate};
pub use index::{IndexApi, IndexService};
pub use report::{CloneReport, EvacuationReport, VmOutcome};
pub use view::ClusterView;

use std::sync::Arc;

use pagecast_agent_api::{AgentApi, ClientError};

/// What a job talks to: the content index and the agents (over the
/// network: [`IndexService`] and `pagecast_agent_api::Remote`; in tests,
/// [`fake::FakeCluster`] is both).
#[derive(Clone)]
pub struct Services {
    /// The content index.
    pub index: Arc<dyn IndexApi>,
    /// The agents.
    pub agents: Arc<dyn AgentApi>,
}

impl Services {
    /// The index at `index` and the agents over the network, both called
    /// as the holder of `tls`.
    pub fn remote(index: &[String], tls: pagecast_channel::Tls) -> Self {
        Services {
            index: Arc::new(IndexService::new(index, tls.clone())),
            agents: Arc::new(pagecast_agent_api::Remote::new(tls)),
        }
    }
}

/// Why a job could not run, or not all of it.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// The content index could not be read.
    #[error("content index: {0}")]
    Index(#[from] pagecast_index::client::ClientError),
    /// An agent failed.
    #[error("agent {host}: {source}")]
    Agent {
        /// The host.
        host: String,
        /// What went wrong.
        #[source]
        source: ClientError,
    },
    /// The request names something that is not there, or is not possible.
    #[error("{0}")]
    Invalid(String),
    /// The planner refused.
    #[error("planning: {0}")]
    Plan(#[from] pagecast_scheduler::PlanError),
    /// The job was cancelled.
    #[error("cancelled: {0}")]
    Cancelled(String),
}

pub use pagecast_agent_api::{AT_ONCE, at_once};

/// Locks `m`, taking over from a holder that panicked.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a job reports as it goes (for progress displays).
#[derive(Debug, Clone)]
pub enum Event {
    /// A step of the whole job.
    Step(String),
    /// Per source host, the least time its eviction can take (the moving
    /// VMs' pages only it holds, over its link), once the plan is made.
    LowerBound(std::collections::BTreeMap<String, f64>),
    /// A VM's phase changed or it made progress.
    Vm {
        /// The VM.
        name: String,
        /// Its phase.
        phase: pagecast_proto::v1::MigratePhase,
        /// Bytes its migration link carried so far.
        bytes: u64,
        /// Frames filled at the destination without crossing the source link.
        pages_local: u64,
    },
}
