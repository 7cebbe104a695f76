//! `pagecast scan`.

use clap::Args;
use pagecast_cli::scan::{ScanReport, scan_images};
use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_pages::units::format_bytes;

use super::progress::pages_bar;

/// Fingerprint raw guest memory images and report how much they share.
///
/// For each image: pages, zero pages, distinct non-zero pages and duplicate
/// pages within it. Across the images: distinct pages in their union, the
/// bytes a per-VM pre-copy sends (every non-zero page) against a gang
/// transfer that sends each distinct page once, and the pairwise sharing
/// (Jaccard index of the distinct non-zero page sets).
///
/// An image is the raw file QEMU writes with
/// `-object memory-backend-file,mem-path=FILE,...`: any length that is a
/// multiple of 4096 bytes. `pagecast synth` makes synthetic ones. An image
/// on a local filesystem that nobody has open for writing is read under a
/// read lease and hashed in place (up to twice as fast); one a running
/// QEMU writes is copied out a few pages at a time, as guest memory is. A
/// process that opens a leased image for writing waits until the pages
/// being read are done (with O_NONBLOCK it is refused instead).
///
/// Example:
///
///   pagecast synth --out images --family web --family db --vms 2
///
///   pagecast scan images/*.raw
///
///   pagecast scan --json images/web-0.raw images/web-1.raw | jq .gang_bytes
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ScanArgs {
    /// Raw memory images to scan.
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<String>,

    /// Dedup domain of each image, in order, comma-separated (default:
    /// every image in the cluster-wide domain). Pages count as shared only
    /// between images of one domain, as the cluster keeps them. Example:
    /// --domains acme,acme,globex
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    domains: Vec<String>,

    /// Print the figures as JSON on stdout (keys: images[].{name, pages,
    /// zero, distinct, duplicates, in_place_pages}, union_distinct, precopy_bytes,
    /// gang_bytes, jaccard, hash_rate_gbps, ...).
    #[arg(long)]
    json: bool,

    /// Never draw a progress bar (it is drawn only on a terminal anyway).
    #[arg(long)]
    no_progress: bool,
}

pub fn run(args: ScanArgs, threads: usize) -> anyhow::Result<()> {
    let fp = Fingerprinter::new(threads)?;
    let bar = pages_bar(0, "scanning", args.no_progress);
    let names = &args.images;
    let domains: Vec<String> = if args.domains.is_empty() {
        vec![pagecast_pages::CLUSTER_DOMAIN.to_owned(); names.len()]
    } else {
        args.domains.clone()
    };
    anyhow::ensure!(
        domains.len() == names.len(),
        "--domains lists {} domain(s) for {} image(s); give one per image",
        domains.len(),
        names.len()
    );
    for d in &domains {
        pagecast_pages::domain::check_domain(d)?;
    }
    let (sets, hashed, seconds) = scan_images(
        names,
        &domains,
        &fp,
        &mut |i, pages| {
            bar.set_length(bar.length().unwrap_or(0) + pages);
            bar.set_prefix(format!("{}/{}", i + 1, names.len()));
        },
        &|n| bar.inc(n),
    )?;
    bar.finish_and_clear();
    let report = sets.report(hashed, seconds, fp.threads());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

fn render(r: &ScanReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let width = r
        .images
        .iter()
        .map(|i| i.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let _ = writeln!(
        s,
        "{:>3}  {:<width$}  {:<12}  {:>10}  {:>10}  {:>10}  {:>10}",
        "#", "IMAGE", "DOMAIN", "PAGES", "ZERO", "DISTINCT", "DUPLICATES"
    );
    for (i, img) in r.images.iter().enumerate() {
        let _ = writeln!(
            s,
            "{:>3}  {:<width$}  {:<12}  {:>10}  {:>10}  {:>10}  {:>10}",
            i, img.name, img.domain, img.pages, img.zero, img.distinct, img.duplicates
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "distinct non-zero pages across all images: {} ({})",
        r.union_distinct,
        format_bytes(r.gang_bytes)
    );
    let _ = writeln!(
        s,
        "per-VM pre-copy sends {} (every non-zero page of every image)",
        format_bytes(r.precopy_bytes)
    );
    let ratio = if r.precopy_bytes > 0 {
        r.gang_bytes as f64 / r.precopy_bytes as f64
    } else {
        0.0
    };
    let _ = writeln!(
        s,
        "gang transfer sends   {} (each distinct page once): {:.2}x of pre-copy",
        format_bytes(r.gang_bytes),
        ratio
    );
    let pages: u64 = r.images.iter().map(|i| i.pages).sum();
    let in_place: u64 = r.images.iter().map(|i| i.in_place_pages).sum();
    let _ = writeln!(
        s,
        "hashed {} in {:.2} s: {:.2} GB/s on {} thread{} ({})",
        format_bytes(r.hashed_bytes),
        r.hash_seconds,
        r.hash_rate_gbps,
        r.threads,
        if r.threads == 1 { "" } else { "s" },
        if pages > 0 && in_place == pages {
            "in place, under read leases".to_owned()
        } else if in_place == 0 {
            "copied out: no image could be leased (open for writing elsewhere, not this \
             user's without CAP_LEASE, not on a local filesystem, fs.lease-break-time under 5 \
             s, or a writer came before the first block)"
                .to_owned()
        } else {
            format!("{in_place} of {pages} pages in place under read leases, the rest copied out")
        }
    );
    if r.images.len() > 1 {
        let _ = writeln!(s);
        let _ = writeln!(s, "sharing (Jaccard index of distinct non-zero pages)");
        let _ = write!(s, "{:>5}", "");
        for j in 0..r.images.len() {
            let _ = write!(s, " {:>6}", format!("#{j}"));
        }
        let _ = writeln!(s);
        for (i, row) in r.jaccard.iter().enumerate() {
            let _ = write!(s, "{:>5}", format!("#{i}"));
            for v in row {
                let _ = write!(s, " {v:>6.3}");
            }
            let _ = writeln!(s);
        }
    }
    s
}
