//! Synthetic guests with a known, realistic sharing model.
//!
//! Real guest memory is redundant in recognisable ways, and the generator
//! reproduces them, deterministically from a seed:
//!
//! - **zero pages**, half scattered, half in one run at the top of memory
//!   (memory the guest never touched);
//! - **common** pages shared by every VM of every family (firmware, the most
//!   common libraries);
//! - the family's **kernel**, identical in every VM of the family;
//! - **libraries**: each VM maps a random subset of the family's library
//!   pool;
//! - **page cache**: each VM caches a random subset of the family's file
//!   pool;
//! - **near duplicates**: copies of one of the VM's shared pages with 1 to 8
//!   bytes changed (a patched page, a page with a counter in it), which must
//!   not be mistaken for the original;
//! - **heap duplicates**: repeats of the VM's own heap pages;
//! - **unique heap** pages fill the rest.
//!
//! All fractions are of the VM's pages. A pool's page content depends only
//! on the family and its index in the pool, so VMs of one family share
//! whatever pool indices they both draw, and a larger VM's pools extend a
//! smaller one's.

use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use pagecast_pages::SplitMix64;
use pagecast_pages::rng::mix;

use crate::{AtomicBitmap, DirtyBitmap, GuestMemory, MemoryError, PAGE_SIZE, Page, Region};
use pagecast_pages::units::{UnitError, parse_size};

/// Most pages a synthetic VM may have: 64 GiB.
pub const MAX_SYNTH_PAGES: u64 = 16 << 20;

