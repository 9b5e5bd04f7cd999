"""The environment as a configuration layer, read with pydantic-settings: ``PEAR_`` prefix,
``__`` between nested keys, names case-insensitive, empty values unset, complex values JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, create_model
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from ..errors import ConfigError
from .layers import partial_dump, partial_fields

__all__ = ["ENV_NESTED_DELIMITER", "ENV_PREFIX", "EnvReader", "env_name"]

ENV_PREFIX = "PEAR_"
ENV_NESTED_DELIMITER = "__"


def env_name(loc: Iterable[int | str], *, prefix: str = ENV_PREFIX) -> str:
    """The variable that sets the field at ``loc``: ``PEAR_TLS__CA_FILE``."""
    return prefix + ENV_NESTED_DELIMITER.join(str(p).upper() for p in loc)


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


class EnvReader:
    """Reads the settings of the config model ``model`` that an environment sets."""

    def __init__(self, model: type[BaseModel], *, prefix: str = ENV_PREFIX) -> None:
        self.prefix = prefix
        self._settings: type[_SettingsBase] = create_model(
            f"{model.__name__}EnvSettings", __base__=_SettingsBase, **partial_fields(model))

    def read(self, environ: Mapping[str, str]) -> dict[str, Any]:
        """Only the settings ``environ`` sets, as a nested dict of typed values.

        Raises :class:`ConfigError` for a variable that cannot be parsed (invalid JSON) and
        :class:`pydantic.ValidationError` for values of the wrong type or unknown keys.
        """
        source = EnvSettingsSource(self._settings, env_prefix=self.prefix)
        # The source snapshots os.environ on creation; point it at the caller's mapping
        # instead, normalised as it would be: names case-insensitive, empty values unset.
        source.env_vars = {name.lower(): value for name, value in environ.items() if value != ""}
        try:
            raw = source()
        except (SettingsError, ValueError) as exc:
            raise ConfigError(f"environment: {exc}") from exc
        return partial_dump(self._settings(**raw))
