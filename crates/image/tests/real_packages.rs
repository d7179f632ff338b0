//! End-to-end image build from the real Debian packages (downloads ~28 MB on first use).
//!
//! Runs only when asked: `cargo test -p bulwark-image --test real_packages -- --ignored
//! --nocapture`. Set `BULWARK_TEST_KERNEL_PACKAGE` to build another kernel
//! (e.g. a 6.12 cloud kernel: zstd payload, `.ko.xz` modules, virtio built in). The rig's tests
//! build the default image for real on every run.

use std::time::Instant;

use bulwark_image::{ImageManifest, ImageSpec, KernelSource, build_image, cpio, elf::Elf};

#[test]
#[ignore = "downloads Debian packages; run with --ignored"]
fn image_build_from_debian_packages_cold_and_warm() {
    let base = std::env::temp_dir().join(format!("bulwark-image-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let mut spec = ImageSpec::new(base.join("image"));
    spec.cache_dir = Some(base.join("cache"));
    if let Ok(p) = std::env::var("BULWARK_TEST_KERNEL_PACKAGE") {
        spec.kernel = KernelSource::Package(p);
    }

    let t = Instant::now();
    let m = build_image(&spec).expect("cold build");
    let cold = t.elapsed();
    let t = Instant::now();
    let m2 = build_image(&spec).expect("warm build");
    let warm = t.elapsed();
    assert_eq!(m, m2, "builds are reproducible");

    let dir = &spec.out_dir;
    assert_eq!(ImageManifest::read(dir).unwrap(), m);
    m.verify(dir).unwrap();
    for f in [
        "bzImage",
        "vmlinux",
        "initramfs.cpio",
        "System.map",
        "config",
    ] {
        assert!(m.files.contains_key(f), "{f} missing from the manifest");
    }
    let vmlinux = std::fs::read(dir.join("vmlinux")).unwrap();
    let elf = Elf::parse(&vmlinux).unwrap();
    assert!(
        elf.pvh_entry().unwrap().is_some(),
        "Debian's kernel has CONFIG_PVH=y"
    );
    assert_eq!(elf.pvh_entry().unwrap(), m.kernel.pvh_entry);

    let archive = std::fs::read(dir.join("initramfs.cpio")).unwrap();
    let entries = cpio::parse(&archive).unwrap();
    let has = |n: &str| entries.iter().any(|e| e.name == n);
    assert!(has("init") && has("bin/busybox") && has("bin/sh") && has("sbin/poweroff"));
    assert!(has("usr/bin/setsid") && has("bin/cttyhack") && has("sbin/insmod"));
    let rel = &m.kernel.release;
    assert!(has(&format!("lib/modules/{rel}/modules.dep")));
    for module in [
        "virtio_mmio",
        "virtio_blk",
        "virtio_net",
        "virtio_rng",
        "vmw_vsock_virtio_transport",
    ] {
        assert!(
            m.initramfs.modules.iter().any(|x| x == module)
                || m.initramfs.builtin.iter().any(|x| x == module),
            "{module} neither loaded nor built in: {:?}",
            m.initramfs
        );
    }
    eprintln!(
        "image {rel} ({}): cold {cold:.2?}, warm {warm:.2?}; initramfs {} bytes, {} modules {:?}, vmlinux {} bytes, payload {}",
        m.kernel
            .package
            .as_ref()
            .map(|p| p.version.as_str())
            .unwrap_or("-"),
        archive.len(),
        m.initramfs.modules.len(),
        m.initramfs.modules,
        vmlinux.len(),
        m.kernel.compression,
    );
    let _ = std::fs::remove_dir_all(&base);
}
