// SPDX-License-Identifier: GPL-2.0
/*
 * Benchmark helper. /proc/lp_bench_now prints ktime_get_ns(). Reading /proc/lp_bench_calls
 * calls three identical functions LP_BENCH_CALLS times each, interleaved in chunks so that a
 * change of host load hits all three alike, and prints
 * "<calls> <ns lp_bench_plain> <ns lp_bench_target> <ns lp_bench_klp_target>":
 * bench.sh leaves the first alone, patches the second with lpcore and the third with the
 * kernel's livepatch.
 */
#include <linux/ktime.h>
#include <linux/module.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>

#define LP_BENCH_CALLS 200000
#define LP_BENCH_CHUNK 1000

noinline __attribute__((noipa)) int lp_bench_plain(int x)
{
	return x + 1;
}

noinline __attribute__((noipa)) int lp_bench_target(int x)
{
	return x + 1;
}

noinline __attribute__((noipa)) int lp_bench_klp_target(int x)
{
	return x + 1;
}

static u64 lp_bench_chunk(int (*fn)(int), int *acc)
{
	u64 t0 = ktime_get_ns();
	int i;

	for (i = 0; i < LP_BENCH_CHUNK; i++)
		*acc = fn(*acc);
	return ktime_get_ns() - t0;
}

static int now_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%llu\n", ktime_get_ns());
	return 0;
}

static int calls_show(struct seq_file *m, void *v)
{
	u64 plain = 0, lp = 0, klp = 0;
	int i, acc = 0;

	for (i = 0; i < LP_BENCH_CALLS / LP_BENCH_CHUNK; i++) {
		plain += lp_bench_chunk(lp_bench_plain, &acc);
		lp += lp_bench_chunk(lp_bench_target, &acc);
		klp += lp_bench_chunk(lp_bench_klp_target, &acc);
	}
	seq_printf(m, "%d %llu %llu %llu %d\n", LP_BENCH_CALLS, plain, lp, klp, acc);
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
