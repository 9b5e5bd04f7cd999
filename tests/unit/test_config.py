"""NetworkConfigManager: mode defaults, validation, warnings, loading, saving, CLI."""

from __future__ import annotations

import base64
import itertools
import json
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from pear_mqtt.cli import main
from pear_mqtt.config.manager import NetworkConfigManager
from pear_mqtt.config.models import (
    EncryptionConfig,
    NetworkConfig,
    PrivacyConfig,
    ReliabilityConfig,
    TLSConfig,
    default_sharing,
)
from pear_mqtt.errors import ConfigError, TopicError
from pear_mqtt.model.insight import NetworkMode, SharingLevel
from pear_mqtt.model.topics import validate_identifier
from pear_mqtt.security import pki as pkimod

pytestmark = pytest.mark.unit

M = NetworkConfigManager
KEY32 = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    # load() reads os.environ by default; a developer's PEAR_* must not leak into tests.
    for name in list(os.environ):
        if name.upper().startswith("PEAR_"):
            monkeypatch.delenv(name)


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, Path]:
    """Real TLS material: validate(for_connect=True) parses it (CA, issuer, validity, key)."""
    return real_tls_files(tmp_path)


def real_tls_files(tmp_path: Path) -> dict[str, Path]:
    pkimod.create_ca(directory=tmp_path / "ca", network="retail")
    certs = pkimod.issue(ca_dir=tmp_path / "ca", out_dir=tmp_path / "certs", role="node",
                         member="acme", node="store-1")
    return {"ca_file": certs.ca, "cert_file": certs.cert, "key_file": certs.key}


def _tls(pem: dict[str, Path]) -> TLSConfig:
    return TLSConfig(**pem)


