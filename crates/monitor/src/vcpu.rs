//! The vCPU thread: run, take the exit, dispatch, repeat until the VM stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use kvm_bindings::{KVM_EXIT_INTERNAL_ERROR, kvm_regs};
use kvm_ioctls::{SyncReg, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::control::VmControl;
use crate::exit::{Buses, Exit, ExitAction, StopKind, dispatch};
use crate::hostcall::{HostCallResult, HostCalls};
use crate::outcome::{FaultReport, StopReason};
use crate::payload::descriptors::{ExceptionFrame, is_stub_rip};

/// What every vCPU of a VM shares.
#[derive(Debug)]
pub struct VcpuContext {
    pub buses: Arc<Buses>,
    /// The host-call ABI, for function micro-VMs.
    pub hostcalls: Option<Arc<HostCalls>>,
    pub mem: GuestMemoryMmap,
    pub control: Arc<VmControl>,
    pub software_virtualization: bool,
    /// KVM copies the general registers into `kvm_run` on every exit (`KVM_CAP_SYNC_REGS`), so
    /// host calls need no `KVM_GET_REGS`/`KVM_SET_REGS` round trips.
    pub sync_regs: bool,
    /// One entry per vCPU, updated as it runs, read by the control channel.
    pub live: Vec<VcpuLive>,
    /// Work for parked vCPU threads (state capture for snapshots).
    pub jobs: VcpuJobs,
    /// Host calls restored vCPUs had in progress, by vCPU (empty for a fresh VM).
    pub restored_hostcalls: Vec<Option<u32>>,
    /// Introspection's write protection, for VMs that allow introspection.
    pub write_trap: Option<Arc<crate::introspect::WriteTrap>>,
    /// Introspection's breakpoints, for VMs that allow introspection.
    pub breakpoints: Option<Arc<crate::introspect::Breakpoints>>,
}

/// Work a parked vCPU thread does with its own fd: the fd, the general registers as the
/// monitor last left them, and the host call it has in progress.
pub type VcpuJob =
    Box<dyn FnOnce(&VcpuFd, Result<kvm_regs, kvm_ioctls::Error>, Option<u32>) + Send>;

/// One job slot per vCPU.
#[derive(Default)]
pub struct VcpuJobs {
    slots: std::sync::Mutex<Vec<Option<VcpuJob>>>,
}

impl std::fmt::Debug for VcpuJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VcpuJobs")
    }
}

