#!/usr/bin/env bash
# Three patches that livepatch refuses, and why, with the livepatch CLI. Each refusal is one
# line on stderr and an exit code naming its kind; the process is left exactly as it was.
# Usage: bash run.sh   (needs gcc and `livepatch` on PATH, or LIVEPATCH=/path/to/livepatch)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
livepatch=${LIVEPATCH:-livepatch}
work=$(mktemp -d)
app_pid=
cleanup() { [ -n "$app_pid" ] && kill "$app_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

mkdir "$work/build1" "$work/build2"
gcc -O2 -DBUILD=1 -o "$work/build1/app" "$here/app.c"
gcc -O2 -DBUILD=2 -o "$work/build2/app" "$here/app.c"
for fix in fix_checksum fix_worker fix_feature; do
  gcc -O2 -c -fPIC -o "$work/$fix.o" "$here/$fix.c"
done
"$livepatch" pack --target "$work/build1/app" --object "$work/fix_checksum.o" -o "$work/checksum.lpp"
"$livepatch" pack --target "$work/build2/app" --object "$work/fix_worker.o" -o "$work/worker.lpp"
"$livepatch" pack --target "$work/build2/app" --object "$work/fix_feature.o" -o "$work/feature.lpp"

"$work/build2/app" >"$work/app.out" &
app_pid=$!
latest() { local n; n=$(wc -l <"$work/app.out"); sleep 0.1; tail -n +$((n + 1)) "$work/app.out" | tail -n 1; }
echo "running: $(latest)"

failed=0
# refuse TITLE EXPECTED-EXIT-CODE PATCH [apply options...]
refuse() {
  local title=$1 want=$2 patch=$3; shift 3
  local before rc=0
  before=$(latest)
  echo; echo "== $title"
  "$livepatch" apply "$app_pid" "$patch" "$@" || rc=$?
  echo "exit code $rc (expected $want)"
  local after
  after=$(latest)
  echo "the process still prints '$after'"
  [ "$rc" = "$want" ] && [ "$after" = "$before" ] || failed=1
}
refuse "1. a patch made for another build of the program" 4 "$work/checksum.lpp"
refuse "2. a function that is always running (stop mode, 1 s timeout)" 3 "$work/worker.lpp" --timeout 1
refuse "3. a function too short to hold the jump" 10 "$work/feature.lpp"
echo
"$livepatch" status "$app_pid"

[ "$failed" = 0 ] || { echo "unexpected result" >&2; exit 1; }
echo "example passed"
