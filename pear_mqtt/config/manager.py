"""Configuration: per-mode defaults, validation, and loading (:class:`NetworkConfigManager`).

A :class:`~pear_mqtt.types.NetworkConfig` can be built from four layers, each overriding the
one before it, merged key by key down to the leaves of nested tables:

1. the network mode's defaults (:meth:`NetworkConfigManager.default_config`),
2. a TOML or JSON file,
3. the environment (``PEAR_MODE``, ``PEAR_PRIVACY__DATA_SHARING__PRICE_DATA`` ... : prefix
   ``PEAR_``, ``__`` between nested keys, names case-insensitive),
4. keyword arguments.

So ``PEAR_PRIVACY__ANONYMIZE_DATA=false`` changes that one field of the file's ``[privacy]``
table and leaves the rest of the table alone.

The model checks each field and the privacy rules of the mode; :meth:`NetworkConfigManager.validate`
adds the checks that span fields or touch the file system, and
:meth:`NetworkConfigManager.warnings` reports what is legal but probably not meant.
Every problem is raised as :class:`~pear_mqtt.errors.ConfigError` naming the field path and
the rule; a pydantic ``ValidationError`` behind it stays available as ``__cause__``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError, create_model
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from ..errors import ConfigError
from ..model.insight import FIELD_GROUPS, NetworkMode, SharingLevel
from ..security.pki import tls_problems
from .files import SUFFIXES, config_suffix, dumps_toml, read_table_file, write_config_file
from .models import NetworkConfig

__all__ = ["ENV_NESTED_DELIMITER", "ENV_PREFIX", "NetworkConfigManager", "config_error",
           "field_path", "plain_data", "register_cli"]

log = logging.getLogger(__name__)

ENV_PREFIX = "PEAR_"
ENV_NESTED_DELIMITER = "__"

SecretMode = Literal["include", "omit", "mask"]


# Only what differs from the model's own defaults. Sharing levels are deliberately absent:
# NetworkConfig.sharing_level falls back to default_sharing, so a saved config that never
# chose a level keeps following its mode instead of freezing today's defaults into the file.
_MODE_DEFAULTS: dict[NetworkMode, dict[str, Any]] = {
    # Inside one company store identities are what the insights are for.
    NetworkMode.PRIVATE: {"privacy": {"anonymize_data": False, "encrypt_connection": True}},
    NetworkMode.CONSORTIUM: {"privacy": {"anonymize_data": True, "encrypt_connection": True}},
    NetworkMode.PUBLIC: {"privacy": {"anonymize_data": True, "encrypt_connection": True}},
}

_GROUP_KEY_BYTES = 32  # AES-256
_MIN_SECRET_CHARS = 16
# Same floor as PrivacyConfig.range_ratio: narrower buckets would all but give away the value.
_MIN_EDGE_RATIO = 1.01
_TLS_FILES = ("ca_file", "cert_file", "key_file")
_MASK = "**********"



# -- partial models: the shape of NetworkConfig with every field optional ------------------

def _partial_fields(model: type[BaseModel]) -> dict[str, Any]:
    """Field definitions mirroring ``model`` with every field optional and unconstrained.

    A layer (file, environment) holds only part of a config, so it cannot be checked against
    NetworkConfig itself; this shape still rejects unknown keys and values of the wrong type
    while naming the layer. Constraints and cross-field rules run once, on the merged result.
    Built from the model so a field added to types.py is picked up here without an edit.
    """
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        annotation: Any = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = _partial_model(annotation)
        elif get_origin(annotation) is Literal:
            # Environment values are strings and pydantic will not read "1" as Literal[1];
            # the base type converts it and NetworkConfig then checks the allowed values.
            kinds = {type(arg) for arg in get_args(annotation)}
            if len(kinds) == 1:
                annotation = kinds.pop()
        fields[name] = (annotation | None, None)
    return fields


def _partial_model(model: type[BaseModel]) -> type[BaseModel]:
    return create_model(
        f"Partial{model.__name__}",
        __config__=ConfigDict(extra="forbid", hide_input_in_errors=True),
        **_partial_fields(model),
    )


class _PearSettingsBase(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,
        # An exported-but-empty variable (``PEAR_TLS__CA_FILE=``) means "not set" in shells
        # and compose files.
        env_ignore_empty=True,
        extra="forbid",
        hide_input_in_errors=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment is read explicitly from the mapping the caller chose (see
        # _env_layer): never from os.environ, .env files or secret dirs behind its back.
        return (init_settings,)


_PartialConfig: type[BaseModel] = _partial_model(NetworkConfig)
_EnvSettings: type[_PearSettingsBase] = create_model(
    "PearEnvSettings", __base__=_PearSettingsBase, **_partial_fields(NetworkConfig))


# -- error messages -------------------------------------------------------------------------

def field_path(loc: Iterable[int | str]) -> str:
    """A pydantic error location as a dotted path: ``private[0].tls.ca_file``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The NetworkConfig sub-model that ``loc`` points into, if any."""
    model: type[BaseModel] = NetworkConfig
    for part in loc:
        info = model.model_fields.get(str(part))
        annotation = info.annotation if info is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _is_secret(loc: tuple[int | str, ...]) -> bool:
    model: type[BaseModel] = NetworkConfig
    for part in loc:
        info = model.model_fields.get(str(part))
        if info is None:
            return False
        if "SecretStr" in repr(info.annotation):
            return True
        if not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return False
        model = info.annotation
    return False


def _got(err: Mapping[str, Any], loc: tuple[int | str, ...]) -> str:
    """`` (got 'x')`` for a scalar input that is not a secret, else nothing."""
    value = err.get("input")
    if _is_secret(loc) or not isinstance(value, str | int | float | bool):
        return ""
    shown = repr(value)
    return f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"


def _describe(err: Mapping[str, Any], *, env: bool = False, layered: bool = False) -> str:
    loc: tuple[int | str, ...] = tuple(err["loc"])
    kind: str = err["type"]
    if env and loc:
        where = ENV_PREFIX + ENV_NESTED_DELIMITER.join(str(p).upper() for p in loc)
    else:
        where = field_path(loc)
    if kind in ("value_error", "assertion_error") and "error" in err.get("ctx", {}):
        msg = str(err["ctx"]["error"])
    elif kind == "missing":
        msg = "is required"
        if layered and len(loc) == 1:
            msg += (f" (set it in the config file, with {ENV_PREFIX}{str(loc[0]).upper()}, "
                    f"or as {loc[0]}=...)")
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        # pydantic would name our internal Partial* model here.
        msg = "should be a JSON object" if env else "should be a table (TOML) or object (JSON)"
        msg += _got(err, loc)
    elif kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        known = f" (known keys: {', '.join(parent.model_fields)})" if parent else ""
        msg = f"unknown key{known}"
    else:
        msg = str(err["msg"]) + _got(err, loc)
    # Our own validators often start their message with the field path already.
    if not where or msg.startswith((f"{where}:", f"{where} ")):
        return msg
    return f"{where}: {msg}"


def config_error(header: str, problems: list[str]) -> ConfigError:
    """One :class:`ConfigError`: ``header``, then each problem on its own indented line."""
    return ConfigError(header + "".join(f"\n  - {p}" for p in problems))


def _from_validation(exc: ValidationError, header: str, *, env: bool = False,
                     layered: bool = False) -> ConfigError:
    errors = exc.errors(include_url=False)
    return config_error(header, [_describe(err, env=env, layered=layered) for err in errors])


# -- layers -----------------------------------------------------------------------------------

def deep_merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Merge nested mappings, later layers winning field by field (file < env < arguments)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key] = deep_merge(out[key], value)
            elif isinstance(value, Mapping):
                out[key] = deep_merge(value)
            else:
                out[key] = value
    return out


def _explicit(value: Any) -> Any:
    """A keyword override as a plain value; a model contributes only the fields it was given."""
    if isinstance(value, BaseModel):
        return {k: _explicit(getattr(value, k)) for k in value.model_fields_set}
    if isinstance(value, Mapping):
        return {k: _explicit(v) for k, v in value.items()}
    return value


def _partial_dump(model: BaseModel) -> dict[str, Any]:
    # Python mode keeps SecretStr, Path and enums as objects: nothing is revealed or re-parsed.
    dumped: dict[str, Any] = model.model_dump(exclude_unset=True)
    return dumped


def _check_partial(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    try:
        return _partial_dump(_PartialConfig.model_validate(data))
    except ValidationError as exc:
        raise _from_validation(exc, f"{where}: invalid configuration") from exc


def _env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    source = EnvSettingsSource(_EnvSettings)
    # The source snapshots os.environ on creation; point it at the caller's mapping instead,
    # normalised as it would be: names case-insensitive, empty values unset.
    source.env_vars = {name.lower(): value for name, value in environ.items() if value != ""}
    try:
        raw = source()
    except (SettingsError, ValueError) as exc:
        raise ConfigError(f"environment: {exc}") from exc
    try:
        settings = _EnvSettings(**raw)
    except ValidationError as exc:
        raise _from_validation(exc, "environment: invalid configuration", env=True) from exc
    return _partial_dump(settings)


def _read_file(path: Path) -> dict[str, Any]:
    return _check_partial(read_table_file(path), str(path))


# -- writing ----------------------------------------------------------------------------------

def plain_data(value: Any, loc: str, secrets: SecretMode, omitted: list[str]) -> Any:
    """``value`` (a model, at path ``loc``) as TOML/JSON-ready data; ``None`` means "leave the
    key out". Paths of secrets left out are appended to ``omitted``."""
    if isinstance(value, BaseModel):
        out: dict[str, Any] = {}
        for name in type(value).model_fields:
            item = plain_data(getattr(value, name), f"{loc}.{name}" if loc else name, secrets,
                              omitted)
            if item is not None:
                out[name] = item
        return out
    if isinstance(value, SecretStr):
        if secrets == "include":
            return value.get_secret_value()
        if secrets == "mask":
            return _MASK
        omitted.append(loc)
        return None
    if isinstance(value, Mapping):
        items = {str(k): plain_data(v, f"{loc}.{k}", secrets, omitted)
                 for k, v in value.items()}
        # An empty mapping is the models' default; leaving it out keeps files short.
        return {k: v for k, v in items.items() if v is not None} or None
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [plain_data(v, f"{loc}[{i}]", secrets, omitted) for i, v in enumerate(value)]
    return value


