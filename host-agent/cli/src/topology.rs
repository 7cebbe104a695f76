//! Topology files for `pagecast plan`: racks, hosts, the VMs they run (as
//! raw memory images or synthetic profiles) and what to evacuate. TOML:
//!
//! ```toml
//! core_gbps = 100                       # optional: core capacity
//!
//! [[racks]]
//! name = "A"
//! uplink_gbps = 40
//! [[racks.hosts]]
//! name = "a1"
//! memory_gib = 8
//! link_gbps = 10
//! vms = [ { name = "vm1", image = "images/vm1.raw" },
//!         { name = "vm2", image = "images/vm2.raw", domain = "acme" },
//!         { name = "vm3", synthetic = "web:index=3", memory = "256MiB" } ]
//!
//! [evacuate]
//! from = ["a1"]
//! to = ["b1", "b2"]
//! anti_affinity = [["vm1", "vm2"]]      # optional
//! pinned = { vm3 = "b2" }               # optional
//! ```
//!
//! A VM's memory is a raw image or a synthetic profile (`pagecast synth
//! --help`; `memory` defaults to 64 MiB), generated where it is needed.
//! A VM's `domain` (default: the cluster-wide one) is its dedup domain: its
//! pages count as shared only with VMs of the same domain. Image paths are
//! relative to the topology file. Every name must be unique
//! in its kind; every count and size is bounded.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use pagecast_memory::synth::{SynthSpec, SyntheticVm};
use pagecast_pages::PageHash;
use pagecast_scheduler::{Cluster, Evacuation, Host, InMemoryContent, Rack, Vm};
use serde::Deserialize;

use pagecast_memory::fingerprint::{Fingerprinter, fingerprint_images};
use pagecast_memory::{GuestMemory, MemoryError};

/// Largest topology file accepted.
pub const MAX_TOPOLOGY_BYTES: u64 = 4 << 20;
/// Most racks, hosts and VMs in one topology.
pub const MAX_RACKS: usize = 1024;
/// Most hosts.
pub const MAX_HOSTS: usize = 16_384;
/// Most VMs.
pub const MAX_VMS: usize = 100_000;

