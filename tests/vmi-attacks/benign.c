// SPDX-License-Identifier: GPL-2.0
/*
 * benign.ko - the control case: a module that does nothing but say hello and goodbye.
 *
 * Loading and unloading it changes only what any module load changes (a new entry on the
 * `modules` list, its own code and data in the module area, its sysfs directory). The kernel's
 * text, sys_call_table and task list stay as they were, so introspection should see the module
 * come and go in its module list and raise no alert.
 */
#include <linux/module.h>
#include <linux/init.h>

static int __init benign_init(void)
{
	pr_info("vmi-attack: benign module loaded, nothing changed\n");
	return 0;
}

static void __exit benign_exit(void)
{
	pr_info("vmi-attack: benign module unloaded\n");
}

module_init(benign_init);
module_exit(benign_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("bulwark VMI test: a harmless module (load/unload must not raise an alert)");
