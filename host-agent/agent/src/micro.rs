//! The KVM micro-VM backend: a guest whose memory this agent maps and
//! whose dirty log it reads. KVM's log is read in one place
//! ([`MicroBackend::pull_into`]) and its bits kept twice, once for a
//! migration and once for the content map, so neither consumer steals the
//! other's.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::metrics::counter;
use pagecast_memory::kvm::{InitialMemory, MicroVm, MicroVmConfig, VcpuState, VmError};
use pagecast_memory::synth::{SynthSpec, SyntheticVm};
use pagecast_memory::{DirtyBitmap, GuestMemory, ImageFile, MemoryError, Region};
use pagecast_migrate::{
    ChannelLink, Hold, How, IncomingReport, MigrateOptions, MigrationError, MigrationLink,
    Progress, SourceVm, Switchover, migrate_in_job, migrate_out_held,
};
use pagecast_pages::{ContentKey, PAGE_SIZE, Page, PageHash};
use pagecast_proto::v1;

use crate::hosted::{Backend, Hosted, Look, Outbound};
use crate::job::{JobCancel, JobContent, JobSlots};
use crate::sync::lock;
use crate::{Agent, AgentError};

/// Default memory of a synthetic VM.
pub const DEFAULT_MEMORY: u64 = 64 << 20;
/// Default working set, in pages.
pub const DEFAULT_WORKING_SET: u64 = 1024;
/// First frame of the working set.
const WORKING_SET_START: u64 = 16;

/// A KVM micro-VM run by this agent.
pub struct MicroBackend {
    vm: MicroVm,
    for_migration: Mutex<DirtyBitmap>,
    for_content: Mutex<DirtyBitmap>,
}

impl MicroBackend {
    fn new(vm: MicroVm) -> Self {
        let pages = vm.page_count();
        MicroBackend {
            vm,
            for_migration: Mutex::new(DirtyBitmap::new(pages)),
            for_content: Mutex::new(DirtyBitmap::new(pages)),
        }
    }

    /// Reads KVM's dirty log into both bitmaps. The migration bitmap stays
    /// locked from the read to the merge, so a migration taking its bits
    /// never misses some that another thread has read but not yet merged.
    fn pull_into(&self, m: &mut DirtyBitmap) -> Result<(), MemoryError> {
        let d = self.vm.take_dirty()?;
        m.merge(&d)?;
        lock(&self.for_content).merge(&d)
    }

    fn pull(&self) -> Result<(), MemoryError> {
        self.pull_into(&mut lock(&self.for_migration))
    }
}

impl GuestMemory for MicroBackend {
    fn write_page(&self, frame: u64, data: &Page) -> Result<(), MemoryError> {
        self.vm.write_page(frame, data)
    }

    /// The migration's bits (the content map keeps its own).
    fn take_dirty(&self) -> Result<DirtyBitmap, MemoryError> {
        let mut m = lock(&self.for_migration);
        self.pull_into(&mut m)?;
        Ok(std::mem::replace(
            &mut *m,
            DirtyBitmap::new(self.page_count()),
        ))
    }

    fn mark_dirty(&self, pages: &DirtyBitmap) -> Result<(), MemoryError> {
        lock(&self.for_migration).merge(pages)
    }

    fn region(&self) -> &Region {
        self.vm.region()
    }
}

impl Backend for MicroBackend {
    fn kind(&self) -> v1::VmKind {
        v1::VmKind::MicroVm
    }

    fn memory(&self) -> &dyn GuestMemory {
        self
    }

    fn look(&self, _state: v1::HostedVmState, _force: bool) -> Result<Look, MemoryError> {
        self.pull()?;
        let pages = self.page_count();
        Ok(Look::Frames(std::mem::replace(
            &mut *lock(&self.for_content),
            DirtyBitmap::new(pages),
        )))
    }

    fn reset_look(&self) {
        let _ = self.pull();
        *lock(&self.for_content) = DirtyBitmap::new(self.page_count());
    }

    fn exact(&self) -> bool {
        true
    }

    fn status(&self, info: &mut v1::VmInfo) {
        info.progress = self.vm.progress().unwrap_or(0);
        info.dirty_rate = self.vm.dirty_rate();
        info.throttle_pct = u32::from(self.vm.throttle());
        info.identity = self
            .vm
            .identity()
            .map(|id| pagecast_memory::kvm::identity_hex(&id))
            .unwrap_or_default();
    }

    fn set_dirty_rate(&self, rate: u64) -> Result<(), AgentError> {
        Ok(self.vm.set_dirty_rate(rate)?)
    }

