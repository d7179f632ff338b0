//! End-to-end tests of the virtio devices with the stock Debian kernel as the driver: one
//! nested-rig boot (real kvm_amd on QEMU's emulated SVM) runs every check as a script section;
//! "host" below is the rig's L1, where bulwark and the backing files live.

use crate::common::*;
use crate::section_status;
use bulwark_testrig::{GuestImage, RigRun, RigSpec};

const B: &str = "bulwark run --image /images/virtio --no-rig --timeout 300s --memory 512M";
const MIB64: u64 = 64 << 20;
const MIB100: u64 = 100 << 20;

/// The virtio-net check, run by `net_tcp` in a fresh network namespace. Both ends use the
/// test tool's TCP modes (64 KiB per system call; busybox nc's 1 KiB writes made the guest's
/// side CPU-bound under the rig's emulation, at about 0.6 MB/s). Every wait is bounded: a
/// stalled stream fails the check with what each side saw instead of hanging the rig.
fn net_script(backend: &str, bytes: u64) -> String {
    format!(
        "head -c {bytes} /dev/urandom > /tmp/n; echo host-sent $(sha256sum < /tmp/n); \
                 timeout 290 /tmp/vsock_echo tcp-serve 5001 > /tmp/host-data & L=$!; \
                 {B} --stats --net tap=bwtap0,mac=02:00:00:00:00:02,backend={backend} -- sh -c 'ip link set lo up; \
                   ip addr add 10.0.2.2/24 dev eth0; ip link set eth0 up; \
                   echo mac $(cat /sys/class/net/eth0/address); \
                   echo features $(cat /sys/class/net/eth0/device/features); \
                   echo guest-got $(vsock_echo tcp-serve 5000 | sha256sum); \
                   head -c {bytes} /dev/urandom > /tmp/d; echo guest-sent $(sha256sum < /tmp/d); \
                   vsock_echo tcp-connect 10.0.2.1 5001 < /tmp/d; echo guest-send=$?' > /tmp/net-vm.log 2>&1 & V=$!; \
                 i=0; while ! ip link show bwtap0 >/dev/null 2>&1 && [ $i -lt 300 ]; do i=$((i+1)); sleep 0.1; done; \
                 ip addr add 10.0.2.1/24 dev bwtap0; ip link set bwtap0 up; \
                 i=0; while [ $i -lt 120 ] && ! ping -c1 -W1 10.0.2.2 >/dev/null 2>&1; do i=$((i+1)); done; \
                 : the guest answers pings before its server listens: a refused connect is tried again; \
                 i=0; while :; do timeout 280 /tmp/vsock_echo tcp-connect 10.0.2.2 5000 < /tmp/n; r=$?; \
                   [ $r -eq 0 ] && break; i=$((i+1)); [ $i -ge 50 ] && break; sleep 0.2; done; \
                 echo host-send=$r; \
                 echo back-ends=$(for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = bw-net0 ] && echo $p; done | wc -l); \
                 wait $V; \
                 wait $L; echo host-recv=$?; \
                 echo host-got $(sha256sum < /tmp/host-data) bytes=$(wc -c < /tmp/host-data); cat /tmp/net-vm.log"
    )
}

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
            format!("{B} --drive /tmp/disk.img --drive /tmp/disk.img -- true"),
        ),
        ("blk_missing", format!("{B} --drive /tmp/nope.img -- true")),
        // The image's ext4 root filesystem on /dev/vda instead of the initramfs; a file written
        // on / is there at the next boot.
        (
            "root_on_vda",
            format!(
                "cp /images/virtio/rootfs.ext4 /tmp/root.ext4 && \
                 {B} --root /tmp/root.ext4 -- sh -c 'grep ^/dev/vda /proc/mounts; echo kept > /marker; sync' && \
                 {B} --root /tmp/root.ext4 -- sh -c 'echo marker=$(cat /marker); ls /usr/bin/bulwark-agent'"
            ),
        ),
        // vsock, host → guest: the guest echoes a connection on port 5000; the host connects
        // through the socket with the CONNECT handshake and sends 1 MiB.
        (
            "vsock_host_to_guest",
            format!(
                "head -c 1048576 /dev/urandom > /tmp/data; echo sent $(sha256sum < /tmp/data); \
                 {B} --stats --vsock /tmp/v.sock -- vsock_echo serve 5000 > /tmp/vm.log 2>&1 & \
                 i=0; while [ $i -lt 300 ]; do \
                   $E uds-connect /tmp/v.sock 5000 < /tmp/data > /tmp/back 2>/tmp/err && break; \
                   i=$((i+1)); sleep 0.2; done; \
                 cat /tmp/err; echo back $(sha256sum < /tmp/back); wait; echo vm=$?; cat /tmp/vm.log"
            ),
        ),
        // vsock, guest → host: a unix listener at <socket>_6000 echoes; port 6001 has none.
        (
            "vsock_guest_to_host",
            format!(
                "($E uds-serve /tmp/v.sock_6000 &) ; sleep 0.5; \
                 {B} --vsock cid=7,socket=/tmp/v.sock -- sh -c 'head -c 1048576 /dev/urandom > /tmp/d; \
                 echo sent $(sha256sum < /tmp/d); echo back $(vsock_echo connect 6000 < /tmp/d | sha256sum); \
                 vsock_echo connect 6001 < /dev/null; echo refused=$?'"
            ),
        ),
        // virtio-net on a tap bulwark creates: 100 MiB each way over TCP, checksummed. The rig's
        // L1 is the host here, a VM of its own, so the tap and addresses touch no real network.
        // The guest's sender returns only once the host has read everything and closed:
        // powering off earlier would drop what is still in the guest's socket buffers.
        // In a network namespace of its own (unshare -n), so the tap and addresses touch nothing
        // else even inside the rig's L1.
        ("net_tcp", "unshare -n sh /tmp/net-test.sh".to_string()),
        // The same with the tap served in the monitor (`backend=inline`), 32 MiB each way.
        ("net_inline", "unshare -n sh /tmp/net-inline.sh".to_string()),
        (
            "net_bad_tap",
            format!("{B} --net tap=no/slash -- true; {B} --net toolongtapname01 -- true"),
        ),
        (
            "vsock_socket_exists",
            format!("touch /tmp/taken.sock; {B} --vsock /tmp/taken.sock -- true"),
        ),
        // The guest agent: a VM whose job sleeps; the host runs commands and lists processes.
        (
            "agent",
            format!(
                "{B} --vsock /tmp/a.sock -- sleep 600 > /tmp/agent-vm.log 2>&1 & \
                 i=0; while [ $i -lt 300 ] && ! bulwark exec --vsock /tmp/a.sock -- true 2>/dev/null; do \
                   i=$((i+1)); sleep 0.2; done; \
                 bulwark exec --vsock /tmp/a.sock -- sh -c 'echo to-stdout; echo to-stderr >&2; exit 3'; \
                 echo exec-status=$?; \
                 echo big $(bulwark exec --vsock /tmp/a.sock -- seq 1 400000 | sha256sum); \
                 echo want $(seq 1 400000 | sha256sum); \
                 echo stdin $(echo fed-through | bulwark exec --vsock /tmp/a.sock --stdin -- cat); \
                 bulwark exec --vsock /tmp/a.sock -- /no/such/program; echo missing-status=$?; \
                 bulwark agent ps --vsock /tmp/a.sock; \
                 bulwark agent ps --vsock /tmp/a.sock --json; echo; \
                 bulwark exec --vsock /tmp/a.sock -- poweroff -f; wait; echo vm=$?; cat /tmp/agent-vm.log"
            ),
        ),
        // O_DIRECT on tmpfs is refused by the kernel: the error names the fix.
        (
            "blk_direct_tmpfs",
            format!("{B} --drive path=/tmp/disk2.img,direct=on -- true"),
        ),
    ];
    let mut s = String::from(
        "cp /images/virtio/vsock_echo /tmp/vsock_echo && chmod 755 /tmp/vsock_echo\nE=/tmp/vsock_echo\n",
    );
    s.push_str(&format!(
        "cat > /tmp/net-test.sh <<'NET'\n{}\nNET\ncat > /tmp/net-inline.sh <<'NET'\n{}\nNET\n",
        net_script("process", MIB100),
        net_script("inline", 32 << 20)
    ));
    for (name, cmd) in checks {
        s.push_str(&format!("section {name}\n{cmd} 2>&1\necho \"status=$?\"\n"));
    }
    s
}

