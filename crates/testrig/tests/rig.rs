//! The nested test rig, for real: QEMU TCG with emulated SVM, the Debian cloud kernel, kvm_amd
//! in L1, and the static bulwark binary running a function micro-VM inside.
//!
//! Needs `qemu-system-x86_64` (Debian `qemu-system-x86`), apt (packages are downloaded and cached
//! on first use) and `cc` (the payload is built on the host). A missing piece fails the test
//! with the error saying what to install; nothing is skipped.
//!
//! The bulwark binary: `$BULWARK_BIN`, else the workspace's debug build (built if needed); see
//! [`bulwark_testrig::workspace_bulwark`]. `BULWARK_RIG_ECHO=1` copies the L1 console to stderr.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bulwark_image::{ExtraFile, ImageManifest, ImageSpec, build_image};
use bulwark_testrig::{
    GuestImage, QemuError, RigError, RigSpec, run_command, run_script, workspace_bulwark,
};

/// One QEMU at a time: the machine has two cores, and the timings are reported.
static RIG: Mutex<()> = Mutex::new(());

fn work_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bulwark-rig-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn spec(bulwark: PathBuf) -> RigSpec {
    let mut spec = RigSpec::new(bulwark);
    spec.timeout = Duration::from_secs(300);
    spec
}

#[test]
fn rig_gives_kvm_amd_and_runs_a_payload_and_carries_an_image() {
    let bulwark = workspace_bulwark().expect("bulwark binary");
    let dir = work_dir("main");

    // The payload, built on the host.
    let payload = dir.join("hello.elf");
    let examples =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/payloads/hello.c");
    let out = std::process::Command::new(&bulwark)
        .arg("payload")
        .arg("build")
        .arg(&examples)
        .arg("-o")
        .arg(&payload)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "payload build: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The default guest image, carried into L1.
    let t = Instant::now();
    let manifest = build_image(&ImageSpec::new(dir.join("image"))).expect("default image");
    let image_time = t.elapsed();

    let mut spec = spec(bulwark);
    spec.images
        .push(GuestImage::new("default", dir.join("image")));
    spec.files
        .push(ExtraFile::host("/files/hello.elf", &payload, 0o644));
    let script = r#"
section kvm
ls -l /dev/kvm
section kvm_amd
echo "npt=$(cat /sys/module/kvm_amd/parameters/npt)"
ls /sys/module/kvm_amd
section payload
bulwark run --payload /files/hello.elf --arg rig
echo "status=$?"
section image
cd /images/default && sha256sum bzImage initramfs.cpio vmlinux && cat manifest.json | grep -c sha256
section exit
exit 7
"#;
    let _lock = RIG.lock().unwrap_or_else(|e| e.into_inner());
    let run = run_script(&spec, script).expect("rig run");
    eprintln!("{}", run.output);
    let s = run.sections();

    assert_eq!(run.status, 7, "the script's exit status comes back");
    let kvm = s.get("kvm").unwrap();
    assert!(
        kvm.starts_with("crw"),
        "/dev/kvm is a character device in L1: {kvm}"
    );
    let amd = s.get("kvm_amd").unwrap();
    assert!(amd.contains("npt=Y"), "kvm_amd uses nested paging: {amd}");
    assert!(amd.contains("parameters"), "{amd}");
    let p = s.get("payload").unwrap();
    assert!(
        p.contains("hello, rig, from a bulwark function micro-VM"),
        "{p}"
    );
    assert!(p.contains("status=0"), "{p}");
    let img = s.get("image").unwrap();
    for f in ["bzImage", "initramfs.cpio", "vmlinux"] {
        let want = format!("{}  {f}", manifest.files[f].sha256);
        assert!(img.contains(&want), "{f} arrives intact in L1: {img}");
    }
    assert_eq!(ImageManifest::read(&dir.join("image")).unwrap(), manifest);

    let ready = run.kvm_ready_wall.expect("kvm ready marker");
    eprintln!(
        "rig: /dev/kvm ready {ready:.2?} after QEMU start (L1 uptime {:?} s); QEMU {:.2?}; whole run {:.2?}; L1 initramfs {} MiB; image build {image_time:.2?}",
        run.kvm_ready_uptime,
        run.qemu_wall,
        run.wall,
        run.initramfs_bytes >> 20,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rig_command_runs_bulwark_with_console_attached() {
    let bulwark = workspace_bulwark().expect("bulwark binary");
    let spec = spec(bulwark);
    let _lock = RIG.lock().unwrap_or_else(|e| e.into_inner());
    let run = run_command(&spec, &["--version".to_owned()]).expect("rig run");
    assert_eq!(run.status, 0, "{}", run.console);
    assert!(run.output.contains("bulwark"), "{}", run.output);
    eprintln!(
        "rig command: kvm ready {:?}, QEMU {:.2?}, whole {:.2?}, L1 initramfs {} MiB",
        run.kvm_ready_wall,
        run.qemu_wall,
        run.wall,
        run.initramfs_bytes >> 20
    );
}

#[test]
fn rig_timeout_kills_qemu_and_says_so() {
    let bulwark = workspace_bulwark().expect("bulwark binary");
    let mut spec = spec(bulwark);
    // Long enough for L1 to boot and start the script on a loaded machine (kvm ready takes
    // 2-7 s here, QEMU 10 a little longer than 7.2), far shorter than the script.
    spec.timeout = Duration::from_secs(30);
    let _lock = RIG.lock().unwrap_or_else(|e| e.into_inner());
    let t = Instant::now();
    let e = run_script(&spec, "echo sleeping; sleep 600").unwrap_err();
    assert!(
        matches!(e, RigError::Qemu(QemuError::Timeout { .. })),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(36), "{:?}", t.elapsed());
    let msg = e.to_string();
    assert!(msg.contains("killed") && msg.contains("sleeping"), "{msg}");
}

#[test]
fn rig_wedged_l1_is_caught_by_its_heartbeat_and_sent_an_nmi() {
    let bulwark = workspace_bulwark().expect("bulwark binary");
    let mut spec = spec(bulwark);
    // A real wedge (L1 busy but never running its processes again) cannot be made on purpose;
    // stopping the heartbeat loop looks the same from the host.
    spec.wedged_after = Duration::from_secs(8);
    spec.hang_retries = 0;
    let _lock = RIG.lock().unwrap_or_else(|e| e.into_inner());
    let script = format!(
        "sleep 3; echo stopping the heartbeat; kill -STOP $(cat {}); sleep 600",
        bulwark_testrig::l1::HEARTBEAT_PID
    );
    let e = run_script(&spec, &script).unwrap_err();
    assert!(matches!(e, RigError::Qemu(QemuError::Wedged { .. })), "{e}");
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(msg.contains("stopping the heartbeat"), "{msg}");
    // Nudged twice on the way (at a third and two thirds of the wait), in vain here.
    assert!(msg.contains("2 nudges"), "{msg}");
    // L1's unknown_nmi_panic printed where it was.
    assert!(msg.contains("NMI received for unknown reason"), "{msg}");
}
