//! Device back-ends under a stock Debian guest (one nested-rig boot, real kvm_amd on QEMU's
//! emulated SVM; "host" is the rig's L1): the block and network back-ends are killed
//! (SIGKILL) every few hundred milliseconds while the guest writes and fsyncs its disk or
//! streams TCP, and the guest carries on with every byte intact; the vsock back-end breaks its
//! seccomp policy and is later killed, and the guest agent keeps answering; while disk, network
//! and vsock I/O run, no back-end's address space holds a secret the guest keeps in its memory,
//! while the monitor's does.

use crate::common::*;
use crate::section_status;
use bulwark_testrig::{GuestImage, RigRun, RigSpec};

const B: &str = "bulwark run --image /images/virtio --no-rig --timeout 300s --memory 512M";
/// 1 MiB blocks the block check writes, each with an fsync.
const BLOCKS: usize = 24;

/// Shell helpers every check uses.
const HELPERS: &str = r#"
cp /images/virtio/memscan /tmp/memscan && chmod 755 /tmp/memscan
cp /images/virtio/vsock_echo /tmp/vsock_echo && chmod 755 /tmp/vsock_echo
# pids_of COMM: the processes named COMM.
pids_of() { for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = "$1" ] && echo ${p#/proc/}; done; }
# killer COMM PERIOD STOPFILE: SIGKILL every process named COMM every PERIOD seconds until
# STOPFILE exists; prints how many it killed.
killer() { n=0; while [ ! -e $3 ]; do for p in $(pids_of $1); do kill -9 $p 2>/dev/null && n=$((n+1)); done; sleep $2; done; echo kills-$1=$n; }
# tap_up NAME: waits for bulwark to create tap NAME, then addresses it.
tap_up() { i=0; while ! ip link show $1 >/dev/null 2>&1 && [ $i -lt 600 ]; do i=$((i+1)); sleep 0.1; done; ip addr add 10.0.2.1/24 dev $1; ip link set $1 up; }
"#;

/// The guest's side of a TCP stream of `mib` MiB to the host, after bringing eth0 up. The
/// test tool returns once the host has read everything and closed (so powering off cuts
/// nothing short); the host's end is `vsock_echo tcp-serve 5001`.
fn guest_stream(mib: u64) -> String {
    format!(
        "ip link set lo up; ip addr add 10.0.2.2/24 dev eth0; ip link set eth0 up; \
         head -c {} /dev/urandom > /tmp/d; echo guest-sent $(sha256sum < /tmp/d); \
         until ping -c1 -W1 10.0.2.1 >/dev/null 2>&1; do :; done; \
         vsock_echo tcp-connect 10.0.2.1 5001 < /tmp/d; echo guest-send=$?",
        mib << 20
    )
}

fn script() -> String {
    // Block: 24 random MiB written to /dev/vda one MiB at a time, each with an fsync, while
    // the host kills the block back-end every 300 ms; then read back in the guest from the
    // device (page cache dropped) and on the host from the file.
    let blk = format!(
        "truncate -s 64M /tmp/bd.img; rm -f /tmp/stop; \
         killer bw-blk0 0.3 /tmp/stop > /tmp/kills & K=$!; \
         {B} --stats --drive /tmp/bd.img -- sh -c 'i=0; while [ $i -lt {BLOCKS} ]; do \
           head -c 1048576 /dev/urandom > /tmp/f; echo w$i $(sha256sum < /tmp/f); \
           dd if=/tmp/f of=/dev/vda bs=1M seek=$i conv=fsync 2>/dev/null || echo dd-failed; \
           i=$((i+1)); done; echo 3 > /proc/sys/vm/drop_caches; \
           i=0; while [ $i -lt {BLOCKS} ]; do \
           echo r$i $(dd if=/dev/vda bs=1M skip=$i count=1 2>/dev/null | sha256sum); i=$((i+1)); done; \
           dmesg | grep -i [i]/o.error; echo ioerr-lines=$(dmesg | grep -ci [i]/o.error)'; echo vm=$?; \
         touch /tmp/stop; wait $K; cat /tmp/kills; \
         i=0; while [ $i -lt {BLOCKS} ]; do \
           echo h$i $(dd if=/tmp/bd.img bs=1M skip=$i count=1 2>/dev/null | sha256sum); i=$((i+1)); done"
    );
    // Network: 32 random MiB guest → host over TCP while the host kills the network back-end
    // every 500 ms. In a network namespace of its own.
    let net = format!(
        "rm -f /tmp/stopn; timeout 600 /tmp/vsock_echo tcp-serve 5001 > /tmp/host-data & L=$!; \
         {B} --stats --net tap=bwtap0,backend=process -- sh -c '{}' > /tmp/netr.log 2> /tmp/netr.err & V=$!; \
         tap_up bwtap0; \
         killer bw-net0 0.5 /tmp/stopn > /tmp/killsn & K=$!; \
         wait $V; echo vm=$?; touch /tmp/stopn; wait $K; cat /tmp/killsn; \
         wait $L; echo host-recv=$?; \
         echo host-got $(sha256sum < /tmp/host-data) bytes=$(wc -c < /tmp/host-data); cat /tmp/netr.log /tmp/netr.err",
        guest_stream(32)
    );
    // Secrecy: the guest keeps a random secret in a file in its RAM and a shell variable,
    // then writes 48 MiB to its disk and streams 24 MiB to the host; meanwhile the host scans
    // the monitor once (the control) and every back-end and the launcher again and again.
    let secrecy = format!(
        "timeout 600 /tmp/vsock_echo tcp-serve 5001 > /dev/null & L=$!; \
         {B} --stats --drive /tmp/sd.img --net tap=bwtap1,backend=process --vsock /tmp/sv.sock -- sh -c 'S=secret-$(head -c 16 /dev/urandom | od -An -tx1 | tr -dc 0-9a-f); \
           echo $S > /tmp/secret; echo guest-secret $S; echo io-start; \
           (dd if=/dev/urandom of=/dev/vda bs=1M count=48 conv=fsync 2>/dev/null; echo dd-done) & \
           {}; wait; echo io-done; cat /tmp/secret' > /tmp/sec.log 2> /tmp/sec.err & V=$!; \
         tap_up bwtap1; \
         i=0; while ! grep -q io-start /tmp/sec.log && [ $i -lt 900 ]; do i=$((i+1)); sleep 0.2; done; \
         S=$(sed -n 's/^guest-secret //p' /tmp/sec.log | tr -d '\\r'); echo needle-length=${{#S}}; \
         for p in $(pids_of bulwark); do /tmp/memscan $p $S; done; \
         (n=0; while ! grep -q io-done /tmp/sec.log && [ $n -lt 30 ]; do \
           bulwark exec --vsock /tmp/sv.sock -- seq 1 20000 > /dev/null 2>&1 && n=$((n+1)); done; echo vsock-execs=$n) & X=$!; \
         scans=0; while ! grep -q io-done /tmp/sec.log && [ $scans -lt 40 ]; do \
           for c in bw-blk0 bw-net0 bw-vsock bw-launcher; do for p in $(pids_of $c); do /tmp/memscan $p $S; done; done; \
           scans=$((scans+1)); done; echo scans=$scans; \
         wait $V; echo vm=$?; wait $X; wait $L; echo host-recv=$?; cat /tmp/sec.log /tmp/sec.err",
        guest_stream(24)
    );
    // vsock: the back-end breaks its seccomp policy after 20 requests (a debug-build hook), and
    // later the host kills it while an exec holds a connection; the agent answers throughout.
    let vsock = format!(
        "BULWARK_BACKEND_PROBE=vsock:101 {B} --stats --vsock /tmp/r.sock -- sleep 600 > /tmp/vr.log 2>&1 & V=$!; \
         i=0; while [ $i -lt 300 ] && ! bulwark exec --vsock /tmp/r.sock -- true 2>/dev/null; do i=$((i+1)); sleep 0.2; done; \
         echo backends=$(pids_of bw-vsock | wc -w); \
         ok=0; i=0; while [ $i -lt 12 ]; do bulwark exec --vsock /tmp/r.sock -- echo x$i > /dev/null 2>&1 && ok=$((ok+1)); i=$((i+1)); done; \
         echo execs-ok=$ok; \
         echo big $(bulwark exec --vsock /tmp/r.sock -- seq 1 200000 | sha256sum); echo want $(seq 1 200000 | sha256sum); \
         bulwark exec --vsock /tmp/r.sock -- sleep 60 > /dev/null 2>&1 & E=$!; sleep 3; \
         for p in $(pids_of bw-vsock); do kill -9 $p; done; \
         wait $E; echo held-exec=$?; \
         echo after $(bulwark exec --vsock /tmp/r.sock -- echo after-kill); \
         echo backends-after=$(pids_of bw-vsock | wc -w); \
         bulwark exec --vsock /tmp/r.sock -- poweroff -f; wait $V; echo vm=$?; cat /tmp/vr.log"
    );
    let mut s = String::from(HELPERS);
    s.push_str(&format!(
        "cat > /tmp/net.sh <<'NET'\n{HELPERS}\n{net}\nNET\n"
    ));
    s.push_str(&format!(
        "truncate -s 64M /tmp/sd.img\ncat > /tmp/secrecy.sh <<'SEC'\n{HELPERS}\n{secrecy}\nSEC\n"
    ));
    for (name, cmd) in [
        ("blk_restart", blk),
        ("net_restart", "unshare -n sh /tmp/net.sh".to_string()),
        ("secrecy", "unshare -n sh /tmp/secrecy.sh".to_string()),
        ("vsock_restart", vsock),
    ] {
        s.push_str(&format!("section {name}\n{cmd} 2>&1\necho \"status=$?\"\n"));
    }
    s
}

/// This file's rig boot: the rig and its script, for [`crate::rig_run`].
pub(crate) fn rig_spec() -> (RigSpec, String) {
    let tools = TestDir::new("backends-tools");
    let memscan = build_static_c(&tools, "tests/guest/memscan.c");
    let echo = build_static_c(&tools, "tests/guest/vsock_echo.c");
    let add = format!("{}:/usr/bin/vsock_echo", echo.display());
    let image = build_image("test-image-virtio-backends", &["--add", &add]);
    std::fs::copy(&memscan, image.join("memscan")).unwrap();
    std::fs::copy(&echo, image.join("vsock_echo")).unwrap();
    let mut spec = RigSpec::new(bulwark());
    spec.images = vec![GuestImage::new("virtio", image)];
    spec.cmdline_extra = "loglevel=1".into();
    spec.memory_mib = 2048;
    spec.timeout = std::time::Duration::from_secs(1500);
    (spec, script())
}

fn rig_run() -> &'static RigRun {
    crate::rig_run("backends_linux")
}

