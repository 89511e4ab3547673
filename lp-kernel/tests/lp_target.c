// SPDX-License-Identifier: GPL-2.0
/*
 * A module to patch in the tests. /proc/lp_target shows what its functions return:
 *   value=<lp_target_value()> sleeper=<last lp_target_sleeper() result> sleeping=<0|1>
 * Writing "hold" makes a kthread sit inside lp_target_sleeper() until "release" is written:
 * a function kept busy by a sleeping task.
 */
#include <linux/delay.h>
#include <linux/kthread.h>
#include <linux/module.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/uaccess.h>

static bool hold;
static bool inside;
static int last_sleeper = -1;
static struct task_struct *sleeper_task;

noinline __attribute__((noipa)) int lp_target_value(void)
{
	return 1;
}

noinline __attribute__((noipa)) int lp_target_sleeper(void)
{
	WRITE_ONCE(inside, true);
	while (READ_ONCE(hold) && !kthread_should_stop())
		msleep_interruptible(20);
	WRITE_ONCE(inside, false);
	return 1;
}

static int sleeper_thread(void *unused)
{
	while (!kthread_should_stop()) {
		WRITE_ONCE(last_sleeper, lp_target_sleeper());
		msleep_interruptible(20);
	}
	return 0;
}

static int lp_target_show(struct seq_file *m, void *v)
{
	seq_printf(m, "value=%d sleeper=%d sleeping=%d\n", lp_target_value(),
		   READ_ONCE(last_sleeper), READ_ONCE(inside));
	return 0;
}

static int lp_target_open(struct inode *inode, struct file *file)
{
	return single_open(file, lp_target_show, NULL);
}

static ssize_t lp_target_write(struct file *file, const char __user *ubuf, size_t len,
			       loff_t *off)
{
	char buf[16] = {};

	if (copy_from_user(buf, ubuf, min(len, sizeof(buf) - 1)))
		return -EFAULT;
	if (!strncmp(buf, "hold", 4)) {
		WRITE_ONCE(hold, true);
		while (!READ_ONCE(inside))
			msleep(5);
	} else if (!strncmp(buf, "release", 7)) {
		WRITE_ONCE(hold, false);
		while (READ_ONCE(inside))
			msleep(5);
	} else {
		return -EINVAL;
	}
	return len;
}

static const struct proc_ops lp_target_ops = {
	.proc_open = lp_target_open,
	.proc_read = seq_read,
	.proc_lseek = seq_lseek,
	.proc_release = single_release,
	.proc_write = lp_target_write,
};

static int __init lp_target_init(void)
{
	sleeper_task = kthread_run(sleeper_thread, NULL, "lp_sleeper");
	if (IS_ERR(sleeper_task))
		return PTR_ERR(sleeper_task);
	if (!proc_create("lp_target", 0644, NULL, &lp_target_ops)) {
		kthread_stop(sleeper_task);
		return -ENOMEM;
	}
	return 0;
}

static void __exit lp_target_exit(void)
{
	remove_proc_entry("lp_target", NULL);
	WRITE_ONCE(hold, false);
	kthread_stop(sleeper_task);
}

module_init(lp_target_init);
module_exit(lp_target_exit);
MODULE_LICENSE("GPL");