    fn migrate_out(
        &self,
        out: Outbound<'_>,
        r: &v1::MigrateRequest,
        progress: &mut dyn FnMut(&Progress),
        hold: Option<&mut dyn Hold>,
    ) -> Result<(v1::MigrateResult, String), AgentError> {
        let ch = out
            .agent
            .open_incoming(&r.to, &r.job, "receive a migrated VM")?;
        let mut link = ChannelLink::new(ch);
        let opts = MigrateOptions {
            bandwidth_bps: (r.bandwidth_bps > 0).then_some(r.bandwidth_bps),
            max_downtime: downtime(r.max_downtime_ms),
            verify_full: r.verify_full,
            job: r.job.clone(),
            no_local: r.no_local,
            per_frame: r.per_frame,
            switchover: Switchover::from_proto(r.switchover),
            ..MigrateOptions::default()
        };
        let dest = link.peer_name().to_owned();
        let vm = Outgoing { out, micro: self };
        let rep = migrate_out_held(&vm, &mut link, &out.agent.fp, &opts, progress, hold)?;
        Ok((rep.to_proto(), dest))
    }

    fn clone_out(
        &self,
        out: Outbound<'_>,
        r: &v1::CloneRequest,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<v1::CloneResult, AgentError> {
        run_clone(out, self, r, progress)
    }

    fn resume(&self) {
        self.vm.set_throttle(0);
        self.vm.resume();
    }
}

/// The longest pause asked for, 50 ms if none.
pub(crate) fn downtime(ms: u32) -> Duration {
    Duration::from_millis(if ms == 0 { 50 } else { u64::from(ms) })
}

/// A micro-VM on its way out, seen by the migration engine: the VM, with
/// the agent's content map for its manifest.
struct Outgoing<'a> {
    out: Outbound<'a>,
    micro: &'a MicroBackend,
}

impl GuestMemory for Outgoing<'_> {
    fn write_page(&self, frame: u64, data: &Page) -> Result<(), MemoryError> {
        self.micro.write_page(frame, data)
    }
    fn take_dirty(&self) -> Result<DirtyBitmap, MemoryError> {
        self.micro.take_dirty()
    }
    fn mark_dirty(&self, pages: &DirtyBitmap) -> Result<(), MemoryError> {
        self.micro.mark_dirty(pages)
    }
    fn region(&self) -> &Region {
        self.micro.region()
    }
}

impl SourceVm for Outgoing<'_> {
    fn name(&self) -> &str {
        &self.out.vm.name
    }
    fn origin(&self) -> String {
        self.out.vm.origin.clone()
    }
    fn dirty_rate(&self) -> u64 {
        self.micro.vm.dirty_rate()
    }
    fn pause(&self) -> Result<(), VmError> {
        self.micro.vm.pause()
    }
    fn resume(&self) {
        self.micro.vm.resume()
    }
    fn vcpu_state(&self) -> Result<VcpuState, VmError> {
        self.micro.vm.vcpu_state()
    }
    fn set_throttle(&self, pct: u8) {
        self.micro.vm.set_throttle(pct)
    }
    fn current_hashes(&self) -> Option<Vec<PageHash>> {
        self.out.agent.current_hashes(self.out.vm)
    }
    fn domain(&self) -> &str {
        &self.out.vm.domain
    }
    fn content_key(&self) -> ContentKey {
        self.out.vm.key
    }
}

fn run_clone(
    out: Outbound<'_>,
    micro: &MicroBackend,
    r: &v1::CloneRequest,
    progress: &mut dyn FnMut(&Progress),
) -> Result<v1::CloneResult, AgentError> {
    let agent = out.agent;
    crate::refuse_postcopy(r.switchover, pagecast_migrate::engine::Mode::Clone, true)?;
    let (targets, failed) = agent.clone_targets(r);
    let opts = MigrateOptions {
        bandwidth_bps: (r.bandwidth_bps > 0).then_some(r.bandwidth_bps),
        max_downtime: downtime(r.max_downtime_ms),
        job: r.job.clone(),
        switchover: Switchover::from_proto(r.switchover),
        ..MigrateOptions::default()
    };
    let vm = Outgoing { out, micro };
    let mut caster = crate::job::AgentCaster {
        agent,
        vm: &vm,
        key: out.vm.key,
        rate_bps: opts.bandwidth_bps,
        job: r.job.clone(),
        casts: 0,
    };
    let mut cancel = JobCancel::new(agent.jobs().get(&r.job)?);
    let rep = pagecast_migrate::clone_out(
        &vm,
        targets,
        &mut caster,
        &agent.fp,
        &opts,
        progress,
        Some(&mut cancel),
        How::Rounds,
    );
    Ok(crate::clone_result(&rep, failed, true))
}

