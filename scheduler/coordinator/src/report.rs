//! What a job reports: per VM, and the bytes and times of the whole.

use std::collections::BTreeMap;

use serde::Serialize;

/// One VM's outcome.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VmOutcome {
    /// The VM.
    pub name: String,
    /// Its source host.
    pub from: String,
    /// Its planned destination host.
    pub to: String,
    /// It runs at its destination now.
    pub ok: bool,
    /// Its memory at the destination matched the source's at switchover
    /// (micro-VMs; an adopted QEMU VM's memory is QEMU's to move, and
    /// pagecast checks only the pages it fills: false for those).
    pub verified: bool,
    /// "micro-vm", or "qemu" for an adopted QEMU VM.
    pub kind: String,
    /// From pausing at the source to resuming at the destination.
    pub downtime_ms: f64,
    /// The pause asked for (`--max-downtime`), beside `downtime_ms`.
    pub max_downtime_ms: f64,
    /// Bytes its migration link carried (the cast bytes of the job are
    /// counted in the job's totals, not here).
    pub bytes_sent: u64,
    /// Frames filled from what the destination already held.
    pub pages_local: u64,
    /// Frames filled from a rack-mate of the destination (estimated per
    /// VM from its destination's fetches).
    pub pages_short_haul: u64,
    /// Frames filled by the job's casts (estimated per VM likewise).
    pub pages_cast: u64,
    /// Why it failed ("" if it did not); a failed VM still runs at its
    /// source unless `in_doubt`.
    pub error: String,
    /// The switchover lost contact: the source holds the VM paused, the
    /// destination may run it.
    pub in_doubt: bool,
    /// How it switched over: "precopy" (pre-copy rounds, then a stop and
    /// copy), "postcopy" (it resumed at its destination before every page
    /// was there), "" if it did not.
    pub switchover: String,
    /// Post-copy: pages its guest touched at the destination before they
    /// arrived (each one asked for).
    pub postcopy_faults: u64,
    /// Post-copy: seconds from its resume at the destination to its last
    /// page arriving there.
    pub postcopy_s: f64,
    /// Pages its destination gathered from intermediaries (`--scatter`)
    /// instead of receiving them from its source.
    pub pages_gathered: u64,
    /// The most its guest was slowed down to converge under pre-copy,
    /// percent.
    pub max_throttle_pct: u32,
    /// Seconds from the job's start until it left its source (it ran at
    /// its destination); `None` if it did not.
    pub left_s: Option<f64>,
}

/// Bytes by how they travelled.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BytesByClass {
    /// Cast datagrams to groups of two or more destinations (first pass).
    pub multicast: u64,
    /// Migration links, and cast pages to a single destination.
    pub unicast: u64,
    /// Pages from rack-mates of destinations.
    pub short_haul: u64,
    /// Cast repairs (multicast and unicast).
    pub repair: u64,
}

/// What an evacuation did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EvacuationReport {
    /// The job's id.
    pub job: String,
    /// Every VM verified and running at its destination.
    pub ok: bool,
    /// `pagecast`, `vmscatter` or `precopy`.
    pub strategy: String,
    /// Only planned, nothing moved.
    pub dry_run: bool,
    /// Per VM.
    pub vms: Vec<VmOutcome>,
    /// Bytes that left the source hosts, every protocol byte counted
    /// (migration links with framing, cast datagrams and control).
    pub source_bytes: u64,
    /// Bytes that crossed rack boundaries (a multicast datagram counts once
    /// per other rack it reaches).
    pub core_bytes: u64,
    /// Bytes by class.
    pub bytes_by_class: BytesByClass,
    /// From the start until the last VM left its source.
    pub eviction_s: f64,
    /// Per source host: seconds from the start until its last VM of the
    /// job left it (`None`: a VM of the job is still there, it failed).
    pub evicted_s: BTreeMap<String, Option<f64>>,
    /// From the start until everything ended.
    pub total_s: f64,
    /// What the plan predicted.
    pub predicted: Predicted,
    /// Per source host: bytes it sent.
    pub bytes_by_source: BTreeMap<String, u64>,
}

/// The plan's own figures, beside what was measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Predicted {
    /// Bytes the sources would send (on the wire, headers included, when
    /// the MTU was given).
    pub source_bytes: u64,
    /// Of those, bytes re-sending pages the guests rewrite meanwhile (at
    /// the rates their agents measured).
    pub rewrite_bytes: u64,
    /// Of those, the moving VMs' manifests (a hash per non-zero page).
    pub manifest_bytes: u64,
    /// Of those, the frames' headers (0 unless the MTU was given).
    pub header_bytes: u64,
    /// Bytes into other racks.
    pub core_bytes: u64,
    /// Eviction time at the links' rates.
    pub eviction_s: f64,
    /// The link that decides it.
    pub bottleneck: String,
    /// Bytes a per-VM pre-copy of the same placement would send.
    pub precopy_source_bytes: u64,
    /// Per source host: the moving VMs' pages that no other host holds
    /// (they must leave it, whatever the plan), in bytes.
    pub only_at_source_bytes: BTreeMap<String, u64>,
    /// Per source host: those bytes over its link, the least time its
    /// eviction can take (absent where its link rate is unknown).
    pub lower_bound_s: BTreeMap<String, f64>,
    /// Where each VM goes.
    pub placement: BTreeMap<String, String>,
}

/// One clone's outcome.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CloneOutcome {
    /// The clone's name.
    pub name: String,
    /// Its host.
    pub host: String,
    /// It runs there.
    pub ok: bool,
    /// Its memory matched the source's at the switchover point.
    pub verified: bool,
    /// Why it failed.
    pub error: String,
    /// Its identity as its guest reads it: a micro-VM's identity value, an
    /// adopted QEMU VM's VM generation ID ("" without a vmgenid device).
    pub identity: String,
    /// What the clone does not share with its source: "identity" (a
    /// micro-VM's, made fresh), "vm_generation_id" (a QEMU clone's), "mac"
    /// (every network card's MAC differs).
    pub changed: Vec<String>,
    /// What it still shares with its source that a guest or its operator
    /// must change: "mac" when a network card kept its source's MAC (QEMU
    /// carries a card's MAC in its device state; a card its agent could not
    /// replace keeps it).
    pub kept: Vec<String>,
}

/// What a clone did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CloneReport {
    /// The job's id.
    pub job: String,
    /// Every clone verified and running.
    pub ok: bool,
    /// Per clone.
    pub clones: Vec<CloneOutcome>,
    /// Bytes that left the source host.
    pub source_bytes: u64,
    /// The longest the source VM was paused.
    pub source_downtime_ms: f64,
    /// The source VM's identity (as [`CloneOutcome::identity`]).
    pub source_identity: String,
    /// From the start until every clone ran.
    pub total_s: f64,
}
