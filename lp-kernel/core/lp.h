/* SPDX-License-Identifier: GPL-2.0 */
/* lpcore internals shared by the C files of the shim. */
#ifndef LP_INTERNAL_H
#define LP_INTERNAL_H

#include <linux/kobject.h>
#include <linux/list.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/kallsyms.h>
#include "livepatch.h"
#include "lp_rust.h"

#define LP_ERR_LEN 256

/* main.c: module parameters */
extern unsigned int lp_switch_timeout_ms;
extern unsigned int lp_switch_retry_ms;

/* One serialisation point for every change (register, enable, disable, module events). */
extern struct mutex lp_mutex;

/* ksym.c: kallsyms, including what 6.1 does not export. */
struct lp_name {
	char mod[MODULE_NAME_LEN]; /* "" = anywhere (vmlinux or any module) */
	char sym[KSYM_NAME_LEN];
	unsigned long pos;         /* 0 = must be unique; N = N-th occurrence */
};
int lp_ksym_init(void);
int lp_parse_name(const char *s, struct lp_name *n, char *err, size_t len);
/*
 * 0 and *addr, or -ENOENT / -EINVAL (ambiguous) / -ENXIO (module not loaded), with `err`.
 * With `pin`, a symbol of a module takes a reference on it (*pin; NULL for vmlinux).
 */
int lp_resolve(const struct lp_name *n, struct module *exclude, unsigned long *addr,
	       struct module **pin, char *err, size_t len);
bool lp_module_loaded(const char *name);
unsigned long lp_symbol_size(unsigned long addr);
bool lp_is_ftrace_site(unsigned long addr);
extern unsigned int (*lp_stack_trace_save_tsk)(struct task_struct *task, unsigned long *store,
					       unsigned int size, unsigned int skipnr);
extern struct task_struct *(*lp_idle_task)(int cpu);
extern int (*lp_stack_trace_save_tsk_reliable)(struct task_struct *tsk, unsigned long *store,
					       unsigned int size);

/* site.c: one ftrace_ops per patched function entry; its handler asks lp-core. */
/* `owner`: the patch module adding/removing a version (its calls to addr are not redirected). */
int lp_site_get(unsigned long addr, struct module *owner, char *err, size_t len);
void lp_site_put(unsigned long addr, struct module *owner);

/* switch.c: the synchronization point. */
struct lp_switch {
	const struct lp_range *ranges;
	size_t nranges;
	/* Runs inside stop_machine once no task is inside a range; must not sleep. */
	int (*commit)(void *data);
	void *data;
	/* Out: who was in the way at the last attempt (unreliable: its stack could not be walked
	 * to the end, which counts as busy, as in upstream livepatch).
	 */
	bool unreliable;
	pid_t busy_pid;
	char busy_comm[TASK_COMM_LEN];
	size_t busy_range;
	u64 busy_addr;
	unsigned int attempts;
	u64 stop_ns;            /* how long the last stop_machine held every CPU */
};
int lp_switch_run(struct lp_switch *sw);

/* patch.c */
struct lp_patch;
struct lp_func {
	struct lp_patch *patch;
	const char *old_name;  /* as the patch module wrote it */
	struct lp_name name;
	unsigned long old_addr; /* 0 while waiting for its module */
	unsigned long old_size;
	unsigned long new_addr;
	unsigned long new_size;
	bool live;              /* has a version in lp-core's table */
};
struct lp_patch {
	struct list_head node;
	struct kobject kobj;
	const struct lp_patch_desc *desc;
	struct module *owner;
	char name[MODULE_NAME_LEN];
	u32 id;
	u64 enable_seq;         /* order of enabling: the stacking order */
	bool enabled;
	bool in_sysfs;          /* kobj added: freed by its release */
	struct module **pins;   /* modules LP_SYMBOLs point into, held while registered */
	u32 npins;
	u32 nfuncs;
	struct lp_func funcs[];
};
extern struct list_head lp_patches;
int lp_patch_enable(struct lp_patch *p);
/* Resolve, push a pending version, hook the entry (-ENXIO: its module is not loaded). */
int lp_hook_func(struct lp_func *f, char *err, size_t len);
/* Take f's version out of the table and unhook the entry. */
void lp_unhook_func(struct lp_func *f);
int lp_patch_disable(struct lp_patch *p);
const char *lp_func_state(const struct lp_func *f);

/* notifier.c */
int lp_notifier_init(void);
void lp_notifier_exit(void);

/* sysfs.c */
int lp_sysfs_init(void);
void lp_sysfs_exit(void);
int lp_sysfs_add_patch(struct lp_patch *p);
void lp_sysfs_del_patch(struct lp_patch *p);

#endif