impl Agent {
    /// The job an arriving VM belongs to: named by the request and by the
    /// migration's first frame alike, and open here.
    fn arrival_job(
        &self,
        begin: &v1::MigrateBegin,
        source: &str,
        job: &str,
    ) -> Result<Arc<crate::jobs::Job>, AgentError> {
        if begin.job != job {
            return Err(AgentError::BadRequest(format!(
                "the migration names job {:?} but its request job {job:?}",
                begin.job
            )));
        }
        let j = self.jobs().get(job)?;
        j.admit_arrival(source, &begin.vm)?;
        Ok(j)
    }

    /// Starts a micro-VM.
    pub fn vm_start(&self, r: &v1::VmStartRequest) -> Result<v1::VmInfo, AgentError> {
        self.check_cordon(r.force)?;
        self.reserve(&r.name, v1::HostedVmState::Starting)?;
        match self.boot(r) {
            Ok(vm) => {
                let info = vm.info();
                self.register(vm)?;
                Ok(info)
            }
            Err(e) => {
                self.release(&r.name);
                Err(e)
            }
        }
    }

    fn boot(&self, r: &v1::VmStartRequest) -> Result<Arc<Hosted>, AgentError> {
        let key = self.domain_key(&r.domain)?;
        let (memory, origin, synth) = match (r.image.is_empty(), r.synthetic.is_empty()) {
            (false, true) => {
                let path = self.resolve(&r.image);
                let len = ImageFile::open(&path)?.len_bytes();
                if r.memory_bytes != 0 && r.memory_bytes != len {
                    return Err(AgentError::BadRequest(format!(
                        "image {} holds {len} bytes, not the {} asked for",
                        path.display(),
                        r.memory_bytes
                    )));
                }
                (len, path.display().to_string(), None)
            }
            (true, false) => {
                let memory = if r.memory_bytes == 0 {
                    DEFAULT_MEMORY
                } else {
                    r.memory_bytes
                };
                let spec = SynthSpec::parse(&r.synthetic, memory)?;
                (
                    spec.memory_bytes(),
                    format!("synthetic {}", r.synthetic),
                    Some(SyntheticVm::new(spec)?),
                )
            }
            _ => {
                return Err(AgentError::BadRequest(
                    "give exactly one of an image and a synthetic profile".into(),
                ));
            }
        };
        let pages = memory / PAGE_SIZE as u64;
        let ws = if r.working_set_pages == 0 {
            DEFAULT_WORKING_SET
        } else {
            r.working_set_pages
        };
        let start = WORKING_SET_START.min(pages.saturating_sub(1)).max(2);
        let end = (start + ws).min(pages);
        let config = MicroVmConfig {
            memory_bytes: memory,
            working_set: (end > start).then_some(start..end).into_iter().collect(),
            dirty_rate: r.dirty_rate,
        };
        let initial = match &synth {
            Some(s) => InitialMemory::Synthetic(s),
            None => InitialMemory::Image(Path::new(&origin)),
        };
        let vm = self.fp.pool().install(|| MicroVm::boot(&config, initial))?;
        Ok(Arc::new(Hosted::new(
            &r.name,
            origin,
            (&r.domain, key),
            v1::HostedVmState::Running,
            Box::new(MicroBackend::new(vm)),
        )))
    }

    /// Receives a VM over `link` from the agent named `source`: a micro-VM
    /// starts here; a QEMU VM goes to the waiting QEMU adopted under its
    /// name (or, on the libvirt route, to the QEMU at its address).
    pub fn migrate_in(
        &self,
        link: &mut dyn MigrationLink,
        source: &str,
        job: &str,
    ) -> Result<IncomingReport, AgentError> {
        let (begin, job) = self.admit_arrival(link, source, job)?;
        if begin.kind == v1::VmKind::Qemu as i32 {
            return self.qemu_in(link, &begin, &job);
        }
        if let Err(e) = self.reserve_arrival(&begin.vm, begin.memory_bytes) {
            return crate::qemu::refuse_begin(link, e);
        }
        let mut started: Option<Arc<Hosted>> = None;
        let result = self.receive_micro(link, &begin, source, &job, &mut started);
        self.arrival_outcome(&begin.vm, result, started)
    }

    /// The arrival's begin, and its job: every arrival belongs to a job
    /// this agent knows and that is open (refused otherwise).
    fn admit_arrival(
        &self,
        link: &mut dyn MigrationLink,
        source: &str,
        job: &str,
    ) -> Result<(v1::MigrateBegin, Arc<crate::jobs::Job>), AgentError> {
        let begin = match link.recv(Some(Duration::from_secs(10)))? {
            v1::migrate_frame::Body::Begin(b) => b,
            other => {
                return Err(AgentError::BadRequest(format!(
                    "expected a migration to begin, got {other:?}"
                )));
            }
        };
        tracing::debug!(
            "incoming VM {} of {} MiB (job {:?})",
            begin.vm,
            begin.memory_bytes >> 20,
            begin.job
        );
        match self.arrival_job(&begin, source, job) {
            Ok(j) => Ok((begin, j)),
            Err(e) => crate::qemu::refuse_begin(link, e),
        }
    }

