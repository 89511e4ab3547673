// SPDX-License-Identifier: GPL-2.0
/* A module loaded after the patch for it: /proc/lp_late shows "late=<lp_late_value()>". */
#include <linux/module.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>

noinline __attribute__((noipa)) int lp_late_value(void)
{
	return 10;
}

static int lp_late_show(struct seq_file *m, void *v)
{
	seq_printf(m, "late=%d\n", lp_late_value());
	return 0;
}

static int __init lp_late_init(void)
{
	/* Called once here too: the patch is already live when init runs. */
	pr_info("lp_late: init sees %d\n", lp_late_value());
	return proc_create_single("lp_late", 0444, NULL, lp_late_show) ? 0 : -ENOMEM;
}

static void __exit lp_late_exit(void)
{
	remove_proc_entry("lp_late", NULL);
}

module_init(lp_late_init);
module_exit(lp_late_exit);
MODULE_LICENSE("GPL");
