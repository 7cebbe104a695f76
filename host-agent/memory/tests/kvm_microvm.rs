//! KVM micro-VM tests. They need `/dev/kvm`; where it is missing each test
//! says so and passes without running.

use std::collections::BTreeSet;
use std::ops::Range;
use std::time::Duration;

use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_memory::kvm::{InitialMemory, MicroVm, MicroVmConfig, VmError, guest};
use pagecast_memory::synth::{SynthSpec, SyntheticVm};
use pagecast_memory::{GuestMemory, PAGE_SIZE};
use pagecast_pages::PageHash;
use pagecast_testkit::{Need, needs};

fn snapshot(vm: &MicroVm) -> Vec<u8> {
    let mut out = vec![0u8; vm.region().len()];
    vm.region().read_bytes(0, &mut out).unwrap();
    out
}

fn changed_pages(a: &[u8], b: &[u8]) -> BTreeSet<u64> {
    a.chunks_exact(PAGE_SIZE)
        .zip(b.chunks_exact(PAGE_SIZE))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

fn in_working_set(ws: &[Range<u64>], frame: u64) -> bool {
    frame == guest::PARAMS_ADDR / PAGE_SIZE as u64 || ws.iter().any(|r| r.contains(&frame))
}

/// A working set of one range.
fn one(r: Range<u64>) -> Vec<Range<u64>> {
    std::iter::once(r).collect()
}

fn config(rate: u64) -> MicroVmConfig {
    MicroVmConfig {
        memory_bytes: 32 << 20,
        working_set: vec![2..300, 1000..1100, 8000..8192],
        dirty_rate: rate,
    }
}

#[test]
fn dirty_log_catches_every_write_of_a_paused_guest() {
    if !needs(
        "dirty_log_catches_every_write_of_a_paused_guest",
        &[Need::Kvm],
    ) {
        return;
    }
    let cfg = config(200_000);
    let vm = MicroVm::boot(&cfg, InitialMemory::Zero).unwrap();
    vm.pause().unwrap();
    vm.take_dirty().unwrap();
    let mut prev = snapshot(&vm);
    let mut total = 0;
    for round in 0..40 {
        vm.resume();
        std::thread::sleep(Duration::from_millis(3 + round % 7));
        vm.pause().unwrap();
        let dirty = vm.take_dirty().unwrap();
        let cur = snapshot(&vm);
        let changed = changed_pages(&prev, &cur);
        for f in &changed {
            assert!(
                dirty.get(*f),
                "round {round}: frame {f} changed but is not in the dirty log"
            );
        }
        for f in dirty.iter() {
            assert!(
                in_working_set(&cfg.working_set, f),
                "round {round}: frame {f} dirty outside the working set"
            );
        }
        total += changed.len();
        prev = cur;
    }
    assert!(total > 1000, "the guest wrote only {total} page-rounds");
    assert!(vm.progress().unwrap() > 1000);
    vm.stop().unwrap();
}

#[test]
fn dirty_log_of_a_running_guest_loses_nothing_across_rounds() {
    if !needs(
        "dirty_log_of_a_running_guest_loses_nothing_across_rounds",
        &[Need::Kvm],
    ) {
        return;
    }
    let cfg = config(100_000);
    let vm = MicroVm::boot(&cfg, InitialMemory::Zero).unwrap();
    vm.pause().unwrap();
    vm.take_dirty().unwrap();
    let mut snaps = vec![snapshot(&vm)];
    let mut logs = Vec::new();
    vm.resume();
    // Never pause: each round reads the log, then copies memory while the
    // guest keeps writing. A page that changed between two copies was
    // written after the earlier log read, so it is in this round's log or
    // the next one's.
    for round in 0..30 {
        std::thread::sleep(Duration::from_millis(2 + round % 5));
        logs.push(vm.take_dirty().unwrap());
        snaps.push(snapshot(&vm));
    }
    vm.pause().unwrap();
    logs.push(vm.take_dirty().unwrap());
    let mut caught = 0;
    for i in 0..snaps.len() - 1 {
        for f in changed_pages(&snaps[i], &snaps[i + 1]) {
            assert!(
                logs[i].get(f) || logs[i + 1].get(f),
                "round {i}: frame {f} changed but is in neither this round's log nor the next"
            );
            caught += 1;
        }
    }
    assert!(caught > 500, "only {caught} changes observed");
    vm.stop().unwrap();
}

#[test]
fn failed_sends_are_marked_dirty_again() {
    if !needs("failed_sends_are_marked_dirty_again", &[Need::Kvm]) {
        return;
    }
    let vm = MicroVm::boot(&config(0), InitialMemory::Zero).unwrap();
    vm.pause().unwrap();
    vm.take_dirty().unwrap();
    let mut fake_failures = pagecast_memory::DirtyBitmap::new(vm.page_count());
    fake_failures.set(5000).unwrap();
    fake_failures.set(7).unwrap();
    vm.mark_dirty(&fake_failures).unwrap();
    let d = vm.take_dirty().unwrap();
    assert!(d.get(5000) && d.get(7));
    vm.stop().unwrap();
}

#[test]
fn memory_loads_from_a_synthetic_vm_and_guest_runs_on_it() {
    if !needs(
        "memory_loads_from_a_synthetic_vm_and_guest_runs_on_it",
        &[Need::Kvm],
    ) {
        return;
    }
    let synth = SyntheticVm::new(SynthSpec::new("web", 0, 8 << 20).unwrap()).unwrap();
    let cfg = MicroVmConfig {
        memory_bytes: 8 << 20,
        working_set: one(100..110),
        dirty_rate: 0,
    };
    let vm = MicroVm::boot(&cfg, InitialMemory::Synthetic(&synth)).unwrap();
    let mut want = [0u8; PAGE_SIZE];
    let mut got = [0u8; PAGE_SIZE];
    for frame in [2, 50, 99, 1000, 2047] {
        synth.fill_page(frame, &mut want);
        vm.read_page(frame, &mut got).unwrap();
        assert_eq!(want, got, "frame {frame}");
    }
    // Idle guest: the counter ticks, nothing in the working set changes.
    let p0 = vm.progress().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(vm.progress().unwrap() > p0, "idle ticks advance progress");
    vm.pause().unwrap();
    let d = vm.take_dirty().unwrap();
    assert!(
        d.iter().all(|f| f == 1),
        "idle guest dirtied {:?}",
        d.ranges()
    );
    // Now let it write.
    vm.set_dirty_rate(50_000).unwrap();
    let p1 = vm.progress().unwrap();
    vm.resume();
    // Until it wrote the working set over at least once (10 frames; a
    // starved vCPU thread may take longer than the 0.2 ms it needs).
    let t = std::time::Instant::now();
    while vm.progress().unwrap() < p1 + 20 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.pause().unwrap();
    let d = vm.take_dirty().unwrap();
    assert!(
        (100..110).all(|f| d.get(f)),
        "working set dirty: {:?}",
        d.ranges()
    );
    vm.stop().unwrap();
}

#[test]
fn pacing_never_exceeds_the_rate_and_throttling_slows_the_guest() {
    if !needs(
        "pacing_never_exceeds_the_rate_and_throttling_slows_the_guest",
        &[Need::Kvm],
    ) {
        return;
    }
    let vm = MicroVm::boot(&config(20_000), InitialMemory::Zero).unwrap();
    let window = Duration::from_millis(500);
    // Writes over a window timed as it was, not as asked (a sleep may
    // oversleep on a loaded machine).
    let count = || {
        let (p, t) = (vm.progress().unwrap(), std::time::Instant::now());
        std::thread::sleep(window);
        let n = vm.progress().unwrap() - p;
        (n, t.elapsed().as_secs_f64())
    };
    let (fast, secs) = count();
    // 20,000 writes/s over the window; allow the first burst of debt.
    assert!(
        fast > 0 && fast as f64 <= 20_000.0 * secs + 1_500.0,
        "unthrottled: {fast} writes in {secs:.3} s"
    );
    vm.set_throttle(90);
    let (slow, secs) = count();
    assert!(
        slow as f64 <= 2_000.0 * secs + 500.0,
        "throttled to 10%: {slow} writes in {secs:.3} s"
    );
    vm.stop().unwrap();
}

#[test]
fn bad_configurations_are_refused() {
    let cases = [
        (
            MicroVmConfig {
                memory_bytes: 4096,
                working_set: vec![],
                dirty_rate: 0,
            },
            "must be a multiple of 4096",
        ),
        (
            MicroVmConfig {
                memory_bytes: (1 << 20) + 1,
                working_set: vec![],
                dirty_rate: 0,
            },
            "must be a multiple",
        ),
        (
            MicroVmConfig {
                memory_bytes: 1 << 20,
                working_set: one(0..5),
                dirty_rate: 0,
            },
            "working-set range 0..5",
        ),
        (
            MicroVmConfig {
                memory_bytes: 1 << 20,
                working_set: one(10..300),
                dirty_rate: 0,
            },
            "within frames 2..256",
        ),
        (
            MicroVmConfig {
                memory_bytes: 1 << 20,
                working_set: one(10..10),
                dirty_rate: 0,
            },
            "non-empty",
        ),
        (
            MicroVmConfig {
                memory_bytes: 1 << 20,
                working_set: vec![10..11; 481],
                dirty_rate: 0,
            },
            "at most 480",
        ),
    ];
    for (cfg, want) in cases {
        let e = match MicroVm::boot(&cfg, InitialMemory::Zero) {
            Ok(_) => panic!("{cfg:?} booted"),
            Err(e) => e,
        };
        assert!(
            !matches!(e, VmError::Open(_)),
            "validation comes before /dev/kvm"
        );
        assert!(e.to_string().contains(want), "{e} should say {want:?}");
    }
}

/// Hashing guest memory while the vCPU writes it: every hash must be the
/// hash of the very copy it was computed from (pages are copied out of
/// guest memory first, never hashed in place), and pages the guest is
/// writing must show up torn or changed between passes, so the test sees
/// real concurrency rather than a quiet guest.
#[test]
fn hashes_match_their_copies_while_the_guest_writes() {
    if !needs(
        "hashes_match_their_copies_while_the_guest_writes",
        &[Need::Kvm],
    ) {
        return;
    }
    let cfg = MicroVmConfig {
        memory_bytes: 16 << 20,
        working_set: one(16..4096),
        dirty_rate: 400_000,
    };
    let synth = SyntheticVm::new(SynthSpec::new("web", 0, 16 << 20).unwrap()).unwrap();
    let vm = MicroVm::boot(&cfg, InitialMemory::Synthetic(&synth)).unwrap();
    let fp = Fingerprinter::new(2).unwrap();
    let checked = std::sync::atomic::AtomicU64::new(0);
    let mismatched = std::sync::atomic::AtomicU64::new(0);
    let mut distinct_passes = std::collections::HashSet::new();
    let p0 = vm.progress().unwrap();
    // At least 20 passes, and on until the guest has run 10,000 steps
    // meanwhile (a busy machine gives its vCPU less time per pass).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut passes = 0;
    while passes < 20
        || (vm.progress().unwrap() <= p0 + 10_000 && std::time::Instant::now() < deadline)
    {
        passes += 1;
        let f = fp.fingerprint_observed(
            vm.region(),
            &pagecast_pages::ContentKey::CLUSTER,
            &|_| {},
            &|_, copy, hash| {
                checked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if PageHash::of_page(copy) != *hash {
                    mismatched.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            },
        );
        // The working set's content differs from pass to pass.
        distinct_passes.insert(f.distinct());
    }
    let p1 = vm.progress().unwrap();
    assert!(p1 > p0 + 10_000, "the guest barely ran: {p0} -> {p1}");
    assert!(
        distinct_passes.len() > 10,
        "the guest's writes never showed between passes"
    );
    let checked = checked.into_inner();
    assert!(checked > 20 * 2000, "only {checked} pages hashed");
    assert_eq!(
        mismatched.into_inner(),
        0,
        "a hash did not match the copy it was computed from"
    );
}

/// A vCPU spinning in the guest without exits is still paused and stopped
/// at once (kicked out of `KVM_RUN`). Before, pause, stop, migrate and
/// shutdown waited for an exit that never came.
#[test]
fn a_guest_spinning_without_exits_is_paused_and_stopped_at_once() {
    if !needs(
        "a_guest_spinning_without_exits_is_paused_and_stopped_at_once",
        &[Need::Kvm],
    ) {
        return;
    }
    let vm = std::sync::Arc::new(MicroVm::boot(&config(1000), InitialMemory::Zero).unwrap());
    // Paused at a batch boundary: where it resumes, `jmp $`.
    let rip = vm.vcpu_state().unwrap().regs.rip as usize;
    vm.region().write_bytes(rip, &[0xeb, 0xfe]).unwrap();
    vm.resume();
    std::thread::sleep(Duration::from_millis(200));
    let p0 = vm.progress().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vm.progress().unwrap(), p0, "the guest still writes pages");
    // Each within a deadline, on a thread: a hang fails the test.
    let within = |what: &str, f: Box<dyn FnOnce() -> Result<(), VmError> + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        let t0 = std::time::Instant::now();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(r) => r.unwrap_or_else(|e| panic!("{what}: {e}")),
            Err(_) => panic!("{what} did not return within 5 s of a spinning guest"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "{what} took {:?}",
            t0.elapsed()
        );
    };
    let v = vm.clone();
    within("pause", Box::new(move || v.pause()));
    vm.resume();
    std::thread::sleep(Duration::from_millis(100));
    let vm = std::sync::Arc::try_unwrap(vm).unwrap_or_else(|_| panic!("one owner"));
    within("stop", Box::new(move || vm.stop()));
}
