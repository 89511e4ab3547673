// SPDX-License-Identifier: GPL-2.0
/*
 * Modules that come and go under enabled patches. A module that comes gets the patches that
 * wait for it, in the order they were enabled, before any of its code runs (COMING: its init
 * has not run, so no synchronization point is needed); if that fails the module is refused.
 * A module that goes takes its versions out of the table (its code is gone; the patch waits
 * for it again).
 */
#define pr_fmt(fmt) "lpcore: " fmt

#include <linux/module.h>
#include <linux/notifier.h>
#include "lp.h"

static int lp_module_coming(struct module *mod)
{
	char err[LP_ERR_LEN] = "";
	u64 seq = 0;
	int ret;
	u32 i;

	/* Patches in enabling order, so stacks build up as they were. */
	for (;;) {
		struct lp_patch *p, *next = NULL;

		list_for_each_entry(p, &lp_patches, node)
			if (p->enabled && p->enable_seq > seq &&
			    (!next || p->enable_seq < next->enable_seq))
				next = p;
		if (!next)
			return 0;
		seq = next->enable_seq;
		for (i = 0; i < next->nfuncs; i++) {
			struct lp_func *f = &next->funcs[i];

			if (f->live || strcmp(f->name.mod, mod->name))
				continue;
			ret = lp_hook_func(f, err, sizeof(err));
			if (!ret)
				ret = lp_rs_set_state(f->old_addr, LP_RS_ACTIVE, err, sizeof(err));
			if (ret) {
				pr_err("module %s refused: patch %s cannot apply to it: %s\n",
				       mod->name, next->name, err);
				return ret;
			}
			pr_info("patch %s: %s applied as module %s comes\n", next->name,
				f->old_name, mod->name);
		}
	}
}

static void lp_module_going(struct module *mod)
{
	struct lp_patch *p;
	u32 i;

	/* Newest first, so each pop takes the top of its stack. */
	for (;;) {
		struct lp_func *last = NULL;

		list_for_each_entry(p, &lp_patches, node)
			for (i = 0; i < p->nfuncs; i++)
				if (p->funcs[i].live && !strcmp(p->funcs[i].name.mod, mod->name) &&
				    (!last || p->enable_seq > last->patch->enable_seq))
					last = &p->funcs[i];
		if (!last)
			return;
		lp_unhook_func(last);
		pr_info("patch %s: %s waits again: module %s is going\n", last->patch->name,
			last->old_name, mod->name);
	}
}

static int lp_module_notify(struct notifier_block *nb, unsigned long action, void *data)
{
	struct module *mod = data;
	int ret = 0;

	mutex_lock(&lp_mutex);
	if (action == MODULE_STATE_COMING)
		ret = lp_module_coming(mod);
	else if (action == MODULE_STATE_GOING)
		lp_module_going(mod);
	mutex_unlock(&lp_mutex);
	return notifier_from_errno(ret);
}

static struct notifier_block lp_module_nb = {
	.notifier_call = lp_module_notify,
	.priority = INT_MIN, /* after ftrace has set up the module's text */
};

int lp_notifier_init(void)
{
	return register_module_notifier(&lp_module_nb);
}

void lp_notifier_exit(void)
{
	unregister_module_notifier(&lp_module_nb);
}
