//! The `pagecast` command line: exit statuses and one-line errors.

use std::process::Command;

fn pagecast(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pagecast"))
        .args(args)
        .output()
        .expect("run pagecast")
}

#[test]
fn bad_images_give_one_line_errors_and_fail() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("odd.raw"), vec![7u8; 4097]).unwrap();
    std::fs::write(d.join("empty.raw"), b"").unwrap();
    std::fs::write(d.join("good.raw"), vec![7u8; 8192]).unwrap();
    std::fs::create_dir(d.join("dir.raw")).unwrap();
    let cases = [
        (
            "odd.raw",
            "length 4097 bytes is not a multiple of the 4096-byte page size",
        ),
        ("empty.raw", "empty file"),
        ("dir.raw", "is a directory"),
        ("missing.raw", "cannot open"),
    ];
    for (name, want) in cases {
        let path = d.join(name);
        let good = d.join("good.raw");
        // Alone, and after a good image: nothing is hashed before the check.
        for args in [
            vec!["scan", path.to_str().unwrap()],
            vec!["scan", good.to_str().unwrap(), path.to_str().unwrap()],
        ] {
            let out = pagecast(&args);
            assert_eq!(out.status.code(), Some(1), "{args:?}");
            let err = String::from_utf8(out.stderr).unwrap();
            assert_eq!(err.lines().count(), 1, "one line: {err:?}");
            assert!(err.starts_with("error: "), "{err:?}");
            assert!(
                err.contains(name) && err.contains(want),
                "{err:?} should name {name} and say {want:?}"
            );
            assert!(!err.contains("panicked"), "{err:?}");
            assert!(out.stdout.is_empty());
        }
    }
}

#[test]
fn scan_prints_a_table_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    let mut bytes = vec![0u8; 4 * 4096];
    bytes[4096] = 1;
    bytes[2 * 4096] = 1;
    std::fs::write(&img, &bytes).unwrap();
    let out = pagecast(&["scan", img.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("DISTINCT") && text.contains("GB/s"), "{text}");
    let out = pagecast(&["scan", "--json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["images"][0]["zero"], 2);
    assert_eq!(v["images"][0]["distinct"], 1);
    assert_eq!(v["images"][0]["duplicates"], 1);
}

#[test]
fn usage_errors_fail_and_help_has_examples() {
    assert_eq!(pagecast(&["scan"]).status.code(), Some(2));
    assert_eq!(pagecast(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(
        pagecast(&["--threads", "0", "scan", "x"]).status.code(),
        Some(1)
    );
    for cmd in ["scan", "synth"] {
        let out = pagecast(&[cmd, "--help"]);
        assert!(out.status.success());
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(
            help.contains("Example:") && help.contains(&format!("pagecast {cmd}")),
            "{cmd}: {help}"
        );
    }
}

/// `cast send --expect` names each receiver once, as many as
/// `--receivers`: otherwise one line says what is wrong, before anything
/// is read or hashed.
#[test]
fn cast_send_refuses_an_expect_that_does_not_name_each_receiver_once() {
    let cases = [
        ("a,b", "3", "names 2 receivers and --receivers says 3"),
        ("a,b,a", "3", "names \"a\" twice"),
        ("a,", "2", "empty name"),
    ];
    for (expect, n, want) in cases {
        let out = pagecast(&[
            "cast",
            "send",
            "--group",
            "239.1.1.1:7000",
            "--iface",
            "127.0.0.1",
            "--control",
            "127.0.0.1:1",
            "--receivers",
            n,
            "--expect",
            expect,
            "--tls",
            "/nonexistent",
            "/nonexistent.raw",
        ]);
        assert_eq!(out.status.code(), Some(1), "{expect}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(want), "{expect}: {err}");
    }
}
