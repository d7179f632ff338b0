//! Introspection of a stock Debian guest under bulwarkd, in one nested-rig boot (real kvm_amd
//! on QEMU's emulated SVM): the owner lists the guest kernel's processes and modules from
//! outside, with nothing but the image's System.map and vmlinux as the kernel's profile; the
//! operator may not; cross-view against the guest agent is clean on a clean guest, also across
//! loading and unloading a benign module, and flags a process a real kernel module
//! (`tests/vmi-attacks/hide_pid.c`) unlinked from the task list. "host" below is the rig's L1.
//!
//! The attack modules are built here for the image's kernel release, which needs that
//! release's `linux-headers-*` package (`.ci/run` installs it).

use std::path::Path;
use std::process::Command;

use crate::common::*;
use crate::section_status;
use bulwark_testrig::{GuestImage, RigRun, RigSpec};

const OWNER: &str = "owner-token-of-the-vmi-test-vm";
/// Where the image puts the attack modules in the guest.
const MODDIR: &str = "/lib/vmi-attacks";
const MODULES: &[&str] = &[
    "benign",
    "hide_pid",
    "hook_syscall",
    "patch_text",
    "hide_module",
];

/// The kernel release an image boots, from its manifest.
fn kernel_release(image: &Path) -> String {
    let text = std::fs::read_to_string(image.join("manifest.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["kernel"]["release"].as_str().unwrap().to_string()
}

/// Builds the attack modules for `kver` into `out`.
fn build_modules(kver: &str, out: &Path) {
    let o = Command::new(repo_root().join("tests/vmi-attacks/build.sh"))
        .args([kver, out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "building the attack modules for {kver} failed (install linux-headers-{kver}, as .ci/run does): {}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
}

fn script() -> String {
    format!(
        r#"set -u
mkdir -p /var/lib/bulwark
bulwarkd --state-dir /var/lib/bulwark > /tmp/bulwarkd.log 2>&1 &
i=0; while [ ! -S /var/lib/bulwark/bulwarkd.sock ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
export BULWARK_SOCKET=/var/lib/bulwark/bulwarkd.sock
OP="--token-file /var/lib/bulwark/operator.token"
OWN="--token {OWNER}"
cat > /tmp/vm.toml <<'EOF'
image = "/images/vmi"
memory = "192M"
introspection = true
command = ["sh", "-c", "sleep 100000 & sleep 100001 & exec sleep 100002"]
[vsock]
socket = "/tmp/vm.vsock"
EOF
cat > /tmp/plain.toml <<'EOF'
image = "/images/vmi"
memory = "128M"
command = ["sleep", "100000"]
EOF
# Waits until the guest agent answers (the guest is up).
up() {{ i=0; while ! bulwark vm $OWN exec vm -- true 2>/dev/null && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done; }}

section start
bulwark vm $OP create vm --config /tmp/vm.toml --owner-token {OWNER} && bulwark vm $OP start vm; echo start=$?
up; bulwark vm $OWN exec vm -- uname -r; echo exec=$?
echo status=0

section ps
bulwark vm $OWN vmi ps vm; echo vmi-ps=$?
bulwark vm $OWN vmi ps vm --json | tr -d ' \n'; echo
bulwark vm $OP vmi ps vm; echo operator-vmi=$?
echo status=0

section modules
bulwark vmi $OWN modules vm; echo vmi-modules=$?
echo agent-modules: $(bulwark vm $OWN exec vm -- cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')
echo vmi-modules: $(bulwark vm $OWN vmi modules vm --json | grep '"name"' | cut -d'"' -f4 | sort | tr '\n' ' ')
echo status=0

section xview_clean
bulwark vm $OWN vmi baseline vm; echo baseline=$?
bulwark vm $OWN vmi xview vm; echo xview=$?
bulwark vm $OWN exec vm -- insmod {MODDIR}/benign.ko; echo insmod-benign=$?
bulwark vm $OWN vmi modules vm | grep -c '^benign '; echo benign-listed=$?
bulwark vm $OWN vmi xview vm; echo xview-benign=$?
bulwark vm $OWN exec vm -- rmmod benign; echo rmmod-benign=$?
bulwark vm $OWN vmi modules vm | grep -c '^benign '; echo benign-gone=$?
bulwark vm $OWN vmi xview vm; echo xview-after=$?
for i in 1 2 3; do bulwark vm $OWN exec vm -- sh -c 'ls -R /sys > /dev/null; cat /proc/*/stat > /dev/null; echo x | nc -w 1 127.0.0.1 9 2>/dev/null; true'; done
bulwark vm $OWN vmi check vm; echo check-clean=$?
bulwark vm $OWN vmi protect vm; echo protect=$?
bulwark vm $OWN exec vm -- sh -c 'insmod {MODDIR}/benign.ko && rmmod benign && ls -R /sys > /dev/null'; echo benign-again=$?
bulwark vm $OWN vmi traps vm; echo traps-clean=$?
echo status=0

section hook_syscall
bulwark vm $OWN exec vm -- insmod {MODDIR}/hook_syscall.ko; echo insmod-hook=$?
bulwark vm $OWN exec vm -- sh -c "dmesg | grep vmi-attack: | tail -n 1"
bulwark vm $OWN vmi check vm; echo check-hooked=$?
bulwark vm $OWN vmi traps vm; echo traps-hooked=$?
bulwark vm $OWN exec vm -- rmmod hook_syscall; echo rmmod-hook=$?
bulwark vm $OWN vmi check vm; echo check-unhooked=$?
echo status=0

section patch_text
bulwark vm $OWN exec vm -- insmod {MODDIR}/patch_text.ko; echo insmod-patch=$?
bulwark vm $OWN exec vm -- sh -c "dmesg | grep vmi-attack: | tail -n 1"
bulwark vm $OWN vmi check vm; echo check-patched=$?
bulwark vm $OWN vmi traps vm | grep 'in module patch_text'; echo traps-patched=$?
# Now writes pause the VM before they land: the module's restore of the byte is stopped.
bulwark vm $OWN vmi protect vm --pause; echo protect-pause=$?
(bulwark vm $OWN exec vm -- rmmod patch_text; echo rmmod-patch=$?; touch /tmp/rmmod.done) > /tmp/rmmod.out 2>&1 &
i=0; while ! bulwark vm $OWN describe vm --json | tr -d ' \n' | grep -q '"state":"paused"' && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
bulwark vm $OWN describe vm --json | tr -d ' \n' | grep -q '"state":"paused"'; echo paused-by-write=$?
bulwark vm $OWN vmi traps vm | grep 'dropped, VM paused'
bulwark vm $OWN vmi check vm | grep kernel_text; echo check-while-paused=$?
# Writes land again (the rest of the unload may write too), then the guest goes on.
bulwark vm $OWN vmi protect vm; echo protect-again=$?
bulwark vm $OP resume vm; echo resume=$?
i=0; while [ ! -e /tmp/rmmod.done ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done
cat /tmp/rmmod.out
bulwark vm $OWN describe vm --json | tr -d ' \n' | grep -o '"state":"[a-z]*"' | head -n 1
bulwark vm $OWN vmi ps vm | grep -e rmmod -e insmod
bulwark vm $OWN vmi traps vm | tail -n 5
echo status=0

section hide_module
bulwark vm $OWN exec vm -- insmod {MODDIR}/hide_module.ko; echo insmod-hidemod=$?
bulwark vm $OWN exec vm -- sh -c "dmesg | grep vmi-attack: | tail -n 1"
bulwark vm $OWN exec vm -- cat /proc/modules | grep -c hide_module; echo lsmod-sees=$?
bulwark vm $OWN vmi modules vm | grep -c hide_module; echo vmi-modules-sees=$?
bulwark vm $OWN vmi check vm; echo check-hidden=$?
echo status=0

section hide_pid
victim=$(bulwark vm $OWN exec vm -- sh -c 'sleep 77777 >/dev/null 2>&1 & echo $!')
echo victim=$victim
bulwark vm $OWN exec vm -- insmod {MODDIR}/hide_pid.ko pid=$victim; echo insmod-hide=$?
bulwark vm $OWN exec vm -- sh -c "dmesg | grep vmi-attack: | tail -n 2"
bulwark vm $OWN exec vm -- ps | grep -c 77777; echo agent-sees=$?
bulwark vm $OWN vmi ps vm | grep -c 77777; echo vmi-sees=$?
bulwark vm $OWN vmi xview vm; echo xview=$?
echo status=0

section trace
bulwark vmi $OWN trace vm; echo trace=$?
bulwark vmi $OWN trace vm --symbol __x64_sys_getppid; echo trace2=$?
for p in /bin/true /bin/ls /bin/uname; do bulwark vm $OWN exec vm -- $p > /dev/null; done; echo execs=$?
bulwark vm $OWN exec vm -- sh -c 'echo $PPID' > /dev/null
bulwark vmi $OWN hits vm; echo hits=$?
bulwark vmi $OWN check vm | grep ALERT
bulwark vmi $OWN untrace vm --symbol __x64_sys_getppid; echo untrace1=$?
bulwark vmi $OWN untrace vm --symbol __x64_sys_getppid; echo untrace1-again=$?
bulwark vmi $OWN untrace vm; echo untrace=$?
bulwark vm $OWN exec vm -- /bin/true; echo exec-after=$?
bulwark vmi $OWN hits vm | head -n 1
bulwark vmi $OWN trace vm --symbol no_such_function; echo trace-bad=$?
echo status=0

section forbidden
bulwark vm $OP create plain --config /tmp/plain.toml --owner-token {OWNER} && bulwark vm $OP start plain; echo start=$?
bulwark vm $OWN vmi ps plain; echo plain-vmi=$?
bulwark vm $OP kill plain
bulwark vm $OP describe vm --json | tr -d ' \n'; echo
echo status=0

section other_kernel
bulwark vm $OP kill vm > /dev/null
sed -e 's|/images/vmi|/images/k612|' -e 's|/tmp/vm.vsock|/tmp/k612.vsock|' /tmp/vm.toml > /tmp/k612.toml
bulwark vm $OP create k612 --config /tmp/k612.toml --owner-token {OWNER} && bulwark vm $OP start k612; echo start=$?
i=0; while ! bulwark vm $OWN exec k612 -- true 2>/dev/null && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done
echo guest-release: $(bulwark vm $OWN exec k612 -- uname -r)
bulwark vm $OWN vmi ps k612; echo vmi-ps=$?
echo agent-modules: $(bulwark vm $OWN exec k612 -- cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')
echo vmi-modules: $(bulwark vm $OWN vmi modules k612 --json | grep '"name"' | cut -d'"' -f4 | sort | tr '\n' ' ')
bulwark vm $OWN vmi xview k612; echo xview=$?
bulwark vm $OWN vmi baseline k612; echo baseline=$?
bulwark vm $OWN exec k612 -- sh -c 'ls -R /sys > /dev/null; cat /proc/*/stat > /dev/null'
bulwark vm $OWN vmi check k612; echo check=$?
bulwark vmi $OWN trace k612; echo trace=$?
bulwark vm $OWN exec k612 -- /bin/uname > /dev/null
bulwark vmi $OWN hits k612; echo hits=$?
bulwark vm $OP kill k612 > /dev/null
echo status=0

section daemon_log
cat /tmp/bulwarkd.log
echo status=0
"#
    )
}

/// This file's rig boot: the rig and its script, for [`crate::rig_run`].
pub(crate) fn rig_spec() -> (RigSpec, String) {
    let plain = build_image("test-image", &[]);
    let kver = kernel_release(&plain);
    let tmp = TestDir::new("vmi-attack-modules");
    let mods = tmp.path("ko");
    build_modules(&kver, &mods);
    let adds: Vec<String> = MODULES
        .iter()
        .map(|m| format!("{}/{m}.ko:{MODDIR}/{m}.ko", mods.display()))
        .flat_map(|a| ["--add".to_string(), a])
        .collect();
    let adds: Vec<&str> = adds.iter().map(String::as_str).collect();
    let image = build_image("test-image-vmi", &adds);
    assert_eq!(kernel_release(&image), kver);
    let mut spec = daemon_rig("vmi", image);
    // Breakpoints need a QEMU whose emulated SVM passes L2 debug exceptions to L1; without
    // one the rig still runs and only the breakpoint test fails, saying why.
    if let Some(q) = bulwark_testrig::qemu::guest_debug_qemu() {
        spec.qemu = q;
    }
    spec.images
        .push(GuestImage::new("k612", other_kernel_image()));
    (spec, script())
}

fn rig_run() -> &'static RigRun {
    crate::rig_run("vmi_linux")
}

fn check(name: &str) -> (String, i32) {
    section_status(rig_run(), name)
}

/// The words after `label:` on its line.
fn words<'a>(out: &'a str, label: &str) -> Vec<&'a str> {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{label}:")))
        .unwrap_or_else(|| panic!("no `{label}:` in:\n{out}"))
        .split_whitespace()
        .collect()
}

#[test]
fn the_guest_boots_with_introspection_allowed() {
    let (out, status) = check("start");
    assert_eq!(status, 0, "{out}");
    assert_eq!(num(&out, "start"), 0, "{out}");
    assert_eq!(num(&out, "exec"), 0, "{out}");
}

#[test]
fn the_owner_lists_the_guest_kernel_s_processes_from_outside() {
    let (out, _) = check("ps");
    assert_eq!(num(&out, "vmi-ps"), 0, "{out}");
    // The table: init (pid 1, the image's /init), kthreadd (pid 2, a kernel thread), the job's
    // three sleeps.
    let row = |pid: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(pid))
            .unwrap_or_else(|| panic!("no pid {pid} row in:\n{out}"))
    };
    assert!(row("2").ends_with("[kthreadd]"), "{}", row("2"));
    assert!(
        row("1").split_whitespace().nth(2) == Some("0"),
        "init runs as root: {out}"
    );
    assert!(
        out.lines().filter(|l| l.ends_with(" sleep")).count() >= 3,
        "the job's sleeps: {out}"
    );
    let json = out
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("{out}"));
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let slide = v["slide"].as_u64().unwrap();
    assert_eq!(
        slide % (2 << 20),
        0,
        "a KASLR slide is whole 2 MiB steps: {slide:#x}"
    );
    assert!(v["paused_us"].as_u64().unwrap() > 0, "{json}");
    assert!(
        v.get("partial").is_none(),
        "a clean task list is complete: {json}"
    );
    let procs = v["processes"].as_array().unwrap();
    assert_eq!(procs[0]["pid"], 0, "the idle task comes first: {json}");
    assert!(
        procs.len() > 20,
        "a booted kernel has tens of tasks: {json}"
    );
    assert_ne!(
        num(&out, "operator-vmi"),
        0,
        "the operator may not introspect: {out}"
    );
    assert!(out.contains("forbidden"), "{out}");
}

#[test]
fn the_module_list_read_from_outside_matches_the_guest_s_own() {
    let (out, _) = check("modules");
    assert_eq!(num(&out, "vmi-modules"), 0, "{out}");
    let agent = words(&out, "agent-modules");
    let vmi = words(&out, "vmi-modules");
    // The image loads virtio-mmio and the drivers of the devices this VM has (vsock, rng),
    // and not those of devices it lacks (no drive, no network).
    for m in ["virtio_mmio", "vmw_vsock_virtio_transport", "virtio_rng"] {
        assert!(agent.contains(&m), "the image loads {m}: {out}");
    }
    for m in ["virtio_blk", "virtio_net"] {
        assert!(!agent.contains(&m), "{m} without its device: {out}");
    }
    assert_eq!(agent, vmi, "{out}");
}

#[test]
fn a_clean_guest_and_a_benign_module_give_no_cross_view_alert() {
    let (out, _) = check("xview_clean");
    assert_eq!(num(&out, "xview"), 0, "{out}");
    assert_eq!(num(&out, "insmod-benign"), 0, "{out}");
    assert_eq!(
        num(&out, "benign-listed"),
        0,
        "benign shows while loaded: {out}"
    );
    assert_eq!(num(&out, "xview-benign"), 0, "{out}");
    assert_eq!(num(&out, "rmmod-benign"), 0, "{out}");
    assert_ne!(
        num(&out, "benign-gone"),
        0,
        "benign gone once unloaded: {out}"
    );
    assert_eq!(num(&out, "xview-after"), 0, "{out}");
    assert!(!out.contains("HIDDEN"), "{out}");
}

/// The `ALERT` lines of a check.
fn alerts(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("ALERT ")).collect()
}

#[test]
fn a_clean_guest_with_ordinary_activity_gives_no_integrity_alert() {
    let (out, _) = check("xview_clean");
    assert_eq!(num(&out, "baseline"), 0, "{out}");
    assert!(out.contains("KiB of kernel text and rodata"), "{out}");
    assert_eq!(num(&out, "check-clean"), 0, "{out}");
    assert!(alerts(&out).is_empty(), "{out}");
    assert!(out.contains("no differences from the baseline"), "{out}");
    // Kernel text and rodata guarded: loading and unloading a module writes to neither.
    assert_eq!(num(&out, "protect"), 0, "{out}");
    assert!(
        out.contains("guarded, writes are recorded and then land"),
        "{out}"
    );
    assert_eq!(num(&out, "benign-again"), 0, "{out}");
    assert_eq!(num(&out, "traps-clean"), 0, "no write trapped: {out}");
}

#[test]
fn a_hooked_system_call_is_found_in_the_table_and_named_by_module() {
    let (out, _) = check("hook_syscall");
    assert_eq!(num(&out, "insmod-hook"), 0, "{out}");
    assert!(
        out.contains("vmi-attack: hooked sys_call_table[110]"),
        "{out}"
    );
    assert_eq!(num(&out, "check-hooked"), 1, "{out}");
    assert!(
        alerts(&out)
            .iter()
            .any(|l| l.starts_with("ALERT syscall_table:")
                && l.contains("sys_call_table[110] was")
                && l.contains("__x64_sys_getppid")
                && l.contains("in module hook_syscall")),
        "{out}"
    );
    // Write protection saw the write itself, from the module's code, as it happened.
    assert_eq!(num(&out, "traps-hooked"), 1, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("WRITE ")
            && l.contains("(sys_call_table+0x370)")
            && l.contains("(in module hook_syscall)")
            && l.contains("[landed]")),
        "{out}"
    );
    // Unloading restores the entry: the alert goes with it.
    assert_eq!(num(&out, "rmmod-hook"), 0, "{out}");
    assert_eq!(num(&out, "check-unhooked"), 0, "{out}");
}

