#!/usr/bin/env bash
# Runs every example (its run.sh with the CLI and its run.py with `import livepatch`) as a test,
# so none of them rots. Called by scripts/test.sh after lp-py/test.sh.
# Usage: bash examples/test.sh [pytest args...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

# The Python package, installed the way users install it (reuses lp-py's venv).
bash "$root/lp-py/test.sh" --install-only
venv=${LP_PY_VENV:-$root/lp-py/.venv}

# The CLI the shell scripts call.
(cd "$root" && cargo build --quiet -p lp-userspace --bin livepatch)
export LIVEPATCH="${CARGO_TARGET_DIR:-$root/target}/debug/livepatch"

cd "$here"
"$venv/bin/python" -m pytest -ra -p no:cacheprovider "$@" test_examples.py
