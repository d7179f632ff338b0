//! A cgroup per jailed monitor with CPU, memory and pids limits, on the unified hierarchy
//! (cgroup v2) or on the v1 controllers, whichever the host mounts.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::{JailError, Limits};

const ROOT: &str = "/sys/fs/cgroup";
/// The CFS period the CPU quota is a share of.
const PERIOD_US: u64 = 100_000;

/// The cgroup directories a jailed monitor was put in.
#[derive(Debug, Clone)]
pub struct Cgroup {
    /// `v2` or `v1`.
    pub version: &'static str,
    /// The leaf directory of each hierarchy (one for v2, one per controller for v1).
    pub dirs: Vec<PathBuf>,
}

fn write(path: &Path, value: &str) -> Result<(), JailError> {
    fs::write(path, value).map_err(|source| JailError::Cgroup {
        path: path.to_path_buf(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), JailError> {
    match fs::create_dir_all(path) {
        Ok(()) => Ok(()),
        Err(source) => Err(JailError::Cgroup {
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl Cgroup {
    /// Creates `bulwark/vm-<pid>` (`pid`: the jail's outer process, which removes it) with
    /// `limits` in the host's cgroup hierarchy; `None` when the host mounts none.
    pub fn create(pid: u32, limits: &Limits) -> Result<Option<Self>, JailError> {
        let name = &format!("vm-{pid}");
        let root = Path::new(ROOT);
        if root.join("cgroup.controllers").exists() {
            return Self::create_v2(root, name, limits).map(Some);
        }
        let v1: Vec<&str> = ["cpu", "memory", "pids"]
            .into_iter()
            .filter(|c| root.join(c).join("tasks").exists())
            .collect();
        if v1.is_empty() {
            return Ok(None);
        }
        let mut dirs = Vec::new();
        for ctrl in v1 {
            sweep(&root.join(ctrl).join("bulwark"));
            let dir = root.join(ctrl).join("bulwark").join(name);
            mkdir(&dir)?;
            match ctrl {
                "cpu" => {
                    if let Some(cpus) = limits.cpus {
                        write(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                        write(&dir.join("cpu.cfs_quota_us"), &quota(cpus).to_string())?;
                    }
                }
                "memory" => {
                    if let Some(bytes) = limits.memory_bytes {
                        write(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                    }
                }
                _ => {
                    if let Some(pids) = limits.pids {
                        write(&dir.join("pids.max"), &pids.to_string())?;
                    }
                }
            }
            dirs.push(dir);
        }
        Ok(Some(Self {
            version: "v1",
            dirs,
        }))
    }

    fn create_v2(root: &Path, name: &str, limits: &Limits) -> Result<Self, JailError> {
        sweep(&root.join("bulwark"));
        let parent = root.join("bulwark");
        mkdir(&parent)?;
        // Controllers must be enabled in every ancestor's subtree_control; a host that does
        // not delegate one leaves that limit out (the limit files are then missing).
        for dir in [root, parent.as_path()] {
            let _ = fs::write(dir.join("cgroup.subtree_control"), "+cpu +memory +pids");
        }
        let dir = parent.join(name);
        mkdir(&dir)?;
        if let Some(cpus) = limits.cpus {
            write(
                &dir.join("cpu.max"),
                &format!("{} {PERIOD_US}", quota(cpus)),
            )?;
        }
        if let Some(bytes) = limits.memory_bytes {
            write(&dir.join("memory.max"), &bytes.to_string())?;
            let _ = fs::write(dir.join("memory.swap.max"), "0");
        }
        if let Some(pids) = limits.pids {
            write(&dir.join("pids.max"), &pids.to_string())?;
        }
        Ok(Self {
            version: "v2",
            dirs: vec![dir],
        })
    }

    /// Moves the calling process into the cgroup.
    pub fn join(&self) -> Result<(), JailError> {
        for dir in &self.dirs {
            write(&dir.join("cgroup.procs"), "0")?;
        }
        Ok(())
    }

    /// Removes the (now empty) cgroup directories.
    pub fn remove(&self) -> io::Result<()> {
        for dir in &self.dirs {
            fs::remove_dir(dir)?;
        }
        Ok(())
    }
}

/// Removes the cgroups of jails whose outer process is gone (killed before it could clean
/// up): `vm-<pid>` for a pid that no longer exists. One that still runs, or still has a
/// process, stays (rmdir of a populated cgroup fails anyway).
fn sweep(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("vm-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir(e.path());
        }
    }
}

fn quota(cpus: f64) -> u64 {
    ((cpus * PERIOD_US as f64) as u64).max(1000)
}