#[test]
fn patched_kernel_text_is_found_to_the_byte_with_its_symbol() {
    let (out, _) = check("patch_text");
    assert_eq!(num(&out, "insmod-patch"), 0, "{out}");
    // "vmi-attack: patched kernel text at ADDR (SYM+OFF/SIZE, padding after FUNC): cc -> 90"
    let line = out
        .lines()
        .find(|l| l.contains("vmi-attack: patched kernel text at "))
        .unwrap_or_else(|| panic!("{out}"));
    let addr = line
        .split("text at ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{line}"));
    let func = line
        .split("padding after ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("{line}"));
    assert_eq!(num(&out, "check-patched"), 1, "{out}");
    let mut text: Vec<_> = alerts(&out)
        .into_iter()
        .filter(|l| l.starts_with("ALERT kernel_text:"))
        .collect();
    // Two checks see it (before and while the VM is held): the same single byte.
    text.dedup();
    assert_eq!(text.len(), 1, "one byte changed: {out}");
    assert!(
        text[0].contains(&format!("at 0x{addr} ({func}+")),
        "the alert names the address and the function: {out}"
    );
    assert_eq!(
        num(&out, "traps-patched"),
        0,
        "the write was trapped: {out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("WRITE ")
            && l.contains(&format!("to 0x{addr} ({func}+"))
            && l.contains("(in module patch_text)")),
        "{out}"
    );
    // With --pause the module's write of the old byte back never lands and the VM stops.
    assert_eq!(num(&out, "protect-pause"), 0, "{out}");
    assert_eq!(num(&out, "paused-by-write"), 0, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("WRITE ")
            && l.contains(&format!("to 0x{addr} "))
            && l.contains("[dropped, VM paused]")),
        "{out}"
    );
    assert_eq!(
        num(&out, "check-while-paused"),
        0,
        "the byte is still the patched one: {out}"
    );
    assert_eq!(num(&out, "resume"), 0, "{out}");
    assert_eq!(
        num(&out, "rmmod-patch"),
        0,
        "the guest carries on after resume: {out}"
    );
    assert_eq!(num(&out, "protect-again"), 0, "{out}");
}

