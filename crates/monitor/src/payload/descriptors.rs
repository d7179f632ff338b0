//! The GDT, TSSs, IDT and exception stubs of a function micro-VM.
//!
//! Every exception vector (0–31) enters a 16-byte stub on the vCPU's own exception stack
//! (IST1). The stub pushes the vector, then writes it to [`FAULT_PORT`]: the monitor takes that
//! exit, reads the CPU's exception frame from the stack, and stops the VM with a report. The
//! stubs are the only code the monitor ever runs at CPL0 on a payload's behalf.

use super::layout::{IO_BITMAP_ADDR, IO_BITMAP_LEN, Layout, STUBS_ADDR};
use crate::abi::FAULT_PORT;

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_DS: u16 = 0x18 | 3;
pub const USER_CS: u16 = 0x20 | 3;
/// Selector of vCPU `i`'s TSS is `TSS_SELECTOR_BASE + 16 * i`.
pub const TSS_SELECTOR_BASE: u16 = 0x28;
/// Size of the architectural part of a TSS.
pub const TSS_SIZE: usize = 104;

/// Offset from vCPU `i`'s TSS to the shared I/O permission bitmap.
fn iopb_offset(vcpu: u32) -> u16 {
    (IO_BITMAP_ADDR - Layout::tss_addr(vcpu)) as u16
}

/// TSS limit of vCPU `i`: it must cover the bitmap and its terminating byte.
pub fn tss_limit(vcpu: u32) -> u32 {
    u32::from(iopb_offset(vcpu)) + IO_BITMAP_LEN as u32 - 1
}

/// The shared I/O permission bitmap: every port allowed, then the all-ones end byte.
pub fn io_bitmap() -> Vec<u8> {
    let mut b = vec![0u8; IO_BITMAP_LEN as usize];
    b[IO_BITMAP_LEN as usize - 1] = 0xff;
    b
}

const STUB_SLOT: u64 = 16;
const EXCEPTION_VECTORS: u8 = 32;
/// Offset of the common tail inside the stub page.
const COMMON_OFFSET: u64 = STUB_SLOT * EXCEPTION_VECTORS as u64;
/// Bytes of stub code the monitor writes (and the range a genuine fault report comes from).
pub const STUBS_LEN: u64 = COMMON_OFFSET + 16;

/// Whether the CPU pushes an error code for `vector`.
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Short mnemonic and name of an exception vector.
pub fn vector_name(vector: u64) -> (&'static str, &'static str) {
    match vector {
        0 => ("#DE", "divide error"),
        1 => ("#DB", "debug"),
        2 => ("NMI", "non-maskable interrupt"),
        3 => ("#BP", "breakpoint"),
        4 => ("#OF", "overflow"),
        5 => ("#BR", "bound range exceeded"),
        6 => ("#UD", "invalid opcode"),
        7 => ("#NM", "device not available"),
        8 => ("#DF", "double fault"),
        10 => ("#TS", "invalid TSS"),
        11 => ("#NP", "segment not present"),
        12 => ("#SS", "stack-segment fault"),
        13 => ("#GP", "general protection fault"),
        14 => ("#PF", "page fault"),
        16 => ("#MF", "x87 floating-point error"),
        17 => ("#AC", "alignment check"),
        18 => ("#MC", "machine check"),
        19 => ("#XM", "SIMD floating-point exception"),
        20 => ("#VE", "virtualization exception"),
        21 => ("#CP", "control protection"),
        _ => ("#??", "reserved exception"),
    }
}

fn segment(access: u8, flags: u8) -> u64 {
    // Base 0, limit 0xfffff; `flags` is the high nibble (G, D/B, L, AVL).
    0xffff | (u64::from(access) << 40) | (0xf << 48) | (u64::from(flags) << 52)
}