fn value<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no `{key}` in:\n{out}"))
}

#[test]
fn a_linux_guest_keeps_every_fsynced_block_while_its_block_backend_is_killed() {
    let (out, status) = section_status(rig_run(), "blk_restart");
    assert_eq!(status, 0, "{out}");
    assert_eq!(value(&out, "vm="), "0", "the guest's job ended well: {out}");
    assert!(!out.contains("dd-failed"), "{out}");
    assert_eq!(
        value(&out, "ioerr-lines="),
        "0",
        "no I/O error in the guest: {out}"
    );
    for i in 0..BLOCKS {
        let w = value(&out, &format!("w{i} "));
        assert_eq!(
            value(&out, &format!("r{i} ")),
            w,
            "block {i} in the guest: {out}"
        );
        assert_eq!(
            value(&out, &format!("h{i} ")),
            w,
            "block {i} on the host: {out}"
        );
    }
    let kills: u64 = value(&out, "kills-bw-blk0=").parse().unwrap();
    let restarts = device_counter(&out, "blk0", "restarts");
    assert!(kills >= 3, "only {kills} kills: {out}");
    assert!(
        restarts >= kills.saturating_sub(1) && restarts <= kills,
        "{restarts} restarts for {kills} kills: {out}"
    );
    assert_eq!(device_counter(&out, "blk0", "io_errors"), 0, "{out}");
}

