#!/usr/bin/env bash
# lp-py's tests on a fresh machine: builds the extension the way a user installs it
# (`pip install ./lp-py`, maturin backend) into a private venv, lints the pyo3 code, runs pytest.
# Usage: bash lp-py/test.sh [--install-only] [pytest args...]
#   --install-only   only (re)create the venv and install livepatch; examples/test.sh uses this.
# The venv is lp-py/.venv (ignored by git); LP_PY_VENV overrides it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
venv=${LP_PY_VENV:-$here/.venv}

install_only=0
if [ "${1:-}" = "--install-only" ]; then install_only=1; shift; fi

python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -m venv "$venv"; then
    # Debian's python3 ships venv separately.
    rm -rf "$venv"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv
    "$python" -m venv "$venv"
  fi
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "maturin>=1.5,<2.0" "pytest>=7" "mypy>=1.8"

# Exactly what a user runs. pip builds in the source tree, so the workspace's Cargo.lock and
# target directory (or $CARGO_TARGET_DIR) are reused and a rebuild is incremental.
"$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$root/lp-py"

[ "$install_only" = 1 ] && exit 0

# The CLI, for the tests that check the Python API says what the CLI says.
(cd "$root" && cargo build --quiet -p lp-userspace --bin livepatch)
export LIVEPATCH="${CARGO_TARGET_DIR:-$root/target}/debug/livepatch"

# pytest exits 5 when it collects no test: that is a failure here, as any non-zero exit is.
(cd "$here" && "$venv/bin/python" -m pytest -ra -p no:cacheprovider "$@" tests)

# The workspace lint builds lp-py without the `python` feature; lint the bindings themselves here.
cd "$root"
PYO3_PYTHON="$venv/bin/python" cargo clippy --quiet -p lp-py --features python --all-targets -- -D warnings
