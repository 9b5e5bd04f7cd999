"""Progress bars: drawn on a terminal only, and rich is loaded only then."""

from __future__ import annotations

import io
import subprocess
import sys

from pear_mqtt.cli.progress import bars


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_draw_on_a_terminal() -> None:
    out = _Terminal()
    with bars(stream=out) as b:
        assert b.drawing
        task = b.add("sending", total=10)
        b.update(task, completed=10)
    assert "sending" in out.getvalue()
    assert "10/10" in out.getvalue()


def test_bars_stay_silent_in_a_pipe() -> None:
    out = io.StringIO()
    with bars(stream=out) as b:
        assert not b.drawing
        b.update(b.add("sending", total=10), completed=10)
    assert out.getvalue() == ""


def test_the_agent_command_does_not_load_rich() -> None:
    # An edge agent runs in a pipe or a container: rich (~2.5 MB) stays unloaded.
    code = ("import sys, pear_mqtt.cli.agent; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'rich'))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == "[]"
