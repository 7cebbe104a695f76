//! `pagecast scan` against a naive reference that compares raw page bytes
//! (no hashing), on images with hand-built and synthetic sharing.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use pagecast_memory::synth::{SynthSpec, SyntheticVm};
use pagecast_pages::PAGE_SIZE;
use pagecast_tests::{pagecast, pagecast_json};

/// Figures computed the slow, obvious way.
struct Reference {
    pages: Vec<u64>,
    zero: Vec<u64>,
    distinct: Vec<u64>,
    duplicates: Vec<u64>,
    union_distinct: u64,
    precopy_bytes: u64,
    jaccard: Vec<Vec<f64>>,
}

fn reference(images: &[Vec<u8>]) -> Reference {
    let sets: Vec<HashSet<&[u8]>> = images
        .iter()
        .map(|img| {
            img.chunks(PAGE_SIZE)
                .filter(|p| p.iter().any(|&b| b != 0))
                .collect()
        })
        .collect();
    let mut r = Reference {
        pages: vec![],
        zero: vec![],
        distinct: vec![],
        duplicates: vec![],
        union_distinct: 0,
        precopy_bytes: 0,
        jaccard: vec![],
    };
    for (img, set) in images.iter().zip(&sets) {
        let pages = (img.len() / PAGE_SIZE) as u64;
        let zero = img
            .chunks(PAGE_SIZE)
            .filter(|p| p.iter().all(|&b| b == 0))
            .count() as u64;
        r.pages.push(pages);
        r.zero.push(zero);
        r.distinct.push(set.len() as u64);
        r.duplicates.push(pages - zero - set.len() as u64);
        r.precopy_bytes += (pages - zero) * PAGE_SIZE as u64;
    }
    let union: HashSet<&[u8]> = sets.iter().flatten().copied().collect();
    r.union_distinct = union.len() as u64;
    r.jaccard = sets
        .iter()
        .map(|a| {
            sets.iter()
                .map(|b| {
                    let u = a.union(b).count();
                    if u == 0 {
                        0.0
                    } else {
                        a.intersection(b).count() as f64 / u as f64
                    }
                })
                .collect()
        })
        .collect();
    r
}

fn check(dir: &Path, images: &[Vec<u8>], threads: &str) {
    let mut args = vec!["--threads", threads, "scan", "--json"];
    let paths: Vec<String> = (0..images.len())
        .map(|i| {
            let p = dir.join(format!("img{i}.raw"));
            std::fs::write(&p, &images[i]).unwrap();
            p.display().to_string()
        })
        .collect();
    args.extend(paths.iter().map(String::as_str));
    let got = pagecast_json(&args);
    let want = reference(images);
    let imgs = got["images"].as_array().unwrap();
    assert_eq!(imgs.len(), images.len());
    for (i, img) in imgs.iter().enumerate() {
        assert_eq!(img["name"], paths[i].as_str());
        assert_eq!(img["pages"], want.pages[i], "pages of image {i}");
        assert_eq!(img["zero"], want.zero[i], "zero pages of image {i}");
        assert_eq!(
            img["distinct"], want.distinct[i],
            "distinct pages of image {i}"
        );
        assert_eq!(
            img["duplicates"], want.duplicates[i],
            "duplicates of image {i}"
        );
    }
    assert_eq!(got["union_distinct"], want.union_distinct);
    assert_eq!(got["precopy_bytes"], want.precopy_bytes);
    assert_eq!(got["gang_bytes"], want.union_distinct * PAGE_SIZE as u64);
    let jac = got["jaccard"].as_array().unwrap();
    for (i, (row, want_row)) in jac.iter().zip(&want.jaccard).enumerate() {
        for (j, (g, w)) in row.as_array().unwrap().iter().zip(want_row).enumerate() {
            let g = g.as_f64().unwrap();
            assert!((g - w).abs() < 1e-12, "jaccard[{i}][{j}] {g} vs {w}");
        }
    }
}

/// A page whose content is determined by `id` (0 is the zero page).
fn page(id: u32) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    if id != 0 {
        p[..4].copy_from_slice(&id.to_le_bytes());
        p[PAGE_SIZE - 1] = 0x5a;
    }
    p
}

fn image(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|&i| page(i)).collect()
}

#[test]
fn hand_built_images_with_known_sharing() {
    let dir = tempfile::tempdir().unwrap();
    // A: zero, 1, 2, 2, 3, zero   B: 2, 3, 4, 4, 4   C: all zero   D: 9
    // Near duplicates: 5 and a copy of 5 with one byte changed.
    let mut near = page(5);
    near[100] ^= 1;
    let mut e = image(&[5, 1]);
    e.extend(near);
    let images = vec![
        image(&[0, 1, 2, 2, 3, 0]),
        image(&[2, 3, 4, 4, 4]),
        image(&[0, 0, 0]),
        image(&[9]),
        e,
    ];
    let r = reference(&images);
    // The reference itself, checked by hand for A and B.
    assert_eq!(
        (r.pages[0], r.zero[0], r.distinct[0], r.duplicates[0]),
        (6, 2, 3, 1)
    );
    assert_eq!(
        (r.pages[1], r.zero[1], r.distinct[1], r.duplicates[1]),
        (5, 0, 3, 2)
    );
    assert!((r.jaccard[0][1] - 2.0 / 4.0).abs() < 1e-12);
    assert_eq!(r.distinct[4], 3, "a near duplicate is distinct");
    for threads in ["1", "2"] {
        check(dir.path(), &images, threads);
    }
}

