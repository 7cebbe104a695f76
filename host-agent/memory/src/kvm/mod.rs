//! KVM micro-VMs: guest memory that a real vCPU dirties.
//!
//! A [`MicroVm`] is one KVM VM with one memory slot and one vCPU running
//! the small program in `guest.S` (32-bit protected mode, flat segments, no
//! paging). The program writes pages of a working set, a batch at a time,
//! and after each batch exits to the host through an I/O port; the host
//! sleeps between batches to hold the chosen dirty rate, and can throttle,
//! pause or stop the vCPU at any batch boundary.
//!
//! Memory is allocated and populated (every page faulted in, the image or
//! synthetic content copied in) before the slot is registered with
//! `KVM_MEM_LOG_DIRTY_PAGES`, so every later guest write shows up in the
//! dirty log. [`GuestMemory::take_dirty`] merges KVM's log with the pages
//! the host itself wrote, after checking the log's length against the slot.

pub mod guest;
mod pacer;

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_MEM_LOG_DIRTY_PAGES, kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

pub use pacer::{GuestExit, Pacer};

use crate::synth::SyntheticVm;
use crate::{
    AtomicBitmap, DirtyBitmap, GuestMemory, ImageFile, MemoryError, PAGE_SIZE, Page, Region,
};

/// Smallest micro-VM: the two reserved frames plus one page to dirty.
pub const MIN_MEMORY_BYTES: u64 = 3 * PAGE_SIZE as u64;
/// Largest micro-VM: 3 GiB, all of it addressable from 32-bit code and
/// clear of the TSS KVM needs below 4 GiB.
pub const MAX_MEMORY_BYTES: u64 = 3 << 30;
/// Where KVM's three-page TSS goes (needed on hosts without unrestricted
/// guest support), above all guest memory.
const TSS_ADDR: usize = 0xfffb_d000;
const SLOT: u32 = 0;

/// Errors of micro-VMs.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// An operation this kind of VM leaves to whatever runs it (QEMU
    /// pauses its own guest and sends its own device state).
    #[error("{0} is not this agent's to do for this VM")]
    Unsupported(&'static str),
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    Open(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A memory size outside the limits.
    #[error(
        "micro-VM memory of {bytes} bytes must be a multiple of 4096 from {MIN_MEMORY_BYTES} to {MAX_MEMORY_BYTES}"
    )]
    MemorySize {
        /// Bytes asked for.
        bytes: u64,
    },
    /// An image of another size than the VM's memory.
    #[error("{}: image of {image} bytes does not match micro-VM memory of {memory} bytes", path.display())]
    ImageSize {
        /// The image.
        path: std::path::PathBuf,
        /// Its size.
        image: u64,
        /// The VM's memory size.
        memory: u64,
    },
    /// A working-set range outside the usable frames.
    #[error(
        "working-set range {start}..{end} must be non-empty and lie within frames {}..{pages}",
        guest::RESERVED_FRAMES
    )]
    WorkingSet {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// Frames in memory.
        pages: u64,
    },
    /// More working-set ranges than the guest's parameter block holds.
    #[error("{0} working-set ranges; at most {max}", max = guest::MAX_RANGES)]
    TooManyRanges(usize),
    /// The vCPU exited for a reason the program never causes.
    #[error("the vCPU stopped unexpectedly: {0}")]
    VcpuFault(String),
    /// The vCPU thread panicked.
    #[error("the vCPU thread panicked")]
    Panicked,
    /// Migrated vCPU state of the wrong size.
    #[error("vCPU {what} of {got} bytes, expected {want}")]
    VcpuStateSize {
        /// Which structure.
        what: String,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// A memory error.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Whether this host can run micro-VMs (`/dev/kvm` opens).
pub fn kvm_available() -> bool {
    Kvm::new().is_ok()
}

/// What a micro-VM does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroVmConfig {
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// Frames the guest writes, cycled through in order.
    pub working_set: Vec<Range<u64>>,
    /// Page writes per second; 0 leaves memory alone (the guest only ticks
    /// its progress counter).
    pub dirty_rate: u64,
}