/// Errors of the synthetic generator.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// A sharing fraction outside `[0, 1]`.
    #[error("sharing fraction {name}={value} is outside 0..=1")]
    Fraction {
        /// The fraction's name.
        name: &'static str,
        /// Its value.
        value: f64,
    },
    /// The fractions add up to more than the whole VM.
    #[error("sharing fractions add up to {sum:.3}, more than 1")]
    Sum {
        /// Their sum.
        sum: f64,
    },
    /// A VM draws more pages from a pool than the pool has.
    #[error("{name}={value} draws more than the pool of {pool}")]
    Pool {
        /// The fraction's name.
        name: &'static str,
        /// The fraction.
        value: f64,
        /// The pool's fraction.
        pool: f64,
    },
    /// A family name that is empty, too long or has odd characters.
    #[error("family {0:?} must be 1 to 64 letters, digits, '-' or '_'")]
    Family(String),
    /// A memory size that is not a positive multiple of 4 KiB within limits.
    #[error("memory size {bytes} bytes must be a multiple of 4096 between 4 KiB and {max} bytes")]
    Size {
        /// The size asked for.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// A profile string that does not parse.
    #[error("synthetic profile {profile:?}: {why}")]
    Profile {
        /// The profile string.
        profile: String,
        /// What is wrong.
        why: String,
    },
    /// A size inside a profile string that does not parse.
    #[error(transparent)]
    Unit(#[from] UnitError),
    /// Allocating memory for the VM failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Writing an image failed.
    #[error("{}: cannot write image: {source}", path.display())]
    Write {
        /// The image path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// How a synthetic VM's pages divide between kinds of content (fractions of
/// its pages).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SharingProfile {
    /// Zero pages.
    pub zero: f64,
    /// Pages every VM of every family holds.
    pub common: f64,
    /// The family's kernel: the same pages in every VM of the family.
    pub kernel: f64,
    /// Library pages drawn from the family's pool.
    pub libs: f64,
    /// Size of the family's library pool.
    pub libs_pool: f64,
    /// Page-cache pages drawn from the family's pool.
    pub cache: f64,
    /// Size of the family's page-cache pool.
    pub cache_pool: f64,
    /// Copies of a shared page with a few bytes changed.
    pub near_dup: f64,
    /// Repeats of the VM's own heap pages.
    pub heap_dup: f64,
}

impl Default for SharingProfile {
    fn default() -> Self {
        SharingProfile {
            zero: 0.25,
            common: 0.01,
            kernel: 0.04,
            libs: 0.12,
            libs_pool: 0.18,
            cache: 0.18,
            cache_pool: 0.36,
            near_dup: 0.05,
            heap_dup: 0.02,
        }
    }
}

impl SharingProfile {
    fn fractions(&self) -> [(&'static str, f64); 9] {
        [
            ("zero", self.zero),
            ("common", self.common),
            ("kernel", self.kernel),
            ("libs", self.libs),
            ("libs-pool", self.libs_pool),
            ("cache", self.cache),
            ("cache-pool", self.cache_pool),
            ("near-dup", self.near_dup),
            ("heap-dup", self.heap_dup),
        ]
    }

    /// Checks every fraction and that they fit in one VM.
    pub fn validate(&self) -> Result<(), SynthError> {
        for (name, value) in self.fractions() {
            if !(0.0..=1.0).contains(&value) {
                return Err(SynthError::Fraction { name, value });
            }
        }
        if self.libs > self.libs_pool {
            return Err(SynthError::Pool {
                name: "libs",
                value: self.libs,
                pool: self.libs_pool,
            });
        }
        if self.cache > self.cache_pool {
            return Err(SynthError::Pool {
                name: "cache",
                value: self.cache,
                pool: self.cache_pool,
            });
        }
        let sum = self.zero
            + self.common
            + self.kernel
            + self.libs
            + self.cache
            + self.near_dup
            + self.heap_dup;
        if sum > 1.0 + 1e-9 {
            return Err(SynthError::Sum { sum });
        }
        Ok(())
    }

    /// Fraction of unique heap pages (what the others leave).
    pub fn heap(&self) -> f64 {
        (1.0 - self.zero
            - self.common
            - self.kernel
            - self.libs
            - self.cache
            - self.near_dup
            - self.heap_dup)
            .max(0.0)
    }
}

/// Which synthetic VM to build.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SynthSpec {
    /// Family name: VMs of one family share kernel, library and cache pools.
    pub family: String,
    /// Which VM of the family (distinct VMs draw different subsets).
    pub index: u32,
    /// Pages of memory.
    pub pages: u64,
    /// Extra seed: the same spec with another seed is another cluster.
    pub seed: u64,
    /// How the pages divide.
    pub profile: SharingProfile,
}

impl SynthSpec {
    /// A spec with the default profile.
    pub fn new(family: &str, index: u32, memory_bytes: u64) -> Result<Self, SynthError> {
        let spec = SynthSpec {
            family: family.to_owned(),
            index,
            pages: memory_bytes / PAGE_SIZE as u64,
            seed: 0,
            profile: SharingProfile::default(),
        };
        check_size(memory_bytes)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses `FAMILY[:key=value,...]`, the form `--synthetic` takes. Keys:
    /// `index`, `memory` (a size such as `256MiB`), `seed`, and the profile
    /// fractions `zero`, `common`, `kernel`, `libs`, `libs-pool`, `cache`,
    /// `cache-pool`, `near-dup`, `heap-dup`. `default_memory` applies when
    /// `memory` is absent.
    pub fn parse(profile: &str, default_memory: u64) -> Result<Self, SynthError> {
        let bad = |why: String| SynthError::Profile {
            profile: profile.to_owned(),
            why,
        };
        let (family, rest) = profile.split_once(':').unwrap_or((profile, ""));
        let mut memory = default_memory;
        let mut spec = SynthSpec {
            family: family.to_owned(),
            index: 0,
            pages: 0,
            seed: 0,
            profile: SharingProfile::default(),
        };
        for kv in rest.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("{kv:?} is not key=value")))?;
            let num = || {
                v.parse::<f64>()
                    .map_err(|_| bad(format!("{k}={v:?} is not a number")))
            };
            let p = &mut spec.profile;
            match k {
                "index" => {
                    spec.index = v
                        .parse()
                        .map_err(|_| bad(format!("index={v:?} is not a VM number")))?
                }
                "seed" => {
                    spec.seed = v
                        .parse()
                        .map_err(|_| bad(format!("seed={v:?} is not a number")))?
                }
                "memory" => memory = parse_size(v)?,
                "zero" => p.zero = num()?,
                "common" => p.common = num()?,
                "kernel" => p.kernel = num()?,
                "libs" => p.libs = num()?,
                "libs-pool" => p.libs_pool = num()?,
                "cache" => p.cache = num()?,
                "cache-pool" => p.cache_pool = num()?,
                "near-dup" => p.near_dup = num()?,
                "heap-dup" => p.heap_dup = num()?,
                _ => return Err(bad(format!("unknown key {k:?}"))),
            }
        }
        check_size(memory)?;
        spec.pages = memory / PAGE_SIZE as u64;
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), SynthError> {
        let ok = !self.family.is_empty()
            && self.family.len() <= 64
            && self
                .family
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(SynthError::Family(self.family.clone()));
        }
        check_size(self.pages * PAGE_SIZE as u64)?;
        self.profile.validate()
    }

    /// Memory size in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.pages * PAGE_SIZE as u64
    }
}

