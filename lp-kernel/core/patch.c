// SPDX-License-Identifier: GPL-2.0
/*
 * Patches: registration by patch modules, enabling (resolve → push pending versions into
 * lp-core's table → hook the entries → synchronization point → active) and disabling (only the
 * top of every stack → synchronization point → versions out of the table). A refusal at any
 * step leaves the table, the hooks and the running code exactly as they were.
 */
#define pr_fmt(fmt) "lpcore: " fmt

#include <linux/slab.h>
#include <linux/string.h>
#include <linux/ktime.h>
#include <linux/math64.h>
#include "lp.h"

#define LP_MAX_FUNCS 64
#define LP_MAX_SYMS 256

LIST_HEAD(lp_patches);
static u32 lp_next_id = 1;
static u64 lp_next_seq = 1;

static struct lp_func *lp_live_func(u32 patch_id, unsigned long addr)
{
	struct lp_patch *p;
	u32 i;

	list_for_each_entry(p, &lp_patches, node) {
		if (p->id != patch_id)
			continue;
		for (i = 0; i < p->nfuncs; i++)
			if (p->funcs[i].live && p->funcs[i].old_addr == addr)
				return &p->funcs[i];
	}
	return NULL;
}

const char *lp_func_state(const struct lp_func *f)
{
	if (!f->patch->enabled)
		return "disabled";
	if (!f->live)
		return "waiting"; /* for its module to be loaded */
	return lp_rs_top_patch(f->old_addr) == f->patch->id ? "active" : "overridden";
}

/* The code a call to `f` runs right now, other than `f`'s own version: what must be idle. */
static struct lp_range lp_current_code(const struct lp_func *f)
{
	struct lp_range r = { f->old_addr, f->old_addr + f->old_size };
	struct lp_patch *p;
	const struct lp_func *best = NULL;
	u64 best_seq = 0;
	u32 i;

	list_for_each_entry(p, &lp_patches, node) {
		if (p == f->patch || !p->enabled || p->enable_seq < best_seq)
			continue;
		for (i = 0; i < p->nfuncs; i++) {
			if (p->funcs[i].live && p->funcs[i].old_addr == f->old_addr) {
				best = &p->funcs[i];
				best_seq = p->enable_seq;
			}
		}
	}
	if (best) {
		r.start = best->new_addr;
		r.end = best->new_addr + best->new_size;
	}
	return r;
}

void lp_unhook_func(struct lp_func *f)
{
	char msg[LP_ERR_LEN];

	if (!f->live)
		return;
	if (lp_rs_top_patch(f->old_addr) == f->patch->id &&
	    lp_rs_pop(f->old_addr, f->patch->id, msg, sizeof(msg)))
		pr_err("patch %s: cannot take %s out of the table: %s\n", f->patch->name,
		       f->old_name, msg);
	lp_site_put(f->old_addr, f->patch->owner);
	f->live = false;
}

/* Resolve `f` and put a pending version of it in the table, hooked. -ENXIO: module absent. */
int lp_hook_func(struct lp_func *f, char *err, size_t len)
{
	unsigned long addr;
	int ret;

	ret = lp_resolve(&f->name, f->patch->owner, &addr, NULL, err, len);
	if (ret)
		return ret;
	f->old_size = lp_symbol_size(addr);
	if (!f->old_size) {
		snprintf(err, len, "%s is not the start of a function", f->old_name);
		return -EINVAL;
	}
	if (!lp_is_ftrace_site(addr)) {
		snprintf(err, len, "%s (%pS) cannot be patched: it has no ftrace entry (notrace, inlined or not a function)",
			 f->old_name, (void *)addr);
		return -EINVAL;
	}
	f->old_addr = addr;
	ret = lp_rs_push(addr, f->new_addr, f->patch->id, err, len);
	if (ret)
		return ret;
	ret = lp_site_get(addr, f->patch->owner, err, len);
	if (ret) {
		char msg[LP_ERR_LEN];

		if (lp_rs_pop(addr, f->patch->id, msg, sizeof(msg)))
			pr_err("patch %s: cannot undo %s: %s\n", f->patch->name, f->old_name, msg);
		return ret;
	}
	f->live = true;
	return 0;
}

struct lp_commit {
	struct lp_patch *p;
	int ret;
	char msg[LP_ERR_LEN];
};

