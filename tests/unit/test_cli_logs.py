"""``--log-format json``: one JSON object per log line, with the same fields everywhere."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from pear_mqtt.cli.logs import LOG_FORMAT_VAR, configure
from pear_mqtt.cli.main import main


def test_a_json_log_line_has_the_common_fields_and_the_extras(
        capsys: pytest.CaptureFixture[str]) -> None:
    configure(level=logging.INFO, fmt="json")
    try:
        logging.getLogger("pear_mqtt.test").warning("outbox %s full", "acme",
                                                    extra={"rows": 3})
    finally:
        configure(level=logging.WARNING, fmt="text")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["level"] == "warning" and line["logger"] == "pear_mqtt.test"
    assert line["msg"] == "outbox acme full" and line["rows"] == 3 and "T" in line["ts"]


def test_the_option_works_before_and_after_the_command() -> None:
    for argv in (["--log-format", "json", "-v", "market", "status", "--store", "/nonexistent"],
                 ["market", "status", "--store", "/nonexistent", "--log-format", "json"]):
        done = subprocess.run([sys.executable, "-m", "pear_mqtt", *argv], capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 2 and "no such file" in done.stderr, done.stderr



def test_the_format_is_handed_to_the_processes_a_command_starts(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(LOG_FORMAT_VAR, "text")  # restored after the test, whatever main sets
    try:
        assert main(["--log-format", "json", "market", "status", "--store", "/nonexistent"]) == 2
    finally:
        configure(level=logging.WARNING, fmt="text")
    capsys.readouterr()
    # What `up` starts inherits this environment: a component given no option logs JSON too.
    child = subprocess.run(
        [sys.executable, "-c", "from pear_mqtt.cli.main import build_parser; "
         "print(build_parser('agent').parse_args(['agent', '--drain-only']).log_format)"],
        capture_output=True, text=True, timeout=60, check=False)
    assert child.stdout.strip() == "json", child.stderr
