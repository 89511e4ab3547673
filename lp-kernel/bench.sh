#!/usr/bin/env bash
# Kernel benchmarks, measured inside the QEMU VM (TCG: absolute times are emulated, ratios are
# what carries over): the cost of a call through lpcore's redirect (ftrace handler + lp-core
# table lookup) against the original function, and the time from `insmod` to the patch being
# live — each next to the same patch applied with the kernel's own livepatch. Medians of 15 runs.
# Usage: bash lp-kernel/bench.sh        (after lp-kernel/test.sh has installed the prerequisites)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$here/build
bash "$here/build.sh" >/dev/null
log=$out/bench.log
# Multi-threaded TCG, as the figures of earlier sessions were measured (vm.sh's default, for
# the tests, is single-threaded).
VM_ACCEL=${VM_ACCEL:-tcg} VM_TIMEOUT=${VM_TIMEOUT:-600} bash "$here/vm.sh" "$here/bench/vm-bench.sh" "$log" \
  "$out/core/lpcore.ko" "$out/bench/lp_bench.ko" "$out/bench/p_bench.ko" "$out/bench/klp_bench.ko"
lines=$(tr -d '\r' <"$log" | grep '^LPBENCH ')
echo "$lines" | grep -q '^LPBENCH done' || { echo "bench.sh: the VM did not finish" >&2; exit 1; }

# median KEY FIELD: median of field FIELD of the "LPBENCH KEY ..." lines
median() {
  echo "$lines" | awk -v k="$1" -v f="$2" '$2 == k { print $f }' | sort -n |
    awk '{ v[NR] = $1 } END { if (NR == 0) exit 1; print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
calls=$(median call 3)
base=$(median call_unpatched 4)          # the same function, nothing patched yet
plain=$(median call 4)                   # lp_bench_plain: never patched
lp=$(median call 5)                      # through lpcore
klp=$(median call 6)                     # through the kernel's livepatch
cat_ns=$(median cat_overhead_ns 3)
insmod_ns=$(median insmod_to_live_ns 3)
klp_ins=$(median klp_insmod_to_live_ns 3)
reg_us=$(median register_us 3)
stop_us=$(median stop_machine_us 3)
awk -v c="$calls" -v base="$base" -v o="$plain" -v p="$lp" -v k="$klp" -v cat="$cat_ns" \
  -v ins="$insmod_ns" -v kins="$klp_ins" -v reg="$reg_us" -v stop="$stop_us" 'BEGIN {
  printf "call, original:                 %8.1f ns (unpatched twin; %.1f ns before any patch)\n", o / c, base / c
  printf "call, through lpcore:           %8.1f ns   ratio to original %6.2f x\n", p / c, p / o
  printf "call, through kernel livepatch: %8.1f ns   ratio to original %6.2f x\n", k / c, k / o
  printf "lpcore / kernel livepatch:      %8.2f x\n", p / k
  printf "insmod -> live, lpcore:         %8.2f ms (median; one cat = %.2f ms subtracted)\n", (ins - cat) / 1e6, cat / 1e6
  printf "  of which registration:        %8.2f ms (resolve, hook, synchronization point)\n", reg / 1e3
  printf "  of which stop_machine:        %8.2f ms (every CPU held, stacks checked, commit)\n", stop / 1e3
  printf "insmod -> live, kernel livepatch:%7.2f ms (until its per-task transition is over)\n", (kins - cat) / 1e6
}'
