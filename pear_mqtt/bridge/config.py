"""The bridge's configuration: its sources, the public side, noise, and the loader.

:class:`BridgeConfigManager` layers a TOML or JSON file, the ``PEAR_BRIDGE_*`` environment
(read with pydantic-settings) and keyword arguments into a checked :class:`BridgeConfig`,
and writes one back.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationError, model_validator

from ..config.checks import decode_key
from ..config.dump import plain_data
from ..config.env import EnvReader
from ..config.files import SUFFIXES, config_suffix, dumps_toml, read_table_file, write_config_file
from ..config.layers import deep_merge
from ..config.models import (
    BrokerURL,
    EncryptionConfig,
    ReliabilityConfig,
    TLSConfig,
    default_sharing,
)
from ..config.problems import config_error, loc_str
from ..errors import ConfigError
from ..model.insight import (
    FIELD_GROUPS,
    CompanyId,
    Frozen,
    NetworkId,
    NetworkMode,
    NodeId,
    SharingLevel,
)

__all__ = [
    "DEFAULT_BOUNDS",
    "BridgeConfig",
    "BridgeConfigManager",
    "BridgeRole",
    "DPConfig",
    "PublicConfig",
    "SourceConfig",
]

BridgeRole = Literal["single", "worker", "merge"]
"""What one bridge process does: everything (``single``), or, scaled out over
``instances``, count its share of the senders (``worker``) or merge the workers' partials
and publish (``merge``). See docs/BRIDGE.md ("Scale-out")."""

DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "price_data.price": (0.0, 10_000.0),
    "price_data.min_price": (0.0, 10_000.0),
    "price_data.max_price": (0.0, 10_000.0),
    "sales_data.units": (0.0, 1_000_000.0),
    "sales_data.revenue": (0.0, 100_000_000.0),
    "sales_data.transactions": (0.0, 1_000_000.0),
    "trends.price_change_pct": (-100.0, 100.0),
    "trends.demand_change_pct": (-100.0, 1_000.0),
}
"""Clamping bounds per ``group.field`` of a company's combined value in one cell, used only
when noise is on (sensitivity is the width of the range). Set them to what a company can
plausibly report per window: wider bounds mean more noise."""

_GROUP_KEY_BYTES = 32


def _known_groups(levels: Mapping[str, SharingLevel]) -> None:
    unknown = sorted(set(levels) - set(FIELD_GROUPS))
    if unknown:
        raise ValueError(f"data_sharing: unknown field group(s) {unknown}; known: "
                         f"{list(FIELD_GROUPS)}")


def _check_url(url: str, *, insecure: bool, what: str) -> None:
    parsed = BrokerURL.parse_list(url)[0]
    if not parsed.tls and not insecure:
        raise ValueError(f"{what}.broker_url: the bridge connects over mqtts:// only (got "
                         f"{url!r}; set allow_insecure_transport only for local development)")


class SourceConfig(Frozen):
    """One broker the bridge reads insights from: the consortium's, or a company's private
    broker that opted in.

    ``tls`` is the bridge's certificate from that network's CA (role ``bridge``).
    ``crl_file`` (or ``tls.crl_file``) is that CA's CRL: items a revoked certificate signed
    are dropped (``revoked``); the file is re-read when it changes.
    ``aggregator_key_file`` is the X25519 *private* key whose public half the network's nodes
    seal ``aggregated`` groups to. ``data_sharing`` is the policy the members agreed on
    (unset groups: the mode's default); the bridge drops items that disclose more.

    Identities: items count under ``domain`` (default: the network id) as the member their
    certificate names. A private broker serves one company (``company_id``); give its
    identity in the consortium (``domain`` = the consortium network, ``member`` = its
    pseudonym there, from the consortium CA's registry: ``pear-mqtt pki pseudonyms``) so that
    its stores and its consortium nodes count as one company.
    ``include_full`` also aggregates ``full`` groups (default: yes for private sources, whose
    company opted in explicitly; no for the consortium, whose members shared those with each
    other, not with the public).
    """

    mode: Literal["consortium", "private"] = "consortium"
    network_id: NetworkId
    broker_url: str = "mqtts://localhost:8883"
    tls: TLSConfig = Field(default_factory=TLSConfig)
    crl_file: Path | None = None
    encryption: EncryptionConfig = Field(default_factory=EncryptionConfig)
    aggregator_key_file: Path | None = None
    data_sharing: dict[str, SharingLevel] = Field(default_factory=dict)
    company_id: CompanyId | None = None
    domain: NetworkId | None = None
    member: CompanyId | None = None
    include_full: bool | None = None
    reliability: ReliabilityConfig = Field(default_factory=ReliabilityConfig)
    allow_insecure_transport: bool = False

    @model_validator(mode="after")
    def _rules(self) -> SourceConfig:
        _known_groups(self.data_sharing)
        _check_url(self.broker_url, insecure=self.allow_insecure_transport, what=self.mode)
        if self.mode == "private" and self.company_id is None:
            raise ValueError("a private source needs company_id (the company whose broker "
                             "it is)")
        if self.mode == "consortium" and (self.company_id is not None
                                          or self.member is not None):
            raise ValueError("company_id and member belong to private sources; consortium "
                             "members are named by their certificates")
        return self

    def policy(self) -> dict[str, SharingLevel]:
        """The effective level of every field group."""
        levels = default_sharing(NetworkMode(self.mode))
        levels.update(self.data_sharing)
        return levels

    @property
    def identity_domain(self) -> str:
        return self.domain or self.network_id

    @property
    def aggregate_full(self) -> bool:
        return self.include_full if self.include_full is not None else self.mode == "private"


class PublicConfig(Frozen):
    """The public broker the bridge publishes to (and reads participants' contributions from).

    ``tls`` is the bridge's certificate from the public network's CA (``crl_file`` or
    ``tls.crl_file``: its CRL, as for a source). With ``contributions``
    the bridge also aggregates what public participants publish to their ``contrib/`` topics;
    ``aggregator_key_file`` is the X25519 private key their contributions are sealed to.
    ``data_sharing`` may only say ``aggregated`` or ``none``.
    """

    network_id: NetworkId
    broker_url: str = "mqtts://localhost:8883"
    tls: TLSConfig = Field(default_factory=TLSConfig)
    crl_file: Path | None = None
    aggregator_key_file: Path | None = None
    contributions: bool = True
    data_sharing: dict[str, SharingLevel] = Field(default_factory=dict)
    reliability: ReliabilityConfig = Field(default_factory=ReliabilityConfig)
    allow_insecure_transport: bool = False

    @model_validator(mode="after")
    def _rules(self) -> PublicConfig:
        _known_groups(self.data_sharing)
        _check_url(self.broker_url, insecure=self.allow_insecure_transport, what="public")
        wrong = sorted(g for g, lvl in self.data_sharing.items()
                       if lvl not in (SharingLevel.AGGREGATED, SharingLevel.NONE))
        if wrong:
            raise ValueError(f"public.data_sharing: {wrong} must be 'aggregated' or 'none' "
                             "(public participants share aggregates only)")
        return self

    def policy(self) -> dict[str, SharingLevel]:
        """The effective level of every field group."""
        levels = default_sharing(NetworkMode.PUBLIC)
        levels.update(self.data_sharing)
        return levels


class DPConfig(Frozen):
    """Optional noise on published statistics, against a per-period ε budget.

    ``mechanism``: ``none`` (default), ``laplace`` (pure ε-DP) or ``gaussian`` ((ε, δ)-DP,
    classic calibration, so ``epsilon_per_cell`` at most 1). Every published cell spends
    ``epsilon_per_cell`` (and ``delta``), split evenly over the statistics it releases, from
    the budget of the period its window falls in (``period_seconds``, aligned to the epoch).
    When a cell would overdraw ``budget_per_period`` it is suppressed, never published without
    noise. ``bounds`` (merged over :data:`DEFAULT_BOUNDS`) clamp each company's combined value
    per field; a field without bounds is not published while noise is on.
    """

    mechanism: Literal["none", "laplace", "gaussian"] = "none"
    epsilon_per_cell: Annotated[float, Field(gt=0, le=10)] = 1.0
    delta: Annotated[float, Field(gt=0, lt=0.01)] = 1e-6
    budget_per_period: Annotated[float, Field(gt=0)] = 20.0
    period_seconds: Annotated[int, Field(ge=60)] = 30 * 86400
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _merge_bounds(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            given = data.get("bounds") or {}
            if isinstance(given, Mapping):
                data = {**data, "bounds": {**DEFAULT_BOUNDS, **given}}
        return data

    @model_validator(mode="after")
    def _rules(self) -> DPConfig:
        for key, (lo, hi) in self.bounds.items():
            group, _, name = key.partition(".")
            if group not in FIELD_GROUPS or not name:
                raise ValueError(f"dp.bounds: {key!r} must be '<group>.<field>' with a group "
                                 f"of {list(FIELD_GROUPS)}")
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"dp.bounds.{key}: need finite lo < hi, got ({lo}, {hi})")
        if self.mechanism == "gaussian" and self.epsilon_per_cell > 1:
            raise ValueError("dp.epsilon_per_cell: the Gaussian mechanism's calibration holds "
                             "for ε <= 1 only")
        if self.mechanism != "none" and self.budget_per_period < self.epsilon_per_cell:
            raise ValueError("dp.budget_per_period is below dp.epsilon_per_cell: no cell could "
                             "ever be published")
        return self

    @property
    def enabled(self) -> bool:
        return self.mechanism != "none"

    def period_of(self, window_start: int) -> int | None:
        """The start of the budget period ``window_start`` spends from (None: noise off)."""
        if not self.enabled:
            return None
        return (window_start // self.period_seconds) * self.period_seconds


class BridgeConfig(Frozen):
    """Everything ``pear-mqtt bridge`` needs (load it with :class:`BridgeConfigManager`).

    Windows are ``window_seconds`` long, aligned to the epoch (UTC). A window is published
    once it ended at least ``publication_lag_seconds`` ago and no input arrived for it during
    the last ``settle_seconds`` (but no later than ``max_settle_seconds`` after it became due,
    or after its first input for a window backfilled later, so a trickle cannot hold it back
    forever). ``state_path`` is the SQLite file that carries
    windows, counted item ids, the ε ledger and the outboxes across restarts.

    With ``consortium_output`` (needs a consortium source) the bridge also publishes the
    consortium's own aggregates on the consortium broker, signed with its consortium
    certificate, once a window ended ``consortium_lag_seconds`` ago (at most the
    publication lag); from then on the window takes no more items, so the public later
    gets statistics over exactly the same items (see docs/BRIDGE.md).
    """

    bridge_id: NodeId = "bridge"
    consortium: SourceConfig | None = None
    private: list[SourceConfig] = Field(default_factory=list)
    public: PublicConfig
    min_companies: Annotated[int, Field(ge=2, le=100_000)] = 5
    dominance_cap: Annotated[float, Field(gt=0, le=1)] = 0.25
    window_seconds: Annotated[int, Field(ge=60, le=366 * 86400)] = 86400
    publication_lag_seconds: Annotated[int, Field(ge=0)] = 90 * 86400
    consortium_output: bool = False
    consortium_lag_seconds: Annotated[int, Field(ge=0)] = 7 * 86400
    settle_seconds: Annotated[float, Field(ge=0)] = 60.0
    max_settle_seconds: Annotated[float, Field(ge=0)] = 3600.0
    max_clock_skew: Annotated[float, Field(ge=0)] = 300.0
    dp: DPConfig = Field(default_factory=DPConfig)
    state_path: Path = Path("pear-bridge.sqlite")
    tick_seconds: Annotated[float, Field(gt=0, le=3600)] = 1.0
    instance: Annotated[int, Field(ge=0)] = 0
    instances: Annotated[int, Field(ge=1, le=64)] = 1

    @model_validator(mode="after")
    def _rules(self) -> BridgeConfig:
        if self.instance >= self.instances:
            raise ValueError(f"instance must be below instances ({self.instances}), got "
                             f"{self.instance}")
        if self.instances > 1 and (self.consortium is None
                                   or self.consortium.aggregator_key_file is None):
            raise ValueError("instances > 1 needs a consortium source with an "
                             "aggregator_key_file: the instances hand their sealed partial "
                             "sums to the merger over the consortium broker")
        if self.consortium is not None and self.consortium.mode != "consortium":
            raise ValueError("consortium.mode must be 'consortium' (private brokers go in "
                             "[[private]])")
        seen: set[tuple[str, str]] = set()
        for i, src in enumerate(self.private):
            if src.mode != "private":
                raise ValueError(f"private[{i}].mode must be 'private'")
            key = (src.network_id, src.company_id or "")
            if key in seen:
                raise ValueError(f"private[{i}]: {key} is configured twice")
            seen.add(key)
        if self.consortium is None and not self.private and not self.public.contributions:
            raise ValueError("nothing to aggregate: configure consortium, private sources, or "
                             "public.contributions")
        if self.consortium_output and self.consortium is None:
            raise ValueError("consortium_output needs a consortium source (its broker and "
                             "the bridge's certificate there)")
        if self.consortium_output and self.consortium_lag_seconds > \
                self.publication_lag_seconds:
            raise ValueError("consortium_lag_seconds must not exceed publication_lag_seconds "
                             "(the consortium's aggregates come first)")
        if self.max_settle_seconds < self.settle_seconds:
            raise ValueError("max_settle_seconds must not be below settle_seconds")
        if self.dp.enabled and self.dp.period_seconds < self.window_seconds:
            raise ValueError("dp.period_seconds must be at least window_seconds (a window "
                             "spends from one period)")
        return self

    def role_state_path(self, role: BridgeRole) -> Path:
        """The state file of ``role``: ``state_path`` for a single bridge; next to it,
        ``<stem>.w<instance><suffix>`` for a scale-out worker and ``<stem>.merge<suffix>``
        for the merger."""
        if role == "single":
            return self.state_path
        tag = "merge" if role == "merge" else f"w{self.instance}"
        return self.state_path.with_name(f"{self.state_path.stem}.{tag}"
                                         f"{self.state_path.suffix}")

    def history_dir(self, role: BridgeRole, audience: Literal["public", "consortium"] = "public"
                    ) -> Path | None:
        """Where ``role`` keeps the history log of what it publishes to ``audience``
        (docs/HISTORY.md, "The bridge's log"): that broker's ``reliability.history_path``,
        else ``<state file>.history`` (the consortium's: ``<state file>.consortium.history``)
        next to the role's state file; None when its ``reliability.history`` is off, for a
        scale-out worker (which publishes no aggregates), and for the consortium without
        ``consortium_output``."""
        source = self.public if audience == "public" else self.consortium
        if role == "worker" or source is None or (audience == "consortium"
                                                   and not self.consortium_output):
            return None
        rel = source.reliability
        if not rel.history:
            return None
        if rel.history_path is not None:
            return rel.history_path
        state = self.role_state_path(role)
        tag = "" if audience == "public" else ".consortium"
        return state.with_name(f"{state.name}{tag}.history")

    def sources(self) -> list[tuple[str, SourceConfig]]:
        """The consortium and private sources, each with its name in error messages."""
        out = [("consortium", self.consortium)] if self.consortium else []
        return [*out, *((f"private[{i}]", s) for i, s in enumerate(self.private))]

    def policy_document(self) -> dict[str, Any]:
        """Everything that decides what the bridge discloses, as plain data."""
        sources = [_source_policy(s) for _, s in self.sources()]
        if self.public.contributions:
            sources.append({"mode": "public", "network": self.public.network_id,
                            "levels": {g: v.value for g, v in self.public.policy().items()}})
        dp: dict[str, Any] = {"mechanism": self.dp.mechanism}
        # Only when on, so that the policy version of a bridge without it stays as it was.
        consortium: dict[str, Any] = (
            {"consortium_lag_seconds": self.consortium_lag_seconds}
            if self.consortium_output else {})
        if self.dp.enabled:
            dp.update(epsilon_per_cell=self.dp.epsilon_per_cell,
                      budget_per_period=self.dp.budget_per_period,
                      period_seconds=self.dp.period_seconds,
                      bounds={k: list(v) for k, v in sorted(self.dp.bounds.items())})
            if self.dp.mechanism == "gaussian":
                dp["delta"] = self.dp.delta
        return {"network": self.public.network_id, "min_companies": self.min_companies,
                "dominance_cap": self.dominance_cap, "window_seconds": self.window_seconds,
                "publication_lag_seconds": self.publication_lag_seconds, "dp": dp,
                "sources": sources, **consortium}

    def policy_version(self) -> str:
        """A short hash of :meth:`policy_document`: changes whenever the disclosure rules do."""
        text = json.dumps(self.policy_document(), sort_keys=True, separators=(",", ":"))
        return "p" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _source_policy(src: SourceConfig) -> dict[str, Any]:
    return {"mode": src.mode, "network": src.network_id, "company": src.company_id,
            "domain": src.identity_domain, "member": src.member,
            "include_full": src.aggregate_full,
            "levels": {g: v.value for g, v in src.policy().items()}}


# -- loading and saving --------------------------------------------------------------------

def _env_layer(environ: Mapping[str, str], prefix: str) -> dict[str, Any]:
    # The shared reader skips names that are no field; under the bridge's own prefix such a
    # name is a typo, refused as an unknown key in the file would be.
    for name, value in environ.items():
        upper = name.upper()
        if value != "" and upper.startswith(prefix):
            key = upper[len(prefix):].split("__", 1)[0].lower()
            if key not in BridgeConfig.model_fields:
                raise ConfigError(f"environment: {upper} is not a bridge setting (known: "
                                  f"{', '.join(sorted(BridgeConfig.model_fields))})")
    try:
        return EnvReader(BridgeConfig, prefix=prefix).read(environ)
    except ValidationError as exc:
        raise _validation_error(exc, "environment: invalid bridge configuration") from exc


def _validation_error(exc: ValidationError, header: str) -> ConfigError:
    # Input values are never echoed: they may be keys.
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        ctx = err.get("ctx") or {}
        msg = str(ctx["error"]) if "error" in ctx else str(err["msg"])
        where = loc_str(err["loc"])
        problems.append(msg if not where or msg.startswith(where) else f"{where}: {msg}")
    return config_error(header, problems)


class BridgeConfigManager:
    """Loads, checks and saves :class:`BridgeConfig`, in the manner of
    :class:`pear_mqtt.config.manager.NetworkConfigManager`.

    Layers, each overriding the one before, merged down to the leaves of nested tables: a
    TOML or JSON file < the environment (``PEAR_BRIDGE_`` prefix, ``__`` between nested keys,
    names case-insensitive, tables and arrays as JSON) < keyword arguments::

        config = BridgeConfigManager.load(file="bridge.toml")
        PEAR_BRIDGE_MIN_COMPANIES=7 PEAR_BRIDGE_DP__MECHANISM=laplace pear-mqtt bridge ...

    Every problem is a :class:`~pear_mqtt.errors.ConfigError` naming the field path; input
    values are never echoed (they may be keys).
    """

    ENV_PREFIX = "PEAR_BRIDGE_"
    SUFFIXES: ClassVar[tuple[str, ...]] = SUFFIXES

    @classmethod
    def read_file(cls, path: Path | str) -> dict[str, Any]:
        """The raw tables of a TOML or JSON file."""
        return read_table_file(Path(path))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The settings ``PEAR_BRIDGE_*`` variables of ``env`` (default ``os.environ``) set."""
        return _env_layer(os.environ if env is None else env, cls.ENV_PREFIX)

    @classmethod
    def load(cls, *, file: Path | str | None = None, env: Mapping[str, str] | None = None,
             **overrides: Any) -> BridgeConfig:
        """The effective configuration: ``file`` < environment < ``overrides``."""
        layers: list[Mapping[str, Any]] = []
        sources: list[str] = []
        if file is not None:
            layers.append(cls.read_file(file))
            sources.append(str(file))
        env_layer = cls.from_env(env)
        if env_layer:
            layers.append(env_layer)
            sources.append("environment")
        kw = {k: v for k, v in overrides.items() if v is not None}
        if kw:
            layers.append(kw)
            sources.append("arguments")
        data = deep_merge(*layers)
        origin = f" (from {', '.join(sources)})" if sources else ""
        try:
            config = BridgeConfig.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc, f"invalid bridge configuration{origin}") from exc
        return cls.validate(config)

    @classmethod
    def validate(cls, config: BridgeConfig, *, for_connect: bool = False) -> BridgeConfig:
        """What the model cannot check alone; with ``for_connect`` also that every key and
        certificate file is readable. Returns ``config`` unchanged or raises ConfigError."""
        problems: list[str] = []
        for name, src in config.sources():
            for kid, secret in src.encryption.keys.items():
                key = decode_key(secret.get_secret_value())
                if key is None or len(key) != _GROUP_KEY_BYTES:
                    problems.append(f"{name}.encryption.keys.{kid}: not a base64 AES-256 key "
                                    f"({_GROUP_KEY_BYTES} bytes)")
        if for_connect:
            files: list[tuple[str, Path | None]] = []
            for name, src in config.sources():
                files += [(f"{name}.tls.{f}", getattr(src.tls, f))
                          for f in ("ca_file", "cert_file", "key_file")]
                if SharingLevel.AGGREGATED in src.policy().values():
                    files.append((f"{name}.aggregator_key_file", src.aggregator_key_file))
            pub = config.public
            files += [(f"public.tls.{f}", getattr(pub.tls, f))
                      for f in ("ca_file", "cert_file", "key_file")]
            if pub.contributions:
                files.append(("public.aggregator_key_file", pub.aggregator_key_file))
            for what, path in files:
                if path is None:
                    problems.append(f"{what} is required")
                elif not os.access(path, os.R_OK) or not Path(path).is_file():
                    problems.append(f"{what}: {path} is missing or unreadable")
        if problems:
            raise config_error("invalid bridge configuration:", problems)
        return config

    @classmethod
    def warnings(cls, config: BridgeConfig) -> list[str]:
        """What is allowed but probably not meant."""
        out: list[str] = []
        if config.min_companies < 5:
            out.append(f"min_companies is {config.min_companies}; the recommended floor for "
                       "public aggregates is 5 distinct companies")
        if config.dominance_cap > 0.25:
            out.append(f"dominance_cap is {config.dominance_cap:.0%}; 25 % is the usual "
                       "safety-zone ceiling")
        if config.publication_lag_seconds < 90 * 86400:
            out.append(f"publication_lag_seconds is {config.publication_lag_seconds} s "
                       f"({config.publication_lag_seconds / 86400:.1f} days); public price "
                       "statistics are usually held back at least 90 days")
        for name, src in config.sources():
            levels = src.policy()
            if SharingLevel.AGGREGATED in levels.values() and src.aggregator_key_file is None:
                out.append(f"{name}.aggregator_key_file is not set: sealed contributions of "
                           f"{src.network_id} cannot be opened and will be dropped")
            if src.mode == "private" and src.member is None:
                out.append(f"{name}: no member/domain given, so {src.company_id} counts as "
                           "its own identity domain and cannot merge with its consortium "
                           "identity (cells mixing both are judged conservatively)")
        return out

    @classmethod
    def to_dict(cls, config: BridgeConfig, *, include_secrets: bool = False
                ) -> tuple[dict[str, Any], list[str]]:
        """``config`` as plain TOML/JSON data, and the paths of secrets left out."""
        return plain_data(config, secrets="include" if include_secrets else "omit")

    @classmethod
    def save(cls, config: BridgeConfig, path: Path | str, *,
             include_secrets: bool = False) -> list[str]:
        """Write ``config`` as TOML or JSON (by suffix); 0600 when it holds secrets.

        Returns the secret paths left out (all of them unless ``include_secrets``).
        """
        target = Path(path)
        data, omitted = cls.to_dict(config, include_secrets=include_secrets)
        if config_suffix(target) == ".json":
            text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        else:
            text = dumps_toml(data, [f"pear_mqtt bridge configuration (public network "
                                     f"{config.public.network_id!r}, policy "
                                     f"{config.policy_version()})"])
        write_config_file(target, text, private=include_secrets, make_parents=True)
        return omitted
