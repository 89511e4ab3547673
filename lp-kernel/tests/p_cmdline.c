// SPDX-License-Identifier: GPL-2.0
/* Scenario "proc": what /proc/cmdline prints comes from the patch. */
#include "livepatch.h"

static int new_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_puts(m, "LPTEST cmdline patched\n");
	return 0;
}

LP_PATCH_MODULE(LP_FUNCS(LP_PATCH(cmdline_proc_show, new_cmdline_proc_show)), LP_NO_SYMBOLS);
