//! Progress that never runs backwards: what a per-VM progress line shows
//! only moves forward, whatever order its events arrive in.

use std::collections::HashMap;

/// Per VM, the furthest phase and the most bytes shown so far.
#[derive(Default)]
pub struct Forward {
    shown: HashMap<String, (i32, u64)>,
}

impl Forward {
    /// What VM `vm`'s line should show for an event of phase `rank` (the
    /// phases' order: manifest before held before ... before done and
    /// failed) having sent `bytes`: None when the event is behind what the
    /// line shows already (a late event of an earlier phase); otherwise the
    /// phase and the larger of the bytes shown and `bytes`.
    pub fn update(&mut self, vm: &str, rank: i32, bytes: u64) -> Option<(i32, u64)> {
        let e = self.shown.entry(vm.to_owned()).or_insert((rank, bytes));
        if rank < e.0 {
            return None;
        }
        *e = (rank, e.1.max(bytes));
        Some(*e)
    }

    /// Whether an event of phase `rank` moves VM `vm` into a later phase
    /// than it showed (its first event does); it is then shown.
    pub fn advances(&mut self, vm: &str, rank: i32) -> bool {
        let before = self.shown.get(vm).map(|e| e.0);
        before.is_none_or(|b| rank > b) && self.update(vm, rank, 0).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_never_goes_back() {
        let mut f = Forward::default();
        assert_eq!(f.update("a", 2, 0), Some((2, 0)));
        assert_eq!(f.update("a", 5, 100), Some((5, 100)));
        // A late event of an earlier phase is not shown.
        assert_eq!(f.update("a", 3, 50), None);
        // Bytes never shrink within a phase.
        assert_eq!(f.update("a", 5, 80), Some((5, 100)));
        assert_eq!(f.update("a", 10, 120), Some((10, 120)));
        assert_eq!(f.update("a", 6, 130), None, "nothing after done");
        // Each VM on its own.
        assert_eq!(f.update("b", 1, 7), Some((1, 7)));
        // Advancing: only into a later phase.
        let mut t = Forward::default();
        assert!(t.advances("a", 2));
        assert!(!t.advances("a", 2));
        assert!(t.advances("a", 5));
        assert!(!t.advances("a", 3));
    }
}
