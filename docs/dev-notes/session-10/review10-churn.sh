#!/bin/bash
# Review 10, H1: s10-leader on a process whose main thread exited and whose threads come and go
# (review10-churn.c). Usage: LP=/path/to/livepatch [N=30] review10-churn.sh
# Builds the target and its patch (new_compute.c) in a temporary directory, runs N nonstop
# apply+revert pairs, prints every wrong answer (the target stays alive throughout).
set -u
HERE=$(cd "$(dirname "$0")" && pwd); FIX=$HERE/../../../lp-userspace/tests/fixtures/proc
LP=${LP:?livepatch binary}; W=$(mktemp -d); cd "$W"
gcc -O2 -g -pthread "$HERE/review10-churn.c" -o churn && gcc -O2 -c "$FIX/new_compute.c" -o nc.o
"$LP" pack --target churn --object nc.o -o churn.lp >/dev/null
./churn > churn.out & P=$!; sleep 0.5
for i in $(seq 1 ${N:-30}); do
  out=$(timeout 60 "$LP" apply $P churn.lp --mode nonstop --timeout 5 2>&1); a=$?
  if [ $a != 0 ]; then
    echo "apply $i: exit $a: $out"
    echo "  target alive: $(kill -0 $P && echo yes) threads: $(ls /proc/$P/task | wc -l)"
    echo "  status: $("$LP" status $P 2>&1 | head -2 | tr '\n' ' ')"
  fi
  out=$(timeout 60 "$LP" revert $P 2>&1); r=$?
  [ $r != 0 -o $a != 0 ] && echo "  revert $i: exit $r: $(echo "$out" | tr '\n' ' ')"
done
kill $P; rm -rf "$W"
