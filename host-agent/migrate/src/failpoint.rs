//! Failure injection at exact points of a migration, for the tests of what
//! follows when a process dies or a link drops there (a kill at the
//! switchover point cannot be timed from outside).
//!
//! `PAGECAST_FAILPOINT=POINT:ACTION[,POINT:ACTION...]`, read once per
//! process. Points:
//! - `dest-commit`: the destination has received Commit and not yet
//!   started the VM;
//! - `dest-resumed`: the destination has started the VM and not yet told
//!   the source (`Resumed`), by pre-copy or by post-copy;
//! - `gather-served`: an intermediary of a scatter-gather job has given a
//!   destination its first frame of stashed pages (the rest of the
//!   gathering then meets whatever the action leaves);
//! - `stash-kept`: an intermediary has kept its first 1,024 pages fetched
//!   from a source (the rest of its share then meets the action).
//!
//! Actions: `exit` (the process exits at once with status 137, as if
//! killed: nothing after the point runs), `drop` (the migration's link
//! fails there, as a connection that breaks would) or `stop` (the process
//! stops itself with SIGSTOP there, as a frozen host would, until someone
//! sends it SIGCONT). Unset, nothing
//! happens; an unknown point or action is ignored with a warning on
//! standard error.

use std::sync::OnceLock;

/// What to do at a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Exit the process at once.
    Exit,
    /// Fail the link.
    Drop,
    /// Stop the process (SIGSTOP) until it is continued.
    Stop,
}

/// A point where a failure can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// Commit received, the VM not yet started.
    DestCommit,
    /// The VM started, Resumed not yet sent.
    DestResumed,
    /// An intermediary gave its first stashed pages to a gathering
    /// destination.
    GatherServed,
    /// An intermediary kept its first pages fetched from a source.
    StashKept,
}

impl Point {
    fn name(self) -> &'static str {
        match self {
            Point::DestCommit => "dest-commit",
            Point::DestResumed => "dest-resumed",
            Point::GatherServed => "gather-served",
            Point::StashKept => "stash-kept",
        }
    }
}

fn parse(spec: &str) -> Vec<(Point, Action)> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let parsed = item.split_once(':').and_then(|(p, a)| {
            let point = [
                Point::DestCommit,
                Point::DestResumed,
                Point::GatherServed,
                Point::StashKept,
            ]
            .into_iter()
            .find(|x| x.name() == p)?;
            let action = match a {
                "exit" => Action::Exit,
                "drop" => Action::Drop,
                "stop" => Action::Stop,
                _ => return None,
            };
            Some((point, action))
        });
        match parsed {
            Some(x) => out.push(x),
            None => eprintln!(
                "PAGECAST_FAILPOINT: ignoring {item:?} (points: dest-commit, dest-resumed, gather-served, stash-kept; actions: exit, drop, stop)"
            ),
        }
    }
    out
}

/// The action set for `point`, if any.
pub fn at(point: Point) -> Option<Action> {
    static SET: OnceLock<Vec<(Point, Action)>> = OnceLock::new();
    SET.get_or_init(|| parse(&std::env::var("PAGECAST_FAILPOINT").unwrap_or_default()))
        .iter()
        .find(|(p, _)| *p == point)
        .map(|(_, a)| *a)
}

/// Runs `point`'s action: exits, or returns the link failure to raise.
pub fn hit(point: Point) -> Result<(), crate::MigrationError> {
    match at(point) {
        None => Ok(()),
        Some(Action::Exit) => std::process::exit(137),
        Some(Action::Stop) => {
            // SAFETY: raise(3) with a valid signal number has no memory
            // effects; the process stops here and goes on when continued.
            unsafe { libc::raise(libc::SIGSTOP) };
            Ok(())
        }
        Some(Action::Drop) => Err(crate::MigrationError::Link(
            pagecast_channel::AuthError::Closed {
                peer: format!("failpoint {}", point.name()),
            },
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_items_are_skipped() {
        assert_eq!(
            parse("dest-commit:exit, dest-resumed:drop,gather-served:stop,stash-kept:stop"),
            vec![
                (Point::DestCommit, Action::Exit),
                (Point::DestResumed, Action::Drop),
                (Point::GatherServed, Action::Stop),
                (Point::StashKept, Action::Stop)
            ]
        );
        assert_eq!(parse("nowhere:exit,dest-commit:explode,"), vec![]);
        assert_eq!(parse(""), vec![]);
    }
}
