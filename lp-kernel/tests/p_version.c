// SPDX-License-Identifier: GPL-2.0
/*
 * Scenario "static": the new /proc/version calls a static function of vmlinux
 * (cmdline_proc_show, fs/proc/cmdline.c) and reads a static variable (ngroups_max,
 * kernel/sysctl.c, named with its position: "name,N" is the N-th symbol of that name in
 * kallsyms order) — neither is exported.
 */
#include "livepatch.h"

static int (*static_cmdline_proc_show)(struct seq_file *m, void *v);
static const int *static_ngroups_max;

static int new_version_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "LPV2 ngroups=%d ", *static_ngroups_max);
	return static_cmdline_proc_show(m, v);
}

LP_PATCH_MODULE(LP_FUNCS(LP_PATCH(version_proc_show, new_version_proc_show)),
		LP_SYMBOLS(LP_SYMBOL(static_cmdline_proc_show, "cmdline_proc_show"),
			   LP_SYMBOL(static_ngroups_max, "ngroups_max,1")));