    /// A micro-VM's migration in, its name reserved: the engine's
    /// destination side, with the VM restored and listed as running when
    /// it commits (`started`).
    fn receive_micro(
        &self,
        link: &mut dyn MigrationLink,
        begin: &v1::MigrateBegin,
        source: &str,
        job: &Arc<crate::jobs::Job>,
        started: &mut Option<Arc<Hosted>>,
    ) -> Result<IncomingReport, MigrationError> {
        let origin = if begin.origin.is_empty() {
            format!("migrated from {source}")
        } else {
            format!("{} (migrated from {source})", begin.origin)
        };
        let local = JobContent { agent: self, job };
        let mut events = JobSlots {
            agent: self,
            job: job.clone(),
        };
        migrate_in_job(
            link,
            begin,
            &local,
            &self.fp,
            &mut events,
            &mut |region: Region, state: VcpuState| {
                // Resumed by post-copy, its memory is not all here yet: it
                // is still arriving (the source, asking where it stands,
                // must not release its copy until it is complete).
                let arriving = region.postcopy();
                if begin.clone {
                    // Verified as an exact copy; it must not run as one.
                    let id =
                        pagecast_memory::kvm::reidentify(&region).map_err(|e| e.to_string())?;
                    tracing::info!(vm = %begin.vm, "clone given a fresh identity {}", pagecast_memory::kvm::identity_hex(&id));
                }
                let vm = MicroVm::restore(region, &state, begin.dirty_rate)
                    .map_err(|e| e.to_string())?;
                let p = vm.progress().map_err(|e| e.to_string())?;
                // Listed as running before the source hears it resumed, so a
                // `vm list` after the migration reports success shows it here.
                let key = self.domain_key(&begin.domain).map_err(|e| e.to_string())?;
                let vm = Arc::new(Hosted::new(
                    &begin.vm,
                    origin.clone(),
                    (&begin.domain, key),
                    if arriving {
                        v1::HostedVmState::MigratingIn
                    } else {
                        v1::HostedVmState::Running
                    },
                    Box::new(MicroBackend::new(vm)),
                ));
                self.arrived(&vm).map_err(|e| e.to_string())?;
                *started = Some(vm);
                Ok(p)
            },
        )
    }

    /// What an arrival came to: a VM that started runs here whatever
    /// happened to the confirmation (the source then holds its copy paused,
    /// in doubt), and its contents join the map off the switchover path;
    /// one that did not start lets its name go.
    fn arrival_outcome(
        &self,
        name: &str,
        result: Result<IncomingReport, MigrationError>,
        started: Option<Arc<Hosted>>,
    ) -> Result<IncomingReport, AgentError> {
        match (result, started) {
            (Err(e), Some(vm))
                if matches!(e, MigrationError::PostcopyLost(_))
                    || vm.state() == v1::HostedVmState::MigratingIn =>
            {
                // It ran here on memory it can no longer complete: it must
                // not run on (its source keeps its paused copy).
                tracing::warn!(vm = %name, error = %e, "post-copy failed: stopping the arrived VM");
                self.forget(name, None);
                drop(vm);
                counter!(crate::metrics::MIGRATIONS, "role" => "destination", "result" => "failed")
                    .increment(1);
                Err(e.into())
            }
            (result, Some(vm)) => {
                if result.is_ok() {
                    // A post-copy arrival is complete.
                    let mut st = crate::sync::lock(&vm.state);
                    if *st == v1::HostedVmState::MigratingIn {
                        *st = v1::HostedVmState::Running;
                    }
                }
                self.index(&vm);
                counter!(crate::metrics::MIGRATIONS, "role" => "destination", "result" => "ok")
                    .increment(1);
                result.map_err(|e| {
                    AgentError::Migration(MigrationError::InDoubt(format!(
                        "the VM runs here but the source was not told: {e}"
                    )))
                })
            }
            (result, None) => {
                self.release(name);
                counter!(crate::metrics::MIGRATIONS, "role" => "destination", "result" => "failed")
                    .increment(1);
                Err(match result {
                    Err(e) => e.into(),
                    Ok(_) => {
                        AgentError::Migration(MigrationError::Start("the VM did not start".into()))
                    }
                })
            }
        }
    }
}