/* Inside stop_machine: the pending versions become the ones calls go to. */
static int lp_commit_apply(void *data)
{
	struct lp_commit *c = data;
	u32 i;

	for (i = 0; i < c->p->nfuncs; i++) {
		struct lp_func *f = &c->p->funcs[i];

		if (f->live && lp_rs_top_patch(f->old_addr) == c->p->id) {
			c->ret = lp_rs_set_state(f->old_addr, LP_RS_ACTIVE, c->msg, sizeof(c->msg));
			if (c->ret)
				return c->ret;
		}
	}
	return 0;
}

/* Inside stop_machine: the patch's versions leave the table; calls go to the code below. */
static int lp_commit_revert(void *data)
{
	struct lp_commit *c = data;
	u32 i;

	for (i = 0; i < c->p->nfuncs; i++) {
		struct lp_func *f = &c->p->funcs[i];

		if (!f->live)
			continue;
		c->ret = lp_rs_pop(f->old_addr, c->p->id, c->msg, sizeof(c->msg));
		if (c->ret)
			return c->ret;
	}
	return 0;
}

static int lp_switch_patch(struct lp_patch *p, bool apply, char *err, size_t len)
{
	struct lp_switch sw = {};
	struct lp_commit c = { .p = p };
	struct lp_range *ranges;
	size_t n = 0;
	u32 i;
	int ret;

	ranges = kcalloc(p->nfuncs, sizeof(*ranges), GFP_KERNEL);
	if (!ranges)
		return -ENOMEM;
	for (i = 0; i < p->nfuncs; i++) {
		struct lp_func *f = &p->funcs[i];

		if (!f->live)
			continue;
		if (apply) {
			ranges[n++] = lp_current_code(f);
		} else {
			ranges[n].start = f->new_addr;
			ranges[n++].end = f->new_addr + f->new_size;
		}
	}
	if (!n) {
		kfree(ranges);
		return 0; /* everything waits for its module: nothing runs it yet */
	}
	sw.ranges = ranges;
	sw.nranges = n;
	sw.commit = apply ? lp_commit_apply : lp_commit_revert;
	sw.data = &c;
	ret = lp_switch_run(&sw);
	if (ret == -EBUSY && sw.unreliable)
		snprintf(err, len, "the stack of task %d (%s) could not be walked reliably for %u ms (%u attempts); the old code stays",
			 sw.busy_pid, sw.busy_comm, lp_switch_timeout_ms, sw.attempts);
	else if (ret == -EBUSY)
		snprintf(err, len, "task %d (%s) stayed inside %ps (at %pS) for %u ms (%u attempts); the old code stays",
			 sw.busy_pid, sw.busy_comm, (void *)(unsigned long)ranges[sw.busy_range].start,
			 (void *)(unsigned long)sw.busy_addr, lp_switch_timeout_ms, sw.attempts);
	else if (ret)
		snprintf(err, len, "switch failed: %s", c.msg[0] ? c.msg : "stop_machine error");
	else
		pr_info("patch %s: %s after %u attempt(s) at the synchronization point (stop_machine %llu us)\n",
			p->name, apply ? "switched" : "reverted", sw.attempts,
			div_u64(sw.stop_ns, NSEC_PER_USEC));
	kfree(ranges);
	return ret;
}

int lp_patch_enable(struct lp_patch *p)
{
	char err[LP_ERR_LEN] = "";
	u32 i;
	int ret = 0;

	lockdep_assert_held(&lp_mutex);
	if (p->enabled)
		return 0;
	if (!try_module_get(p->owner)) {
		pr_err("patch %s refused: its module is going away\n", p->name);
		return -ENODEV;
	}
	for (i = 0; i < p->nfuncs; i++) {
		struct lp_func *f = &p->funcs[i];

		ret = lp_hook_func(f, err, sizeof(err));
		if (ret == -ENXIO && f->name.mod[0]) {
			pr_info("patch %s: %s waits for module %s\n", p->name, f->old_name,
				f->name.mod);
			ret = 0;
			continue;
		}
		if (ret)
			goto undo;
	}
	ret = lp_switch_patch(p, true, err, sizeof(err));
	if (ret)
		goto undo;
	p->enabled = true;
	p->enable_seq = lp_next_seq++;
	return 0;
undo:
	for (i = 0; i < p->nfuncs; i++)
		lp_unhook_func(&p->funcs[i]);
	module_put(p->owner);
	pr_err("patch %s refused: %s\n", p->name, err);
	return ret;
}

