//! Compiles the seccomp policies (`seccomp/x86_64.json`, seccompiler's JSON format) into BPF
//! at build time; the monitor installs them without parsing anything at run time.

use std::fmt::Write as _;

fn main() {
    let policy = "seccomp/x86_64.json";
    println!("cargo:rerun-if-changed={policy}");
    let file = std::fs::File::open(policy).unwrap_or_else(|e| panic!("{policy}: {e}"));
    let map = seccompiler::compile_from_json(file, seccompiler::TargetArch::x86_64)
        .unwrap_or_else(|e| panic!("{policy}: {e}"));
    let mut roles: Vec<_> = map.into_iter().collect();
    roles.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::from(
        "/// (role, BPF program) for each thread role, from the policy file.\npub static POLICIES: &[(&str, &[Insn])] = &[\n",
    );
    for (role, prog) in roles {
        let _ = write!(out, "    ({role:?}, &[");
        for i in prog {
            let _ = write!(out, "({}, {}, {}, {}),", i.code, i.jt, i.jf, i.k);
        }
        out.push_str("]),\n");
    }
    out.push_str("];\n");
    let dest =
        std::path::Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("policies.rs");
    std::fs::write(dest, out).expect("writing policies.rs");
}
