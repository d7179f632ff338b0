//! Kernel integrity from outside: a measurement of what a rootkit changes — kernel text and
//! read-only data (a hash per 4 KiB page), the system call table, every vCPU's interrupt
//! descriptor table and GDT, the system-call MSRs, and the protections CR0.WP, CR4.SMEP and
//! CR4.SMAP — taken once the guest is up (the baseline) and compared with a later one. Each
//! difference is a [`Finding`] named by symbol. One check needs no baseline: a module that
//! unlinked itself from the module list but still has its `/sys/module` entry.
//!
//! Running kernel text is not the vmlinux file's (the kernel patches itself while it boots:
//! alternatives, static keys, return thunks), so the baseline is the running guest's own.

use sha2::{Digest, Sha256};

use crate::guest::{CpuView, GuestKernel, SECURITY_MSRS};
use crate::modules::Module;
use crate::pagetable::ReadError;
use crate::tasks::walk_list;

const PAGE: u64 = 4096;
/// Largest kernel text or rodata measured (a whole distribution kernel's text is ~16 MiB).
pub const MAX_REGION: u64 = 256 << 20;
/// Most system call table entries read (x86-64 Linux has about 460).
const MAX_SYSCALLS: u64 = 1024;
/// Most `/sys/module` entries walked.
const MAX_KOBJECTS: usize = 8192;

/// One region hashed page by page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pages {
    /// The symbols bounding it.
    pub name: &'static str,
    pub start: u64,
    /// SHA-256 of each 4 KiB page (the first 16 bytes), or `None` for a page that could not be
    /// read.
    pub hashes: Vec<Option<[u8; 16]>>,
    /// The bytes themselves, for kernel text: a difference is reported down to the byte.
    pub data: Option<Vec<u8>>,
}

/// What one vCPU shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuMeasure {
    pub regs: CpuView,
    /// Each IDT gate's handler address (`None`: not present).
    pub idt: Vec<Option<u64>>,
    /// SHA-256 of the GDT's bytes.
    pub gdt: Option<[u8; 16]>,
}

/// A measurement of the guest kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Measurement {
    pub text: Pages,
    pub rodata: Pages,
    /// `sys_call_table`'s entries.
    pub syscalls: Vec<u64>,
    pub cpus: Vec<CpuMeasure>,
}

impl Measurement {
    /// Bytes hashed.
    pub fn bytes(&self) -> u64 {
        (self.text.hashes.len() + self.rodata.hashes.len()) as u64 * PAGE
    }
}

/// One difference from the baseline (or one inconsistency), named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// `kernel_text`, `kernel_rodata`, `syscall_table`, `idt`, `gdt`, `msr`, `cr0_wp`,
    /// `cr4_smep`, `cr4_smap`, `hidden_module`.
    pub kind: &'static str,
    /// The guest-virtual address concerned (0 when there is none).
    pub address: u64,
    /// What changed, with symbols.
    pub detail: String,
}

fn hash(data: &[u8]) -> [u8; 16] {
    let d = Sha256::digest(data);
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("the kernel's symbols lack {0}")]
    Symbol(#[from] crate::symbols::SymbolError),
    #[error("{name} spans {from:#x}..{to:#x}, which is not a kernel region")]
    BadRegion {
        name: &'static str,
        from: u64,
        to: u64,
    },
}

fn pages(
    g: &GuestKernel<'_>,
    name: &'static str,
    (from, to): (&str, &str),
    keep: bool,
) -> Result<Pages, MeasureError> {
    let (start, end) = (g.kernel.addr(from)?, g.kernel.addr(to)?);
    if end <= start || end - start > MAX_REGION {
        return Err(MeasureError::BadRegion {
            name,
            from: start,
            to: end,
        });
    }
    let start = start & !(PAGE - 1);
    let mut buf = vec![0u8; PAGE as usize];
    let mut data = keep.then(Vec::new);
    let hashes = (start..end)
        .step_by(PAGE as usize)
        .map(|va| {
            let h = g.reader.bytes(va, &mut buf).ok().map(|()| hash(&buf));
            if let Some(d) = data.as_mut() {
                d.extend_from_slice(if h.is_some() {
                    &buf
                } else {
                    &[0; PAGE as usize]
                });
            }
            h
        })
        .collect();
    Ok(Pages {
        name,
        start,
        hashes,
        data,
    })
}

