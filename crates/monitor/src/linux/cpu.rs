//! vCPU set-up for Linux guests: CPUID from KVM's supported set with a consistent topology,
//! the boot MSRs, the local APIC's LINT pins, and the FPU.

use kvm_bindings::{CpuId, Msrs, kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_msr_entry};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_DEF_TYPE_WB_ENABLED: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// Bits needed to number `n` things (ceil(log2 n)).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts KVM's supported CPUID for vCPU `index` of `count`: APIC IDs, logical processor
/// counts and the x2APIC/extended topology leaves describe one socket with `count` cores of one
/// thread each. Leaves KVM supports but the VM should not see are left as KVM reports them.
pub fn filter_cpuid(entries: &mut [kvm_cpuid_entry2], index: u32, count: u32) {
    let shift = bits_for(count);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0xff)
                    | (8 << 8) // CLFLUSH line size: 64 bytes
                    | ((count.min(255)) << 16)
                    | (index.min(255) << 24);
                e.ecx |= 1 << 31; // hypervisor present
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count field is valid
                }
            }
            4 => {
                // Cores per package - 1 in EAX[31:26]; each cache is private to one core.
                e.eax = (e.eax & 0x3fff) | ((count.saturating_sub(1).min(63)) << 26);
                e.eax &= !(0xfff << 14); // threads sharing the cache - 1 = 0
            }
            0xb | 0x1f => {
                e.edx = index;
                match e.index {
                    0 => {
                        e.eax = 0; // one thread per core
                        e.ebx = 1;
                        e.ecx = 1 << 8; // level type SMT
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1; // level type core
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: number of cores - 1, and the APIC ID width.
                e.ecx = (e.ecx & !0xf0ff) | count.saturating_sub(1).min(255) | (shift << 12);
            }
            0x8000_001e => {
                e.eax = index;
                e.ebx = index & 0xff; // compute unit = core
                e.ecx = 0; // node 0
            }
            _ => {}
        }
    }
}

/// The CPUID table for vCPU `index`.
pub fn cpuid(supported: &CpuId, index: u32, count: u32) -> CpuId {
    let mut c = supported.clone();
    filter_cpuid(c.as_mut_slice(), index, count);
    c
}

/// MSRs every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_WB_ENABLED),
    ]
}

pub fn boot_msr_list() -> Result<Msrs, vmm_sys_util::fam::Error> {
    Msrs::from_entries(&boot_msrs())
}

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

/// LINT0 delivers ExtINT (the PIC), LINT1 delivers NMI, as firmware leaves them.
pub fn set_lint_pins(l: &mut kvm_lapic_state) {
    let set_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(l, APIC_LVT0);
    set_lapic_reg(l, APIC_LVT0, set_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(l, APIC_LVT1);
    set_lapic_reg(l, APIC_LVT1, set_mode(lvt1, APIC_MODE_NMI));
}

/// FPU state at reset: x87 control word 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xffff_ffff,
            edx: 0,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_topology_matches_vcpu_count() {
        let mut e = vec![
            leaf(1, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0xb, 2),
            leaf(0x8000_0008, 0),
        ];
        filter_cpuid(&mut e, 2, 3);
        assert_eq!(e[0].ebx >> 24, 2, "initial APIC ID");
        assert_eq!((e[0].ebx >> 16) & 0xff, 3, "logical processors");
        assert_ne!(e[0].ecx & (1 << 31), 0, "hypervisor bit");
        assert_ne!(e[0].edx & (1 << 28), 0, "HTT");
        assert_eq!((e[1].ebx, e[1].ecx >> 8 & 0xff, e[1].edx), (1, 1, 2));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8 & 0xff), (2, 3, 2));
        assert_eq!(e[3].ecx, 2, "invalid level past the core level");
        assert_eq!(e[4].ecx & 0xff, 2);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
    }

    #[test]
    fn lapic_lint_pins_extint_and_nmi() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0700);
        set_lint_pins(&mut l);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x0001_0700);
        assert_eq!((lapic_reg(&l, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
        assert_eq!(boot_msr_list().unwrap().as_slice().len(), boot_msrs().len());
    }
}
