"""The type stubs match the runtime (mypy's stubtest) and a typed script type-checks."""

import subprocess
import sys
import textwrap

import pytest



def run_mypy(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=300)


def test_stubs_match_the_native_module():
    done = run_mypy("mypy.stubtest", "livepatch")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_script_using_the_api_type_checks(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        import livepatch
        from livepatch import core

        def patch_everywhere(lib: str, fix: str) -> list[str]:
            patch = livepatch.pack(lib, fix, None, replace={"old": "new"})
            ids: list[str] = []
            for pid in livepatch.processes_mapping(lib):
                try:
                    report = livepatch.apply(pid, patch, mode="nonstop", timeout=2.5)
                except livepatch.BusyError as err:
                    print(err)
                    continue
                ids.append(report["id"])
                stall: int = report["stats"]["stall_us"]
                print(stall)
            for record in livepatch.status():
                for p in record["patches"]:
                    print(p["id"], p["functions"][0]["old"])
            site = core.validate_site(b"\\x55\\x48\\x89\\xe5\\x31\\xc0\\x5d\\xc3", 0x1000)
            steps: list[core.Step] = list(core.plan_apply(site, site.displaced, 0x2000))
            print(steps[0].data, patch.functions[0].old_bytes)
            return ids
    """))
    done = run_mypy("mypy", "--strict", "--python-version", "3.11", str(script))
    assert done.returncode == 0, done.stdout + done.stderr

    wrong = tmp_path / "wrong.py"
    wrong.write_text("import livepatch\nlivepatch.apply('not a pid', 1)\n")
    done = run_mypy("mypy", "--strict", str(wrong))
    assert done.returncode != 0 and "apply" in done.stdout
