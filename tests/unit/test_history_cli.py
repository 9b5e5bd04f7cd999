"""``pear-mqtt log verify|show`` on a log directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pear_mqtt.cli.main import main
from pear_mqtt.history.log import AppendLog


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    path = tmp_path / "outbox.sqlite.history"
    with AppendLog.open(path) as log:
        for i in range(12):
            log.append(b'{"v":1,"kind":"insights","n":%d}' % i, tag=f"pear/v1/t/{i}")
    return path


def test_verify_passes_a_sound_log_and_fails_a_tampered_one(
        log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["log", "verify", str(log_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["ok"], report["length"], report["bad_entries"]) == (True, 12, [])
    assert main(["log", "verify", str(log_dir), "--root", "00" * 32]) == 1
    assert "root differs" in capsys.readouterr().out
    entries = log_dir / "entries.bin"
    data = bytearray(entries.read_bytes())
    at = data.rindex(b'"n":11')
    data[at + 4:at + 6] = b"99"  # one entry rewritten in place
    entries.write_bytes(bytes(data))
    assert main(["log", "verify", str(log_dir)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "first: [11]" in out


def test_show_lists_entries_and_a_missing_log_is_a_clear_error(
        log_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["log", "show", str(log_dir), "--from", "3", "--to", "4", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["index"], r["kind"], r["topic"]) for r in rows] == [
        (3, "insights", "pear/v1/t/3"), (4, "insights", "pear/v1/t/4")]
    assert main(["log", "show", str(tmp_path / "nothing")]) == 2
    assert "holds no history log" in capsys.readouterr().err


def test_version_module_entry_and_verbose_after_the_command(
        log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess
    import sys

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("pear-mqtt ")
    # -v is taken after the command and its action too, not only before them
    assert main(["log", "verify", str(log_dir), "-vv"]) == 0
    done = subprocess.run([sys.executable, "-m", "pear_mqtt", "log", "show", str(log_dir),
                           "--json", "-v"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 12
