//! End-to-end tests of the virtio devices with the stock Debian kernel as the driver: one
//! nested-rig boot (real kvm_amd on QEMU's emulated SVM) runs every check as a script section;
//! "host" below is the rig's L1, where bulwark and the backing files live.

mod common;

use std::sync::OnceLock;

use bulwark_testrig::{GuestImage, RigRun, RigSpec, run_script};
use common::*;

const B: &str = "bulwark run --image /images/default --no-rig --timeout 300s --memory 512M";
const MIB64: u64 = 64 << 20;

fn script() -> String {
    let checks: Vec<(&str, String)> = vec![
        // A random 64 MiB written through /dev/vda by the guest, read back in the guest from
        // the device (page cache dropped), then on the host from the file.
        (
            "blk_write",
            format!(
                "truncate -s 256M /tmp/disk.img && truncate -s 8M /tmp/disk2.img && \
                 {B} --stats --drive /tmp/disk.img --drive path=/tmp/disk2.img,serial=second-disk \
                 -- sh -c 'head -c {MIB64} /dev/urandom > /tmp/r; echo guest-file $(sha256sum < /tmp/r); \
                 dd if=/tmp/r of=/dev/vda bs=1M conv=fsync 2>/dev/null; \
                 echo 3 > /proc/sys/vm/drop_caches; \
                 echo guest-disk $(head -c {MIB64} /dev/vda | sha256sum); \
                 echo serials $(cat /sys/block/vda/serial) $(cat /sys/block/vdb/serial); \
                 echo sizes $(cat /sys/block/vda/size /sys/block/vdb/size)'"
            ),
        ),
        (
            "blk_host",
            format!("echo host-file $(head -c {MIB64} /tmp/disk.img | sha256sum)"),
        ),
        // A new VM on the same file sees the same data.
        (
            "blk_restart",
            format!(
                "{B} --drive /tmp/disk.img -- sh -c 'echo restart-disk $(head -c {MIB64} /dev/vda | sha256sum)'"
            ),
        ),
        (
            "blk_read_only",
            format!(
                "{B} --drive path=/tmp/disk.img,ro=on -- sh -c 'echo ro=$(cat /sys/block/vda/ro); \
                 dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=fsync; echo dd=$?' && \
                 echo after $(head -c {MIB64} /tmp/disk.img | sha256sum)"
            ),
        ),
        // Discard punches holes: the sparse backing file gives its blocks back.
        (
            "blk_discard",
            format!(
                "echo before-kib $(du -k /tmp/disk.img | cut -f1); \
                 {B} --drive /tmp/disk.img -- blkdiscard /dev/vda && \
                 echo after-kib $(du -k /tmp/disk.img | cut -f1)"
            ),
        ),
        // The same image cannot be attached writable twice.
        (
            "blk_locked",
            format!(
                "{B} --drive /tmp/disk.img --drive /tmp/disk.img -- true"
            ),
        ),
        ("blk_missing", format!("{B} --drive /tmp/nope.img -- true")),
        // O_DIRECT on tmpfs is refused by the kernel: the error names the fix.
        (
            "blk_direct_tmpfs",
            format!("{B} --drive path=/tmp/disk2.img,direct=on -- true"),
        ),
    ];
    let mut s = String::new();
    for (name, cmd) in checks {
        s.push_str(&format!("section {name}\n{cmd} 2>&1\necho \"status=$?\"\n"));
    }
    s
}

fn rig_run() -> &'static RigRun {
    static RUN: OnceLock<RigRun> = OnceLock::new();
    RUN.get_or_init(|| {
        require_kvm();
        let mut spec = RigSpec::new(bulwark());
        spec.images = vec![GuestImage::new("default", image_dir())];
        spec.cmdline_extra = "loglevel=1".into();
        spec.memory_mib = 2048;
        let run = run_script(&spec, &script()).unwrap_or_else(|e| panic!("rig: {e}"));
        assert_eq!(run.status, 0, "rig script failed:\n{}", run.output);
        run
    })
}

fn check(name: &str) -> (String, i32) {
    section_status(rig_run(), name)
}

/// The hash after `label` on its line.
fn sum(out: &str, label: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no `{label}` line in:\n{out}"))
        .to_string()
}

#[test]
fn blk_guest_write_reads_back_in_guest_and_on_host() {
    let (out, status) = check("blk_write");
    assert_eq!(status, 0, "{out}");
    let file = sum(&out, "guest-file ");
    assert_eq!(file.len(), 64, "{out}");
    assert_eq!(sum(&out, "guest-disk "), file, "guest re-read: {out}");
    let (host, _) = check("blk_host");
    assert_eq!(sum(&host, "host-file "), file, "host read: {host}");
    assert!(
        out.contains("bulwark: device blk0: requests=") && out.contains("bytes_out=67108864"),
        "device counters: {out}"
    );
}

#[test]
fn blk_two_drives_with_serials_and_sizes() {
    let (out, _) = check("blk_write");
    assert!(out.contains("serials bulwark0 second-disk"), "{out}");
    assert!(out.contains("sizes 524288 16384"), "{out}");
}

#[test]
fn blk_data_survives_a_vm_restart() {
    let (first, _) = check("blk_write");
    let (out, status) = check("blk_restart");
    assert_eq!(status, 0, "{out}");
    assert_eq!(sum(&out, "restart-disk "), sum(&first, "guest-file "));
}

#[test]
fn blk_read_only_drive_refuses_writes() {
    let (first, _) = check("blk_write");
    let (out, status) = check("blk_read_only");
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("ro=1"), "{out}");
    assert!(out.contains("dd=1"), "write must fail: {out}");
    assert_eq!(sum(&out, "after "), sum(&first, "guest-file "), "unchanged");
}

#[test]
fn blk_discard_shrinks_the_sparse_backing_file() {
    let (out, status) = check("blk_discard");
    assert_eq!(status, 0, "{out}");
    let kib = |label| -> u64 {
        sum(&out, label)
            .parse()
            .unwrap_or_else(|_| panic!("{label}: {out}"))
    };
    assert!(kib("before-kib ") >= 65536, "{out}");
    assert!(kib("after-kib ") < 1024, "{out}");
}

#[test]
fn blk_bad_drives_are_refused_with_the_fix() {
    let (out, status) = check("blk_locked");
    assert_eq!(status, 125, "{out}");
    assert!(out.contains("in use by another VM"), "{out}");
    let (out, status) = check("blk_missing");
    assert_eq!(status, 125, "{out}");
    assert!(out.contains("cannot open drive /tmp/nope.img"), "{out}");
    let (out, status) = check("blk_direct_tmpfs");
    assert_eq!(status, 125, "{out}");
    assert!(out.contains("drop direct=on"), "{out}");
}
