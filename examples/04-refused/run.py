#!/usr/bin/env python3
"""Three patches that livepatch refuses, and why — the process is left exactly as it was.

Usage: python3 run.py   (needs gcc, and `pip install ./lp-py` for `import livepatch`)
"""

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import livepatch

HERE = Path(__file__).resolve().parent


def gcc(*args) -> None:
    subprocess.run(["gcc", "-O2", *map(str, args)], check=True)


class App:
    """The running app; a reader thread keeps the lines it prints."""

    def __init__(self, exe: Path):
        self.proc = subprocess.Popen([exe], stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(map(str.strip, self.proc.stdout)),
                         daemon=True).start()

    def latest(self) -> str:
        """A line printed after this call began."""
        seen, deadline = len(self.lines), time.monotonic() + 5
        while len(self.lines) < seen + 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the app stopped printing")
            time.sleep(0.01)
        return self.lines[-1]


def main() -> int:
    failures = []

    def refused(title: str, app: App, patch: livepatch.Patch, expected: type, **opts) -> None:
        before = app.latest()
        print(f"\n== {title}")
        try:
            livepatch.apply(app.pid, patch, **opts)
            failures.append(f"{title}: applied, expected {expected.__name__}")
            return
        except livepatch.Error as err:
            print(f"refused with {type(err).__name__}: {err}")
            if not isinstance(err, expected):
                failures.append(f"{title}: {type(err).__name__}, expected {expected.__name__}")
        after = app.latest()
        applied = livepatch.status(app.pid)[0]["patches"]
        print(f"the process still prints {after!r}; patches applied: {len(applied)}")
        if after != before or applied:
            failures.append(f"{title}: the process changed")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "build1").mkdir()
        (work / "build2").mkdir()
        gcc("-DBUILD=1", "-o", work / "build1" / "app", HERE / "app.c")
        gcc("-DBUILD=2", "-o", work / "build2" / "app", HERE / "app.c")
        for fix in ("fix_checksum", "fix_worker", "fix_feature"):
            gcc("-c", "-fPIC", "-o", work / f"{fix}.o", HERE / f"{fix}.c")

        # Build 2 runs; the checksum fix was packed against build 1.
        app = App(work / "build2" / "app")
        try:
            print("running:", app.latest())
            for_build1 = livepatch.pack(work / "build1" / "app", work / "fix_checksum.o", None)
            refused("1. a patch made for another build of the program", app, for_build1,
                    livepatch.MismatchError)

            worker = livepatch.pack(work / "build2" / "app", work / "fix_worker.o", None)
            refused("2. a function that is always running (stop mode, 1 s timeout)", app,
                    worker, livepatch.BusyError, timeout=1.0)

            feature = livepatch.pack(work / "build2" / "app", work / "fix_feature.o", None)
            refused("3. a function too short to hold the jump", app, feature,
                    livepatch.RefusedError)
        finally:
            app.proc.kill()
            app.proc.wait()

    if failures:
        print("unexpected:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    print("\nexample passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
