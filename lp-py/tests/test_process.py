"""apply / revert / status on real running processes, through the Python API."""

import os
import threading
import time

import livepatch
import pytest
from procs import Running, dead_pid


@pytest.fixture(scope="module")
def patches(built, tmp_path_factory):
    d = tmp_path_factory.mktemp("patches")
    return {
        "v2": livepatch.pack(built["counter"], built["value2"], d / "v2.lpp"),
        "v3": livepatch.pack(built["counter"], built["value3"], d / "v3.lpp"),
        "run": livepatch.pack(built["counter"], built["run"], d / "run.lpp"),
        "v2_path": d / "v2.lpp",
    }


@pytest.mark.parametrize("mode", ["stop", "nonstop"])
def test_apply_changes_what_the_process_prints_and_revert_restores_it(counter, patches, mode):
    patch = patches["v2"]
    report = livepatch.apply(counter.pid, patch, mode=mode)
    assert report["id"] == patch.id and report["pid"] == counter.pid
    assert [f["name"] for f in report["functions"]] == ["value"]
    # run()'s direct call of value() now calls the new code without the entry's jump
    assert report["functions"][0]["call_sites"] == 1
    counter.wait_for("value=2")
    counter.only("value=2")
    # a nonstop patch's calls go through its dispatch, which status names
    [function] = livepatch.status(counter.pid)[0]["patches"][0]["functions"]
    assert ("dispatch" in function) == (mode == "nonstop"), function

    reverted = livepatch.revert(counter.pid, mode=mode)
    assert reverted["id"] == patch.id
    counter.wait_for("value=1")
    counter.only("value=1")
    assert counter.alive()


def test_apply_accepts_a_patch_file_path(counter, patches):
    livepatch.apply(counter.pid, str(patches["v2_path"]))
    counter.wait_for("value=2")
    livepatch.revert(counter.pid, patches["v2"])
    counter.wait_for("value=1")


def test_status_lists_the_applied_patches(counter, patches):
    assert livepatch.status(counter.pid)[0]["patches"] == []
    livepatch.apply(counter.pid, patches["v2"])
    [record] = livepatch.status(counter.pid)
    assert record["pid"] == counter.pid and record["comm"] == "counter"
    [applied] = record["patches"]
    assert applied["id"] == patches["v2"].id
    assert applied["build_id"] == patches["v2"].target_build_id
    assert applied["module"].endswith("/counter") and applied["mode"] == "stop"
    [function] = applied["functions"]
    assert function["name"] == "value"
    assert int(function["old"], 16) != int(function["new"], 16)
    assert function["call_sites"] == 1
    # the gdb command naming the new code: its object file, saved for gdb, placed at runtime
    obj = f"/tmp/livepatch-{counter.pid}-{applied['id']}.o"
    assert applied["gdb_command"].startswith(f"add-symbol-file {obj} -s .text 0x")
    assert os.path.exists(obj)
    # every process with livepatch state
    assert counter.pid in [r["pid"] for r in livepatch.status()]
    livepatch.revert(counter.pid)
    assert livepatch.status(counter.pid)[0]["patches"] == []


def test_stacked_patches_revert_newest_first(counter, patches):
    v2, v3 = patches["v2"], patches["v3"]
    livepatch.apply(counter.pid, v2)
    counter.wait_for("value=2")
    livepatch.apply(counter.pid, v3)
    counter.wait_for("value=3")
    assert [p["id"] for p in livepatch.status(counter.pid)[0]["patches"]] == [v2.id, v3.id]

    with pytest.raises(livepatch.NotTopError):
        livepatch.revert(counter.pid, v2.id)
    counter.only("value=3")

    assert livepatch.revert(counter.pid)["id"] == v3.id
    counter.wait_for("value=2")
    counter.only("value=2")
    assert livepatch.revert(counter.pid)["id"] == v2.id
    counter.wait_for("value=1")
    with pytest.raises(livepatch.NotFoundError):
        livepatch.revert(counter.pid)


def test_same_patch_twice_is_refused(counter, patches):
    livepatch.apply(counter.pid, patches["v2"])
    with pytest.raises(livepatch.AlreadyAppliedError, match=patches["v2"].id):
        livepatch.apply(counter.pid, patches["v2"])
    assert len(livepatch.status(counter.pid)[0]["patches"]) == 1
    livepatch.revert(counter.pid)


def test_bad_pid_is_process_gone(patches):
    pid = dead_pid()
    with pytest.raises(livepatch.ProcessGoneError) as err:
        livepatch.apply(pid, patches["v2"])
    assert isinstance(err.value, ProcessLookupError)
    assert str(pid) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(livepatch.ProcessGoneError):
        livepatch.revert(pid)
    with pytest.raises(livepatch.ProcessGoneError):
        livepatch.status(pid)


