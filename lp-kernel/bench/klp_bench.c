// SPDX-License-Identifier: GPL-2.0
/*
 * The same replacement as p_bench.c, on the twin function lp_bench_klp_target, applied with the
 * kernel's own livepatch (CONFIG_LIVEPATCH, kernel/livepatch/): the reference point for
 * lpcore's figures in bench.sh.
 */
#include <linux/livepatch.h>
#include <linux/module.h>

static int klp_new_lp_bench_target(int x)
{
	return x + 1;
}

static struct klp_func funcs[] = {
	{ .old_name = "lp_bench_klp_target", .new_func = klp_new_lp_bench_target },
	{}
};

static struct klp_object objs[] = {
	{ .name = "lp_bench", .funcs = funcs },
	{}
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
};

static int __init klp_bench_init(void)
{
	return klp_enable_patch(&patch);
}

static void __exit klp_bench_exit(void)
{
}

module_init(klp_bench_init);
module_exit(klp_bench_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
