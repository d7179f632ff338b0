//! The hostile-payload suite: every file in `tests/hostile/` is an attack on the monitor with
//! its expected outcome in `// key: value` header lines:
//!
//! * `args:` extra `bulwark run` flags
//! * `exit:` the expected exit status
//! * `stderr:` / `stdout:` a substring that must appear (repeatable)
//! * `stderr-any:` `A | B`: one of the alternatives must appear in stderr (for behaviour that
//!   differs between hardware virtualization and kvm_pvm, each alternative a clean report)
//! * `stdout-bytes:` exact number of bytes on stdout
//! * `stats:` a `key=value` prefix that must appear in the `--stats` line
//!
//! Whatever the payload does, the monitor must end with the expected, explained outcome.

mod common;

use common::*;

#[derive(Default, Debug)]
struct Expect {
    args: Vec<String>,
    exit: Option<i32>,
    stderr: Vec<String>,
    stderr_any: Vec<Vec<String>>,
    stdout: Vec<String>,
    stdout_bytes: Option<usize>,
    stats: Vec<String>,
}

fn parse_expect(src: &str) -> Expect {
    let mut e = Expect::default();
    for line in src.lines() {
        let Some(rest) = line.trim().strip_prefix("//") else {
            continue;
        };
        let Some((key, value)) = rest.trim().split_once(':') else {
            continue;
        };
        let value = value.trim().to_string();
        match key.trim() {
            "args" => e.args = value.split_whitespace().map(str::to_string).collect(),
            "exit" => e.exit = Some(value.parse().unwrap()),
            "stderr" => e.stderr.push(value),
            "stderr-any" => e
                .stderr_any
                .push(value.split('|').map(|a| a.trim().to_string()).collect()),
            "stdout" => e.stdout.push(value),
            "stdout-bytes" => e.stdout_bytes = Some(value.parse().unwrap()),
            "stats" => e.stats.push(value),
            _ => {}
        }
    }
    e
}

#[test]
fn hostile_payloads_end_with_expected_outcome() {
    require_kvm();
    let dir = TestDir::new("hostile");
    let mut files: Vec<_> = std::fs::read_dir(repo_root().join("tests/hostile"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "S"))
        .collect();
    files.sort();
    assert!(files.len() >= 15, "the suite has {} payloads", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let src = std::fs::read_to_string(path).unwrap();
        let exp = parse_expect(&src);
        assert!(exp.exit.is_some(), "{name}: no `// exit:` line");
        let payload = build_payload(&dir, &format!("tests/hostile/{name}"));
        let mut args: Vec<&str> = exp.args.iter().map(String::as_str).collect();
        if !exp.args.iter().any(|a| a == "--timeout") {
            args.extend(["--timeout", "20s"]);
        }
        let o = run_payload(&payload, &args, b"");
        let (out, err) = (stdout(&o), stderr(&o));
        let mut why = Vec::new();
        if o.status.code() != exp.exit {
            why.push(format!(
                "exit {:?}, expected {:?}",
                o.status.code(),
                exp.exit
            ));
        }
        for s in &exp.stderr {
            if !err.contains(s.as_str()) {
                why.push(format!("stderr lacks `{s}`"));
            }
        }
        for alts in &exp.stderr_any {
            if !alts.iter().any(|a| err.contains(a.as_str())) {
                why.push(format!("stderr has none of {alts:?}"));
            }
        }
        for s in &exp.stdout {
            if !out.contains(s.as_str()) {
                why.push(format!("stdout lacks `{s}`"));
            }
        }
        if let Some(n) = exp.stdout_bytes
            && o.stdout.len() != n
        {
            why.push(format!("stdout has {} bytes, expected {n}", o.stdout.len()));
        }
        let stats_line = err.lines().find(|l| l.contains("stats:")).unwrap_or("");
        for s in &exp.stats {
            if !stats_line.contains(s.as_str()) {
                why.push(format!("stats lack `{s}`"));
            }
        }
        if err.contains("panicked") {
            why.push("the monitor panicked".into());
        }
        if !why.is_empty() {
            failures.push(format!("{name}: {}\n--- stderr:\n{err}", why.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