impl VcpuJobs {
    pub fn new(vcpus: u32) -> Self {
        Self {
            slots: std::sync::Mutex::new((0..vcpus).map(|_| None).collect()),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Option<VcpuJob>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leaves a job for vCPU `index`; it runs when that thread is parked and woken.
    pub fn post(&self, index: u32, job: VcpuJob) {
        if let Some(slot) = self.slots().get_mut(index as usize) {
            *slot = Some(job);
        }
    }

    fn take(&self, index: u32) -> Option<VcpuJob> {
        self.slots().get_mut(index as usize)?.take()
    }
}

/// A vCPU's counters while it runs, and its thread id (for its CPU time).
#[derive(Debug, Default)]
pub struct VcpuLive {
    pub exits: AtomicU64,
    pub io: AtomicU64,
    pub mmio: AtomicU64,
    pub hostcalls: AtomicU64,
    pub tid: AtomicU32,
}

impl VcpuLive {
    pub fn for_vcpus(n: u32) -> Vec<Self> {
        (0..n).map(|_| Self::default()).collect()
    }

    pub fn counters(&self) -> VcpuCounters {
        VcpuCounters {
            exits: self.exits.load(Ordering::Relaxed),
            io: self.io.load(Ordering::Relaxed),
            mmio: self.mmio.load(Ordering::Relaxed),
            hostcalls: self.hostcalls.load(Ordering::Relaxed),
        }
    }
}

/// The counters of all vCPUs, summed.
pub fn sum_counters(live: &[VcpuLive]) -> VcpuCounters {
    live.iter()
        .map(VcpuLive::counters)
        .fold(VcpuCounters::default(), |a, b| VcpuCounters {
            exits: a.exits + b.exits,
            io: a.io + b.io,
            mmio: a.mmio + b.mmio,
            hostcalls: a.hostcalls + b.hostcalls,
        })
}

/// Per-vCPU exit counters, summed when the VM ends.
#[derive(Clone, Copy, Debug, Default)]
pub struct VcpuCounters {
    pub exits: u64,
    pub io: u64,
    pub mmio: u64,
    pub hostcalls: u64,
}

/// Where a host call left the vCPU.
enum HostCallStep {
    Done,
    Stop(StopReason),
    /// Nothing to read yet; make the call again.
    WouldBlock,
}

#[derive(Debug)]
pub struct Vcpu {
    /// Until the first exit `kvm_run` holds no registers (a restored vCPU's are only in
    /// KVM), so `KVM_CAP_SYNC_REGS` is used from then on.
    pub exited: bool,
    pub index: u32,
    pub fd: VcpuFd,
    pub ctx: Arc<VcpuContext>,
}

impl Vcpu {
    /// Runs until this vCPU or another stops the VM.
    pub fn run(mut self) -> VcpuCounters {
        if let Err(e) =
            bulwark_sandbox::seccomp::confine_thread(bulwark_sandbox::seccomp::Role::Vcpu)
        {
            self.stop(StopReason::Monitor(format!(
                "cannot install vCPU {}'s seccomp filter: {e}",
                self.index
            )));
            return VcpuCounters::default();
        }
        let ctx = self.ctx.clone();
        let Some(live) = ctx.live.get(self.index as usize) else {
            self.stop(StopReason::Monitor(format!(
                "vCPU {} has no counters",
                self.index
            )));
            return VcpuCounters::default();
        };
        // SAFETY: gettid takes no arguments and cannot fail.
        live.tid
            .store(unsafe { libc::gettid() } as u32, Ordering::Relaxed);
        let bump = |c: &AtomicU64| c.fetch_add(1, Ordering::Relaxed);
        let run_page: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
        let io_size = || {
            // SAFETY: `run_page` is this vCPU's kvm_run mapping, live as long as `self.fd`; the
            // struct is its first page, apart from the port data the exit borrows (next page).
            let run = unsafe { &*run_page };
            // SAFETY: read only after KVM_RUN returned a port exit, when KVM has filled the `io`
            // member of the exit union; its fields are plain integers.
            usize::from(unsafe { run.__bindgen_anon_1.io.size })
        };
        // A host call that found nothing to read yet: made again, outside the guest, until it
        // completes (the vCPU can be paused meanwhile).
        let mut pending: Option<u32> = ctx
            .restored_hostcalls
            .get(self.index as usize)
            .copied()
            .flatten();
        while !ctx.control.is_stopping() {
            ctx.control.park_if_paused(&mut || {
                if let Some(job) = ctx.jobs.take(self.index) {
                    job(&self.fd, self.regs(), pending);
                }
            });
            if let Some(nr) = pending {
                match self.host_call(nr) {
                    HostCallStep::Done => pending = None,
                    HostCallStep::Stop(reason) => {
                        self.stop(reason);
                        break;
                    }
                    HostCallStep::WouldBlock => {
                        if let Some(hc) = &ctx.hostcalls {
                            hc.wait_for_input(std::time::Duration::from_millis(100));
                        }
                    }
                }
                continue;
            }
            let action = match self.fd.run() {
                Ok(exit) => {
                    self.exited = true;
                    let exit = Exit::from_kvm(exit, io_size);
                    bump(&live.exits);
                    match exit {
                        Exit::IoIn { .. } | Exit::IoOut { .. } => bump(&live.io),
                        Exit::MmioRead { .. } | Exit::MmioWrite { .. } => bump(&live.mmio),
                        _ => 0,
                    };
                    if let (Exit::Debug { exception, pc }, Some(bp)) = (&exit, &ctx.breakpoints) {
                        let (exception, pc, bp) = (*exception, *pc, bp.clone());
                        self.debug_exit(&bp, exception, pc);
                        continue;
                    }
                    let trapped = match (&exit, &ctx.write_trap) {
                        (Exit::MmioWrite { addr, data }, Some(t)) if t.covers(*addr) => {
                            Some((t.clone(), *addr, data.to_vec()))
                        }
                        _ => None,
                    };
                    match trapped {
                        // A write to memory introspection guards (a read-only slot).
                        Some((trap, gpa, data)) => {
                            if trap.on_write(self.index, gpa, &data, self.rip(), &ctx.mem) {
                                ctx.control.request_pause();
                            }
                            ExitAction::Resume
                        }
                        None => dispatch(exit, &self.ctx.buses),
                    }
                }
                Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => continue,
                Err(e) => {
                    self.stop(StopReason::KvmRun {
                        vcpu: self.index,
                        error: e.to_string(),
                    });
                    break;
                }
            };
            match action {
                ExitAction::Resume => {}
                ExitAction::HostCall(nr) => {
                    bump(&live.hostcalls);
                    match self.host_call(nr) {
                        HostCallStep::Done => {}
                        HostCallStep::Stop(reason) => {
                            self.stop(reason);
                            break;
                        }
                        HostCallStep::WouldBlock => pending = Some(nr),
                    }
                }
                ExitAction::FaultReport(_) => {
                    if let Some(report) = self.fault_report() {
                        self.stop(StopReason::Fault(report));
                        break;
                    }
                    // Not from the stubs: a payload poking the port. Treat as an unknown port.
                    self.ctx
                        .buses
                        .pio
                        .write(u64::from(crate::abi::FAULT_PORT), &[0]);
                }
                ExitAction::Stop(kind) => {
                    let reason = self.stop_reason(kind);
                    self.stop(reason);
                    break;
                }
            }
        }
        live.counters()
    }

    /// Serves a guest-debug exit: introspection's breakpoint (recorded, then the instruction
    /// runs with RFLAGS.RF set), or a debug exception of the guest's own, which goes back to
    /// the guest.
    fn debug_exit(&mut self, bp: &crate::introspect::Breakpoints, exception: u32, pc: u64) {
        use crate::introspect::{DebugStep, RFLAGS_RF};
        let read = || {
            let r = self.regs().ok()?;
            let s = self.fd.get_sregs().ok()?;
            Some(([r.rdi, r.rsi, r.rdx, r.rcx, r.r8, r.r9], s.gs.base))
        };
        match bp.on_debug(self.index, exception, pc, &self.ctx.mem, read) {
            DebugStep::Resume => {
                let set = self.regs().and_then(|mut r| {
                    r.rflags |= RFLAGS_RF;
                    self.set_regs(&r)
                });
                if let Err(e) = set {
                    self.stop(StopReason::Monitor(format!(
                        "cannot resume vCPU {} past a breakpoint: {e}",
                        self.index
                    )));
                }
            }
            DebugStep::Reinject => match self.fd.get_vcpu_events() {
                Ok(mut ev) => {
                    ev.exception.injected = 1;
                    ev.exception.nr = exception as u8;
                    ev.exception.has_error_code = 0;
                    if let Err(e) = self.fd.set_vcpu_events(&ev) {
                        tracing::warn!(vcpu = self.index, %e, "cannot give the guest its debug exception");
                    }
                }
                Err(e) => tracing::warn!(vcpu = self.index, %e, "cannot read the vCPU's events"),
            },
        }
    }

    fn stop(&self, reason: StopReason) {
        tracing::debug!(vcpu = self.index, %reason, "vCPU stops the VM");
        self.ctx.control.stop(reason);
    }

    /// The general registers at the last exit.
    fn regs(&self) -> Result<kvm_regs, kvm_ioctls::Error> {
        if self.ctx.sync_regs && self.exited {
            Ok(self.fd.sync_regs().regs)
        } else {
            self.fd.get_regs()
        }
    }

    /// Sets the general registers for the next entry.
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), kvm_ioctls::Error> {
        if self.ctx.sync_regs && self.exited {
            self.fd.sync_regs_mut().regs = *regs;
            self.fd.set_sync_dirty_reg(SyncReg::Register);
            Ok(())
        } else {
            self.fd.set_regs(regs)
        }
    }

    fn rip(&self) -> u64 {
        self.regs().map(|r| r.rip).unwrap_or(0)
    }

    /// Serves a host call.
    fn host_call(&mut self, nr: u32) -> HostCallStep {
        let mut regs = match self.regs() {
            Ok(r) => r,
            Err(e) => {
                return HostCallStep::Stop(StopReason::Monitor(format!(
                    "KVM_GET_REGS failed: {e}"
                )));
            }
        };
        let args = [regs.rdi, regs.rsi, regs.rdx];
        let ctx = self.ctx.clone();
        let Some(hostcalls) = &ctx.hostcalls else {
            return HostCallStep::Done; // no ABI: the port is an ordinary unused port
        };
        match hostcalls.handle(&ctx.mem, nr, args, ctx.control.flag()) {
            HostCallResult::Return(v) => {
                regs.rax = v;
                match self.set_regs(&regs) {
                    Ok(()) => HostCallStep::Done,
                    Err(e) => {
                        HostCallStep::Stop(StopReason::Monitor(format!("KVM_SET_REGS failed: {e}")))
                    }
                }
            }
            HostCallResult::Exit(status) => HostCallStep::Stop(StopReason::Exited(status)),
            HostCallResult::WouldBlock => HostCallStep::WouldBlock,
            // Another thread stopped the VM; its reason stands.
            HostCallResult::Stopped => {
                HostCallStep::Stop(StopReason::Monitor("stopped during a host call".into()))
            }
        }
    }

    /// Reads the exception frame the stubs left on the exception stack. `None` if the report
    /// did not come from the stubs.
    fn fault_report(&self) -> Option<FaultReport> {
        let regs = self.regs().ok()?;
        if !is_stub_rip(regs.rip) {
            return None;
        }
        let mut raw = [0u8; ExceptionFrame::SIZE];
        self.ctx
            .mem
            .read_slice(&mut raw, GuestAddress(regs.rsp))
            .ok()?;
        let frame = ExceptionFrame::parse(&raw);
        let address = if frame.vector == 14 {
            self.fd.get_sregs().ok().map(|s| s.cr2)
        } else {
            None
        };
        Some(FaultReport {
            vcpu: self.index,
            vector: frame.vector,
            error_code: frame.error_code,
            rip: frame.rip,
            cpl: (frame.cs & 3) as u8,
            rsp: frame.rsp,
            address,
        })
    }

    fn stop_reason(&mut self, kind: StopKind) -> StopReason {
        let vcpu = self.index;
        match kind {
            StopKind::Halt => StopReason::Halted {
                vcpu,
                rip: self.rip(),
            },
            StopKind::TripleFault => StopReason::TripleFault {
                vcpu,
                rip: self.rip(),
            },
            StopKind::InternalError => {
                let run = self.fd.get_kvm_run();
                let suberror = if run.exit_reason == KVM_EXIT_INTERNAL_ERROR {
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so KVM filled the
                    // `internal` member of the exit union; it is plain integers.
                    unsafe { run.__bindgen_anon_1.internal.suberror }
                } else {
                    0
                };
                StopReason::InternalError {
                    vcpu,
                    suberror,
                    rip: self.rip(),
                    software_virtualization: self.ctx.software_virtualization,
                }
            }
            StopKind::FailEntry(reason) => StopReason::FailEntry { vcpu, reason },
            StopKind::SystemEvent(kind) => StopReason::SystemEvent { vcpu, kind },
            StopKind::Unexpected(what) => StopReason::Unexpected { vcpu, what },
        }
    }
}