#[test]
fn a_module_that_hides_itself_is_found_through_sysfs() {
    let (out, _) = check("hide_module");
    assert_eq!(num(&out, "insmod-hidemod"), 0, "{out}");
    assert_ne!(
        num(&out, "lsmod-sees"),
        0,
        "the guest's lsmod misses it: {out}"
    );
    assert_ne!(num(&out, "vmi-modules-sees"), 0, "so does the list: {out}");
    assert_eq!(num(&out, "check-hidden"), 1, "{out}");
    assert!(
        alerts(&out)
            .iter()
            .any(|l| l.starts_with("ALERT hidden_module:") && l.contains("\"hide_module\"")),
        "{out}"
    );
}

#[test]
fn a_process_unlinked_by_a_kernel_module_is_flagged_by_cross_view() {
    let (out, _) = check("hide_pid");
    let victim = num(&out, "victim");
    assert_eq!(num(&out, "insmod-hide"), 0, "{out}");
    assert!(out.contains("vmi-attack: hid pid"), "{out}");
    assert_eq!(
        num(&out, "agent-sees"),
        0,
        "the guest's /proc still shows it: {out}"
    );
    assert_ne!(
        num(&out, "vmi-sees"),
        0,
        "the task list no longer has it: {out}"
    );
    assert_eq!(
        num(&out, "xview"),
        1,
        "cross-view exits 1 on a hidden process: {out}"
    );
    assert!(
        out.contains(&format!(
            "HIDDEN pid {victim} sleep: only the agent sees it"
        )),
        "{out}"
    );
}

