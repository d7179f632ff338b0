//! Where a kernel comes from: a Debian package (by default the newest 6.1 cloud kernel), a
//! `.deb` file, or an unpacked tree (`/` of a Debian system works), and where busybox comes from.
//! Both the image builder and the nested rig use this.

use std::path::{Path, PathBuf};

use crate::bzimage::{BzImage, BzImageError};
use crate::kallsyms;
use crate::manifest::PackageRef;
use crate::modules::{ModuleTree, ModulesError};
use crate::packages::{self, Apt, BUSYBOX_PACKAGE, PackageError};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error("no kernel in {dir} (no vmlinuz-*): is it an unpacked kernel package?")]
    NoKernel { dir: PathBuf },
    #[error("several kernels in {dir} ({releases}): name the release to use")]
    SeveralKernels { dir: PathBuf, releases: String },
    #[error(
        "no module directory for {release} under {root}/lib/modules: the kernel tree is incomplete"
    )]
    NoModules { root: PathBuf, release: String },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a usable bzImage")]
    BzImage {
        path: PathBuf,
        #[source]
        source: BzImageError,
    },
    #[error(
        "{path} says it is kernel {found} but its file name says {expected}; the tree mixes kernels"
    )]
    ReleaseMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path} has no version string in its header; cannot match modules to it")]
    NoVersion { path: PathBuf },
    #[error("package {package} has no {file}: is it a busybox-static package?")]
    NoBusybox { package: String, file: &'static str },
    #[error(transparent)]
    Modules(#[from] ModulesError),
}

/// Where to take the kernel from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KernelSource {
    /// The newest `linux-image-6.1.0-*-cloud-amd64-unsigned` apt knows.
    #[default]
    DefaultPackage,
    /// A Debian kernel package by name (e.g. `linux-image-6.12.117+deb12-cloud-amd64-unsigned`).
    Package(String),
    /// A kernel `.deb` file already on disk (unpacked into the cache).
    Deb(PathBuf),
    /// An unpacked tree with `boot/vmlinuz-<release>` and `lib/modules/<release>/`; `release`
    /// picks one when there are several.
    Tree {
        root: PathBuf,
        release: Option<String>,
    },
}

/// The files of one kernel.
#[derive(Clone, Debug)]
pub struct KernelFiles {
    /// `uname -r`.
    pub release: String,
    /// Full version string from the bzImage header.
    pub version: String,
    pub package: Option<PackageRef>,
    pub bzimage: PathBuf,
    /// The package's `System.map-<release>`, when it names real symbols: Debian's is a
    /// one-line placeholder pointing at the `-dbg` package ([`kallsyms::map_has_symbols`]),
    /// and then this is `None` and the image builder makes the map from the kernel's own
    /// kallsyms tables ([`kallsyms::symbols`]).
    pub system_map: Option<PathBuf>,
    pub config: Option<PathBuf>,
    /// `lib/modules/<release>`.
    pub modules_dir: PathBuf,
}

impl KernelFiles {
    /// Finds (downloading and unpacking through `apt` if needed) the kernel of `source`.
    pub fn locate(source: &KernelSource, apt: &mut Apt) -> Result<Self, KernelError> {
        let (root, release, package) = match source {
            KernelSource::DefaultPackage => {
                let (name, version) = apt.default_kernel()?;
                let p = packages::fetch(&name, &version, apt.cache())?;
                (p.root, None, Some(PackageRef { name, version }))
            }
            KernelSource::Package(name) => {
                let p = apt.fetch(name)?;
                let r = PackageRef {
                    name: p.name,
                    version: p.version,
                };
                (p.root, None, Some(r))
            }
            KernelSource::Deb(deb) => (packages::unpack_local(deb, apt.cache())?, None, None),
            KernelSource::Tree { root, release } => (root.clone(), release.clone(), None),
        };
        Self::in_tree(&root, release.as_deref(), package)
    }

