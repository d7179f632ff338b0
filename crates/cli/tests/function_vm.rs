//! End-to-end tests of function micro-VMs through the `bulwark` binary on real KVM: console,
//! exit status, host calls, devices, vCPUs, configuration and refusals of bad input.

mod common;

use common::*;

#[test]
fn example_payload_greets_its_argument_and_exits_zero() {
    require_kvm();
    let dir = TestDir::new("hello");
    let p = build_payload(&dir, "examples/payloads/hello.c");
    let o = run_payload(&p, &["--arg", "tester"], b"");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("hello, tester, from a bulwark function micro-VM\n"),
        "{out}"
    );
    assert!(out.contains("vCPUs: 1, memory: 16 MiB"), "{out}");
    assert!(out.contains("platform device magic: 0x4b574c42"), "{out}");
}

#[test]
fn console_input_reaches_payload_and_output_returns() {
    require_kvm();
    let dir = TestDir::new("echo");
    let p = build_payload(&dir, "tests/payloads/echo.c");
    let input: Vec<u8> = b"hello bulwark\n"
        .iter()
        .copied()
        .cycle()
        .take(1000)
        .collect();
    let o = run_payload(&p, &[], &input);
    assert_eq!(
        stdout(&o),
        String::from_utf8(input.to_ascii_uppercase()).unwrap()
    );
    assert_eq!(o.status.code(), Some(1000 % 256), "{}", stderr(&o));
}

#[test]
fn console_input_from_regular_file_is_read_directly() {
    require_kvm();
    let dir = TestDir::new("echo-file");
    let p = build_payload(&dir, "tests/payloads/echo.c");
    let input = dir.path("in.txt");
    std::fs::write(&input, b"from a file").unwrap();
    let o = std::process::Command::new(bulwark())
        .args(["run", "--payload", p.to_str().unwrap()])
        .stdin(std::fs::File::open(&input).unwrap())
        .output()
        .unwrap();
    assert_eq!(stdout(&o), "FROM A FILE");
    assert_eq!(o.status.code(), Some(11));
}

#[test]
fn exit_status_and_stderr_come_from_payload() {
    require_kvm();
    let dir = TestDir::new("status");
    let p = build_payload(&dir, "tests/payloads/status.c");
    for status in [0, 1, 42, 255] {
        let s = status.to_string();
        let o = run(&["run", "--payload", p.to_str().unwrap(), "--arg", &s], b"");
        assert_eq!(o.status.code(), Some(status));
        assert_eq!(stderr(&o), "bye\n", "no monitor chatter on a clean exit");
        assert!(o.stdout.is_empty());
    }
}

#[test]
fn clock_advances_and_random_differs_between_vms() {
    require_kvm();
    let dir = TestDir::new("clock");
    let p = build_payload(&dir, "tests/payloads/clock_random.c");
    let draw = || {
        let o = run_payload(&p, &[], b"");
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let out = stdout(&o);
        assert!(out.contains("clock ok "), "{out}");
        out.lines()
            .find_map(|l| l.strip_prefix("random "))
            .unwrap()
            .to_string()
    };
    let (a, b) = (draw(), draw());
    assert_eq!(a.len(), 64);
    assert_ne!(a, b, "two VMs drew the same random bytes");
}

/// The hypervisor signature a payload's CPUID shows: bulwark's, where CPUID exits to KVM. On a
/// kvm_pvm host whose CPUs cannot fault CPUID at CPL3 (no `cpuid_fault` flag, as on AMD
/// hosts), a CPL3 payload's CPUID runs natively and shows what this process sees.
fn expected_hypervisor() -> String {
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let faults = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .contains(" cpuid_fault");
    if pvm && !faults {
        let r = std::arch::x86_64::__cpuid(0x4000_0000);
        let bytes: Vec<u8> = [r.ebx, r.ecx, r.edx]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .take_while(|&b| b != 0)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    } else {
        "BulwarkVMM".into()
    }
}

#[test]
fn port_and_mmio_devices_answer_and_postcode_is_kept() {
    require_kvm();
    let dir = TestDir::new("devices");
    let p = build_payload(&dir, "tests/payloads/devices.c");
    let o = run_payload(&p, &["--vcpus", "1", "--memory", "32M"], b"");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!("uart ok\ne9 ok\nhv {}\n", expected_hypervisor())
    );
    assert_eq!(stat(&o, "postcode").as_deref(), Some("0x42"));
    assert_eq!(stat(&o, "unhandled_pio").as_deref(), Some("0"));
    assert_eq!(stat(&o, "unhandled_mmio").as_deref(), Some("0"));
    let mmio: u64 = stat(&o, "mmio").unwrap().parse().unwrap();
    assert!(mmio >= 6, "{mmio} MMIO exits");
}

#[test]
fn two_vcpus_run_at_once() {
    require_kvm();
    let dir = TestDir::new("smp");
    let p = build_payload(&dir, "tests/payloads/two_vcpus.c");
    let o = run_payload(&p, &["--vcpus", "2", "--timeout", "30s"], b"");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("while vcpu 0 ran"));
}

