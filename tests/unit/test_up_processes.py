"""``pear-mqtt up``'s process records: what tells a running process from a gone or recycled one,
an ``up.json`` written before psutil still loads, and the free ports it hands out."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from pear_mqtt.ops.up.processes import alive, spawn, start_time
from pear_mqtt.ops.up.state import Proc, load_state

pytestmark = pytest.mark.unit


def test_a_running_process_is_alive_only_with_its_own_start_time() -> None:
    me = os.getpid()
    started = start_time(me)
    assert started is not None
    assert alive(Proc(pid=me, start_time=started, argv=[], log=""))
    # The same pid with another start time is another process that got the pid recycled.
    assert not alive(Proc(pid=me, start_time=started + 1, argv=[], log=""))
    # Without a start time (a record from an older version) the pid decides alone.
    assert alive(Proc(pid=me, start_time=None, argv=[], log=""))
    assert not alive(Proc(pid=None, start_time=None, argv=[], log=""))


def test_a_spawned_child_that_exited_is_gone(tmp_path: Path) -> None:
    proc = spawn([sys.executable, "-c", "pass"], log=tmp_path / "child.log", cwd=tmp_path)
    assert proc.start_time is not None
    # Our own child: alive() reaps it once it exits rather than counting the zombie.
    deadline = time.monotonic() + 30
    while alive(proc) and time.monotonic() < deadline:
        time.sleep(0.02)  # a process's exit is no message: polled, with a deadline
    assert not alive(proc)
    assert (tmp_path / "child.log").read_text().startswith("--- ")


def test_state_written_before_psutil_loads(tmp_path: Path) -> None:
    proc = {"pid": 4242, "start_ticks": 123456, "argv": ["mosquitto"], "log": "x.log",
            "log_offset": 0, "container": None}
    broker = {"name": "private", "mode": "private", "network": "n", "host": "127.0.0.1",
              "port": 1, "url": "mqtts://127.0.0.1:1", "ca_dir": "c", "ca": "c", "crl": "c",
              "cert": "c", "key": "k", "conf": None, "probe_node": "p", "proc": proc}
    (tmp_path / "up.json").write_text(json.dumps({
        "version": 1, "state": "up", "backend": "local", "dir": str(tmp_path),
        "brokers": [broker], "nodes": [], "agents": []}))
    state = load_state(tmp_path)
    assert state is not None
    assert state.brokers[0].proc == Proc(pid=4242, start_time=None, argv=["mosquitto"],
                                         log="x.log")


def test_free_ports_handed_out_by_one_process_are_all_different() -> None:
    from pear_mqtt.ops.up.health import free_port

    # 1,500 picks from a range of 20,000 would repeat some port almost surely if picked at
    # random alone; a start picks a dozen before any of them is bound.
    ports = [free_port() for _ in range(1500)]
    assert len(set(ports)) == len(ports)
