//! The job at every agent taking part: opened before anything moves (each
//! destination knows the sources sending to it, each source its
//! destinations), widened when a destination fetches from a rack-mate,
//! closed when the job is over. An agent serves host-to-host requests only
//! for jobs open there, so a job that was never opened at a destination
//! fails its migrations there with the agent's own refusal.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use pagecast_proto::v1;

use super::Prepared;
use crate::{Event, Services};

/// How long an evacuation's job may run at its agents.
pub const DEADLINE: Duration = Duration::from_secs(6 * 3600);

fn peer(host: &str, role: v1::JobRole) -> v1::JobPeer {
    v1::JobPeer {
        host: host.to_owned(),
        role: role as i32,
        vms: Vec::new(),
    }
}

/// The peers of every host taking part, by host: a destination's sources
/// each with the VMs it sends there (a destination admits no other), a
/// source's destinations.
fn peers_of(prep: &Prepared) -> BTreeMap<String, Vec<v1::JobPeer>> {
    let mut by: BTreeMap<String, BTreeMap<(String, i32), BTreeSet<String>>> = BTreeMap::new();
    for m in &prep.moving {
        by.entry(m.to.clone())
            .or_default()
            .entry((m.from.clone(), v1::JobRole::Source as i32))
            .or_default()
            .insert(m.name.clone());
        by.entry(m.from.clone())
            .or_default()
            .entry((m.to.clone(), v1::JobRole::Destination as i32))
            .or_default();
    }
    by.into_iter()
        .map(|(h, ps)| {
            let peers = ps
                .into_iter()
                .map(|((host, role), vms)| v1::JobPeer {
                    host,
                    role,
                    vms: vms.into_iter().collect(),
                })
                .collect();
            (h, peers)
        })
        .collect()
}

/// Opens `job` at every source and destination of the plan. An agent that
/// cannot be told is left out (its migrations then fail on their own,
/// each saying why): returns the hosts where it is open.
pub(super) fn open(
    svc: &Services,
    prep: &Prepared,
    job: &str,
    on: &(dyn Fn(Event) + Sync),
) -> Vec<String> {
    // Every host at once: a frozen one costs one request's deadline, not
    // one each.
    let asked: Vec<_> = peers_of(prep).into_iter().collect();
    let answers = crate::at_once(&asked, |(host, peers)| {
        // The QEMUs libvirt starts here for the job's domains: the only
        // local addresses this agent may feed a stream into.
        let qemu_connect = prep
            .moving
            .iter()
            .filter(|m| m.to == *host)
            .filter_map(|m| m.libvirt.as_ref())
            .map(|l| format!("127.0.0.1:{}", l.port))
            .collect();
        let r = v1::JobOpen {
            job: job.to_owned(),
            peers: peers.clone(),
            deadline_ms: DEADLINE.as_millis() as u64,
            qemu_connect,
        };
        svc.agents.open_job(prep.address(host), r)
    });
    let mut opened = Vec::new();
    for ((host, _), r) in asked.into_iter().zip(answers) {
        match r {
            Ok(_) => opened.push(host),
            Err(e) => on(Event::Step(format!(
                "{host}: cannot open job {job} there: {e}"
            ))),
        }
    }
    opened
}

/// Lets destination `d` fetch from rack-mate `mate` in `job`: each knows
/// the other in its role.
pub(super) fn open_fetch(
    svc: &Services,
    prep: &Prepared,
    job: &str,
    d: &str,
    mate: &str,
) -> Result<(), pagecast_agent_api::ClientError> {
    for (at, other, role) in [
        (mate, d, v1::JobRole::Destination),
        (d, mate, v1::JobRole::RackMate),
    ] {
        svc.agents.open_job(
            prep.address(at),
            v1::JobOpen {
                job: job.to_owned(),
                peers: vec![peer(other, role)],
                deadline_ms: DEADLINE.as_millis() as u64,
                qemu_connect: Vec::new(),
            },
        )?;
    }
    Ok(())
}

/// Lets intermediary `inter` take pages from source `src` in `job`, and
/// destinations `dests` gather them from it: the source knows it as an
/// intermediary, it knows them as destinations.
pub(super) fn open_stash(
    svc: &Services,
    prep: &Prepared,
    job: &str,
    (src, inter): (&str, &str),
    dests: &[&str],
) -> Result<(), pagecast_agent_api::ClientError> {
    let opens = [
        (src, vec![peer(inter, v1::JobRole::Intermediary)]),
        (
            inter,
            dests
                .iter()
                .map(|d| peer(d, v1::JobRole::Destination))
                .collect(),
        ),
    ];
    for (at, peers) in opens {
        svc.agents.open_job(
            prep.address(at),
            v1::JobOpen {
                job: job.to_owned(),
                peers,
                deadline_ms: DEADLINE.as_millis() as u64,
                qemu_connect: Vec::new(),
            },
        )?;
    }
    Ok(())
}

/// Closes `job` at `hosts` (and at rack-mates the job reached), best
/// effort, 32 hosts at once, so that frozen hosts cost one request's
/// deadline per 32, not one each: a job left open at an agent ends at its
/// deadline.
pub(super) fn close(svc: &Services, prep: &Prepared, job: &str, hosts: &[String]) {
    crate::at_once(hosts, |h| {
        let _ = svc.agents.close_job(prep.address(h), job);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_destination_knows_its_sources_and_each_source_its_destinations() {
        let moving = vec![
            super::super::Moving {
                name: "v1".into(),
                from: "a".into(),
                to: "x".into(),
                libvirt: None,
                qemu: false,
            },
            super::super::Moving {
                name: "v2".into(),
                from: "a".into(),
                to: "y".into(),
                libvirt: None,
                qemu: false,
            },
            super::super::Moving {
                name: "v3".into(),
                from: "b".into(),
                to: "x".into(),
                libvirt: None,
                qemu: false,
            },
        ];
        let prep = Prepared {
            view: crate::view::ClusterView::default(),
            moving,
            predicted: Default::default(),
            held: Default::default(),
        };
        let p = peers_of(&prep);
        let roles = |h: &str| -> Vec<(String, i32)> {
            p[h].iter().map(|x| (x.host.clone(), x.role)).collect()
        };
        let (src, dst) = (v1::JobRole::Source as i32, v1::JobRole::Destination as i32);
        assert_eq!(roles("x"), vec![("a".into(), src), ("b".into(), src)]);
        assert_eq!(roles("y"), vec![("a".into(), src)]);
        assert_eq!(roles("a"), vec![("x".into(), dst), ("y".into(), dst)]);
        assert_eq!(roles("b"), vec![("x".into(), dst)]);
    }
}
