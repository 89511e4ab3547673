#!/bin/bash
# One nonstop apply+revert each way with 4 nice-0 hogs: the trace's window phases.
LP=/work/target-review9/debug/livepatch
for i in 1 2 3 4; do yes > /dev/null & done
./manythreads 4 > /dev/null & T=$!
sleep 0.5
for v in courtesy nocourtesy courtesy nocourtesy; do
  pre=""; [ $v = nocourtesy ] && pre=./nocourtesy
  LIVEPATCH_TRACE=1 $pre $LP apply $T p.lp --mode nonstop --timeout 60 2> tr.txt >/dev/null
  echo "== $v apply: $(grep -E 'installed|sync agent|switched|uninstalled' tr.txt | sed -E 's/livepatch: trace: //' | tr '\n' ';' | cut -c1-400)"
  $pre $LP revert $T --mode nonstop --timeout 60 >/dev/null 2>&1
done
kill $T; kill %1 %2 %3 %4 2>/dev/null; wait 2>/dev/null
