// SPDX-License-Identifier: GPL-2.0
/* Malformed: a descriptor from a future ABI. Must be refused, nothing changed. */
#include "livepatch.h"

static int new_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_puts(m, "must never show\n");
	return 0;
}

static const struct lp_func_desc funcs[] = { LP_PATCH(cmdline_proc_show, new_cmdline_proc_show) };
static const struct lp_patch_desc desc = {
	.magic = LP_ABI_MAGIC,
	.abi_version = 99,
	.name = KBUILD_MODNAME,
	.owner = THIS_MODULE,
	.funcs = funcs,
	.nfuncs = 1,
};
LP_PATCH_MODULE_FROM_DESC(desc);
