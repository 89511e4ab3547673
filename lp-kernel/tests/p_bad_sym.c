// SPDX-License-Identifier: GPL-2.0
/* Mismatched: the second function does not exist in this kernel. Refused as a whole: the first
 * (cmdline_proc_show) must not be patched either. */
#include "livepatch.h"

static int new_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_puts(m, "must never show\n");
	return 0;
}

static int new_missing(void)
{
	return 0;
}

LP_PATCH_MODULE(LP_FUNCS(LP_PATCH(cmdline_proc_show, new_cmdline_proc_show),
			 LP_PATCH_NAMED("lp_no_such_function_in_this_kernel", new_missing)),
		LP_NO_SYMBOLS);
