//! Introspection served to a VM's owner: the guest kernel read from outside while its vCPUs
//! are held (`bulwark-vmi` does the reading). A VM is introspected only when its spec says so;
//! the kernel's profile (System.map and BTF) is read before the monitor enters its jail and
//! parsed on the first request, so a VM that is never looked at pays nothing but the read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use bulwark_channel::{
    GuestModule, GuestProcess, IntegrityFinding, IntrospectView, Introspection, MAX_BREAKPOINTS,
    MAX_INTROSPECT_ROWS, Measured, ProtectionInfo, TraceHit, TraceInfo, TracePoint, TrapReport,
};
use bulwark_vmi::guest::{CpuView, GuestKernel, Profile, SECURITY_MSRS};
use bulwark_vmi::integrity::{self, Measurement};
use bulwark_vmi::tasks::Listing;
use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

/// MSR_LSTAR: the 64-bit syscall entry, whose value gives the kernel's KASLR slide.
const MSR_LSTAR: u32 = 0xc000_0082;

/// The profile files of the guest's kernel, read before the jail.
#[derive(Clone, Debug)]
pub struct IntrospectionConfig {
    /// The image's System.map.
    pub system_map: Vec<u8>,
    /// The raw BTF of the image's vmlinux (its `.BTF` section).
    pub btf: Vec<u8>,
}

/// A VM's introspection: its profile, parsed once, and how often it was used.
#[derive(Debug)]
pub struct Introspector {
    config: IntrospectionConfig,
    profile: OnceLock<Result<Profile, String>>,
    served: AtomicU64,
    /// The integrity baseline, once the owner took one.
    baseline: Mutex<Option<Measurement>>,
    /// Write protection of kernel text and rodata, for VMs whose slots can be edited.
    protection: Option<(SlotEditor, std::sync::Arc<WriteTrap>)>,
    /// The breakpoint the vCPUs serve.
    breakpoints: Option<std::sync::Arc<Breakpoints>>,
}

impl Introspector {
    /// `protection`: the VM's slots and the trap its vCPUs report writes to.
    pub fn new(
        config: IntrospectionConfig,
        protection: Option<(SlotEditor, std::sync::Arc<WriteTrap>)>,
        breakpoints: Option<std::sync::Arc<Breakpoints>>,
    ) -> Self {
        Self {
            config,
            profile: OnceLock::new(),
            served: AtomicU64::new(0),
            baseline: Mutex::new(None),
            protection,
            breakpoints,
        }
    }

    /// The guest-debug setting the vCPUs need, for VMs with breakpoints.
    pub fn debug(&self) -> Option<kvm_bindings::kvm_guest_debug> {
        self.breakpoints.as_ref().map(|b| b.debug())
    }

    /// Takes every breakpoint out (the vCPUs take the new setting next).
    pub fn untrace(&self) {
        if let Some(b) = &self.breakpoints {
            b.clear();
        }
    }

    fn breakpoints(&self) -> Result<&Breakpoints, ReadError> {
        self.breakpoints
            .as_deref()
            .ok_or_else(|| "breakpoints are not available for this VM".into())
    }

    fn trace_info(&self) -> TraceInfo {
        let Some(b) = &self.breakpoints else {
            return TraceInfo::default();
        };
        let (others, (last_vector, last_pc)) = b.others();
        TraceInfo {
            breakpoints: (b.armed().iter())
                .map(|a| TracePoint {
                    symbol: a.symbol.clone(),
                    address: a.gva,
                })
                .collect(),
            hits: b.hit_count(),
            other_exits: others,
            last_other: (others > 0).then(|| format!("vector {last_vector} at {last_pc:#x}")),
        }
    }

