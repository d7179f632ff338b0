//! `bulwark image build`: a bootable guest image directory from Debian packages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::bzimage::{BzImage, BzImageError};
use crate::elf::{Elf, ElfError};
use crate::initramfs::{self, ExtraFile, Initramfs, InitramfsError};
use crate::kallsyms::{self, KallsymsError};
use crate::kernel::{self, BusyboxSource, KernelError, KernelFiles, KernelSource};
use crate::manifest::{self, ImageManifest, InitramfsInfo, KernelInfo, ManifestError};
use crate::modules::ModulesError;
use crate::packages::{self, Apt, PackageError};
use crate::rootfs::{ROOTFS_FILE, RootfsError, build_rootfs};

/// The modules a guest image loads: virtio over MMIO (devices are declared in ACPI), block, net,
/// entropy and vsock. Their dependencies (virtio, virtio_ring, failover, net_failover, vsock,
/// the vsock transport core) come from the kernel package's metadata.
pub const GUEST_MODULES: &[&str] = &[
    // First, so that a panic anywhere later is reported to the monitor (ACPI QEMU0001).
    "pvpanic_mmio",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
    // The ACPI power button (a GED event) as an input device, so /init can power off when the
    // control plane presses it.
    "button",
    "evdev",
];

/// File names in an image directory.
pub const BZIMAGE_FILE: &str = "bzImage";
pub const VMLINUX_FILE: &str = "vmlinux";
pub const INITRAMFS_FILE: &str = "initramfs.cpio";
pub const SYSTEM_MAP_FILE: &str = "System.map";
pub const CONFIG_FILE: &str = "config";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error(transparent)]
    Modules(#[from] ModulesError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{path}: cannot extract vmlinux from the bzImage")]
    Extract {
        path: PathBuf,
        #[source]
        source: BzImageError,
    },
    #[error("the ELF extracted from {path} is not a kernel ELF")]
    Vmlinux {
        path: PathBuf,
        #[source]
        source: ElfError,
    },
    #[error(
        "cannot make a System.map from the kallsyms tables of the kernel in {path} (its package has no real one)"
    )]
    Kallsyms {
        path: PathBuf,
        #[source]
        source: KallsymsError,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What to build.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// The image directory; created if missing, its image files replaced.
    pub out_dir: PathBuf,
    pub kernel: KernelSource,
    pub busybox: BusyboxSource,
    /// Modules `/init` loads, with their dependencies; [`GUEST_MODULES`] by default.
    pub modules: Vec<String>,
    /// Files added to the initramfs (the hook for the guest agent and test programs).
    pub extra_files: Vec<ExtraFile>,
    /// The package cache; [`packages::cache_dir`] when `None`.
    pub cache_dir: Option<PathBuf>,
    /// Also write `rootfs.ext4`: the same tree as an ext4 disk, to boot with the root on
    /// `/dev/vda`.
    pub rootfs: bool,
}

impl ImageSpec {
    /// The default image: newest 6.1 cloud kernel, busybox-static, the guest modules.
    pub fn new(out_dir: impl Into<PathBuf>) -> Self {
        Self {
            out_dir: out_dir.into(),
            kernel: KernelSource::default(),
            busybox: BusyboxSource::default(),
            modules: GUEST_MODULES.iter().map(|m| (*m).to_owned()).collect(),
            extra_files: Vec::new(),
            cache_dir: None,
            rootfs: false,
        }
    }
}