    fn in_tree(
        root: &Path,
        release: Option<&str>,
        package: Option<PackageRef>,
    ) -> Result<Self, KernelError> {
        let boot = root.join("boot");
        let release = match release {
            Some(r) => r.to_owned(),
            None => {
                let mut releases: Vec<String> = std::fs::read_dir(&boot)
                    .map_err(|source| KernelError::Read {
                        path: boot.clone(),
                        source,
                    })?
                    .filter_map(Result::ok)
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.strip_prefix("vmlinuz-").map(str::to_owned)
                    })
                    .collect();
                releases.sort();
                match releases.len() {
                    0 => return Err(KernelError::NoKernel { dir: boot }),
                    1 => releases.remove(0),
                    _ => {
                        return Err(KernelError::SeveralKernels {
                            dir: boot,
                            releases: releases.join(", "),
                        });
                    }
                }
            }
        };
        let bzimage = boot.join(format!("vmlinuz-{release}"));
        let data = std::fs::read(&bzimage).map_err(|source| KernelError::Read {
            path: bzimage.clone(),
            source,
        })?;
        let bz = BzImage::parse(&data).map_err(|source| KernelError::BzImage {
            path: bzimage.clone(),
            source,
        })?;
        let version = bz
            .kernel_version
            .clone()
            .ok_or_else(|| KernelError::NoVersion {
                path: bzimage.clone(),
            })?;
        let found = bz.release().unwrap_or_default();
        if found != release {
            return Err(KernelError::ReleaseMismatch {
                path: bzimage,
                found: found.to_owned(),
                expected: release,
            });
        }
        let modules_dir = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| root.join(d).join(&release))
            .find(|d| d.is_dir())
            .ok_or_else(|| KernelError::NoModules {
                root: root.to_owned(),
                release: release.clone(),
            })?;
        let optional = |name: String| Some(boot.join(name)).filter(|p| p.is_file());
        let system_map = match optional(format!("System.map-{release}")) {
            Some(map) => real_system_map(map)?,
            None => None,
        };
        Ok(Self {
            system_map,
            config: optional(format!("config-{release}")),
            release,
            version,
            package,
            bzimage,
            modules_dir,
        })
    }

    /// What to ask apt about before [`KernelFiles::locate`], so that one `apt-cache` call answers
    /// for everything ([`Apt::query`]).
    pub fn apt_query(source: &KernelSource) -> Option<&str> {
        match source {
            KernelSource::DefaultPackage => Some(packages::DEFAULT_KERNEL_GLOB),
            KernelSource::Package(name) => Some(name),
            KernelSource::Deb(_) | KernelSource::Tree { .. } => None,
        }
    }

    pub fn module_tree(&self) -> Result<ModuleTree, KernelError> {
        Ok(ModuleTree::open(&self.modules_dir)?)
    }
}

/// `path` if it is a real `System.map`: its first 4 KiB name a symbol (a real map has
/// thousands of lines; Debian's placeholder has one, naming none).
fn real_system_map(path: PathBuf) -> Result<Option<PathBuf>, KernelError> {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(4096).read_to_end(&mut head))
        .map_err(|source| KernelError::Read {
            path: path.clone(),
            source,
        })?;
    Ok(kallsyms::map_has_symbols(&head).then_some(path))
}

/// Where to take busybox from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BusyboxSource {
    /// Debian's `busybox-static`.
    #[default]
    Package,
    /// A static busybox binary on disk.
    File(PathBuf),
}