    /// The parsed profile, or why the image's files do not give one.
    pub fn profile(&self) -> Result<&Profile, String> {
        self.profile
            .get_or_init(|| {
                Profile::load(&self.config.system_map, &self.config.btf)
                    .map_err(|e| format!("the image's kernel profile is unusable: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Requests served so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Reads `view` from a guest whose vCPUs are held; `cpus` are all of them, in order.
    pub fn read(
        &self,
        view: IntrospectView,
        symbol: Option<&str>,
        mem: &GuestMemoryMmap,
        cpus: &[CpuView],
    ) -> Result<Introspection, ReadError> {
        self.served.fetch_add(1, Ordering::Relaxed);
        let profile = self.profile()?;
        let cpu = cpus.first().ok_or("no vCPU state")?;
        let g = GuestKernel::attach(profile, mem, cpu).map_err(|e| e.to_string())?;
        let mut out = Introspection {
            slide: g.kernel.slide,
            ..Default::default()
        };
        out.partial = match view {
            IntrospectView::Processes => {
                let list = g.processes();
                capped(list, &mut out.processes, |p| GuestProcess {
                    pid: p.pid,
                    ppid: p.ppid,
                    comm: p.comm,
                    uid: p.uid,
                    state: p.state,
                    start_time_ns: p.start_time_ns,
                    kernel_thread: p.kernel_thread,
                    task: p.task,
                })
            }
            IntrospectView::Modules => capped(g.modules(), &mut out.modules, |m| GuestModule {
                state: m.state_name().to_string(),
                name: m.name,
                base: m.base,
                size: m.size,
            }),
            IntrospectView::Protect | IntrospectView::ProtectPause => {
                let (slots, trap) = self
                    .protection
                    .as_ref()
                    .ok_or("write protection is not available for this VM")?;
                let ranges = protected_ranges(&g).map_err(|e| e.to_string())?;
                slots.protect(&ranges)?;
                let head = g.kernel.addr("modules").map_err(|e| e.to_string())?;
                trap.arm(Armed {
                    ranges,
                    pause: view == IntrospectView::ProtectPause,
                    writers: Writers {
                        paging: g.reader.paging,
                        layout: *g.layout,
                        modules: head,
                    },
                });
                out.protection = Some(self.protection_info(&g));
                None
            }
            IntrospectView::Traps => {
                let (_, trap) = self
                    .protection
                    .as_ref()
                    .ok_or("write protection is not available for this VM")?;
                let modules = g.modules();
                let events = trap.events();
                out.protection = Some(self.protection_info(&g));
                let va = |gpa: u64| g.image_va(gpa);
                let list = Listing {
                    items: events,
                    broken: None,
                };
                capped(list, &mut out.traps, |e| TrapReport {
                    vcpu: e.vcpu,
                    address: va(e.gpa),
                    target: g.kernel.describe(va(e.gpa)),
                    rip: e.rip,
                    writer: match &e.module {
                        Some(m) => format!("{:#x} (in module {m})", e.rip),
                        None => integrity::name(&g, &modules.items, e.rip),
                    },
                    bytes: e.data.iter().map(|b| format!("{b:02x}")).collect(),
                    landed: e.landed,
                    ago_ms: e.at.elapsed().as_millis() as u64,
                })
            }
            IntrospectView::Trace => {
                let b = self.breakpoints()?;
                let symbol = match symbol {
                    Some(s) => s,
                    None => bulwark_vmi::trace::default_symbol(&g).ok_or(
                        "this kernel has neither bprm_execve nor do_execveat_common; name a function with --symbol",
                    )?,
                };
                let gva = g
                    .kernel
                    .addr(symbol)
                    .map_err(|e| ReadError::Invalid(e.to_string()))?;
                let (text, etext) = (g.kernel.addr("_stext"), g.kernel.addr("_etext"));
                if !matches!((text, etext), (Ok(s), Ok(e)) if (s..e).contains(&gva)) {
                    return Err(ReadError::Invalid(format!(
                        "{symbol} ({gva:#x}) is not in the kernel's text: only kernel functions can be traced"
                    )));
                }
                let decoder =
                    bulwark_vmi::trace::Decoder::new(&g, symbol).map_err(|e| e.to_string())?;
                b.arm(ArmedBreakpoint {
                    symbol: symbol.to_string(),
                    gva,
                    decoder,
                })
                .map_err(ReadError::Invalid)?;
                out.tracing = Some(self.trace_info());
                None
            }
            IntrospectView::Untrace => {
                let b = self.breakpoints()?;
                match symbol {
                    Some(s) => b.disarm(s).map_err(ReadError::Invalid)?,
                    None => b.clear(),
                }
                out.tracing = Some(self.trace_info());
                None
            }
            IntrospectView::Hits => {
                let b = self.breakpoints()?;
                out.tracing = Some(self.trace_info());
                let (_, hits) = b.hits();
                // The newest ones, if there are more than a reply carries.
                let skip = hits.len().saturating_sub(MAX_INTROSPECT_ROWS);
                let list = Listing {
                    items: hits.into_iter().skip(skip).collect(),
                    broken: None,
                };
                capped(list, &mut out.hits, |h| TraceHit {
                    vcpu: h.vcpu,
                    symbol: h.symbol,
                    pid: h.hit.pid,
                    comm: h.hit.comm,
                    detail: h.hit.detail,
                    ago_ms: h.at.elapsed().as_millis() as u64,
                })
            }
            IntrospectView::Baseline | IntrospectView::Check => {
                let t0 = Instant::now();
                let now = integrity::measure(&g, cpus).map_err(|e| e.to_string())?;
                let mut baseline = self.baseline.lock().unwrap_or_else(|e| e.into_inner());
                let (findings, broken) = if view == IntrospectView::Check {
                    let base = baseline.as_ref().ok_or(
                        "no integrity baseline yet: take one once the guest is up (`bulwark vm vmi baseline NAME`)",
                    )?;
                    let modules = g.modules();
                    let mut f = integrity::compare(&g, &modules.items, base, &now);
                    let (hidden, broken) = integrity::hidden_modules(&g, &modules.items);
                    f.extend(hidden);
                    (f, broken.or(modules.broken))
                } else {
                    (Vec::new(), None)
                };
                out.measured = Some(Measured {
                    bytes: now.bytes(),
                    syscalls: now.syscalls.len() as u64,
                    vcpus: now.cpus.len() as u32,
                    measure_us: t0.elapsed().as_micros() as u64,
                });
                if view == IntrospectView::Baseline {
                    *baseline = Some(now);
                }
                let list = Listing {
                    items: findings,
                    broken,
                };
                capped(list, &mut out.findings, |f| IntegrityFinding {
                    kind: f.kind.to_string(),
                    address: f.address,
                    detail: f.detail,
                })
            }
        };
        Ok(out)
    }
}

impl Introspector {
    fn protection_info(&self, g: &GuestKernel<'_>) -> ProtectionInfo {
        let armed = self.protection.as_ref().and_then(|(_, t)| t.armed());
        let writes = self.protection.as_ref().map_or(0, |(_, t)| t.total());
        let va = |gpa: u64| g.image_va(gpa);
        ProtectionInfo {
            ranges: armed.map_or(Vec::new(), |a| {
                a.ranges.iter().map(|&(s, e)| [va(s), va(e)]).collect()
            }),
            armed: armed.is_some(),
            pause: armed.is_some_and(|a| a.pause),
            writes,
        }
    }
}

/// Kernel text (`_stext`..`_etext`) and read-only data (`__start_rodata`..`__end_rodata`),
/// guest-physical and page-aligned. Not the gap between them: the kernel frees it after boot
/// and it becomes ordinary memory.
fn protected_ranges(
    g: &GuestKernel<'_>,
) -> Result<[(u64, u64); 2], bulwark_vmi::symbols::SymbolError> {
    let pa = |sym: &str| g.kernel.addr(sym).map(|va| g.image_pa(va));
    let range = |from: &str, to: &str| -> Result<(u64, u64), bulwark_vmi::symbols::SymbolError> {
        Ok((pa(from)? & !0xfff, (pa(to)? + 0xfff) & !0xfff))
    };
    Ok([
        range("_stext", "_etext")?,
        range("__start_rodata", "__end_rodata")?,
    ])
}

/// Moves at most [`MAX_INTROSPECT_ROWS`] rows of `list` into `out`; why the result is partial.
fn capped<T, U>(list: Listing<T>, out: &mut Vec<U>, row: impl Fn(T) -> U) -> Option<String> {
    let total = list.items.len();
    out.extend(list.items.into_iter().take(MAX_INTROSPECT_ROWS).map(row));
    let cut = (total > MAX_INTROSPECT_ROWS)
        .then(|| format!("{total} rows, only the first {MAX_INTROSPECT_ROWS} sent"));
    match (list.broken, cut) {
        (Some(b), Some(c)) => Some(format!("{b}; {c}")),
        (b, c) => b.or(c),
    }
}

/// What introspection needs of a vCPU outside `KVM_RUN`.
pub fn cpu_view(fd: &VcpuFd) -> Result<CpuView, kvm_ioctls::Error> {
    let s = fd.get_sregs()?;
    let entries: Vec<kvm_msr_entry> = std::iter::once(MSR_LSTAR)
        .chain(SECURITY_MSRS.iter().map(|m| m.0))
        .map(|index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs =
        Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
    // KVM stops at the first MSR it cannot read; those after it read as 0.
    let n = fd.get_msrs(&mut msrs)?;
    let value = |i: usize| if i < n { msrs.as_slice()[i].data } else { 0 };
    let mut view = CpuView {
        cr0: s.cr0,
        cr3: s.cr3,
        cr4: s.cr4,
        efer: s.efer,
        lstar: value(0),
        idt: (s.idt.base, s.idt.limit),
        gdt: (s.gdt.base, s.gdt.limit),
        ..Default::default()
    };
    for (i, (slot, (index, _))) in view.msrs.iter_mut().zip(SECURITY_MSRS).enumerate() {
        *slot = (index, value(i + 1));
    }
    Ok(view)
}

/// Most write-trap events kept (the oldest fall out; the total is still counted).
const MAX_TRAP_EVENTS: usize = 1024;

/// The last `CAP` events a vCPU reported, and how many there were in all: the log behind
/// write traps and breakpoint hits.
#[derive(Debug)]
pub struct EventLog<T, const CAP: usize> {
    kept: Mutex<std::collections::VecDeque<T>>,
    total: AtomicU64,
}

impl<T, const CAP: usize> Default for EventLog<T, CAP> {
    fn default() -> Self {
        Self {
            kept: Mutex::new(std::collections::VecDeque::new()),
            total: AtomicU64::new(0),
        }
    }
}

impl<T: Clone, const CAP: usize> EventLog<T, CAP> {
    /// Counts `event` and keeps it, dropping the oldest beyond `CAP`.
    pub fn record(&self, event: T) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() == CAP {
            kept.pop_front();
        }
        kept.push_back(event);
    }

    /// Events recorded since the start (also those no longer kept).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The events still kept, oldest first.
    pub fn kept(&self) -> Vec<T> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.iter().cloned().collect()
    }
}

/// Guarded ranges: guest writes to them exit to the monitor instead of landing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Armed {
    /// Guest-physical [start, end) ranges, sorted and disjoint.
    pub ranges: [(u64, u64); 2],
    /// Drop the write and pause the VM (otherwise the monitor writes it and the guest runs on).
    pub pause: bool,
    /// How a vCPU names the module a writer's code is in, at the time of the write (a module
    /// loaded later may take the same addresses).
    pub writers: Writers,
}

/// What a vCPU needs to find the module holding an address: the kernel's page tables, the
/// layout, and the module list's head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Writers {
    pub paging: bulwark_vmi::pagetable::Paging,
    pub layout: bulwark_vmi::layout::KernelLayout,
    pub modules: u64,
}

impl Writers {
    fn module_of(&self, mem: &GuestMemoryMmap, addr: u64) -> Option<String> {
        let r = bulwark_vmi::tasks::Reader {
            mem,
            paging: self.paging,
        };
        let list = bulwark_vmi::modules::modules(&r, &self.layout, self.modules);
        list.items
            .into_iter()
            .find(|m| m.holds(addr))
            .map(|m| m.name)
    }
}

/// One trapped write, as the vCPU saw it.
#[derive(Clone, Debug)]
pub struct TrapEvent {
    pub vcpu: u32,
    pub gpa: u64,
    /// The writer's instruction pointer (after the write: KVM has completed the instruction).
    pub rip: u64,
    pub data: Vec<u8>,
    /// The monitor performed the write.
    pub landed: bool,
    pub at: Instant,
    /// The module whose code wrote, when it was one.
    pub module: Option<String>,
}

/// Write protection of guest memory through read-only memory slots: the vCPU that writes there
/// reports here before anything lands.
#[derive(Debug, Default)]
pub struct WriteTrap {
    /// Set once armed: every MMIO write exit of the VM asks [`WriteTrap::covers`], and until
    /// then it answers without taking the lock.
    is_armed: std::sync::atomic::AtomicBool,
    armed: std::sync::RwLock<Option<Armed>>,
    events: EventLog<TrapEvent, MAX_TRAP_EVENTS>,
}

impl WriteTrap {
    pub fn armed(&self) -> Option<Armed> {
        *self.armed.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts (or changes) what is guarded and how.
    pub fn arm(&self, a: Armed) {
        *self.armed.write().unwrap_or_else(|e| e.into_inner()) = Some(a);
        self.is_armed.store(true, Ordering::Release);
    }

    /// Whether a guest write to `gpa` is this trap's.
    pub fn covers(&self, gpa: u64) -> bool {
        self.is_armed.load(Ordering::Acquire)
            && self
                .armed()
                .is_some_and(|a| a.ranges.iter().any(|&(s, e)| (s..e).contains(&gpa)))
    }

    /// A vCPU's write to the guarded range: recorded, then written through the monitor's own
    /// mapping or dropped with the VM paused, as armed. True if the VM is to pause.
    pub fn on_write(
        &self,
        vcpu: u32,
        gpa: u64,
        data: &[u8],
        rip: u64,
        mem: &GuestMemoryMmap,
    ) -> bool {
        use vm_memory::{Bytes, GuestAddress};
        let armed = self.armed();
        let pause = armed.is_some_and(|a| a.pause);
        let module = armed.and_then(|a| a.writers.module_of(mem, rip));
        let landed = !pause && mem.write_slice(data, GuestAddress(gpa)).is_ok();
        self.events.record(TrapEvent {
            vcpu,
            gpa,
            rip,
            data: data.to_vec(),
            landed,
            at: Instant::now(),
            module,
        });
        tracing::warn!(
            vcpu,
            gpa,
            rip,
            len = data.len(),
            landed,
            "guest write to protected memory"
        );
        pause
    }

    /// The writes still kept (the last [`MAX_TRAP_EVENTS`]).
    pub fn events(&self) -> Vec<TrapEvent> {
        self.events.kept()
    }

    /// Writes trapped since arming (also those no longer kept).
    pub fn total(&self) -> u64 {
        self.events.total()
    }
}

/// The VM's memory slots, as far as write protection changes them.
pub struct SlotEditor {
    vm: std::sync::Arc<kvm_ioctls::VmFd>,
    /// (guest-physical start, size, host address) of each RAM slot, by slot number.
    slots: Vec<(u64, u64, u64)>,
    /// The ranges made read-only, once.
    done: Mutex<Option<Vec<(u64, u64)>>>,
}

impl std::fmt::Debug for SlotEditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotEditor({:?})", self.slots)
    }
}

impl SlotEditor {
    /// `regions` are the RAM slots in slot order (guest-physical start, size); `mem` maps them.
    pub fn new(
        vm: std::sync::Arc<kvm_ioctls::VmFd>,
        regions: &[(u64, u64)],
        mem: &GuestMemoryMmap,
    ) -> Self {
        use vm_memory::{GuestAddress, GuestMemoryBackend};
        let slots = regions
            .iter()
            .filter_map(|&(g, s)| {
                let host = mem.get_host_address(GuestAddress(g)).ok()?;
                Some((g, s, host as u64))
            })
            .collect();
        Self {
            vm,
            slots,
            done: Mutex::new(None),
        }
    }

