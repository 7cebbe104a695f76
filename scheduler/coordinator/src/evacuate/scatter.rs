//! Scatter-gather (`evacuate --scatter`): where the destinations' links
//! cannot take the sources' pages in the time the sources' own links send
//! them, the contents a single destination lacks beyond what its link
//! takes in that time leave the sources for intermediaries instead: hosts
//! of the cluster with an agent, a known link and room, taking no other
//! part in the job. Each intermediary fetches its share from the source
//! (so every byte leaves the source once, at the source's rate), and the
//! destination gathers it from there after its VM has switched over by
//! post-copy, while the VM runs.
//!
//! Planning is pure: [`plan`] takes contents out of the cast plan and says
//! which intermediary takes each from which source.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use pagecast_pages::{PAGE_BYTES, PageHash};

use super::Prepared;
use super::transfer::SourcePlan;

/// Per (source, intermediary): the contents the intermediary takes from
/// the source, each with the destination that gathers it.
pub(super) type Stashes = BTreeMap<(String, String), Vec<(PageHash, String)>>;

/// Bits one page takes on a link.
const PAGE_BITS: f64 = PAGE_BYTES as f64 * 8.0;

/// The hosts that may take a job's scattered pages: an agent, a known
/// link, not cordoned, not a source or destination of the job. Each with
/// its link (bits/s) and the pages it has room for.
pub(super) fn intermediaries(prep: &Prepared) -> Vec<(String, u64, u64)> {
    let busy: BTreeSet<&str> = prep
        .moving
        .iter()
        .flat_map(|m| [m.from.as_str(), m.to.as_str()])
        .collect();
    prep.view
        .hosts
        .iter()
        .filter(|h| {
            !h.address.is_empty() && h.link_bps > 0 && !h.cordoned && !busy.contains(&*h.name)
        })
        .map(|h| {
            let room = if h.capacity_bytes > 0 {
                h.capacity_bytes.saturating_sub(h.used_bytes) / PAGE_BYTES
            } else {
                u64::MAX
            };
            (h.name.clone(), h.link_bps, room)
        })
        .filter(|(_, _, room)| *room > 0)
        .collect()
}

/// The destinations that may gather: those whose arriving VMs may all
/// switch over by post-copy (an adopted QEMU VM never does).
pub(super) fn gatherers(prep: &Prepared) -> BTreeSet<String> {
    let qemu: BTreeSet<&str> = prep
        .moving
        .iter()
        .filter(|m| m.qemu)
        .map(|m| m.to.as_str())
        .collect();
    prep.moving
        .iter()
        .map(|m| m.to.as_str())
        .filter(|d| !qemu.contains(d))
        .map(str::to_owned)
        .collect()
}

/// Takes out of `plan` the contents to scatter and says where each goes.
/// `link(h)` is a host's link in bits/s (0: unknown); `spare` the
/// intermediaries as [`intermediaries`] gives them; `gatherers` the
/// destinations that may gather ([`gatherers`]). Nothing is scattered
/// where a source's or destination's link is unknown, or where every
/// destination takes its pages within the slowest source's time.
pub(super) fn plan(
    plan: &mut SourcePlan,
    link: &dyn Fn(&str) -> u64,
    spare: &[(String, u64, u64)],
    gatherers: &BTreeSet<String>,
) -> Stashes {
    let mut stashes = Stashes::new();
    if spare.is_empty() || plan.is_empty() {
        return stashes;
    }
    // The sources' time: the slowest source sending what it must.
    let mut t_src: f64 = 0.0;
    for (s, sends) in plan.iter() {
        let bps = link(s);
        if bps == 0 {
            return stashes;
        }
        t_src = t_src.max(sends.len() as f64 * PAGE_BITS / bps as f64);
    }
    // Per destination: the pages beyond what its link takes in that time.
    let mut incoming: HashMap<&str, u64> = HashMap::new();
    for sends in plan.values() {
        for (_, ds) in sends {
            for d in ds {
                *incoming.entry(d.as_str()).or_default() += 1;
            }
        }
    }
    let mut excess: HashMap<String, u64> = HashMap::new();
    for (d, n) in incoming {
        let bps = link(d);
        if bps == 0 {
            return stashes;
        }
        let takes = (bps as f64 * t_src / PAGE_BITS) as u64;
        if n > takes && gatherers.contains(d) {
            excess.insert(d.to_owned(), n - takes);
        }
    }
    if excess.is_empty() {
        return stashes;
    }
    // Each scattered content to the intermediary whose link is least
    // loaded for its rate, within its room.
    let mut load: Vec<u64> = vec![0; spare.len()];
    for (s, sends) in plan.iter_mut() {
        sends.retain(|(h, ds)| {
            let [d] = ds.as_slice() else {
                return true;
            };
            let Some(left) = excess.get_mut(d).filter(|n| **n > 0) else {
                return true;
            };
            let pick = (0..spare.len())
                .filter(|&i| load[i] < spare[i].2)
                .min_by(|&a, &b| {
                    let la = load[a] as f64 / spare[a].1 as f64;
                    let lb = load[b] as f64 / spare[b].1 as f64;
                    la.total_cmp(&lb).then(a.cmp(&b))
                });
            let Some(i) = pick else {
                return true;
            };
            load[i] += 1;
            *left -= 1;
            stashes
                .entry((s.clone(), spare[i].0.clone()))
                .or_default()
                .push((*h, d.clone()));
            false
        });
    }
    plan.retain(|_, sends| !sends.is_empty());
    stashes
}

