#!/bin/busybox sh
# /init of the benchmark VM: prints "LPBENCH <what> <value>..." lines; lp-kernel/bench.sh sums up.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
echo 1 > /proc/sys/kernel/printk
M=/lib/lp
RUNS=15
insmod $M/lpcore.ko
insmod $M/lp_bench.ko
now() { cat /proc/lp_bench_now; }
klp=/sys/kernel/livepatch/klp_bench
klp_wait() { while [ "$(cat $klp/transition 2>/dev/null)" = 1 ]; do :; done; }
klp_off() { echo 0 > $klp/enabled; klp_wait; while [ -d $klp ]; do :; done; rmmod klp_bench; }

# Cost of a call: lp_bench_plain (never patched), lp_bench_target through lpcore's redirect
# (ftrace handler + lp-core lookup), lp_bench_klp_target through the kernel's livepatch.
for i in $(seq $RUNS); do echo "LPBENCH call_unpatched $(cat /proc/lp_bench_calls)"; done
insmod $M/p_bench.ko
insmod $M/klp_bench.ko && klp_wait
for i in $(seq $RUNS); do echo "LPBENCH call $(cat /proc/lp_bench_calls)"; done
klp_off
echo 0 > /sys/kernel/lp/p_bench/enabled
rmmod p_bench

# insmod → live: ktime before and after `insmod` returns (lpcore registers in the module's init,
# so the patch is live when insmod returns; the kernel's livepatch switches task by task
# afterwards: polled until its transition is over). The cost of one `cat` is measured alone.
for i in $(seq $RUNS); do
  a=$(now); b=$(now); echo "LPBENCH cat_overhead_ns $((b - a))"
  a=$(now); insmod $M/p_bench.ko; b=$(now); echo "LPBENCH insmod_to_live_ns $((b - a))"
  echo 0 > /sys/kernel/lp/p_bench/enabled
  rmmod p_bench
  a=$(now); insmod $M/klp_bench.ko; klp_wait; b=$(now); echo "LPBENCH klp_insmod_to_live_ns $((b - a))"
  klp_off
done
dmesg | sed -n 's/.*patch p_bench (id [0-9]*): live, 1 function(s), registered in \([0-9]*\) us.*/LPBENCH register_us \1/p'
dmesg | sed -n 's/.*patch p_bench: switched after 1 attempt(s) at the synchronization point (stop_machine \([0-9]*\) us).*/LPBENCH stop_machine_us \1/p'
echo "LPBENCH done"
poweroff -f
