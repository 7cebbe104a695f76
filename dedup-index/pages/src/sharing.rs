//! Sharing estimates from sketches: where a VM's content already is,
//! which VMs are alike, and which could live together. The content index
//! answers `advise` with these, and the planner's advice uses the same
//! functions, so both rank alike.

use serde::Serialize;

use crate::Sketch;

/// A candidate (a host, a VM) and how much of a VM's content it is
/// estimated to hold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Match<K> {
    /// Who the candidate is.
    pub key: K,
    /// Estimated distinct pages the two share.
    pub shared_pages: f64,
    /// Estimated Jaccard index of the two page sets.
    pub jaccard: f64,
    /// Estimated share of the VM's distinct pages the candidate holds.
    pub fraction: f64,
}

/// The `k` candidates holding most of `vm`'s content, best first (ties:
/// smaller key first).
pub fn rank<'a, K: Ord>(
    vm: &Sketch,
    candidates: impl IntoIterator<Item = (K, &'a Sketch)>,
    k: usize,
) -> Vec<Match<K>> {
    let total = vm.distinct().max(1.0);
    let mut m: Vec<Match<K>> = candidates
        .into_iter()
        .map(|(key, s)| {
            let shared = vm.shared(s);
            Match {
                key,
                shared_pages: shared,
                jaccard: vm.jaccard(s),
                fraction: (shared / total).min(1.0),
            }
        })
        .collect();
    m.sort_by(|a, b| {
        b.shared_pages
            .total_cmp(&a.shared_pages)
            .then_with(|| a.key.cmp(&b.key))
    });
    m.truncate(k);
    m
}

/// Pairwise estimated Jaccard indices (1 on the diagonal of non-empty sets).
pub fn sharing_matrix(vms: &[Sketch]) -> Vec<Vec<f64>> {
    let n = vms.len();
    let mut out = vec![vec![0.0; n]; n];
    for i in 0..n {
        out[i][i] = if vms[i].distinct() > 0.0 { 1.0 } else { 0.0 };
        for j in i + 1..n {
            let v = vms[i].jaccard(&vms[j]);
            out[i][j] = v;
            out[j][i] = v;
        }
    }
    out
}

/// Groups VMs whose content overlaps: average-linkage agglomeration, merging
/// the most similar pair of groups while their average Jaccard index is at
/// least `threshold`. Groups are sorted, largest first.
pub fn colocation_groups(matrix: &[Vec<f64>], threshold: f64) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = (0..matrix.len()).map(|i| vec![i]).collect();
    let avg = |a: &[usize], b: &[usize]| {
        let sum: f64 = a
            .iter()
            .flat_map(|&i| b.iter().map(move |&j| matrix[i][j]))
            .sum();
        sum / (a.len() * b.len()) as f64
    };
    loop {
        let mut best: Option<(usize, usize, f64)> = None;
        for i in 0..groups.len() {
            for j in i + 1..groups.len() {
                let s = avg(&groups[i], &groups[j]);
                if s >= threshold && best.is_none_or(|(_, _, b)| s > b) {
                    best = Some((i, j, s));
                }
            }
        }
        let Some((i, j, _)) = best else { break };
        let g = groups.swap_remove(j);
        groups[i].extend(g);
        groups[i].sort_unstable();
    }
    groups.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PageHash;

    fn sk(range: std::ops::Range<u64>) -> Sketch {
        let h: Vec<PageHash> = range
            .map(|i| PageHash::from_bytes(*blake3::hash(&i.to_le_bytes()).as_bytes()))
            .collect();
        Sketch::of(&h)
    }

    #[test]
    fn ranks_hosts_and_groups_families() {
        let vm = sk(0..4000);
        let hosts = [sk(10_000..20_000), sk(0..2000), sk(0..3900), sk(3000..9000)];
        let top = rank(&vm, hosts.iter().enumerate(), 3);
        assert_eq!(top.iter().map(|m| m.key).collect::<Vec<_>>(), vec![2, 1, 3]);
        assert!((top[0].fraction - 0.975).abs() < 0.08);
        let vms = [
            sk(0..3000),
            sk(500..3500),
            sk(50_000..53_000),
            sk(50_300..53_300),
            sk(90_000..91_000),
        ];
        let m = sharing_matrix(&vms);
        assert!(m[0][1] > 0.5 && m[0][2] < 0.05);
        assert_eq!(
            colocation_groups(&m, 0.3),
            vec![vec![0, 1], vec![2, 3], vec![4]]
        );
    }
}
