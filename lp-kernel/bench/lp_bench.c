// SPDX-License-Identifier: GPL-2.0
/*
 * Benchmark helper. /proc/lp_bench_now prints ktime_get_ns(); reading /proc/lp_bench_calls
 * calls lp_bench_target() LP_BENCH_CALLS times and prints "<calls> <total ns>".
 */
#include <linux/ktime.h>
#include <linux/module.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>

#define LP_BENCH_CALLS 200000

noinline __attribute__((noipa)) int lp_bench_target(int x)
{
	return x + 1;
}

static int now_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%llu\n", ktime_get_ns());
	return 0;
}

static int calls_show(struct seq_file *m, void *v)
{
	u64 t0, t1;
	int i, acc = 0;

	t0 = ktime_get_ns();
	for (i = 0; i < LP_BENCH_CALLS; i++)
		acc = lp_bench_target(acc);
	t1 = ktime_get_ns();
	seq_printf(m, "%d %llu %d\n", LP_BENCH_CALLS, t1 - t0, acc);
	return 0;
}

static int __init lp_bench_init(void)
{
	if (!proc_create_single("lp_bench_now", 0444, NULL, now_show))
		return -ENOMEM;
	if (!proc_create_single("lp_bench_calls", 0444, NULL, calls_show)) {
		remove_proc_entry("lp_bench_now", NULL);
		return -ENOMEM;
	}
	return 0;
}

static void __exit lp_bench_exit(void)
{
	remove_proc_entry("lp_bench_calls", NULL);
	remove_proc_entry("lp_bench_now", NULL);
}

module_init(lp_bench_init);
module_exit(lp_bench_exit);
MODULE_LICENSE("GPL");
