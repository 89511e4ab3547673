// SPDX-License-Identifier: GPL-2.0
/*
 * The trap: one ftrace_ops per patched function entry, with IPMODIFY as upstream livepatch
 * uses. The handler does not decide anything itself: it asks lp-core where a call to this entry
 * goes now (a wait-free table read) and sets the return IP accordingly.
 */
#define pr_fmt(fmt) "lpcore: " fmt

#include <linux/ftrace.h>
#include <linux/slab.h>
#include "lp.h"

struct lp_site {
	struct list_head node;
	unsigned long addr;
	unsigned int users;
	struct ftrace_ops ops;
};

static LIST_HEAD(lp_sites);

static void notrace lp_ftrace_handler(unsigned long ip, unsigned long parent_ip,
				      struct ftrace_ops *ops, struct ftrace_regs *fregs)
{
	u64 target;
	int bit;

	/* Also disables preemption: stop_machine cannot find a CPU half-way through here. */
	bit = ftrace_test_recursion_trylock(ip, parent_ip);
	if (WARN_ON_ONCE(bit < 0))
		return;
	target = lp_rs_redirect(ip);
	/*
	 * A call made by the replacement's own module (the new function calling the one it
	 * replaces, through LP_SYMBOL) runs the original code: redirecting it would recurse.
	 */
	if (target && !lp_same_module(parent_ip, target))
		ftrace_instruction_pointer_set(fregs, target);
	ftrace_test_recursion_unlock(bit);
}

static struct lp_site *lp_site_find(unsigned long addr)
{
	struct lp_site *s;

	list_for_each_entry(s, &lp_sites, node)
		if (s->addr == addr)
			return s;
	return NULL;
}

int lp_site_get(unsigned long addr, char *err, size_t len)
{
	struct lp_site *s = lp_site_find(addr);
	int ret;

	lockdep_assert_held(&lp_mutex);
	if (s) {
		s->users++;
		return 0;
	}
	s = kzalloc(sizeof(*s), GFP_KERNEL);
	if (!s)
		return -ENOMEM;
	s->addr = addr;
	s->users = 1;
	s->ops.func = lp_ftrace_handler;
	s->ops.flags = FTRACE_OPS_FL_SAVE_REGS | FTRACE_OPS_FL_DYNAMIC | FTRACE_OPS_FL_IPMODIFY;
	ret = ftrace_set_filter_ip(&s->ops, addr, 0, 0);
	if (ret) {
		snprintf(err, len, "cannot trace %pS (ftrace_set_filter_ip: %d)", (void *)addr, ret);
		kfree(s);
		return ret;
	}
	ret = register_ftrace_function(&s->ops);
	if (ret) {
		snprintf(err, len, "cannot hook %pS (register_ftrace_function: %d%s)", (void *)addr,
			 ret, ret == -EBUSY ? ": another IPMODIFY user owns it" : "");
		ftrace_set_filter_ip(&s->ops, addr, 1, 0);
		kfree(s);
		return ret;
	}
	list_add(&s->node, &lp_sites);
	return 0;
}

void lp_site_put(unsigned long addr)
{
	struct lp_site *s = lp_site_find(addr);

	lockdep_assert_held(&lp_mutex);
	if (WARN_ON(!s) || --s->users)
		return;
	list_del(&s->node);
	/* Waits until no CPU is inside the handler any more. */
	WARN_ON(unregister_ftrace_function(&s->ops));
	ftrace_set_filter_ip(&s->ops, addr, 1, 0);
	kfree(s);
}
