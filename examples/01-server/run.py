#!/usr/bin/env python3
"""Patch a function of a running server from Python, while a client stays connected.

Usage: python3 run.py   (needs gcc, and `pip install ./lp-py` for `import livepatch`)
"""

import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import livepatch

HERE = Path(__file__).resolve().parent


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # 1. Build the server as usual, and the fix as a relocatable object.
        subprocess.run(["gcc", "-O2", "-o", work / "server", HERE / "server.c"], check=True)
        subprocess.run(["gcc", "-O2", "-c", "-fPIC", "-o", work / "fix.o", HERE / "fix.c"],
                       check=True)

        # 2. Start the server and connect one client that stays connected.
        server = subprocess.Popen([work / "server", "0"], stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline().split()[-1])
            client = socket.create_connection(("127.0.0.1", port))
            replies = client.makefile("r")

            def ask(quantity: int) -> str:
                client.sendall(f"{quantity}\n".encode())
                return replies.readline().strip()

            before = ask(12)
            print(f"before the patch: 12 items -> {before}")

            # 3. Pack the fix against the server's binary; apply it to the running process.
            patch = livepatch.pack(work / "server", work / "fix.o", work / "fix.lpp")
            report = livepatch.apply(server.pid, patch, mode="stop", timeout=5)
            for f in report["functions"]:
                print(f"patched {f['name']}: {f['old']:#x} -> {f['new']:#x}")
            after = ask(12)
            print(f"after the patch:  12 items -> {after}   (same connection)")

            # 4. What is applied, then take it back out.
            [state] = livepatch.status(server.pid)
            print("applied:", [p["id"] for p in state["patches"]])
            livepatch.revert(server.pid, patch.id)
            reverted = ask(12)
            print(f"after revert:     12 items -> {reverted}")
        finally:
            server.kill()
            server.wait()

    if (before, after, reverted) != ("total=3000", "total=2700", "total=3000"):
        print("unexpected replies", file=sys.stderr)
        return 1
    print("example passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
