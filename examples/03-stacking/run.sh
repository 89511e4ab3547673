#!/usr/bin/env bash
# Stack two patches on one function, then revert them newest first, with the livepatch CLI.
# Usage: bash run.sh   (needs gcc and `livepatch` on PATH, or LIVEPATCH=/path/to/livepatch)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
livepatch=${LIVEPATCH:-livepatch}
work=$(mktemp -d)
app_pid=
cleanup() { [ -n "$app_pid" ] && kill "$app_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

gcc -O2 -o "$work/app" "$here/app.c"
gcc -O2 -c -fPIC -o "$work/a.o" "$here/patch_a.c"
gcc -O2 -c -fPIC -o "$work/b.o" "$here/patch_b.c"
"$livepatch" pack --target "$work/app" --object "$work/a.o" -o "$work/a.lpp"
"$livepatch" pack --target "$work/app" --object "$work/b.o" -o "$work/b.lpp"

"$work/app" >"$work/app.out" &
app_pid=$!
# The price the app prints now (a line written after this call began).
price() { local n; n=$(wc -l <"$work/app.out"); sleep 0.1; tail -n +$((n + 1)) "$work/app.out" | tail -n 1; }
expect() { local got; got=$(price); echo "$1: $got"; [ "$got" = "$2" ] || { echo "expected $2" >&2; exit 1; }; }

expect "original        " price=1000
"$livepatch" apply "$app_pid" "$work/a.lpp"
expect "with A          " price=950
"$livepatch" apply "$app_pid" "$work/b.lpp"
expect "with A, then B  " price=900
"$livepatch" status "$app_pid"

# A is under B: reverting it first is refused (exit code 9), and nothing changes.
id_a=$("$livepatch" status "$app_pid" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["patches"][0]["id"])')
if "$livepatch" revert "$app_pid" "$id_a"; then
  echo "reverting A under B should have been refused" >&2; exit 1
else
  echo "revert of A refused (exit code $?), as it should be"
fi
expect "still A and B   " price=900

"$livepatch" revert "$app_pid"          # the newest: B
expect "B reverted      " price=950
"$livepatch" revert "$app_pid"          # then A
expect "A reverted      " price=1000
echo "example passed"