/// What guest memory starts as.
pub enum InitialMemory<'a> {
    /// All zero.
    Zero,
    /// A raw image of exactly the VM's memory size.
    Image(&'a Path),
    /// A synthetic VM of exactly the VM's memory size.
    Synthetic(&'a SyntheticVm),
}

/// The vCPU state that moves with a migration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VcpuState {
    /// General-purpose registers, instruction pointer, flags.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
}

impl VcpuState {
    /// The raw bytes of both structures (fixed sizes, host layout).
    pub fn to_bytes(&self) -> (Vec<u8>, Vec<u8>) {
        use zerocopy::IntoBytes;
        (
            self.regs.as_bytes().to_vec(),
            self.sregs.as_bytes().to_vec(),
        )
    }

    /// Rebuilds the state from [`VcpuState::to_bytes`], checking the sizes.
    pub fn from_bytes(regs: &[u8], sregs: &[u8]) -> Result<Self, VmError> {
        use zerocopy::FromBytes;
        let bad = |what: &str, got: usize, want: usize| VmError::VcpuStateSize {
            what: what.to_owned(),
            got,
            want,
        };
        Ok(VcpuState {
            regs: kvm_regs::read_from_bytes(regs)
                .map_err(|_| bad("registers", regs.len(), std::mem::size_of::<kvm_regs>()))?,
            sregs: kvm_sregs::read_from_bytes(sregs).map_err(|_| {
                bad(
                    "special registers",
                    sregs.len(),
                    std::mem::size_of::<kvm_sregs>(),
                )
            })?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

struct Control {
    want: Want,
    parked: bool,
    finished: bool,
    rate: u64,
    throttle_pct: u8,
    batches: u64,
    fault: Option<String>,
}

struct Shared {
    ctl: Mutex<Control>,
    cv: Condvar,
    /// The vCPU thread while it runs, to kick out of `KVM_RUN` (cleared,
    /// under this lock, before it exits).
    vcpu_thread: Mutex<Option<libc::pthread_t>>,
    /// `kvm_run.immediate_exit` of the vCPU (its mapping lives as long as
    /// the `VcpuFd`, which outlives the thread), as an address.
    immediate_exit: usize,
}

/// The signal that kicks a vCPU thread out of `KVM_RUN` (its handler does
/// nothing: the interrupted ioctl returns `EINTR`).
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the kick signal's empty handler, once per process.
fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; it names a handler that
        // does nothing (async-signal-safe), with an empty mask.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        // A poisoned lock only means a panicking holder; the state is plain
        // data and still meaningful.
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gets the vCPU out of the guest now, even one spinning without
    /// exits: `immediate_exit` catches a thread about to enter `KVM_RUN`,
    /// the signal one inside it. Call after changing `want`.
    fn kick(&self) {
        // SAFETY: `immediate_exit` points into the vCPU's kvm_run mapping,
        // alive while the MicroVm (and so this Shared's owner) is; a byte
        // written volatile, which KVM reads on entry.
        unsafe { std::ptr::write_volatile(self.immediate_exit as *mut u8, 1) };
        let t = self.vcpu_thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = *t {
            // SAFETY: the thread is alive: it clears this under the same
            // lock before it exits.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }
}

/// A running KVM micro-VM.
pub struct MicroVm {
    shared: Arc<Shared>,
    vcpu: Arc<Mutex<VcpuFd>>,
    thread: Option<JoinHandle<()>>,
    vm: VmFd,
    _kvm: Kvm,
    host_dirty: AtomicBitmap,
    working_set: Vec<Range<u64>>,
    // Declared last: dropped after the vCPU thread and the VM that map it.
    region: Region,
}

fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Batch size for a rate: about one exit per millisecond, at least one page.
fn batch_for(rate: u64) -> u32 {
    // About 100 exits a second: each exit is an emulated port write, which
    // costs tens of microseconds under nested virtualisation (at one exit
    // per page, eight guests writing 1,000 pages/s each kept a fifth of
    // two cores busy in KVM).
    if rate == 0 {
        0
    } else {
        (rate / 100).clamp(1, 4096) as u32
    }
}

impl MicroVm {
    /// Creates the VM, loads its memory and the guest program, and starts the
    /// vCPU.
    pub fn boot(config: &MicroVmConfig, initial: InitialMemory<'_>) -> Result<Self, VmError> {
        let bytes = config.memory_bytes;
        if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&bytes)
            || !bytes.is_multiple_of(PAGE_SIZE as u64)
        {
            return Err(VmError::MemorySize { bytes });
        }
        let pages = bytes / PAGE_SIZE as u64;
        if config.working_set.len() > guest::MAX_RANGES {
            return Err(VmError::TooManyRanges(config.working_set.len()));
        }
        for r in &config.working_set {
            if r.start < guest::RESERVED_FRAMES || r.end > pages || r.start >= r.end {
                return Err(VmError::WorkingSet {
                    start: r.start,
                    end: r.end,
                    pages,
                });
            }
        }

        // Populate every page before KVM sees the memory.
        let region = Region::anonymous(bytes)?;
        match initial {
            InitialMemory::Zero => {}
            InitialMemory::Image(path) => {
                let img = ImageFile::open(path)?;
                if img.len_bytes() != bytes {
                    return Err(VmError::ImageSize {
                        path: path.to_owned(),
                        image: img.len_bytes(),
                        memory: bytes,
                    });
                }
                let mut page = [0u8; PAGE_SIZE];
                for frame in 0..pages {
                    img.read_page(frame, &mut page)?;
                    region.write_page(frame, &page)?;
                }
            }
            InitialMemory::Synthetic(vm) => {
                if vm.spec().memory_bytes() != bytes {
                    return Err(VmError::MemorySize {
                        bytes: vm.spec().memory_bytes(),
                    });
                }
                let mut page = [0u8; PAGE_SIZE];
                for frame in 0..pages {
                    vm.fill_page(frame, &mut page);
                    region.write_page(frame, &page)?;
                }
            }
        }
        install_program(&region, &config.working_set, batch_for(config.dirty_rate))?;

        let (kvm, vm, vcpu) = create(&region)?;
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("get special registers"))?;
        sregs.cs = flat_segment(0x08, 0xb);
        let data = flat_segment(0x10, 0x3);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = guest::GDT_ADDR;
        sregs.gdt.limit = (guest::GDT.len() * 8 - 1) as u16;
        sregs.cr0 |= 1; // protected mode, no paging
        vcpu.set_sregs(&sregs)
            .map_err(kvm_err("set special registers"))?;
        let regs = kvm_regs {
            rip: guest::CODE_ADDR,
            rflags: 0x2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(kvm_err("set registers"))?;

        Ok(Self::start(kvm, vm, vcpu, region, config))
    }

    /// Recreates a VM from migrated memory and vCPU state and starts it.
    /// `region` must hold the guest's whole memory (the program and its
    /// parameters included) and must have been populated before this call,
    /// as [`Region::anonymous`] does.
    pub fn restore(region: Region, state: &VcpuState, dirty_rate: u64) -> Result<Self, VmError> {
        let bytes = region.len() as u64;
        if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&bytes) {
            return Err(VmError::MemorySize { bytes });
        }
        let (kvm, vm, vcpu) = create(&region)?;
        vcpu.set_sregs(&state.sregs)
            .map_err(kvm_err("restore special registers"))?;
        vcpu.set_regs(&state.regs)
            .map_err(kvm_err("restore registers"))?;
        let config = MicroVmConfig {
            memory_bytes: bytes,
            working_set: Vec::new(),
            dirty_rate,
        };
        Ok(Self::start(kvm, vm, vcpu, region, &config))
    }

    /// The page-write rate the host paces the guest to.
    pub fn dirty_rate(&self) -> u64 {
        self.shared.lock().rate
    }

    /// The current throttle, in percent.
    pub fn throttle(&self) -> u8 {
        self.shared.lock().throttle_pct
    }

    fn start(kvm: Kvm, vm: VmFd, mut vcpu: VcpuFd, region: Region, config: &MicroVmConfig) -> Self {
        install_kick_handler();
        let immediate_exit = std::ptr::addr_of_mut!(vcpu.get_kvm_run().immediate_exit) as usize;
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Control {
                want: Want::Run,
                parked: false,
                finished: false,
                rate: config.dirty_rate,
                throttle_pct: 0,
                batches: 0,
                fault: None,
            }),
            cv: Condvar::new(),
            vcpu_thread: Mutex::new(None),
            immediate_exit,
        });
        let vcpu = Arc::new(Mutex::new(vcpu));
        let thread = {
            let (shared, vcpu) = (shared.clone(), vcpu.clone());
            let postcopy = region.userfault();
            std::thread::Builder::new()
                .name("pagecast-vcpu".into())
                .spawn(move || vcpu_loop(&shared, &vcpu, postcopy.as_deref()))
                .expect("spawning the vCPU thread")
        };
        MicroVm {
            shared,
            vcpu,
            thread: Some(thread),
            vm,
            _kvm: kvm,
            host_dirty: AtomicBitmap::new(region.pages()),
            working_set: config.working_set.clone(),
            region,
        }
    }

