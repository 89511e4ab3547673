"""Shared fixtures: C programs compiled by the test with gcc, run as real processes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from procs import FIXTURES, Running, gcc  # noqa: E402


def function_code(elf: Path, name: str) -> "tuple[bytes, int]":
    """The bytes of function `name` in an object, executable or shared library, and its address.

    Read with binutils (nm for the symbol, objdump for where .text starts, objcopy for its
    bytes) so the bytes are exactly what gcc and ld produced.
    """
    nm = subprocess.run(["nm", "-S", "--defined-only", str(elf)], capture_output=True,
                        text=True, check=True).stdout
    for line in nm.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[3] == name:
            addr, size = int(fields[0], 16), int(fields[1], 16)
            break
    else:
        raise AssertionError(f"{name} not in {elf}")
    headers = subprocess.run(["objdump", "-h", str(elf)], capture_output=True, text=True,
                             check=True).stdout
    [text_vma] = [int(line.split()[3], 16) for line in headers.splitlines()
                  if line.split()[1:2] == [".text"]]
    text = elf.with_name(elf.name + ".text.bin")
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.text", str(elf), str(text)],
                   check=True)
    offset = addr - text_vma
    return text.read_bytes()[offset:offset + size], addr


@pytest.fixture(scope="session")
def built(tmp_path_factory, have_gcc):
    """counter (two builds that differ only in their build-id) and the patch objects."""
    d = tmp_path_factory.mktemp("built")
    (d / "a").mkdir()
    (d / "b").mkdir()
    common = ["-O2", "-Wl,--build-id"]
    return {
        "counter": gcc(d / "a" / "counter", *common, str(FIXTURES / "counter.c")),
        # same file name, another build: what a patch made for the first must refuse
        "counter_other": gcc(d / "b" / "counter", *common, "-DSTEP_US=10001",
                             str(FIXTURES / "counter.c")),
        "value2": gcc(d / "value2.o", "-c", "-fPIC", "-O2", "-DVALUE=2",
                      str(FIXTURES / "value_fix.c")),
        "value3": gcc(d / "value3.o", "-c", "-fPIC", "-O2", "-DVALUE=3",
                      str(FIXTURES / "value_fix.c")),
        "run": gcc(d / "run.o", "-c", "-fPIC", "-O2", str(FIXTURES / "run_fix.c")),
        "dir": d,
    }


@pytest.fixture
def counter(built):
    """A running counter process printing value=1 every 10 ms; killed after the test."""
    proc = Running([str(built["counter"])])
    proc.wait_for("value=1")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def have_gcc():
    if shutil.which("gcc") is None:
        pytest.fail("gcc is required (scripts/install-deps.sh installs it)")
    return True
