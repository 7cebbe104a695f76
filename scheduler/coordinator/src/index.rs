//! What a job asks the content index: the cluster (hosts, their agents,
//! running VMs with their sketches) and who holds given contents.

use std::time::Duration;

use pagecast_channel::Tls;
use pagecast_index::client::IndexClient;
use pagecast_index::keys::shard_of;
use pagecast_pages::PageHash;

use crate::CoordError;
use crate::view::ClusterView;

/// What a job asks the content index.
pub trait IndexApi: Send + Sync {
    /// Hosts and running VMs (linearizable reads).
    fn cluster(&self) -> Result<ClusterView, CoordError>;
    /// `(host number, content)` for every host the index lists as holding
    /// one of `hashes`: a hint (every page used is hash-checked), read from
    /// any replica.
    fn holders(&self, hashes: &[PageHash]) -> Result<Vec<(u32, PageHash)>, CoordError>;
    /// Cordons host `name` (`on`, saying `reason`) or lifts its cordon.
    fn set_cordon(&self, name: &str, on: bool, reason: &str) -> Result<(), CoordError>;
}

/// The index over the network, as the holder of `tls`.
pub struct IndexService {
    addrs: Vec<String>,
    tls: Tls,
    /// How long one request may take, retries included.
    pub timeout: Duration,
}

impl IndexService {
    /// The index at `addrs` (any replicas), asked as `tls`.
    pub fn new(addrs: &[String], tls: Tls) -> Self {
        IndexService {
            addrs: addrs.to_vec(),
            tls,
            timeout: Duration::from_secs(20),
        }
    }

    fn client(&self) -> Result<IndexClient, CoordError> {
        let mut c = IndexClient::new(&self.addrs, self.tls.clone())?;
        c.timeout = self.timeout;
        Ok(c)
    }
}

impl IndexApi for IndexService {
    fn cluster(&self) -> Result<ClusterView, CoordError> {
        ClusterView::read(&mut self.client()?)
    }

    fn set_cordon(&self, name: &str, on: bool, reason: &str) -> Result<(), CoordError> {
        pagecast_index::client::set_cordon(&mut self.client()?, name, on, reason)?;
        Ok(())
    }

    /// Every shard is asked at once, each from any replica's applied
    /// state: a linearizable read per 16,384 hashes costs seconds at a
    /// million pages.
    fn holders(&self, hashes: &[PageHash]) -> Result<Vec<(u32, PageHash)>, CoordError> {
        let mut all = hashes.to_vec();
        all.sort_unstable();
        all.dedup();
        let shards = self.client()?.shards()?;
        let mut by_shard: Vec<Vec<PageHash>> = vec![Vec::new(); shards as usize];
        for h in &all {
            by_shard[shard_of(h, shards) as usize].push(*h);
        }
        let per_shard: Vec<Result<Vec<(u32, PageHash)>, CoordError>> = std::thread::scope(|sc| {
            let handles: Vec<_> = by_shard
                .iter()
                .enumerate()
                .map(|(s, hs)| sc.spawn(move || self.shard_holders(s as u32, hs)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a lookup thread panicked"))
                .collect()
        });
        let mut out = Vec::new();
        for r in per_shard {
            out.extend(r?);
        }
        Ok(out)
    }
}

impl IndexService {
    fn shard_holders(
        &self,
        shard: u32,
        hashes: &[PageHash],
    ) -> Result<Vec<(u32, PageHash)>, CoordError> {
        let mut c = self.client()?;
        let mut out = Vec::new();
        for chunk in hashes.chunks(16_384) {
            let l = c.lookup(shard, chunk, &[], true)?;
            for (i, host) in l.hash_index.iter().zip(&l.host) {
                if let Some(p) = chunk.get(*i as usize) {
                    out.push((*host, *p));
                }
            }
        }
        Ok(out)
    }
}
