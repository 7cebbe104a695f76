//! What the planner is told: the cluster, what to evacuate and where to.

use std::collections::HashSet;

/// Index of a rack in [`Cluster::racks`].
pub type RackIdx = usize;
/// Index of a host in [`Cluster::hosts`].
pub type HostIdx = usize;
/// Index of a VM in [`Cluster::vms`].
pub type VmIdx = usize;

/// A rack: hosts behind one top-of-rack switch with one uplink to the core.
#[derive(Debug, Clone, PartialEq)]
pub struct Rack {
    /// Name.
    pub name: String,
    /// Uplink to the core, bits per second (each direction).
    pub uplink_bps: f64,
}

/// A host.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    /// Name.
    pub name: String,
    /// Its rack.
    pub rack: RackIdx,
    /// Memory available to VMs, bytes.
    pub memory_bytes: u64,
    /// Link to its rack switch, bits per second (each direction).
    pub link_bps: f64,
}

/// A VM and where it runs now.
#[derive(Debug, Clone, PartialEq)]
pub struct Vm {
    /// Name.
    pub name: String,
    /// The host running it.
    pub host: HostIdx,
    /// Memory size, bytes (what it occupies on a destination).
    pub memory_bytes: u64,
    /// Non-zero pages, duplicates included (what a per-VM pre-copy sends).
    pub nonzero_pages: u64,
    /// Distinct pages its guest rewrites a second, as its agent measured
    /// from the dirty log (0: unknown, or a guest that writes nothing).
    /// Rewritten pages are sent again while the VM moves.
    pub rewrite_pages_per_s: f64,
}

/// The cluster as the planner sees it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Cluster {
    /// Racks.
    pub racks: Vec<Rack>,
    /// Hosts.
    pub hosts: Vec<Host>,
    /// Every VM, moving or not: resident VMs are what destinations hold.
    pub vms: Vec<Vm>,
    /// Capacity of the core, bits per second, if it is a bottleneck.
    pub core_bps: Option<f64>,
}

/// A gang evacuation: move every VM off `from` onto `to`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Evacuation {
    /// Hosts to empty.
    pub from: Vec<HostIdx>,
    /// Hosts that may receive VMs.
    pub to: Vec<HostIdx>,
    /// Groups of VMs no two of which may share a destination.
    pub anti_affinity: Vec<Vec<VmIdx>>,
    /// VMs that must go to a given destination.
    pub pinned: Vec<(VmIdx, HostIdx)>,
}

/// Why a problem cannot be planned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// A host, rack or VM index out of range.
    #[error("{what} {index} does not exist")]
    NoSuch {
        /// "host", "rack" or "VM".
        what: &'static str,
        /// The index.
        index: usize,
    },
    /// A host both evacuated and a destination.
    #[error("host {0} is both evacuated and a destination")]
    Overlap(String),
    /// No destinations.
    #[error("no destination hosts")]
    NoDestinations,
    /// A link rate that is not positive.
    #[error("{what} {name} has a link rate of {bps} bit/s; it must be positive")]
    Rate {
        /// "host", "rack" or "core".
        what: &'static str,
        /// Its name.
        name: String,
        /// The rate.
        bps: f64,
    },
    /// A VM pinned to a host that is not a destination.
    #[error("VM {vm} is pinned to {host}, which is not a destination")]
    PinnedOutside {
        /// The VM.
        vm: String,
        /// The host.
        host: String,
    },
    /// A pinned or constrained VM that is not being moved.
    #[error("VM {0} is constrained but is not on an evacuated host")]
    NotMoving(String),
    /// No destination can take a VM.
    #[error("VM {vm} ({bytes} bytes) fits on no destination{why}")]
    NoRoom {
        /// The VM.
        vm: String,
        /// Its memory.
        bytes: u64,
        /// Extra context.
        why: String,
    },
    /// Exact page sets are missing where a transmission plan needs them.
    #[error("VM {0} has no exact page set; a transmission plan needs one for every VM that moves")]
    NoPages(String),
}

/// Whether a rate is a usable positive, finite number (false for NaN).
fn usable(bps: f64) -> bool {
    bps.is_finite() && bps > 0.0
}

impl Cluster {
    /// Checks indices and rates.
    pub fn validate(&self) -> Result<(), PlanError> {
        for h in &self.hosts {
            if h.rack >= self.racks.len() {
                return Err(PlanError::NoSuch {
                    what: "rack",
                    index: h.rack,
                });
            }
            if !usable(h.link_bps) {
                return Err(PlanError::Rate {
                    what: "host",
                    name: h.name.clone(),
                    bps: h.link_bps,
                });
            }
        }
        for r in &self.racks {
            if !usable(r.uplink_bps) {
                return Err(PlanError::Rate {
                    what: "rack",
                    name: r.name.clone(),
                    bps: r.uplink_bps,
                });
            }
        }
        if let Some(c) = self.core_bps.filter(|&c| !usable(c)) {
            return Err(PlanError::Rate {
                what: "core",
                name: "core".into(),
                bps: c,
            });
        }
        for v in &self.vms {
            if v.host >= self.hosts.len() {
                return Err(PlanError::NoSuch {
                    what: "host",
                    index: v.host,
                });
            }
        }
        Ok(())
    }

    /// Memory not used by VMs that stay, per host.
    pub fn free_memory(&self, moving: &[VmIdx]) -> Vec<u64> {
        let moving: HashSet<VmIdx> = moving.iter().copied().collect();
        let mut free: Vec<u64> = self.hosts.iter().map(|h| h.memory_bytes).collect();
        for (i, v) in self.vms.iter().enumerate() {
            if !moving.contains(&i) {
                free[v.host] = free[v.host].saturating_sub(v.memory_bytes);
            }
        }
        free
    }
}

impl Evacuation {
    /// Checks the evacuation against the cluster and returns the moving VMs.
    pub fn validate(&self, c: &Cluster) -> Result<Vec<VmIdx>, PlanError> {
        c.validate()?;
        for &h in self.from.iter().chain(&self.to) {
            if h >= c.hosts.len() {
                return Err(PlanError::NoSuch {
                    what: "host",
                    index: h,
                });
            }
        }
        if self.to.is_empty() {
            return Err(PlanError::NoDestinations);
        }
        if let Some(&h) = self.from.iter().find(|h| self.to.contains(h)) {
            return Err(PlanError::Overlap(c.hosts[h].name.clone()));
        }
        let moving: Vec<VmIdx> = (0..c.vms.len())
            .filter(|&v| self.from.contains(&c.vms[v].host))
            .collect();
        let moving_set: HashSet<VmIdx> = moving.iter().copied().collect();
        for &(v, h) in &self.pinned {
            if v >= c.vms.len() {
                return Err(PlanError::NoSuch {
                    what: "VM",
                    index: v,
                });
            }
            if !moving_set.contains(&v) {
                return Err(PlanError::NotMoving(c.vms[v].name.clone()));
            }
            if !self.to.contains(&h) {
                return Err(PlanError::PinnedOutside {
                    vm: c.vms[v].name.clone(),
                    host: c
                        .hosts
                        .get(h)
                        .map_or_else(|| h.to_string(), |x| x.name.clone()),
                });
            }
        }
        for g in &self.anti_affinity {
            for &v in g {
                if v >= c.vms.len() {
                    return Err(PlanError::NoSuch {
                        what: "VM",
                        index: v,
                    });
                }
            }
        }
        Ok(moving)
    }
}