    /// Makes the guest-physical `ranges` (page-aligned, sorted, disjoint, all in one RAM
    /// region) read-only to the guest by splitting the RAM slot that holds them. The vCPUs
    /// must be outside `KVM_RUN`. Done once per VM; asking again for the same ranges does
    /// nothing.
    pub fn protect(&self, ranges: &[(u64, u64)]) -> Result<(), String> {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        match &*done {
            Some(r) if r == ranges => return Ok(()),
            Some(r) => {
                return Err(format!(
                    "guest-physical {r:x?} is protected already; the ranges cannot change"
                ));
            }
            None => {}
        }
        let aligned = |x: u64| x.is_multiple_of(4096);
        let ordered = ranges.windows(2).all(|w| w[0].1 <= w[1].0);
        if ranges.is_empty()
            || !ordered
            || ranges
                .iter()
                .any(|&(s, e)| s >= e || !aligned(s) || !aligned(e))
        {
            return Err(format!("{ranges:x?} are not sorted, page-aligned ranges"));
        }
        let (first, last) = (ranges[0].0, ranges[ranges.len() - 1].1);
        let Some((i, &(gpa, size, host))) =
            (self.slots.iter().enumerate()).find(|(_, (g, s, _))| *g <= first && last <= g + s)
        else {
            return Err(format!(
                "{ranges:x?} are not inside one RAM region of this guest"
            ));
        };
        fn err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
            move |e| format!("cannot {what} for write protection: {e}")
        }
        // The region in pieces: writable before, between and after the ranges, read-only
        // over them. The first piece keeps the slot's number; the others take new ones.
        let mut pieces = Vec::new();
        let mut at = gpa;
        for &(s, e) in ranges {
            pieces.push((at, s - at, false));
            pieces.push((s, e - s, true));
            at = e;
        }
        pieces.push((at, gpa + size - at, false));
        pieces.retain(|p| p.1 > 0);
        let numbers: Vec<u32> = std::iter::once(i as u32)
            .chain((self.slots.len() as u32)..)
            .take(pieces.len())
            .collect();
        let vm = &self.vm;
        crate::vm::set_slot(vm, i as u32, gpa, 0, host, false).map_err(err("remove a RAM slot"))?;
        for (k, (&(g, s, ro), &n)) in pieces.iter().zip(&numbers).enumerate() {
            if let Err(e) = crate::vm::set_slot(vm, n, g, s, host + (g - gpa), ro) {
                // Put the slot back as it was: the guest must not lose its memory.
                for &n in &numbers[..k] {
                    let _ = crate::vm::set_slot(vm, n, 0, 0, 0, false);
                }
                crate::vm::set_slot(vm, i as u32, gpa, size, host, false)
                    .map_err(err("restore a RAM slot"))?;
                return Err(err(
                    "add a read-only RAM slot (does this host's KVM have KVM_CAP_READONLY_MEM?)",
                )(e));
            }
        }
        *done = Some(ranges.to_vec());
        Ok(())
    }
}

