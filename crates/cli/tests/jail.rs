//! The jail of every monitor (`crates/sandbox`), on real processes and real KVM: what a jailed
//! monitor can see and do, checked from inside (the debug-build probe hook,
//! `BULWARK_JAIL_PROBE`) and from the host (`/proc`, the cgroup).

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `probe NAME: OUTCOME` lines of a probe run.
fn probes(out: &str) -> std::collections::BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("probe "))
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn a_jailed_monitor_sees_only_its_own_paths_and_holds_no_privilege() {
    require_kvm();
    let t = TestDir::new("jail-probe");
    let payload = build_payload(&t, "tests/payloads/tally.c");
    let (rw, ro) = (t.path("rw.img"), t.path("ro.img"));
    std::fs::write(&rw, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&ro, vec![0u8; 1 << 20]).unwrap();
    let o = Command::new(bulwark())
        .env("BULWARK_JAIL_PROBE", "1")
        .args(["run", "--payload"])
        .arg(&payload)
        .arg("--drive")
        .arg(&rw)
        .arg("--drive")
        .arg(format!("path={},ro=on", ro.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    let p = probes(&out);
    let get = |k: &str| {
        p.get(k)
            .unwrap_or_else(|| panic!("no probe {k}: {out}"))
            .as_str()
    };
    // The host's files are not there, and nothing can be made or mounted.
    assert_eq!(
        get("read-host-file"),
        "denied (2)",
        "ENOENT: /etc is not in the jail"
    );
    assert_eq!(
        get("read-host-kvm-module"),
        "denied (2)",
        "/sys is not in the jail"
    );
    // EROFS from the read-only root, or EACCES from Landlock, whichever the kernel checks first.
    let refused = |v: &str| v == "denied (30)" || v == "denied (13)";
    assert!(refused(get("write-root")), "{out}");
    assert_eq!(get("mount"), "denied (1)", "EPERM: no CAP_SYS_ADMIN");
    // An empty network namespace: not even loopback is up.
    assert!(get("tcp-connect").starts_with("denied"), "{out}");
    // No capability in any set, and no way to gain one.
    assert_eq!(get("capabilities"), "0x0");
    // What the monitor needs still works: random numbers (snapshot keys).
    assert_eq!(get("random"), "allowed");
    assert_eq!(get("NoNewPrivs"), "1");
    assert_eq!(get("CapBnd"), "0000000000000000");
    assert_eq!(get("CapAmb"), "0000000000000000");
    // Its own PID namespace: it is PID 1 and sees no other process but the launcher of its
    // drives' back-ends (forked at once, before the VM is built).
    assert_eq!(get("pid"), "1");
    assert_eq!(get("processes"), "1,2");
    // The root holds /dev (its devices), /proc, and the path to its drives: nothing else.
    let top = rw
        .components()
        .nth(1)
        .unwrap()
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    let mut want = vec!["dev".to_string(), "proc".to_string(), top];
    want.sort();
    want.dedup();
    // With Landlock the root cannot even be listed (no rule grants reading `/` itself).
    if get("landlock").starts_with("ABI") {
        assert_eq!(get("root"), "denied (13)", "{out}");
    } else {
        assert_eq!(get("root"), want.join(","), "{out}");
    }
    // Its drives, at their own paths: the writable one writable, the read-only one not.
    assert_eq!(get(&format!("bind {}", rw.display())), "allowed");
    assert!(refused(get(&format!("bind {}", ro.display()))), "{out}");
    // Landlock, where the kernel has it, confines the same paths again.
    assert!(
        get("landlock").starts_with("ABI") || get("landlock").starts_with("not available"),
        "{out}"
    );
    // Its cgroup namespace hides where its cgroup is on the host.
    assert!(
        get("cgroup").split_whitespace().all(|l| l.ends_with(":/")),
        "{out}"
    );
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

/// The cgroup directories of the jail of the monitor whose outer process is `pid`.
fn cgroup_dirs(pid: u32) -> Vec<std::path::PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let name = format!("vm-{pid}");
    if root.join("cgroup.controllers").exists() {
        vec![root.join("bulwark").join(name)]
    } else {
        ["cpu", "memory", "pids"]
            .iter()
            .map(|c| root.join(c).join("bulwark").join(&name))
            .collect()
    }
}

#[test]
fn a_jailed_vm_runs_in_its_own_namespaces_and_cgroup_which_go_when_it_ends() {
    require_kvm();
    let t = TestDir::new("jail-host-view");
    let payload = build_payload(&t, "tests/payloads/tally.c");
    let mut child = Command::new(bulwark())
        .args(["run", "--memory", "16M", "--payload"])
        .arg(&payload)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let outer = child.id();
    // The outer process waits; the monitor is its child, in the jail.
    let deadline = Instant::now() + Duration::from_secs(20);
    let inner = loop {
        if let Some(&c) = children(outer).first() {
            break c;
        }
        assert!(Instant::now() < deadline, "no jailed monitor appeared");
        std::thread::sleep(Duration::from_millis(10));
    };
    // Until the jail is complete (no_new_privs is among the last steps).
    while status_field(inner, "NoNewPrivs:") != "1" {
        assert!(
            Instant::now() < deadline,
            "the monitor never finished its jail"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let ns = |pid: u32, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
    for kind in ["mnt", "pid_for_children", "net", "ipc", "uts", "cgroup"] {
        let host = ns(std::process::id(), kind);
        let kind_inner = if kind == "pid_for_children" {
            "pid"
        } else {
            kind
        };
        assert_ne!(
            ns(inner, kind_inner),
            host,
            "{kind} namespace shared with the host"
        );
    }
    assert_eq!(status_field(inner, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(inner, "NoNewPrivs:"), "1");
    // Not dumpable: /proc/PID/mem of the monitor is closed to other processes of its user
    // (root here still reads it: the test of issue 7's secrecy scan relies on that).
    let dirs = cgroup_dirs(outer);
    let memory = dirs
        .iter()
        .find_map(|d| {
            std::fs::read_to_string(d.join("memory.max"))
                .or_else(|_| std::fs::read_to_string(d.join("memory.limit_in_bytes")))
                .ok()
        })
        .expect("a memory limit in the monitor's cgroup");
    assert_eq!(memory.trim(), ((16u64 << 20) + (512 << 20)).to_string());
    let pids = dirs
        .iter()
        .find_map(|d| std::fs::read_to_string(d.join("pids.max")).ok())
        .expect("a pids limit");
    assert_eq!(pids.trim(), "68");
    let procs: String = dirs
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .collect();
    assert!(
        procs.split_whitespace().any(|p| p == inner.to_string()),
        "the monitor is not in its cgroup: {procs}"
    );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hi\nexit\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "the guest's status comes through");
    assert!(stdout(&o).contains("line 1: HI"));
    for d in &dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}

#[test]
fn no_jail_runs_but_says_loudly_that_it_is_less_safe() {
    require_kvm();
    let t = TestDir::new("jail-none");
    let payload = build_payload(&t, "tests/payloads/tally.c");
    let o = Command::new(bulwark())
        .args(["run", "--no-jail", "--payload"])
        .arg(&payload)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(stderr(&o).contains("WARNING: --no-jail"), "{}", stderr(&o));
}

#[test]
fn seccomp_stops_a_monitor_whose_thread_makes_a_call_its_role_forbids_and_says_which() {
    require_kvm();
    let t = TestDir::new("jail-seccomp");
    let payload = build_payload(&t, "tests/payloads/tally.c");
    let probe = |spec: &str| {
        Command::new(bulwark())
            .env("BULWARK_JAIL_PROBE", spec)
            .args(["run", "--payload"])
            .arg(&payload)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // A call the role needs goes through (the probe then reports it and exits 0).
    let o = probe("seccomp:main:39");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("probe seccomp 39: returned"),
        "{}",
        stdout(&o)
    );
    // vCPU and device threads cannot open files: the call fails (EACCES) without stopping
    // the VM, since glibc itself tries once and copes.
    for role in ["vcpu", "device"] {
        let o = probe(&format!("seccomp:{role}:257"));
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert!(
            stdout(&o).contains("probe seccomp 257: failed (13)"),
            "{}",
            stdout(&o)
        );
    }
    for (role, nr, name) in [
        ("vcpu", 101, "ptrace"),
        ("vcpu", 2, "open"),
        ("device", 41, "socket"),
        ("device", 59, "execve"),
        ("main", 165, "mount"),
        ("main", 56, "clone"),
        ("lazy", 42, "connect"),
    ] {
        let o = probe(&format!("seccomp:{role}:{nr}"));
        assert_eq!(o.status.code(), Some(159), "{role} {name}: {}", stderr(&o));
        let want = format!("the {role} thread made the forbidden system call {nr} ({name}, args");
        assert!(stderr(&o).contains(&want), "{role} {name}: {}", stderr(&o));
        assert!(
            !stdout(&o).contains("probe seccomp"),
            "{role} {name} went through"
        );
    }
    // Under bulwarkd the report reaches the control plane: exit.json names the call.
    let dir = t.path("vm");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = serde_json::json!({ "payload": payload, "memory": "8M" });
    std::fs::write(dir.join("spec.json"), spec.to_string()).unwrap();
    let o = Command::new(bulwark())
        .env("BULWARK_JAIL_PROBE", "seccomp:vcpu:101")
        .args(["monitor", "--dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(159), "{}", stderr(&o));
    let exit: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("exit.json")).unwrap()).unwrap();
    let reason = exit["reason"].as_str().unwrap();
    assert!(
        reason.contains("seccomp") && reason.contains("101 (ptrace") && reason.contains("vcpu"),
        "{exit}"
    );
    assert_eq!(exit["clean"], false);
}
