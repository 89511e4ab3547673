// SPDX-License-Identifier: GPL-2.0
/*
 * The synchronization point: stop every CPU (stop_machine), walk the stack of every task, ask
 * lp-core whether any return address or IP lies in code being switched, and commit the switch
 * only when none does. Otherwise let the machine run and retry until the timeout; at the
 * timeout the caller undoes everything and the old code stays.
 */
#define pr_fmt(fmt) "lpcore: " fmt

#include <linux/delay.h>
#include <linux/jiffies.h>
#include <linux/ktime.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/stop_machine.h>
#include <linux/cpumask.h>
#include "lp.h"

#define LP_MAX_STACK 128

/* Only used inside stop_machine, which runs one callback at a time. */
static unsigned long lp_stack_buf[LP_MAX_STACK];
static u64 lp_stack_u64[LP_MAX_STACK];

static void lp_note_busy(struct lp_switch *sw, struct task_struct *t)
{
	sw->busy_pid = t->pid;
	memcpy(sw->busy_comm, t->comm, TASK_COMM_LEN);
}

/* Returns true when `t` is inside one of the ranges, or its stack cannot be trusted. */
static bool lp_task_busy(struct lp_switch *sw, struct task_struct *t)
{
	size_t range = 0;
	u64 addr = 0;
	int n, i;

	/*
	 * The other CPUs' stopper threads are running multi_cpu_stop() right now: they are not in
	 * patchable code, and a running task's stack cannot be walked.
	 */
	if (t != current && READ_ONCE(t->on_cpu))
		return false;
	if (lp_stack_trace_save_tsk_reliable) {
		n = lp_stack_trace_save_tsk_reliable(t, lp_stack_buf, LP_MAX_STACK);
		if (n < 0) {
			sw->unreliable = true;
			lp_note_busy(sw, t);
			return true;
		}
	} else {
		n = lp_stack_trace_save_tsk(t, lp_stack_buf, LP_MAX_STACK, 0);
	}
	for (i = 0; i < n; i++)
		lp_stack_u64[i] = lp_stack_buf[i];
	/* Every entry of a saved stack is a return address (no task runs here but current). */
	if (!lp_rs_check_task(t->pid, 0, lp_stack_u64, n, sw->ranges, sw->nranges, &range, &addr))
		return false;
	sw->unreliable = false;
	lp_note_busy(sw, t);
	sw->busy_range = range;
	sw->busy_addr = addr;
	return true;
}

static int lp_switch_in_stop_machine(void *data)
{
	struct lp_switch *sw = data;
	struct task_struct *g, *t;
	int cpu;

	if (lp_task_busy(sw, &init_task))
		return -EBUSY;
	if (lp_idle_task)
		for_each_online_cpu(cpu)
			if (lp_task_busy(sw, lp_idle_task(cpu)))
				return -EBUSY;
	rcu_read_lock();
	for_each_process_thread(g, t) {
		if (lp_task_busy(sw, t)) {
			rcu_read_unlock();
			return -EBUSY;
		}
	}
	rcu_read_unlock();
	return sw->commit(sw->data);
}

int lp_switch_run(struct lp_switch *sw)
{
	unsigned long deadline = jiffies + msecs_to_jiffies(lp_switch_timeout_ms);
	int ret;

	u64 t0;

	sw->attempts = 0;
	for (;;) {
		sw->attempts++;
		t0 = ktime_get_ns();
		ret = stop_machine(lp_switch_in_stop_machine, sw, NULL);
		sw->stop_ns = ktime_get_ns() - t0;
		if (ret != -EBUSY || time_after(jiffies, deadline))
			return ret;
		msleep(lp_switch_retry_ms);
	}
}