/// The guest-debug setting for hardware instruction breakpoints at `addrs` (the first four):
/// DRn holds the address; in DR7, Gn (bit 2n+1) enables it with R/Wn = LENn = 00 (execute),
/// and bit 10 is always set.
pub fn debug_setting(addrs: impl Iterator<Item = u64>) -> kvm_bindings::kvm_guest_debug {
    let mut d = kvm_bindings::kvm_guest_debug::default();
    let mut dr7 = 0x400;
    for (n, a) in addrs.take(MAX_BREAKPOINTS).enumerate() {
        d.arch.debugreg[n] = a;
        dr7 |= 1 << (2 * n + 1);
    }
    if dr7 != 0x400 {
        d.control = kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_HW_BP;
        d.arch.debugreg[7] = dr7;
    }
    d
}

/// Why an introspection request was not served: the request itself (a function the kernel does
/// not have, a fifth breakpoint), or reading the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadError {
    Invalid(String),
    Failed(String),
}

impl ReadError {
    /// The channel's error code for it.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid(_) => bulwark_channel::error_code::INVALID,
            Self::Failed(_) => bulwark_channel::error_code::FAILED,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Invalid(m) | Self::Failed(m) => m,
        }
    }
}

impl From<String> for ReadError {
    fn from(m: String) -> Self {
        Self::Failed(m)
    }
}

