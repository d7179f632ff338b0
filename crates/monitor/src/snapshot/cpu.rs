//! vCPU and VM-wide KVM state: captured from a parked vCPU, written as records, applied to a
//! fresh vCPU of the restored VM.

use std::io::Write;

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use zerocopy::IntoBytes;

use super::{Record, RecordWriter, SnapshotError, Tag, kvm, kvm_from};

/// Everything KVM holds for one vCPU. Optional parts are those a VM kind may lack (function
/// micro-VMs have no in-kernel LAPIC).
#[derive(Debug, Default)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub lapic: Option<kvm_lapic_state>,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: Option<kvm_vcpu_events>,
    pub mp_state: Option<kvm_mp_state>,
    pub debugregs: Option<kvm_debugregs>,
    /// A host call started but not finished (see `Vcpu::run`).
    pub pending_hostcall: Option<u32>,
    /// Header records seen, to tell a complete state from a partial one.
    seen_regs: bool,
    seen_sregs: bool,
}

/// `IA32_TSC`: writing it back moves the guest's TSC, so it is not part of the write-back test.
const MSR_IA32_TSC: u32 = 0x10;

/// Runs `op` over `entries` in batches: KVM stops a batch at the first MSR it refuses; that
/// one is dropped and the rest go again. Returns what KVM accepted.
fn msr_batches(
    entries: Vec<kvm_msr_entry>,
    mut op: impl FnMut(&mut Msrs) -> Result<usize, SnapshotError>,
) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut todo = entries;
    let mut out = Vec::with_capacity(todo.len());
    while !todo.is_empty() {
        let mut msrs = Msrs::from_entries(&todo)
            .map_err(|e| SnapshotError::Unsupported(format!("too many MSRs at once: {e:?}")))?;
        let n = op(&mut msrs)?.min(todo.len());
        out.extend_from_slice(&msrs.as_slice()[..n]);
        todo.drain(..(n + 1).min(todo.len()));
    }
    Ok(out)
}

/// Reads every MSR in `index` that this vCPU has, keeping those KVM also takes back: an MSR
/// that cannot be written (a paravirtual MSR whose feature the guest's CPUID lacks) could not
/// be restored, and the guest could not have changed it either. Writing back the value just
/// read changes nothing.
pub fn read_msrs(fd: &VcpuFd, index: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let wanted = index
        .iter()
        .map(|&i| kvm_msr_entry {
            index: i,
            ..Default::default()
        })
        .collect();
    let read = msr_batches(wanted, |m| fd.get_msrs(m).map_err(kvm("KVM_GET_MSRS")))?;
    let (tsc, rest): (Vec<_>, Vec<_>) = read.into_iter().partition(|e| e.index == MSR_IA32_TSC);
    let mut kept = msr_batches(rest, |m| fd.set_msrs(m).map_err(kvm("KVM_SET_MSRS")))?;
    kept.extend(tsc);
    Ok(kept)
}

impl VcpuState {
    /// Reads the state of a vCPU that is outside `KVM_RUN`. `regs` are the general registers
    /// as the monitor last left them (with `KVM_CAP_SYNC_REGS` they live in `kvm_run`).
    pub fn capture(
        fd: &VcpuFd,
        regs: kvm_regs,
        msr_index: &[u32],
        in_kernel_irqchip: bool,
        pending_hostcall: Option<u32>,
    ) -> Result<Self, SnapshotError> {
        Ok(Self {
            regs,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: Some(fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?),
            xcrs: fd.get_xcrs().ok(),
            lapic: if in_kernel_irqchip {
                Some(fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?)
            } else {
                None
            },
            msrs: read_msrs(fd, msr_index)?,
            events: Some(fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?),
            mp_state: if in_kernel_irqchip {
                Some(fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?)
            } else {
                None
            },
            debugregs: fd.get_debug_regs().ok(),
            pending_hostcall,
            seen_regs: true,
            seen_sregs: true,
        })
    }

