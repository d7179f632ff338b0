//! Opening `/dev/kvm` and asking what the host allows, with errors that say how to fix the host.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

pub const KVM_PATH: &str = "/dev/kvm";

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error(
        "{KVM_PATH} does not exist: this host has no KVM. Load the module (modprobe kvm_intel or kvm_amd), enable virtualization in the firmware, or run inside the nested rig"
    )]
    Missing,
    #[error(
        "permission denied opening {KVM_PATH}: run as root or add your user to the group that owns it (usually `kvm`)"
    )]
    Permission,
    #[error("cannot open {KVM_PATH}")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not the stable version 12; the host kernel is too unusual")]
    ApiVersion(i32),
    #[error("KVM lacks a capability bulwark needs: {0}")]
    MissingCap(&'static str),
    #[error("cannot create a KVM VM; is the host out of memory or at its VM limit?")]
    CreateVm(#[source] kvm_ioctls::Error),
}

/// Opens `/dev/kvm` and checks the API.
pub fn open() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => KvmError::Missing,
        libc::EACCES | libc::EPERM => KvmError::Permission,
        _ => KvmError::Open(e),
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(KvmError::ApiVersion(version));
    }
    for (cap, name) in [
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// Whether this host's KVM is software virtualization (`kvm_pvm`): CPL3 guest code runs
/// natively, CPL0 code is emulated, and stock Linux guests cannot boot in useful time.
/// Asked once per process (a jailed monitor cannot see `/sys`; it asks before the jail).
pub fn is_software_virtualization() -> bool {
    static PVM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PVM.get_or_init(|| Path::new("/sys/module/kvm_pvm").exists())
}

/// Total host RAM in bytes.
pub fn host_memory() -> u64 {
    // SAFETY: sysinfo only writes into the zeroed struct we pass.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    info.totalram.saturating_mul(u64::from(info.mem_unit))
}
