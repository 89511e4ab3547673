"""Real processes for the tests: compiled with gcc, started, observed through their output."""

import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import List, Optional

FIXTURES = Path(__file__).parent / "fixtures"


def gcc(out: Path, *args: str) -> Path:
    """Runs gcc; fails the test with gcc's message if it does not compile."""
    cmd = ["gcc", *args, "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
    return out


class Running:
    """A started program whose stdout lines are collected by a reader thread."""

    def __init__(self, argv: List[str], env: Optional[dict] = None):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.pid = self.proc.pid
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.seen: List[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def next_line(self, timeout: float = 5.0) -> str:
        line = self.lines.get(timeout=timeout)
        self.seen.append(line)
        return line

    def wait_for(self, text: str, timeout: float = 5.0) -> str:
        """Waits for a line equal to `text`; fails naming what the process printed instead."""
        deadline = time.monotonic() + timeout
        recent: List[str] = []
        while time.monotonic() < deadline:
            try:
                line = self.next_line(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line == text:
                return line
            recent = (recent + [line])[-5:]
        raise AssertionError(f"process {self.pid} never printed {text!r}; "
                             f"last lines {recent}, alive={self.alive()}")

    def drain(self) -> None:
        """Forgets what was printed so far."""
        while True:
            try:
                self.lines.get_nowait()
            except queue.Empty:
                return

    def only(self, text: str, count: int = 5) -> None:
        """The next `count` lines are all `text` (after draining what was printed before)."""
        self.drain()
        got = [self.next_line() for _ in range(count)]
        assert got == [text] * count, got

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def dead_pid() -> int:
    """A pid that no process has: a child that already exited and was reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    pid = child.pid
    assert not os.path.exists(f"/proc/{pid}")
    return pid
