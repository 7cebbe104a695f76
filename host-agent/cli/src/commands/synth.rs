//! `pagecast synth`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use pagecast_memory::synth::{SynthSpec, SyntheticVm};
use pagecast_pages::units::{format_bytes, parse_size};
use serde::Serialize;

use super::progress::pages_bar;

/// Write synthetic guest memory images with a known sharing model.
///
/// VMs of one family share an OS base: the same kernel, libraries drawn from
/// one pool, page cache drawn from another. Each VM also has zero pages,
/// unique heap pages, repeats of its own heap pages, and near duplicates
/// (shared pages with a few bytes changed). Images are deterministic: the
/// same family, index, size and seed always give the same bytes.
///
/// Each image is written as OUT/FAMILY-INDEX.raw, through a temporary file,
/// so an interrupted run leaves no partial image.
///
/// Example:
///
///   pagecast synth --out images --family web --family db --vms 3 --memory 256MiB
///
///   pagecast synth --out images --family cache --vms 1 --zero 0.5 --seed 7
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct SynthArgs {
    /// Directory to write the images into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// VM family; repeat for several. VMs of one family share their OS base.
    #[arg(long = "family", value_name = "NAME", default_values_t = vec!["web".to_string(), "db".to_string()])]
    families: Vec<String>,

    /// VMs per family.
    #[arg(long, value_name = "N", default_value_t = 2)]
    vms: u32,

    /// Memory per VM (e.g. 64MiB, 1GiB).
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    memory: u64,

    /// Share of zero pages (0 to 1).
    #[arg(long, value_name = "FRACTION")]
    zero: Option<f64>,

    /// Seed: other seeds give other, equally shaped, clusters.
    #[arg(long, value_name = "N", default_value_t = 0)]
    seed: u64,

    /// Overwrite images that already exist.
    #[arg(long)]
    force: bool,

    /// Print what was written as JSON.
    #[arg(long)]
    json: bool,

    /// Never draw a progress bar.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Serialize)]
struct Written {
    path: String,
    family: String,
    index: u32,
    pages: u64,
    bytes: u64,
    seed: u64,
}

pub fn run(args: SynthArgs, threads: usize) -> anyhow::Result<()> {
    if args.vms == 0 {
        anyhow::bail!("--vms must be at least 1");
    }
    let mut specs = Vec::new();
    for family in &args.families {
        for index in 0..args.vms {
            let mut spec = SynthSpec::new(family, index, args.memory)?;
            spec.seed = args.seed;
            if let Some(z) = args.zero {
                spec.profile.zero = z;
                spec.profile.validate().context("--zero")?;
            }
            let path = args.out.join(format!("{family}-{index}.raw"));
            if path.exists() && !args.force {
                anyhow::bail!(
                    "{} already exists (pass --force to overwrite)",
                    path.display()
                );
            }
            specs.push((spec, path));
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create directory", args.out.display()))?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let total: u64 = specs.iter().map(|(s, _)| s.pages).sum();
    let bar = pages_bar(total, "writing", args.no_progress);
    let mut written = Vec::new();
    for (spec, path) in specs {
        let vm = SyntheticVm::new(spec)?;
        pool.install(|| vm.write_image(&path, &|n| bar.inc(n)))?;
        let s = vm.spec();
        written.push(Written {
            path: path.display().to_string(),
            family: s.family.clone(),
            index: s.index,
            pages: s.pages,
            bytes: s.memory_bytes(),
            seed: s.seed,
        });
    }
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&written)?);
    } else {
        for w in &written {
            println!(
                "{}  {}  family {} #{}",
                w.path,
                format_bytes(w.bytes),
                w.family,
                w.index
            );
        }
    }
    Ok(())
}
