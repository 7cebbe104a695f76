//! `pagecast-evaluate --quick` on the default topology, as CI runs it:
//! the report's byte counts agree with the interface counters it read and
//! with what the commands themselves counted, every VM moved verified, the
//! plots are well-formed SVG, nothing is left behind (a second run right
//! after works), and Ctrl-C tears everything down. Needs root, network
//! namespaces and /dev/kvm (`pagecast_testkit`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pagecast_testkit::{Need, needs};
use pagecast_tests::{pagecast_bin, repo_root};

/// What `pagecast-evaluate` needs: namespaces, bridges, shaping and
/// nftables as root, and KVM for the agents' micro-VMs.
fn can_run(test: &str) -> bool {
    needs(
        test,
        &[
            Need::Root,
            Need::Kvm,
            Need::Namespaces,
            Need::TrafficShaping,
            Need::Nftables,
            Need::LoopbackMulticast,
        ],
    )
}

/// The harness, beside the `pagecast` binary (its crate's tests make
/// cargo build it).
fn evaluate_bin() -> std::path::PathBuf {
    let bin = pagecast_bin().with_file_name("pagecast-evaluate");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p pagecast-evaluate`",
        bin.display()
    );
    bin
}

fn namespaces(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_owned)
        .collect()
}

fn evaluate(out: &Path, prefix: &str) -> std::process::Output {
    Command::new(evaluate_bin())
        .args(["--quick", "--prefix", prefix, "--topology"])
        .arg(repo_root().join("docs/examples/eval.toml"))
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// Whether `text` is one well-formed XML element tree whose root is <svg>:
/// every tag closed in order, attributes quoted, nothing after the root.
fn well_formed_svg(text: &str) -> Result<(), String> {
    let body = text.trim_start();
    let body = match body.strip_prefix("<?xml") {
        Some(rest) => rest.split_once("?>").ok_or("unclosed XML declaration")?.1,
        None => body,
    };
    let mut stack: Vec<String> = Vec::new();
    let mut rest = body.trim_start();
    let mut root_done = false;
    while !rest.is_empty() {
        if root_done && !rest.trim().is_empty() {
            return Err("content after the root element".into());
        }
        let Some(lt) = rest.find('<') else {
            if stack.is_empty() {
                break;
            }
            return Err("text outside tags at the end".into());
        };
        if stack.is_empty() && !rest[..lt].trim().is_empty() {
            return Err("text before the root element".into());
        }
        let after = &rest[lt + 1..];
        let gt = after.find('>').ok_or("unclosed tag")?;
        let tag = &after[..gt];
        if tag.matches('"').count() % 2 != 0 {
            return Err(format!("unbalanced quotes in <{tag}>"));
        }
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack.pop().ok_or("close without open")?;
            if open != name.trim() {
                return Err(format!("</{name}> closes <{open}>"));
            }
            root_done = stack.is_empty();
        } else if !tag.starts_with('!') && !tag.starts_with('?') {
            let name = tag
                .split(|c: char| c.is_whitespace() || c == '/')
                .next()
                .unwrap_or("")
                .to_owned();
            if stack.is_empty() && name != "svg" {
                return Err(format!("the root is <{name}>, not <svg>"));
            }
            if !tag.ends_with('/') {
                stack.push(name);
            } else {
                root_done = stack.is_empty();
            }
        }
        rest = &after[gt + 1..];
    }
    if !stack.is_empty() || !root_done {
        return Err(format!("unclosed elements: {stack:?}"));
    }
    Ok(())
}

#[test]
fn the_svg_check_can_fail() {
    assert!(well_formed_svg("<svg a=\"1\"><g><rect/></g></svg>").is_ok());
    for bad in [
        "<svg><g></svg>",
        "<svg a=\"1><g/></svg>",
        "<html></html>",
        "<svg></svg><svg></svg>",
        "<svg><g>",
    ] {
        assert!(well_formed_svg(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_quick_evaluation_reports_what_the_interfaces_counted() {
    if !can_run("a_quick_evaluation_reports_what_the_interfaces_counted") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for round in 0..2 {
        let out = dir.path().join(format!("run{round}"));
        let t = Instant::now();
        let o = evaluate(&out, "pct");
        assert!(
            o.status.success(),
            "run {round}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        eprintln!("run {round}: {:.1} s", t.elapsed().as_secs_f64());
        assert!(namespaces("pct").is_empty(), "namespaces left behind");
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
        let runs = r["strategies"].as_array().unwrap();
        let names: Vec<&str> = runs
            .iter()
            .map(|s| s["strategy"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["precopy", "pagecast"]);
        for s in runs {
            let links = s["bytes_by_link"].as_object().unwrap();
            let tx = |n: &str| links[n]["tx"].as_u64().unwrap();
            // The sources are rack A's hosts; the core is fed by the uplinks.
            assert_eq!(
                s["source_bytes"].as_u64().unwrap(),
                tx("host:a1") + tx("host:a2"),
                "{s}"
            );
            assert_eq!(
                s["core_bytes"].as_u64().unwrap(),
                tx("uplink:A") + tx("uplink:B"),
                "{s}"
            );
            // The counters include every packet's headers: at least what
            // the command counted as sent, and not far above it.
            let measured = s["source_bytes"].as_f64().unwrap();
            let reported = s["reported_source_bytes"].as_f64().unwrap();
            assert!(
                measured >= reported && measured <= reported * 1.15,
                "{}: counters {measured}, the command {reported}",
                s["strategy"]
            );
            // What left rack A arrived in rack B (but the index's and the
            // operator's share, in the core).
            let rx_b = links["uplink:B"]["rx"].as_f64().unwrap();
            assert!(rx_b >= tx("uplink:A") as f64 * 0.95, "{s}");
            let vms = s["vms"].as_array().unwrap();
            assert_eq!(vms.len(), 4);
            assert!(vms.iter().all(|v| v["verified"] == true), "{s}");
            assert!(s["predicted"]["source_bytes"].as_f64().unwrap() > 0.0);
            // Every VM's phases, in time order, ending done.
            let phases = s["phases"].as_object().unwrap();
            assert_eq!(phases.len(), 4, "{s}");
            for (vm, list) in phases {
                let list = list.as_array().unwrap();
                let at: Vec<f64> = list.iter().map(|p| p["at_s"].as_f64().unwrap()).collect();
                assert!(at.windows(2).all(|w| w[0] <= w[1]), "{vm}: {list:?}");
                assert_eq!(list.last().unwrap()["phase"], "done", "{vm}: {list:?}");
            }
        }
        for svg in [
            "bytes.svg",
            "downtime.svg",
            "predicted.svg",
            "timeline-precopy.svg",
            "timeline-pagecast.svg",
        ] {
            let text = std::fs::read_to_string(out.join(svg)).unwrap();
            if let Err(e) = well_formed_svg(&text) {
                panic!("{svg}: {e}");
            }
            assert!(text.contains("<rect"), "{svg} draws no bars");
        }
        let md = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(
            md.contains("| precopy |") && md.contains("| pagecast |"),
            "{md}"
        );
    }
}

#[test]
fn ctrl_c_stops_everything_and_removes_the_namespaces() {
    if !can_run("ctrl_c_stops_everything_and_removes_the_namespaces") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(evaluate_bin())
        .args(["--quick", "--prefix", "pci", "--topology"])
        .arg(repo_root().join("docs/examples/eval.toml"))
        .arg("--out")
        .arg(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the first cluster is up.
    let t = Instant::now();
    while namespaces("pci").len() < 7 && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: SIGINT to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "evaluate did not stop within 60 s of Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    assert!(namespaces("pci").is_empty(), "namespaces left behind");
    let left = Command::new("pgrep")
        .args(["-f", &dir.path().display().to_string()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

/// Two evacuations at once (racks A and C onto rack B, whose links are
/// half the sources'), each first alone on a fresh cluster: both move
/// every VM verified, and neither starves where they meet on B's links:
/// each takes at most three times as long as alone (two jobs sharing a
/// link fairly take about twice as long; one starved waits for the other).
#[test]
fn two_evacuations_at_once_share_the_links_they_meet_on() {
    if !can_run("two_evacuations_at_once_share_the_links_they_meet_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("together");
    let prefix = format!("pcj{}", std::process::id() % 10_000);
    let run = Command::new(evaluate_bin())
        .args(["--quick", "--prefix", &prefix, "--topology"])
        .arg(repo_root().join("docs/examples/eval-two-jobs.toml"))
        .arg("--out")
        .arg(&out)
        .args(["--together", "a1,a2=b1,b2", "--together", "c1,c2=b1,b2"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "pagecast-evaluate --together failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(namespaces(&prefix).is_empty(), "namespaces left behind");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let jobs = report["together"].as_array().unwrap();
    assert_eq!(jobs.len(), 2, "{report:#}");
    for j in jobs {
        assert_eq!(j["alone_ok"], true, "{j}");
        assert_eq!(j["together_ok"], true, "{j}");
        let (alone, together) = (
            j["alone_s"].as_f64().unwrap(),
            j["together_s"].as_f64().unwrap(),
        );
        println!(
            "job {}: {alone:.2} s alone, {together:.2} s together",
            j["from"]
        );
        assert!(alone > 0.0 && together > 0.0, "{j}");
        assert!(
            together < 3.0 * alone,
            "job {} took {together:.2} s beside the other, {alone:.2} s alone",
            j["from"]
        );
    }
}