# -- validation helpers -----------------------------------------------------------------------

_STD_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_URL_B64 = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def decode_key(value: str) -> bytes | None:
    """Standard or url-safe base64, padding optional; None if it is neither."""
    text = value.strip().rstrip("=")
    padded = text + "=" * (-len(text) % 4)
    try:
        if _STD_B64.fullmatch(text):
            return base64.b64decode(padded)
        if _URL_B64.fullmatch(text):
            return base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError):
        pass
    return None


def _unreadable(path: Path) -> str | None:
    """Why ``path`` cannot serve as key material, or None if it can."""
    try:
        with path.open("rb") as fh:
            if not fh.read(1):
                return "is empty"
    except FileNotFoundError:
        return "does not exist"
    except IsADirectoryError:
        return "is a directory, not a file"
    except PermissionError:
        return "is not readable (permission denied)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


# -- the manager ------------------------------------------------------------------------------

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
        data = deep_merge(_MODE_DEFAULTS[net_mode], cls._overrides(overrides),
                           {"mode": net_mode, "company_id": company_id})
        config = cls._build(data, "invalid configuration")
        return cls.validate(config)

    @staticmethod
    def effective_sharing(config: NetworkConfig) -> dict[str, SharingLevel]:
        """The level of every field group: as configured, else the mode's default."""
        return {group: config.sharing_level(group) for group in FIELD_GROUPS}

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
            file_layer = _read_file(Path(file))
            sources.append(str(file))
        env_layer = _env_layer(os.environ if env is None else env)
        if env_layer:
            sources.append("environment")
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
        return _env_layer(os.environ if env is None else env)

    @classmethod
    def read_file(cls, path: Path | str) -> dict[str, Any]:
        """The settings a TOML or JSON file holds, checked for syntax, unknown keys and types."""
        return _read_file(Path(path))

    @classmethod
    def validate(cls, config: NetworkConfig, *, for_connect: bool = False) -> NetworkConfig:
        """Check what the model alone cannot; return ``config`` unchanged if it passes.

        Always: every group key decodes to 32 bytes; bucket edges are not finer than 1 %;
        ``reliability.reconnect_min_delay <= reconnect_max_delay``. With ``for_connect``:
        ``tls.ca_file``, ``tls.cert_file`` and ``tls.key_file`` are set whenever the broker URL
        is ``mqtts://`` or the mode is private or consortium, every configured key file
        exists and is readable, and the TLS files are usable (:func:`pear_mqtt.pki.tls_problems`:
        PEM that parses, a CA file holding a CA, a certificate that CA issued and within its
        validity window, the key that belongs to it). All problems are reported together in
        one :class:`ConfigError`.
        """
        problems: list[str] = []
        for key_id, secret in config.encryption.keys.items():
            raw = decode_key(secret.get_secret_value())
            if raw is None:
                problems.append(f"encryption.keys.{key_id}: not valid base64 (an AES-256 group "
                                f"key is {_GROUP_KEY_BYTES} bytes, base64-encoded)")
            elif len(raw) != _GROUP_KEY_BYTES:
                problems.append(f"encryption.keys.{key_id}: decodes to {len(raw)} bytes; an "
                                f"AES-256 group key must be exactly {_GROUP_KEY_BYTES}")
        for category, edges in config.privacy.range_edges.items():
            for low, high in itertools.pairwise(edges):
                if low > 0 and high < low * _MIN_EDGE_RATIO:
                    problems.append(
                        f"privacy.range_edges.{category}: bucket [{low}, {high}) is narrower "
                        f"than 1% of its lower edge, which would all but disclose exact values")
                    break
        rel = config.reliability
        if rel.reconnect_min_delay > rel.reconnect_max_delay:
            problems.append(f"reliability.reconnect_min_delay ({rel.reconnect_min_delay}) must "
                            f"not exceed reliability.reconnect_max_delay "
                            f"({rel.reconnect_max_delay})")
        if for_connect:
            problems.extend(cls._connect_problems(config))
        if problems:
            raise config_error("invalid configuration:", problems)
        return config

    @classmethod
    def warnings(cls, config: NetworkConfig) -> list[str]:
        """What is allowed but probably not meant, one sentence per finding."""
        out: list[str] = []
        privacy = config.privacy
        if (config.mode is not NetworkMode.PRIVATE and privacy.anonymize_data
                and privacy.pseudonym_secret is None):
            out.append(f"privacy.pseudonym_secret is not set: with anonymize_data in a "
                       f"{config.mode.value} network, company and store identities are dropped "
                       f"rather than replaced by stable pseudonyms")
        if (privacy.pseudonym_secret is not None
                and len(privacy.pseudonym_secret.get_secret_value()) < _MIN_SECRET_CHARS):
            out.append(f"privacy.pseudonym_secret is shorter than {_MIN_SECRET_CHARS} "
                       "characters; pseudonyms could be reversed by guessing it")
        if config.mode is NetworkMode.PUBLIC and not privacy.anonymize_data:
            out.append("privacy.anonymize_data is off in a public network: the company "
                       "identity travels with every contribution")
        if config.mode is NetworkMode.CONSORTIUM and config.encryption.active is None:
            out.append("encryption.active is not set: consortium bodies are protected by TLS "
                       "and signatures only, without the group-key encryption layer")
        sharing = cls.effective_sharing(config)
        aggregated = [g for g, level in sharing.items() if level is SharingLevel.AGGREGATED]
        if aggregated and privacy.aggregator_key_file is None:
            out.append(f"privacy.aggregator_key_file is not set: aggregated groups will not "
                       f"leave the node ({', '.join(aggregated)})")
        if privacy.range_edges and SharingLevel.RANGES_ONLY not in sharing.values():
            out.append("privacy.range_edges are set but no field group is 'ranges_only', so "
                       "they are never used")
        rel = config.reliability
        if rel.outbox_max_age > rel.max_message_age:
            out.append(f"reliability.outbox_max_age ({rel.outbox_max_age}s) exceeds "
                       f"reliability.max_message_age ({rel.max_message_age}s): messages held "
                       "that long offline are dropped as stale when finally sent")
        if rel.message_expiry > rel.max_message_age:
            out.append(f"reliability.message_expiry ({rel.message_expiry}s) exceeds "
                       f"reliability.max_message_age ({rel.max_message_age}s): retained state "
                       "older than the age limit is synced only to be dropped as stale")
        if config.allow_insecure_transport:
            out.append("allow_insecure_transport is set: for local development only, never "
                       "in production")
        return out

    @classmethod
    def to_dict(cls, config: NetworkConfig, *,
                secrets: SecretMode = "omit") -> tuple[dict[str, Any], list[str]]:
        """``config`` as plain TOML/JSON data, and the paths of secrets left out.

        Paths become strings, enums their values, unset optional fields are left out.
        ``secrets``: ``"include"`` writes secret values, ``"mask"`` writes ``**********``,
        ``"omit"`` leaves them out.
        """
        omitted: list[str] = []
        data: dict[str, Any] = plain_data(config, "", secrets, omitted)
        return data, omitted

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
            header.append(f"secret values are masked as {_MASK}; this is not a loadable file")
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
        return {k: _explicit(v) for k, v in overrides.items() if v is not None}

    @staticmethod
    def _build(data: Mapping[str, Any], header: str, *, layered: bool = False) -> NetworkConfig:
        try:
            return NetworkConfig.model_validate(data)
        except ValidationError as exc:
            raise _from_validation(exc, header, layered=layered) from exc

    @staticmethod
    def _connect_problems(config: NetworkConfig) -> list[str]:
        problems: list[str] = []
        needs_tls = config.broker.tls or config.mode is not NetworkMode.PUBLIC
        if needs_tls:
            missing = config.tls.missing()
            if missing:
                over = " over mqtts://" if config.mode is NetworkMode.PUBLIC else ""
                problems.append(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                                f"required to connect to a {config.mode.value} network{over}")
        files = [(f"tls.{name}", getattr(config.tls, name)) for name in _TLS_FILES]
        files.append(("privacy.aggregator_key_file", config.privacy.aggregator_key_file))
        readable = True
        for field, path in files:
            if path is None:
                continue
            why = _unreadable(Path(path))
            if why is not None:
                problems.append(f"{field}: {path} {why}")
                readable = readable and not field.startswith("tls.")
        tls = config.tls
        if readable and tls.ca_file and tls.cert_file and tls.key_file:
            # What the broker would refuse only after a handshake (and a node would retry
            # forever): say it now, naming the file.
            problems.extend(tls_problems(ca_file=Path(tls.ca_file),
                                         cert_file=Path(tls.cert_file),
                                         key_file=Path(tls.key_file)))
        return problems