/// The GDT: null, kernel code/data, user data/code, then one 16-byte TSS descriptor per vCPU.
pub fn gdt(vcpus: u32) -> Vec<u8> {
    let mut entries = vec![
        0,
        segment(0x9b, 0xa), // kernel code: present, DPL0, exec/read, accessed; G, L
        segment(0x93, 0xc), // kernel data: present, DPL0, read/write, accessed; G, D/B
        segment(0xf3, 0xc), // user data: DPL3
        segment(0xfb, 0xa), // user code: DPL3, L
    ];
    for i in 0..vcpus {
        let base = Layout::tss_addr(i);
        let limit = u64::from(tss_limit(i));
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x8b << 40) // present, 64-bit TSS (busy)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        entries.push(low);
        entries.push(base >> 32);
    }
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

pub fn gdt_limit(vcpus: u32) -> u16 {
    // 5 descriptors of 8 bytes plus 16 per TSS; MAX_VCPUS keeps this far below 64 KiB.
    (40 + 16 * vcpus - 1) as u16
}

/// A 64-bit TSS whose RSP0 and IST1 both point at the vCPU's exception stack, and whose I/O
/// permission bitmap is the shared allow-all one. (Software-virtualization KVM such as kvm_pvm
/// ignores RFLAGS.IOPL for CPL3 guests but honours the bitmap, so both are set.)
pub fn tss(vcpu: u32) -> [u8; TSS_SIZE] {
    let mut t = [0u8; TSS_SIZE];
    let top = Layout::exception_stack_top(vcpu);
    t[4..12].copy_from_slice(&top.to_le_bytes()); // RSP0
    t[36..44].copy_from_slice(&top.to_le_bytes()); // IST1
    t[102..104].copy_from_slice(&iopb_offset(vcpu).to_le_bytes());
    t
}

/// The IDT: vectors 0–31 are interrupt gates to the stubs on IST1; the rest are not present.
/// #BP and #OF are callable from CPL3 (`int3`, `into`), so a breakpoint reports as one.
pub fn idt() -> Vec<u8> {
    let mut idt = vec![0u8; 256 * 16];
    for v in 0..EXCEPTION_VECTORS {
        let target = STUBS_ADDR + u64::from(v) * STUB_SLOT;
        let dpl: u8 = if v == 3 || v == 4 { 3 } else { 0 };
        let e = &mut idt[usize::from(v) * 16..][..16];
        e[0..2].copy_from_slice(&(target as u16).to_le_bytes());
        e[2..4].copy_from_slice(&KERNEL_CS.to_le_bytes());
        e[4] = 1; // IST1
        e[5] = 0x8e | (dpl << 5); // present, interrupt gate
        e[6..8].copy_from_slice(&((target >> 16) as u16).to_le_bytes());
        e[8..12].copy_from_slice(&((target >> 32) as u32).to_le_bytes());
    }
    idt
}

/// Machine code of the stubs, to be placed at `STUBS_ADDR`.
pub fn stubs() -> Vec<u8> {
    const HLT: u8 = 0xf4;
    let mut code = vec![HLT; STUBS_LEN as usize];
    for v in 0..EXCEPTION_VECTORS {
        let slot = usize::from(v) * STUB_SLOT as usize;
        let mut s = Vec::with_capacity(16);
        if !has_error_code(v) {
            s.extend_from_slice(&[0x6a, 0x00]); // push 0 (uniform frame)
        }
        s.extend_from_slice(&[0x6a, v]); // push vector
        // jmp rel32 to the common tail
        let after = slot as i64 + s.len() as i64 + 5;
        let rel = (COMMON_OFFSET as i64 - after) as i32;
        s.push(0xe9);
        s.extend_from_slice(&rel.to_le_bytes());
        code[slot..slot + s.len()].copy_from_slice(&s);
    }
    let port = FAULT_PORT.to_le_bytes();
    let common = [
        0x66, 0xba, port[0], port[1], // mov dx, FAULT_PORT
        0x8b, 0x04, 0x24, // mov eax, [rsp]
        0xef, // out dx, eax
        0xf4, // hlt
        0xeb, 0xfd, // jmp back to hlt: the monitor never resumes a faulted vCPU
    ];
    code[COMMON_OFFSET as usize..][..common.len()].copy_from_slice(&common);
    code
}