/// Why a topology was refused.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is too large.
    #[error("{}: {len} bytes is more than the {MAX_TOPOLOGY_BYTES}-byte limit", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// Not valid TOML of the expected shape.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A semantic problem, named.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// What is wrong.
        message: String,
        /// The file.
        path: PathBuf,
    },
    /// An image could not be used.
    #[error(transparent)]
    Image(#[from] MemoryError),
    /// A synthetic VM could not be generated.
    #[error(transparent)]
    Synth(#[from] pagecast_memory::synth::SynthError),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    core_gbps: Option<f64>,
    racks: Vec<RackSpec>,
    evacuate: EvacSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RackSpec {
    name: String,
    uplink_gbps: f64,
    #[serde(default)]
    hosts: Vec<HostSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostSpec {
    name: String,
    memory_gib: f64,
    link_gbps: f64,
    #[serde(default)]
    vms: Vec<VmSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmSpec {
    name: String,
    /// A raw memory image, relative to the file; or
    image: Option<PathBuf>,
    /// a synthetic profile (`pagecast synth`), with
    synthetic: Option<String>,
    /// its memory size (e.g. "256MiB"; default 64 MiB).
    memory: Option<String>,
    /// Its dedup domain (default: the cluster-wide one).
    #[serde(default)]
    domain: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvacSpec {
    from: Vec<String>,
    to: Vec<String>,
    #[serde(default)]
    anti_affinity: Vec<Vec<String>>,
    #[serde(default)]
    pinned: BTreeMap<String, String>,
}

/// A parsed topology: the planner's inputs, and each VM's image.
#[derive(Debug)]
pub struct Topology {
    /// The cluster (VM memory sizes and non-zero page counts filled in by
    /// [`Topology::fingerprint`]).
    pub cluster: Cluster,
    /// What to evacuate.
    pub evacuation: Evacuation,
    /// Where each VM's memory comes from, by VM index.
    pub sources: Vec<VmSource>,
    /// Dedup domain of each VM, by VM index ("cluster" unless given).
    pub domains: Vec<String>,
}

fn positive(what: &str, name: &str, v: f64, path: &Path) -> Result<f64, TopologyError> {
    if v.is_finite() && v > 0.0 && v < 1e9 {
        Ok(v)
    } else {
        Err(TopologyError::Invalid {
            message: format!("{what} of {name} is {v}; it must be a positive number"),
            path: path.to_owned(),
        })
    }
}

impl Topology {
    /// Reads and validates a topology file (images are checked later, when
    /// fingerprinted).
    pub fn load(path: &Path) -> Result<Self, TopologyError> {
        let len = std::fs::metadata(path)
            .map_err(|source| TopologyError::Read {
                path: path.to_owned(),
                source,
            })?
            .len();
        if len > MAX_TOPOLOGY_BYTES {
            return Err(TopologyError::TooLarge {
                path: path.to_owned(),
                len,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base, path)
    }

    /// Parses topology text; `base` resolves relative image paths, `path`
    /// names the file in errors.
    pub fn parse(text: &str, base: &Path, path: &Path) -> Result<Self, TopologyError> {
        let f: File = toml::from_str(text).map_err(|e| TopologyError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        let invalid = |message: String| TopologyError::Invalid {
            message,
            path: path.to_owned(),
        };
        if f.racks.is_empty() || f.racks.len() > MAX_RACKS {
            return Err(invalid(format!(
                "{} racks; there must be 1 to {MAX_RACKS}",
                f.racks.len()
            )));
        }
        let mut c = Cluster {
            core_bps: f
                .core_gbps
                .map(|g| positive("core_gbps", "the core", g, path))
                .transpose()?
                .map(|g| g * 1e9),
            ..Cluster::default()
        };
        let mut sources = Vec::new();
        let mut domains = Vec::new();
        let mut host_ix: HashMap<String, usize> = HashMap::new();
        let mut vm_ix: HashMap<String, usize> = HashMap::new();
        let mut rack_names = HashSet::new();
        for r in &f.racks {
            if !rack_names.insert(r.name.clone()) {
                return Err(invalid(format!("rack {:?} is defined twice", r.name)));
            }
            let rack = c.racks.len();
            c.racks.push(Rack {
                name: r.name.clone(),
                uplink_bps: positive("uplink_gbps", &r.name, r.uplink_gbps, path)? * 1e9,
            });
            for h in &r.hosts {
                if host_ix.insert(h.name.clone(), c.hosts.len()).is_some() {
                    return Err(invalid(format!("host {:?} is defined twice", h.name)));
                }
                let memory = positive("memory_gib", &h.name, h.memory_gib, path)?;
                c.hosts.push(Host {
                    name: h.name.clone(),
                    rack,
                    memory_bytes: (memory * (1u64 << 30) as f64) as u64,
                    link_bps: positive("link_gbps", &h.name, h.link_gbps, path)? * 1e9,
                });
                for v in &h.vms {
                    if vm_ix.insert(v.name.clone(), c.vms.len()).is_some() {
                        return Err(invalid(format!("VM {:?} is defined twice", v.name)));
                    }
                    c.vms.push(Vm {
                        name: v.name.clone(),
                        host: c.hosts.len() - 1,
                        memory_bytes: 0,
                        nonzero_pages: 0,
                        rewrite_pages_per_s: 0.0,
                    });
                    pagecast_pages::domain::check_domain(&v.domain)
                        .map_err(|e| invalid(format!("VM {:?}: {e}", v.name)))?;
                    sources.push(vm_source(v, base).map_err(invalid)?);
                    domains.push(pagecast_pages::domain::normalize(&v.domain).to_owned());
                }
            }
        }
        if c.hosts.len() > MAX_HOSTS || c.vms.len() > MAX_VMS {
            return Err(invalid(format!(
                "{} hosts and {} VMs; at most {MAX_HOSTS} and {MAX_VMS}",
                c.hosts.len(),
                c.vms.len()
            )));
        }
        let evacuation = evacuation_of(&f.evacuate, &host_ix, &vm_ix).map_err(invalid)?;
        if evacuation.from.is_empty() {
            return Err(invalid(
                "[evacuate] from is empty: name the hosts to evacuate".into(),
            ));
        }
        Ok(Topology {
            cluster: c,
            evacuation,
            sources,
            domains,
        })
    }

    /// Fingerprints every VM's memory (its image, or its synthetic profile
    /// generated here), filling in memory sizes and non-zero page counts,
    /// and returns the content the planner needs. Images are all opened
    /// before any is hashed. `progress` gets pages hashed; `on_image` each
    /// VM's index and page count.
    pub fn fingerprint(
        &mut self,
        fp: &Fingerprinter,
        on_image: &mut dyn FnMut(usize, u64),
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<InMemoryContent, TopologyError> {
        // Each VM is hashed in its domain (keys for analysis only), so
        // sharing is counted within domains, as the cluster would.
        let keys: Vec<_> = self
            .domains
            .iter()
            .map(|d| pagecast_pages::domain::analysis_key(d).expect("checked when parsed"))
            .collect();
        let (img_ix, paths): (Vec<usize>, Vec<PathBuf>) = self
            .sources
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                VmSource::Image(p) => Some((i, p.clone())),
                VmSource::Synthetic { .. } => None,
            })
            .unzip();
        let img_keys: Vec<_> = img_ix.iter().map(|&i| keys[i]).collect();
        let mut images = fingerprint_images(
            &paths,
            &img_keys,
            fp,
            &mut |k, img| on_image(img_ix[k], img.page_count()),
            progress,
        )?
        .into_iter();
        let mut pages: Vec<Vec<PageHash>> = Vec::with_capacity(self.sources.len());
        for (i, src) in self.sources.iter().enumerate() {
            let (bytes, f) = match src {
                VmSource::Image(_) => {
                    let img = images.next().expect("one per image");
                    (img.image.len_bytes(), img.fingerprints)
                }
                VmSource::Synthetic { spec, .. } => {
                    let vm = SyntheticVm::new(spec.clone())?;
                    on_image(i, vm.pages());
                    let mem = vm.materialize(None)?;
                    (
                        spec.memory_bytes(),
                        fp.fingerprint(&mem, &keys[i], progress),
                    )
                }
            };
            let vm = &mut self.cluster.vms[i];
            vm.memory_bytes = bytes;
            vm.nonzero_pages = f.nonzero();
            pages.push(f.distinct());
        }
        Ok(InMemoryContent::new(&self.cluster, pages))
    }
}

/// Where a VM's memory comes from.
#[derive(Debug, Clone)]
pub enum VmSource {
    /// A raw image (resolved against the topology file's directory).
    Image(PathBuf),
    /// A synthetic profile and its size.
    Synthetic {
        /// The profile as written (`FAMILY[:key=value,...]`).
        profile: String,
        /// It parsed.
        spec: SynthSpec,
    },
}

/// Memory of a synthetic VM whose topology entry gives none.
pub const DEFAULT_SYNTHETIC_MEMORY: u64 = 64 << 20;

/// Where a VM's memory comes from: an image (relative to `base`) or a
/// synthetic profile with its memory size; `Err` says what is wrong.
fn vm_source(v: &VmSpec, base: &Path) -> Result<VmSource, String> {
    match (&v.image, &v.synthetic) {
        (Some(img), None) if v.memory.is_none() => Ok(VmSource::Image(base.join(img))),
        (None, Some(profile)) => {
            let memory = match &v.memory {
                Some(m) => pagecast_pages::units::parse_size(m)
                    .map_err(|e| format!("VM {:?}: memory {m:?}: {e}", v.name))?,
                None => DEFAULT_SYNTHETIC_MEMORY,
            };
            let spec =
                SynthSpec::parse(profile, memory).map_err(|e| format!("VM {:?}: {e}", v.name))?;
            Ok(VmSource::Synthetic {
                profile: profile.clone(),
                spec,
            })
        }
        _ => Err(format!(
            "VM {:?}: give either image or synthetic (with an optional memory)",
            v.name
        )),
    }
}

/// The `[evacuate]` section with hosts and VMs as indexes; `Err` names
/// what it does not know.
fn evacuation_of(
    e: &EvacSpec,
    host_ix: &HashMap<String, usize>,
    vm_ix: &HashMap<String, usize>,
) -> Result<Evacuation, String> {
    let host = |n: &String| {
        host_ix
            .get(n)
            .copied()
            .ok_or_else(|| format!("unknown host {n:?} in [evacuate]"))
    };
    let vm = |n: &String| {
        vm_ix
            .get(n)
            .copied()
            .ok_or_else(|| format!("unknown VM {n:?} in [evacuate]"))
    };
    Ok(Evacuation {
        from: e.from.iter().map(host).collect::<Result<_, _>>()?,
        to: e.to.iter().map(host).collect::<Result<_, _>>()?,
        anti_affinity: e
            .anti_affinity
            .iter()
            .map(|g| g.iter().map(vm).collect::<Result<Vec<_>, _>>())
            .collect::<Result<_, _>>()?,
        pinned: e
            .pinned
            .iter()
            .map(|(v, h)| Ok((vm(v)?, host(h)?)))
            .collect::<Result<_, String>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        core_gbps = 100
        [[racks]]
        name = "A"
        uplink_gbps = 40
        [[racks.hosts]]
        name = "a1"
        memory_gib = 8
        link_gbps = 10
        vms = [ { name = "vm1", image = "images/vm1.raw" }, { name = "vm2", image = "/abs/vm2.raw" } ]
        [[racks]]
        name = "B"
        uplink_gbps = 40
        [[racks.hosts]]
        name = "b1"
        memory_gib = 0.5
        link_gbps = 10
        [evacuate]
        from = ["a1"]
        to = ["b1"]
        anti_affinity = [["vm1", "vm2"]]
        pinned = { vm2 = "b1" }
    "#;

    fn parse(t: &str) -> Result<Topology, TopologyError> {
        Topology::parse(t, Path::new("/topo"), Path::new("t.toml"))
    }

    #[test]
    fn parses_the_documented_shape() {
        let t = parse(GOOD).unwrap();
        assert_eq!(t.cluster.racks.len(), 2);
        assert_eq!(t.cluster.hosts[1].memory_bytes, 512 << 20);
        assert_eq!(t.cluster.core_bps, Some(100e9));
        let images: Vec<_> = t
            .sources
            .iter()
            .map(|s| match s {
                VmSource::Image(p) => p.clone(),
                VmSource::Synthetic { .. } => panic!("an image VM parsed as synthetic"),
            })
            .collect();
        assert_eq!(
            images,
            vec![
                PathBuf::from("/topo/images/vm1.raw"),
                PathBuf::from("/abs/vm2.raw")
            ]
        );
        assert_eq!(t.evacuation.from, vec![0]);
        assert_eq!(t.evacuation.pinned, vec![(1, 1)]);
        assert_eq!(t.evacuation.anti_affinity, vec![vec![0, 1]]);
    }

    #[test]
    fn synthetic_vms_and_their_refusals() {
        let t = parse(&GOOD.replace(
            r#"{ name = "vm2", image = "/abs/vm2.raw" }"#,
            r#"{ name = "vm2", synthetic = "web:index=1", memory = "8MiB" }"#,
        ))
        .unwrap();
        match &t.sources[1] {
            VmSource::Synthetic { profile, spec } => {
                assert_eq!(profile, "web:index=1");
                assert_eq!(spec.memory_bytes(), 8 << 20);
            }
            other => panic!("{other:?}"),
        }
        for (vm, why) in [
            (r#"{ name = "vm2" }"#, "either image or synthetic"),
            (
                r#"{ name = "vm2", image = "a.raw", synthetic = "web" }"#,
                "either image or synthetic",
            ),
            (
                r#"{ name = "vm2", synthetic = "web", memory = "lots" }"#,
                "memory",
            ),
            (r#"{ name = "vm2", synthetic = "web:bogus=1" }"#, "vm2"),
        ] {
            let e = parse(&GOOD.replace(r#"{ name = "vm2", image = "/abs/vm2.raw" }"#, vm))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{vm}: {e}");
        }
    }

    #[test]
    fn refusals_name_the_problem() {
        let cases = [
            (
                GOOD.replace("name = \"b1\"", "name = \"a1\""),
                "host \"a1\" is defined twice",
            ),
            (
                GOOD.replace("to = [\"b1\"]", "to = [\"c9\"]"),
                "unknown host \"c9\"",
            ),
            (
                GOOD.replace(
                    "uplink_gbps = 40\n        [[racks.hosts]]\n        name = \"b1\"",
                    "uplink_gbps = -1\n        [[racks.hosts]]\n        name = \"b1\"",
                ),
                "uplink_gbps of B is -1",
            ),
            (
                GOOD.replace("memory_gib = 8", "memory_gib = 8\n        colour = \"red\""),
                "unknown field `colour`",
            ),
            (
                GOOD.replace("from = [\"a1\"]", "from = []"),
                "from is empty",
            ),
            (
                GOOD.replace("vm2 = \"b1\"", "vm9 = \"b1\""),
                "unknown VM \"vm9\"",
            ),
            ("racks = 3".to_string(), "t.toml"),
            ("[[racks]\n".to_string(), "t.toml"),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
            assert!(e.starts_with("t.toml"), "{e}");
            assert!(!e.contains('\n'), "{e:?}");
        }
    }
}
