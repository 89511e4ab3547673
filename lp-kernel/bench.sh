#!/usr/bin/env bash
# Kernel benchmarks, measured inside the QEMU VM (TCG: absolute times are emulated, ratios are
# what carries over): the cost of a call through lpcore's redirect (ftrace handler + lp-core
# table lookup) against the original function, and the time from `insmod` to the patch being
# live. Prints medians over RUNS runs.
# Usage: bash lp-kernel/bench.sh        (after lp-kernel/test.sh has installed the prerequisites)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$here/build
bash "$here/build.sh" >/dev/null
log=$out/bench.log
VM_TIMEOUT=${VM_TIMEOUT:-600} bash "$here/vm.sh" "$here/bench/vm-bench.sh" "$log" \
  "$out/core/lpcore.ko" "$out/bench/lp_bench.ko" "$out/bench/p_bench.ko"
lines=$(tr -d '\r' <"$log" | grep '^LPBENCH ')
echo "$lines" | grep -q '^LPBENCH done' || { echo "bench.sh: the VM did not finish" >&2; exit 1; }

# median KEY FIELD: median of field FIELD of the "LPBENCH KEY ..." lines
median() {
  echo "$lines" | awk -v k="$1" -v f="$2" '$2 == k { print $f }' | sort -n |
    awk '{ v[NR] = $1 } END { if (NR == 0) exit 1; print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
calls=$(median call_orig 3)
orig=$(median call_orig 4)
patched=$(median call_patched 4)
cat_ns=$(median cat_overhead_ns 3)
insmod_ns=$(median insmod_to_live_ns 3)
reg_us=$(median register_us 3)
stop_us=$(median stop_machine_us 3)
awk -v c="$calls" -v o="$orig" -v p="$patched" -v cat="$cat_ns" -v ins="$insmod_ns" \
  -v reg="$reg_us" -v stop="$stop_us" 'BEGIN {
  printf "call, original:            %8.1f ns\n", o / c
  printf "call, through redirect:    %8.1f ns\n", p / c
  printf "ratio redirect/original:   %8.2f x\n", p / o
  printf "insmod -> live:            %8.2f ms (median; one cat = %.2f ms subtracted)\n", (ins - cat) / 1e6, cat / 1e6
  printf "  of which lpcore register:%8.2f ms (resolve, hook, synchronization point)\n", reg / 1e3
  printf "  of which stop_machine:   %8.2f ms (every CPU held, stacks checked, commit)\n", stop / 1e3
}'
