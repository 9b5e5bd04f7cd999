"""Set-up on a bare machine: deploy/bootstrap.sh (what `make test` and `make up` run first) and
the Makefile targets a newcomer uses."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = ROOT / "deploy" / "bootstrap.sh"
_MISSING = "pear-no-such-package"


def _fake_bin(tmp_path: Path, **scripts: str) -> Path:
    """A directory of executables that shadow the real ones (``id``, ``sudo``, ``apt-get``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        path = bin_dir / name.replace("_", "-")
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
    return bin_dir


def _bootstrap(bin_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PEAR_NEEDS": _MISSING}
    return subprocess.run(["bash", str(BOOTSTRAP)], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_without_root_or_sudo_it_says_in_one_line_what_to_run(tmp_path: Path) -> None:
    bin_dir = _fake_bin(tmp_path, id="echo 1000", sudo="exit 1",
                        apt_get=f"touch {tmp_path}/apt-ran")
    done = _bootstrap(bin_dir)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert _MISSING in lines[0] and "sudo apt-get install" in lines[0]
    assert not (tmp_path / "apt-ran").exists()


def test_as_root_it_installs_what_is_missing(tmp_path: Path) -> None:
    log = tmp_path / "apt.log"
    bin_dir = _fake_bin(tmp_path, id="echo 0", apt_get=f'echo "$*" >> {log}',
                        systemctl="exit 0", service="exit 0")
    done = _bootstrap(bin_dir)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("update")
    assert calls[1].startswith("install") and calls[1].endswith(_MISSING)


def test_with_everything_present_it_does_nothing(tmp_path: Path) -> None:
    bin_dir = _fake_bin(tmp_path, id="echo 1000", apt_get=f"touch {tmp_path}/apt-ran",
                        mosquitto="exit 0", mosquitto_pub="exit 0")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("PEAR_NEEDS", None)
    done = subprocess.run(["bash", str(BOOTSTRAP)], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    assert not (tmp_path / "apt-ran").exists()


def _make_n(target: str) -> str:
    return subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), target],
                          capture_output=True, text=True, timeout=60, check=True).stdout


def test_make_test_and_up_install_their_system_packages_first() -> None:
    for target, runs in (("test", "pytest"), ("up", "up start"), ("integration", "pytest")):
        lines = _make_n(target).splitlines()
        setup = next(i for i, line in enumerate(lines) if "bash deploy/bootstrap.sh" in line)
        run = next(i for i, line in enumerate(lines) if runs in line)
        assert setup < run, target
    assert 'PEAR_NEEDS="chromium chromium-driver"' in _make_n("test")


def test_the_standalone_target_needs_no_broker_binary() -> None:
    plan = _make_n("test-standalone")
    assert "bootstrap.sh" not in plan
    assert "tests/unit" in plan and "test_network_embedded.py" in plan
    assert '-m "not uses_broker"' in plan


def test_without_amqtt_the_embedded_broker_says_which_extra_to_install(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    from pear_mqtt.cli.main import main
    from pear_mqtt.ops.up.local import EmbeddedBackend

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "amqtt" else real(name, *a))
    code = main(["embedded", "--mode", "consortium", "--network", "n", "--pki", "."])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "pip install 'pear-mqtt[broker]'" in err
    assert EmbeddedBackend.problem() is not None and not EmbeddedBackend.offered()