#[test]
fn a_tcp_stream_survives_its_network_backend_being_killed() {
    let (out, status) = section_status(rig_run(), "net_restart");
    assert_eq!(status, 0, "{out}");
    assert_eq!(value(&out, "vm="), "0", "{out}");
    assert_eq!(value(&out, "guest-send="), "0", "{out}");
    assert_eq!(value(&out, "host-recv="), "0", "{out}");
    assert_eq!(
        value(&out, "host-got "),
        value(&out, "guest-sent "),
        "every byte arrived, in order: {out}"
    );
    let kills: u64 = value(&out, "kills-bw-net0=").parse().unwrap();
    assert!(kills >= 2, "only {kills} kills: {out}");
    assert!(device_counter(&out, "net0", "restarts") >= 2, "{out}");
}

#[test]
fn no_backend_holds_a_secret_of_the_guest_while_the_monitor_does() {
    let (out, status) = section_status(rig_run(), "secrecy");
    assert_eq!(status, 0, "{out}");
    assert_eq!(value(&out, "vm="), "0", "{out}");
    assert_eq!(value(&out, "needle-length="), "39", "{out}");
    assert!(
        out.contains("dd-done") && out.contains("guest-send=0") && out.contains("host-recv=0"),
        "{out}"
    );
    let scans: Vec<&str> = out.lines().filter(|l| l.starts_with("memscan ")).collect();
    let of = |comm: &str| -> Vec<&str> {
        scans
            .iter()
            .copied()
            .filter(|l| l.contains(&format!("comm={comm} ")))
            .collect()
    };
    assert!(
        value(&out, "vsock-execs=").parse::<u32>().unwrap() >= 1,
        "vsock traffic ran during the scans: {out}"
    );
    for comm in ["bw-blk0", "bw-net0", "bw-vsock", "bw-launcher"] {
        let lines = of(comm);
        assert!(
            lines.len() >= 2,
            "{comm} scanned again and again during the I/O: {out}"
        );
        for l in lines {
            assert!(
                l.ends_with(" absent"),
                "the secret is in {comm}: {l}\n{out}"
            );
            assert!(l.contains("guest-ram=no"), "{comm} maps guest memory: {l}");
        }
    }
    // The control: the monitor holds it (guest RAM is mapped there; in the rig's L1 it is
    // anonymous memory, as shmem has no transparent huge pages there), so the scan works.
    assert!(
        of("bulwark").iter().any(|l| l.ends_with(" found")),
        "the scan does not find the secret in the monitor: {out}"
    );
}