#[test]
fn a_breakpoint_on_the_exec_path_records_every_program_started_in_the_guest() {
    let (out, _) = check("trace");
    assert_eq!(num(&out, "trace"), 0, "{out}");
    assert_eq!(num(&out, "trace2"), 0, "{out}");
    assert!(out.contains("breakpoint on bprm_execve at 0x"), "{out}");
    assert!(
        out.contains("breakpoint on __x64_sys_getppid at 0x"),
        "{out}"
    );
    assert_eq!(
        num(&out, "execs"),
        0,
        "the guest runs on under the breakpoint: {out}"
    );
    assert_eq!(num(&out, "hits"), 0, "{out}");
    let calls: Vec<&str> = out.lines().filter(|l| l.starts_with("CALL ")).collect();
    use bulwark_testrig::qemu::{GUEST_DEBUG_QEMU, GUEST_DEBUG_SINCE, guest_debug_qemu};
    let hint = match guest_debug_qemu() {
        None => format!(
            "the rig ran on a QEMU older than {GUEST_DEBUG_SINCE:?}, which does not pass L2 \
             debug exceptions to L1's KVM, and there is none at {GUEST_DEBUG_QEMU} (.ci/run \
             unpacks one from bookworm-backports there)"
        ),
        Some(q) => format!("QEMU {}", q.display()),
    };
    for prog in ["/bin/true", "/bin/ls", "/bin/uname"] {
        assert!(
            calls
                .iter()
                .any(|l| l.contains(&format!("bprm_execve: {prog}  "))),
            "{prog} exec'd ({hint}): {out}"
        );
    }
    // A function without a decoder: the calling process and the first arguments. The shell
    // asks for its parent when it starts.
    assert!(
        calls
            .iter()
            .any(|l| l.contains("(sh) __x64_sys_getppid: args 0x")),
        "{out}"
    );
    // Hardware breakpoints leave kernel text as it is.
    assert!(
        !out.lines()
            .any(|l| l.starts_with("ALERT") && l.contains("bprm_execve")),
        "{out}"
    );
    assert_eq!(num(&out, "untrace1"), 0, "{out}");
    assert_ne!(num(&out, "untrace1-again"), 0, "{out}");
    assert!(out.contains("no breakpoint on __x64_sys_getppid"), "{out}");
    assert_eq!(num(&out, "untrace"), 0, "{out}");
    assert_eq!(num(&out, "exec-after"), 0, "{out}");
    assert!(out.contains("no breakpoint; "), "{out}");
    assert_ne!(num(&out, "trace-bad"), 0, "{out}");
    assert!(out.contains("no_such_function"), "{out}");
}

