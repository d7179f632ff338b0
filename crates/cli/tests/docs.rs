//! The docs must stay true: paths they name exist, and README's test command is what CI runs.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// Backquoted tokens that look like repository paths.
fn named_paths(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|t| {
            !t.contains(' ')
                && !t.contains('*')
                && !t.starts_with('/')
                && !t.starts_with("../")
                && [
                    "crates/",
                    "tests/",
                    "docs/",
                    "examples/",
                    "bench/",
                    "fuzz/",
                    ".ci/",
                ]
                .iter()
                .any(|p| t.starts_with(p))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn docs_name_only_paths_that_exist() {
    let mut missing = Vec::new();
    let mut checked = 0;
    for doc in [
        "README.md",
        "docs/architecture.md",
        "docs/testing.md",
        "docs/payload-abi.md",
    ] {
        let text = std::fs::read_to_string(root().join(doc)).unwrap();
        for p in named_paths(&text) {
            checked += 1;
            let p = p.trim_end_matches(['/', ',', '.', ':']);
            if !root().join(p).exists() {
                missing.push(format!("{doc}: {p}"));
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} paths found: is the extractor broken?"
    );
    assert!(
        missing.is_empty(),
        "docs name missing paths:\n{}",
        missing.join("\n")
    );
}

#[test]
fn readme_test_command_is_what_ci_runs() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    let blocks: Vec<&str> = readme
        .split("```sh\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    let test_cmd = blocks
        .iter()
        .map(|b| b.trim())
        .find(|b| b.contains("cargo test"))
        .expect("README has a test command");
    assert!(
        ci.lines().any(|l| l.trim() == test_cmd),
        "README's test command `{test_cmd}` is not a line of .ci/run"
    );
}