fn cpu(g: &GuestKernel<'_>, regs: &CpuView) -> CpuMeasure {
    let r = &g.reader;
    let gates = (u64::from(regs.idt.1) + 1) / 16;
    let idt = (0..gates.min(256))
        .map(|v| {
            let mut gate = [0u8; 16];
            r.bytes(regs.idt.0.wrapping_add(v * 16), &mut gate).ok()?;
            let w = |i: usize| u64::from(u16::from_le_bytes([gate[i], gate[i + 1]]));
            let present = gate[5] & 0x80 != 0;
            let high = u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]));
            present.then_some(w(0) | (w(6) << 16) | (high << 32))
        })
        .collect();
    let mut gdt = vec![0u8; usize::from(regs.gdt.1) + 1];
    let gdt = r.bytes(regs.gdt.0, &mut gdt).ok().map(|()| hash(&gdt));
    CpuMeasure {
        regs: *regs,
        idt,
        gdt,
    }
}

/// Measures the guest kernel `g` and the vCPUs `cpus` (all of them, paused).
pub fn measure(g: &GuestKernel<'_>, cpus: &[CpuView]) -> Result<Measurement, MeasureError> {
    let table = g.kernel.addr("sys_call_table")?;
    let n = (g.kernel.map.span(table.wrapping_sub(g.kernel.slide)))
        .map_or(MAX_SYSCALLS, |b| (b / 8).min(MAX_SYSCALLS));
    let syscalls = (0..n)
        .map_while(|i| g.reader.u64(table + i * 8).ok())
        .collect();
    Ok(Measurement {
        text: pages(g, "kernel text", ("_stext", "_etext"), true)?,
        rodata: pages(
            g,
            "kernel rodata",
            ("__start_rodata", "__end_rodata"),
            false,
        )?,
        syscalls,
        cpus: cpus.iter().map(|c| cpu(g, c)).collect(),
    })
}

/// Most separate changed byte runs reported for one page.
const MAX_RUNS_PER_PAGE: usize = 8;