#[test]
fn another_debian_kernel_series_is_introspected_from_its_own_files() {
    let (out, status) = check("other_kernel");
    assert_eq!(status, 0, "{out}");
    assert_eq!(num(&out, "start"), 0, "{out}");
    let release = words(&out, "guest-release");
    assert!(
        release
            .first()
            .is_some_and(|r| r.starts_with(OTHER_KERNEL_SERIES)),
        "the second guest runs a {OTHER_KERNEL_SERIES} kernel: {out}"
    );
    assert_eq!(num(&out, "vmi-ps"), 0, "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("bulwark-agent") && !l.starts_with("CALL")),
        "the agent in the 6.12 guest's task list: {out}"
    );
    let agent = words(&out, "agent-modules");
    assert!(!agent.is_empty(), "{out}");
    assert_eq!(agent, words(&out, "vmi-modules"), "{out}");
    assert_eq!(num(&out, "xview"), 0, "{out}");
    assert_eq!(num(&out, "baseline"), 0, "{out}");
    assert_eq!(
        num(&out, "check"),
        0,
        "a clean 6.12 guest gives no alert: {out}"
    );
    assert_eq!(num(&out, "trace"), 0, "{out}");
    assert!(
        out.contains("bprm_execve: /bin/uname  "),
        "the exec decoded on 6.12 (current_task in pcpu_hot): {out}"
    );
}

#[test]
fn a_vm_whose_spec_does_not_allow_it_is_not_introspected_and_the_owner_sees_the_count() {
    let (out, _) = check("forbidden");
    assert_eq!(num(&out, "start"), 0, "{out}");
    assert_ne!(num(&out, "plain-vmi"), 0, "{out}");
    assert!(out.contains("does not allow introspection"), "{out}");
    let json = out
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("{out}"));
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let n = v["live"]["introspections"]
        .as_u64()
        .unwrap_or_else(|| panic!("{json}"));
    assert!(n >= 10, "every request counted: {json}");
}
