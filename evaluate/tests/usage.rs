//! The harness's command line, without a network: what `--help` promises
//! and how bad arguments fail (one line, before anything is built).

use std::process::Command;

fn evaluate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pagecast-evaluate"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn help_names_every_flag_scripts_use() {
    let o = evaluate(&["--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--topology",
        "--out",
        "--strategies",
        "--clone",
        "--quick",
        "--loss",
        "--flood",
        "--prefix",
        "--pagecast",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn bad_arguments_fail_with_one_line_and_build_nothing() {
    let dir = std::env::temp_dir().join(format!("pce-usage-{}", std::process::id()));
    let out = dir.join("out");
    let out_s = out.to_str().unwrap();
    // A topology file that does not exist.
    let o = evaluate(&["--topology", "/nonexistent/eval.toml", "--out", out_s]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("/nonexistent/eval.toml"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        !out.exists(),
        "nothing is created before the arguments hold"
    );
    // A loss rate out of range is refused by the parser.
    let o = evaluate(&["--topology", "x.toml", "--out", out_s, "--loss", "90"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--loss"));
    let _ = std::fs::remove_dir_all(&dir);
}