def test_wrong_build_is_a_mismatch_and_changes_nothing(built, patches):
    other = Running([str(built["counter_other"])])
    try:
        other.wait_for("value=1")
        with pytest.raises(livepatch.MismatchError, match="build-id"):
            livepatch.apply(other.pid, patches["v2"])
        other.only("value=1")
        assert livepatch.status(other.pid)[0]["patches"] == []
    finally:
        other.stop()


def test_busy_function_times_out_with_busy_error(counter, patches):
    started = time.monotonic()
    with pytest.raises(livepatch.BusyError, match="run") as err:
        livepatch.apply(counter.pid, patches["run"], timeout=0.5)
    assert time.monotonic() - started >= 0.5
    assert str(counter.pid) in str(err.value) or "thread" in str(err.value)
    counter.only("value=1")
    assert livepatch.status(counter.pid)[0]["patches"] == []


def test_gil_is_released_while_apply_waits(counter, patches):
    ticks = []
    done = threading.Event()

    def tick():
        while not done.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.01)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        with pytest.raises(livepatch.BusyError):
            livepatch.apply(counter.pid, patches["run"], timeout=1.0)
    finally:
        done.set()
        ticker.join()
    # The other Python thread kept running during the whole second apply waited.
    assert len(ticks) >= 30


def test_bad_mode_and_timeout_are_input_errors(counter, patches):
    with pytest.raises(livepatch.InputError, match="mode"):
        livepatch.apply(counter.pid, patches["v2"], mode="sideways")
    with pytest.raises(livepatch.InputError, match="timeout"):
        livepatch.apply(counter.pid, patches["v2"], timeout=-1)
    assert livepatch.status(counter.pid)[0]["patches"] == []


def test_process_killed_right_after_apply_leaves_nothing_behind(built, patches):
    proc = Running([str(built["counter"])])
    proc.wait_for("value=1")
    livepatch.apply(proc.pid, patches["v2"])
    proc.wait_for("value=2")
    proc.stop()
    with pytest.raises(livepatch.ProcessGoneError):
        livepatch.status(proc.pid)


def keys_of(typed_dict):
    return set(typed_dict.__annotations__)


def fits(record, typed_dict):
    """Every required key of `typed_dict` is there, and no key it does not document."""
    required = getattr(typed_dict, "__required_keys__", keys_of(typed_dict))
    return required <= set(record) <= keys_of(typed_dict)


def test_results_have_exactly_the_documented_fields(counter, patches):
    """The TypedDicts in the stubs describe what the functions really return."""
    applied = livepatch.apply(counter.pid, patches["v2"])
    assert set(applied) == keys_of(livepatch.Applied)
    assert set(applied["stats"]) == keys_of(livepatch.SwitchStats)
    assert set(applied["functions"][0]) == keys_of(livepatch.AppliedFunction)
    [record] = livepatch.status(counter.pid)
    assert set(record) == keys_of(livepatch.ProcessStatus)
    assert fits(record["patches"][0], livepatch.PatchStatus), record
    assert fits(record["patches"][0]["functions"][0], livepatch.FunctionStatus), record
    # stop mode: no dispatch; the generated code is named for gdb
    assert "dispatch" not in record["patches"][0]["functions"][0]
    assert record["patches"][0]["gdb_stubs_command"].startswith("add-symbol-file /tmp/")
    reverted = livepatch.revert(counter.pid)
    assert set(reverted) == keys_of(livepatch.Reverted)


def test_threads_patching_in_parallel(built, patches):
    """Script threads may call apply at once: on different processes, and on one process (the
    second patch stacks on the first; the state records both)."""
    procs = [Running([str(built["counter"])]) for _ in range(3)]
    try:
        for p in procs:
            p.wait_for("value=1")
        results = {}

        def apply(key, pid, patch):
            try:
                results[key] = livepatch.apply(pid, patch)["id"]
            except livepatch.Error as err:  # pragma: no cover - reported by the assert below
                results[key] = repr(err)

        jobs = [(i, p.pid, patches["v2"]) for i, p in enumerate(procs)]
        jobs.append(("same", procs[0].pid, patches["v3"]))
        threads = [threading.Thread(target=apply, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        assert results == {0: patches["v2"].id, 1: patches["v2"].id, 2: patches["v2"].id,
                           "same": patches["v3"].id}
        stacked = [x["id"] for x in livepatch.status(procs[0].pid)[0]["patches"]]
        assert sorted(stacked) == sorted([patches["v2"].id, patches["v3"].id])
        procs[0].wait_for(f"value={2 if stacked[-1] == patches['v2'].id else 3}")
        for p in procs[1:]:
            p.wait_for("value=2")
    finally:
        for p in procs:
            p.stop()
