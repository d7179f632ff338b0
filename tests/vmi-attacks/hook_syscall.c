// SPDX-License-Identifier: GPL-2.0
/*
 * hook_syscall.ko - redirect sys_call_table[__NR_getppid] to a function in this module.
 *
 * The classic syscall-table hook: find sys_call_table (not exported; kallsyms via the kprobe
 * trick), remember the entry for getppid, and store the address of our own handler there.
 * The table lives in .rodata, mapped read-only, so the store is done with CR0.WP cleared
 * (see vmi_attack.h). The hook counts its calls and forwards to the original.
 *
 * 6.1 stable kernels (6.1.85 and later, so every Debian 12 kernel of 2024 onwards) no longer
 * dispatch through the table: x64_sys_call() is a switch over the syscall number that calls
 * the handlers directly (the "x86/syscall: Don't force use of indirect calls" backport). The
 * hook therefore probably never runs; the tampered table entry - a pointer into the module
 * area instead of kernel text - is what introspection is meant to find. The unload message
 * says how often the hook ran.
 *
 * Unloading puts the original pointer back (only if the entry still holds ours), then waits
 * for an RCU-tasks grace period so no task can still be executing the hook when the module's
 * code is freed.
 */
#include <linux/module.h>
#include <linux/init.h>
#include <linux/atomic.h>
#include <linux/rcupdate.h>
#include <linux/rcupdate_wait.h>
#include <asm/syscall.h>
#include <asm/unistd.h>

#include "vmi_attack.h"

#define HOOKED_NR __NR_getppid

static sys_call_ptr_t *table;	/* the kernel's sys_call_table */
static sys_call_ptr_t orig;	/* what table[HOOKED_NR] held before */
static atomic_long_t hits = ATOMIC_LONG_INIT(0);

static long hooked_getppid(const struct pt_regs *regs)
{
	atomic_long_inc(&hits);
	return orig(regs);
}

static int __init hook_syscall_init(void)
{
	unsigned long expected;

	table = (sys_call_ptr_t *)vmi_lookup_name("sys_call_table");
	expected = vmi_lookup_name("__x64_sys_getppid");
	if (!table || !expected) {
		pr_err("vmi-attack: cannot find sys_call_table or __x64_sys_getppid\n");
		return -ENOENT;
	}
	orig = READ_ONCE(table[HOOKED_NR]);
	if ((unsigned long)orig != expected) {
		pr_err("vmi-attack: sys_call_table[%d] is %ps, not __x64_sys_getppid; not hooking\n",
		       HOOKED_NR, orig);
		return -EBUSY;
	}

	vmi_poke_ulong((unsigned long *)&table[HOOKED_NR], (unsigned long)hooked_getppid);
	pr_info("vmi-attack: hooked sys_call_table[%d] (getppid) at %px: %px -> %px\n",
		HOOKED_NR, &table[HOOKED_NR], orig, hooked_getppid);
	return 0;
}

static void __exit hook_syscall_exit(void)
{
	if (READ_ONCE(table[HOOKED_NR]) != hooked_getppid) {
		pr_warn("vmi-attack: sys_call_table[%d] changed behind us (%ps); leaving it\n",
			HOOKED_NR, READ_ONCE(table[HOOKED_NR]));
	} else {
		vmi_poke_ulong((unsigned long *)&table[HOOKED_NR], (unsigned long)orig);
	}
	/* Every task that could be inside hooked_getppid() passes a voluntary switch or
	 * user mode before this returns. */
	synchronize_rcu_tasks();
	pr_info("vmi-attack: restored sys_call_table[%d] (getppid); hook ran %ld times\n",
		HOOKED_NR, atomic_long_read(&hits));
}

module_init(hook_syscall_init);
module_exit(hook_syscall_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("bulwark VMI test: hook getppid in sys_call_table");
