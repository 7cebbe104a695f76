//! What a job plugs into the engine: its hold (go, abort, cancel) and its
//! multicast ([`Caster`]).

use pagecast_pages::PageHash;

use crate::MigrationError;

/// What a held migration hears from whoever holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldPoll {
    /// Keep holding.
    Wait,
    /// Go on: ask the destination what it still needs and finish.
    Go,
    /// Give up (the VM stays here, running).
    Abort(String),
}

/// A gang job's hold: after the destinations say what they lack, the job
/// fills what it can (casts, rack-mates) before the migration goes on. Also
/// the job's cancel, asked by every migration and clone.
pub trait Hold {
    /// The destinations lack `needed` after filling `filled_locally`
    /// frames from what they held; called once.
    fn needs(&mut self, needed: &[PageHash], filled_locally: u64) -> Result<(), MigrationError>;
    /// Polled every 100 ms until it says go or abort.
    fn poll(&mut self) -> HoldPoll;
    /// Whether the engine holds at all (false: it only asks
    /// [`Hold::cancelled`]).
    fn holds(&self) -> bool {
        true
    }
    /// Asked before every pre-copy round, before switchover and at every
    /// part of a relayed stream: a reason means stop (the VM stays here,
    /// running).
    fn cancelled(&mut self) -> Option<String> {
        None
    }
}

/// A round with at least this many pages goes by multicast when several
/// destinations take it; smaller ones over each destination's link.
pub const CAST_MIN_PAGES: usize = 256;

/// What a cast of some of the VM's frames did.
#[derive(Debug, Clone, Default)]
pub struct CastOutcome {
    /// The hash of each frame as it was staged (same order as asked).
    pub hashes: Vec<PageHash>,
    /// Per receiver: it received every page meant for it.
    pub complete: Vec<bool>,
    /// Bytes the cast sent.
    pub bytes: u64,
}

/// Sends pages of the VM once to several receivers (the agent runs the
/// transport).
pub trait Caster {
    /// Reads and stages `frames` now, hashing each, and sends them once:
    /// page `i` to the receivers `members[i]` (indexes into `receivers`; an
    /// empty `members` means every receiver for every page). Calls
    /// `invite(r, control)` for each receiver once the sender listens.
    fn cast(
        &mut self,
        frames: &[u64],
        members: &[Vec<usize>],
        by_frame: bool,
        receivers: &[String],
        invite: &mut dyn FnMut(usize, &str) -> Result<(), MigrationError>,
    ) -> Result<CastOutcome, MigrationError>;
}
