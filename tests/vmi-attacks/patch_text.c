// SPDX-License-Identifier: GPL-2.0
/*
 * patch_text.ko [func=NAME] - change one byte of kernel text, harmlessly.
 *
 * An inline hook or code patch changes the kernel's .text. To produce such a change without
 * altering behaviour, this module edits one byte of the padding behind a function: the bytes
 * between the function's last instruction (an unconditional jmp or ret) and the next symbol,
 * which the CPU never executes. The page is read-only, so the store is done with CR0.WP
 * cleared (see vmi_attack.h).
 *
 * Finding the padding safely: kallsyms gives the function's start and size (up to the next
 * symbol, so the size includes the padding). The kernel's own x86 instruction decoder
 * (insn_decode, not exported, found with kallsyms) walks the function from its first byte -
 * gcc puts no data in kernel text, so a linear sweep sees every instruction. We take the
 * function only if the sweep ends exactly at the next symbol and the instructions after the
 * last ret/jmp/ud2 are all padding (nop, multi-byte nop, int3). Then:
 *
 *   - an int3 (0xcc) in the padding becomes a nop (0x90). After boot, when the CPU needs no
 *     return thunk, the kernel rewrites each "jmp __x86_return_thunk" into "ret; int3 x4";
 *     those int3 bytes are the usual find.
 *   - otherwise the last byte of a multi-byte nop (0f 1f /0 with a displacement) gets bit 0
 *     flipped: it is the top byte of the nop's unused displacement, so the instruction is the
 *     same nop of the same length.
 *   - otherwise the first padding byte becomes int3, which nothing reaches.
 *
 * text_mutex (found with kallsyms) is held so ftrace, jump labels, static calls and kprobes,
 * which patch text under it, do not run at the same time.
 *
 * Default functions tried, in order: small syscall getters whose code is a call and a jmp.
 * Unloading puts the original byte back.
 */
#include <linux/module.h>
#include <linux/init.h>
#include <linux/mutex.h>
#include <asm/insn.h>

#include "vmi_attack.h"

static char *func;
module_param(func, charp, 0444);
MODULE_PARM_DESC(func, "kernel function whose trailing padding to patch (default: try a few)");

static const char *const default_funcs[] = {
	"__x64_sys_getpid", "__x64_sys_gettid", "__x64_sys_getuid", "__x64_sys_getgid",
};

typedef int (*insn_decode_t)(struct insn *insn, const void *kaddr, int buf_len,
			     enum insn_mode m);
typedef int (*size_offset_t)(unsigned long addr, unsigned long *size, unsigned long *offset);

static insn_decode_t decode;
static size_offset_t size_offset;
static struct mutex *text_mutex_p;

static u8 *patched;		/* where we wrote, NULL if nothing */
static u8 old_byte, new_byte;

/* ret, ret imm16, jmp rel32, jmp rel8, ud2: nothing falls through past these. */
static bool is_terminator(const struct insn *insn)
{
	u8 op = insn->opcode.bytes[0];

	if (insn->opcode.nbytes == 1)
		return op == 0xc3 || op == 0xc2 || op == 0xe9 || op == 0xeb;
	return insn->opcode.nbytes == 2 && op == 0x0f && insn->opcode.bytes[1] == 0x0b;
}

static bool is_int3(const struct insn *insn)
{
	return insn->length == 1 && insn->opcode.bytes[0] == 0xcc;
}

/* 0f 1f /0: the multi-byte nop (nopw/nopl with any prefixes). */
static bool is_long_nop(const struct insn *insn)
{
	return insn->opcode.nbytes == 2 && insn->opcode.bytes[0] == 0x0f &&
	       insn->opcode.bytes[1] == 0x1f && X86_MODRM_REG(insn->modrm.bytes[0]) == 0;
}

static bool is_padding(const struct insn *insn)
{
	/* 90 is nop (also with 66 prefixes); with REX.B it would be xchg %r8,%rax. */
	if (insn->opcode.nbytes == 1 && insn->opcode.bytes[0] == 0x90)
		return insn->rex_prefix.nbytes == 0;
	return is_int3(insn) || is_long_nop(insn);
}

/*
 * Pick a byte in the padding at the end of the function [start, start + size): set *where
 * and *val, or return an error when the function does not have the expected shape.
 */
