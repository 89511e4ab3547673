#!/usr/bin/env bash
# Patch a shared library in every process that maps it, with the livepatch CLI.
# Usage: bash run.sh   (needs gcc and `livepatch` on PATH, or LIVEPATCH=/path/to/livepatch)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
livepatch=${LIVEPATCH:-livepatch}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

gcc -O2 -shared -fPIC -o "$work/libgreet.so" "$here/libgreet.c"
gcc -O2 -o "$work/client" "$here/client.c" -L"$work" -lgreet -Wl,-rpath,"$work"
gcc -O2 -c -fPIC -o "$work/fix.o" "$here/fix.c"

# Three processes use the library.
for i in 1 2 3; do
  "$work/client" >"$work/client$i.out" &
  pids+=($!)
done
sleep 0.3
last() { tail -n 1 "$work/client$1.out"; }
for i in 1 2 3; do echo "client $i before: $(last $i)"; done

# One patch for the library file; apply it in every process whose maps show that file.
"$livepatch" pack --target "$work/libgreet.so" --object "$work/fix.o" -o "$work/fix.lpp"
# (-s and `|| true`: processes that exit or deny access meanwhile are skipped)
users=$({ grep -ls "$work/libgreet.so" /proc/[0-9]*/maps || true; } | cut -d/ -f3 | sort -n)
for pid in $users; do
  "$livepatch" apply "$pid" "$work/fix.lpp"
done
sleep 0.3
for i in 1 2 3; do echo "client $i after:  $(last $i)"; done

ok=1
for i in 1 2 3; do [ "$(last $i)" = "hello, world" ] || ok=0; done
[ "$(echo "$users" | wc -w)" = 3 ] || ok=0

for pid in $users; do "$livepatch" revert "$pid"; done
sleep 0.3
for i in 1 2 3; do [ "$(last $i)" = "helo, world" ] || ok=0; done
echo "client 1 reverted: $(last 1)"

[ "$ok" = 1 ] || { echo "unexpected output" >&2; exit 1; }
echo "example passed"
