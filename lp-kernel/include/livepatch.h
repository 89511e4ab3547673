/* SPDX-License-Identifier: GPL-2.0 */
/*
 * livepatch.h — write a kernel patch module for the livepatch core module (lpcore.ko).
 *
 * A patch module holds new versions of kernel functions. On insmod it registers them with
 * lpcore, which resolves the old functions by name, waits for a moment when no task is running
 * or sleeping inside them, and from then on sends every call to the new versions. The patch
 * stays pinned (rmmod says "in use") until it is disabled:
 *
 *     echo 0 > /sys/kernel/lp/<patch>/enabled     # revert (refused while a later patch is stacked)
 *     rmmod <patch>
 *
 * Example (one .c file, built with the kbuild template or `livepatch kernel pack`):
 *
 *     #include "livepatch.h"
 *
 *     static int (*orig_helper)(int);          // a static function of vmlinux
 *     static const int *some_static_var;       // a static variable of vmlinux
 *
 *     static int new_cmdline_proc_show(struct seq_file *m, void *v)
 *     {
 *             seq_printf(m, "patched %d\n", *some_static_var);
 *             return 0;
 *     }
 *
 *     LP_PATCH_MODULE(
 *             LP_FUNCS(LP_PATCH(cmdline_proc_show, new_cmdline_proc_show)),
 *             LP_SYMBOLS(LP_SYMBOL(orig_helper, "helper"),
 *                        LP_SYMBOL(some_static_var, "some_static_var")));
 *
 * Names: "sym" (vmlinux or any loaded module; must be unique), "sym,N" (the N-th symbol of
 * that name in kallsyms order, for duplicate static names), "mod:sym" / "mod:sym,N" (a symbol
 * of module `mod`; for LP_PATCH the module may be loaded later: the patch applies when it
 * comes).
 */
#ifndef LIVEPATCH_LP_H
#define LIVEPATCH_LP_H

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/seq_file.h>

/* The ABI between patch modules and lpcore. Bump LP_ABI_VERSION on any layout change. */
#define LP_ABI_MAGIC 0x4c50504dU /* "LPPM" */
#define LP_ABI_VERSION 1U

/* One function to replace: calls to `old_name` go to `new_fn`. */
struct lp_func_desc {
	const char *old_name;
	void *new_fn;
};

/* One symbol the new code uses that is not exported: `*slot` receives its address. */
struct lp_sym_desc {
	const char *name;
	void **slot;
};

/* What a patch module hands to lpcore. */
struct lp_patch_desc {
	u32 magic;
	u32 abi_version;
	const char *name;
	struct module *owner;
	const struct lp_func_desc *funcs;
	u32 nfuncs;
	const struct lp_sym_desc *syms;
	u32 nsyms;
};

/* Exported by lpcore (EXPORT_SYMBOL_GPL); patch modules reach them through symbol_get so they
 * need neither lpcore's Module.symvers at build time nor a load-order dependency in modules.dep.
 */
int lp_register_patch(const struct lp_patch_desc *desc);
void lp_unregister_patch(const struct lp_patch_desc *desc);

/* Replace function `old` (a C identifier naming the old function) with `new_fn`. */
#define LP_PATCH(old_, new_) { .old_name = #old_, .new_fn = (void *)(new_) }
/* Replace a function named by a string: "mod:sym", "sym,2", "mod:sym,2". */
#define LP_PATCH_NAMED(name_, new_) { .old_name = (name_), .new_fn = (void *)(new_) }
/* Fill pointer variable `var` with the address of symbol `name` at registration. */
#define LP_SYMBOL(var_, name_) { .name = (name_), .slot = (void **)&(var_) }

#define LP_FUNCS(...) __VA_ARGS__
#define LP_SYMBOLS(...) __VA_ARGS__
#define LP_NO_SYMBOLS

/*
 * LP_PATCH_MODULE(LP_FUNCS(...), LP_SYMBOLS(...)) — defines the module's init and exit, the
 * license (GPL: lpcore's interface is GPL-only) and the descriptor. Use once per module.
 */
#define LP_PATCH_MODULE(funcs_, ...)                                                          \
	static const struct lp_func_desc __lp_funcs[] = { funcs_ };                           \
	static const struct lp_sym_desc __lp_syms[] = { __VA_ARGS__ };                       \
	static const struct lp_patch_desc __lp_desc = {                                      \
		.magic = LP_ABI_MAGIC,                                                       \
		.abi_version = LP_ABI_VERSION,                                               \
		.name = KBUILD_MODNAME,                                                      \
		.owner = THIS_MODULE,                                                        \
		.funcs = __lp_funcs,                                                         \
		.nfuncs = ARRAY_SIZE(__lp_funcs),                                            \
		.syms = __lp_syms,                                                           \
		.nsyms = ARRAY_SIZE(__lp_syms),                                              \
	};                                                                                   \
	LP_PATCH_MODULE_FROM_DESC(__lp_desc)

/* Init/exit around a descriptor written by hand (tests use it to build malformed ones). */
#define LP_PATCH_MODULE_FROM_DESC(desc_)                                                      \
	static int (*__lp_register)(const struct lp_patch_desc *);                           \
	static int __init __lp_init(void)                                                    \
	{                                                                                    \
		int err;                                                                     \
		__lp_register = symbol_get(lp_register_patch);                               \
		if (!__lp_register) {                                                        \
			pr_err("%s: lpcore is not loaded (insmod lpcore.ko first)\n",        \
			       KBUILD_MODNAME);                                              \
			return -ENOENT;                                                      \
		}                                                                            \
		err = __lp_register(&(desc_));                                                \
		if (err)                                                                     \
			symbol_put(lp_register_patch);                                       \
		return err;                                                                  \
	}                                                                                    \
	static void __exit __lp_exit(void)                                                   \
	{                                                                                    \
		void (*unreg)(const struct lp_patch_desc *) = symbol_get(lp_unregister_patch); \
		if (unreg) {                                                                 \
			unreg(&(desc_));                                                      \
			symbol_put(lp_unregister_patch);                                     \
		}                                                                            \
		symbol_put(lp_register_patch);                                               \
	}                                                                                    \
	module_init(__lp_init);                                                              \
	module_exit(__lp_exit);                                                              \
	MODULE_LICENSE("GPL");                                                               \
	MODULE_INFO(livepatch_lp, "Y")

#endif /* LIVEPATCH_LP_H */