int lp_patch_disable(struct lp_patch *p)
{
	char err[LP_ERR_LEN] = "";
	u32 i, top;
	int ret;

	lockdep_assert_held(&lp_mutex);
	if (!p->enabled)
		return 0;
	for (i = 0; i < p->nfuncs; i++) {
		struct lp_func *f = &p->funcs[i];
		struct lp_func *above;

		if (!f->live)
			continue;
		top = lp_rs_top_patch(f->old_addr);
		if (top != p->id) {
			above = lp_live_func(top, f->old_addr);
			pr_err("patch %s: disable refused: patch %s is stacked on top of it at %s; disable %s first\n",
			       p->name, above ? above->patch->name : "?", f->old_name,
			       above ? above->patch->name : "that patch");
			return -EBUSY;
		}
	}
	ret = lp_switch_patch(p, false, err, sizeof(err));
	if (ret) {
		pr_err("patch %s: disable refused: %s\n", p->name, err);
		return ret;
	}
	for (i = 0; i < p->nfuncs; i++) {
		struct lp_func *f = &p->funcs[i];

		if (f->live) {
			lp_site_put(f->old_addr, p->owner);
			f->live = false;
		}
	}
	p->enabled = false;
	module_put(p->owner);
	return 0;
}

static int lp_check_desc(const struct lp_patch_desc *d, char *err, size_t len)
{
	u32 i, j;

	if (d->magic != LP_ABI_MAGIC) {
		snprintf(err, len, "bad descriptor magic %#x (not built with livepatch.h)", d->magic);
		return -EINVAL;
	}
	if (d->abi_version != LP_ABI_VERSION) {
		snprintf(err, len, "built for patch ABI %u, lpcore speaks %u: rebuild the patch",
			 d->abi_version, LP_ABI_VERSION);
		return -EINVAL;
	}
	if (!d->owner || !d->funcs || !d->nfuncs || d->nfuncs > LP_MAX_FUNCS ||
	    d->nsyms > LP_MAX_SYMS || (d->nsyms && !d->syms)) {
		snprintf(err, len, "descriptor lists %u functions and %u symbols (want 1..%d and 0..%d)",
			 d->nfuncs, d->nsyms, LP_MAX_FUNCS, LP_MAX_SYMS);
		return -EINVAL;
	}
	for (i = 0; i < d->nfuncs; i++) {
		if (!d->funcs[i].old_name || !d->funcs[i].new_fn) {
			snprintf(err, len, "function %u has no name or no new code", i);
			return -EINVAL;
		}
		if (!within_module_core((unsigned long)d->funcs[i].new_fn, d->owner)) {
			snprintf(err, len, "new code for %s is not in the patch module's text",
				 d->funcs[i].old_name);
			return -EINVAL;
		}
		for (j = 0; j < i; j++) {
			if (!strcmp(d->funcs[i].old_name, d->funcs[j].old_name)) {
				snprintf(err, len, "%s is replaced twice in one patch",
					 d->funcs[i].old_name);
				return -EINVAL;
			}
		}
	}
	for (i = 0; i < d->nsyms; i++) {
		if (!d->syms[i].name || !d->syms[i].slot) {
			snprintf(err, len, "symbol %u has no name or no slot", i);
			return -EINVAL;
		}
	}
	return 0;
}

static void lp_release_pins(struct lp_patch *p)
{
	while (p->npins)
		module_put(p->pins[--p->npins]);
	kfree(p->pins);
	p->pins = NULL;
}

/*
 * Resolve the LP_SYMBOLs. A symbol inside a module pins that module while the patch is
 * registered: the new code holds a pointer into it.
 */
