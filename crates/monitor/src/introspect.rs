//! Introspection served to a VM's owner: the guest kernel read from outside while its vCPUs
//! are held (`bulwark-vmi` does the reading). A VM is introspected only when its spec says so;
//! the kernel's profile (System.map and BTF) is read before the monitor enters its jail and
//! parsed on the first request, so a VM that is never looked at pays nothing but the read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use bulwark_channel::{
    GuestModule, GuestProcess, IntegrityFinding, IntrospectView, Introspection,
    MAX_INTROSPECT_ROWS, Measured,
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
}

impl Introspector {
    pub fn new(config: IntrospectionConfig) -> Self {
        Self {
            config,
            profile: OnceLock::new(),
            served: AtomicU64::new(0),
            baseline: Mutex::new(None),
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
        mem: &GuestMemoryMmap,
        cpus: &[CpuView],
    ) -> Result<Introspection, String> {
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