/// The one rig boot of this file; a failure is kept too, so every test reports it instead of
/// booting the rig again.
/// This file's rig boot: the rig and its script, for [`crate::rig_run`].
pub(crate) fn rig_spec() -> (RigSpec, String) {
    // The default image plus the vsock test tool, which the rig's L1 gets too (in the image
    // directory) for the host side.
    let tools = TestDir::new("virtio-tools");
    let echo = build_static_c(&tools, "tests/guest/vsock_echo.c");
    let add = format!("{}:/usr/bin/vsock_echo", echo.display());
    let image = build_image("test-image-virtio", &["--rootfs", "--add", &add]);
    std::fs::copy(&echo, image.join("vsock_echo")).unwrap();
    let mut spec = RigSpec::new(bulwark());
    spec.images = vec![GuestImage::new("virtio", image)];
    spec.cmdline_extra = "loglevel=1".into();
    spec.memory_mib = 2048;
    // Generous: the checks move ~500 MiB through emulated hardware, and the machine may
    // be busy.
    spec.timeout = std::time::Duration::from_secs(1800);
    (spec, script())
}

fn rig_run() -> &'static RigRun {
    crate::rig_run("virtio_devices")
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

#[test]
fn vsock_host_connects_to_guest_with_the_connect_handshake() {
    let (out, status) = check("vsock_host_to_guest");
    assert_eq!(status, 0, "{out}");
    // Host-side ports count up from 2^30 (a retry before the guest listened takes the next).
    assert!(out.contains("answer: OK 107374182"), "{out}");
    assert_eq!(sum(&out, "back "), sum(&out, "sent "), "{out}");
    assert!(out.contains("vm=0"), "{out}");
}

