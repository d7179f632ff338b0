//! How a VM ended, in words a user can act on.

use std::fmt;
use std::time::Duration;

use crate::payload::descriptors::vector_name;

/// A CPU exception taken by a payload, as reported by the monitor's exception stubs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultReport {
    pub vcpu: u32,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    /// Privilege level the fault happened at (from the saved CS).
    pub cpl: u8,
    pub rsp: u64,
    /// CR2: the faulting address, for page faults.
    pub address: Option<u64>,
}

fn page_fault_cause(code: u64) -> String {
    let mut parts = vec![
        if code & 1 != 0 {
            "protection violation"
        } else {
            "not present"
        },
        if code & 16 != 0 {
            "instruction fetch"
        } else if code & 2 != 0 {
            "write"
        } else {
            "read"
        },
        if code & 4 != 0 { "user" } else { "supervisor" },
    ];
    if code & 8 != 0 {
        parts.push("reserved bit set");
    }
    parts.join(", ")
}

impl fmt::Display for FaultReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (mnemonic, name) = vector_name(self.vector);
        write!(
            f,
            "vCPU {} took {mnemonic} {name} (vector {}) at rip {:#x} (CPL{})",
            self.vcpu, self.vector, self.rip, self.cpl
        )?;
        if let Some(addr) = self.address {
            write!(
                f,
                ", address {addr:#x}, error code {:#x} ({})",
                self.error_code,
                page_fault_cause(self.error_code)
            )?;
        } else if self.error_code != 0 {
            write!(f, ", error code {:#x}", self.error_code)?;
        }
        write!(f, ", rsp {:#x}", self.rsp)
    }
}

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The payload called `exit(status)`.
    Exited(u32),
    /// The payload took a CPU exception.
    Fault(FaultReport),
    /// A fault while delivering a fault while delivering a fault: the CPU reset.
    TripleFault { vcpu: u32, rip: u64 },
    /// A vCPU executed HLT with nothing that could wake it.
    Halted { vcpu: u32, rip: u64 },
    /// KVM could not run or emulate the guest.
    InternalError {
        vcpu: u32,
        suberror: u32,
        rip: u64,
        software_virtualization: bool,
    },
    /// The hardware refused to enter the guest.
    FailEntry { vcpu: u32, reason: u64 },
    /// A KVM system event (reset, shutdown, crash).
    SystemEvent { vcpu: u32, kind: u32 },
    /// An exit the monitor does not serve.
    Unexpected { vcpu: u32, what: &'static str },
    /// `KVM_RUN` itself failed.
    KvmRun { vcpu: u32, error: String },
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest reset the machine (`reboot`).
    Reboot,
    /// The guest kernel panicked (reported through pvpanic).
    GuestPanic,
    /// The user typed the console escape sequence to leave.
    ConsoleQuit,
    /// The `--timeout` ran out.
    Timeout(Duration),
    /// The control plane ended the VM (kill, or a shutdown that timed out).
    Killed,
    /// A monitor-side failure while the guest ran (a bug; the VM is stopped).
    Monitor(String),
}

impl StopReason {
    /// Whether the guest ended the way it meant to.
    pub fn is_clean_exit(&self) -> bool {
        matches!(
            self,
            StopReason::Exited(_) | StopReason::PowerOff | StopReason::Reboot
        )
    }
}