#[test]
fn the_vsock_backend_is_restarted_after_a_violation_and_a_kill_and_the_agent_answers() {
    let (out, status) = section_status(rig_run(), "vsock_restart");
    assert_eq!(status, 0, "{out}");
    assert_eq!(value(&out, "backends="), "1", "a bw-vsock process: {out}");
    // The exec during which the back-end broke its policy may fail; the others answer.
    let ok: u32 = value(&out, "execs-ok=").parse().unwrap();
    assert!(ok >= 10, "only {ok} of 12 execs answered: {out}");
    assert_eq!(value(&out, "big "), value(&out, "want "), "{out}");
    assert!(
        out.contains(
            "seccomp: the vsock back-end thread made the forbidden system call 101 (ptrace"
        ),
        "the violation is reported with its system call: {out}"
    );
    assert!(out.contains("stopped by its seccomp policy"), "{out}");
    assert_ne!(
        value(&out, "held-exec="),
        "0",
        "a connection the killed back-end held is reset: {out}"
    );
    assert_eq!(value(&out, "after "), "after-kill", "{out}");
    assert_eq!(value(&out, "backends-after="), "1", "{out}");
    assert_eq!(value(&out, "vm="), "0", "the guest never rebooted: {out}");
    assert_eq!(device_counter(&out, "vsock", "violations"), 1, "{out}");
    assert_eq!(device_counter(&out, "vsock", "restarts"), 2, "{out}");
}
