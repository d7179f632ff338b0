//! Guest images: what bulwark boots.
//!
//! Two kinds:
//! - **Function micro-VM payloads** built from C or assembly against the bulwark SDK
//!   ([`payload`], `sdk/bulwark.h`, `sdk/crt0.S`).
//! - **Linux guest images** built from stock Debian packages — no kernel is compiled:
//!
//! ```no_run
//! use bulwark_image::{build_image, ImageSpec, KernelSource};
//! let mut spec = ImageSpec::new("/tmp/image");            // default: newest 6.1 cloud kernel
//! spec.kernel = KernelSource::Package("linux-image-6.12.117+deb12-cloud-amd64-unsigned".into());
//! let manifest = build_image(&spec)?;
//! println!("{} (PVH entry {:?})", manifest.kernel.release, manifest.kernel.pvh_entry);
//! # Ok::<(), bulwark_image::ImageError>(())
//! ```
//!
//! [`build_image`] downloads (`apt-get download`, cached under `$XDG_CACHE_HOME/bulwark/debs` or
//! `~/.cache/bulwark/debs`, see [`packages`]) the kernel package and `busybox-static`, and writes
//! into [`ImageSpec::out_dir`]:
//!
//! | file | what |
//! | --- | --- |
//! | `bzImage` | the package's kernel, for the Linux 64-bit boot protocol |
//! | `vmlinux` | the ELF inside the bzImage ([`bzimage`]: lz4-legacy/gzip/xz/zstd payloads), for PVH; [`manifest::KernelInfo::pvh_entry`] says whether it has the PVH note |
//! | `initramfs.cpio` | uncompressed cpio newc ([`cpio`], [`initramfs`]): busybox and applet links, the virtio modules of the same package ([`GUEST_MODULES`] plus dependencies, [`modules`]), `/init`, [`ImageSpec::extra_files`] |
//! | `System.map` | the package's when it is a real map; Debian's is a placeholder, so usually made from the kernel's own kallsyms tables in `vmlinux` ([`kallsyms`]); absent when the kernel has neither |
//! | `config` | from the package |
//! | `manifest.json` | [`ImageManifest`]: kernel release and version, packages, initramfs contents, size and SHA-256 of every file; written last |
//!
//! The guest's `/init` ([`initramfs::guest_init_script`]) mounts proc, sys and devtmpfs, loads
//! the modules (virtio device drivers only for the devices the VM has), prints `bulwark-guest: ready uptime=<s>`, then runs the arguments the kernel
//! passes it (everything after `--` on the command line), prints `bulwark-guest: exit status
//! <N>` and powers off; with no arguments it runs a shell on the console.
//!
//! Modules whose `vermagic` does not name the kernel's release are refused at build time
//! ([`modules::ModulesError::VermagicMismatch`]). Every error names the problem and what to do.
#![forbid(unsafe_code)]

pub mod bzimage;
pub mod cpio;
pub mod decompress;
pub mod elf;
mod guest;
pub mod initramfs;
pub mod kallsyms;
pub mod kernel;
pub mod manifest;
pub mod modules;
pub mod packages;
pub mod payload;
pub mod rootfs;

pub use guest::{
    BZIMAGE_FILE, CONFIG_FILE, GUEST_MODULES, INITRAMFS_FILE, ImageError, ImageSpec,
    SYSTEM_MAP_FILE, VMLINUX_FILE, build_image,
};
pub use initramfs::{ExtraFile, FileSource, JOB_MARKER};
pub use kernel::{BusyboxSource, KernelFiles, KernelSource};
pub use manifest::ImageManifest;
pub use rootfs::ROOTFS_FILE;

/// A directory for one test, removed when dropped.
#[cfg(test)]
pub(crate) struct TestDir(pub std::path::PathBuf);

#[cfg(test)]
impl TestDir {
    pub(crate) fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("bulwark-image-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

#[cfg(test)]
impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
