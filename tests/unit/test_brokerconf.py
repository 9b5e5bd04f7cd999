"""Unit tests of pear_mqtt.ops.brokerconf: the rendered mosquitto.conf and ACL text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pear_mqtt.cli import main
from pear_mqtt.errors import ConfigError
from pear_mqtt.model.acl import acl_rules
from pear_mqtt.ops import brokerconf
from pear_mqtt.security import pki

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    ca = root / "ca"
    pki.create_ca(directory=ca, network="grp")
    b = pki.issue(ca_dir=ca, out_dir=ca, role="broker", member="mqtt")
    return {"ca_file": ca / pki.CA_CERT, "crl_file": ca / pki.CA_CRL, "cert_file": b.cert,
            "key_file": b.key, "ca_dir": ca}


def _render(material: dict[str, Path], out: Path, **kw: object) -> brokerconf.RenderedBroker:
    args: dict[str, object] = {"mode": "consortium", "network": "grp", "out_dir": out,
                               "ca_file": material["ca_file"],
                               "cert_file": material["cert_file"],
                               "key_file": material["key_file"],
                               "crl_file": material["crl_file"], "tls_port": 8883}
    args.update(kw)
    return brokerconf.render(**args)  # type: ignore[arg-type]


def _options(text: str) -> list[tuple[str, str]]:
    """(option, value) pairs of a mosquitto.conf, comments dropped."""
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            pairs.append((key, value))
    return pairs


def _listener_blocks(text: str) -> dict[str, dict[str, str]]:
    blocks: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for key, value in _options(text):
        if key == "listener":
            current = blocks.setdefault(value.split()[0], {})
        elif current is not None:
            current[key] = value
    return blocks


@pytest.mark.parametrize("mode", ["private", "consortium", "public"])
def test_every_mode_renders_a_locked_down_tls_listener(material: dict[str, Path],
                                                       tmp_path: Path, mode: str) -> None:
    r = _render(material, tmp_path, mode=mode, persistence_dir=tmp_path / "db")
    text = r.conf_path.read_text()
    assert "${" not in text and "$" not in text.replace("$$", "")
    opts = dict(_options(text))
    assert opts["per_listener_settings"] == "true"
    assert opts["persistence"] == "true"
    assert opts["persistence_location"] == f"{(tmp_path / 'db').resolve()}/"
    assert opts["check_retain_source"] == "true"
    assert opts["retain_available"] == "true"
    assert opts["set_tcp_nodelay"] == "true"
    assert opts["max_inflight_messages"] == "0"
    assert int(opts["max_queued_messages"]) >= 100_000
    assert int(opts["max_packet_size"]) > 1024 * 1024
    assert "message_size_limit" not in opts  # deprecated in mosquitto 2
    tls = _listener_blocks(text)["8883"]
    assert tls["require_certificate"] == "true"
    assert tls["use_identity_as_username"] == "true"
    assert tls["allow_anonymous"] == "false"
    assert tls["cafile"] == str(material["ca_file"].resolve())
    assert tls["crlfile"] == str(material["crl_file"].resolve())
    assert tls["certfile"] == str(material["cert_file"].resolve())
    assert tls["keyfile"] == str(material["key_file"].resolve())
    assert tls["acl_file"] == str(r.acl_path.resolve())
    assert tls["tls_version"] == "tlsv1.2"
    assert len(_listener_blocks(text)) == 1  # no plaintext listener unless asked


def test_acl_is_generated_from_topics_acl_rules(material: dict[str, Path],
                                                tmp_path: Path) -> None:
    r = _render(material, tmp_path, mode="public", bridge_users=("agg",))
    acl = r.acl_path.read_text()
    rules = acl_rules(mode="public", network="grp", bridge_users=["agg"])
    lines = [ln for ln in acl.splitlines() if ln and not ln.startswith("#")]
    patterns = [r.mosquitto() for r in rules if r.user is None]
    bridge = [r.mosquitto() for r in rules if r.user == "agg"]
    assert lines == [*patterns, "user agg", *bridge]
    assert "pattern write pear/v1/public/grp/contrib/%u/#" in lines
    assert "topic readwrite pear/v1/public/grp/aggregates/#" in lines
    # Participants get no read on contrib/ and no write on aggregates/.
    assert not any("contrib" in ln and ln.startswith("pattern read") for ln in lines)
    assert not any("aggregates" in ln and "write" in ln for ln in patterns)


def test_consortium_acl_confines_writes_to_own_subtree(material: dict[str, Path],
                                                       tmp_path: Path) -> None:
    acl = _render(material, tmp_path).acl_path.read_text()
    assert "pattern read pear/v1/consortium/grp/+/insights/#" in acl
    assert "pattern readwrite pear/v1/consortium/grp/%u/#" in acl
    assert not re.search(r"^pattern (write|readwrite) pear/v1/consortium/grp/#", acl, re.M)
    # history-log replies go only to the node that asked: nobody reads others' replies
    assert "pattern write pear/v1/consortium/grp/+/nodes/+/log/reply" in acl
    assert not re.search(r"^pattern (read|readwrite) pear/v1/consortium/grp/(#|\+/#|"
                         r"\+/nodes/\+/log/(reply|#))$", acl, re.M)


def test_acl_modes_combine_subtrees_without_duplicates(material: dict[str, Path],
                                                       tmp_path: Path) -> None:
    acl = _render(material, tmp_path, acl_modes=("private", "consortium", "public"),
                  bridge_users=("b1", "b2")).acl_path.read_text()
    assert "pattern readwrite pear/v1/private/%u/#" in acl
    assert "pattern readwrite pear/v1/consortium/grp/%u/#" in acl
    assert "pattern write pear/v1/public/grp/contrib/%u/#" in acl
    assert acl.count("user b1") == 1 and acl.count("user b2") == 1
    sections = acl.split("\n\n")
    for section in sections:  # no line repeats within a section
        lines = [ln for ln in section.splitlines() if ln and not ln.startswith("#")]
        assert len(lines) == len(set(lines))


def test_plain_listener_only_when_asked(material: dict[str, Path], tmp_path: Path) -> None:
    text = _render(material, tmp_path, plain_port=1883, bind_address="127.0.0.1",
                   run_as="root").conf_path.read_text()
    blocks = _listener_blocks(text)
    assert set(blocks) == {"1883", "8883"}
    assert blocks["1883"]["allow_anonymous"] == "true"
    assert "acl_file" not in blocks["1883"] and "require_certificate" not in blocks["1883"]
    assert "listener 8883 127.0.0.1" in text
    assert "DEVELOPMENT AND TESTS ONLY" in text
    assert dict(_options(text))["user"] == "root"


def test_limits_and_logging_are_configurable(material: dict[str, Path],
                                             tmp_path: Path) -> None:
    text = _render(material, tmp_path, max_message_bytes=4096, max_queued_messages=10,
                   persistence=False, log_file=tmp_path / "m.log",
                   log_types=("error",)).conf_path.read_text()
    opts = _options(text)
    d = dict(opts)
    assert d["max_packet_size"] == str(4096 + 64 * 1024)
    assert d["max_queued_messages"] == "10"
    assert d["persistence"] == "false"
    assert d["log_dest"] == f"file {(tmp_path / 'm.log').resolve()}"
    assert [v for k, v in opts if k == "log_type"] == ["error"]


@pytest.mark.parametrize("kw, match", [
    ({"mode": "open"}, "mode must be"),
    ({"network": "a/b"}, "must not contain"),
    ({"tls_port": 0}, "between 1 and 65535"),
    ({"plain_port": 8883}, "must differ"),
    ({"bridge_users": ("br#",)}, "wildcard"),
    ({"max_message_bytes": 10}, "at least 1024"),
    ({"bind_address": "1.2.3.4\nallow_anonymous true"}, "one word"),
    ({"max_queued_messages": -1}, "negative"),
])
def test_bad_arguments_are_config_errors(material: dict[str, Path], tmp_path: Path,
                                         kw: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _render(material, tmp_path, **kw)


def test_missing_material_and_injected_paths(material: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        _render(material, tmp_path, crl_file=tmp_path / "none.crl")
    weird = tmp_path / "evil\nallow_anonymous true"
    weird.mkdir()
    with pytest.raises(ConfigError, match="line break"):
        _render(material, weird)


def test_cli_render(material: dict[str, Path], tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["broker", "render", "--mode", "private", "--network", "grp",
               "--pki", str(material["ca_dir"]), "--out", str(out), "--tls-port", "9999",
               "--bridge-user", "bridge"])
    assert rc == 0, capsys.readouterr().err
    text = (out / "mosquitto.conf").read_text()
    assert "listener 9999" in text
    assert "user bridge" in (out / "acl").read_text()
    assert f"mosquitto -c {out / 'mosquitto.conf'}" in capsys.readouterr().out
    assert main(["broker", "render", "--mode", "private", "--network", "grp",
                 "--pki", str(tmp_path), "--out", str(out)]) == 2
    assert "broker-*.crt" in capsys.readouterr().err


def _acl_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln and not ln.startswith("#")]


def test_revoked_nodes_get_a_user_section_of_deny_lines(material: dict[str, Path],
                                                        tmp_path: Path) -> None:
    r = _render(material, tmp_path, acl_modes=("private",), bridge_users=("agg",),
                revoked=[("acme", "store-9"), ("acme", "store-9"), ("globex", "s2")])
    assert r.revoked == (("acme", "store-9"), ("globex", "s2"))
    lines = _acl_lines(r.acl_path.read_text())
    base = _acl_lines(brokerconf.acl_text(modes=["consortium", "private"], network="grp",
                                          bridge_users=["agg"]))
    root = "pear/v1/consortium/grp"
    assert lines == [*base,
                     "user acme",
                     f"topic deny {root}/acme/state/store-9/#",
                     f"topic deny {root}/acme/nodes/store-9",
                     f"topic deny {root}/acme/nodes/store-9/sync",
                     f"topic deny {root}/acme/nodes/store-9/checkpoint/#",
                     "topic deny pear/v1/private/acme/state/store-9/#",
                     "topic deny pear/v1/private/acme/nodes/store-9",
                     "topic deny pear/v1/private/acme/nodes/store-9/sync",
                     "topic deny pear/v1/private/acme/nodes/store-9/checkpoint/#",
                     "user globex",
                     f"topic deny {root}/globex/state/s2/#",
                     f"topic deny {root}/globex/nodes/s2",
                     f"topic deny {root}/globex/nodes/s2/sync",
                     f"topic deny {root}/globex/nodes/s2/checkpoint/#",
                     "topic deny pear/v1/private/globex/state/s2/#",
                     "topic deny pear/v1/private/globex/nodes/s2",
                     "topic deny pear/v1/private/globex/nodes/s2/sync",
                     "topic deny pear/v1/private/globex/nodes/s2/checkpoint/#"]


def test_deny_lines_lead_a_bridge_users_section() -> None:
    # A member name that is also a bridge user (pki refuses that; a hand-made list may not):
    # one section, deny first.
    lines = _acl_lines(brokerconf.acl_text(modes=["consortium"], network="grp",
                                           bridge_users=["br"], revoked=[("br", "n1")]))
    section = lines[lines.index("user br") + 1:]
    # then its grants: read the network, write the consortium's aggregates and receipts,
    # and the scale-out partials
    assert [ln.split()[1] for ln in section] == ["deny"] * 4 + ["read"] + ["readwrite"] * 3
    assert section[-3:] == ["topic readwrite pear/v1/consortium/grp/aggregates/#",
                            "topic readwrite pear/v1/consortium/grp/state/bridge/receipts/#",
                            "topic readwrite pear/v1/consortium/grp/state/bridge/partials/#"]
    assert lines.count("user br") == 1


def test_revoked_nodes_default_to_the_ca_registry(material: dict[str, Path],
                                                  tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    pki.create_ca(directory=ca, network="grp")
    b = pki.issue(ca_dir=ca, out_dir=ca, role="broker", member="mqtt")
    s9 = pki.issue(ca_dir=ca, out_dir=tmp_path / "n", role="node", member="acme", node="s9")
    pki.issue(ca_dir=ca, out_dir=tmp_path / "n", role="node", member="acme", node="s1")
    files = {"ca_file": ca / pki.CA_CERT, "crl_file": ca / pki.CA_CRL, "cert_file": b.cert,
             "key_file": b.key}
    assert _render(material, tmp_path / "a", ca_dir=ca, **files).revoked == ()
    pki.revoke(ca_dir=ca, cert=s9.cert)
    r = _render(material, tmp_path / "b", ca_dir=ca, **files)
    assert r.revoked == (("acme", "s9"),)
    acl = r.acl_path.read_text()
    assert "user acme\ntopic deny pear/v1/consortium/grp/acme/state/s9/#\n" in acl
    assert "s1" not in acl
    # An explicit list wins over the registry; without ca_dir nothing is read.
    assert _render(material, tmp_path / "c", ca_dir=ca, revoked=[], **files).revoked == ()
    assert _render(material, tmp_path / "d", **files).revoked == ()
    with pytest.raises(ConfigError, match="registry"):
        _render(material, tmp_path / "e", ca_dir=tmp_path / "nowhere", **files)
    with pytest.raises(ConfigError, match="wildcard"):
        _render(material, tmp_path / "f", revoked=[("acme", "#")], **files)


def test_cli_render_denies_revoked_nodes(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    ca, out = tmp_path / "ca", tmp_path / "out"
    pki.create_ca(directory=ca, network="grp")
    pki.issue(ca_dir=ca, out_dir=ca, role="broker", member="mqtt")
    s9 = pki.issue(ca_dir=ca, out_dir=tmp_path / "n", role="node", member="acme", node="s9")
    assert main(["pki", "revoke", "--dir", str(ca), "--cert", str(s9.cert)]) == 0
    assert "broker render" in capsys.readouterr().out  # the revoke tells what comes next
    args = ["broker", "render", "--mode", "consortium", "--network", "grp", "--pki", str(ca),
            "--out", str(out)]
    assert main([*args, "--revoked-node", "globex/s2"]) == 0
    captured = capsys.readouterr()
    assert "revoked nodes: acme/s9, globex/s2" in captured.out
    acl = (out / "acl").read_text()
    assert "topic deny pear/v1/consortium/grp/acme/state/s9/#" in acl
    assert "topic deny pear/v1/consortium/grp/globex/state/s2/#" in acl
    assert main([*args, "--revoked-node", "globex"]) == 2
    assert "MEMBER/NODE" in capsys.readouterr().err

    # A --pki without the registry (a broker host with ca.crt and ca.crl only) says so.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in (pki.CA_CERT, pki.CA_CRL, "broker-mqtt.crt", "broker-mqtt.key"):
        (bare / name).write_bytes((ca / name).read_bytes())
    assert main(["broker", "render", "--mode", "consortium", "--network", "grp",
                 "--pki", str(bare), "--out", str(tmp_path / "out2")]) == 0
    captured = capsys.readouterr()
    assert "revoked nodes: none" in captured.out and pki.REGISTRY in captured.err
