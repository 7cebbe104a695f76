//! The cluster as the content index describes it: hosts with their agents'
//! reports, and the VMs their agents run.

use pagecast_index::client::IndexClient;
use pagecast_pages::Sketch;
use pagecast_proto::v1::VmState;

use crate::CoordError;

/// A host as its agent last reported it.
#[derive(Debug, Clone)]
pub struct HostView {
    /// Name.
    pub name: String,
    /// Its number in holder records.
    pub index: u32,
    /// Its agent's control address ("" if no agent reported).
    pub address: String,
    /// Rack name ("" if none was given).
    pub rack: String,
    /// Link rate, bits per second (0: unknown).
    pub link_bps: u64,
    /// Memory offered to VMs, bytes (0: unknown).
    pub capacity_bytes: u64,
    /// Memory its VMs use, bytes.
    pub used_bytes: u64,
    /// Its VMs.
    pub vms: Vec<String>,
    /// Cordoned by an operator: takes no VM from any plan.
    pub cordoned: bool,
}

/// A running VM.
#[derive(Debug, Clone)]
pub struct VmView {
    /// Name.
    pub name: String,
    /// Its host's name.
    pub host: String,
    /// Guest frames.
    pub frames: u64,
    /// Non-zero frames.
    pub nonzero_frames: u64,
    /// Its sketch.
    pub sketch: Sketch,
}

impl VmView {
    /// Memory, bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.frames * pagecast_pages::PAGE_BYTES
    }
}

/// Hosts and running VMs.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Hosts, by name order.
    pub hosts: Vec<HostView>,
    /// Running VMs (published by their agents), by name order.
    pub vms: Vec<VmView>,
}

impl ClusterView {
    /// Reads hosts and running VMs from the index (linearizable reads).
    pub fn read(c: &mut IndexClient) -> Result<Self, CoordError> {
        let mut hosts: Vec<HostView> = c
            .hosts(false)?
            .into_iter()
            .map(|h| HostView {
                name: h.name,
                index: h.index,
                address: h.address,
                rack: h.rack,
                link_bps: h.link_bps,
                capacity_bytes: h.capacity_bytes,
                used_bytes: h.used_bytes,
                vms: h.vm_names,
                cordoned: h.cordoned,
            })
            .collect();
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        let mut vms = Vec::new();
        for r in c.vms(false)? {
            if r.state != VmState::Running as i32 {
                continue;
            }
            let Some(h) = hosts.iter().find(|h| h.index == r.host) else {
                continue;
            };
            let sketch = Sketch::from_bytes(&r.sketch).unwrap_or_default();
            vms.push(VmView {
                name: r.name,
                host: h.name.clone(),
                frames: r.frames,
                nonzero_frames: r.nonzero_frames,
                sketch,
            });
        }
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(ClusterView { hosts, vms })
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> Option<&HostView> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// The VM named `name`.
    pub fn vm(&self, name: &str) -> Option<&VmView> {
        self.vms.iter().find(|v| v.name == name)
    }

    /// The rack a host is placed in: its rack name, or a rack of its own.
    pub fn rack_of(&self, host: &str) -> String {
        match self.host(host) {
            Some(h) if !h.rack.is_empty() => h.rack.clone(),
            _ => format!("(host {host})"),
        }
    }
}
