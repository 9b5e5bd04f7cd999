"""Fixtures every kind of test may use (unit and integration alike)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``tmpfs(mib)``: a new tmpfs of ``mib`` MiB, a disk to fill up (the suite runs as
    root, as CI does); unmounted at the end of the test."""
    mounted: list[Path] = []

    def mount(mib: int) -> Path:
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(mnt)],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs here (the suite runs as root): "
                        f"{res.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    try:
        yield mount
    finally:
        for mnt in mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