/// The runs of differing bytes of two equal-length slices: (offset, length). Runs closer than
/// 8 bytes merge.
fn runs(was: &[u8], is: &[u8]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for i in (0..was.len().min(is.len())).filter(|&i| was[i] != is[i]) {
        match out.last_mut() {
            Some((start, len)) if i < *start + *len + 8 => *len = i + 1 - *start,
            _ => out.push((i, 1)),
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Names an address: a kernel symbol, or the module whose code holds it, or neither.
pub fn name(g: &GuestKernel<'_>, modules: &[Module], addr: u64) -> String {
    if let Some(m) = modules.iter().find(|m| m.holds(addr)) {
        return format!("{addr:#x} (in module {})", m.name);
    }
    let sym = g.kernel.describe(addr);
    let in_kernel = g
        .kernel
        .addr("_stext")
        .ok()
        .zip(g.kernel.addr("_end").ok())
        .is_some_and(|(s, e)| (s..e).contains(&addr));
    if in_kernel {
        format!("{addr:#x} ({sym})")
    } else {
        format!("{addr:#x} (outside the kernel and every listed module)")
    }
}

/// Every difference between `base` and `now`; `modules` (the current module list) name
/// addresses in module code.
pub fn compare(
    g: &GuestKernel<'_>,
    modules: &[Module],
    base: &Measurement,
    now: &Measurement,
) -> Vec<Finding> {
    let mut out = Vec::new();
    for (kind, b, n) in [
        ("kernel_text", &base.text, &now.text),
        ("kernel_rodata", &base.rodata, &now.rodata),
    ] {
        for (i, (hb, hn)) in b.hashes.iter().zip(&n.hashes).enumerate() {
            if hb == hn {
                continue;
            }
            let va = b.start + i as u64 * PAGE;
            let at = i * PAGE as usize..(i + 1) * PAGE as usize;
            let bytes = b
                .data
                .as_ref()
                .zip(n.data.as_ref())
                .and_then(|(was, is)| Some((was.get(at.clone())?, is.get(at.clone())?)));
            match bytes {
                Some((was, is)) if hb.is_some() && hn.is_some() => {
                    for (off, len) in runs(was, is).into_iter().take(MAX_RUNS_PER_PAGE) {
                        let a = va + off as u64;
                        let shown = len.min(16);
                        out.push(Finding {
                            kind,
                            address: a,
                            detail: format!(
                                "{} at {a:#x} ({}) changed: {} -> {}{}",
                                b.name,
                                g.kernel.describe(a),
                                hex(&was[off..off + shown]),
                                hex(&is[off..off + shown]),
                                if len > shown {
                                    format!(" (and {} bytes more)", len - shown)
                                } else {
                                    String::new()
                                }
                            ),
                        });
                    }
                }
                _ => out.push(Finding {
                    kind,
                    address: va,
                    detail: format!(
                        "{} page {va:#x} ({}) {}",
                        b.name,
                        g.kernel.describe(va),
                        if hn.is_none() {
                            "can no longer be read"
                        } else {
                            "changed"
                        }
                    ),
                }),
            }
        }
        if b.hashes.len() != n.hashes.len() || b.start != n.start {
            out.push(Finding {
                kind,
                address: n.start,
                detail: format!("{} moved or changed size", b.name),
            });
        }
    }
    let table = g.kernel.addr("sys_call_table").unwrap_or_default();
    for (i, (was, is)) in base.syscalls.iter().zip(&now.syscalls).enumerate() {
        if was != is {
            out.push(Finding {
                kind: "syscall_table",
                address: table + i as u64 * 8,
                detail: format!(
                    "sys_call_table[{i}] was {}, is {}",
                    name(g, modules, *was),
                    name(g, modules, *is)
                ),
            });
        }
    }
    for (i, (b, n)) in base.cpus.iter().zip(&now.cpus).enumerate() {
        for (v, (was, is)) in b.idt.iter().zip(&n.idt).enumerate() {
            if was != is {
                let show = |a: &Option<u64>| match a {
                    Some(a) => name(g, modules, *a),
                    None => "not present".into(),
                };
                out.push(Finding {
                    kind: "idt",
                    address: n.regs.idt.0 + v as u64 * 16,
                    detail: format!("vCPU {i} IDT vector {v} was {}, is {}", show(was), show(is)),
                });
            }
        }
        if b.regs.idt != n.regs.idt || b.idt.len() != n.idt.len() {
            out.push(Finding {
                kind: "idt",
                address: n.regs.idt.0,
                detail: format!(
                    "vCPU {i} IDTR moved: {:#x}/{:#x} -> {:#x}/{:#x}",
                    b.regs.idt.0, b.regs.idt.1, n.regs.idt.0, n.regs.idt.1
                ),
            });
        }
        if b.gdt != n.gdt || b.regs.gdt != n.regs.gdt {
            out.push(Finding {
                kind: "gdt",
                address: n.regs.gdt.0,
                detail: format!("vCPU {i} GDT changed (at {:#x})", n.regs.gdt.0),
            });
        }
        if b.regs.lstar != n.regs.lstar {
            out.push(Finding {
                kind: "msr",
                address: n.regs.lstar,
                detail: format!(
                    "vCPU {i} LSTAR (syscall entry) was {}, is {}",
                    name(g, modules, b.regs.lstar),
                    name(g, modules, n.regs.lstar)
                ),
            });
        }
        for (((idx, was), (_, is)), (_, msr)) in
            b.regs.msrs.iter().zip(&n.regs.msrs).zip(SECURITY_MSRS)
        {
            if was != is {
                out.push(Finding {
                    kind: "msr",
                    address: 0,
                    detail: format!("vCPU {i} {msr} ({idx:#x}) was {was:#x}, is {is:#x}"),
                });
            }
        }
        for (kind, bit, reg, what) in [
            ("cr0_wp", CpuView::CR0_WP, 0, "CR0.WP (write protection)"),
            ("cr4_smep", CpuView::CR4_SMEP, 4, "CR4.SMEP"),
            ("cr4_smap", CpuView::CR4_SMAP, 4, "CR4.SMAP"),
        ] {
            let get = |c: &CpuView| if reg == 0 { c.cr0 } else { c.cr4 };
            if get(&b.regs) & bit != 0 && get(&n.regs) & bit == 0 {
                out.push(Finding {
                    kind,
                    address: 0,
                    detail: format!("vCPU {i} {what} was set and is clear"),
                });
            }
        }
    }
    if base.cpus.len() != now.cpus.len() {
        out.push(Finding {
            kind: "idt",
            address: 0,
            detail: format!(
                "{} vCPUs measured, {} in the baseline",
                now.cpus.len(),
                base.cpus.len()
            ),
        });
    }
    out
}

/// Modules with a `/sys/module` entry that are not on the module list `listed`: a module that
/// unlinked itself. Returns the findings and, if the walk stopped early, why.
pub fn hidden_modules(g: &GuestKernel<'_>, listed: &[Module]) -> (Vec<Finding>, Option<String>) {
    let l = g.layout;
    let r = &g.reader;
    let kset = match g
        .kernel
        .addr("module_kset")
        .map_err(|e| e.to_string())
        .and_then(|a| r.u64(a).map_err(|e: ReadError| e.to_string()))
    {
        Ok(k) => k,
        Err(e) => return (Vec::new(), Some(format!("module_kset: {e}"))),
    };
    let (entries, broken) = walk_list(r, kset.wrapping_add(l.kset_list), l.list_next, MAX_KOBJECTS);
    let mut out = Vec::new();
    for e in entries {
        let kobj = e.wrapping_sub(l.kobject_entry);
        let Ok(m) = r.u64(kobj.wrapping_add(l.module_kobject_mod)) else {
            continue;
        };
        if m == 0 || listed.iter().any(|x| x.module == m) {
            continue;
        }
        let name = r
            .u64(kobj.wrapping_add(l.kobject_name))
            .and_then(|p| r.string(p, 64))
            .unwrap_or_else(|e| format!("<unreadable: {e}>"));
        out.push(Finding {
            kind: "hidden_module",
            address: m,
            detail: format!(
                "module {name:?} (struct module at {m:#x}) is in /sys/module but not on the module list"
            ),
        });
    }
    (out, broken)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::tests::{guest, pa, profile, va};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn a_rootkit_s_changes_are_found_and_named_and_an_unchanged_kernel_gives_none() {
        let (mem, cpu) = guest();
        let p = profile();
        let g = GuestKernel::attach(&p, &mem, &cpu).unwrap();
        let base = measure(&g, &[cpu]).unwrap();
        assert_eq!(
            base.text.hashes.len(),
            0x180,
            "1.5 MiB of text in 4 KiB pages"
        );
        assert_eq!(base.rodata.hashes.len(), 2);
        assert_eq!(base.syscalls.len(), 0x100 / 8, "up to the next symbol");
        assert_eq!(base.cpus[0].idt[3], Some(va(0xffff_ffff_8110_0010)));
        assert_eq!(base.cpus[0].idt.len(), 16);
        let again = measure(&g, &[cpu]).unwrap();
        assert!(compare(&g, &[], &base, &again).is_empty());
        assert_eq!(hidden_modules(&g, &[]), (Vec::new(), None));

        // Patch a byte of text, point syscall 2 and IDT vector 3 elsewhere, clear CR0.WP.
        mem.write_obj(0x90u8, GuestAddress(pa(0xffff_ffff_8110_0123)))
            .unwrap();
        mem.write_obj(
            0xffff_ffff_c000_1000u64,
            GuestAddress(pa(0xffff_ffff_8118_1010)),
        )
        .unwrap();
        mem.write_obj(0u16, GuestAddress(pa(0xffff_ffff_8124_0000 + 3 * 16)))
            .unwrap();
        let tampered = CpuView {
            cr0: cpu.cr0 & !CpuView::CR0_WP,
            ..cpu
        };
        let hook = Module {
            name: "rootkit".into(),
            state: 0,
            base: 0xffff_ffff_c000_0000,
            size: 0x2000,
            module: 0xffff_8880_0000_0000,
        };
        let now = measure(&g, &[tampered]).unwrap();
        let f = compare(&g, std::slice::from_ref(&hook), &base, &now);
        let kinds: Vec<_> = f.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            [
                "kernel_text",
                "kernel_rodata",
                "syscall_table",
                "idt",
                "cr0_wp"
            ],
            "{f:#?}"
        );
        assert_eq!(f[0].address, va(0xffff_ffff_8110_0123));
        assert!(
            f[0].detail
                .contains("(entry_SYSCALL_64+0x123) changed: 00 -> 90"),
            "{}",
            f[0].detail
        );
        assert!(
            f[2].detail.contains("sys_call_table[2]") && f[2].detail.contains("in module rootkit"),
            "{}",
            f[2].detail
        );
        assert!(f[3].detail.contains("vector 3"), "{}", f[3].detail);
    }

    #[test]
    fn changed_bytes_are_reported_as_runs() {
        let was = [0u8; 64];
        let mut is = was;
        is[3] = 1;
        is[5] = 1;
        is[40] = 2;
        assert_eq!(runs(&was, &is), [(3, 3), (40, 1)]);
        assert_eq!(runs(&was, &was), []);
    }
}
