"""The node's configuration (:class:`NetworkConfigManager`): mode defaults, loading from the
layers mode < file < environment < arguments, validation, warnings, and saving.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from ..model.insight import NetworkMode, SharingLevel
from . import checks
from .dump import MASK, SecretMode, plain_data
from .env import ENV_NESTED_DELIMITER, ENV_PREFIX, EnvReader
from .files import SUFFIXES, config_suffix, dumps_toml, read_table_file, write_config_file
from .layers import deep_merge, explicit, partial_dump, partial_model
from .models import RETIRED_PSEUDONYM_SECRET, NetworkConfig, retired_setting
from .problems import ProblemWriter, config_error

__all__ = ["CONFIG_FILE_VAR", "ENV_NESTED_DELIMITER", "ENV_PREFIX", "NetworkConfigManager"]

log = logging.getLogger(__name__)

CONFIG_FILE_VAR = f"{ENV_PREFIX}CONFIG_FILE"
"""The variable naming a config file for a ``NetworkConfig`` built in code."""

# Only what differs from the model's own defaults. Sharing levels are deliberately absent:
# NetworkConfig.sharing_level falls back to default_sharing, so a saved config that never
# chose a level keeps following its mode instead of freezing today's defaults into the file.
_MODE_DEFAULTS: dict[NetworkMode, dict[str, Any]] = {
    # Inside one company store identities are what the insights are for.
    NetworkMode.PRIVATE: {"privacy": {"anonymize_data": False, "encrypt_connection": True}},
    NetworkMode.CONSORTIUM: {"privacy": {"anonymize_data": True, "encrypt_connection": True}},
    NetworkMode.PUBLIC: {"privacy": {"anonymize_data": True, "encrypt_connection": True}},
}

_PARTIAL: type[BaseModel] = partial_model(NetworkConfig)
_ENV = EnvReader(NetworkConfig, prefix=ENV_PREFIX)
_PROBLEMS = ProblemWriter(root=NetworkConfig, env_prefix=ENV_PREFIX)


class NetworkConfigManager:
    """Manages P2P network configuration: mode defaults, validation, loading and saving.

    Every method is a class method; there is no state to hold::

        config = NetworkConfigManager.load(file=Path("pear.toml"))
        NetworkConfigManager.validate(config, for_connect=True)
    """

    SUFFIXES: ClassVar[tuple[str, ...]] = SUFFIXES

    @classmethod
    def default_config(cls, mode: NetworkMode | str, *, company_id: str,
                       **overrides: Any) -> NetworkConfig:
        """The configuration of a new ``mode`` network for ``company_id``.

        Private: full sharing, identities kept, TLS. Consortium: price ranges only, sales
        aggregated, trends in full, identities anonymised. Public: aggregates only, anonymised.
        The broker is ``mqtts://localhost:8883``. ``overrides`` (field names of
        :class:`NetworkConfig`; nested values as dicts or models) are merged over the defaults.
        """
        net_mode = cls._mode(mode)
        _refuse_retired(overrides, "arguments")
        data = deep_merge(_MODE_DEFAULTS[net_mode], cls._overrides(overrides),
                           {"mode": net_mode, "company_id": company_id})
        config = cls._build(data, "invalid configuration")
        return cls.validate(config)

    @staticmethod
    def effective_sharing(config: NetworkConfig) -> dict[str, SharingLevel]:
        """The level of every field group: as configured, else the mode's default."""
        return checks.effective_sharing(config)

    @classmethod
    def with_environment(cls, config: NetworkConfig, *,
                         env: Mapping[str, str] | None = None) -> NetworkConfig:
        """``config`` with what its code left out filled from ``PEAR_*`` variables (``env``,
        default ``os.environ``): :meth:`load`'s precedence with the fields the config was
        built with as the arguments, so they win. Unchanged when no variable is set.
        ``PearNetwork`` applies it, so ``NetworkConfig(mode=…, company_id=…)`` in code and
        the connection in the environment make a whole configuration. ``PEAR_CONFIG_FILE``
        names a config file read beneath the variables (file < environment < code)."""
        file = (os.environ if env is None else env).get(CONFIG_FILE_VAR) or None
        if file is None and not cls.from_env(env):
            return config
        return cls.load(file=file, env=env,
                        **{k: getattr(config, k) for k in config.model_fields_set})

    @classmethod
    def load(cls, *, file: Path | str | None = None, env: Mapping[str, str] | None = None,
             **overrides: Any) -> NetworkConfig:
        """Build the effective configuration from a file, the environment and ``overrides``.

        Later layers win, merged per leaf of nested tables: mode defaults < ``file`` (``.toml``
        or ``.json``) < ``env`` (``os.environ`` unless given; ``PEAR_`` prefix, ``__`` between
        nested keys) < ``overrides``. A model passed as an override (``privacy=PrivacyConfig(
        anonymize_data=False)``) contributes only the fields it was built with; a top-level
        override of ``None`` counts as not given. The result has passed :meth:`validate`
        (without ``for_connect``).

        Raises :class:`ConfigError` naming the layer, the field path and the rule.
        """
        sources: list[str] = []
        file_layer: dict[str, Any] = {}
        if file is not None:
            file_layer = cls.read_file(file)
            sources.append(str(file))
        env_layer = cls.from_env(env)
        if env_layer:
            sources.append("environment")
        _refuse_retired(overrides, "arguments")
        kw_layer = cls._overrides(overrides)
        if kw_layer:
            sources.append("arguments")
        merged = deep_merge(file_layer, env_layer, kw_layer)
        if merged.get("mode") is None:
            raise ConfigError(f"mode is required: set it in the config file, with {ENV_PREFIX}"
                              f"MODE, or as mode=... ({', '.join(m.value for m in NetworkMode)})")
        net_mode = cls._mode(merged["mode"])
        data = deep_merge(_MODE_DEFAULTS[net_mode], merged)
        origin = f" (from {', '.join(sources)})" if sources else ""
        config = cls._build(data, f"invalid configuration{origin}", layered=True)
        return cls.validate(config)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Only the settings ``env`` (default ``os.environ``) sets, as a nested dict.

        ``PEAR_TLS__CA_FILE=/x`` gives ``{"tls": {"ca_file": Path("/x")}}``; values are typed
        (enums, paths, ``SecretStr``) but not yet checked against each other. Complex values
        (``PEAR_PRIVACY__RANGE_EDGES``) are JSON. Names are case-insensitive, so key ids set
        through ``PEAR_ENCRYPTION__KEYS__<ID>`` are lower-case.
        """
        environ = os.environ if env is None else env
        retired = f"{ENV_PREFIX}PRIVACY{ENV_NESTED_DELIMITER}PSEUDONYM_SECRET"
        if any(name.upper() == retired and value for name, value in environ.items()):
            raise ConfigError(f"environment: {retired} {RETIRED_PSEUDONYM_SECRET}")
        try:
            return _ENV.read(environ)
        except ValidationError as exc:
            raise _PROBLEMS.error(exc, "environment: invalid configuration", env=True) from exc

    @classmethod
    def read_file(cls, path: Path | str) -> dict[str, Any]:
        """The settings a TOML or JSON file holds, checked for syntax, unknown keys and types."""
        table = read_table_file(Path(path))
        _refuse_retired(table, str(path))
        try:
            return partial_dump(_PARTIAL.model_validate(table))
        except ValidationError as exc:
            raise _PROBLEMS.error(exc, f"{path}: invalid configuration") from exc

    @classmethod
    def validate(cls, config: NetworkConfig, *, for_connect: bool = False) -> NetworkConfig:
        """Check what the model alone cannot; return ``config`` unchanged if it passes.

        Always: every group key decodes to 32 bytes; bucket edges are not finer than 1 %;
        ``reliability.reconnect_min_delay <= reconnect_max_delay``. With ``for_connect``:
        ``tls.ca_file``, ``tls.cert_file`` and ``tls.key_file`` are set whenever the broker URL
        is ``mqtts://`` or the mode is private or consortium, every configured key file
        exists and is readable, and the TLS files are usable
        (:func:`pear_mqtt.security.tlscheck.tls_problems`: PEM that parses, a CA file holding a CA,
        a certificate that CA issued and within its validity window, the key that belongs to
        it). All problems are reported together in one :class:`ConfigError`.
        """
        problems = checks.config_problems(config, for_connect=for_connect)
        if problems:
            raise config_error("invalid configuration:", problems)
        return config

    @classmethod
    def warnings(cls, config: NetworkConfig) -> list[str]:
        """What is allowed but probably not meant, one sentence per finding."""
        return checks.config_warnings(config)

    @classmethod
    def to_dict(cls, config: NetworkConfig, *,
                secrets: SecretMode = "omit") -> tuple[dict[str, Any], list[str]]:
        """``config`` as plain TOML/JSON data, and the paths of secrets left out.

        Paths become strings, enums their values, unset optional fields are left out.
        ``secrets``: ``"include"`` writes secret values, ``"mask"`` writes ``**********``,
        ``"omit"`` leaves them out.
        """
        return plain_data(config, secrets=secrets)

    @classmethod
    def to_toml(cls, config: NetworkConfig, *, secrets: SecretMode = "omit") -> str:
        """``config`` as a TOML document (see :meth:`to_dict` for ``secrets``)."""
        data, omitted = cls.to_dict(config, secrets=secrets)
        return cls._toml_document(config, data, omitted, secrets)

    @classmethod
    def _toml_document(cls, config: NetworkConfig, data: Mapping[str, Any], omitted: list[str],
                       secrets: SecretMode) -> str:
        header = [f"pear_mqtt network configuration ({config.mode.value} network "
                  f"{config.network_id!r}, company {config.company_id!r})",
                  "effective data_sharing (unset groups follow the mode): "
                  + ", ".join(f"{g} = {lvl.value}" for g, lvl in
                              cls.effective_sharing(config).items())]
        if omitted:
            header += ["secrets omitted: " + ", ".join(omitted),
                       f"supply them through the environment ({ENV_PREFIX}... variables) or "
                       "save with include_secrets=True"]
        if secrets == "mask" and cls.to_dict(config, secrets="omit")[1]:
            header.append(f"secret values are masked as {MASK}; this is not a loadable file")
        return dumps_toml(data, header)

    @classmethod
    def save(cls, config: NetworkConfig, path: Path | str, *,
             include_secrets: bool = False) -> list[str]:
        """Write ``config`` to ``path`` as TOML or JSON (by suffix) so :meth:`load` reads it back.

        Secrets are written only with ``include_secrets`` (the file is then created mode 0600);
        otherwise they are left out, logged as a warning, and, in TOML, listed in a comment.
        Returns the paths of the secrets left out. The file is replaced atomically.
        """
        target = Path(path)
        suffix = config_suffix(target)
        secrets: SecretMode = "include" if include_secrets else "omit"
        data, omitted = cls.to_dict(config, secrets=secrets)
        if suffix == ".toml":
            text = cls._toml_document(config, data, omitted, secrets)
        else:
            text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        if omitted:
            log.warning("%s: secrets not written (%s); pass include_secrets=True to keep them",
                        target, ", ".join(omitted))
        write_config_file(target, text, private=include_secrets)
        return omitted

    # -- internals ------------------------------------------------------------------------

    @staticmethod
    def _mode(mode: Any) -> NetworkMode:
        try:
            return NetworkMode(mode)
        except ValueError:
            raise ConfigError(f"mode: {mode!r} is not a network mode; use one of "
                              f"{', '.join(m.value for m in NetworkMode)}") from None

    @staticmethod
    def _overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
        return {k: explicit(v) for k, v in overrides.items() if v is not None}

    @staticmethod
    def _build(data: Mapping[str, Any], header: str, *, layered: bool = False) -> NetworkConfig:
        try:
            return NetworkConfig.model_validate(data)
        except ValidationError as exc:
            raise _PROBLEMS.error(exc, header, layered=layered) from exc


def _refuse_retired(layer: Mapping[str, Any], origin: str) -> None:
    """A retired setting in ``layer`` as a one-line :class:`ConfigError` saying what to do."""
    problem = retired_setting(layer.get("privacy"))
    if problem is not None:
        raise ConfigError(f"{origin}: {problem}")