static int pick_byte(unsigned long start, unsigned long size, u8 **where, u8 *val)
{
	unsigned long end = start + size, addr, pad = 0;
	struct insn insn;

	for (addr = start; addr < end; addr += insn.length) {
		if (decode(&insn, (void *)addr, MAX_INSN_SIZE, INSN_MODE_KERN) < 0 || !insn.length)
			return -EILSEQ;
		if (is_terminator(&insn))
			pad = addr + insn.length;	/* padding may start here */
		else if (!is_padding(&insn))
			pad = 0;			/* code after the last terminator */
	}
	if (addr != end)
		return -EILSEQ;		/* the last instruction crosses into the next symbol */
	if (!pad || pad == end)
		return -ENOENT;		/* no padding after the last ret/jmp */

	for (addr = pad; addr < end; addr += insn.length) {
		decode(&insn, (void *)addr, MAX_INSN_SIZE, INSN_MODE_KERN);
		if (is_int3(&insn)) {
			*where = (u8 *)addr;
			*val = 0x90;
			return 0;
		}
	}
	for (addr = pad; addr < end; addr += insn.length) {
		decode(&insn, (void *)addr, MAX_INSN_SIZE, INSN_MODE_KERN);
		if (is_long_nop(&insn) && insn.displacement.nbytes) {
			*where = (u8 *)addr + insn.length - 1;
			*val = **where ^ 0x01;
			return 0;
		}
	}
	*where = (u8 *)pad;
	*val = 0xcc;
	return 0;
}

static int try_func(const char *name)
{
	unsigned long start, size, offset;
	u8 *where;
	u8 val;
	int err;

	start = vmi_lookup_name(name);
	if (!start || !size_offset(start, &size, &offset) || offset != 0 || size > 4096) {
		pr_info("vmi-attack: patch_text: %s not found or too large\n", name);
		return -ENOENT;
	}
	/* Only the core kernel's text (not a module's, not init text freed after boot). */
	if (start < vmi_lookup_name("_stext") || start + size > vmi_lookup_name("_etext")) {
		pr_info("vmi-attack: patch_text: %s is not in the kernel's .text\n", name);
		return -EINVAL;
	}
	err = pick_byte(start, size, &where, &val);
	if (err) {
		pr_info("vmi-attack: patch_text: no usable padding after %s (%d)\n", name, err);
		return err;
	}
	old_byte = *where;
	new_byte = val;
	vmi_poke_u8(where, val);
	patched = where;
	pr_info("vmi-attack: patched kernel text at %px (%pS, padding after %s): %02x -> %02x\n",
		where, where, name, old_byte, new_byte);
	return 0;
}

static int __init patch_text_init(void)
{
	int err = -ENOENT;
	size_t i;

	/*
	 * The first vmi_lookup_name() registers a kprobe, which takes text_mutex itself, so it
	 * must happen before we lock it; later calls (in try_func) only call the cached
	 * kallsyms_lookup_name pointer.
	 */
	decode = (insn_decode_t)vmi_lookup_name("insn_decode");
	size_offset = (size_offset_t)vmi_lookup_name("kallsyms_lookup_size_offset");
	text_mutex_p = (struct mutex *)vmi_lookup_name("text_mutex");
	if (!decode || !size_offset || !text_mutex_p) {
		pr_err("vmi-attack: cannot find insn_decode, kallsyms_lookup_size_offset or text_mutex\n");
		return -ENOENT;
	}

	mutex_lock(text_mutex_p);
	if (func) {
		err = try_func(func);
	} else {
		for (i = 0; i < ARRAY_SIZE(default_funcs) && err; i++)
			err = try_func(default_funcs[i]);
	}
	mutex_unlock(text_mutex_p);
	return err;
}

static void __exit patch_text_exit(void)
{
	mutex_lock(text_mutex_p);
	if (*patched == new_byte)
		vmi_poke_u8(patched, old_byte);
	mutex_unlock(text_mutex_p);
	pr_info("vmi-attack: restored kernel text at %px: %02x\n", patched, old_byte);
}

module_init(patch_text_init);
module_exit(patch_text_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("bulwark VMI test: change one byte of never-executed kernel text padding");