impl From<&str> for ReadError {
    fn from(m: &str) -> Self {
        Self::Failed(m.to_string())
    }
}

/// Most breakpoint hits kept (the oldest fall out; the total is still counted).
const MAX_HITS: usize = 4096;

/// x86 exception vector of a guest-debug exit at a hardware breakpoint.
pub const DB_VECTOR: u32 = 1;
/// RFLAGS.RF: the next instruction does not raise its instruction breakpoint again.
pub const RFLAGS_RF: u64 = 1 << 16;

/// A breakpoint on a kernel function.
#[derive(Clone, Debug)]
pub struct ArmedBreakpoint {
    pub symbol: String,
    /// Guest-virtual address of its first instruction.
    pub gva: u64,
    pub decoder: bulwark_vmi::trace::Decoder,
}

/// One breakpoint hit.
#[derive(Clone, Debug)]
pub struct HitEvent {
    pub vcpu: u32,
    pub symbol: String,
    pub hit: bulwark_vmi::trace::Hit,
    pub at: Instant,
}

/// Introspection's breakpoints (up to four kernel functions, one per debug address register),
/// through KVM guest debug with hardware instruction breakpoints on every vCPU: guest memory
/// is not touched, so integrity checks, snapshots and the other vCPUs see the guest's own
/// bytes, and the guest cannot find them by reading its text. The vCPU that reaches a function
/// exits to its thread, which decodes the hit and resumes with RFLAGS.RF set so the
/// instruction runs once.
#[derive(Debug, Default)]
pub struct Breakpoints {
    armed: std::sync::RwLock<Vec<ArmedBreakpoint>>,
    hits: EventLog<HitEvent, MAX_HITS>,
    /// Debug exits that were not a breakpoint's (given back to the guest), and the last one's
    /// vector and address.
    others: AtomicU64,
    last_other: Mutex<(u32, u64)>,
}

