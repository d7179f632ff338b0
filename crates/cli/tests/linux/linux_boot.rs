//! End-to-end tests of Linux guests: the default Debian image booted by bulwark inside the
//! nested rig (real kvm_amd on QEMU's emulated SVM). One rig boot runs every check; each
//! check is a section of the script, asserted separately.

use crate::common::*;
use crate::section_status;
use bulwark_image::{ExtraFile, FileSource};
use bulwark_testrig::{GuestImage, RigRun, RigSpec};

const B: &str = "bulwark run --image /images/default --no-rig --timeout 120s";

/// The checks, one section each: `section NAME`, a command, and its status.
fn script() -> String {
    let checks: &[(&str, &str)] = &[
        ("bzimage", &format!("{B} -- uname -r")),
        ("pvh", &format!("{B} --pvh -- uname -r")),
        (
            "two_vcpus",
            &format!("{B} --vcpus 2 -- grep -c ^processor /proc/cpuinfo"),
        ),
        (
            "memory",
            &format!("{B} --memory 256M -- grep MemTotal /proc/meminfo"),
        ),
        (
            "job_status",
            &format!("{B} -- sh -c 'echo job ran; exit 7'"),
        ),
        (
            "hwrng",
            &format!(
                "{B} -- sh -c 'cat /sys/class/misc/hw_random/rng_current; \
                 head -c 4096 /dev/hwrng | od -An -tx1 | tail -1; head -c 4096 /dev/hwrng | wc -c'"
            ),
        ),
        // Words the kernel does not know go to init ahead of the job; they must not become it.
        (
            "unknown_kernel_words",
            &format!("{B} --cmdline 'nokaslr single' -- echo job-alone"),
        ),
        ("poweroff", &format!("{B} -- poweroff -f")),
        ("reboot", &format!("{B} -- reboot -f")),
        (
            "panic",
            &format!("{B} -- sh -c 'echo c > /proc/sysrq-trigger'"),
        ),
        // Type at the shell once it is there, as a user would: bytes sent before the guest's
        // console driver opens the port can be discarded by the driver's start-up.
        (
            "console_input",
            &format!(
                "rm -f /tmp/in /tmp/out; mkfifo /tmp/in; \
                 ({B} < /tmp/in > /tmp/out 2>&1; echo \"rc=$?\" >> /tmp/out) & \
                 exec 3>/tmp/in; i=0; \
                 while ! grep -q 'built-in shell' /tmp/out && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done; \
                 printf 'echo hi-$((6*7))\\nexit\\n' >&3; exec 3>&-; wait; cat /tmp/out; \
                 grep -q '^rc=0' /tmp/out"
            ),
        ),
        (
            "not_a_kernel",
            "bulwark run --no-rig --kernel /images/default/initramfs.cpio",
        ),
        (
            "initrd_not_cpio",
            "bulwark run --no-rig --kernel /images/default/bzImage --initrd /images/default/bzImage",
        ),
        (
            "elf_without_pvh",
            "bulwark run --no-rig --kernel /payloads/hello.elf",
        ),
        ("too_little_memory", &format!("{B} --memory 16M")),
        (
            "initrd_too_big",
            "printf 070701 > /tmp/big && dd if=/dev/zero bs=1M count=48 >> /tmp/big 2>/dev/null && \
             bulwark run --no-rig --kernel /images/default/bzImage --initrd /tmp/big --memory 48M",
        ),
    ];
    let mut s = String::new();
    for (name, cmd) in checks {
        s.push_str(&format!("section {name}\n{cmd} 2>&1\necho \"status=$?\"\n"));
    }
    s
}

/// This file's rig boot: the rig and its script, for [`crate::rig_run`].
pub(crate) fn rig_spec() -> (RigSpec, String) {
    let mut spec = RigSpec::new(bulwark());
    spec.images = vec![GuestImage::new("default", image_dir())];
    // An ELF that is not a kernel: a function micro-VM payload (no PVH note).
    let payloads = TestDir::new("linux-boot-payloads");
    let hello = build_payload(&payloads, "examples/payloads/hello.c");
    spec.files = vec![ExtraFile {
        path: "/payloads/hello.elf".into(),
        // Read now: the temporary directory is gone when the rig boots.
        source: FileSource::Bytes(std::fs::read(&hello).expect("built payload")),
        mode: 0o644,
    }];
    spec.cmdline_extra = "loglevel=1".into();
    (spec, script())
}

