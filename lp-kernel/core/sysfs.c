// SPDX-License-Identifier: GPL-2.0
/*
 * Status under /sys/kernel/lp/:
 *   <patch>/enabled    1 or 0; write 0 to revert (refused while another patch is stacked on
 *                      top, or while a task stays inside the code), 1 to apply again
 *   <patch>/id         lpcore's patch id
 *   <patch>/functions  one line per function:
 *                      "<old name> <old addr> -> <new symbol> <new addr> <state> depth=<n>"
 *                      state: active | overridden (a later patch is on top) | waiting (its
 *                      module is not loaded) | disabled
 */
#define pr_fmt(fmt) "lpcore: " fmt

#include <linux/kobject.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/sysfs.h>
#include "lp.h"

static struct kobject *lp_root;

#define to_patch(k) container_of(k, struct lp_patch, kobj)

static ssize_t enabled_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	return sysfs_emit(buf, "%d\n", to_patch(k)->enabled);
}

static ssize_t enabled_store(struct kobject *k, struct kobj_attribute *a, const char *buf,
			     size_t count)
{
	struct lp_patch *p = to_patch(k);
	bool on;
	int ret;

	ret = kstrtobool(buf, &on);
	if (ret)
		return ret;
	mutex_lock(&lp_mutex);
	ret = on ? lp_patch_enable(p) : lp_patch_disable(p);
	if (!ret)
		pr_info("patch %s: %s\n", p->name, on ? "enabled" : "disabled");
	mutex_unlock(&lp_mutex);
	return ret ? ret : count;
}

static ssize_t id_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	return sysfs_emit(buf, "%u\n", to_patch(k)->id);
}

static ssize_t functions_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	struct lp_patch *p = to_patch(k);
	int len = 0;
	u32 i;

	mutex_lock(&lp_mutex);
	for (i = 0; i < p->nfuncs; i++) {
		const struct lp_func *f = &p->funcs[i];
		char new_name[KSYM_SYMBOL_LEN];

		/* "%ps" appends " [module]": keep the bare name so fields stay space-separated. */
		snprintf(new_name, sizeof(new_name), "%ps", (void *)f->new_addr);
		new_name[strcspn(new_name, " ")] = '\0';
		len += sysfs_emit_at(buf, len, "%s %#lx -> %s %#lx %s depth=%u\n", f->old_name,
				     f->live ? f->old_addr : 0, new_name, f->new_addr,
				     lp_func_state(f), f->live ? lp_rs_depth(f->old_addr) : 0);
	}
	mutex_unlock(&lp_mutex);
	return len;
}

static struct kobj_attribute lp_attr_enabled = __ATTR_RW(enabled);
static struct kobj_attribute lp_attr_id = __ATTR_RO(id);
static struct kobj_attribute lp_attr_functions = __ATTR_RO(functions);

static struct attribute *lp_patch_attrs[] = {
	&lp_attr_enabled.attr,
	&lp_attr_id.attr,
	&lp_attr_functions.attr,
	NULL,
};
ATTRIBUTE_GROUPS(lp_patch);

static void lp_patch_release(struct kobject *k)
{
	kfree(to_patch(k));
}

static struct kobj_type lp_patch_ktype = {
	.release = lp_patch_release,
	.sysfs_ops = &kobj_sysfs_ops,
	.default_groups = lp_patch_groups,
};

int lp_sysfs_add_patch(struct lp_patch *p)
{
	int ret = kobject_init_and_add(&p->kobj, &lp_patch_ktype, lp_root, "%s", p->name);

	p->in_sysfs = true; /* initialised either way: kobject_put frees it */
	return ret;
}

void lp_sysfs_del_patch(struct lp_patch *p)
{
	if (p->in_sysfs)
		kobject_put(&p->kobj);
	else
		kfree(p);
}

int lp_sysfs_init(void)
{
	lp_root = kobject_create_and_add("lp", kernel_kobj);
	return lp_root ? 0 : -ENOMEM;
}

void lp_sysfs_exit(void)
{
	kobject_put(lp_root);
}
