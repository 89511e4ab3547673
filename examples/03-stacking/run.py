#!/usr/bin/env python3
"""Stack two patches on one function, then revert them newest first, from Python.

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

    def price(self) -> str:
        """A line printed after this call began."""
        seen, deadline = len(self.lines), time.monotonic() + 5
        while len(self.lines) < seen + 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the app stopped printing")
            time.sleep(0.01)
        return self.lines[-1]


def main() -> int:
    failures = []

    def expect(what: str, app: App, wanted: str) -> None:
        got = app.price()
        print(f"{what:<16} {got}")
        if got != wanted:
            failures.append(f"{what}: {got}, expected {wanted}")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gcc("-o", work / "app", HERE / "app.c")
        gcc("-c", "-fPIC", "-o", work / "a.o", HERE / "patch_a.c")
        gcc("-c", "-fPIC", "-o", work / "b.o", HERE / "patch_b.c")
        a = livepatch.pack(work / "app", work / "a.o", work / "a.lpp")
        b = livepatch.pack(work / "app", work / "b.o", work / "b.lpp")

        app = App(work / "app")
        try:
            expect("original", app, "price=1000")
            livepatch.apply(app.pid, a)
            expect("with A", app, "price=950")
            livepatch.apply(app.pid, b)
            expect("with A, then B", app, "price=900")
            stack = [p["id"] for p in livepatch.status(app.pid)[0]["patches"]]
            print("stack, oldest first:", stack)
            if stack != [a.id, b.id]:
                failures.append(f"stack {stack}")

            # A is under B: it cannot be taken out first, and nothing changes.
            try:
                livepatch.revert(app.pid, a.id)
                failures.append("reverting A under B was not refused")
            except livepatch.NotTopError as err:
                print(f"revert of A refused: {err}")
            expect("still A and B", app, "price=900")

            livepatch.revert(app.pid)            # the newest: B
            expect("B reverted", app, "price=950")
            livepatch.revert(app.pid, a.id)
            expect("A reverted", app, "price=1000")
        finally:
            app.proc.kill()
            app.proc.wait()

    if failures:
        print("unexpected:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    print("example passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
