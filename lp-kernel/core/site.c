// SPDX-License-Identifier: GPL-2.0
/*
 * The trap: one ftrace_ops per patched function entry, with IPMODIFY, as upstream livepatch
 * uses. x86 has ftrace "with args": the light trampoline can change the return IP, so no
 * SAVE_REGS (which costs a full pt_regs save per call — 3x the cost of a redirected call). The handler does not decide anything itself: it asks lp-core where a call to this entry
 * goes now (a wait-free table read) and sets the return IP accordingly.
 */
#define pr_fmt(fmt) "lpcore: " fmt

#include <linux/ftrace.h>
#include <linux/slab.h>
#include "lp.h"

/* The text of a patch module with a version at this site. */
struct lp_site_caller {
	struct module *mod;
	unsigned long start;
	unsigned long size;
};

/* Versions a site can carry (lp-core's MAX_DEPTH). */
#define LP_SITE_MAX_VERSIONS 8

struct lp_site {
	struct list_head node;
	unsigned long addr;
	unsigned int users;
	/*
	 * Patch modules with a version here, in stacking order. Written under lp_mutex, read by the
	 * handler without a lock: an entry is complete before `ncallers` covers it (release /
	 * acquire), and only the last entry is ever removed.
	 */
	unsigned int ncallers;
	struct lp_site_caller callers[LP_SITE_MAX_VERSIONS];
	struct ftrace_ops ops;
};

/* Whether the call comes from a patch module with a version at this site. */
static bool notrace lp_from_patch(const struct lp_site *s, unsigned long caller)
{
	unsigned int i, n = smp_load_acquire(&s->ncallers);

	for (i = 0; i < n; i++)
		if (caller - READ_ONCE(s->callers[i].start) < READ_ONCE(s->callers[i].size))
			return true;
	return false;
}

static LIST_HEAD(lp_sites);

static void notrace lp_ftrace_handler(unsigned long ip, unsigned long parent_ip,
				      struct ftrace_ops *ops, struct ftrace_regs *fregs)
{
	struct lp_site *s = container_of(ops, struct lp_site, ops);
	u64 target;
	int bit;

	/* Also disables preemption: stop_machine cannot find a CPU half-way through here. */
	bit = ftrace_test_recursion_trylock(ip, parent_ip);
	if (WARN_ON_ONCE(bit < 0))
		return;
	target = lp_rs_redirect(ip);
	/*
	 * A call made by a patch module that replaces this function (its new function calling the
	 * one it replaces, through LP_SYMBOL) runs the original code: redirecting it would recurse.
	 */
	if (target && !lp_from_patch(s, parent_ip))
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

static void lp_site_add_caller(struct lp_site *s, struct module *owner)
{
	struct lp_site_caller *c = &s->callers[s->ncallers];

	c->mod = owner;
	WRITE_ONCE(c->start, (unsigned long)owner->core_layout.base);
	WRITE_ONCE(c->size, owner->core_layout.text_size);
	smp_store_release(&s->ncallers, s->ncallers + 1);
}

static void lp_site_del_caller(struct lp_site *s, struct module *owner)
{
	unsigned int i, n = s->ncallers;

	for (i = n; i-- > 0;) {
		if (s->callers[i].mod != owner)
			continue;
		/* Versions leave from the top, so this is the last entry in practice. */
		for (; i + 1 < n; i++) {
			WRITE_ONCE(s->callers[i].start, s->callers[i + 1].start);
			WRITE_ONCE(s->callers[i].size, s->callers[i + 1].size);
			s->callers[i].mod = s->callers[i + 1].mod;
		}
		smp_store_release(&s->ncallers, n - 1);
		return;
	}
}

int lp_site_get(unsigned long addr, struct module *owner, char *err, size_t len)
{
	struct lp_site *s = lp_site_find(addr);
	int ret;

	lockdep_assert_held(&lp_mutex);
	if (s) {
		if (s->ncallers == LP_SITE_MAX_VERSIONS) {
			snprintf(err, len, "%pS already carries %d versions", (void *)addr,
				 LP_SITE_MAX_VERSIONS);
			return -ENOSPC;
		}
		s->users++;
		lp_site_add_caller(s, owner);
		return 0;
	}
	s = kzalloc(sizeof(*s), GFP_KERNEL);
	if (!s)
		return -ENOMEM;
	s->addr = addr;
	s->users = 1;
	lp_site_add_caller(s, owner);
	s->ops.func = lp_ftrace_handler;
	s->ops.flags = FTRACE_OPS_FL_DYNAMIC | FTRACE_OPS_FL_IPMODIFY;
#ifndef CONFIG_HAVE_DYNAMIC_FTRACE_WITH_ARGS
	s->ops.flags |= FTRACE_OPS_FL_SAVE_REGS;
#endif
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

void lp_site_put(unsigned long addr, struct module *owner)
{
	struct lp_site *s = lp_site_find(addr);

	lockdep_assert_held(&lp_mutex);
	if (WARN_ON(!s))
		return;
	lp_site_del_caller(s, owner);
	if (--s->users)
		return;
	list_del(&s->node);
	/* Waits until no CPU is inside the handler any more. */
	WARN_ON(unregister_ftrace_function(&s->ops));
	ftrace_set_filter_ip(&s->ops, addr, 1, 0);
	kfree(s);
}