    /// The working set the guest cycles through.
    pub fn working_set(&self) -> &[Range<u64>] {
        &self.working_set
    }

    /// The guest's progress counter: page writes plus idle ticks so far.
    pub fn progress(&self) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.region.read_bytes(
            guest::PARAMS_ADDR as usize + guest::params::PROGRESS,
            &mut b,
        )?;
        Ok(u64::from_le_bytes(b))
    }

    /// The VM's identity (16 bytes the guest can read in its parameter
    /// block).
    pub fn identity(&self) -> Result<[u8; IDENTITY_BYTES], MemoryError> {
        read_identity(&self.region)
    }

    /// Batches the vCPU has completed.
    pub fn batches(&self) -> u64 {
        self.shared.lock().batches
    }

    /// Sets the page-write rate (0: idle). Takes effect at the next batch.
    pub fn set_dirty_rate(&self, rate: u64) -> Result<(), MemoryError> {
        self.shared.lock().rate = rate;
        self.write_param_u32(guest::params::BATCH, batch_for(rate))
    }

    /// Slows the vCPU to `100 - pct` percent of its dirty rate (auto-converge).
    pub fn set_throttle(&self, pct: u8) {
        self.shared.lock().throttle_pct = pct.min(99);
        self.shared.cv.notify_all();
    }

    fn write_param_u32(&self, offset: usize, v: u32) -> Result<(), MemoryError> {
        self.region
            .write_bytes(guest::PARAMS_ADDR as usize + offset, &v.to_le_bytes())?;
        self.host_dirty.mark(guest::PARAMS_ADDR / PAGE_SIZE as u64)
    }

    /// Stops the vCPU at its next batch boundary and waits until it is
    /// parked; memory is then quiescent.
    pub fn pause(&self) -> Result<(), VmError> {
        let mut c = self.shared.lock();
        if c.want == Want::Stop || c.finished {
            return self.fault_or_stopped(&c);
        }
        c.want = Want::Pause;
        self.shared.cv.notify_all();
        drop(c);
        self.shared.kick();
        let mut c = self.shared.lock();
        while !c.parked && !c.finished {
            c = self.shared.cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
        if c.finished {
            return self.fault_or_stopped(&c);
        }
        Ok(())
    }

    fn fault_or_stopped(&self, c: &Control) -> Result<(), VmError> {
        Err(VmError::VcpuFault(
            c.fault
                .clone()
                .unwrap_or_else(|| "the vCPU has stopped".into()),
        ))
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        let mut c = self.shared.lock();
        if c.want == Want::Pause {
            c.want = Want::Run;
            self.shared.cv.notify_all();
        }
    }

    /// Whether the vCPU is parked.
    pub fn is_paused(&self) -> bool {
        self.shared.lock().parked
    }

    /// The vCPU's registers; pauses it first if it is running.
    pub fn vcpu_state(&self) -> Result<VcpuState, VmError> {
        self.pause()?;
        let v = self.vcpu.lock().unwrap_or_else(|e| e.into_inner());
        Ok(VcpuState {
            regs: v.get_regs().map_err(kvm_err("get registers"))?,
            sregs: v.get_sregs().map_err(kvm_err("get special registers"))?,
        })
    }

    /// Stops the vCPU for good and reports why it ended, if not by request.
    pub fn stop(mut self) -> Result<(), VmError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), VmError> {
        {
            let mut c = self.shared.lock();
            c.want = Want::Stop;
            self.shared.cv.notify_all();
        }
        self.shared.kick();
        if let Some(t) = self.thread.take() {
            t.join().map_err(|_| VmError::Panicked)?;
        }
        match self.shared.lock().fault.clone() {
            Some(f) => Err(VmError::VcpuFault(f)),
            None => Ok(()),
        }
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// A KVM VM with `region` as its one memory slot (dirty logging on) and one
/// vCPU. The region's pages must already be populated.
fn create(region: &Region) -> Result<(Kvm, VmFd, VcpuFd), VmError> {
    let kvm = Kvm::new().map_err(VmError::Open)?;
    let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
    vm.set_tss_address(TSS_ADDR)
        .map_err(kvm_err("set TSS address"))?;
    let slot = kvm_userspace_memory_region {
        slot: SLOT,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: region.len() as u64,
        userspace_addr: region.as_ptr() as u64,
    };
    // SAFETY: the region is a live, page-aligned mapping of `len` bytes
    // that outlives the VM: `MicroVm` declares `region` after `vm`, so it
    // is dropped after the VM file descriptor is closed.
    unsafe { vm.set_user_memory_region(slot) }.map_err(kvm_err("set memory region"))?;
    let vcpu = vm.create_vcpu(0).map_err(kvm_err("create vCPU"))?;
    Ok((kvm, vm, vcpu))
}

/// Bytes of a micro-VM's identity.
pub const IDENTITY_BYTES: usize = 16;

/// A fresh random identity.
pub fn new_identity() -> [u8; IDENTITY_BYTES] {
    let mut id = [0u8; IDENTITY_BYTES];
    let mut got = 0;
    while got < id.len() {
        // SAFETY: getrandom(2) writes at most `len - got` bytes into the
        // rest of `id`, which lives across the call.
        let n = unsafe { libc::getrandom(id[got..].as_mut_ptr().cast(), id.len() - got, 0) };
        if n > 0 {
            got += n as usize;
        }
    }
    id
}

/// An identity as 32 lowercase hex digits.
pub fn identity_hex(id: &[u8; IDENTITY_BYTES]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The identity in the parameter block of the memory `region` holds.
pub fn read_identity(region: &Region) -> Result<[u8; IDENTITY_BYTES], MemoryError> {
    let mut id = [0u8; IDENTITY_BYTES];
    region.read_bytes(
        guest::PARAMS_ADDR as usize + guest::params::IDENTITY,
        &mut id,
    )?;
    Ok(id)
}

/// Gives the VM whose memory `region` holds (not running) a fresh identity:
/// a clone must not share its source's. Returns the new one.
pub fn reidentify(region: &Region) -> Result<[u8; IDENTITY_BYTES], MemoryError> {
    let id = new_identity();
    region.write_bytes(guest::PARAMS_ADDR as usize + guest::params::IDENTITY, &id)?;
    Ok(id)
}

/// Writes the program, the GDT and the parameter block into frames 0 and 1.
fn install_program(region: &Region, ws: &[Range<u64>], batch: u32) -> Result<(), MemoryError> {
    let mut frame0 = [0u8; PAGE_SIZE];
    frame0[..guest::PROGRAM.len()].copy_from_slice(guest::PROGRAM);
    for (i, d) in guest::GDT.iter().enumerate() {
        let at = guest::GDT_ADDR as usize + i * 8;
        frame0[at..at + 8].copy_from_slice(&d.to_le_bytes());
    }
    region.write_page(0, &frame0)?;
    let mut p: Page = [0u8; PAGE_SIZE];
    let put = |p: &mut Page, at: usize, v: u32| p[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put(&mut p, guest::params::MAGIC, guest::MAGIC);
    put(&mut p, guest::params::BATCH, batch);
    put(&mut p, guest::params::RANGE_COUNT, ws.len() as u32);
    for (i, r) in ws.iter().enumerate() {
        let at = guest::params::RANGES + i * 8;
        put(&mut p, at, r.start as u32);
        put(&mut p, at + 4, (r.end - r.start) as u32);
    }
    p[guest::params::IDENTITY..guest::params::IDENTITY + IDENTITY_BYTES]
        .copy_from_slice(&new_identity());
    region.write_page(guest::PARAMS_ADDR / PAGE_SIZE as u64, &p)
}

fn classify(exit: &VcpuExit<'_>) -> GuestExit {
    match exit {
        VcpuExit::IoOut(guest::PORT_BATCH, _) => GuestExit::Batch,
        VcpuExit::IoOut(guest::PORT_IDLE, _) => GuestExit::Idle,
        other => GuestExit::Unexpected(format!("{other:?}")),
    }
}

fn vcpu_loop(shared: &Shared, vcpu: &Mutex<VcpuFd>, postcopy: Option<&crate::Userfault>) {
    // SAFETY: pthread_self has no preconditions.
    *shared.vcpu_thread.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(unsafe { libc::pthread_self() });
    vcpu_run_loop(shared, vcpu, postcopy);
    *shared.vcpu_thread.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

fn vcpu_run_loop(shared: &Shared, vcpu: &Mutex<VcpuFd>, postcopy: Option<&crate::Userfault>) {
    let mut pacer = Pacer::new(Instant::now());
    loop {
        let (rate, throttle) = {
            let mut c = shared.lock();
            loop {
                // Memory whose post-copy failed: the guest never runs on,
                // it is held as if paused until it is stopped.
                let held = postcopy.is_some_and(|u| u.failed()) && c.want == Want::Run;
                match if held { Want::Pause } else { c.want } {
                    Want::Stop => {
                        c.finished = true;
                        c.parked = false;
                        shared.cv.notify_all();
                        return;
                    }
                    Want::Pause => {
                        if !c.parked {
                            c.parked = true;
                            shared.cv.notify_all();
                        }
                        c = shared.cv.wait(c).unwrap_or_else(|e| e.into_inner());
                    }
                    Want::Run => {
                        if c.parked {
                            c.parked = false;
                            shared.cv.notify_all();
                        }
                        break;
                    }
                }
            }
            (c.rate, c.throttle_pct)
        };
        let exit = {
            let mut v = vcpu.lock().unwrap_or_else(|e| e.into_inner());
            let ran = v.run().map(|exit| classify(&exit));
            // A kick asked this exit (or the next entry) to return at once:
            // clear it before looking at what is wanted.
            v.set_kvm_immediate_exit(0);
            match ran {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => GuestExit::Unexpected(format!("KVM_RUN failed: {e}")),
            }
        };
        let now = Instant::now();
        match pacer.on_exit(&exit, rate, throttle, now) {
            Ok(resume_at) => {
                let mut c = shared.lock();
                if exit == GuestExit::Batch {
                    c.batches += 1;
                }
                // Sleep until the pacing deadline, waking early for a
                // pause, stop or throttle change.
                while c.want == Want::Run {
                    let now = Instant::now();
                    if now >= resume_at {
                        break;
                    }
                    let (g, _) = shared
                        .cv
                        .wait_timeout(c, resume_at - now)
                        .unwrap_or_else(|e| e.into_inner());
                    c = g;
                }
            }
            Err(fault) => {
                let mut c = shared.lock();
                c.fault = Some(fault);
                c.finished = true;
                c.parked = false;
                shared.cv.notify_all();
                return;
            }
        }
    }
}

impl GuestMemory for MicroVm {
    fn write_page(&self, frame: u64, data: &Page) -> Result<(), MemoryError> {
        self.region.write_page(frame, data)?;
        self.host_dirty.mark(frame)
    }

    fn take_dirty(&self) -> Result<DirtyBitmap, MemoryError> {
        let pages = self.region.pages();
        let words = self
            .vm
            .get_dirty_log(SLOT, self.region.len())
            .map_err(|e| MemoryError::DirtyLog {
                slot: SLOT,
                source: std::io::Error::from_raw_os_error(e.errno()),
            })?;
        // From here on the log is cleared in KVM: nothing below may fail
        // without handing the bits back.
        let mut dirty = match DirtyBitmap::from_words(words, pages) {
            Ok(d) => d,
            Err(e) => {
                self.host_dirty.mark_all(&DirtyBitmap::full(pages))?;
                return Err(e);
            }
        };
        dirty.merge(&self.host_dirty.take())?;
        Ok(dirty)
    }

    fn mark_dirty(&self, pages: &DirtyBitmap) -> Result<(), MemoryError> {
        self.host_dirty.mark_all(pages)
    }

    fn region(&self) -> &Region {
        &self.region
    }
}

/// Idle time between ticks when the dirty rate is zero.
pub const IDLE_TICK: Duration = Duration::from_millis(10);
