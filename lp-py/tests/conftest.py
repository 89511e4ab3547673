"""Shared fixtures: C programs compiled by the test with gcc, run as real processes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

FIXTURES = Path(__file__).parent / "fixtures"


def gcc(out: Path, *args: str) -> Path:
    """Runs gcc; the test fails with gcc's message if it does not compile."""
    cmd = ["gcc", *args, "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
    return out


def function_code(obj: Path, name: str) -> "tuple[bytes, int]":
    """The bytes of function `name` in a relocatable object's .text, and its offset there.

    Read with binutils (nm for the symbol, objcopy for the section) so the bytes are exactly
    what gcc emitted.
    """
    nm = subprocess.run(["nm", "-S", "--defined-only", str(obj)], capture_output=True,
                        text=True, check=True).stdout
    for line in nm.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[3] == name:
            offset, size = int(fields[0], 16), int(fields[1], 16)
            break
    else:
        raise AssertionError(f"{name} not in {obj}")
    text = obj.with_suffix(".text.bin")
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.text", str(obj), str(text)],
                   check=True)
    return text.read_bytes()[offset:offset + size], offset


@pytest.fixture(scope="session")
def have_gcc():
    if shutil.which("gcc") is None:
        pytest.fail("gcc is required (scripts/install-deps.sh installs it)")
    return True
