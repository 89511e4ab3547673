#!/usr/bin/env python3
"""Patch a shared library in every process that maps it, with livepatch.processes_mapping.

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


class Client:
    """A running client; a reader thread keeps the lines it prints."""

    def __init__(self, exe: Path):
        self.proc = subprocess.Popen([exe], stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(map(str.strip, self.proc.stdout)),
                         daemon=True).start()

    def latest(self) -> str:
        """A line printed after this call began (waits for the next two lines)."""
        seen, deadline = len(self.lines), time.monotonic() + 5
        while len(self.lines) < seen + 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"client {self.pid} stopped printing")
            time.sleep(0.01)
        return self.lines[-1]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lib = work / "libgreet.so"
        gcc("-shared", "-fPIC", "-o", lib, HERE / "libgreet.c")
        gcc("-o", work / "client", HERE / "client.c", f"-L{work}", "-lgreet",
            f"-Wl,-rpath,{work}")
        gcc("-c", "-fPIC", "-o", work / "fix.o", HERE / "fix.c")

        clients = [Client(work / "client") for _ in range(3)]
        try:
            print("before:  ", [c.latest() for c in clients])

            patch = livepatch.pack(lib, work / "fix.o", work / "fix.lpp")
            users = livepatch.processes_mapping(lib)
            print(f"{len(users)} processes map {lib.name}: {sorted(users)}")
            for pid in users:
                try:
                    livepatch.apply(pid, patch)
                except livepatch.BusyError as err:    # a real fleet script would retry later
                    print(f"process {pid} skipped: {err}")
            after = [c.latest() for c in clients]
            print("after:   ", after)

            for pid in users:
                livepatch.revert(pid, patch.id)
            reverted = [c.latest() for c in clients]
            print("reverted:", reverted)
        finally:
            for c in clients:
                c.stop()

    ok = (sorted(users) == sorted(c.pid for c in clients)
          and after == ["hello, world"] * 3 and reverted == ["helo, world"] * 3)
    if not ok:
        print("unexpected output", file=sys.stderr)
        return 1
    print("example passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
