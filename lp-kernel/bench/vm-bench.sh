#!/bin/busybox sh
# /init of the benchmark VM: prints "LPBENCH <what> <value>" lines; lp-kernel/bench.sh sums up.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
echo 1 > /proc/sys/kernel/printk
M=/lib/lp
insmod $M/lpcore.ko
insmod $M/lp_bench.ko
now() { cat /proc/lp_bench_now; }
RUNS=${RUNS:-15}

# Cost of a call: the original, then through the redirect (ftrace handler + lp-core lookup).
for i in $(seq $RUNS); do echo "LPBENCH call_orig $(cat /proc/lp_bench_calls)"; done
insmod $M/p_bench.ko
for i in $(seq $RUNS); do echo "LPBENCH call_patched $(cat /proc/lp_bench_calls)"; done
echo 0 > /sys/kernel/lp/p_bench/enabled
rmmod p_bench

# insmod → live: ktime before and after `insmod` returns (registration happens in the module's
# init, so the patch is live when insmod returns); the cost of one `cat` is measured alone.
for i in $(seq $RUNS); do
  a=$(now); b=$(now); echo "LPBENCH cat_overhead_ns $((b - a))"
  a=$(now); insmod $M/p_bench.ko; b=$(now); echo "LPBENCH insmod_to_live_ns $((b - a))"
  echo 0 > /sys/kernel/lp/p_bench/enabled
  rmmod p_bench
done
dmesg | sed -n 's/.*patch p_bench (id [0-9]*): live, 1 function(s), registered in \([0-9]*\) us.*/LPBENCH register_us \1/p'
dmesg | sed -n 's/.*patch p_bench: switched after 1 attempt(s) at the synchronization point (stop_machine \([0-9]*\) us).*/LPBENCH stop_machine_us \1/p'
echo "LPBENCH done"
poweroff -f
