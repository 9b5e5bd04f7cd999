"""``pear-mqtt broker render --flavor emqx``: the EMQX 5 configuration and ACL come from the
same rules as mosquitto's, in EMQX's own syntax (the configuration parsed as HOCON)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pyhocon import ConfigFactory

from pear_mqtt.cli import main
from pear_mqtt.model.acl import acl_rules
from pear_mqtt.ops.emqx import acl_conf
from pear_mqtt.security import pki

pytestmark = pytest.mark.unit

# One Erlang term of EMQX's file authorization, as this renderer writes them.
_RULE = re.compile(r'\{(allow|deny), (all|\{user, "[^"]+"\}), (subscribe|publish|all), '
                   r'\["[^"]+"\]\}\.')


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ca = tmp_path_factory.mktemp("pki") / "ca"
    pki.create_ca(directory=ca, network="grp")
    pki.issue(ca_dir=ca, out_dir=ca, role="broker", member="mqtt")
    return ca


def _rules(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("%%")]


def test_the_acl_holds_every_mosquitto_rule_denials_first_and_denies_the_rest() -> None:
    revoked = [("acme", "store-9")]
    text, count = acl_conf(modes=["consortium"], network="grp", bridge_users=["bridge"],
                           monitor_users=["monitor"], revoked=revoked)
    rules = _rules(text)
    assert all(_RULE.fullmatch(r) for r in rules[:-1]), rules
    assert rules[-1] == "{deny, all}." and count == len(rules)
    source = acl_rules(mode="consortium", network="grp", bridge_users=["bridge"],
                       revoked=revoked, monitor_users=["monitor"])
    assert count - 1 == len({(r.access, r.topic, r.user) for r in source})
    denials = [i for i, r in enumerate(rules) if r.startswith("{deny, {user")]
    assert denials and max(denials) < min(i for i, r in enumerate(rules)
                                          if r.startswith("{allow"))
    # mosquitto's %u is EMQX's ${username}: a member writes only its own subtree.
    assert '{allow, all, all, ["pear/v1/consortium/grp/${username}/#"]}.' in rules
    assert '{allow, {user, "bridge"}, all, ["pear/v1/consortium/grp/aggregates/#"]}.' in rules
    assert '{allow, {user, "monitor"}, subscribe, ["$SYS/brokers/#"]}.' in rules
    assert not any("%u" in r for r in rules)


def test_cli_renders_a_configuration_emqx_can_parse(ca_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    out = tmp_path / "emqx"
    rc = main(["broker", "render", "--flavor", "emqx", "--mode", "public", "--network", "grp",
               "--pki", str(ca_dir), "--out", str(out), "--tls-port", "8884",
               "--bridge-user", "bridge", "--bind", "127.0.0.1"])
    assert rc == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert f"{out / 'acl.conf'}" in said and "deploy/EMQX.md" in said
    conf = ConfigFactory.parse_file(str(out / "emqx.conf"))
    ssl = conf["listeners"]["ssl"]["default"]
    assert ssl["bind"] == "127.0.0.1:8884"
    assert ssl["ssl_options"]["verify"] == "verify_peer"
    assert ssl["ssl_options"]["fail_if_no_peer_cert"] is True
    assert Path(ssl["ssl_options"]["cacertfile"]) == (ca_dir / "ca.crt").resolve()
    assert conf["listeners"]["tcp"]["default"]["enable"] is False
    assert conf["mqtt"]["peer_cert_as_username"] == "cn"
    assert conf["authorization"]["no_match"] == "deny"
    (source,) = conf["authorization"]["sources"]
    assert source["type"] == "file" and Path(source["path"]) == (out / "acl.conf").resolve()
    assert conf["retainer"]["backend"]["storage_type"] == "disc"
    assert "contrib/${username}/#" in (out / "acl.conf").read_text()


def test_mosquitto_only_options_are_refused_for_emqx(ca_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["broker", "render", "--flavor", "emqx", "--mode", "private", "--network", "grp",
               "--pki", str(ca_dir), "--out", str(tmp_path), "--plain-port", "1883"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--plain-port is a mosquitto setting" in err and len(err.strip().splitlines()) == 1
