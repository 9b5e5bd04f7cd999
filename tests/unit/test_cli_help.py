"""The allowed values of enumerated fields are listed in the ``--help`` of the commands that
take them, read from the models (a new value shows up without touching the help text)."""

from __future__ import annotations

from typing import get_args

import pytest

from pear_mqtt.cli.main import main
from pear_mqtt.model.insight import FIELD_GROUPS, NetworkMode, SharingLevel, TrendData


def help_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks


def test_agent_help_lists_trend_directions(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of(["agent"], capsys)
    directions = list(get_args(get_args(TrendData.model_fields["direction"].annotation)[0]))
    assert directions == ["up", "down", "flat"]
    assert f"direction (trends.direction): {', '.join(directions)}" in text


@pytest.mark.parametrize("argv", [["config"], ["config", "show"], ["config", "check"]])
def test_config_help_lists_modes_and_sharing_levels(argv: list[str],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of(argv, capsys)
    assert f"mode (PEAR_MODE): {', '.join(m.value for m in NetworkMode)}" in text
    assert f"{', '.join(s.value for s in SharingLevel)}" in text
    for group in FIELD_GROUPS:
        assert f"privacy.data_sharing.{group}" in text
