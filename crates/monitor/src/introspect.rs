//! Introspection served to a VM's owner: the guest kernel read from outside while its vCPUs
//! are held (`bulwark-vmi` does the reading). A VM is introspected only when its spec says so;
//! the kernel's profile (System.map and BTF) is read before the monitor enters its jail and
//! parsed on the first request, so a VM that is never looked at pays nothing but the read.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use bulwark_channel::{
    GuestModule, GuestProcess, IntrospectView, Introspection, MAX_INTROSPECT_ROWS,
};
use bulwark_vmi::guest::{CpuView, GuestKernel, Profile};
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
}

impl Introspector {
    pub fn new(config: IntrospectionConfig) -> Self {
        Self {
            config,
            profile: OnceLock::new(),
            served: AtomicU64::new(0),
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

    /// Reads `view` from a guest whose vCPUs are held; `cpu` is one of them.
    pub fn read(
        &self,
        view: IntrospectView,
        mem: &GuestMemoryMmap,
        cpu: &CpuView,
    ) -> Result<Introspection, String> {
        self.served.fetch_add(1, Ordering::Relaxed);
        let profile = self.profile()?;
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
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_LSTAR,
        ..Default::default()
    }])
    .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
    let n = fd.get_msrs(&mut msrs)?;
    let lstar = if n == 1 { msrs.as_slice()[0].data } else { 0 };
    Ok(CpuView {
        cr0: s.cr0,
        cr3: s.cr3,
        cr4: s.cr4,
        efer: s.efer,
        lstar,
    })
}