#[test]
fn flat_binary_runs_from_its_first_byte() {
    require_kvm();
    let dir = TestDir::new("flat");
    let out = dir.path("status.bin");
    let o = run(
        &[
            "payload",
            "build",
            repo_root()
                .join("tests/payloads/status.c")
                .to_str()
                .unwrap(),
            "--flat",
            "-o",
            out.to_str().unwrap(),
        ],
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(&std::fs::read(&out).unwrap()[..4], b"\x7fELF");
    let o = run(
        &["run", "--payload", out.to_str().unwrap(), "--arg", "9"],
        b"",
    );
    assert_eq!(o.status.code(), Some(9), "{}", stderr(&o));
}

#[test]
fn config_file_sets_fields_and_flags_override() {
    require_kvm();
    let dir = TestDir::new("config");
    let p = build_payload(&dir, "examples/payloads/hello.c");
    let cfg = dir.path("vm.toml");
    std::fs::write(
        &cfg,
        "payload = \"hello.elf\"\nmemory = \"64M\"\nvcpus = 2\narg = \"from toml\"\ntimeout = \"20s\"\n",
    )
    .unwrap();
    assert!(p.ends_with("hello.elf"));
    let o = run(&["run", "--config", cfg.to_str().unwrap()], b"");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("hello, from toml,") && out.contains("vCPUs: 2, memory: 64 MiB"),
        "{out}"
    );
    let o = run(
        &[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--memory",
            "32M",
            "--arg",
            "flag",
        ],
        b"",
    );
    assert!(stdout(&o).contains("hello, flag,") && stdout(&o).contains("memory: 32 MiB"));
}

/// Runs bulwark expecting it to refuse before starting a VM: status 125 and a message.
fn refuses(args: &[&str], needle: &str) {
    let o = run(args, b"");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(125), "{args:?}: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: expected `{needle}` in: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    require_kvm();
    let dir = TestDir::new("bad");
    let good = build_payload(&dir, "tests/payloads/status.c");
    let good = good.to_str().unwrap();
    let empty = dir.path("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    let huge = dir.path("huge.bin");
    std::fs::write(&huge, vec![0x90u8; 5 << 20]).unwrap();
    let cfg = dir.path("bad.toml");
    std::fs::write(&cfg, format!("payload = \"{good}\"\nvcpu = 2\n")).unwrap();
    let pie = dir.path("pie.elf");
    let mut elf = std::fs::read(good).unwrap();
    elf[16] = 3; // ET_DYN
    std::fs::write(&pie, elf).unwrap();

    refuses(
        &["run", "--payload", empty.to_str().unwrap()],
        "payload file is empty",
    );
    refuses(
        &["run", "--payload", huge.to_str().unwrap(), "--memory", "4M"],
        "raise --memory",
    );
    refuses(&["run", "--payload", pie.to_str().unwrap()], "-no-pie");
    refuses(
        &["run", "--payload", "/nonexistent/p.elf"],
        "cannot read payload /nonexistent/p.elf",
    );
    refuses(&["run"], "nothing to run");
    refuses(
        &["run", "--payload", good, "--memory", "1M"],
        "use at least 4M",
    );
    refuses(
        &["run", "--payload", good, "--memory", "8G"],
        "the limit is 3G",
    );
    refuses(
        &["run", "--payload", good, "--memory", "17M"],
        "not a multiple of 2 MiB",
    );
    refuses(&["run", "--payload", good, "--vcpus", "0"], "1 to 32");
    refuses(&["run", "--payload", good, "--vcpus", "1000"], "1 to 32");
    refuses(
        &["run", "--config", cfg.to_str().unwrap()],
        "unknown field `vcpu`",
    );
    refuses(
        &["run", "--payload", good, "--arg", &"x".repeat(5000)],
        "the limit is",
    );
    // clap rejects malformed sizes itself, with its own status.
    let o = run(&["run", "--payload", good, "--memory", "lots"], b"");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("bad size `lots`"));
}

