"""Every example runs, through the CLI (run.sh) and through Python (run.py), and shows what its
README says. The scripts check their own observations and exit non-zero otherwise; this test
also checks a line of the output per example."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# One line each example's scripts must print (besides "example passed").
EXAMPLES = {
    "01-server": "after the patch:  12 items -> total=2700   (same connection)",
    "02-shared-library": "hello, world",
    "03-stacking": "price=900",
    "04-refused": "too short",
}
# Kernel examples belong to lp-kernel and are run by lp-kernel/test.sh under QEMU.
OWNED_ELSEWHERE = "kernel-"


def test_every_example_folder_is_listed_here():
    folders = {p.name for p in HERE.iterdir()
               if p.is_dir() and not p.name.startswith((".", "_", OWNED_ELSEWHERE))
               and p.name != "__pycache__"}
    assert folders == set(EXAMPLES), "add the new example to EXAMPLES so it is run"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_has_readme_target_patch_and_both_scripts(name):
    folder = HERE / name
    assert (folder / "README.md").read_text().strip()
    assert (folder / "run.sh").exists() and (folder / "run.py").exists()
    assert len(list(folder.glob("*.c"))) >= 2, "a target program and a patch, in C"


def run(argv, name):
    env = dict(os.environ)
    done = subprocess.run(argv, cwd=HERE / name, capture_output=True, text=True, timeout=180,
                          env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(map(str, argv))} exited {done.returncode}:\n{out}"
    assert "example passed" in done.stdout, out
    assert EXAMPLES[name] in out, out
    return out


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_shell_script(name):
    if not os.environ.get("LIVEPATCH"):
        pytest.fail("set LIVEPATCH to the livepatch binary (examples/test.sh does)")
    run(["bash", "run.sh"], name)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_python_script(name):
    run([sys.executable, "run.py"], name)
