"""processes_mapping, and patching a shared library in every process that maps it."""

import os

import livepatch
import pytest
from procs import FIXTURES, Running, gcc


@pytest.fixture(scope="module")
def lib(tmp_path_factory, have_gcc):
    d = tmp_path_factory.mktemp("shared")
    so = gcc(d / "libshared.so", "-shared", "-fPIC", "-O2", "-Wl,--build-id",
             str(FIXTURES / "shared.c"))
    exe = gcc(d / "uselib", "-O2", str(FIXTURES / "uselib.c"), f"-L{d}", "-lshared",
              f"-Wl,-rpath,{d}")
    fix = gcc(d / "shared_fix.o", "-c", "-fPIC", "-O2", str(FIXTURES / "shared_fix.c"))
    return {"so": so, "exe": exe, "fix": fix, "dir": d}


@pytest.fixture
def users(lib, counter):
    procs = [Running([str(lib["exe"])]) for _ in range(2)]
    for p in procs:
        p.wait_for("lib=10")
    yield procs
    for p in procs:
        p.stop()


def test_processes_mapping_finds_exactly_the_users(lib, users, counter):
    pids = livepatch.processes_mapping(lib["so"])
    assert sorted(pids) == sorted(p.pid for p in users)
    assert counter.pid not in pids


def test_another_name_of_the_same_file_counts(lib, users, tmp_path):
    link = tmp_path / "alias.so"
    os.symlink(lib["so"], link)
    assert sorted(livepatch.processes_mapping(link)) == sorted(p.pid for p in users)


def test_a_file_nobody_maps(lib, tmp_path):
    lonely = tmp_path / "lonely"
    lonely.write_bytes(b"x")
    assert livepatch.processes_mapping(lonely) == []


def test_missing_file_is_an_io_error(tmp_path):
    with pytest.raises(livepatch.IoError, match="nothere"):
        livepatch.processes_mapping(tmp_path / "nothere")


def test_patch_the_library_in_every_process_that_maps_it(lib, users, tmp_path):
    patch = livepatch.pack(lib["so"], lib["fix"], tmp_path / "fix.lpp")
    assert patch.target_name == "libshared.so"
    for pid in livepatch.processes_mapping(lib["so"]):
        livepatch.apply(pid, patch)
    for p in users:
        p.wait_for("lib=11")
        p.only("lib=11")
    for pid in livepatch.processes_mapping(lib["so"]):
        livepatch.revert(pid, patch.id)
    for p in users:
        p.wait_for("lib=10")


def test_the_script_cannot_patch_itself(lib, tmp_path):
    # A script that loaded the library shows up in processes_mapping; patching itself is refused
    # with a clear error and the interpreter goes on. (A copy of the library, so the other tests'
    # processes_mapping results are not affected by this process mapping it.)
    import ctypes
    import shutil

    copy = tmp_path / "libshared.so"
    shutil.copy(lib["so"], copy)
    loaded = ctypes.CDLL(str(copy))
    assert os.getpid() in livepatch.processes_mapping(copy)
    patch = livepatch.pack(copy, lib["fix"], None)
    with pytest.raises(livepatch.AccessError, match="itself"):
        livepatch.apply(os.getpid(), patch)
    assert loaded.lib_value() == 10