#[test]
fn vsock_guest_connects_to_host_unix_socket() {
    let (out, status) = check("vsock_guest_to_host");
    assert_eq!(status, 0, "{out}");
    assert_eq!(sum(&out, "back "), sum(&out, "sent "), "{out}");
    assert!(out.contains("refused=1"), "nothing listens on 6001: {out}");
}

#[test]
fn vsock_existing_socket_path_is_refused() {
    let (out, status) = check("vsock_socket_exists");
    assert_eq!(status, 125, "{out}");
    assert!(out.contains("already exists"), "{out}");
}

#[test]
fn agent_exec_returns_status_streams_and_large_output() {
    let (out, status) = check("agent");
    assert_eq!(status, 0, "{out}");
    assert!(
        out.contains("to-stdout") && out.contains("to-stderr"),
        "{out}"
    );
    assert!(out.contains("exec-status=3"), "{out}");
    assert_eq!(sum(&out, "big "), sum(&out, "want "), "{out}");
    assert!(out.contains("stdin fed-through"), "{out}");
    assert!(out.contains("missing-status=125"), "{out}");
    assert!(
        out.contains("/no/such/program"),
        "the error names the program: {out}"
    );
    assert!(out.contains("vm=0"), "poweroff through the agent: {out}");
}

#[test]
fn agent_ps_lists_guest_processes() {
    let (out, _) = check("agent");
    let table: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.contains("PID") || !l.contains("COMM"))
        .take_while(|l| !l.starts_with('['))
        .collect();
    assert!(table.len() > 3, "{out}");
    assert!(
        table.iter().any(|l| l.ends_with(" sleep")),
        "the job is listed: {out}"
    );
    assert!(
        table.iter().any(|l| l.trim_start().starts_with("1 ")),
        "pid 1 is listed: {out}"
    );
    let json = out
        .lines()
        .find(|l| l.starts_with("[{"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(json.contains("\"comm\":\"bulwark-agent\""), "{json}");
}

/// What a `net_script` section must show: `bytes` each way, checksummed, through the device,
/// with offloads negotiated, and its back-end where `backend` says.
fn assert_tcp_both_ways(section: &str, bytes: u64, backend: &str) {
    let (out, status) = check(section);
    assert_eq!(status, 0, "{out}");
    for side in ["host-send=0", "host-recv=0", "guest-send=0"] {
        assert!(out.contains(side), "{side}: {out}");
    }
    assert!(out.contains("mac 02:00:00:00:00:02"), "{out}");
    assert_eq!(
        sum(&out, "guest-got "),
        sum(&out, "host-sent "),
        "host → guest: {out}"
    );
    assert_eq!(
        sum(&out, "host-got "),
        sum(&out, "guest-sent "),
        "guest → host: {out}"
    );
    // Checksum and segmentation offloads and mergeable buffers were negotiated (the guest's
    // view of the accepted feature bits: CSUM 0, GUEST_CSUM 1, MAC 5, GUEST_TSO4 7,
    // HOST_TSO4 11, MRG_RXBUF 15), and the data moved through the device.
    let features = out
        .lines()
        .find_map(|l| l.strip_prefix("features "))
        .unwrap_or_else(|| panic!("no features line: {out}"))
        .trim()
        .as_bytes()
        .to_vec();
    for bit in [0, 1, 5, 7, 11, 15] {
        assert_eq!(features.get(bit), Some(&b'1'), "feature bit {bit}: {out}");
    }
    let bytes_in = device_counter(&out, "net0", "bytes_in");
    let bytes_out = device_counter(&out, "net0", "bytes_out");
    assert!(bytes_in >= bytes && bytes_out >= bytes, "{out}");
    // Counted while the VM still ran (the guest was about to send): a `bw-net0` process holds
    // the tap with backend=process, none with backend=inline.
    let want = if backend == "process" {
        "back-ends=1"
    } else {
        "back-ends=0"
    };
    assert!(out.contains(want), "{want}: {out}");
    assert_eq!(device_counter(&out, "net0", "restarts"), 0, "{out}");
    assert!(
        !out.contains("timed out"),
        "the guest's job ended by itself: {out}"
    );
}

#[test]
fn net_tcp_streams_both_ways_over_tap_with_offloads() {
    assert_tcp_both_ways("net_tcp", MIB100, "process");
}

#[test]
fn net_tcp_streams_both_ways_with_the_tap_in_the_monitor() {
    assert_tcp_both_ways("net_inline", 32 << 20, "inline");
}

#[test]
fn net_bad_tap_names_are_refused() {
    let (out, _) = check("net_bad_tap");
    assert_eq!(out.matches("1 to 15 bytes").count(), 2, "{out}");
}

#[test]
fn guest_boots_with_its_root_on_vda() {
    let (out, status) = check("root_on_vda");
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("/dev/vda / ext4"), "root is the disk: {out}");
    assert!(out.contains("marker=kept"), "written on / and kept: {out}");
    assert!(
        out.contains("/usr/bin/bulwark-agent"),
        "same tree as the initramfs: {out}"
    );
}