# -- command line -------------------------------------------------------------------------------

def _cmd_show(args: argparse.Namespace) -> int:
    config = NetworkConfigManager.load(file=args.file)
    sys.stdout.write(NetworkConfigManager.to_toml(config, secrets="mask"))
    for warning in NetworkConfigManager.warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        config = NetworkConfigManager.load(file=args.file)
        NetworkConfigManager.validate(config, for_connect=args.for_connect)
    except ConfigError as exc:
        print(f"pear-mqtt config check: {exc}", file=sys.stderr)
        return 2
    for warning in NetworkConfigManager.warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    what = "ready to connect" if args.for_connect else "valid"
    print(f"configuration is {what}: {config.mode.value} network {config.network_id!r}, "
          f"company {config.company_id!r}, broker {config.broker}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt config {show,check}``."""
    parser = subparsers.add_parser(
        "config", help="show or check the effective network configuration",
        description="The effective configuration: file < PEAR_* environment variables.")
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    file_help = "TOML or JSON config file (.toml, .json)"

    show = sub.add_parser("show", help="print the effective configuration as TOML "
                                       "(secrets masked)")
    show.add_argument("--file", type=Path, help=file_help)
    show.set_defaults(handler=_cmd_show)

    check = sub.add_parser("check", help="validate the configuration (exit 0 valid, 2 invalid)")
    check.add_argument("--file", type=Path, help=file_help)
    check.add_argument("--for-connect", action="store_true",
                       help="also require TLS material that exists and is readable")
    check.set_defaults(handler=_cmd_check)