/// What a vCPU does after a guest-debug exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugStep {
    /// Ours, recorded: run the instruction (RF set).
    Resume,
    /// Not ours (the guest single-stepping itself, say): give the exception to the guest.
    Reinject,
}

impl Breakpoints {
    /// The breakpoints placed, in debug-register order.
    pub fn armed(&self) -> Vec<ArmedBreakpoint> {
        self.armed.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The `KVM_SET_GUEST_DEBUG` setting every vCPU should have now.
    pub fn debug(&self) -> kvm_bindings::kvm_guest_debug {
        debug_setting(self.armed().iter().map(|b| b.gva))
    }

    /// Places `bp` (the VM paused; the vCPUs take [`Breakpoints::debug`] next); a function
    /// already traced stays as it is.
    pub fn arm(&self, bp: ArmedBreakpoint) -> Result<(), String> {
        let mut armed = self.armed.write().unwrap_or_else(|e| e.into_inner());
        if armed.iter().any(|b| b.gva == bp.gva) {
            return Ok(());
        }
        if armed.len() == MAX_BREAKPOINTS {
            let names: Vec<&str> = armed.iter().map(|b| b.symbol.as_str()).collect();
            return Err(format!(
                "{MAX_BREAKPOINTS} breakpoints are set ({}), one per debug address register: untrace one first",
                names.join(", ")
            ));
        }
        armed.push(bp);
        Ok(())
    }

    /// Takes every breakpoint out.
    pub fn clear(&self) {
        self.armed
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Takes the breakpoint on `symbol` out.
    pub fn disarm(&self, symbol: &str) -> Result<(), String> {
        let mut armed = self.armed.write().unwrap_or_else(|e| e.into_inner());
        let before = armed.len();
        armed.retain(|b| b.symbol != symbol);
        if armed.len() == before {
            return Err(format!("no breakpoint on {symbol}"));
        }
        Ok(())
    }

    /// Debug exits that were not the breakpoint's, and the last one (vector, address).
    pub fn others(&self) -> (u64, (u32, u64)) {
        (
            self.others.load(Ordering::Relaxed),
            *self.last_other.lock().unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Hits so far (also those no longer kept).
    pub fn hit_count(&self) -> u64 {
        self.hits.total()
    }

    /// Hits so far, and those kept.
    pub fn hits(&self) -> (u64, Vec<HitEvent>) {
        (self.hits.total(), self.hits.kept())
    }

    /// A guest-debug exit on vCPU `vcpu` at `pc`; `read` gives the argument registers and the
    /// kernel's per-CPU base, read only for a hit.
    pub fn on_debug(
        &self,
        vcpu: u32,
        exception: u32,
        pc: u64,
        mem: &GuestMemoryMmap,
        read: impl FnOnce() -> Option<([u64; 6], u64)>,
    ) -> DebugStep {
        let found = (exception == DB_VECTOR)
            .then(|| {
                let armed = self.armed.read().unwrap_or_else(|e| e.into_inner());
                armed.iter().find(|b| b.gva == pc).cloned()
            })
            .flatten();
        let Some(bp) = found else {
            self.others.fetch_add(1, Ordering::Relaxed);
            *self.last_other.lock().unwrap_or_else(|e| e.into_inner()) = (exception, pc);
            return DebugStep::Reinject;
        };
        let hit = match read() {
            Some((args, gs_base)) => bp.decoder.decode(mem, gs_base, args),
            None => bulwark_vmi::trace::Hit {
                pid: 0,
                comm: String::new(),
                detail: "<registers unreadable>".into(),
            },
        };
        self.hits.record(HitEvent {
            vcpu,
            symbol: bp.symbol,
            hit,
            at: Instant::now(),
        });
        DebugStep::Resume
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn bp(symbol: &str, gva: u64) -> ArmedBreakpoint {
        ArmedBreakpoint {
            symbol: symbol.into(),
            gva,
            decoder: bulwark_vmi::trace::Decoder {
                paging: Default::default(),
                layout: Default::default(),
                current_task: 0,
                exec_arg: None,
            },
        }
    }

    #[test]
    fn each_breakpoint_takes_a_debug_register_and_its_enable_bit() {
        let none = debug_setting(std::iter::empty());
        assert_eq!(none.control, 0, "no breakpoint: guest debugging off");
        let d = debug_setting([0x10, 0x20, 0x30, 0x40, 0x50].into_iter());
        assert_eq!(
            d.control,
            kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_HW_BP
        );
        assert_eq!(&d.arch.debugreg[..4], &[0x10, 0x20, 0x30, 0x40]);
        // G0..G3 (bits 1, 3, 5, 7), execute breakpoints of length 0, and the fixed bit 10.
        assert_eq!(d.arch.debugreg[7], 0x400 | 0b1010_1010);
        let one = debug_setting([0x10].into_iter());
        assert_eq!(one.arch.debugreg[7], 0x402);
    }

    #[test]
    fn four_breakpoints_at_most_and_untrace_names_what_is_not_set() {
        let b = Breakpoints::default();
        for (i, s) in ["a", "b", "c", "d"].iter().enumerate() {
            b.arm(bp(s, 0x1000 * (i as u64 + 1))).unwrap();
        }
        // The same function again changes nothing.
        b.arm(bp("a", 0x1000)).unwrap();
        let e = b.arm(bp("e", 0x5000)).unwrap_err();
        assert!(
            e.contains("a, b, c, d") && e.contains("untrace one first"),
            "{e}"
        );
        let e = b.disarm("zzz").unwrap_err();
        assert_eq!(e, "no breakpoint on zzz");
        b.disarm("b").unwrap();
        let names: Vec<String> = b.armed().into_iter().map(|a| a.symbol).collect();
        assert_eq!(names, ["a", "c", "d"]);
        assert_eq!(b.debug().arch.debugreg[1], 0x3000);
        b.clear();
        assert!(b.armed().is_empty());
        assert_eq!(b.debug().control, 0);
    }

    #[test]
    fn a_hit_is_recorded_and_any_other_debug_exit_goes_back_to_the_guest() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let b = Breakpoints::default();
        b.arm(bp("f", 0xffff_ffff_8100_0000)).unwrap();
        let step = b.on_debug(1, DB_VECTOR, 0xffff_ffff_8100_0000, &mem, || {
            Some(([1, 2, 3, 4, 5, 6], 0))
        });
        assert_eq!(step, DebugStep::Resume);
        // The guest's own single step, a breakpoint vector, an address nobody traced.
        for (vector, pc) in [(1, 0xffff_ffff_8100_0001), (3, 0xffff_ffff_8100_0000)] {
            assert_eq!(
                b.on_debug(0, vector, pc, &mem, || unreachable!("not read")),
                DebugStep::Reinject
            );
        }
        let (total, hits) = b.hits();
        assert_eq!(total, 1);
        assert_eq!((hits[0].vcpu, hits[0].symbol.as_str()), (1, "f"));
        // The per-CPU base 0 is unreadable here: still a hit, with what could be read.
        assert_eq!(hits[0].hit.pid, 0);
        assert!(hits[0].hit.detail.starts_with("args 0x1 0x2 0x3"));
        assert_eq!(b.others(), (2, (3, 0xffff_ffff_8100_0000)));
        // Unreadable registers: still recorded.
        b.on_debug(0, DB_VECTOR, 0xffff_ffff_8100_0000, &mem, || None);
        assert_eq!(b.hits().1[1].hit.detail, "<registers unreadable>");
    }
}
