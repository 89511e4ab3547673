// SPDX-License-Identifier: GPL-2.0
/*
 * Example kernel live patch: /proc/cmdline stops showing secrets.
 *
 * The running kernel prints its whole command line to any user who reads /proc/cmdline,
 * including values such as "db_password=..." passed to an init script. This patch replaces
 * cmdline_proc_show (a static function of fs/proc/cmdline.c) with a version that prints
 * "<key>=***" for every parameter whose key contains "secret" or "password".
 *
 * It reads saved_command_line, which modules cannot link against, through LP_SYMBOL.
 */
#include "livepatch.h"
#include <linux/string.h>

static char **lp_saved_command_line;

static bool is_secret(const char *key, size_t len)
{
	return strnstr(key, "secret", len) || strnstr(key, "password", len);
}

static int redacted_cmdline_proc_show(struct seq_file *m, void *v)
{
	const char *p = *lp_saved_command_line;

	while (*p) {
		size_t word = strcspn(p, " ");
		const char *eq = memchr(p, '=', word);

		if (eq && is_secret(p, eq - p))
			seq_printf(m, "%.*s=***", (int)(eq - p), p);
		else
			seq_printf(m, "%.*s", (int)word, p);
		p += word;
		if (*p == ' ')
			seq_putc(m, *p++);
	}
	seq_putc(m, '\n');
	return 0;
}

LP_PATCH_MODULE(LP_FUNCS(LP_PATCH(cmdline_proc_show, redacted_cmdline_proc_show)),
		LP_SYMBOLS(LP_SYMBOL(lp_saved_command_line, "saved_command_line")));
