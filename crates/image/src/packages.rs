//! Debian packages: resolving names with `apt-cache`, downloading with `apt-get download`,
//! unpacking with `dpkg-deb -x`, all cached.
//!
//! Cache layout (under [`cache_dir`], `$XDG_CACHE_HOME/bulwark/debs` or `~/.cache/bulwark/debs`):
//! `<name>_<version>_<arch>.deb` as apt names it, and next to it `<name>_<version>.d/`, the
//! unpacked tree. Both are created under a temporary name (unique per process and thread) and
//! renamed into place, so concurrent builds and interrupted ones never see half a package. A
//! warm build only asks `apt-cache` for the candidate version (local, no network) and finds
//! both in the cache.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The package providing a static `/bin/busybox`.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error(
        "`{tool}` is not available: install apt (Debian/Ubuntu) to download packages, or pass the kernel and busybox files explicitly"
    )]
    AptMissing {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`dpkg-deb` is not available to unpack {deb}: install dpkg, or pass an unpacked kernel tree"
    )]
    DpkgMissing {
        deb: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "unknown package {name:?}: apt has no installable candidate; check the name (e.g. `apt-cache search linux-image | grep cloud-amd64`) or run `apt-get update`"
    )]
    UnknownPackage { name: String },
    #[error(
        "no package matches {pattern}: run `apt-get update`, or name a kernel package explicitly"
    )]
    NoDefaultKernel { pattern: &'static str },
    #[error("`apt-get download {name}` failed (network or repository problem?):\n{stderr}")]
    DownloadFailed { name: String, stderr: String },
    #[error("`{command}` failed:\n{stderr}")]
    ToolFailed { command: String, stderr: String },
    #[error("no cache directory: set XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    #[error("cannot use the package cache at {path}")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A downloaded and unpacked package.
#[derive(Clone, Debug)]
pub struct Package {
    pub name: String,
    pub version: String,
    /// The `.deb` file.
    pub deb: PathBuf,
    /// Where its contents are unpacked (`dpkg-deb -x`).
    pub root: PathBuf,
}

/// `$XDG_CACHE_HOME/bulwark/debs`, else `$HOME/.cache/bulwark/debs`.
pub fn cache_dir() -> Result<PathBuf, PackageError> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })
        .ok_or(PackageError::NoCacheDir)?;
    Ok(base.join("bulwark").join("debs"))
}

fn run(tool: &'static str, args: &[&str]) -> Result<std::process::Output, PackageError> {
    tracing::debug!(tool, ?args, "running");
    Command::new(tool)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| PackageError::AptMissing { tool, source })
}

/// Glob for the default kernel packages.
pub const DEFAULT_KERNEL_GLOB: &str = "linux-image-6.1.0-*-cloud-amd64-unsigned";

/// apt, with its answers remembered: each `apt-cache` call costs about half a second, so callers
/// ask for everything they need at once ([`Apt::query`]) and later look-ups are free.
#[derive(Debug)]
pub struct Apt {
    cache: PathBuf,
    /// Package name -> candidate version (`None`: known to apt but not installable).
    candidates: BTreeMap<String, Option<String>>,
    /// Globs already asked for.
    asked: BTreeSet<String>,
}

impl Apt {
    /// Downloads go to `cache` (see [`cache_dir`]).
    pub fn new(cache: impl Into<PathBuf>) -> Self {
        Self {
            cache: cache.into(),
            candidates: BTreeMap::new(),
            asked: BTreeSet::new(),
        }
    }

    pub fn cache(&self) -> &Path {
        &self.cache
    }

    /// Asks `apt-cache policy` about names or globs (one call for all that are new).
    pub fn query(&mut self, names: &[&str]) -> Result<(), PackageError> {
        let new: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !self.asked.contains(*n))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let mut args = vec!["policy"];
        args.extend(&new);
        let out = run("apt-cache", &args)?;
        self.candidates
            .extend(parse_policy(&String::from_utf8_lossy(&out.stdout)));
        self.asked.extend(new.iter().map(|n| (*n).to_owned()));
        Ok(())
    }

    /// The version apt would install for `name` (its candidate).
    pub fn candidate(&mut self, name: &str) -> Result<String, PackageError> {
        self.query(&[name])?;
        self.candidates
            .get(name)
            .cloned()
            .flatten()
            .ok_or_else(|| PackageError::UnknownPackage {
                name: name.to_owned(),
            })
    }

    /// The default kernel package: the newest `linux-image-6.1.0-N-cloud-amd64-unsigned` that apt
    /// can install. Returns (name, version).
    pub fn default_kernel(&mut self) -> Result<(String, String), PackageError> {
        self.query(&[DEFAULT_KERNEL_GLOB])?;
        let installable: Vec<(&String, &String)> = self
            .candidates
            .iter()
            .filter_map(|(n, v)| Some((n, v.as_ref()?)))
            .collect();
        newest_kernel(installable.iter().map(|(n, _)| n.as_str()))
            .and_then(|n| installable.iter().find(|(x, _)| **x == n))
            .map(|(n, v)| ((*n).clone(), (*v).clone()))
            .ok_or(PackageError::NoDefaultKernel {
                pattern: DEFAULT_KERNEL_GLOB,
            })
    }

    /// Downloads and unpacks `name` at its candidate version (both cached).
    pub fn fetch(&mut self, name: &str) -> Result<Package, PackageError> {
        let version = self.candidate(name)?;
        fetch(name, &version, &self.cache)
    }
}

