//! The CPU a function micro-VM sees through CPUID: the x86-64 baseline (SSE2, NX, long mode),
//! plus a hypervisor leaf that names bulwark. It is the same on every host apart from the
//! vendor, family/model and physical-address width, which are the host's own.
//!
//! Payloads need no more, and a fixed table avoids `KVM_GET_SUPPORTED_CPUID`, which costs
//! about 0.6 ms per VM on hosts where CPUID itself traps (nested or software virtualization) —
//! a fifth of a function's start-up time. Linux guests get KVM's supported set instead.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// `"BulwarkVMM\0\0"`, in the hypervisor leaf's EBX, ECX, EDX.
pub const HYPERVISOR_SIGNATURE: [u8; 12] = *b"BulwarkVMM\0\0";
pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;

const LEAF1_EDX: u32 = (1 << 0) // FPU
    | (1 << 3) // PSE
    | (1 << 4) // TSC
    | (1 << 5) // MSR
    | (1 << 6) // PAE
    | (1 << 8) // CX8
    | (1 << 13) // PGE
    | (1 << 15) // CMOV
    | (1 << 23) // MMX
    | (1 << 24) // FXSR
    | (1 << 25) // SSE
    | (1 << 26); // SSE2
const LEAF1_ECX: u32 = 1 << 31; // running under a hypervisor
const EXT1_EDX: u32 = (1 << 20) | (1 << 29); // NX, long mode
const EXT1_ECX: u32 = 1; // LAHF/SAHF in long mode

/// What the table takes from the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostCpu {
    /// Leaf 0 EBX, EDX, ECX: the vendor string.
    pub vendor: [u32; 3],
    /// Leaf 1 EAX: family, model, stepping.
    pub signature: u32,
    /// Leaf 0x8000_0008 EAX bits 7:0.
    pub phys_bits: u8,
}

impl HostCpu {
    /// Reads the three values with the CPUID instruction.
    pub fn read() -> Self {
        use std::arch::x86_64::__cpuid;
        let l0 = __cpuid(0);
        let l1 = __cpuid(1);
        let ext_max = __cpuid(0x8000_0000).eax;
        let phys_bits = if ext_max >= 0x8000_0008 {
            (__cpuid(0x8000_0008).eax & 0xff) as u8
        } else {
            36
        };
        Self {
            vendor: [l0.ebx, l0.edx, l0.ecx],
            signature: l1.eax,
            phys_bits,
        }
    }
}

fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

fn word(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The CPUID entries of vCPU `index` of `count`.
pub fn entries(host: &HostCpu, index: u32, count: u32) -> Vec<kvm_cpuid_entry2> {
    let sig = &HYPERVISOR_SIGNATURE;
    let apic_id = index.min(0xff);
    let logical = count.min(0xff);
    vec![
        leaf(0, 1, host.vendor[0], host.vendor[2], host.vendor[1]),
        leaf(
            1,
            host.signature,
            (apic_id << 24) | (logical << 16) | (8 << 8), // CLFLUSH line: 64 bytes
            LEAF1_ECX,
            LEAF1_EDX,
        ),
        leaf(
            HYPERVISOR_LEAF,
            HYPERVISOR_LEAF + 1,
            word(&sig[0..4]),
            word(&sig[4..8]),
            word(&sig[8..12]),
        ),
        leaf(HYPERVISOR_LEAF + 1, crate::abi::ABI_VERSION, 0, 0, 0),
        leaf(0x8000_0000, 0x8000_0008, 0, 0, 0),
        leaf(0x8000_0001, 0, 0, EXT1_ECX, EXT1_EDX),
        leaf(0x8000_0008, u32::from(host.phys_bits) | (48 << 8), 0, 0, 0),
    ]
}

/// The table as KVM takes it.
pub fn cpuid(host: &HostCpu, index: u32, count: u32) -> Result<CpuId, vmm_sys_util::fam::Error> {
    CpuId::from_entries(&entries(host, index, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostCpu {
        HostCpu {
            vendor: [word(b"Genu"), word(b"ineI"), word(b"ntel")],
            signature: 0x806f8,
            phys_bits: 46,
        }
    }

    #[test]
    fn cpuid_baseline_features_and_topology() {
        let e = entries(&host(), 2, 4);
        let l = |f: u32| *e.iter().find(|x| x.function == f).unwrap();
        // Vendor is EBX, EDX, ECX in leaf 0.
        let v0 = l(0);
        let vendor: Vec<u8> = [v0.ebx, v0.edx, v0.ecx]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(&vendor, b"GenuineIntel");
        assert_eq!(l(1).ebx >> 24, 2, "APIC ID is the vCPU index");
        assert_eq!((l(1).ebx >> 16) & 0xff, 4);
        assert_ne!(l(1).edx & (1 << 26), 0, "SSE2");
        assert_ne!(l(1).ecx & (1 << 31), 0, "hypervisor bit");
        assert_ne!(l(0x8000_0001).edx & (1 << 29), 0, "long mode");
        assert_eq!(
            l(0x8000_0001).edx & (1 << 11),
            0,
            "no SYSCALL: it is disabled"
        );
        assert_eq!(l(0x8000_0008).eax & 0xff, 46);
    }

    #[test]
    fn cpuid_hypervisor_leaf_names_bulwark() {
        let e = entries(&host(), 0, 1);
        let h = e.iter().find(|x| x.function == HYPERVISOR_LEAF).unwrap();
        let sig: Vec<u8> = [h.ebx, h.ecx, h.edx]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(&sig, &HYPERVISOR_SIGNATURE);
        assert_eq!(cpuid(&host(), 0, 1).unwrap().as_slice().len(), e.len());
    }

    #[test]
    fn cpuid_host_read_gives_a_vendor() {
        let h = HostCpu::read();
        assert!(h.phys_bits >= 32, "{h:?}");
        assert_ne!(h.vendor, [0; 3]);
    }
}