#[test]
fn synthetic_families_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mut images = Vec::new();
    for (family, index) in [("web", 0), ("web", 1), ("db", 0), ("web", 2)] {
        let vm = SyntheticVm::new(SynthSpec::new(family, index, 2 << 20).unwrap()).unwrap();
        let mut img = vec![0u8; vm.pages() as usize * PAGE_SIZE];
        for (f, p) in img.chunks_exact_mut(PAGE_SIZE).enumerate() {
            vm.fill_page(f as u64, p.try_into().unwrap());
        }
        images.push(img);
    }
    check(dir.path(), &images, "2");
}

#[test]
fn synth_writes_what_scan_then_measures() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("images");
    let written = pagecast_json(&[
        "synth",
        "--out",
        out.to_str().unwrap(),
        "--family",
        "web",
        "--vms",
        "2",
        "--memory",
        "1MiB",
        "--json",
    ]);
    assert_eq!(written.as_array().unwrap().len(), 2);
    let bytes: Vec<Vec<u8>> = ["web-0.raw", "web-1.raw"]
        .iter()
        .map(|n| std::fs::read(out.join(n)).unwrap())
        .collect();
    let counts: HashMap<&[u8], usize> =
        bytes
            .iter()
            .flat_map(|b| b.chunks(PAGE_SIZE))
            .fold(HashMap::new(), |mut m, p| {
                *m.entry(p).or_default() += 1;
                m
            });
    assert!(counts.values().any(|&c| c > 1), "the two VMs share pages");
    check(dir.path(), &bytes, "2");
    // Same command again without --force refuses and keeps the images.
    let again = pagecast(&[
        "synth",
        "--out",
        out.to_str().unwrap(),
        "--family",
        "web",
        "--vms",
        "2",
        "--memory",
        "1MiB",
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    assert_eq!(std::fs::read(out.join("web-0.raw")).unwrap(), bytes[0]);
}

#[test]
fn scan_counts_sharing_within_dedup_domains_only() {
    let dir = tempfile::tempdir().unwrap();
    // A and B hold the same four contents, C two of them.
    let paths: Vec<String> = [image(&[1, 2, 3, 4]), image(&[1, 2, 3, 4]), image(&[1, 2])]
        .iter()
        .enumerate()
        .map(|(i, img)| {
            let p = dir.path().join(format!("{i}.raw"));
            std::fs::write(&p, img).unwrap();
            p.to_str().unwrap().to_owned()
        })
        .collect();
    let scan = |domains: &str| {
        let mut args = vec!["scan", "--json", "--no-progress", "--domains", domains];
        args.extend(paths.iter().map(String::as_str));
        pagecast_json(&args)
    };
    let one = scan("cluster,cluster,cluster");
    assert_eq!(one["union_distinct"], 4);
    assert_eq!(one["jaccard"][0][1], 1.0);
    // B in a domain of its own: its pages count once more, and it shares
    // nothing with A; A and C still share.
    let two = scan("red,blue,red");
    assert_eq!(two["union_distinct"], 8);
    assert_eq!(two["jaccard"][0][1], 0.0);
    assert_eq!(two["jaccard"][0][2], 0.5);
    assert_eq!(two["images"][1]["domain"], "blue");
    // One domain name per image, or a clear error.
    let mut args = vec!["scan", "--domains", "red"];
    args.extend(paths.iter().map(String::as_str));
    let out = pagecast(&args);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("one per image"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An image nobody writes is hashed in place under a read lease; the same
/// image held open for writing (as a running QEMU holds its memory file)
/// is copied out, to the same figures.
#[test]
fn an_image_held_open_for_writing_is_copied_to_the_same_figures() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("held.raw");
    std::fs::write(&path, image(&[1, 2, 0, 3, 3, 7, 0, 9])).unwrap();
    let p = path.to_str().unwrap();
    let free = pagecast_json(&["scan", "--json", "--no-progress", p]);
    if pagecast_testkit::needs(
        "an_image_held_open_for_writing_is_copied_to_the_same_figures",
        &[pagecast_testkit::Need::Leases],
    ) {
        assert_eq!(free["images"][0]["in_place_pages"], 8, "{free}");
    }
    let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let held = pagecast_json(&["scan", "--json", "--no-progress", p]);
    drop(writer);
    assert_eq!(held["images"][0]["in_place_pages"], 0, "{held}");
    for k in ["pages", "zero", "distinct", "duplicates"] {
        assert_eq!(held["images"][0][k], free["images"][0][k], "{k}");
    }
    assert_eq!(held["union_distinct"], free["union_distinct"]);
}