/// How many arriving VMs gather each scattered content at its
/// destination (each VM gathers on its own, so an intermediary serves a
/// content that often before freeing it): from `needs` (per moving VM,
/// the contents it lacks) and `to` (a moving VM's destination). At least
/// 1, at most 255.
pub(super) fn gatherer_counts(
    stashes: &Stashes,
    needs: &HashMap<usize, Vec<PageHash>>,
    to: &dyn Fn(usize) -> String,
) -> HashMap<(PageHash, String), u8> {
    let mut counts: HashMap<(PageHash, String), u8> = stashes
        .values()
        .flatten()
        .map(|(h, d)| ((*h, d.clone()), 0))
        .collect();
    let scattered: HashSet<PageHash> = counts.keys().map(|k| k.0).collect();
    for (&vm, hs) in needs {
        let d = to(vm);
        let mine: HashSet<&PageHash> = hs.iter().filter(|h| scattered.contains(h)).collect();
        for h in mine {
            if let Some(n) = counts.get_mut(&(*h, d.clone())) {
                *n = n.saturating_add(1);
            }
        }
    }
    for n in counts.values_mut() {
        *n = (*n).max(1);
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u32) -> PageHash {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&i.to_be_bytes());
        b[31] = 1;
        PageHash::from_bytes(b)
    }

    /// Two sources on 1 Gbit/s each send 1,000 pages to one destination
    /// on 100 Mbit/s (which takes 100 of them in the sources' time) and
    /// 10 to two destinations at once.
    fn slow_destination() -> (SourcePlan, impl Fn(&str) -> u64) {
        let mut plan = SourcePlan::new();
        for (s, base) in [("s1", 0), ("s2", 10_000)] {
            let mut sends: Vec<(PageHash, Vec<String>)> = (0..1_000)
                .map(|i| (h(base + i), vec!["d".into()]))
                .collect();
            sends.extend((0..10).map(|i| (h(base + 5_000 + i), vec!["d".into(), "e".into()])));
            plan.insert(s.into(), sends);
        }
        let link = |x: &str| match x {
            "d" => 100_000_000,
            _ => 1_000_000_000,
        };
        (plan, link)
    }

    /// Both destinations may gather.
    fn both() -> BTreeSet<String> {
        ["d".to_owned(), "e".to_owned()].into()
    }

    /// The destination keeps what its link takes in the sources' time;
    /// the rest of what only it lacks goes to the intermediaries, in
    /// proportion to their links; contents two destinations lack stay in
    /// the casts; nothing is lost or sent twice.
    #[test]
    fn what_a_slow_destination_cannot_take_in_time_is_scattered() {
        let (mut p, link) = slow_destination();
        let before: BTreeSet<PageHash> = p.values().flatten().map(|x| x.0).collect();
        let spare = vec![
            ("i1".to_owned(), 1_000_000_000, u64::MAX),
            ("i2".to_owned(), 3_000_000_000, u64::MAX),
        ];
        let st = plan(&mut p, &link, &spare, &both());
        let kept: u64 = p.values().map(|s| s.len() as u64).sum();
        let scattered: Vec<&(PageHash, String)> = st.values().flatten().collect();
        // The sources' time is 1,010 pages at 1 Gbit/s; d takes 101 pages
        // in it, of its 2,020.
        assert_eq!(kept, 101, "the direct share");
        let shared = p.values().flatten().filter(|x| x.1.len() == 2).count();
        assert_eq!(shared, 20, "contents two destinations lack stay");
        assert_eq!(scattered.len(), 2_020 - 101);
        let after: BTreeSet<PageHash> = p
            .values()
            .flatten()
            .map(|x| x.0)
            .chain(scattered.iter().map(|x| x.0))
            .collect();
        assert_eq!(before, after, "every content once");
        let on = |i: &str| -> usize {
            st.iter()
                .filter(|((_, x), _)| x == i)
                .map(|(_, v)| v.len())
                .sum()
        };
        let (a, b) = (on("i1") as f64, on("i2") as f64);
        assert!((b / a - 3.0).abs() < 0.1, "by link: {a} and {b}");
        assert!(scattered.iter().all(|x| x.1 == "d"));
    }

    #[test]
    fn nothing_is_scattered_where_destinations_keep_up_or_links_are_unknown() {
        let (plan0, _) = slow_destination();
        let spare = vec![("i1".to_owned(), 1_000_000_000, u64::MAX)];
        // d takes both sources' 1,010 pages in the time they send them.
        let fast = |x: &str| {
            if x == "d" {
                2_000_000_000
            } else {
                1_000_000_000
            }
        };
        let mut p = plan0.clone();
        assert!(plan(&mut p, &fast, &spare, &both()).is_empty());
        assert_eq!(p, plan0);
        let unknown = |x: &str| if x == "d" { 0 } else { 1_000_000_000 };
        let mut p = plan0.clone();
        assert!(plan(&mut p, &unknown, &spare, &both()).is_empty());
        let (mut p, link) = slow_destination();
        assert!(
            plan(&mut p, &link, &[], &both()).is_empty(),
            "no intermediary"
        );
    }

    /// A destination that cannot gather (an adopted QEMU VM arrives
    /// there) has nothing scattered, however slow its link.
    #[test]
    fn nothing_is_scattered_for_a_destination_that_cannot_gather() {
        let (plan0, link) = slow_destination();
        let spare = vec![("i1".to_owned(), 1_000_000_000, u64::MAX)];
        let mut p = plan0.clone();
        let only_e: BTreeSet<String> = ["e".to_owned()].into();
        assert!(plan(&mut p, &link, &spare, &only_e).is_empty());
        assert_eq!(p, plan0);
    }

    /// A content two VMs of one destination lack is served twice before
    /// it is freed; one VM naming it twice counts once; VMs of another
    /// destination do not count.
    #[test]
    fn each_vm_that_gathers_a_content_counts_once() {
        let mut st = Stashes::new();
        st.insert(
            ("s".into(), "i".into()),
            vec![(h(1), "d".into()), (h(2), "d".into())],
        );
        let needs: HashMap<usize, Vec<PageHash>> = [
            (0, vec![h(1), h(2), h(1)]),
            (1, vec![h(1)]),
            (2, vec![h(1), h(2)]),
        ]
        .into();
        let to = |i: usize| if i == 2 { "e".into() } else { "d".into() };
        let c = gatherer_counts(&st, &needs, &to);
        assert_eq!(c[&(h(1), "d".into())], 2);
        assert_eq!(c[&(h(2), "d".into())], 1);
        assert_eq!(c.len(), 2, "only what was scattered");
    }

    /// An intermediary takes no more than its room; what fits nowhere
    /// stays with the source.
    #[test]
    fn intermediaries_take_no_more_than_their_room() {
        let (mut p, link) = slow_destination();
        let spare = vec![("i1".to_owned(), 1_000_000_000, 300)];
        let st = plan(&mut p, &link, &spare, &both());
        assert_eq!(st.values().map(Vec::len).sum::<usize>(), 300);
        let kept: usize = p.values().map(Vec::len).sum();
        assert_eq!(kept, 2_020 - 300);
    }
}
