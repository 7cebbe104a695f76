//! Pure planning for pagecast's gang evacuations: which destination each
//! VM goes to, which pages cross which links, in which multicast groups and
//! order, and what that costs. No I/O: content comes through
//! [`ContentSource`] ([`InMemoryContent`] today). Sharing estimates from
//! sketches live in `pagecast_pages::sharing`; executing a plan is the
//! coordinator's work (`pagecast-coordinator`, beside this crate).
//!
//! ```text
//! Cluster + Evacuation + ContentSource
//!     -> Planner::new        (validate, intern pages, ask what hosts hold)
//!     -> Planner::plan(s)    (place with strategy s)
//!          -> Transmission   (local copies, short-haul, groups, sequence)
//!          -> CostReport     (bytes per link class, eviction time)
//! ```

pub mod content;
pub mod cost;
pub mod model;
pub mod placement;
pub mod plan;
pub mod transmission;

pub use content::{ContentSource, ExactModel, InMemoryContent, Model, SketchModel};
pub use cost::{CostReport, PAGE_BYTES};
pub use model::{Cluster, Evacuation, Host, HostIdx, PlanError, Rack, RackIdx, Vm, VmIdx};
pub use placement::{Assignment, Strategy, Weights};
pub use plan::{Objective, Plan, Planner, SketchedPlan, place_sketched};
pub use transmission::{Group, ShortHaul, Transmission};
