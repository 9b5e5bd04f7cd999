"""The environment as a configuration layer, read with pydantic-settings: ``PEAR_`` prefix,
``__`` between nested keys, names case-insensitive, empty values unset, complex values JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache, cached_property
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, create_model

from ..errors import ConfigError
from .layers import partial_dump, partial_fields

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings

__all__ = ["ENV_NESTED_DELIMITER", "ENV_PREFIX", "EnvReader", "env_name"]

ENV_PREFIX = "PEAR_"
ENV_NESTED_DELIMITER = "__"


def env_name(loc: Iterable[int | str], *, prefix: str = ENV_PREFIX) -> str:
    """The variable that sets the field at ``loc``: ``PEAR_TLS__CA_FILE``."""
    return prefix + ENV_NESTED_DELIMITER.join(str(p).upper() for p in loc)


@cache
def _settings_base() -> type[BaseSettings]:
    """The base of every env settings model; pydantic-settings is imported only here, when a
    process first reads a variable that sets a field (it and the settings model of the
    whole config cost an edge agent ~1.4 MB of its peak memory)."""
    from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

    class _SettingsBase(BaseSettings):
        model_config = SettingsConfigDict(
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
            # EnvReader.read): never from os.environ, .env files or secret dirs behind its back.
            return (init_settings,)

    return _SettingsBase


class EnvReader:
    """Reads the settings of the config model ``model`` that an environment sets."""

    def __init__(self, model: type[BaseModel], *, prefix: str = ENV_PREFIX) -> None:
        self.prefix = prefix
        self._model = model
        # The variables that could set a field (others, such as PEAR_LOG_FORMAT, are not
        # config and leave pydantic-settings unloaded).
        fields = [f"{prefix}{name}".lower() for name in model.model_fields]
        self._names = frozenset(fields)
        self._nested = tuple(f + ENV_NESTED_DELIMITER for f in fields)

    @cached_property
    def _settings(self) -> type[BaseSettings]:
        return create_model(f"{self._model.__name__}EnvSettings", __base__=_settings_base(),
                            **partial_fields(self._model))

    def read(self, environ: Mapping[str, str]) -> dict[str, Any]:
        """Only the settings ``environ`` sets, as a nested dict of typed values.

        Raises :class:`ConfigError` for a variable that cannot be parsed (invalid JSON) and
        :class:`pydantic.ValidationError` for values of the wrong type or unknown keys.
        """
        # Normalised as pydantic-settings would: names case-insensitive, empty values unset.
        env_vars = {name.lower(): value for name, value in environ.items() if value != ""}
        if not any(name in self._names or name.startswith(self._nested)
                   for name in env_vars):
            return {}
        from pydantic_settings import EnvSettingsSource, SettingsError

        source = EnvSettingsSource(self._settings, env_prefix=self.prefix)
        # The source snapshots os.environ on creation; point it at the caller's mapping.
        source.env_vars = env_vars
        try:
            raw = source()
        except (SettingsError, ValueError) as exc:
            raise ConfigError(f"environment: {exc}") from exc
        return partial_dump(self._settings(**raw))
