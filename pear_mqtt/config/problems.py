"""Config problems as one :class:`~pear_mqtt.errors.ConfigError`: a header, then one line per
problem naming the field path (or environment variable) and the rule, never a secret's value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from .env import env_name

__all__ = ["ProblemWriter", "config_error", "loc_str"]


def loc_str(loc: Iterable[int | str]) -> str:
    """A pydantic error location as a field path: ``privacy.range_edges.dairy[2]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def config_error(header: str, problems: list[str]) -> ConfigError:
    """``header``, then each problem on its own indented line."""
    return ConfigError(header + "".join(f"\n  - {p}" for p in problems))


@dataclass(frozen=True, slots=True)
class ProblemWriter:
    """Describes the validation errors of one config model (``root``), whose environment
    variables start with ``env_prefix``."""

    root: type[BaseModel]
    env_prefix: str

    def error(self, exc: ValidationError, header: str, *, env: bool = False,
              layered: bool = False) -> ConfigError:
        """``exc`` as a :class:`ConfigError` under ``header``; ``env`` names environment
        variables rather than field paths; ``layered`` says where a missing field can be set."""
        errors = exc.errors(include_url=False)
        return config_error(header, [self.describe(err, env=env, layered=layered)
                                     for err in errors])

    def describe(self, err: Mapping[str, Any], *, env: bool = False,
                 layered: bool = False) -> str:
        """One pydantic error as ``where: rule``."""
        loc: tuple[int | str, ...] = tuple(err["loc"])
        kind: str = err["type"]
        where = env_name(loc, prefix=self.env_prefix) if env and loc else loc_str(loc)
        if kind in ("value_error", "assertion_error") and "error" in err.get("ctx", {}):
            msg = str(err["ctx"]["error"])
        elif kind == "missing":
            msg = "is required"
            if layered and len(loc) == 1:
                msg += (f" (set it in the config file, with {self.env_prefix}"
                        f"{str(loc[0]).upper()}, or as {loc[0]}=...)")
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            # pydantic would name our internal Partial* model here.
            msg = "should be a JSON object" if env else "should be a table (TOML) or object (JSON)"
            msg += self._got(err, loc)
        elif kind == "extra_forbidden":
            parent = self._model_at(loc[:-1])
            known = f" (known keys: {', '.join(parent.model_fields)})" if parent else ""
            msg = f"unknown key{known}"
        else:
            msg = str(err["msg"]) + self._got(err, loc)
        # Our own validators often start their message with the field path already.
        if not where or msg.startswith((f"{where}:", f"{where} ")):
            return msg
        return f"{where}: {msg}"

    def _model_at(self, loc: tuple[int | str, ...]) -> type[BaseModel] | None:
        """The sub-model of ``root`` that ``loc`` points into, if any."""
        model = self.root
        for part in loc:
            info = model.model_fields.get(str(part))
            annotation = info.annotation if info is not None else None
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return None
            model = annotation
        return model

    def _is_secret(self, loc: tuple[int | str, ...]) -> bool:
        model = self.root
        for part in loc:
            info = model.model_fields.get(str(part))
            if info is None:
                return False
            if "SecretStr" in repr(info.annotation):
                return True
            if not (isinstance(info.annotation, type)
                    and issubclass(info.annotation, BaseModel)):
                return False
            model = info.annotation
        return False

    def _got(self, err: Mapping[str, Any], loc: tuple[int | str, ...]) -> str:
        """`` (got 'x')`` for a scalar input that is not a secret, else nothing."""
        value = err.get("input")
        if self._is_secret(loc) or not isinstance(value, str | int | float | bool):
            return ""
        shown = repr(value)
        return f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
