// SPDX-License-Identifier: GPL-2.0
/* Malformed: a symbol name that several static functions share, without ",N". */
#include "livepatch.h"

static void *dup;

static int new_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "must never show %p\n", dup);
	return 0;
}

LP_PATCH_MODULE(LP_FUNCS(LP_PATCH(cmdline_proc_show, new_cmdline_proc_show)),
		LP_SYMBOLS(LP_SYMBOL(dup, "_compound_head")));
