"""The Python API says what the `livepatch` CLI says: same status records, same one-line error
messages, and the exception class matches the CLI's exit code."""

import json
import os
import subprocess

import livepatch
import pytest
from procs import Running, dead_pid

# The CLI's exit code for each exception class (lp_userspace::ErrorKind::exit_code).
EXIT_CODES = {
    livepatch.BusyError: 3,
    livepatch.MismatchError: 4,
    livepatch.ProcessGoneError: 5,
    livepatch.AccessError: 6,
    livepatch.PatchFormatError: 7,
    livepatch.AlreadyAppliedError: 8,
    livepatch.NotFoundError: 9,
    livepatch.NotTopError: 9,
    livepatch.RefusedError: 10,
    livepatch.InputError: 7,  # not an ELF file (bad mode/timeout are the CLI's usage errors)
    livepatch.IoError: 1,
}


@pytest.fixture(scope="module")
def cli():
    path = os.environ.get("LIVEPATCH")
    if not path or not os.access(path, os.X_OK):
        pytest.fail("set LIVEPATCH to the livepatch binary (lp-py/test.sh builds it)")

    def run(*args):
        return subprocess.run([path, *map(str, args)], capture_output=True, text=True,
                              timeout=60)
    return run


@pytest.fixture(scope="module")
def v2(built, tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "v2.lpp"
    return livepatch.pack(built["counter"], built["value2"], out), out


def same_failure(cli_args, python_call, cli):
    """Runs both; returns the exception after checking message and exit code agree."""
    with pytest.raises(livepatch.Error) as err:
        python_call()
    done = cli(*cli_args)
    assert done.stderr.strip() == f"livepatch: error: {err.value}"
    assert done.returncode == EXIT_CODES[type(err.value)]
    return err.value


def test_status_is_the_cli_json(counter, v2, cli):
    patch, _ = v2
    livepatch.apply(counter.pid, patch)
    done = cli("status", counter.pid, "--json")
    assert done.returncode == 0, done.stderr
    assert livepatch.status(counter.pid) == json.loads(done.stdout)
    livepatch.revert(counter.pid)


def test_patch_applied_by_the_cli_is_seen_and_reverted_from_python(counter, v2, cli):
    patch, path = v2
    assert cli("apply", counter.pid, path).returncode == 0
    counter.wait_for("value=2")
    assert livepatch.status(counter.pid)[0]["patches"][0]["id"] == patch.id
    assert livepatch.revert(counter.pid)["id"] == patch.id
    counter.wait_for("value=1")


def test_bad_pid(v2, cli):
    patch, path = v2
    pid = dead_pid()
    e = same_failure(["apply", pid, path], lambda: livepatch.apply(pid, patch), cli)
    assert isinstance(e, livepatch.ProcessGoneError)


def test_corrupt_patch_file(counter, v2, cli, tmp_path):
    _, path = v2
    bad = tmp_path / "bad.lpp"
    bad.write_bytes(path.read_bytes()[:100])
    e = same_failure(["apply", counter.pid, bad], lambda: livepatch.apply(counter.pid, bad), cli)
    assert isinstance(e, livepatch.PatchFormatError)


def test_wrong_build(built, v2, cli):
    patch, path = v2
    other = Running([str(built["counter_other"])])
    try:
        other.wait_for("value=1")
        e = same_failure(["apply", other.pid, path], lambda: livepatch.apply(other.pid, patch),
                         cli)
        assert isinstance(e, livepatch.MismatchError)
    finally:
        other.stop()


def test_already_applied_and_nothing_to_revert(counter, v2, cli):
    patch, path = v2
    livepatch.apply(counter.pid, patch)
    same_failure(["apply", counter.pid, path], lambda: livepatch.apply(counter.pid, patch), cli)
    livepatch.revert(counter.pid)
    e = same_failure(["revert", counter.pid], lambda: livepatch.revert(counter.pid), cli)
    assert isinstance(e, livepatch.NotFoundError)


def test_busy(counter, built, cli, tmp_path):
    path = tmp_path / "run.lpp"
    run = livepatch.pack(built["counter"], built["run"], path)
    with pytest.raises(livepatch.BusyError) as err:
        livepatch.apply(counter.pid, run, timeout=0.2)
    done = cli("apply", counter.pid, path, "--timeout", "0.2")
    assert done.returncode == 3
    # The message names the thread and the function; the waited time may differ by a few ms.
    assert str(err.value).split(" (gave up")[0] in done.stderr


@pytest.mark.parametrize("case", ["missing function", "not elf", "missing object", "bad replace"])
def test_pack_failures(built, cli, tmp_path, case):
    target, obj, replace = built["counter"], built["value2"], []
    if case == "missing function":
        replace = ["nosuch=value"]
    elif case == "not elf":
        target = tmp_path / "notes.txt"
        target.write_text("hello\n")
    elif case == "missing object":
        obj = tmp_path / "missing.o"
    else:
        replace = ["=value"]
    out = tmp_path / "out.lpp"
    args = ["pack", "--target", target, "--object", obj, "-o", out]
    for r in replace:
        args += ["--replace", r]
    with pytest.raises(livepatch.Error) as err:
        livepatch.pack(target, obj, out, replace=replace)
    done = cli(*args)
    assert done.stderr.strip() == f"livepatch: error: {err.value}"
    if case != "bad replace":  # the CLI treats a malformed --replace as a usage error (exit 1)
        assert done.returncode == EXIT_CODES[type(err.value)]
    assert not out.exists()
