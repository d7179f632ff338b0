//! `bulwark image build` refusals: an unknown kernel package, and no apt at all.

mod common;

use common::*;

#[test]
fn unknown_kernel_package_is_named() {
    let dir = TestDir::new("img-unknown");
    let o = run(
        &[
            "image",
            "build",
            "--out",
            dir.path("img").to_str().unwrap(),
            "--kernel-package",
            "linux-image-0.0.0-no-such-cloud-amd64-unsigned",
        ],
        b"",
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("linux-image-0.0.0-no-such-cloud-amd64-unsigned"),
        "{err}"
    );
    assert!(
        !dir.path("img").join("manifest.json").exists(),
        "no half-built image"
    );
}

#[test]
fn missing_apt_says_what_to_install_or_pass() {
    let dir = TestDir::new("img-noapt");
    let o = std::process::Command::new(bulwark())
        .args(["image", "build", "--out", dir.path("img").to_str().unwrap()])
        .env("PATH", dir.0.to_str().unwrap()) // no apt-get, apt-cache, dpkg-deb here
        .env("XDG_CACHE_HOME", dir.path("cache"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("install apt"), "{err}");
    assert!(err.contains("pass the kernel"), "{err}");
}
