"""Malformed configuration files and certificates, through the real entry points.

What is proven: every broken input below — truncated, mistyped, unknown-keyed, empty, binary,
deeply nested, oversized, missing, a directory or a FIFO instead of a file; PEM garbage, a key
that does not belong to the certificate, a certificate from another CA or out of its validity
window, a CA file holding a leaf — gives a :class:`~pear_mqtt.errors.PearError` subclass (or
exit status 2 from the CLI) whose message names the file or field and says what is wrong,
promptly, with no traceback and no hang. Entry points: ``NetworkConfigManager.load(file=...)``,
``pear-mqtt config check [--for-connect]``, ``pear-mqtt agent --config``,
``PearNetwork.connect`` and the bridge's ``BridgeConfigManager.load`` / ``pear-mqtt bridge
--check``. A certificate only the broker can refuse (revoked, to a node without
``tls.crl_file``) ends in a
:class:`~pear_mqtt.errors.ConnectError` within the connect timeout.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from brokers import MosquittoBroker, NetworkPKI
from faults_report import record

from pear_mqtt.bridge.config import BridgeConfigManager
from pear_mqtt.cli.main import main as cli
from pear_mqtt.config.manager import NetworkConfigManager
from pear_mqtt.config.models import NetworkConfig, TLSConfig
from pear_mqtt.errors import ConfigError, ConnectError, PearError
from pear_mqtt.node.network import PearNetwork

GOOD = ('mode = "consortium"\ncompany_id = "acme"\nnetwork_id = "testnet"\n'
        'node_id = "store-1"\nbroker_url = "mqtts://localhost:8883"\n')

# name -> (file name, content (None: a directory, b"...": raw bytes), words the error holds)
FILES: dict[str, tuple[str, str | bytes | None, tuple[str, ...]]] = {
    "truncated toml": ("c.toml", GOOD + 'node_id = "st', ("invalid TOML",)),
    "truncated json": ("c.json", '{"mode": "consortium", "company_id": ', ("invalid JSON",)),
    "wrong types": ("c.toml", GOOD.replace('"acme"', "5") + "[reliability]\nqos = 'high'\n",
                    ("company_id", "reliability.qos")),
    "unknown keys": ("c.toml", GOOD + "bogus = 1\n[tls]\nca = 'x'\n",
                     ("bogus", "unknown key", "tls.ca")),
    "top level not a table": ("c.json", "[1, 2]", ("top level",)),
    "duplicate key": ("c.json", '{"mode": "private", "mode": "public"}', ("duplicate key",)),
    "empty toml": ("c.toml", "", ("mode is required",)),
    "empty json": ("c.json", "", ("invalid JSON",)),
    "binary garbage": ("c.toml", bytes(range(256)) * 16, ("not UTF-8",)),
    "NUL in toml": ("c.toml", 'mode = "consortium\x00"\n', ("invalid TOML",)),
    "deep json": ("c.json", "[" * 100_000 + "]" * 100_000, ("nest too deeply",)),
    "deep toml": ("c.toml", "a = " + "[" * 100_000 + "]" * 100_000, ("nest too deeply",)),
    "huge number": ("c.json", '{"reliability": {"qos": ' + "9" * 5000 + "}}",
                    ("invalid JSON",)),
    "huge file": ("c.toml", "# padding\n" * 600_000, ("bytes", "limit")),
    "directory": ("c.toml", None, ("directory",)),
    "missing": ("absent.toml", "", ("not found",)),
    "wrong suffix": ("c.yaml", GOOD, ("suffix",)),
}
DEEP = {"deep json", "deep toml"}  # nesting past the parsers' recursion limit


def materialise(tmp_path: Path, case: str) -> Path:
    name, content, _ = FILES[case]
    path = tmp_path / name
    if case == "missing":
        return path
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def one_problem(text: str, path: Path | None, words: tuple[str, ...]) -> None:
    assert "Traceback" not in text, text
    if path is not None:
        assert str(path) in text, text
    for word in words:
        assert word in text, (word, text)


@pytest.mark.parametrize("case", sorted(FILES))
def test_node_config_files(case: str, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    path = materialise(tmp_path, case)
    words = FILES[case][2]
    began = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        NetworkConfigManager.load(file=path, env={})
    elapsed = time.perf_counter() - began
    named = None if case in ("empty toml", "wrong types", "unknown keys") else path
    one_problem(str(err.value), named, words)
    # the CLI: exit status 2 and the same message, no traceback
    status = cli(["config", "check", "--file", str(path)])
    out = capsys.readouterr()
    assert status == 2, out
    one_problem(out.err, named, words)
    status = cli(["agent", "--config", str(path), "--simulate", "--count", "1"])
    out = capsys.readouterr()
    assert status == 2, out
    one_problem(out.err, named, words)
    assert elapsed < 10, f"{elapsed:.1f} s to refuse {case}"
    record(f"config: node file, {case}", group="config", sent=0, delivered=0, lost=0,
           refused=1, notes=str(err.value).splitlines()[0][:120])


@pytest.mark.parametrize("case", sorted(FILES))
def test_bridge_config_files(case: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    path = materialise(tmp_path, case)
    with pytest.raises(ConfigError) as err:
        BridgeConfigManager.load(file=path, env={})
    assert "Traceback" not in str(err.value)
    status = cli(["bridge", "--config", str(path), "--check"])
    out = capsys.readouterr()
    assert status == 2 and "Traceback" not in out.err, out
    record(f"config: bridge file, {case}", group="config", sent=0, delivered=0, lost=0,
           refused=1, notes=str(err.value).splitlines()[0][:120])


@pytest.mark.parametrize("case", sorted(DEEP))
def test_bridge_config_deep_nesting(case: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        BridgeConfigManager.load(file=materialise(tmp_path, case), env={})


@pytest.mark.parametrize("entry", ["node", "bridge"])
def test_a_fifo_instead_of_a_config_file_does_not_hang(entry: str, tmp_path: Path) -> None:
    """A named pipe nobody writes to: reading it would block for ever."""
    fifo = tmp_path / "c.toml"
    os.mkfifo(fifo)
    args = (["config", "check", "--file", str(fifo)] if entry == "node"
            else ["bridge", "--config", str(fifo), "--check"])
    done = subprocess.run([sys.executable, "-m", "pear_mqtt.cli", *args],
                          capture_output=True, text=True, timeout=8)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done
    assert str(fifo) in done.stderr and "not a regular file" in done.stderr, done.stderr
    record(f"config: {entry} config is a FIFO", group="config", sent=0, delivered=0, lost=0,
           refused=1, notes=done.stderr.strip()[:120])


# -- certificates and keys ------------------------------------------------------------------

def _tls_cases(pki: NetworkPKI, tmp: Path) -> dict[str, tuple[dict[str, Path], str, str]]:
    """name -> (TLS file overrides, field the error names, what it says)."""
    garbage = tmp / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 !!\n"
                       "-----END CERTIFICATE-----\n")
    binary = tmp / "binary.pem"
    binary.write_bytes(bytes(range(256)) * 8)
    empty = tmp / "empty.pem"
    empty.write_text("")
    adir = tmp / "adir"
    adir.mkdir(exist_ok=True)
    other = pki.node("globex")
    return {
        "cert PEM garbage": ({"cert_file": garbage}, "tls.cert_file", "not a PEM certificate"),
        "cert binary": ({"cert_file": binary}, "tls.cert_file", "not a PEM certificate"),
        "cert empty": ({"cert_file": empty}, "tls.cert_file", "is empty"),
        "cert directory": ({"cert_file": adir}, "tls.cert_file", "is a directory"),
        "cert missing": ({"cert_file": tmp / "no.crt"}, "tls.cert_file", "does not exist"),
        "key PEM garbage": ({"key_file": garbage}, "tls.key_file", "not a PEM private key"),
        "key binary": ({"key_file": binary}, "tls.key_file", "not a PEM private key"),
        "key of another cert": ({"key_file": other.key}, "tls.key_file",
                                "does not belong to the certificate"),
        "cert from another CA": ({"cert_file": pki.foreign.cert, "key_file": pki.foreign.key},
                                 "tls.cert_file", "was not issued by the CA"),
        "cert expired": ({"cert_file": pki.expired.cert, "key_file": pki.expired.key},
                         "tls.cert_file", "expired on"),
        "cert not yet valid": ({"cert_file": pki.not_yet_valid.cert,
                                "key_file": pki.not_yet_valid.key},
                               "tls.cert_file", "is not valid before"),
        "CA file is a leaf": ({"ca_file": other.cert}, "tls.ca_file", "holds no CA certificate"),
        "CA file is another CA": ({"ca_file": pki.foreign_ca}, "tls.cert_file",
                                  "was not issued by the CA"),
        "CA PEM garbage": ({"ca_file": garbage}, "tls.ca_file", "not a PEM certificate"),
        "CA empty": ({"ca_file": empty}, "tls.ca_file", "is empty"),
    }


def _config(make_config: Callable[..., NetworkConfig], pki: NetworkPKI,
            overrides: dict[str, Path]) -> NetworkConfig:
    base = make_config("acme")
    good = pki.node("acme")
    tls = TLSConfig(**{"ca_file": good.ca, "cert_file": good.cert, "key_file": good.key,
                       **overrides})
    return base.model_copy(update={"tls": tls})


async def test_bad_tls_material_at_connect(make_config: Callable[..., NetworkConfig],
                                           pki: NetworkPKI, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    refused: list[str] = []
    for name, (overrides, field, words) in _tls_cases(pki, tmp_path).items():
        config = _config(make_config, pki, overrides)
        began = time.perf_counter()
        with pytest.raises(ConfigError) as err:
            await PearNetwork(config).connect(timeout=5)
        elapsed = time.perf_counter() - began
        message = str(err.value)
        assert field in message and words in message, (name, message)
        path = Path(str(overrides.get(field.split(".")[1], "")))
        assert str(path) in message or field == "tls.cert_file", (name, message)
        assert elapsed < 2, f"{name}: {elapsed:.1f} s"  # refused before any network I/O
        # the same file through `pear-mqtt config check --for-connect`
        cfile = tmp_path / f"{len(refused)}.json"
        NetworkConfigManager.save(config, cfile, include_secrets=True)
        status = cli(["config", "check", "--for-connect", "--file", str(cfile)])
        out = capsys.readouterr()
        assert status == 2 and field in out.err and words in out.err, (name, out)
        assert "Traceback" not in out.err
        refused.append(name)
    record("config: bad TLS material at connect", group="config", sent=0, delivered=0, lost=0,
           refused=len(refused), notes=f"{len(refused)} cases, each a ConfigError naming "
                                       "the field, before any network I/O")


async def test_a_certificate_only_the_broker_can_refuse(
        make_config: Callable[..., NetworkConfig], pki: NetworkPKI,
        mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture) -> None:
    """Revoked: this node holds no CRL, so the broker's refusal is the first word on it; the
    node gives up at the timeout with a ConnectError and nothing escapes into asyncio."""
    config = _config(make_config, pki, {"cert_file": pki.revoked.cert,
                                        "key_file": pki.revoked.key})
    config = config.model_copy(update={"node_id": "store-revoked"})  # the node it names
    began = time.perf_counter()
    with pytest.raises(ConnectError) as err:
        await PearNetwork(config).connect(timeout=3)
    elapsed = time.perf_counter() - began
    assert elapsed < 6 and str(mosquitto.tls_port) in str(err.value), err.value
    assert isinstance(err.value, PearError)
    unhandled = [r.getMessage() for r in caplog.get_records("call")
                 if r.name == "asyncio" and r.levelno >= logging.ERROR]
    caplog.clear()  # asserted here; the directory's teardown check would only repeat it
    record("config: revoked certificate at connect", group="config", sent=0, delivered=0,
           lost=0, refused=1, notes=f"ConnectError after {elapsed:.1f} s: "
                                    f"{str(err.value)[:80]}")
    assert unhandled == [], unhandled


def test_unreadable_files_name_the_field(make_config: Callable[..., NetworkConfig],
                                         pki: NetworkPKI, tmp_path: Path) -> None:
    """Permission denied (as root every file is readable: a directory stands in, which is
    unreadable as a file for everybody)."""
    key = tmp_path / "store.key"
    key.write_bytes(pki.node("acme").key.read_bytes())
    key.chmod(0)
    target: Any = key
    if os.geteuid() == 0:
        target = tmp_path / "as-root"
        target.mkdir()
    config = _config(make_config, pki, {"key_file": target})
    with pytest.raises(ConfigError) as err:
        NetworkConfigManager.validate(config, for_connect=True)
    message = str(err.value)
    assert "tls.key_file" in message and str(target) in message, message
    assert "permission denied" in message or "directory" in message, message
    record("config: unreadable key file", group="config", sent=0, delivered=0, lost=0,
           refused=1, notes=message.splitlines()[-1].strip()[:120])