/// Builds the image directory described by `spec` and returns its manifest (also written to
/// `manifest.json`, last, so a directory with a manifest is a complete image).
pub fn build_image(spec: &ImageSpec) -> Result<ImageManifest, ImageError> {
    let started = Instant::now();
    let cache = match &spec.cache_dir {
        Some(c) => c.clone(),
        None => packages::cache_dir()?,
    };
    let mut apt = Apt::new(cache);
    let mut query: Vec<&str> = KernelFiles::apt_query(&spec.kernel).into_iter().collect();
    if spec.busybox == BusyboxSource::Package {
        query.push(packages::BUSYBOX_PACKAGE);
    }
    apt.query(&query)?;
    let kernel = KernelFiles::locate(&spec.kernel, &mut apt)?;
    let (busybox, busybox_pkg) = kernel::locate_busybox(&spec.busybox, &mut apt)?;
    tracing::info!(release = %kernel.release, elapsed = ?started.elapsed(), "packages ready");

    let out = &spec.out_dir;
    std::fs::create_dir_all(out).map_err(|source| ImageError::Write {
        path: out.clone(),
        source,
    })?;
    // Whatever happens next, the directory is not a complete image until the manifest is back.
    let _ = std::fs::remove_file(out.join(manifest::MANIFEST_FILE));

    // Modules first: a mismatch refuses the build before anything big is written.
    let wanted: Vec<&str> = spec.modules.iter().map(String::as_str).collect();
    let set = kernel.module_tree()?.resolve(&wanted, &kernel.release)?;

    // Kernel: bzImage as is, and the ELF inside it for PVH.
    let bz_data = std::fs::read(&kernel.bzimage).map_err(|source| ImageError::Read {
        path: kernel.bzimage.clone(),
        source,
    })?;
    let extract_err = |source| ImageError::Extract {
        path: kernel.bzimage.clone(),
        source,
    };
    let bz = BzImage::parse(&bz_data).map_err(extract_err)?;
    let (compression, vmlinux) = bz.extract_vmlinux().map_err(extract_err)?;
    let pvh_entry = Elf::parse(&vmlinux)
        .and_then(|e| e.pvh_entry())
        .map_err(|source| ImageError::Vmlinux {
            path: kernel.bzimage.clone(),
            source,
        })?;
    if pvh_entry.is_none() {
        tracing::warn!("the kernel has no PVH note: vmlinux cannot be booted through PVH");
    }
    write(&out.join(BZIMAGE_FILE), &bz_data)?;
    write(&out.join(VMLINUX_FILE), &vmlinux)?;
    write_system_map(&kernel, &vmlinux, &out.join(SYSTEM_MAP_FILE))?;
    let boot_protocol = format!("{}.{:02}", bz.protocol >> 8, bz.protocol & 0xff);
    drop(vmlinux);

    let config = out.join(CONFIG_FILE);
    match &kernel.config {
        Some(src) => {
            std::fs::copy(src, &config).map_err(|source| ImageError::Write {
                path: config.clone(),
                source,
            })?;
        }
        None => {
            let _ = std::fs::remove_file(&config);
        }
    }

    // Initramfs.
    let cpio_path = out.join(INITRAMFS_FILE);
    let mut ir = Initramfs::create(&cpio_path)?;
    ir.busybox(&busybox)?;
    ir.modules(&set)?;
    ir.init(&initramfs::guest_init_script(&set))?;
    for f in &spec.extra_files {
        ir.extra(f)?;
    }
    let (_, cpio_len) = ir.finish()?;
    tracing::info!(
        bytes = cpio_len,
        modules = set.modules.len(),
        "initramfs written"
    );

    let rootfs_path = out.join(ROOTFS_FILE);
    if spec.rootfs {
        let size = build_rootfs(&cpio_path, &rootfs_path)?;
        tracing::info!(bytes = size, "root filesystem written");
    } else {
        let _ = std::fs::remove_file(&rootfs_path);
    }

    let mut files = BTreeMap::new();
    for name in [
        BZIMAGE_FILE,
        VMLINUX_FILE,
        INITRAMFS_FILE,
        SYSTEM_MAP_FILE,
        CONFIG_FILE,
        ROOTFS_FILE,
    ] {
        let path = out.join(name);
        if path.is_file() {
            files.insert(name.to_owned(), manifest::hash_file(&path)?);
        }
    }
    let manifest = ImageManifest {
        format: manifest::MANIFEST_FORMAT,
        kernel: KernelInfo {
            release: kernel.release.clone(),
            version: kernel.version.clone(),
            package: kernel.package.clone(),
            compression,
            boot_protocol,
            pvh_entry,
        },
        busybox: busybox_pkg,
        initramfs: InitramfsInfo {
            format: "cpio-newc".into(),
            compression: "none".into(),
            modules: set.modules.iter().map(|m| m.name.clone()).collect(),
            builtin: set.builtin.clone(),
            extra_files: spec.extra_files.iter().map(|f| f.path.clone()).collect(),
        },
        files,
    };
    manifest.write(out)?;
    tracing::info!(dir = %out.display(), elapsed = ?started.elapsed(), "image built");
    Ok(manifest)
}

/// Writes `dest`: the package's `System.map` when it is a real one, else (Debian ships a
/// placeholder) the map made from the kallsyms tables in `vmlinux`. A kernel without kallsyms
/// and without a real map gets none (introspection then says the map is missing); damaged
/// tables fail the build.
fn write_system_map(kernel: &KernelFiles, vmlinux: &[u8], dest: &Path) -> Result<(), ImageError> {
    if let Some(src) = &kernel.system_map {
        std::fs::copy(src, dest).map_err(|source| ImageError::Write {
            path: dest.to_owned(),
            source,
        })?;
        return Ok(());
    }
    match kallsyms::symbols(vmlinux) {
        Ok(symbols) => {
            tracing::info!(
                symbols = symbols.len(),
                "System.map made from the kernel's kallsyms tables (the package has no real one)"
            );
            write(dest, kallsyms::system_map(&symbols).as_bytes())
        }
        Err(KallsymsError::NoTables) => {
            tracing::warn!(
                "no System.map: the package has no real one and the kernel has no kallsyms tables"
            );
            let _ = std::fs::remove_file(dest);
            Ok(())
        }
        Err(source) => Err(ImageError::Kallsyms {
            path: kernel.bzimage.clone(),
            source,
        }),
    }
}

fn write(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    std::fs::write(path, data).map_err(|source| ImageError::Write {
        path: path.to_owned(),
        source,
    })
}
