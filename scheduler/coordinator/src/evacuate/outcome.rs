//! The report of a job: what was planned, then what each VM and the casts
//! and fetches did.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use pagecast_proto::v1;

use super::run::Finished;
use super::{EvacuateSpec, Prepared, now_s};
use crate::Event;
use crate::report::{BytesByClass, EvacuationReport, VmOutcome};

/// The report of a plan: every VM's move, nothing measured yet.
pub(super) fn planned(spec: &EvacuateSpec, prep: &Prepared) -> EvacuationReport {
    EvacuationReport {
        job: spec.job.clone(),
        strategy: spec.method.name().into(),
        dry_run: spec.dry_run,
        predicted: prep.predicted.clone(),
        vms: prep
            .moving
            .iter()
            .map(|m| VmOutcome {
                name: m.name.clone(),
                from: m.from.clone(),
                to: m.to.clone(),
                max_downtime_ms: f64::from(spec.max_downtime_ms),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// The report once the migrations ended: each VM's result, the bytes by
/// source and class, the eviction time (when the last VM left its source).
pub(super) fn measured(
    mut report: EvacuationReport,
    prep: &Prepared,
    f: Finished,
    started: Instant,
    on: &(dyn Fn(Event) + Sync),
    stop: &AtomicBool,
) -> EvacuationReport {
    let t = &f.traffic;
    let mut per_dest_vms: HashMap<&str, u64> = HashMap::new();
    for m in &prep.moving {
        *per_dest_vms.entry(m.to.as_str()).or_default() += 1;
    }
    let mut eviction: f64 = 0.0;
    let mut all_ok = true;
    let mut link_bytes = 0;
    for (i, o) in report.vms.iter_mut().enumerate() {
        let m = &prep.moving[i];
        let k = per_dest_vms[m.to.as_str()].max(1);
        o.pages_short_haul = t.fetch_frames.get(&m.to).copied().unwrap_or(0) / k;
        o.pages_cast = t.cast_frames.get(&m.to).copied().unwrap_or(0) / k;
        let mut left = None;
        if let Some((r, at)) = f.results.get(&i) {
            result(o, r, f.local.get(&i).copied());
            *report.bytes_by_source.entry(m.from.clone()).or_default() += r.bytes_sent;
            if r.ok {
                // After a post-copy switchover the source is free once it
                // has pushed what it was to push: the rest comes from
                // intermediaries (scatter-gather), while its paused copy
                // only stands by for what they fail to give.
                let gathering = if r.postcopy {
                    (r.postcopy_ms - r.postcopy_pushed_ms).max(0.0) / 1e3
                } else {
                    0.0
                };
                let at = (at - gathering).max(0.0);
                eviction = eviction.max(at);
                left = Some(at);
                o.left_s = Some(at);
                o.switchover = if r.postcopy { "postcopy" } else { "precopy" }.into();
                o.postcopy_faults = r.postcopy_requested;
                o.postcopy_s = r.postcopy_ms / 1e3;
                o.pages_gathered = r.pages_gathered;
            }
            link_bytes += r.bytes_sent;
            if prep.view.rack_of(&m.from) != prep.view.rack_of(&m.to) {
                report.core_bytes += r.bytes_sent;
            }
        } else if let Some(e) = f.failures.get(&i) {
            o.error = e.clone();
        } else {
            o.error = "stopped before it started".into();
        }
        all_ok &= o.ok && (o.verified || o.kind == "qemu");
        // A source is evicted once its last VM of the job has left; one
        // that stayed keeps it from being evicted at all.
        let evicted = report.evicted_s.entry(m.from.clone()).or_insert(Some(0.0));
        *evicted = match (*evicted, left) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    for (src, b) in t.cast_bytes.iter().chain(&t.scattered) {
        *report.bytes_by_source.entry(src.clone()).or_default() += b;
    }
    report.bytes_by_class = BytesByClass {
        multicast: t.multicast,
        unicast: link_bytes + t.unicast + t.scattered.values().sum::<u64>(),
        short_haul: t.short_haul,
        repair: t.repair,
    };
    report.core_bytes += t.core;
    report.source_bytes = report.bytes_by_source.values().sum();
    report.eviction_s = eviction;
    report.total_s = now_s(started);
    report.ok = all_ok;
    if !t.errors.is_empty() {
        on(Event::Step(format!(
            "some transfers failed, and their pages went another way (an intermediary's share \
             cast from its source; the rest in the migrations): {}",
            t.errors.join("; ")
        )));
    }
    if stop.load(Ordering::Relaxed) && !all_ok {
        on(Event::Step(
            "stopped: VMs that had not switched over run at their sources".into(),
        ));
    }
    report
}

/// One VM's outcome from its migration's result (`held_local`: the frames
/// its destination filled, as reported when it was held).
fn result(o: &mut VmOutcome, r: &v1::MigrateResult, held_local: Option<u64>) {
    o.ok = r.ok;
    o.verified = r.ok && r.verified;
    o.kind = pagecast_proto::names::kind(r.kind()).into();
    o.downtime_ms = r.downtime_ms;
    o.bytes_sent = r.bytes_sent;
    o.pages_local = held_local.unwrap_or(r.pages_local);
    o.error = pagecast_proto::refusal_text(&r.error).to_owned();
    o.in_doubt = r.in_doubt;
    o.max_throttle_pct = r.max_throttle_pct;
}
