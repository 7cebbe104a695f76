//! Where the CPU went while a measured command ran: the machine's busy
//! time (from `/proc/stat`), each cluster process's (from
//! `/proc/PID/stat`: its threads' user and system time, the kernel work
//! of its own system calls and page faults included, and for an agent its
//! guests' vCPUs) and the operator command's (the harness's waited-for
//! children, from `getrusage`).
//!
//! The emulated racks share this machine's cores: a run whose cores were
//! all busy was bound by CPU, not by its links, and its times say so.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

/// CPU time counters at one moment.
pub struct Probe {
    at: Instant,
    /// The machine's busy and stolen time, in clock ticks.
    machine: MachineTicks,
    /// Each process's user and system time, in clock ticks (None: gone or
    /// unreadable).
    procs: Vec<Option<u64>>,
    /// The harness's waited-for children's user and system time, seconds.
    children_s: f64,
}

/// The first line of `/proc/stat`, summed as this module counts it.
#[derive(Debug, Clone, Copy, Default)]
struct MachineTicks {
    /// user, nice, system, irq and softirq (guest time is inside user
    /// and nice already).
    busy: u64,
    /// Time the hypervisor ran something else while this machine wanted
    /// to run.
    steal: u64,
    /// The `cpuN` lines: the machine's CPUs.
    cpus: usize,
}

/// CPU-seconds spent during a measured command.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CpuUse {
    /// The command's wall time, seconds.
    pub wall_s: f64,
    /// The machine's CPUs (`cpuN` lines of `/proc/stat`).
    pub cores: usize,
    /// CPU-seconds the machine was busy: user, nice, system, irq and
    /// softirq time of every CPU.
    pub machine_s: f64,
    /// CPU-seconds stolen by the hypervisor meanwhile (this machine is a
    /// virtual machine): time its CPUs wanted and did not get.
    pub steal_s: f64,
    /// CPU-seconds per cluster process (agents by host name, index
    /// replicas as `replicaN`) and `command` (the operator command).
    pub by_process: BTreeMap<String, f64>,
}

impl CpuUse {
    /// Cores busy on average: `machine_s / wall_s`.
    pub fn cores_busy(&self) -> f64 {
        self.machine_s / self.wall_s.max(1e-9)
    }

    /// CPU-seconds of the processes named in `names`.
    pub fn of(&self, names: &[String]) -> f64 {
        // Plus zero: an empty sum is -0.0.
        names
            .iter()
            .filter_map(|n| self.by_process.get(n))
            .sum::<f64>()
            + 0.0
    }

    /// CPU-seconds the machine was busy outside the cluster's processes
    /// and the command: interrupts and softirqs not charged to them,
    /// kernel threads, the harness, and any profiler running.
    pub fn elsewhere(&self) -> f64 {
        (self.machine_s - self.by_process.values().sum::<f64>()).max(0.0)
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the running system; no memory
    // is passed.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// The machine's ticks from the first line of /proc/stat (user, nice,
/// system, idle, iowait, irq, softirq, steal, guest, guest_nice), and its
/// CPUs from the `cpuN` lines.
fn machine_ticks() -> MachineTicks {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return MachineTicks::default();
    };
    let Some(line) = s.lines().next() else {
        return MachineTicks::default();
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let f = |i: usize| v.get(i).copied().unwrap_or(0);
    MachineTicks {
        busy: f(0) + f(1) + f(2) + f(5) + f(6),
        steal: f(7),
        cpus: s
            .lines()
            .filter(|l| {
                l.strip_prefix("cpu")
                    .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
            })
            .count(),
    }
}

/// A process's user + system ticks from /proc/PID/stat.
fn process_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is the first, utime the twelfth, stime the thirteenth.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn children_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we own and pass by pointer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_CHILDREN is a valid `who`.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

impl Probe {
    /// The counters now, for the processes `pids`.
    pub fn take(pids: &[u32]) -> Self {
        Probe {
            at: Instant::now(),
            machine: machine_ticks(),
            procs: pids.iter().map(|&p| process_ticks(p)).collect(),
            children_s: children_seconds(),
        }
    }

    /// What was spent since this probe, by the processes `pids` (the same
    /// as at [`Probe::take`]) named `names`.
    pub fn since(&self, pids: &[u32], names: &[String]) -> CpuUse {
        let now = Probe::take(pids);
        let hz = ticks_per_second();
        let mut by_process = BTreeMap::new();
        for ((name, a), b) in names.iter().zip(&self.procs).zip(&now.procs) {
            if let (Some(a), Some(b)) = (a, b) {
                by_process.insert(name.clone(), b.saturating_sub(*a) as f64 / hz);
            }
        }
        by_process.insert(
            "command".to_owned(),
            (now.children_s - self.children_s).max(0.0),
        );
        CpuUse {
            wall_s: now.at.duration_since(self.at).as_secs_f64(),
            cores: now.machine.cpus.max(1),
            machine_s: now.machine.busy.saturating_sub(self.machine.busy) as f64 / hz,
            steal_s: now.machine.steal.saturating_sub(self.machine.steal) as f64 / hz,
            by_process,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_child_shows_in_its_own_time_and_the_machines() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done"])
            .spawn()
            .expect("sh");
        let pids = [child.id()];
        let names = ["busy".to_owned()];
        let p = Probe::take(&pids);
        // Sample while it runs (a reaped child's /proc entry is gone).
        let mut last = None;
        while child.try_wait().expect("wait").is_none() {
            last = Some(p.since(&pids, &names));
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let u = last.expect("the child ran for a while");
        let busy = u.by_process["busy"];
        assert!(busy > 0.0, "the busy child used no CPU: {u:?}");
        assert!(u.machine_s + 0.05 >= busy, "machine below a process: {u:?}");
        assert!(u.cores_busy() > 0.0 && u.cores >= 1);
        // Nothing sums to zero, printed as 0.0 (an empty f64 sum is -0.0).
        assert_eq!(format!("{:.1}", u.of(&[])), "0.0");
        // The reaped child now counts in the harness's children.
        let after = p.since(&pids, &names);
        assert!(after.by_process["command"] > 0.0, "{after:?}");
    }
}