fn check_size(bytes: u64) -> Result<(), SynthError> {
    let max = MAX_SYNTH_PAGES * PAGE_SIZE as u64;
    if bytes == 0 || !bytes.is_multiple_of(PAGE_SIZE as u64) || bytes > max {
        return Err(SynthError::Size { bytes, max });
    }
    Ok(())
}

fn family_seed(family: &str) -> u64 {
    let h = blake3::hash(format!("pagecast-synth-family:{family}").as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

const COMMON_SEED: u64 = 0x5041_4745_4341_5354;
const DOMAIN_KERNEL: u64 = 1;
const DOMAIN_LIBS: u64 = 2;
const DOMAIN_CACHE: u64 = 3;
const DOMAIN_HEAP: u64 = 4;
const DOMAIN_NEAR: u64 = 5;
const DOMAIN_LAYOUT: u64 = 6;

fn fill_random(seed: u64, out: &mut Page) {
    SplitMix64::new(seed).fill(out);
}

/// What a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Zero,
    Common(u32),
    Kernel(u32),
    Lib(u32),
    Cache(u32),
    /// A shared page (`Lib` or `Cache`) with a few bytes changed.
    Near {
        base_lib: bool,
        base: u32,
        salt: u32,
    },
    Heap(u32),
}

/// A synthetic VM: its layout, and its page contents on demand.
pub struct SyntheticVm {
    spec: SynthSpec,
    family_seed: u64,
    vm_seed: u64,
    roles: Vec<Role>,
}

fn count(frac: f64, pages: u64) -> u64 {
    ((frac * pages as f64).round() as u64).min(pages)
}

/// `k` distinct values from `0..m`, by a partial Fisher-Yates shuffle.
fn sample(rng: &mut SplitMix64, m: u64, k: u64) -> Vec<u32> {
    let mut pool: Vec<u32> = (0..m as u32).collect();
    let k = k.min(m) as usize;
    for i in 0..k {
        let j = i + rng.below((pool.len() - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(k);
    pool
}

impl SyntheticVm {
    /// Lays out the VM's memory.
    pub fn new(spec: SynthSpec) -> Result<Self, SynthError> {
        spec.validate()?;
        let n = spec.pages;
        let p = &spec.profile;
        let fam = family_seed(&spec.family);
        let vm_seed = mix(mix(fam, u64::from(spec.index)), spec.seed);
        let mut rng = SplitMix64::new(mix(vm_seed, DOMAIN_LAYOUT));

        let zero = count(p.zero, n);
        let common = count(p.common, n);
        let kernel = count(p.kernel, n);
        let libs = count(p.libs, n);
        let cache = count(p.cache, n);
        let near = count(p.near_dup, n);
        let heap_dup = count(p.heap_dup, n);
        let assigned = zero + common + kernel + libs + cache + near + heap_dup;
        // Rounding may overshoot by a page or two; unique heap absorbs it.
        let (heap, heap_dup) = match n.checked_sub(assigned) {
            Some(h) => (h, heap_dup),
            None => (0, heap_dup.saturating_sub(assigned - n)),
        };

        let mut rest: Vec<Role> = Vec::with_capacity(n as usize);
        rest.extend((0..common as u32).map(Role::Common));
        let lib_pages = sample(&mut rng, count(p.libs_pool, n).max(libs), libs);
        let cache_pages = sample(&mut rng, count(p.cache_pool, n).max(cache), cache);
        for j in 0..near as u32 {
            let shared = lib_pages.len() + cache_pages.len();
            if shared == 0 {
                rest.push(Role::Heap(heap as u32 + j));
                continue;
            }
            let pick = rng.below(shared as u64) as usize;
            let (base_lib, base) = if pick < lib_pages.len() {
                (true, lib_pages[pick])
            } else {
                (false, cache_pages[pick - lib_pages.len()])
            };
            rest.push(Role::Near {
                base_lib,
                base,
                salt: j,
            });
        }
        rest.extend(lib_pages.into_iter().map(Role::Lib));
        rest.extend(cache_pages.into_iter().map(Role::Cache));
        rest.extend((0..heap as u32).map(Role::Heap));
        for j in 0..heap_dup {
            if heap == 0 {
                rest.push(Role::Heap((heap + near + j) as u32));
            } else {
                rest.push(Role::Heap(rng.below(heap) as u32));
            }
        }
        let scattered_zero = zero / 2;
        rest.extend((0..scattered_zero).map(|_| Role::Zero));
        for i in (1..rest.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            rest.swap(i, j);
        }
        let mut roles = Vec::with_capacity(n as usize);
        roles.extend((0..kernel as u32).map(Role::Kernel));
        roles.extend(rest);
        roles.resize(n as usize, Role::Zero);
        debug_assert_eq!(roles.len() as u64, n);
        Ok(SyntheticVm {
            spec,
            family_seed: fam,
            vm_seed,
            roles,
        })
    }

    /// The spec this VM was built from.
    pub fn spec(&self) -> &SynthSpec {
        &self.spec
    }

    /// Pages of memory.
    pub fn pages(&self) -> u64 {
        self.spec.pages
    }

    fn pool_seed(&self, domain: u64, index: u32) -> u64 {
        mix(mix(self.family_seed, domain), u64::from(index))
    }

    /// Writes the content of `frame` into `out`.
    pub fn fill_page(&self, frame: u64, out: &mut Page) {
        let Some(role) = self.roles.get(frame as usize) else {
            out.fill(0);
            return;
        };
        match *role {
            Role::Zero => out.fill(0),
            Role::Common(i) => fill_random(mix(COMMON_SEED, u64::from(i)), out),
            Role::Kernel(i) => fill_random(self.pool_seed(DOMAIN_KERNEL, i), out),
            Role::Lib(i) => fill_random(self.pool_seed(DOMAIN_LIBS, i), out),
            Role::Cache(i) => fill_random(self.pool_seed(DOMAIN_CACHE, i), out),
            Role::Heap(i) => fill_random(mix(mix(self.vm_seed, DOMAIN_HEAP), u64::from(i)), out),
            Role::Near {
                base_lib,
                base,
                salt,
            } => {
                let domain = if base_lib { DOMAIN_LIBS } else { DOMAIN_CACHE };
                fill_random(self.pool_seed(domain, base), out);
                let mut g = SplitMix64::new(mix(mix(self.vm_seed, DOMAIN_NEAR), u64::from(salt)));
                let edits = 1 + g.below(8);
                for _ in 0..edits {
                    let at = g.below(PAGE_SIZE as u64) as usize;
                    // XOR with a non-zero byte: the page always changes.
                    out[at] ^= 1 + g.below(255) as u8;
                }
            }
        }
    }

    /// Builds the VM's memory in anonymous memory, `threads`-way parallel
    /// through the given rayon pool (or the global one).
    pub fn materialize(
        &self,
        pool: Option<&rayon::ThreadPool>,
    ) -> Result<SyntheticMemory, SynthError> {
        let region = Region::anonymous(self.spec.memory_bytes())?;
        let fill = || {
            (0..self.pages()).into_par_iter().try_for_each_init(
                || Box::new([0u8; PAGE_SIZE]),
                |buf, frame| {
                    self.fill_page(frame, buf);
                    region.write_page(frame, buf)
                },
            )
        };
        match pool {
            Some(p) => p.install(fill)?,
            None => fill()?,
        }
        Ok(SyntheticMemory {
            dirty: AtomicBitmap::new(region.pages()),
            region,
        })
    }

    /// Writes the VM as a raw image to `path` (through a temporary file
    /// renamed into place, so a failure leaves no partial image), calling
    /// `progress` with pages written.
    pub fn write_image(
        &self,
        path: &Path,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), SynthError> {
        let werr = |source| SynthError::Write {
            path: path.to_owned(),
            source,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(werr)?;
        {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
            const BLOCK: u64 = 256;
            let mut buf = vec![0u8; BLOCK as usize * PAGE_SIZE];
            let mut frame = 0;
            while frame < self.pages() {
                let n = BLOCK.min(self.pages() - frame);
                buf[..n as usize * PAGE_SIZE]
                    .par_chunks_exact_mut(PAGE_SIZE)
                    .enumerate()
                    .for_each(|(i, page)| {
                        let page: &mut Page = page.try_into().expect("page-sized chunk");
                        self.fill_page(frame + i as u64, page);
                    });
                w.write_all(&buf[..n as usize * PAGE_SIZE]).map_err(werr)?;
                frame += n;
                progress(n);
            }
            w.flush().map_err(werr)?;
        }
        tmp.as_file().sync_data().map_err(werr)?;
        tmp.persist(path).map_err(|e| werr(e.error))?;
        Ok(())
    }
}

/// A synthetic VM's memory, materialised.
pub struct SyntheticMemory {
    region: Region,
    dirty: AtomicBitmap,
}

impl GuestMemory for SyntheticMemory {
    fn write_page(&self, frame: u64, data: &Page) -> Result<(), MemoryError> {
        self.region.write_page(frame, data)?;
        self.dirty.mark(frame)
    }

    fn take_dirty(&self) -> Result<DirtyBitmap, MemoryError> {
        Ok(self.dirty.take())
    }

    fn mark_dirty(&self, pages: &DirtyBitmap) -> Result<(), MemoryError> {
        self.dirty.mark_all(pages)
    }

    fn region(&self) -> &Region {
        &self.region
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn contents(vm: &SyntheticVm) -> Vec<Vec<u8>> {
        let mut page = [0u8; PAGE_SIZE];
        (0..vm.pages())
            .map(|f| {
                vm.fill_page(f, &mut page);
                page.to_vec()
            })
            .collect()
    }

    fn distinct_nonzero(pages: &[Vec<u8>]) -> HashSet<&[u8]> {
        pages
            .iter()
            .filter(|p| p.iter().any(|&b| b != 0))
            .map(|p| p.as_slice())
            .collect()
    }

    #[test]
    fn deterministic_and_distinct_per_index() {
        let a = SyntheticVm::new(SynthSpec::new("web", 0, 2 << 20).unwrap()).unwrap();
        let a2 = SyntheticVm::new(SynthSpec::new("web", 0, 2 << 20).unwrap()).unwrap();
        let b = SyntheticVm::new(SynthSpec::new("web", 1, 2 << 20).unwrap()).unwrap();
        assert_eq!(contents(&a), contents(&a2));
        assert_ne!(contents(&a), contents(&b));
    }

    #[test]
    fn page_kinds_match_the_profile() {
        let spec = SynthSpec::new("db", 3, 8 << 20).unwrap();
        let n = spec.pages as f64;
        let vm = SyntheticVm::new(spec.clone()).unwrap();
        let pages = contents(&vm);
        let zero = pages.iter().filter(|p| p.iter().all(|&b| b == 0)).count() as f64;
        assert!(
            (zero / n - spec.profile.zero).abs() < 0.01,
            "zero share {}",
            zero / n
        );
        let nonzero = n - zero;
        let distinct = distinct_nonzero(&pages).len() as f64;
        // Only heap duplicates repeat inside one VM.
        let dup_share = (nonzero - distinct) / n;
        assert!(
            (dup_share - spec.profile.heap_dup).abs() < 0.01,
            "dup share {dup_share}"
        );
    }

    #[test]
    fn families_share_within_and_not_across() {
        let vm = |f: &str, i| SyntheticVm::new(SynthSpec::new(f, i, 4 << 20).unwrap()).unwrap();
        let (w0, w1, d0) = (vm("web", 0), vm("web", 1), vm("db", 0));
        let (cw0, cw1, cd0) = (contents(&w0), contents(&w1), contents(&d0));
        let (sw0, sw1, sd0) = (
            distinct_nonzero(&cw0),
            distinct_nonzero(&cw1),
            distinct_nonzero(&cd0),
        );
        let jaccard = |a: &HashSet<&[u8]>, b: &HashSet<&[u8]>| {
            a.intersection(b).count() as f64 / a.union(b).count() as f64
        };
        let same = jaccard(&sw0, &sw1);
        let across = jaccard(&sw0, &sd0);
        assert!(same > 0.15, "same family Jaccard {same}");
        assert!(
            across < 0.02 && across > 0.0,
            "across families Jaccard {across}"
        );
    }

    #[test]
    fn near_duplicates_differ_from_their_base() {
        let vm = SyntheticVm::new(SynthSpec::new("web", 0, 4 << 20).unwrap()).unwrap();
        let pages = contents(&vm);
        let mut count: HashMap<&[u8], usize> = HashMap::new();
        for p in &pages {
            *count.entry(p).or_default() += 1;
        }
        let mut page = [0u8; PAGE_SIZE];
        for (frame, role) in vm.roles.iter().enumerate() {
            if let Role::Near { base_lib, base, .. } = *role {
                let base_role = if base_lib {
                    Role::Lib(base)
                } else {
                    Role::Cache(base)
                };
                let base_frame = vm.roles.iter().position(|r| *r == base_role).unwrap();
                vm.fill_page(base_frame as u64, &mut page);
                let diff = page
                    .iter()
                    .zip(&pages[frame])
                    .filter(|(a, b)| a != b)
                    .count();
                assert!(
                    (1..=8).contains(&diff),
                    "frame {frame} differs in {diff} bytes"
                );
            }
        }
    }

    #[test]
    fn profile_strings() {
        let s = SynthSpec::parse("web:index=2,memory=1MiB,zero=0.5,seed=9", 4096).unwrap();
        assert_eq!(
            (s.family.as_str(), s.index, s.pages, s.seed),
            ("web", 2, 256, 9)
        );
        assert_eq!(s.profile.zero, 0.5);
        assert_eq!(SynthSpec::parse("db", 8192).unwrap().pages, 2);
        for bad in [
            "",
            "web:zero",
            "web:zero=2",
            "web:colour=blue",
            "web:memory=3",
            "web:zero=0.9,libs=0.2",
            "we b",
            "web:libs=0.5",
        ] {
            let e = SynthSpec::parse(bad, 1 << 20).unwrap_err().to_string();
            assert!(!e.is_empty() && !e.contains('\n'), "{bad:?}: {e}");
        }
    }

    #[test]
    fn image_written_equals_materialized_memory() {
        let dir = tempfile::tempdir().unwrap();
        let vm = SyntheticVm::new(SynthSpec::new("cache", 1, 1 << 20).unwrap()).unwrap();
        let path = dir.path().join("vm.raw");
        let total = std::sync::atomic::AtomicU64::new(0);
        vm.write_image(&path, &|n| {
            total.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(total.into_inner(), vm.pages());
        let mem = vm.materialize(None).unwrap();
        let file = std::fs::read(&path).unwrap();
        let mut bytes = vec![0u8; mem.region().len()];
        mem.region().read_bytes(0, &mut bytes).unwrap();
        assert_eq!(bytes, file);
    }
}
