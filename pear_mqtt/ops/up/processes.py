"""The processes ``pear-mqtt up`` runs itself: spawn detached, tell alive, signal, stop, tail."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import psutil

from ...errors import BrokerError
from .state import Proc, UpState, now_iso

__all__ = ["TAIL_LINES", "alive", "print_logs", "spawn", "start_time", "stop_groups", "tail"]

TAIL_LINES: Final = 20
# Start times closer than this are one process (the kernel counts them in clock ticks).
_SAME_START = 0.05

# Popen objects of the detached children by pid, kept referenced so the interpreter neither
# warns about them nor reaps them behind `alive`'s back while this command runs.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _since_boot(process: psutil.Process) -> float:
    # create_time() is boot time + the process's start after boot; boot time moves with the
    # wall clock (NTP steps), the start after boot never does.
    return round(process.create_time() - psutil.boot_time(), 2)


def start_time(pid: int) -> float | None:
    """When process ``pid`` started, in seconds after boot; None if there is no such process."""
    try:
        return _since_boot(psutil.Process(pid))
    except psutil.Error:
        return None


def alive(proc: Proc) -> bool:
    """Whether the recorded process still runs (and is the same process, not a reused pid)."""
    pid = proc.pid
    if pid is None:
        return False
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        # Our own child (start and status in one interpreter): reaped now, so gone.
        return False
    try:
        process = psutil.Process(pid)
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False
        started = _since_boot(process)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # exists, owned by someone else
    return proc.start_time is None or abs(started - proc.start_time) < _SAME_START


def _signal(proc: Proc, sig: signal.Signals) -> None:
    if proc.pid is None or not alive(proc):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # `spawn` made each process the leader of its own session, so its group holds it and
        # anything it forked, and nothing else.
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Children run `python -m pear_mqtt.cli`: make it this very pear_mqtt, installed or not.
    root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def spawn(argv: Sequence[str], *, log: Path, cwd: Path) -> Proc:
    """Start ``argv`` detached, its output appended to ``log`` after a header line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        offset = out.tell()
        out.write(f"--- {now_iso()} pear-mqtt up: {' '.join(argv)}\n".encode())
        out.flush()
        try:
            child = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=cwd, env=_child_env(),
                # Detached: outlives this command, and a Ctrl-C in the terminal that ran
                # `make up` does not reach it.
                start_new_session=True)
        except OSError as exc:
            raise BrokerError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    _CHILDREN[child.pid] = child
    return Proc(pid=child.pid, start_time=start_time(child.pid), argv=list(argv),
                log=str(log), log_offset=offset)


def stop_groups(groups: Sequence[Sequence[tuple[str, Proc]]], *, grace: float,
                out: Callable[[str], None]) -> list[str]:
    """SIGTERM each group in turn, SIGKILL what outlives ``grace``; the components that could
    not be stopped. A stopped process's pid is cleared."""
    stuck: list[str] = []
    for group in groups:
        running = [(name, p) for name, p in group if alive(p)]
        for _, p in running:
            _signal(p, signal.SIGTERM)
        end = time.monotonic() + grace
        while any(alive(p) for _, p in running) and time.monotonic() < end:
            time.sleep(0.02)  # poll for exit
        for name, p in running:
            if alive(p):
                out(f"{name} (pid {p.pid}) ignored SIGTERM for {grace:.0f}s; SIGKILL")
                _signal(p, signal.SIGKILL)
        end = time.monotonic() + 5
        while any(alive(p) for _, p in running) and time.monotonic() < end:
            time.sleep(0.02)
        for name, p in running:
            if alive(p):
                stuck.append(f"{name} (pid {p.pid})")
            else:
                out(f"stopped {name} (pid {p.pid})")
        for _, p in group:
            if not alive(p):  # a process that would not die stays recorded for the next try
                p.pid = None
                p.start_time = None
    return stuck


def tail(path: Path | str, lines: int = TAIL_LINES, *, since: int = 0) -> str:
    """The last ``lines`` lines of the log at ``path``, ignoring the first ``since`` bytes."""
    try:
        with Path(path).open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(since if since <= size else 0, size - 64 * 1024))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(no log: {exc.strerror or exc})\n"
    text = "\n".join(data.splitlines()[-lines:])
    return text + "\n" if text else "(empty)\n"


def _log_files(directory: Path, state: UpState | None) -> list[Path]:
    """The logs of the recorded topology (older runs may have left others), else all."""
    if state is not None:
        recorded = sorted({Path(p.log) for _, p in state.processes()})
        if any(path.is_file() for path in recorded):
            return [path for path in recorded if path.is_file()]
    return sorted((directory / "logs").glob("*.log"))


def print_logs(*, directory: Path, state: UpState | None, lines: int, follow: bool,
               out: Callable[[str], None]) -> bool:
    """Print the tail of every log file; with ``follow`` keep printing new lines until
    Ctrl-C. False when there is no log at all."""
    files = _log_files(directory, state)
    if not files:
        out(f"no logs in {directory / 'logs'} (run `pear-mqtt up start`)")
        return False
    offsets: dict[Path, int] = {}
    for path in files:
        out(f"==> {path} <==")
        out(tail(path, lines).rstrip("\n"))
        offsets[path] = path.stat().st_size
    if not follow:
        return True
    try:
        while True:
            time.sleep(0.5)  # tail -f: poll the files for growth
            for path in _log_files(directory, state):
                size = path.stat().st_size
                start_at = offsets.get(path, 0)
                if size < start_at:
                    start_at = 0  # truncated or replaced
                if size > start_at:
                    with path.open("rb") as fh:
                        fh.seek(start_at)
                        chunk = fh.read(size - start_at).decode("utf-8", errors="replace")
                    for line in chunk.splitlines():
                        out(f"{path.stem}: {line}")
                offsets[path] = size
    except KeyboardInterrupt:
        return True