/// The frame on the exception stack when the stub reports: what the stub pushed, then what the
/// CPU pushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExceptionFrame {
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl ExceptionFrame {
    pub const SIZE: usize = 7 * 8;

    pub fn parse(bytes: &[u8; Self::SIZE]) -> Self {
        let q = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        Self {
            vector: q(0),
            error_code: q(1),
            rip: q(2),
            cs: q(3),
            rflags: q(4),
            rsp: q(5),
            ss: q(6),
        }
    }
}

/// Whether an exit at `rip` came from the stubs' common tail (and not from a payload that
/// wrote to the fault port itself).
pub fn is_stub_rip(rip: u64) -> bool {
    (STUBS_ADDR..STUBS_ADDR + STUBS_LEN).contains(&rip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stubs_jump_to_common_tail() {
        let code = stubs();
        for v in 0..EXCEPTION_VECTORS {
            let slot = usize::from(v) * 16;
            let jmp = if has_error_code(v) {
                slot + 2
            } else {
                slot + 4
            };
            assert_eq!(code[jmp], 0xe9, "vector {v}");
            let rel = i32::from_le_bytes(code[jmp + 1..jmp + 5].try_into().unwrap());
            assert_eq!(jmp as i64 + 5 + i64::from(rel), COMMON_OFFSET as i64);
            assert_eq!(code[jmp - 1], v, "pushes its vector");
        }
        assert_eq!(code[COMMON_OFFSET as usize + 7], 0xef);
    }

    #[test]
    fn idt_gates_point_at_stubs_on_ist1() {
        let idt = idt();
        let gate = |v: usize| &idt[v * 16..v * 16 + 16];
        let off = |g: &[u8]| {
            u64::from(u16::from_le_bytes([g[0], g[1]]))
                | (u64::from(u16::from_le_bytes([g[6], g[7]])) << 16)
        };
        assert_eq!(off(gate(14)), STUBS_ADDR + 14 * 16);
        assert_eq!(gate(14)[4], 1);
        assert_eq!(gate(14)[5], 0x8e);
        assert_eq!(gate(3)[5], 0xee, "int3 allowed from CPL3");
        assert_eq!(gate(32)[5], 0, "not present");
    }

    #[test]
    fn gdt_tss_descriptor_encodes_base() {
        let g = gdt(2);
        assert_eq!(g.len(), usize::from(gdt_limit(2)) + 1);
        let d = u64::from_le_bytes(g[56..64].try_into().unwrap()); // vCPU 1: 0x28 + 16
        let base = ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24);
        assert_eq!(base, Layout::tss_addr(1));
        assert_eq!((d >> 40) & 0xff, 0x8b);
        let user_cs = u64::from_le_bytes(g[32..40].try_into().unwrap());
        assert_eq!((user_cs >> 45) & 3, 3, "DPL3");
        assert_eq!((user_cs >> 53) & 1, 1, "long mode");
    }

    #[test]
    fn tss_points_ist1_and_rsp0_at_exception_stack() {
        let t = tss(3);
        let top = Layout::exception_stack_top(3).to_le_bytes();
        assert_eq!(&t[4..12], &top);
        assert_eq!(&t[36..44], &top);
        let iopb = u16::from_le_bytes([t[102], t[103]]);
        assert_eq!(Layout::tss_addr(3) + u64::from(iopb), IO_BITMAP_ADDR);
        assert_eq!(u64::from(tss_limit(3)), u64::from(iopb) + IO_BITMAP_LEN - 1);
        let bm = io_bitmap();
        assert!(bm[..8192].iter().all(|&b| b == 0) && bm[8192] == 0xff);
    }
}
