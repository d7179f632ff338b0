//! `manifest.json`: what an image directory holds, where it came from, and the SHA-256 of every
//! file, so that a run can check it boots what was built.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::decompress::Compression;

pub const MANIFEST_FILE: &str = "manifest.json";
/// Bumped when the manifest's meaning changes.
pub const MANIFEST_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a bulwark image manifest; rebuild the image with `bulwark image build`")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path}: manifest format {found}, this bulwark reads {MANIFEST_FORMAT}; rebuild the image"
    )]
    Format { path: PathBuf, found: u32 },
    #[error(
        "{file} in {dir} does not match the manifest ({problem}); the image was changed after it was built: rebuild it"
    )]
    Mismatch {
        dir: PathBuf,
        file: String,
        problem: String,
    },
}

/// Size and SHA-256 (lower-case hex) of one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub size: u64,
    pub sha256: String,
}

/// A Debian package an image was built from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRef {
    pub name: String,
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// `uname -r`, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The kernel's full version string from the bzImage header.
    pub version: String,
    /// The package it came from (absent for a kernel tree given by path).
    pub package: Option<PackageRef>,
    /// The bzImage payload's compression.
    pub compression: Compression,
    /// Boot protocol version of the bzImage, e.g. `2.15`.
    pub boot_protocol: String,
    /// PVH entry point of `vmlinux` (`XEN_ELFNOTE_PHYS32_ENTRY`); absent when the kernel has no
    /// PVH note, so `vmlinux` cannot be booted through PVH.
    pub pvh_entry: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitramfsInfo {
    /// Always `cpio-newc`.
    pub format: String,
    /// Always `none`: see `initramfs.rs` for why.
    pub compression: String,
    /// Modules in the order `/init` loads them.
    pub modules: Vec<String>,
    /// Requested modules that are built into this kernel.
    pub builtin: Vec<String>,
    /// Extra files added through [`crate::ImageSpec::extra_files`] (guest paths).
    pub extra_files: Vec<String>,
}

/// The manifest of an image directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    pub format: u32,
    pub kernel: KernelInfo,
    /// The busybox package (absent when a busybox binary was given by path).
    pub busybox: Option<PackageRef>,
    pub initramfs: InitramfsInfo,
    /// File name in the image directory -> digest; every file but the manifest itself.
    pub files: BTreeMap<String, FileDigest>,
}

impl ImageManifest {
    /// Reads `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ManifestError::Read {
            path: path.clone(),
            source,
        })?;
        let m: Self = serde_json::from_str(&text).map_err(|source| ManifestError::Parse {
            path: path.clone(),
            source,
        })?;
        if m.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format {
                path,
                found: m.format,
            });
        }
        Ok(m)
    }

    /// Writes `dir/manifest.json` (pretty-printed, with a final newline).
    pub fn write(&self, dir: &Path) -> Result<(), ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let mut text =
            serde_json::to_string_pretty(self).map_err(|source| ManifestError::Parse {
                path: path.clone(),
                source,
            })?;
        text.push('\n');
        std::fs::write(&path, text).map_err(|source| ManifestError::Write { path, source })
    }

    /// Re-hashes every file listed and compares.
    pub fn verify(&self, dir: &Path) -> Result<(), ManifestError> {
        for (name, want) in &self.files {
            let got = hash_file(&dir.join(name))?;
            if got != *want {
                let problem = if got.size != want.size {
                    format!("{} bytes, expected {}", got.size, want.size)
                } else {
                    "SHA-256 differs".to_owned()
                };
                return Err(ManifestError::Mismatch {
                    dir: dir.to_owned(),
                    file: name.clone(),
                    problem,
                });
            }
        }
        Ok(())
    }

    /// Path of a file of the image, if the manifest lists it.
    pub fn path(&self, dir: &Path, name: &str) -> Option<PathBuf> {
        self.files.contains_key(name).then(|| dir.join(name))
    }
}

/// Size and SHA-256 of a file, read in 1 MiB pieces.
pub fn hash_file(path: &Path) -> Result<FileDigest, ManifestError> {
    let read_err = |source| ManifestError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(FileDigest {
        size,
        sha256: hex(&hasher.finalize()),
    })
}

/// SHA-256 of bytes, lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(files: BTreeMap<String, FileDigest>) -> ImageManifest {
        ImageManifest {
            format: MANIFEST_FORMAT,
            kernel: KernelInfo {
                release: "6.1.0-99-cloud-amd64".into(),
                version: "6.1.0-99-cloud-amd64 (x) #1".into(),
                package: Some(PackageRef {
                    name: "linux-image-6.1.0-99-cloud-amd64-unsigned".into(),
                    version: "6.1.1-1".into(),
                }),
                compression: Compression::Lz4Legacy,
                boot_protocol: "2.15".into(),
                pvh_entry: Some(0x100_0000),
            },
            busybox: None,
            initramfs: InitramfsInfo {
                format: "cpio-newc".into(),
                compression: "none".into(),
                modules: vec!["virtio".into()],
                builtin: vec![],
                extra_files: vec![],
            },
            files,
        }
    }

    #[test]
    fn manifest_hash_matches_known_sha256() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let t = crate::TestDir::new("manifest-hash");
        let dir = &t.0;
        // Larger than the 1 MiB read buffer, to cover the loop.
        let data: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i % 256) as u8).collect();
        std::fs::write(dir.join("f"), &data).unwrap();
        let d = hash_file(&dir.join("f")).unwrap();
        assert_eq!(d.size, data.len() as u64);
        assert_eq!(d.sha256, sha256_hex(&data));
    }

    #[test]
    fn manifest_round_trip_and_verify_detects_changes() {
        let t = crate::TestDir::new("manifest-verify");
        let dir = &t.0;
        std::fs::write(dir.join("bzImage"), b"kernel").unwrap();
        let mut files = BTreeMap::new();
        files.insert(
            "bzImage".to_owned(),
            hash_file(&dir.join("bzImage")).unwrap(),
        );
        let m = sample(files);
        m.write(dir).unwrap();
        let back = ImageManifest::read(dir).unwrap();
        assert_eq!(back, m);
        back.verify(dir).unwrap();
        let json = std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
        assert!(json.contains("\"compression\": \"lz4-legacy\""), "{json}");

        std::fs::write(dir.join("bzImage"), b"kernel!").unwrap();
        let e = back.verify(dir).unwrap_err();
        assert!(matches!(e, ManifestError::Mismatch { ref file, .. } if file == "bzImage"));
        std::fs::write(dir.join("bzImage"), b"Kernel").unwrap();
        assert!(
            back.verify(dir)
                .unwrap_err()
                .to_string()
                .contains("SHA-256")
        );
    }

    #[test]
    fn manifest_wrong_format_or_garbage_is_refused() {
        let t = crate::TestDir::new("manifest-format");
        let dir = &t.0;
        let mut m = sample(BTreeMap::new());
        m.format = 99;
        m.write(dir).unwrap();
        assert!(matches!(
            ImageManifest::read(dir),
            Err(ManifestError::Format { found: 99, .. })
        ));
        std::fs::write(dir.join(MANIFEST_FILE), "{").unwrap();
        assert!(matches!(
            ImageManifest::read(dir),
            Err(ManifestError::Parse { .. })
        ));
    }
}