/// `apt-cache policy` output: blocks starting with `name:` at column 0, each with a
/// `Candidate:` line.
fn parse_policy(policy: &str) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in policy.lines() {
        if !line.starts_with(char::is_whitespace) {
            current = line.strip_suffix(':').map(str::to_owned);
            if let Some(name) = &current {
                out.entry(name.clone()).or_insert(None);
            }
        } else if let (Some(name), Some(v)) = (&current, line.trim().strip_prefix("Candidate:")) {
            let v = v.trim();
            if !v.is_empty() && v != "(none)" {
                out.insert(name.clone(), Some(v.to_owned()));
            }
        }
    }
    out
}

/// The newest default-family kernel among `names`, by ABI number.
fn newest_kernel<'a>(names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    names
        .filter_map(|n| {
            let abi = n
                .strip_prefix("linux-image-6.1.0-")?
                .strip_suffix("-cloud-amd64-unsigned")?;
            Some((abi.parse::<u32>().ok()?, n))
        })
        .max_by_key(|(abi, _)| *abi)
        .map(|(_, n)| n)
}

/// Downloads (unless cached) and unpacks (unless cached) version `version` of `name` into
/// `cache`.
pub fn fetch(name: &str, version: &str, cache: &Path) -> Result<Package, PackageError> {
    let cache_err = |path: &Path| {
        let path = path.to_owned();
        move |source| PackageError::Cache { path, source }
    };
    std::fs::create_dir_all(cache).map_err(cache_err(cache))?;
    let stem = format!("{name}_{}", version.replace(':', "%3a"));
    let root = cache.join(format!("{stem}.d"));
    let deb = match find_deb(cache, &stem).map_err(cache_err(cache))? {
        Some(deb) => deb,
        None => download(name, version, cache, &stem)?,
    };
    if !root.join(".complete").exists() {
        unpack(&deb, &root)?;
    }
    Ok(Package {
        name: name.to_owned(),
        version: version.to_owned(),
        deb,
        root,
    })
}

