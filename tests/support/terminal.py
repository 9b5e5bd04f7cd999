"""Runs a command with its stderr on a pseudo-terminal, as a user at a terminal sees it."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Sequence

__all__ = ["Terminal", "terminal_env"]


def terminal_env() -> dict[str, str]:
    """The environment without ``PEAR_*`` settings, a wide terminal, output unbuffered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEAR_")}
    return {**env, "COLUMNS": "160", "TERM": "xterm", "PYTHONUNBUFFERED": "1"}


class Terminal:
    """``cmd`` with stderr on a terminal (stdout piped); read what it drew."""

    def __init__(self, cmd: Sequence[str]) -> None:
        self._leader, follower = pty.openpty()
        self.proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=follower,
                                     env=terminal_env())
        os.close(follower)
        self.drawn = ""
        self._closed = False

    def _read(self, timeout: float) -> bool:
        """Read what is there within ``timeout`` s; False once the terminal has closed."""
        if self._closed:
            return False
        ready, _, _ = select.select([self._leader], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self._leader, 65536)
        except OSError:  # the process exited and the terminal closed
            chunk = b""
        if not chunk:
            self._closed = True
            os.close(self._leader)
            return False
        self.drawn += chunk.decode("utf-8", "replace")
        return True

    def wait_for(self, pattern: str, *, timeout: float = 60.0) -> re.Match[str]:
        """Until the drawn text matches ``pattern``; AssertionError with the tail if not."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.drawn)
            if found:
                return found
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.5)):
                found = re.search(pattern, self.drawn)
                if found:
                    return found
                raise AssertionError(f"{pattern!r} never drawn; last output:\n"
                                     f"{self.drawn[-2000:]}")

    def finish(self, *, stop: bool = False, timeout: float = 60.0) -> tuple[int, str]:
        """(exit code, stdout) after the process ends (sent SIGTERM first if ``stop``)."""
        if stop:
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self._read(max(0.0, min(deadline - time.monotonic(), 0.5))):
            if time.monotonic() > deadline:
                break
        out = self.proc.communicate(timeout=timeout)[0]
        return self.proc.returncode, out.decode("utf-8", "replace")