    /// Applies the state to a fresh vCPU (its CPUID already set), in the order KVM needs:
    /// special registers before the LAPIC (APIC base), MSRs after, events last.
    pub fn apply(&self, fd: &VcpuFd) -> Result<(), SnapshotError> {
        if !(self.seen_regs && self.seen_sregs) {
            return Err(SnapshotError::Malformed(
                "a vCPU lacks its general or special registers".into(),
            ));
        }
        if let Some(mp) = &self.mp_state {
            fd.set_mp_state(*mp).map_err(kvm("KVM_SET_MP_STATE"))?;
        }
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        if let Some(x) = &self.xsave {
            // SAFETY: this process never enables dynamic XSTATE features (arch_prctl
            // ARCH_REQ_XCOMP_GUEST_PERM), so KVM copies only the 4096 bytes of `kvm_xsave`.
            unsafe { fd.set_xsave(x) }.map_err(kvm("KVM_SET_XSAVE"))?;
        }
        if let Some(x) = &self.xcrs {
            fd.set_xcrs(x).map_err(kvm("KVM_SET_XCRS"))?;
        }
        if let Some(d) = &self.debugregs {
            fd.set_debug_regs(d).map_err(kvm("KVM_SET_DEBUGREGS"))?;
        }
        if let Some(l) = &self.lapic {
            fd.set_lapic(l).map_err(kvm("KVM_SET_LAPIC"))?;
        }
        if !self.msrs.is_empty() {
            let msrs = Msrs::from_entries(&self.msrs)
                .map_err(|e| SnapshotError::Malformed(format!("MSR list: {e:?}")))?;
            let n = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
            if n != self.msrs.len() {
                return Err(SnapshotError::Mismatch(format!(
                    "this host's KVM refused MSR {:#x} of the snapshot",
                    self.msrs[n].index
                )));
            }
        }
        if let Some(e) = &self.events {
            fd.set_vcpu_events(e).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }

    pub fn write<W: Write>(
        &self,
        index: u32,
        w: &mut RecordWriter<W>,
    ) -> Result<(), SnapshotError> {
        w.kvm(Tag::Regs, index, &self.regs)?;
        w.kvm(Tag::Sregs, index, &self.sregs)?;
        if let Some(x) = &self.xsave {
            w.kvm(Tag::Xsave, index, x)?;
        }
        if let Some(x) = &self.xcrs {
            w.kvm(Tag::Xcrs, index, x)?;
        }
        if let Some(x) = &self.lapic {
            w.kvm(Tag::Lapic, index, x)?;
        }
        w.record(Tag::Msrs, index, self.msrs.as_slice().as_bytes())?;
        if let Some(x) = &self.events {
            w.kvm(Tag::Events, index, x)?;
        }
        if let Some(x) = &self.mp_state {
            w.kvm(Tag::MpState, index, x)?;
        }
        if let Some(x) = &self.debugregs {
            w.kvm(Tag::DebugRegs, index, x)?;
        }
        if let Some(nr) = self.pending_hostcall {
            w.record(Tag::PendingHostCall, index, &nr.to_le_bytes())?;
        }
        Ok(())
    }

    /// Takes a per-vCPU record; false if the tag is not per-vCPU state.
    pub fn absorb(&mut self, rec: &Record) -> Result<bool, SnapshotError> {
        match rec.tag {
            Tag::Regs => {
                self.regs = kvm_from(rec)?;
                self.seen_regs = true;
            }
            Tag::Sregs => {
                self.sregs = kvm_from(rec)?;
                self.seen_sregs = true;
            }
            Tag::Xsave => self.xsave = Some(kvm_from(rec)?),
            Tag::Xcrs => self.xcrs = Some(kvm_from(rec)?),
            Tag::Lapic => self.lapic = Some(kvm_from(rec)?),
            Tag::Msrs => {
                let size = std::mem::size_of::<kvm_msr_entry>();
                if !rec.data.len().is_multiple_of(size) {
                    return Err(SnapshotError::Malformed("MSR record size".into()));
                }
                self.msrs = rec
                    .data
                    .chunks_exact(size)
                    .map(|c| {
                        <kvm_msr_entry as zerocopy::FromBytes>::read_from_bytes(c)
                            .map_err(|_| SnapshotError::Malformed("MSR entry".into()))
                    })
                    .collect::<Result<_, _>>()?;
            }
            Tag::Events => self.events = Some(kvm_from(rec)?),
            Tag::MpState => self.mp_state = Some(kvm_from(rec)?),
            Tag::DebugRegs => self.debugregs = Some(kvm_from(rec)?),
            Tag::PendingHostCall => {
                let b: [u8; 4] = rec
                    .data
                    .as_slice()
                    .try_into()
                    .map_err(|_| SnapshotError::Malformed("pending host call".into()))?;
                self.pending_hostcall = Some(u32::from_le_bytes(b));
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// VM-wide KVM state of a VM with an in-kernel irqchip and PIT.
#[derive(Clone, Debug, Default)]
pub struct VmState {
    pub clock: Option<kvm_clock_data>,
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: Option<kvm_pit_state2>,
}

const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl VmState {
    pub fn capture(vm: &VmFd) -> Result<Self, SnapshotError> {
        let mut irqchips = Vec::new();
        for id in IRQCHIPS {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        Ok(Self {
            clock: Some(vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?),
            irqchips,
            pit: Some(vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?),
        })
    }

    pub fn apply(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        if let Some(p) = &self.pit {
            vm.set_pit2(p).map_err(kvm("KVM_SET_PIT2"))?;
        }
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        if let Some(c) = &self.clock {
            // Only the clock value: flags such as KVM_CLOCK_TSC_STABLE are KVM's to report.
            let clock = kvm_clock_data {
                clock: c.clock,
                ..Default::default()
            };
            vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        }
        Ok(())
    }

    pub fn write<W: Write>(&self, w: &mut RecordWriter<W>) -> Result<(), SnapshotError> {
        if let Some(c) = &self.clock {
            w.kvm(Tag::Clock, 0, c)?;
        }
        for (i, chip) in self.irqchips.iter().enumerate() {
            w.kvm(Tag::Irqchip, i as u32, chip)?;
        }
        if let Some(p) = &self.pit {
            w.kvm(Tag::Pit, 0, p)?;
        }
        Ok(())
    }

    pub fn absorb(&mut self, rec: &Record) -> Result<bool, SnapshotError> {
        match rec.tag {
            Tag::Clock => self.clock = Some(kvm_from(rec)?),
            Tag::Irqchip => {
                let chip: kvm_irqchip = kvm_from(rec)?;
                if !IRQCHIPS.contains(&chip.chip_id) || rec.index as usize != self.irqchips.len() {
                    return Err(SnapshotError::Malformed("irqchip record".into()));
                }
                self.irqchips.push(chip);
            }
            Tag::Pit => self.pit = Some(kvm_from(rec)?),
            _ => return Ok(false),
        }
        Ok(true)
    }
}