fn find_deb(cache: &Path, stem: &str) -> std::io::Result<Option<PathBuf>> {
    for e in std::fs::read_dir(cache)? {
        let path = e?.path();
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        if file.starts_with(&format!("{stem}_")) && file.ends_with(".deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

fn download(name: &str, version: &str, cache: &Path, stem: &str) -> Result<PathBuf, PackageError> {
    let tmp = cache.join(format!(".download-{}-{stem}", unique_tag()));
    let cache_err = |source| PackageError::Cache {
        path: tmp.clone(),
        source,
    };
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(cache_err)?;
    tracing::info!(name, version, "downloading");
    let spec = format!("{name}={version}");
    let out = Command::new("apt-get")
        .args(["download", "-q", &spec])
        .current_dir(&tmp)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| PackageError::AptMissing {
            tool: "apt-get",
            source,
        })?;
    let deb = find_deb(&tmp, stem).map_err(cache_err)?;
    let (true, Some(deb)) = (out.status.success(), deb) else {
        let _ = std::fs::remove_dir_all(&tmp);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if stderr.contains("Unable to locate package") || stderr.contains("Can't select") {
            return Err(PackageError::UnknownPackage {
                name: name.to_owned(),
            });
        }
        return Err(PackageError::DownloadFailed {
            name: name.to_owned(),
            stderr,
        });
    };
    let dest = cache.join(deb.file_name().unwrap_or_default());
    let renamed = std::fs::rename(&deb, &dest).map_err(cache_err);
    let _ = std::fs::remove_dir_all(&tmp);
    renamed?;
    Ok(dest)
}

/// Process id and a per-process sequence number: temporary names that neither another
/// process nor another thread of this one uses at the same time.
fn unique_tag() -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

fn unpack(deb: &Path, root: &Path) -> Result<(), PackageError> {
    let parent = root.parent().unwrap_or(Path::new("."));
    let tmp = parent.join(format!(
        ".unpack-{}-{}",
        unique_tag(),
        root.file_name().unwrap_or_default().to_string_lossy()
    ));
    let cache_err = |path: &Path| {
        let path = path.to_owned();
        move |source| PackageError::Cache { path, source }
    };
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(cache_err(&tmp))?;
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(&tmp)
        .output()
        .map_err(|source| PackageError::DpkgMissing {
            deb: deb.to_owned(),
            source,
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(PackageError::ToolFailed {
            command: format!("dpkg-deb -x {}", deb.display()),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    std::fs::write(tmp.join(".complete"), b"").map_err(cache_err(&tmp))?;
    if root.join(".complete").exists() {
        // Another build finished the same unpack meanwhile, and may be reading it.
        let _ = std::fs::remove_dir_all(&tmp);
        return Ok(());
    }
    // A half-written tree of an interrupted build (no `.complete`).
    let _ = std::fs::remove_dir_all(root);
    if let Err(e) = std::fs::rename(&tmp, root) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process may have finished the same unpack first.
        if !root.join(".complete").exists() {
            return Err(PackageError::Cache {
                path: root.to_owned(),
                source: e,
            });
        }
    }
    Ok(())
}

/// Unpacks a `.deb` the caller already has, into a cache directory named after the file.
pub fn unpack_local(deb: &Path, cache: &Path) -> Result<PathBuf, PackageError> {
    std::fs::create_dir_all(cache).map_err(|source| PackageError::Cache {
        path: cache.to_owned(),
        source,
    })?;
    let stem = deb.file_stem().unwrap_or_default().to_string_lossy();
    let root = cache.join(format!("{stem}.local.d"));
    if !root.join(".complete").exists() {
        unpack(deb, &root)?;
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_policy_blocks_parsed_per_package() {
        let policy = "linux-image-6.1.0-56-cloud-amd64-unsigned:\n  Installed: (none)\n  Candidate: 6.1.192-2\n  Version table:\n     6.1.192-2 500\n\
                      linux-image-6.1.0-48-cloud-amd64-unsigned:\n  Installed: (none)\n  Candidate: (none)\n  Version table:\n\
                      busybox-static:\n  Installed: 1:1.35.0-4+deb12u1+b1\n  Candidate: 1:1.35.0-4+deb12u1+b1\n";
        let c = parse_policy(policy);
        assert_eq!(c.len(), 3);
        assert_eq!(
            c["linux-image-6.1.0-56-cloud-amd64-unsigned"].as_deref(),
            Some("6.1.192-2")
        );
        assert_eq!(c["linux-image-6.1.0-48-cloud-amd64-unsigned"], None);
        assert_eq!(
            c["busybox-static"].as_deref(),
            Some("1:1.35.0-4+deb12u1+b1")
        );
        assert!(parse_policy("").is_empty());
    }

    #[test]
    fn packages_default_kernel_is_newest_by_abi_number() {
        let names = [
            "linux-image-6.1.0-9-cloud-amd64-unsigned",
            "linux-image-6.1.0-56-cloud-amd64-unsigned",
            "linux-image-6.1.0-57-cloud-amd64",
            "linux-image-6.1.0-10-cloud-amd64-unsigned",
            "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
        ];
        assert_eq!(
            newest_kernel(names.into_iter()),
            Some("linux-image-6.1.0-56-cloud-amd64-unsigned")
        );
        assert_eq!(newest_kernel(["busybox-static"].into_iter()), None);
    }

    #[test]
    fn packages_query_answers_are_remembered() {
        let mut apt = Apt::new("/nonexistent");
        apt.candidates.insert("a".into(), Some("1".into()));
        apt.asked.insert("a".into());
        // No apt-cache call is needed for a name already asked.
        assert_eq!(apt.candidate("a").unwrap(), "1");
    }

    #[test]
    fn packages_cache_dir_follows_xdg_then_home() {
        // Read-only check of the rule on the current environment (tests must not race on env).
        let dir = cache_dir();
        if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            assert_eq!(dir.unwrap(), PathBuf::from(x).join("bulwark/debs"));
        } else if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            assert_eq!(dir.unwrap(), PathBuf::from(h).join(".cache/bulwark/debs"));
        }
    }
}
