"""The original design note's usage example, as written (all but the network calls)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pear_mqtt import (
    ConfigError,
    NetworkConfig,
    NetworkMode,
    PearNetwork,
    PrivacyConfig,
    SharingLevel,
)

pytestmark = pytest.mark.unit


def seed_config() -> NetworkConfig:
    # Verbatim from the design note.
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
    return config


def test_seed_example_constructs_as_written() -> None:
    config = seed_config()
    network = PearNetwork(config)
    assert network.config.privacy.data_sharing["price_data"] is SharingLevel.RANGES_ONLY
    assert config.sharing_level("sales_data") is SharingLevel.AGGREGATED
    assert network.status().connected is False


async def test_seed_example_connect_names_the_missing_certificates() -> None:
    network = PearNetwork(seed_config())
    with pytest.raises(ConfigError) as info:
        await network.connect()
    message = str(info.value)
    for path in ("tls.ca_file", "tls.cert_file", "tls.key_file"):
        assert path in message


def test_the_environment_fills_what_the_seed_example_leaves_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEAR_BROKER_URL", "mqtts://broker.example:8883")
    monkeypatch.setenv("PEAR_TLS__CA_FILE", "/etc/pear/ca.crt")
    monkeypatch.setenv("PEAR_COMPANY_ID", "from_env")
    config = PearNetwork(seed_config()).config
    assert config.broker_url == "mqtts://broker.example:8883"
    assert str(config.tls.ca_file) == "/etc/pear/ca.crt"
    assert config.company_id == "example_company"  # given in code: the code's value wins
    assert config.privacy.data_sharing["price_data"] is SharingLevel.RANGES_ONLY


def test_a_config_file_named_by_the_environment_fills_in_beneath_the_variables(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    file = tmp_path / "node.toml"
    file.write_text('mode = "private"\ncompany_id = "from_file"\n'
                    'broker_url = "mqtts://from-file.example:8883"\n'
                    '[tls]\nca_file = "/etc/file/ca.crt"\ncert_file = "/etc/file/node.crt"\n')
    monkeypatch.setenv("PEAR_CONFIG_FILE", str(file))
    monkeypatch.setenv("PEAR_TLS__CA_FILE", "/etc/env/ca.crt")
    config = PearNetwork(seed_config()).config
    assert config.broker_url == "mqtts://from-file.example:8883"  # only the file sets it
    assert str(config.tls.ca_file) == "/etc/env/ca.crt"  # environment over file
    assert str(config.tls.cert_file) == "/etc/file/node.crt"  # merged per leaf
    assert config.company_id == "example_company"  # code over both
    assert config.privacy.data_sharing["sales_data"] is SharingLevel.AGGREGATED


def test_a_missing_config_file_named_by_the_environment_is_a_config_error(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PEAR_CONFIG_FILE", str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match=r"absent\.toml"):
        PearNetwork(seed_config())