def _raises(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# -- the seed's usage example and mode defaults -------------------------------------------

def test_seed_usage_example_constructs_as_written() -> None:
    config = NetworkConfig(
        mode=NetworkMode.PRIVATE,
        company_id="example_company",
        privacy=PrivacyConfig(
            anonymize_data=True,
            encrypt_connection=True,
            data_sharing={
                "price_data": "ranges_only",
                "sales_data": "aggregated",
                "trends": "full"
            }
        )
    )
    assert M.validate(config) is config
    assert M.effective_sharing(config) == {
        "price_data": SharingLevel.RANGES_ONLY,
        "sales_data": SharingLevel.AGGREGATED,
        "trends": SharingLevel.FULL,
    }


@pytest.mark.parametrize(("mode", "levels", "anonymize"), [
    ("private", ("full", "full", "full"), False),
    ("consortium", ("ranges_only", "aggregated", "full"), True),
    ("public", ("aggregated", "aggregated", "aggregated"), True),
])
def test_default_config_per_mode(mode: str, levels: tuple[str, ...], anonymize: bool) -> None:
    config = M.default_config(mode, company_id="acme")
    assert config.mode is NetworkMode(mode)
    assert config.company_id == "acme"
    assert config.broker_url == "mqtts://localhost:8883"
    assert config.privacy.encrypt_connection is True
    assert config.privacy.anonymize_data is anonymize
    # Levels come from default_sharing through sharing_level, not copied into the model.
    assert config.privacy.data_sharing == {}
    effective = M.effective_sharing(config)
    assert tuple(v.value for v in effective.values()) == levels
    assert effective == default_sharing(NetworkMode(mode))


def test_default_config_overrides_merge_into_mode_defaults() -> None:
    config = M.default_config(NetworkMode.CONSORTIUM, company_id="acme", network_id="grocers",
                              privacy={"min_companies": 7})
    assert config.network_id == "grocers"
    assert config.privacy.min_companies == 7
    assert config.privacy.anonymize_data is True  # the mode default survives the override


def test_default_config_rejects_unknown_mode() -> None:
    assert "mode: 'galactic' is not a network mode" in _raises(
        M.default_config, "galactic", company_id="acme")


def test_public_full_sharing_names_field_and_keeps_cause() -> None:
    with pytest.raises(ConfigError) as info:
        M.default_config("public", company_id="acme",
                         privacy={"data_sharing": {"price_data": "full"}})
    assert "privacy.data_sharing.price_data: 'full' is not allowed in public mode" in str(
        info.value)
    assert isinstance(info.value.__cause__, ValidationError)


def test_model_errors_list_every_failing_field() -> None:
    msg = _raises(M.default_config, "private", company_id="a/b",
                  reliability={"qos": 2, "keepalive": 1})
    assert "  - company_id 'a/b' must not contain '/'" in msg
    assert "reliability.qos: Input should be 0 or 1 (got 2)" in msg
    assert "reliability.keepalive: " in msg


def test_secret_values_never_appear_in_errors() -> None:
    msg = _raises(M.default_config, "private", company_id="acme",
                  encryption={"keys": {"k1": ["not", "a", "string", "hunter2"]}})
    assert "encryption.keys.k1" in msg
    assert "hunter2" not in msg


# -- validate: combination checks -----------------------------------------------------------

def test_for_connect_lists_exactly_the_missing_tls_paths(pem: dict[str, Path]) -> None:
    config = M.default_config("consortium", company_id="acme",
                              tls=TLSConfig(ca_file=pem["ca_file"]))
    M.validate(config)  # fine until it has to connect
    msg = _raises(M.validate, config, for_connect=True)
    assert "tls.cert_file, tls.key_file are required to connect to a consortium network" in msg
    assert "tls.ca_file," not in msg


def test_for_connect_private_needs_tls_even_on_insecure_transport() -> None:
    config = M.default_config("private", company_id="acme", broker_url="mqtt://localhost:1883",
                              allow_insecure_transport=True)
    msg = _raises(M.validate, config, for_connect=True)
    assert "tls.ca_file, tls.cert_file, tls.key_file are required to connect to a private " \
        "network" in msg


def test_for_connect_public(pem: dict[str, Path]) -> None:
    plain = M.default_config("public", company_id="acme", broker_url="mqtt://localhost:1883",
                             privacy={"encrypt_connection": False})
    assert M.validate(plain, for_connect=True) is plain
    tls = M.default_config("public", company_id="acme")
    msg = _raises(M.validate, tls, for_connect=True)
    assert "required to connect to a public network over mqtts://" in msg
    ok = M.default_config("public", company_id="acme", tls=_tls(pem))
    assert M.validate(ok, for_connect=True) is ok


def test_for_connect_passes_with_readable_files(pem: dict[str, Path]) -> None:
    config = M.default_config("consortium", company_id="acme", tls=_tls(pem))
    assert M.validate(config, for_connect=True) is config


def test_for_connect_names_missing_files(pem: dict[str, Path], tmp_path: Path) -> None:
    gone = tmp_path / "gone.pem"
    config = M.default_config("private", company_id="acme",
                              tls=TLSConfig(**{**pem, "cert_file": gone}))
    msg = _raises(M.validate, config, for_connect=True)
    assert f"tls.cert_file: {gone} does not exist" in msg
    assert "tls.ca_file" not in msg and "tls.key_file" not in msg
    no_crl = M.default_config("private", company_id="acme",
                              tls=TLSConfig(**pem, crl_file=gone))
    assert f"tls.crl_file: {gone} does not exist" in _raises(M.validate, no_crl,
                                                             for_connect=True)


def test_for_connect_names_unreadable_files(pem: dict[str, Path], tmp_path: Path) -> None:
    directory = tmp_path / "adir"
    directory.mkdir()
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    config = M.default_config("private", company_id="acme",
                              tls=TLSConfig(ca_file=directory, cert_file=empty,
                                            key_file=pem["key_file"]))
    msg = _raises(M.validate, config, for_connect=True)
    assert f"tls.ca_file: {directory} is a directory" in msg
    assert f"tls.cert_file: {empty} is empty" in msg


def test_for_connect_permission_denied(pem: dict[str, Path],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Root reads any file regardless of its mode, so deny the read where validate makes it.
    real_open = Path.open
    key = pem["key_file"]

    def deny(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == key:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)
    config = M.default_config("consortium", company_id="acme", tls=_tls(pem))
    msg = _raises(M.validate, config, for_connect=True)
    assert f"tls.key_file: {key} is not readable (permission denied)" in msg


def test_for_connect_checks_aggregator_key_file(pem: dict[str, Path], tmp_path: Path) -> None:
    config = M.default_config("consortium", company_id="acme", tls=_tls(pem),
                              privacy={"aggregator_key_file": tmp_path / "agg.pem"})
    assert "privacy.aggregator_key_file: " in _raises(M.validate, config, for_connect=True)


@pytest.mark.parametrize(("raw", "expect"), [
    (base64.b64encode(bytes(16)).decode(), "decodes to 16 bytes"),
    ("not base64 at all!", "not valid base64"),
    (base64.b64encode(bytes(33)).decode(), "decodes to 33 bytes"),
])
def test_group_key_must_be_32_bytes(raw: str, expect: str) -> None:
    config = NetworkConfig(mode="consortium", company_id="acme",
                           encryption=EncryptionConfig(keys={"k2024": SecretStr(raw)},
                                                       active="k2024"))
    msg = _raises(M.validate, config)
    assert f"encryption.keys.k2024: {expect}" in msg
    assert raw not in msg


@pytest.mark.parametrize("raw", [
    KEY32,
    KEY32.rstrip("="),
    base64.urlsafe_b64encode(bytes(range(200, 232))).decode(),
])
def test_group_key_encodings_accepted(raw: str) -> None:
    config = NetworkConfig(mode="consortium", company_id="acme",
                           encryption=EncryptionConfig(keys={"k1": SecretStr(raw)}, active="k1"))
    assert M.validate(config) is config


def test_reconnect_delays_ordered() -> None:
    config = NetworkConfig(mode="private", company_id="acme",
                           reliability=ReliabilityConfig(reconnect_min_delay=90,
                                                         reconnect_max_delay=10))
    msg = _raises(M.validate, config)
    assert "reliability.reconnect_min_delay (90.0) must not exceed " \
        "reliability.reconnect_max_delay (10.0)" in msg


def test_range_edges_too_fine() -> None:
    config = NetworkConfig(mode="consortium", company_id="acme",
                           privacy=PrivacyConfig(range_edges={"grocery/milk": (1.0, 1.001, 2.0)}))
    assert "privacy.range_edges.grocery/milk: bucket [1.0, 1.001)" in _raises(M.validate, config)
    ok = NetworkConfig(mode="consortium", company_id="acme",
                       privacy=PrivacyConfig(range_edges={"grocery/milk": (-1.0, 0.0, 1.0, 2.0)}))
    assert M.validate(ok) is ok


def test_range_edges_not_ascending_is_a_model_error() -> None:
    msg = _raises(M.default_config, "consortium", company_id="acme",
                  privacy={"range_edges": {"grocery": [2.0, 1.0]}})
    assert "privacy.range_edges: range_edges['grocery'] must hold" in msg


def test_validate_reports_every_problem_at_once() -> None:
    config = NetworkConfig(mode="consortium", company_id="acme",
                           encryption=EncryptionConfig(keys={"k1": SecretStr("AAAA")}),
                           reliability=ReliabilityConfig(reconnect_min_delay=9,
                                                         reconnect_max_delay=1))
    msg = _raises(M.validate, config, for_connect=True)
    assert "encryption.keys.k1" in msg
    assert "reliability.reconnect_min_delay" in msg
    assert "tls.ca_file, tls.cert_file, tls.key_file are required" in msg


def test_encryption_active_must_be_known() -> None:
    msg = _raises(M.default_config, "consortium", company_id="acme",
                  encryption={"active": "k9"})
    assert "encryption: active key id 'k9' is not among keys" in msg


# -- warnings --------------------------------------------------------------------------------

def _has(warnings: list[str], needle: str) -> bool:
    return any(needle in w for w in warnings)


def test_pseudonym_secret_is_refused_in_one_line_saying_what_to_do(tmp_path: Path) -> None:
    """Pseudonyms come from certificates now: a config still holding the old shared secret
    (which let every member compute every pseudonym) is refused in every layer."""
    secret = "a-long-pseudonym-secret-0123456789"
    file = tmp_path / "old.toml"
    file.write_text(f'mode = "consortium"\ncompany_id = "acme"\n'
                    f'[privacy]\npseudonym_secret = "{secret}"\n')
    messages = [
        _raises(M.load, file=file, env={}),
        _raises(M.load, env={"PEAR_MODE": "consortium", "PEAR_COMPANY_ID": "acme",
                             "PEAR_PRIVACY__PSEUDONYM_SECRET": secret}),
        _raises(M.load, env={}, mode="consortium", company_id="acme",
                privacy={"pseudonym_secret": secret}),
        _raises(M.default_config, "consortium", company_id="acme",
                privacy={"pseudonym_secret": secret}),
    ]
    for msg in messages:
        assert "\n" not in msg, msg
        assert "no longer used" in msg and "pki enrol" in msg and "node_id" in msg, msg
        assert secret not in msg
    assert messages[0].startswith(f"{file}: privacy.pseudonym_secret ")
    assert messages[1].startswith("environment: PEAR_PRIVACY__PSEUDONYM_SECRET ")
    with pytest.raises(ConfigError, match="pki enrol"):
        PrivacyConfig(pseudonym_secret=secret)  # type: ignore[call-arg]
    assert not _has(M.warnings(M.default_config("consortium", company_id="acme")),
                    "pseudonym")


def test_warnings_consortium_without_active_group_key() -> None:
    config = M.default_config("consortium", company_id="acme")
    assert _has(M.warnings(config), "encryption.active is not set")
    keyed = M.default_config("consortium", company_id="acme",
                             encryption={"keys": {"k1": KEY32}, "active": "k1"})
    assert not _has(M.warnings(keyed), "encryption.active")


def test_warnings_aggregated_without_aggregator_key(tmp_path: Path) -> None:
    config = M.default_config("public", company_id="acme")
    warning = next(w for w in M.warnings(config) if "aggregator_key_file" in w)
    assert "aggregated groups will not leave the node" in warning
    assert "price_data, sales_data, trends" in warning
    private = M.default_config("private", company_id="acme")
    assert not _has(M.warnings(private), "aggregator_key_file")
    with_key = M.default_config("public", company_id="acme",
                                privacy={"aggregator_key_file": tmp_path / "agg.pem"})
    assert M.warnings(with_key) == []


def test_warnings_misc() -> None:
    config = M.default_config(
        "public", company_id="acme", broker_url="mqtt://localhost:1883",
        allow_insecure_transport=True,
        privacy={"anonymize_data": False, "encrypt_connection": False,
                 "range_edges": {"grocery": [1.0, 2.0]}},
        reliability={"outbox_max_age": 100.0, "max_message_age": 50.0, "state_topics": True})
    warnings = M.warnings(config)
    for needle in ("allow_insecure_transport", "privacy.anonymize_data is off",
                   "privacy.range_edges are set", "reliability.outbox_max_age",
                   "reliability.message_expiry", "reliability.state_topics"):
        assert _has(warnings, needle), needle


def test_state_topics_is_off_by_default_and_read_from_the_environment() -> None:
    """Per-category state topics are opt-in (docs/DESIGN.md, Sync and presence)."""
    assert M.default_config("consortium", company_id="acme").reliability.state_topics is False
    on = M.load(env={"PEAR_MODE": "consortium", "PEAR_COMPANY_ID": "acme",
                     "PEAR_RELIABILITY__STATE_TOPICS": "true"})
    assert on.reliability.state_topics is True
    assert not _has(M.warnings(on), "state_topics")  # meaningful outside public mode
    message = _raises(M.load, env={"PEAR_MODE": "consortium", "PEAR_COMPANY_ID": "acme",
                                   "PEAR_RELIABILITY__STATE_TOPICS": "sometimes"})
    assert "PEAR_RELIABILITY__STATE_TOPICS: Input should be a valid boolean" in message


# -- environment -----------------------------------------------------------------------------

def test_env_variables_that_set_no_field_are_no_layer() -> None:
    # Only a variable naming a field (PEAR_<FIELD> or PEAR_<FIELD>__...) is read; the ones
    # other components use (the CLI exports PEAR_LOG_FORMAT) make no layer at all.
    assert M.from_env({"PEAR_LOG_FORMAT": "json", "PEAR_BRIDGE_ID": "x", "PEAR_": "y",
                       "PEARL": "z", "pear_tlsx": "w"}) == {}
    assert M.from_env({"pear_tls__ca_file": "/x"}) == {"tls": {"ca_file": Path("/x")}}
    assert M.from_env({"PEAR_MODE": "public"})["mode"] == NetworkMode.PUBLIC


def test_env_nested_loading() -> None:
    env = {
        "PEAR_MODE": "consortium",
        "PEAR_COMPANY_ID": "acme",
        "PEAR_PRIVACY__DATA_SHARING__PRICE_DATA": "none",
        "PEAR_TLS__CA_FILE": "/x",
        "PEAR_PRIVACY__ANONYMIZE_DATA": "true",
        "PEAR_RELIABILITY__QOS": "0",
        "PEAR_PRIVACY__RANGE_EDGES": '{"grocery/dairy": [1, 2, 4]}',
        "PEAR_ENCRYPTION__KEYS__K1": KEY32,
        "PEAR_ENCRYPTION__ACTIVE": "k1",
        "PEAR_SOMETHING_ELSE": "ignored",  # other components may use the prefix
        "PEAR_NODE_ID": "",  # exported but empty counts as unset
        "HOME": "/root",
    }
    config = M.load(env=env)
    assert config.mode is NetworkMode.CONSORTIUM
    assert config.company_id == "acme"
    assert config.sharing_level("price_data") is SharingLevel.NONE
    assert config.sharing_level("sales_data") is SharingLevel.AGGREGATED  # mode default
    assert config.tls.ca_file == Path("/x")
    assert config.encryption.keys["k1"].get_secret_value() == KEY32
    assert config.reliability.qos == 0
    assert config.privacy.range_edges == {"grocery/dairy": (1.0, 2.0, 4.0)}
    assert config.encryption.active == "k1"
    assert config.node_id.startswith("node-")


def test_from_env_holds_only_what_is_set() -> None:
    data = M.from_env({"PEAR_TLS__CA_FILE": "/x", "PEAR_PRIVACY__ANONYMIZE_DATA": "false",
                       "OTHER": "1"})
    assert data == {"tls": {"ca_file": Path("/x")}, "privacy": {"anonymize_data": False}}
    assert M.from_env({}) == {}


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEAR_MODE", "public")
    monkeypatch.setenv("PEAR_COMPANY_ID", "env_co")
    config = M.load()
    assert (config.mode, config.company_id) == (NetworkMode.PUBLIC, "env_co")
    assert M.load(env={}, mode="private", company_id="kw").company_id == "kw"


@pytest.mark.parametrize(("env", "expect"), [
    ({"PEAR_PRIVACY__ANONYMISE_DATA": "1"}, "PEAR_PRIVACY__ANONYMISE_DATA: unknown key"),
    ({"PEAR_RELIABILITY__KEEPALIVE": "soon"}, "PEAR_RELIABILITY__KEEPALIVE: Input should be "
                                              "a valid integer"),
    ({"PEAR_MODE": "galactic"}, "PEAR_MODE: Input should be 'private', 'consortium' or "
                                "'public' (got 'galactic')"),
    ({"PEAR_PRIVACY__DATA_SHARING__PRICE_DATA": "lots"},
     "PEAR_PRIVACY__DATA_SHARING__PRICE_DATA: Input should be"),
    ({"PEAR_PRIVACY__RANGE_EDGES": "[1, 2"}, "PEAR_PRIVACY__RANGE_EDGES: should be a JSON "
                                             "object (got '[1, 2')"),
    ({"PEAR_PRIVACY": "{oops"}, "PEAR_PRIVACY: should be a JSON object (got '{oops')"),
])
def test_env_errors_name_the_variable(env: dict[str, str], expect: str) -> None:
    msg = _raises(M.load, env={"PEAR_MODE": "private", "PEAR_COMPANY_ID": "a", **env})
    assert msg.startswith("environment")
    assert expect in msg


def test_env_secret_not_echoed() -> None:
    msg = _raises(M.load, env={"PEAR_MODE": "private", "PEAR_COMPANY_ID": "a",
                               "PEAR_ENCRYPTION__KEYS__K1": "hunter2hunter2"})
    assert "encryption.keys.k1" in msg
    assert "hunter2" not in msg


def test_env_rule_violation_is_reported_with_source() -> None:
    msg = _raises(M.load, env={"PEAR_MODE": "public", "PEAR_COMPANY_ID": "a",
                               "PEAR_PRIVACY__DATA_SHARING__TRENDS": "ranges_only"})
    assert "(from environment)" in msg
    assert "privacy.data_sharing.trends: 'ranges_only' is not allowed in public mode" in msg


def test_missing_mode_and_company() -> None:
    assert "mode is required" in _raises(M.load, env={})
    msg = _raises(M.load, env={"PEAR_MODE": "private"})
    assert "company_id: is required (set it in the config file, with PEAR_COMPANY_ID" in msg


# -- files -------------------------------------------------------------------------------------

TOML_DOC = """\
mode = "consortium"
company_id = "acme"
network_id = "grocers"
broker_url = "mqtts://broker.example:8883"

[tls]
ca_file = "/etc/pear/ca.pem"

[privacy]
anonymize_data = true
min_companies = 7

[privacy.data_sharing]
price_data = "none"

[privacy.range_edges]
"grocery/dairy" = [1.0, 2.0, 4.0]

[reliability]
qos = 0
"""


def test_load_toml(tmp_path: Path) -> None:
    path = tmp_path / "pear.toml"
    path.write_text(TOML_DOC)
    config = M.load(file=path, env={})
    assert config.network_id == "grocers"
    assert config.broker.host == "broker.example"
    assert config.tls.ca_file == Path("/etc/pear/ca.pem")
    assert config.privacy.min_companies == 7
    assert config.sharing_level("price_data") is SharingLevel.NONE
    assert config.privacy.range_edges == {"grocery/dairy": (1.0, 2.0, 4.0)}
    assert config.reliability.qos == 0
    assert M.read_file(path)["privacy"]["min_companies"] == 7


def test_load_json_matches_toml(tmp_path: Path) -> None:
    toml_path = tmp_path / "pear.toml"
    toml_path.write_text(TOML_DOC)
    json_path = tmp_path / "pear.JSON"  # suffixes are matched case-insensitively
    json_path.write_text(json.dumps(tomllib.loads(TOML_DOC)))
    assert M.load(file=json_path, env={}, node_id="n1") == M.load(file=toml_path, env={},
                                                                   node_id="n1")


@pytest.mark.parametrize(("name", "text", "expect"), [
    ("bad.toml", 'mode = "private"\ncompany_id = \n', "invalid TOML: "),
    ("bad.toml", 'mode = "private"\nmode = "public"\n', "invalid TOML: "),
    ("bad.json", '{"mode": "private",\n  "company_id": }', "bad.json:2:17: invalid JSON"),
    ("bad.json", '{"mode": "private", "mode": "public"}', "duplicate key 'mode'"),
    ("bad.json", '["private"]', "top level must be a JSON object, not list"),
])
def test_malformed_files(tmp_path: Path, name: str, text: str, expect: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    msg = _raises(M.load, file=path, env={})
    assert str(path) in msg
    assert expect in msg


def test_malformed_toml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('mode = "private"\ncompany_id = "a"\n[privacy\n')
    assert "line 3" in _raises(M.load, file=path, env={})


@pytest.mark.parametrize(("text", "expect"), [
    ('mode = "private"\ncompany_id = "a"\ncolour = "red"\n',
     "colour: unknown key (known keys: mode, company_id,"),
    ('mode = "private"\ncompany_id = "a"\n[privacy]\nanonymise_data = true\n',
     "privacy.anonymise_data: unknown key (known keys: anonymize_data,"),
    ('mode = "private"\ncompany_id = "a"\n[reliabilty]\nqos = 1\n', "reliabilty: unknown key"),
])
def test_unknown_keys_in_file(tmp_path: Path, text: str, expect: str) -> None:
    path = tmp_path / "pear.toml"
    path.write_text(text)
    msg = _raises(M.load, file=path, env={})
    assert msg.startswith(f"{path}: invalid configuration")
    assert expect in msg


@pytest.mark.parametrize(("text", "expect"), [
    ('mode = "private"\ncompany_id = "a"\n[privacy]\nanonymize_data = "maybe"\n',
     "privacy.anonymize_data: Input should be a valid boolean"),
    ('mode = "private"\ncompany_id = "a"\n[reliability]\nkeepalive = "soon"\n',
     "reliability.keepalive: Input should be a valid integer"),
    ('mode = "private"\ncompany_id = "a"\ntls = "yes"\n',
     "tls: should be a table (TOML) or object (JSON) (got 'yes')"),
    ('mode = "private"\ncompany_id = 12\n', "company_id: Input should be a valid string"),
])
def test_wrong_types_in_file(tmp_path: Path, text: str, expect: str) -> None:
    path = tmp_path / "pear.toml"
    path.write_text(text)
    msg = _raises(M.load, file=path, env={})
    assert str(path) in msg
    assert expect in msg


def test_constraint_violation_in_file_names_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "pear.toml"
    path.write_text('mode = "private"\ncompany_id = "a"\n[reliability]\nkeepalive = 1\n')
    msg = _raises(M.load, file=path, env={})
    assert f"(from {path})" in msg
    assert "reliability.keepalive: Input should be greater than or equal to 5" in msg


@pytest.mark.parametrize("name", ["pear.yaml", "pear", "pear.toml.bak"])
def test_unknown_suffix(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("mode: private\n")
    msg = _raises(M.load, file=path, env={})
    assert "unsupported config file suffix" in msg
    assert (repr(path.suffix) if path.suffix else "(none)") in msg
    config = M.default_config("private", company_id="a")
    assert "unsupported config file suffix" in _raises(M.save, config, path)


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    assert "config file not found" in _raises(M.load, file=tmp_path / "nope.toml", env={})
    path = tmp_path / "latin.toml"
    path.write_bytes('company_id = "caf\xe9"\n'.encode("latin-1"))
    assert "not UTF-8" in _raises(M.load, file=path, env={})


# -- saving ------------------------------------------------------------------------------------

def _full_config(**extra: Any) -> NetworkConfig:
    return M.default_config(
        "consortium", company_id="acme", network_id="grocers", node_id='store "7" \\ ü',
        tls={"ca_file": Path("/etc/pear/ca.pem"), "cert_file": "/etc/pear/n.crt",
             "key_file": "/etc/pear/n.key"},
        privacy={"data_sharing": {"price_data": "none"},
                 "range_edges": {"grocery/dairy": (1.0, 2.5, 10.0)}, "min_companies": 6},
        encryption={"keys": {"k1": KEY32, "k2": KEY32}, "active": "k2"},
        reliability={"outbox_path": "/var/lib/pear/outbox.db", "max_clock_skew": 1e-05},
        **extra)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_save_load_round_trip_with_secrets(tmp_path: Path, suffix: str) -> None:
    config = _full_config()
    path = tmp_path / f"pear{suffix}"
    assert M.save(config, path, include_secrets=True) == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert M.load(file=path, env={}) == config
    text = path.read_text()
    assert KEY32 in text
    assert '"consortium"' in text  # enums as values
    assert '"/etc/pear/ca.pem"' in text  # paths as strings


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_save_without_secrets(tmp_path: Path, suffix: str,
                              caplog: pytest.LogCaptureFixture) -> None:
    config = _full_config()
    path = tmp_path / f"pear{suffix}"
    omitted = M.save(config, path)
    assert omitted == ["encryption.keys.k1", "encryption.keys.k2"]
    text = path.read_text()
    assert KEY32 not in text
    assert "secrets not written" in caplog.text
    if suffix == ".toml":
        assert "# secrets omitted: encryption.keys.k1" in text
    # The secrets come back from the environment; the rest round-trips from the file.
    env = {"PEAR_ENCRYPTION__KEYS__K1": KEY32, "PEAR_ENCRYPTION__KEYS__K2": KEY32}
    assert M.load(file=path, env=env) == config
    # Without them the file still fails closed: the active key is named but absent.
    assert "active key id 'k2' is not among keys" in _raises(M.load, file=path, env={})


def test_save_minimal_round_trip(tmp_path: Path) -> None:
    config = NetworkConfig(mode=NetworkMode.PUBLIC, company_id="x", broker_url="mqtt://h:1",
                           privacy=PrivacyConfig(encrypt_connection=False))
    for suffix in (".toml", ".json"):
        path = tmp_path / f"c{suffix}"
        M.save(config, path)
        assert M.load(file=path, env={}) == config


def _identifier() -> st.SearchStrategy[str]:
    def ok(s: str) -> bool:
        try:
            validate_identifier(s)
        except TopicError:
            return False
        return True

    return st.text(min_size=1, max_size=20).filter(ok)


def _coarse(edges: list[float]) -> bool:
    ordered = sorted(edges)
    return all(not (a > 0 and b < a * 1.01) for a, b in itertools.pairwise(ordered))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mode=st.sampled_from(list(NetworkMode)),
    company=_identifier(),
    node=_identifier(),
    anonymize=st.booleans(),
    min_companies=st.integers(min_value=2, max_value=100_000),
    dominance=st.floats(min_value=0.01, max_value=1.0),
    qos=st.sampled_from([0, 1]),
    linger=st.floats(min_value=0, max_value=5),
    port=st.integers(min_value=1, max_value=65535),
    secret=st.none() | st.binary(min_size=32, max_size=32).map(
        lambda b: base64.b64encode(b).decode()),
    edges=st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=2, max_size=5,
                   unique=True).filter(_coarse),
    suffix=st.sampled_from([".toml", ".json"]),
)
def test_round_trip_property(tmp_path: Path, mode: NetworkMode, company: str, node: str,
                             anonymize: bool, min_companies: int, dominance: float, qos: int,
                             linger: float, port: int, secret: str | None, edges: list[float],
                             suffix: str) -> None:
    privacy: dict[str, Any] = {"anonymize_data": anonymize, "min_companies": min_companies,
                               "dominance_cap": dominance,
                               "range_edges": {"cat": tuple(sorted(edges))}}
    encryption = {"keys": {"k1": secret}, "active": "k1"} if secret is not None else {}
    if mode is NetworkMode.PUBLIC:
        privacy["data_sharing"] = {"trends": "none"}
    config = NetworkConfig(mode=mode, company_id=company, node_id=node,
                           broker_url=f"mqtts://broker.example:{port}", privacy=privacy,
                           encryption=encryption,
                           reliability={"qos": qos, "batch_linger": linger})
    path = tmp_path / f"prop{suffix}"
    M.save(config, path, include_secrets=True)
    assert M.load(file=path, env={}) == config


# -- precedence --------------------------------------------------------------------------------

def test_precedence_file_env_kwargs(tmp_path: Path) -> None:
    path = tmp_path / "pear.toml"
    path.write_text(TOML_DOC)
    env = {"PEAR_PRIVACY__ANONYMIZE_DATA": "false", "PEAR_NETWORK_ID": "from_env",
           "PEAR_NODE_ID": "env_node", "PEAR_PRIVACY__DATA_SHARING__TRENDS": "none"}
    config = M.load(file=path, env=env, network_id="from_kwargs",
                    privacy={"min_companies": 9}, reliability=ReliabilityConfig(keepalive=60))
    assert config.network_id == "from_kwargs"  # kwargs beat env
    assert config.node_id == "env_node"  # env beats the default
    assert config.privacy.anonymize_data is False  # env beats file, field by field...
    assert config.privacy.min_companies == 9  # ...kwargs beat file inside the same table...
    assert config.sharing_level("price_data") is SharingLevel.NONE  # ...the file's rest stays
    assert config.sharing_level("trends") is SharingLevel.NONE  # env adds to file's dict
    assert config.privacy.range_edges == {"grocery/dairy": (1.0, 2.0, 4.0)}
    assert config.tls.ca_file == Path("/etc/pear/ca.pem")
    assert config.reliability.keepalive == 60  # a model contributes only the fields it set
    assert config.reliability.qos == 0  # the file's value survives ReliabilityConfig()
    assert config.broker.host == "broker.example"


def test_precedence_mode_and_mode_defaults(tmp_path: Path) -> None:
    path = tmp_path / "pear.json"
    path.write_text(json.dumps({"mode": "private", "company_id": "acme"}))
    assert M.load(file=path, env={}).privacy.anonymize_data is False  # private default
    switched = M.load(file=path, env={"PEAR_MODE": "consortium"})
    assert switched.mode is NetworkMode.CONSORTIUM
    assert switched.privacy.anonymize_data is True  # defaults follow the effective mode
    explicit = M.load(file=path, env={"PEAR_MODE": "consortium"}, mode="public",
                      privacy=PrivacyConfig(anonymize_data=False))
    assert explicit.mode is NetworkMode.PUBLIC
    assert explicit.privacy.anonymize_data is False


def test_none_kwargs_count_as_unset(tmp_path: Path) -> None:
    path = tmp_path / "pear.toml"
    path.write_text(TOML_DOC)
    assert M.load(file=path, env={}, network_id=None).network_id == "grocers"


def test_unknown_kwarg_is_named() -> None:
    msg = _raises(M.load, env={}, mode="private", company_id="a", colour="red")
    assert "colour: " in msg


# -- command line ------------------------------------------------------------------------------

def _write(tmp_path: Path, text: str, name: str = "pear.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_cli_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pear.toml"
    M.save(_full_config(), path, include_secrets=True)
    assert main(["config", "show", "--file", str(path)]) == 0
    out = capsys.readouterr()
    shown = tomllib.loads(out.out)
    assert shown["mode"] == "consortium"
    assert shown["encryption"]["keys"] == {"k1": "**********", "k2": "**********"}
    assert KEY32 not in out.out
    assert "price_data = none, sales_data = aggregated, trends = full" in out.out


def test_cli_show_reads_environment(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PEAR_MODE", "public")
    monkeypatch.setenv("PEAR_COMPANY_ID", "env_co")
    assert main(["config", "show"]) == 0
    captured = capsys.readouterr()
    assert tomllib.loads(captured.out)["company_id"] == "env_co"
    assert "aggregated groups will not leave the node" in captured.err


def test_cli_check_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, 'mode = "private"\ncompany_id = "acme"\n')
    assert main(["config", "check", "--file", str(path)]) == 0
    assert "configuration is valid: private network" in capsys.readouterr().out


def test_cli_check_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, 'mode = "public"\ncompany_id = "acme"\n'
                            '[privacy.data_sharing]\nprice_data = "full"\n')
    assert main(["config", "check", "--file", str(path)]) == 2
    err = capsys.readouterr().err
    assert "privacy.data_sharing.price_data: 'full' is not allowed in public mode" in err
    path = _write(tmp_path, 'mode = "public"\ncompany_id = "acme"\n'
                            '[reliability]\nkeepalive = 1\nqos = 2\n')
    assert main(["config", "check", "--file", str(path)]) == 2
    err = capsys.readouterr().err
    assert "  - reliability.keepalive: Input should be greater than or equal to 5" in err
    assert "  - reliability.qos: Input should be 0 or 1" in err


def test_cli_check_for_connect(tmp_path: Path, pem: dict[str, Path],
                               capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, f'mode = "consortium"\ncompany_id = "acme"\n'
                            f'[tls]\nca_file = "{pem["ca_file"]}"\n')
    assert main(["config", "check", "--file", str(path)]) == 0
    capsys.readouterr()
    assert main(["config", "check", "--file", str(path), "--for-connect"]) == 2
    assert "tls.cert_file, tls.key_file are required to connect to a consortium network" \
        in capsys.readouterr().err
    complete = _write(tmp_path, 'mode = "consortium"\ncompany_id = "acme"\n[tls]\n'
                      + "".join(f'{k} = "{v}"\n' for k, v in pem.items()), "ok.toml")
    assert main(["config", "check", "--file", str(complete), "--for-connect"]) == 0
    captured = capsys.readouterr()
    assert "ready to connect" in captured.out
    assert "warning: encryption.active is not set" in captured.err


def test_cli_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "mode: private\n", "pear.yaml")
    assert main(["config", "check", "--file", str(path)]) == 2
    assert "unsupported config file suffix '.yaml'" in capsys.readouterr().err
    assert main(["config", "show", "--file", str(path)]) == 2
    assert "unsupported config file suffix" in capsys.readouterr().err
