//! `pagecast plan` on a topology of synthetic images, as an operator runs it.

use std::collections::HashMap;

use pagecast_tests::{pagecast, pagecast_json};

const TOPOLOGY: &str = r#"
[[racks]]
name = "A"
uplink_gbps = 40
[[racks.hosts]]
name = "a1"
memory_gib = 1
link_gbps = 10
vms = [ { name = "web-0", image = "images/web-0.raw" }, { name = "db-0", image = "images/db-0.raw" } ]
[[racks.hosts]]
name = "a2"
memory_gib = 1
link_gbps = 10
vms = [ { name = "web-1", image = "images/web-1.raw" } ]

[[racks]]
name = "B"
uplink_gbps = 40
[[racks.hosts]]
name = "b1"
memory_gib = 0.01
link_gbps = 10
vms = [ { name = "db-1", image = "images/db-1.raw" } ]
[[racks.hosts]]
name = "b2"
memory_gib = 0.01
link_gbps = 10

[[racks]]
name = "C"
uplink_gbps = 40
[[racks.hosts]]
name = "c1"
memory_gib = 0.01
link_gbps = 10
vms = [ { name = "web-2", image = "images/web-2.raw" } ]

[evacuate]
from = ["a1", "a2"]
to = ["b1", "b2", "c1"]
"#;

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let out = pagecast(&[
        "synth",
        "--out",
        images.to_str().unwrap(),
        "--family",
        "web",
        "--family",
        "db",
        "--vms",
        "3",
        "--memory",
        "2MiB",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dir.path().join("rack.toml"), TOPOLOGY).unwrap();
    dir
}

#[test]
fn plans_every_strategy_within_capacity() {
    let dir = setup();
    let topo = dir.path().join("rack.toml");
    let plan = pagecast_json(&["plan", "--topology", topo.to_str().unwrap(), "--json"]);

    // Pre-copy sends every non-zero page of the three moving VMs.
    let scan = pagecast_json(&[
        "scan",
        "--json",
        dir.path().join("images/web-0.raw").to_str().unwrap(),
        dir.path().join("images/db-0.raw").to_str().unwrap(),
        dir.path().join("images/web-1.raw").to_str().unwrap(),
    ]);
    let nonzero: u64 = scan["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pages"].as_u64().unwrap() - i["zero"].as_u64().unwrap())
        .sum();
    assert_eq!(plan["precopy_bytes"].as_u64().unwrap(), nonzero * 4096);

    let strategies = plan["strategies"].as_array().unwrap();
    let names: Vec<&str> = strategies
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first-fit", "vmscatter", "pagecast"]);
    let mut core = HashMap::new();
    for s in strategies {
        for key in [
            "placement",
            "source_bytes",
            "core_bytes",
            "eviction_s",
            "joins",
            "leaves",
        ] {
            assert!(!s[key].is_null(), "{} lacks {key}", s["name"]);
        }
        // 10 MiB hosts take at most four 2 MiB VMs next to their residents.
        let placement = s["placement"].as_object().unwrap();
        assert_eq!(placement.len(), 3);
        let mut used: HashMap<&str, u64> = HashMap::new();
        for host in placement.values() {
            let h = host.as_str().unwrap();
            assert!(["b1", "b2", "c1"].contains(&h), "placed on {h}");
            *used.entry(h).or_default() += 2 << 20;
        }
        for (h, bytes) in used {
            let resident = if h == "b2" { 0 } else { 2 << 20 };
            assert!(
                bytes + resident <= (0.01 * (1u64 << 30) as f64) as u64,
                "{h} over capacity"
            );
        }
        assert!(s["source_bytes"].as_u64().unwrap() <= nonzero * 4096);
        core.insert(
            s["name"].as_str().unwrap().to_string(),
            s["core_bytes"].as_u64().unwrap(),
        );
    }
    assert!(core["pagecast"] <= core["vmscatter"], "{core:?}");
    assert!(core["pagecast"] <= core["first-fit"], "{core:?}");
    // Advice names only destinations (a VM cannot go to a host being
    // emptied, however much it shares), and of them the web VMs share most
    // with c1, which runs web-2.
    for (vm, hosts) in plan["advice"]["top_hosts"].as_object().unwrap() {
        let names: Vec<&str> = hosts
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["host"].as_str().unwrap())
            .collect();
        assert!(!names.is_empty(), "{vm}: no advice");
        for h in &names {
            assert!(
                ["b1", "b2", "c1"].contains(h),
                "{vm} advised to {h}: {names:?}"
            );
        }
    }
    let top = &plan["advice"]["top_hosts"]["web-0"][0]["host"];
    assert_eq!(top, "c1", "web-0's best destination");

    // The same plan again: deterministic.
    let again = pagecast_json(&["plan", "--topology", topo.to_str().unwrap(), "--json"]);
    for (a, b) in strategies
        .iter()
        .zip(again["strategies"].as_array().unwrap())
    {
        assert_eq!(a["placement"], b["placement"]);
        assert_eq!(a["core_bytes"], b["core_bytes"]);
    }

    let text = pagecast(&[
        "plan",
        "--topology",
        topo.to_str().unwrap(),
        "--strategy",
        "pagecast",
        "--advise",
    ]);
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("== pagecast") && !text.contains("== vmscatter") && text.contains("advice"),
        "{text}"
    );
}

