//! The guest's root filesystem as an ext4 disk image, for booting with the root on
//! `/dev/vda` instead of in the initramfs: the same tree as the initramfs (busybox, modules,
//! `/init`, extra files), unpacked into a scratch directory and handed to `mke2fs -d`, which
//! builds the filesystem from a directory without mounting anything or needing root.
//!
//! The initramfs `/init` switches to it when the kernel command line says
//! `bulwark.root=/dev/vda` (see `initramfs::guest_init_script`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::{self, CpioError};

/// File name in an image directory.
pub const ROOTFS_FILE: &str = "rootfs.ext4";
/// Free space left in the filesystem beyond the tree, in MiB.
const HEADROOM_MIB: u64 = 48;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot read the initramfs {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the initramfs {path} is not a valid cpio archive: {source}")]
    Cpio { path: PathBuf, source: CpioError },
    #[error("initramfs entry {0:?} would leave the root directory")]
    BadPath(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot run mke2fs ({0}); it is in Debian's e2fsprogs package: apt-get install e2fsprogs"
    )]
    NoMke2fs(std::io::Error),
    #[error("mke2fs failed building {path}: {stderr}")]
    Mke2fs { path: PathBuf, stderr: String },
}

/// Builds `out` (ext4) from the tree in the initramfs at `cpio_path`. Returns its size.
pub fn build_rootfs(cpio_path: &Path, out: &Path) -> Result<u64, RootfsError> {
    let data = std::fs::read(cpio_path).map_err(|source| RootfsError::Read {
        path: cpio_path.to_owned(),
        source,
    })?;
    let entries = cpio::parse(&data).map_err(|source| RootfsError::Cpio {
        path: cpio_path.to_owned(),
        source,
    })?;
    let scratch = out.with_extension("tree");
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| RootfsError::Write { path, source }
    };
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(write_err(&scratch))?;
    let mut bytes = 0u64;
    for e in &entries {
        let rel = e.name.trim_start_matches('/');
        if rel.is_empty() || rel == "." {
            continue;
        }
        if rel.split('/').any(|c| c == "..") {
            return Err(RootfsError::BadPath(e.name.clone()));
        }
        let path = scratch.join(rel);
        if e.is_dir() {
            std::fs::create_dir_all(&path).map_err(write_err(&path))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(e.perm()))
                .map_err(write_err(&path))?;
        } else if e.is_symlink() {
            let target = String::from_utf8_lossy(&e.data).into_owned();
            let _ = std::fs::remove_file(&path);
            std::os::unix::fs::symlink(target, &path).map_err(write_err(&path))?;
        } else if e.is_file() {
            std::fs::write(&path, &e.data).map_err(write_err(&path))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(e.perm()))
                .map_err(write_err(&path))?;
            bytes += e.data.len() as u64;
        }
        // Device nodes are skipped: /init mounts devtmpfs on /dev.
    }
    let size_mib = bytes.div_ceil(1 << 20) + HEADROOM_MIB;
    let _ = std::fs::remove_file(out);
    let o = Command::new("mke2fs")
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "bulwark-root",
            "-E",
            "root_owner=0:0",
            "-d",
        ])
        .arg(&scratch)
        .arg(out)
        .arg(format!("{size_mib}M"))
        .output()
        .map_err(RootfsError::NoMke2fs)?;
    let _ = std::fs::remove_dir_all(&scratch);
    if !o.status.success() {
        return Err(RootfsError::Mke2fs {
            path: out.to_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_owned(),
        });
    }
    Ok(size_mib << 20)
}