/// The busybox binary of `source`, and its package when it came from one.
pub fn locate_busybox(
    source: &BusyboxSource,
    apt: &mut Apt,
) -> Result<(PathBuf, Option<PackageRef>), KernelError> {
    match source {
        BusyboxSource::File(p) => Ok((p.clone(), None)),
        BusyboxSource::Package => {
            let p = apt.fetch(BUSYBOX_PACKAGE)?;
            let bin = p.root.join("bin/busybox");
            if !bin.is_file() {
                return Err(KernelError::NoBusybox {
                    package: p.name,
                    file: "bin/busybox",
                });
            }
            Ok((
                bin,
                Some(PackageRef {
                    name: p.name,
                    version: p.version,
                }),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REL: &str = "6.1.0-99-cloud-amd64";

    fn tree(tag: &str, releases: &[&str]) -> (crate::TestDir, PathBuf) {
        let t = crate::TestDir::new(&format!("kernel-{tag}"));
        let root = t.0.clone();
        for r in releases {
            std::fs::create_dir_all(root.join("boot")).unwrap();
            std::fs::create_dir_all(root.join("lib/modules").join(r)).unwrap();
            let payload = {
                let mut c = crate::decompress::gzip_compress(b"\x7fELF");
                c.extend_from_slice(&4u32.to_le_bytes());
                c
            };
            let img = crate::bzimage::synthetic_bzimage(&payload, &format!("{r} (test) #1 SMP"));
            std::fs::write(root.join(format!("boot/vmlinuz-{r}")), img).unwrap();
            std::fs::write(root.join(format!("boot/config-{r}")), "CONFIG_PVH=y\n").unwrap();
        }
        (t, root)
    }

    #[test]
    fn kernel_tree_with_one_release_is_found() {
        let (_t, root) = tree("one", &[REL]);
        let src = KernelSource::Tree {
            root: root.clone(),
            release: None,
        };
        let k = KernelFiles::locate(&src, &mut Apt::new(&root)).unwrap();
        assert_eq!(k.release, REL);
        assert_eq!(k.version, format!("{REL} (test) #1 SMP"));
        assert!(k.config.is_some());
        assert!(k.system_map.is_none());
        assert_eq!(k.modules_dir, root.join("lib/modules").join(REL));
    }

    #[test]
    fn kernel_tree_placeholder_system_map_is_not_the_map() {
        let (_t, root) = tree("placeholder-map", &[REL]);
        let map = root.join(format!("boot/System.map-{REL}"));
        let src = KernelSource::Tree {
            root: root.clone(),
            release: None,
        };
        std::fs::write(
            &map,
            "ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n",
        )
        .unwrap();
        let k = KernelFiles::locate(&src, &mut Apt::new(&root)).unwrap();
        assert_eq!(k.system_map, None);
        std::fs::write(
            &map,
            "ffffffff81000000 T _text\nffffffff81000000 T startup_64\n",
        )
        .unwrap();
        let k = KernelFiles::locate(&src, &mut Apt::new(&root)).unwrap();
        assert_eq!(k.system_map, Some(map));
    }

    #[test]
    fn kernel_tree_with_several_releases_needs_a_name() {
        let (_t, root) = tree("several", &[REL, "6.1.0-98-cloud-amd64"]);
        let src = KernelSource::Tree {
            root: root.clone(),
            release: None,
        };
        assert!(matches!(
            KernelFiles::locate(&src, &mut Apt::new(&root)),
            Err(KernelError::SeveralKernels { .. })
        ));
        let src = KernelSource::Tree {
            root: root.clone(),
            release: Some(REL.into()),
        };
        assert_eq!(
            KernelFiles::locate(&src, &mut Apt::new(&root))
                .unwrap()
                .release,
            REL
        );
    }

    #[test]
    fn kernel_whose_header_disagrees_with_its_name_is_refused() {
        let (_t, root) = tree("mismatch", &[REL]);
        std::fs::rename(
            root.join(format!("boot/vmlinuz-{REL}")),
            root.join("boot/vmlinuz-6.1.0-1-cloud-amd64"),
        )
        .unwrap();
        let src = KernelSource::Tree {
            root: root.clone(),
            release: None,
        };
        assert!(matches!(
            KernelFiles::locate(&src, &mut Apt::new(&root)),
            Err(KernelError::ReleaseMismatch { .. })
        ));
    }

    #[test]
    fn kernel_tree_without_kernel_is_named() {
        let (_t, root) = tree("empty", &[]);
        std::fs::create_dir_all(root.join("boot")).unwrap();
        let src = KernelSource::Tree {
            root: root.clone(),
            release: None,
        };
        assert!(matches!(
            KernelFiles::locate(&src, &mut Apt::new(&root)),
            Err(KernelError::NoKernel { .. })
        ));
    }
}