fn rig_run() -> &'static RigRun {
    crate::rig_run("linux_boot")
}

/// Output and exit status of one check.
fn check(name: &str) -> (String, i32) {
    section_status(rig_run(), name)
}

#[test]
fn bzimage_boots_to_ready_line_and_runs_the_job() {
    let (out, status) = check("bzimage");
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("bulwark-guest: ready uptime="), "{out}");
    assert!(out.contains("-cloud-amd64"), "{out}");
}

#[test]
fn elf_vmlinux_boots_through_pvh() {
    let (out, status) = check("pvh");
    assert_eq!(status, 0, "{out}");
    assert!(
        out.contains("bulwark-guest: ready uptime=") && out.contains("-cloud-amd64"),
        "{out}"
    );
}

#[test]
fn guest_sees_two_vcpus() {
    let (out, status) = check("two_vcpus");
    assert_eq!(status, 0, "{out}");
    assert!(out.lines().any(|l| l.trim() == "2"), "{out}");
}

#[test]
fn memtotal_matches_configured_size() {
    let (out, status) = check("memory");
    assert_eq!(status, 0, "{out}");
    let kib: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    // 256 MiB less what the kernel reserves for itself (its image, page tables, crash areas).
    assert!(
        (200 * 1024..=256 * 1024).contains(&kib),
        "MemTotal {kib} KiB"
    );
}

#[test]
fn job_exit_status_becomes_bulwark_status() {
    let (out, status) = check("job_status");
    assert_eq!(status, 7, "{out}");
    assert!(out.contains("job ran"), "{out}");
}

#[test]
fn virtio_rng_feeds_dev_hwrng() {
    let (out, status) = check("hwrng");
    assert_eq!(status, 0, "{out}");
    assert!(
        out.contains("virtio_rng.0"),
        "virtio-rng is the current hwrng: {out}"
    );
    assert!(out.lines().any(|l| l.trim() == "4096"), "4 KiB read: {out}");
}

#[test]
fn kernel_words_init_is_handed_are_not_taken_for_the_job() {
    let (out, status) = check("unknown_kernel_words");
    assert_eq!(status, 0, "{out}");
    assert!(out.lines().any(|l| l.trim() == "job-alone"), "{out}");
    assert!(!out.contains("not found"), "{out}");
}

#[test]
fn poweroff_and_reboot_end_with_status_zero() {
    for name in ["poweroff", "reboot"] {
        let (out, status) = check(name);
        assert_eq!(status, 0, "{name}: {out}");
        assert!(!out.contains("timed out"), "{name}: {out}");
    }
}

#[test]
fn kernel_panic_ends_non_zero() {
    let (out, status) = check("panic");
    assert_eq!(status, 123, "{out}");
    assert!(out.contains("guest kernel panicked"), "{out}");
}

#[test]
fn console_input_reaches_guest_shell() {
    let (out, status) = check("console_input");
    assert!(out.contains("hi-42"), "{out}");
    assert_eq!(status, 0, "{out}");
}

#[test]
fn bad_kernels_and_initrds_are_refused_with_a_reason() {
    for (name, needle) in [
        ("not_a_kernel", "neither a bzImage"),
        ("initrd_not_cpio", "not a cpio archive"),
        ("elf_without_pvh", "no PVH entry note"),
        ("too_little_memory", "at least 32M"),
        ("initrd_too_big", "raise --memory"),
    ] {
        let (out, status) = check(name);
        assert_eq!(status, 125, "{name}: {out}");
        assert!(out.contains(needle), "{name}: expected `{needle}` in {out}");
        assert!(!out.contains("panicked"), "{name}: {out}");
    }
}