static int lp_fill_symbols(struct lp_patch *p, char *err, size_t len)
{
	const struct lp_patch_desc *d = p->desc;
	unsigned long *addrs;
	struct module *pin;
	struct lp_name n;
	u32 i;
	int ret = 0;

	addrs = kcalloc(d->nsyms ?: 1, sizeof(*addrs), GFP_KERNEL);
	p->pins = kcalloc(d->nsyms ?: 1, sizeof(*p->pins), GFP_KERNEL);
	if (!addrs || !p->pins) {
		kfree(addrs);
		kfree(p->pins);
		p->pins = NULL;
		return -ENOMEM;
	}
	for (i = 0; i < d->nsyms && !ret; i++) {
		pin = NULL;
		ret = lp_parse_name(d->syms[i].name, &n, err, len);
		if (!ret)
			ret = lp_resolve(&n, d->owner, &addrs[i], &pin, err, len);
		if (pin)
			p->pins[p->npins++] = pin;
	}
	/* All or nothing: the slots are written only once every name resolved. */
	for (i = 0; i < d->nsyms && !ret; i++)
		*d->syms[i].slot = (void *)addrs[i];
	kfree(addrs);
	if (ret)
		lp_release_pins(p);
	return ret;
}

int lp_register_patch(const struct lp_patch_desc *d)
{
	char err[LP_ERR_LEN] = "";
	const char *name = d && d->name ? d->name : "?";
	u64 t0 = ktime_get_ns();
	struct lp_patch *p, *q;
	u32 i;
	int ret;

	if (!d) {
		pr_err("patch refused: no descriptor\n");
		return -EINVAL;
	}
	ret = lp_check_desc(d, err, sizeof(err));
	if (ret)
		goto refuse;
	p = kzalloc(struct_size(p, funcs, d->nfuncs), GFP_KERNEL);
	if (!p)
		return -ENOMEM;
	p->desc = d;
	p->owner = d->owner;
	strscpy(p->name, d->owner->name, sizeof(p->name));
	p->nfuncs = d->nfuncs;
	for (i = 0; i < d->nfuncs; i++) {
		struct lp_func *f = &p->funcs[i];

		f->patch = p;
		f->old_name = d->funcs[i].old_name;
		f->new_addr = (unsigned long)d->funcs[i].new_fn;
		f->new_size = lp_symbol_size(f->new_addr);
		ret = lp_parse_name(f->old_name, &f->name, err, sizeof(err));
		if (ret)
			goto free;
		if (!f->new_size) {
			snprintf(err, sizeof(err), "new code for %s is not a function start",
				 f->old_name);
			ret = -EINVAL;
			goto free;
		}
	}

	mutex_lock(&lp_mutex);
	list_for_each_entry(q, &lp_patches, node) {
		if (!strcmp(q->name, p->name)) {
			snprintf(err, sizeof(err), "a patch named %s is already registered", p->name);
			ret = -EEXIST;
			goto unlock;
		}
	}
	ret = lp_fill_symbols(p, err, sizeof(err));
	if (ret)
		goto unlock;
	p->id = lp_next_id++;
	list_add_tail(&p->node, &lp_patches);
	ret = lp_patch_enable(p); /* logs its own refusal */
	if (ret) {
		lp_release_pins(p);
		list_del(&p->node);
		mutex_unlock(&lp_mutex);
		kfree(p);
		return ret;
	}
	mutex_unlock(&lp_mutex);
	ret = lp_sysfs_add_patch(p);
	if (ret)
		pr_warn("patch %s: no sysfs entry (%d); the patch is live\n", p->name, ret);
	pr_info("patch %s (id %u): live, %u function(s), registered in %llu us\n", p->name, p->id,
		p->nfuncs, div_u64(ktime_get_ns() - t0, NSEC_PER_USEC));
	return 0;
unlock:
	mutex_unlock(&lp_mutex);
free:
	kfree(p);
refuse:
	pr_err("patch %s refused: %s\n", name, err);
	return ret;
}
EXPORT_SYMBOL_GPL(lp_register_patch);

/* From the patch module's exit: it is disabled (lpcore pins enabled patches). */
void lp_unregister_patch(const struct lp_patch_desc *d)
{
	struct lp_patch *p, *found = NULL;

	mutex_lock(&lp_mutex);
	list_for_each_entry(p, &lp_patches, node) {
		if (p->desc == d) {
			found = p;
			break;
		}
	}
	if (found) {
		if (WARN_ON(found->enabled))
			lp_patch_disable(found);
		list_del(&found->node);
		lp_release_pins(found);
	}
	mutex_unlock(&lp_mutex);
	if (found) {
		pr_info("patch %s: unregistered\n", found->name);
		lp_sysfs_del_patch(found); /* frees it */
	}
}
EXPORT_SYMBOL_GPL(lp_unregister_patch);
