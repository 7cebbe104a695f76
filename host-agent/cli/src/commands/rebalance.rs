//! `pagecast index rebalance`: move shards' voters so that every shard has
//! its voters among the replicas allowed, spread evenly. The moves come
//! from `pagecast_index::placement::rebalance`; each adds a voter, waits
//! for it to catch up, then removes the voter it replaces.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pagecast_channel::Tls;
use pagecast_index::client::IndexClient;
use pagecast_index::placement;
use pagecast_index::replica::parse_peers;

use super::index::members_request;

/// The members, and each shard's voters as its leader reports them.
struct Layout {
    peers: BTreeMap<u64, String>,
    voters: Vec<Vec<u64>>,
}

fn layout(c: &mut IndexClient, addrs: &[String]) -> anyhow::Result<Layout> {
    let mut first = None;
    let mut errors = Vec::new();
    for a in addrs {
        match c.status_of(a) {
            Ok(s) => {
                first = Some(s);
                break;
            }
            Err(e) => errors.push(e),
        }
    }
    let Some(st) = first else {
        bail!("no replica answered: {}", errors.join("; "));
    };
    let peers = parse_peers(&st.peers.join(","))
        .map_err(|e| anyhow::anyhow!("the members a replica reports: {e}"))?;
    let shards = st.shards.len();
    let mut voters: Vec<Option<Vec<u64>>> = vec![None; shards];
    for addr in peers.values() {
        let Ok(s) = c.status_of(addr) else { continue };
        for x in s.shards {
            if x.role == "leader"
                && let Some(v) = voters.get_mut(x.shard as usize)
            {
                *v = Some(x.voters);
            }
        }
    }
    let voters = voters
        .into_iter()
        .enumerate()
        .map(|(s, v)| v.with_context(|| format!("shard {s} has no leader that answers")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Layout { peers, voters })
}

/// Waits until replica `id` has applied, in `shard`, what the shard's
/// leader had committed when this started.
fn wait_caught_up(
    c: &mut IndexClient,
    peers: &BTreeMap<u64, String>,
    shard: u32,
    id: u64,
    limit: Duration,
) -> anyhow::Result<()> {
    let target = peers
        .values()
        .filter_map(|a| c.status_of(a).ok())
        .flat_map(|s| s.shards)
        .find(|x| x.shard == shard && x.role == "leader")
        .map(|x| x.commit)
        .with_context(|| format!("shard {shard} has no leader that answers"))?;
    let addr = &peers[&id];
    let t = Instant::now();
    loop {
        let applied = c
            .status_of(addr)
            .ok()
            .and_then(|s| s.shards.into_iter().find(|x| x.shard == shard))
            .filter(|x| x.role != "none")
            .map_or(0, |x| x.applied);
        if applied >= target {
            return Ok(());
        }
        if t.elapsed() > limit {
            bail!(
                "replica {id} ({addr}) applied shard {shard} to {applied} of {target} in {:?}; \
                 it stays a voter, the old one was not removed",
                limit
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `index rebalance`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    addrs: &[String],
    tls: Tls,
    without: &[u64],
    add: &[String],
    per_shard: usize,
    dry_run: bool,
    catch_up: Duration,
) -> anyhow::Result<()> {
    let mut c = IndexClient::new(addrs, tls)?;
    c.timeout = Duration::from_secs(30);
    let mut l = layout(&mut c, addrs)?;
    for a in add {
        let new = parse_peers(a).map_err(|e| anyhow::anyhow!("--add {a}: {e}"))?;
        for (id, addr) in new {
            if let Some(old) = l.peers.get(&id) {
                bail!("--add {id}={addr}: replica {id} is already a member (at {old})");
            }
            // It must be a replica of this cluster, there and running.
            let st = c
                .status_of(&addr)
                .map_err(|e| anyhow::anyhow!("--add {id}={addr}: {e}"))?;
            if st.replica != id || st.shards.len() != l.voters.len() {
                bail!(
                    "--add {id}={addr}: that is replica {} with {} shards, not replica {id} of this \
                     {}-shard cluster",
                    st.replica,
                    st.shards.len(),
                    l.voters.len()
                );
            }
            l.peers.insert(id, addr);
        }
    }
    for w in without {
        if !l.peers.contains_key(w) {
            bail!(
                "--without {w}: no such replica (members: {:?})",
                l.peers.keys()
            );
        }
    }
    let allowed: Vec<u64> = l
        .peers
        .keys()
        .copied()
        .filter(|m| !without.contains(m))
        .collect();
    if allowed.is_empty() {
        bail!("--without leaves no replica");
    }
    let moves = placement::rebalance(&allowed, &l.voters, per_shard);
    if moves.is_empty() {
        println!(
            "every shard has {per_shard} voters among replicas {allowed:?}, spread evenly: nothing to move"
        );
        return Ok(());
    }
    let describe = |m: &placement::Move| match (m.add, m.remove) {
        (Some(a), Some(r)) => format!("shard {}: add replica {a}, then remove {r}", m.shard),
        (Some(a), None) => format!("shard {}: add replica {a}", m.shard),
        (None, Some(r)) => format!("shard {}: remove replica {r}", m.shard),
        (None, None) => format!("shard {}: nothing", m.shard),
    };
    println!("{} moves:", moves.len());
    for m in &moves {
        println!("  {}", describe(m));
    }
    if dry_run {
        return Ok(());
    }
    let t = Instant::now();
    for (i, m) in moves.iter().enumerate() {
        if let Some(a) = m.add {
            members_request(&mut c, m.shard, a, &l.peers[&a], 0)
                .with_context(|| format!("shard {}: add replica {a}", m.shard))?;
            wait_caught_up(&mut c, &l.peers, m.shard, a, catch_up)?;
        }
        if let Some(r) = m.remove {
            members_request(&mut c, m.shard, 0, "", r)
                .with_context(|| format!("shard {}: remove replica {r}", m.shard))?;
        }
        println!(
            "[{}/{}] {} ({:.1} s)",
            i + 1,
            moves.len(),
            describe(m),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