#[test]
fn elf_with_segment_outside_memory_is_refused() {
    require_kvm();
    let dir = TestDir::new("elf-outside");
    let src = dir.path("far.S");
    std::fs::write(
        &src,
        ".section .text.start, \"ax\"\n.globl _start\n_start: jmp .\n.section .bss\n.skip 0x2000000\n",
    )
    .unwrap();
    let out = dir.path("far.elf");
    let o = run(
        &[
            "payload",
            "build",
            "--no-crt0",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    refuses(
        &["run", "--payload", out.to_str().unwrap()],
        "lies outside payload memory",
    );
}

#[test]
fn read_blocked_on_open_input_ends_at_timeout() {
    require_kvm();
    let dir = TestDir::new("blocked-read");
    let p = build_payload(&dir, "tests/payloads/echo.c");
    // Keep stdin open and silent: the payload blocks in `read` until the timeout stops it.
    let args = [
        "run",
        "--payload",
        p.to_str().unwrap(),
        "--timeout",
        "300ms",
    ];
    let o = run_with_open_input(&args, b"");
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    assert!(stderr(&o).contains("timed out after 0.3"), "{}", stderr(&o));
}

/// A VM that times out shows where each virtio queue stood: here a driver (blk_io.c) that
/// finished its requests and waits for input, so everything it offered was returned.
#[test]
fn timed_out_vm_shows_its_virtio_rings() {
    require_kvm();
    let dir = TestDir::new("timeout-rings");
    let p = build_payload(&dir, "tests/payloads/blk_io.c");
    let img = dir.path("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // The secret, one round of four blocks; then input stays open and silent.
    let mut input = blk_io_input(&[7; 32], 1, 4);
    let drive = ["--drive", img.to_str().unwrap()];
    let args = ["run", "--payload", p.to_str().unwrap(), "--timeout", "3s"];
    let o = run_with_open_input(&[&args[..], &drive[..]].concat(), &input);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(124), "{}\n{err}", stdout(&o));
    assert!(stdout(&o).contains("blk_io: waiting"), "{}", stdout(&o));
    let line = err
        .lines()
        .find(|l| l.starts_with("bulwark: rings blk0: "))
        .unwrap_or_else(|| panic!("no rings line: {err}"));
    assert!(line.contains("status=0xf "), "{line}");
    assert!(
        line.contains("queue 0: avail=") && line.contains("(in device 0)"),
        "{line}"
    );
    // A run that ends by itself (the byte it waits for given) prints them only with --stats.
    input.push(0);
    let o = run(&[&args[..3], &drive[..]].concat(), &input);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stderr(&o).contains("bulwark: rings"), "{}", stderr(&o));
    let o = run_payload(&p, &drive, &input);
    assert!(
        stderr(&o).contains("bulwark: rings blk0: "),
        "{}",
        stderr(&o)
    );
}

/// Runs `sh -c script` as root in a private mount namespace (so /dev can be replaced).
fn in_mount_namespace(script: &str) -> std::process::Output {
    let o = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .output()
        .expect("unshare (util-linux) is needed for this test");
    assert!(
        !stderr(&o).contains("unshare failed"),
        "this test needs root to create a mount namespace: {}",
        stderr(&o)
    );
    o
}

#[test]
fn missing_or_forbidden_kvm_is_explained() {
    require_kvm();
    let dir = TestDir::new("nokvm");
    let p = build_payload(&dir, "tests/payloads/status.c");
    let run = format!("{} run --payload {}", bulwark(), p.display());
    let o = in_mount_namespace(&format!("mount -t tmpfs none /dev && exec {run}"));
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("/dev/kvm does not exist"),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("modprobe kvm_intel or kvm_amd"),
        "{}",
        stderr(&o)
    );

    // A /dev/kvm the user may not open (an unprivileged user: without the jail, which needs
    // root — and says so).
    let as_nobody = "mount -t tmpfs none /dev && mknod -m 600 /dev/kvm c 10 232 && \
         exec setpriv --reuid=65534 --regid=65534 --clear-groups";
    let o = in_mount_namespace(&format!("{as_nobody} {run} --no-jail"));
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("permission denied opening /dev/kvm"),
        "{}",
        stderr(&o)
    );
    let o = in_mount_namespace(&format!("{as_nobody} {run}"));
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the jail needs root") && stderr(&o).contains("--no-jail"),
        "{}",
        stderr(&o)
    );
}

/// A hostile virtio driver (tests/payloads/virtio_hostile.c) against two real virtio-blk
/// devices on real files: every malformed request gets its defined outcome, counted, and the
/// monitor, the device after a reset, and the other device keep working.
#[test]
fn hostile_virtio_driver_cannot_break_the_block_devices() {
    require_kvm();
    let dir = TestDir::new("virtio-hostile");
    let p = build_payload(&dir, "tests/payloads/virtio_hostile.c");
    let (a, b) = (dir.path("a.img"), dir.path("b.img"));
    for f in [&a, &b] {
        std::fs::File::create(f).unwrap().set_len(2 << 20).unwrap();
    }
    let drive_b = format!("path={},serial=second", b.display());
    let o = run_payload(
        &p,
        &["--drive", a.to_str().unwrap(), "--drive", &drive_b],
        b"",
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{}\n{err}", stdout(&o));
    assert!(stdout(&o).contains("checks held"), "{}", stdout(&o));
    let counter = |dev: &str, key: &str| device_counter(&err, dev, key);
    // Eight malformed data requests plus the two loops (no header or status left).
    assert!(counter("blk0", "bad_requests") >= 9, "{err}");
    assert_eq!(counter("blk0", "broken_queues"), 1, "{err}");
    assert_eq!(counter("blk1", "bad_requests"), 0, "{err}");
    // What the payload wrote reached the file at sector 3.
    let file = std::fs::read(&a).unwrap();
    assert_eq!(file[3 * 512 + 1], 8, "sector 3 written");
    assert!(
        file[..3 * 512].iter().all(|&x| x == 0),
        "nothing else written"
    );
}
