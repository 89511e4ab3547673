// SPDX-License-Identifier: GPL-2.0
/*
 * lpcore: live-patch the running kernel. Module init/exit and the services the Rust half
 * (lp-core) needs from the kernel: an allocator and a panic path.
 */
#define pr_fmt(fmt) "lpcore: " fmt

#include <linux/init.h>
#include <linux/module.h>
#include <linux/slab.h>
#include "lp.h"

unsigned int lp_switch_timeout_ms = 3000;
module_param_named(switch_timeout_ms, lp_switch_timeout_ms, uint, 0644);
MODULE_PARM_DESC(switch_timeout_ms, "give up a switch after this long while a task is inside a function being replaced");
unsigned int lp_switch_retry_ms = 20;
module_param_named(switch_retry_ms, lp_switch_retry_ms, uint, 0644);
MODULE_PARM_DESC(switch_retry_ms, "pause between two attempts at the synchronization point");

DEFINE_MUTEX(lp_mutex);

void lp_c_rust_panic(const char *msg, size_t len)
{
	panic("lpcore: Rust panic: %.*s\n", (int)len, msg);
}

/* kmalloc aligns to the size's power of two (up to PAGE_SIZE): round the size up to `align`. */
void *lp_c_alloc(size_t size, size_t align)
{
	if (align > PAGE_SIZE)
		return NULL;
	return kmalloc(max(size, align), GFP_ATOMIC);
}

void lp_c_free(void *ptr)
{
	kfree(ptr);
}

static int __init lp_init(void)
{
	int err;

	if (lp_rs_abi_version() != LP_RS_ABI_VERSION) {
		pr_err("Rust half speaks ABI %u, C shim %u: rebuild lpcore\n", lp_rs_abi_version(),
		       LP_RS_ABI_VERSION);
		return -EINVAL;
	}
	err = lp_ksym_init();
	if (err)
		return err;
	err = lp_rs_init();
	if (err) {
		pr_err("cannot set up the redirect table (%d)\n", err);
		return err;
	}
	err = lp_sysfs_init();
	if (err)
		return err;
	err = lp_notifier_init();
	if (err) {
		lp_sysfs_exit();
		return err;
	}
	pr_info("ready (patch ABI %u, switch timeout %u ms)\n", LP_ABI_VERSION, lp_switch_timeout_ms);
	return 0;
}

/* Every patch module holds a reference on lpcore (symbol_get): none is left at exit. */
static void __exit lp_exit(void)
{
	lp_notifier_exit();
	lp_sysfs_exit();
	pr_info("unloaded\n");
}

module_init(lp_init);
module_exit(lp_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("livepatch core: redirect table (lp-core), synchronization point, patch registry");