#[test]
fn bad_topologies_fail_with_one_line() {
    let dir = setup();
    let cases = [
        (
            TOPOLOGY.replace("to = [\"b1\", \"b2\", \"c1\"]", "to = [\"z9\"]"),
            "unknown host \"z9\"",
        ),
        (
            TOPOLOGY.replace("images/db-1.raw", "images/missing.raw"),
            "missing.raw: cannot open",
        ),
        (
            TOPOLOGY.replace("memory_gib = 0.01", "memory_gib = 0.0001"),
            "fits on no destination",
        ),
        ("[[racks]\n".to_string(), "rack.toml"),
    ];
    for (text, want) in cases {
        std::fs::write(dir.path().join("rack.toml"), &text).unwrap();
        let out = pagecast(&[
            "plan",
            "--topology",
            dir.path().join("rack.toml").to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(want), "{err:?} should contain {want:?}");
    }
    let out = pagecast(&["plan", "--topology", "rack.toml", "--strategy", "random"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown strategy"));
}

#[test]
fn a_dedup_domain_of_its_own_costs_its_shared_pages() {
    let dir = setup();
    let topo = dir.path().join("rack.toml");
    let source_bytes = |plan: &serde_json::Value| {
        plan["strategies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "pagecast")
            .unwrap()["source_bytes"]
            .as_f64()
            .unwrap()
    };
    let shared = pagecast_json(&["plan", "--topology", topo.to_str().unwrap(), "--json"]);
    // web-1 (moving, a web VM like web-0) in a domain of its own.
    let apart = TOPOLOGY.replace(
        r#"{ name = "web-1", image = "images/web-1.raw" }"#,
        r#"{ name = "web-1", image = "images/web-1.raw", domain = "tenant-b" }"#,
    );
    assert_ne!(apart, TOPOLOGY);
    let topo2 = dir.path().join("apart.toml");
    std::fs::write(&topo2, apart).unwrap();
    let split = pagecast_json(&["plan", "--topology", topo2.to_str().unwrap(), "--json"]);
    let (a, b) = (source_bytes(&shared), source_bytes(&split));
    assert!(
        b > a * 1.1,
        "one domain: {a} source bytes; web-1 apart: {b}"
    );
    // A bad domain name is refused with the VM named.
    let bad = TOPOLOGY.replace(
        r#"{ name = "web-1", image = "images/web-1.raw" }"#,
        r#"{ name = "web-1", image = "images/web-1.raw", domain = "no/such" }"#,
    );
    std::fs::write(&topo2, bad).unwrap();
    let out = pagecast(&["plan", "--topology", topo2.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("web-1") && err.contains("domain name"),
        "{err}"
    );
}
