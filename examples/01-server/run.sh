#!/usr/bin/env bash
# Patch a function of a running server with the livepatch CLI, while a client stays connected.
# Usage: bash run.sh   (needs gcc and `livepatch` on PATH, or LIVEPATCH=/path/to/livepatch)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
livepatch=${LIVEPATCH:-livepatch}
work=$(mktemp -d)
server_pid=
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# 1. Build the server as usual, and the fix as a relocatable object.
gcc -O2 -o "$work/server" "$here/server.c"
gcc -O2 -c -fPIC -o "$work/fix.o" "$here/fix.c"

# 2. Start the server (loopback, a free port) and connect one client that stays connected.
"$work/server" 0 >"$work/server.out" &
server_pid=$!
for _ in $(seq 100); do grep -q listening "$work/server.out" && break; sleep 0.05; done
port=$(awk '/listening on/ {print $3}' "$work/server.out")
exec 3<>"/dev/tcp/127.0.0.1/$port"
ask() { echo "$1" >&3; read -r reply <&3; echo "$reply"; }

before=$(ask 12)
echo "before the patch: 12 items -> $before"

# 3. Pack the fix against the server's binary and apply it to the running process.
"$livepatch" pack --target "$work/server" --object "$work/fix.o" -o "$work/fix.lpp"
"$livepatch" apply "$server_pid" "$work/fix.lpp"
"$livepatch" status "$server_pid"

after=$(ask 12)
echo "after the patch:  12 items -> $after   (same connection)"

# 4. Take the fix back out.
"$livepatch" revert "$server_pid"
reverted=$(ask 12)
echo "after revert:     12 items -> $reverted"

[ "$before" = total=3000 ] && [ "$after" = total=2700 ] && [ "$reverted" = total=3000 ] \
  || { echo "unexpected replies" >&2; exit 1; }
echo "example passed"