/// The instruction pointer of an x86 CPU just reset (with CS base 0xffff0000).
const RESET_RIP: u64 = 0xfff0;

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::Exited(s) => write!(f, "payload exited with status {s}"),
            StopReason::Fault(r) => write!(f, "payload fault: {r}"),
            // KVM on AMD reinitialises the vCPU when the guest shuts down, so its rip reads as
            // the reset vector: say that, rather than show it as where the guest was.
            StopReason::TripleFault { vcpu, rip } if *rip == RESET_RIP => write!(
                f,
                "vCPU {vcpu} triple-faulted: the guest broke its own IDT, GDT or page tables (where it was is lost: KVM reset the vCPU at the shutdown, as it does on AMD)"
            ),
            StopReason::TripleFault { vcpu, rip } => write!(
                f,
                "vCPU {vcpu} triple-faulted (last rip {rip:#x}): the guest broke its own IDT, GDT or page tables"
            ),
            StopReason::Halted { vcpu, rip } => write!(
                f,
                "vCPU {vcpu} executed HLT at rip {rip:#x} with no interrupt source to wake it; payloads end with the exit host call"
            ),
            StopReason::InternalError {
                vcpu,
                suberror,
                rip,
                software_virtualization,
            } => {
                let what = match suberror {
                    1 => "instruction emulation failed",
                    2 => "simultaneous exceptions",
                    3 => "delivery event failed",
                    _ => "internal error",
                };
                write!(
                    f,
                    "KVM internal error on vCPU {vcpu}: {what} (suberror {suberror}) at rip {rip:#x}"
                )?;
                if *software_virtualization {
                    write!(
                        f,
                        "; this host's KVM is software virtualization (kvm_pvm), which cannot run ring-0 guests such as Linux in useful time — use a host with VT-x/SVM or the nested rig"
                    )?;
                }
                Ok(())
            }
            StopReason::FailEntry { vcpu, reason } => write!(
                f,
                "KVM could not enter vCPU {vcpu} (hardware entry failure reason {reason:#x})"
            ),
            StopReason::SystemEvent { vcpu, kind } => {
                let what = match kind {
                    1 => "shutdown",
                    2 => "reset",
                    3 => "crash",
                    _ => "system event",
                };
                write!(f, "vCPU {vcpu} raised a KVM {what} event ({kind})")
            }
            StopReason::Unexpected { vcpu, what } => {
                write!(f, "vCPU {vcpu} made an unsupported exit: {what}")
            }
            StopReason::KvmRun { vcpu, error } => {
                write!(f, "KVM_RUN failed on vCPU {vcpu}: {error}")
            }
            StopReason::PowerOff => write!(f, "guest powered off"),
            StopReason::Reboot => write!(f, "guest rebooted (bulwark ends the VM on reset)"),
            StopReason::GuestPanic => write!(f, "guest kernel panicked (pvpanic)"),
            StopReason::ConsoleQuit => write!(f, "stopped from the console (Ctrl-A x)"),
            StopReason::Timeout(d) => write!(f, "timed out after {:.3}s", d.as_secs_f64()),
            StopReason::Monitor(m) => write!(f, "monitor error: {m}"),
            StopReason::Killed => write!(f, "killed through the control plane"),
        }
    }
}

/// Counters gathered while the VM ran.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmStats {
    pub exits: u64,
    pub io_exits: u64,
    pub mmio_exits: u64,
    pub hostcalls: u64,
    pub unhandled_pio: u64,
    pub unhandled_mmio: u64,
    pub console_bytes: u64,
    pub console_dropped: u64,
    /// Last POST code written to port 0x80, and how many were written.
    pub postcode: (u64, u64),
}

impl fmt::Display for VmStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exits={} io={} mmio={} hostcalls={} unhandled_pio={} unhandled_mmio={} console_bytes={} console_dropped={} postcode={:#x} postcodes={}",
            self.exits,
            self.io_exits,
            self.mmio_exits,
            self.hostcalls,
            self.unhandled_pio,
            self.unhandled_mmio,
            self.console_bytes,
            self.console_dropped,
            self.postcode.0,
            self.postcode.1
        )
    }
}

/// The result of running a VM to its end.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub reason: StopReason,
    /// The last console line marker the caller asked to watch for (see
    /// `ConsoleSink::with_marker`), e.g. a guest job's exit status.
    pub console_marker: Option<String>,
    pub stats: VmStats,
    /// Each virtio device's counters, by name (`blk0`, `rng`, ...).
    pub devices: Vec<(String, bulwark_devices::virtio::DeviceCounters)>,
    /// Each virtio device's rings and interrupt status at the end, by name.
    pub rings: Vec<(String, bulwark_devices::virtio::mmio::RingsView)>,
    pub elapsed: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_report_names_vector_rip_and_address() {
        let r = FaultReport {
            vcpu: 0,
            vector: 14,
            error_code: 0x14,
            rip: 0x10_0003,
            cpl: 3,
            rsp: 0xfff0,
            address: Some(0x5000),
        };
        let s = StopReason::Fault(r).to_string();
        assert!(s.contains("#PF page fault (vector 14)"), "{s}");
        assert!(s.contains("rip 0x100003"), "{s}");
        assert!(s.contains("address 0x5000"), "{s}");
        assert!(s.contains("not present, instruction fetch, user"), "{s}");
    }

    #[test]
    fn internal_error_on_software_virt_explains_host() {
        let s = StopReason::InternalError {
            vcpu: 1,
            suberror: 1,
            rip: 0,
            software_virtualization: true,
        }
        .to_string();
        assert!(
            s.contains("instruction emulation failed") && s.contains("kvm_pvm"),
            "{s}"
        );
    }

    #[test]
    fn triple_fault_at_the_reset_vector_says_the_state_is_lost() {
        let lost = StopReason::TripleFault {
            vcpu: 0,
            rip: 0xfff0,
        }
        .to_string();
        assert!(
            lost.contains("where it was is lost") && !lost.contains("0xfff0"),
            "{lost}"
        );
        let kept = StopReason::TripleFault {
            vcpu: 2,
            rip: 0xffff_ffff_8100_0000,
        }
        .to_string();
        assert!(
            kept.contains("vCPU 2 triple-faulted (last rip 0xffffffff81000000)"),
            "{kept}"
        );
    }
}
