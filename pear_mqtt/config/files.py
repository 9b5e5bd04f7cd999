"""Config files on disk: the one reader (TOML or JSON, bounded, with errors naming the file)
and the one writer (TOML through tomli-w, or JSON, replaced atomically with a chosen mode).
"""

from __future__ import annotations

import json
import stat
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from ..errors import ConfigError
from ..files import atomic_write

__all__ = ["SUFFIXES", "config_suffix", "dumps_toml", "read_table_file", "write_config_file"]

SUFFIXES = (".toml", ".json")
# A configuration is a few kilobytes; the cap keeps a wrong path (a log, a disk image) from
# being read into memory and parsed at length before it is refused.
_MAX_CONFIG_BYTES = 4 * 1024 * 1024


def config_suffix(path: Path) -> str:
    """The lower-case suffix of a config file, ``.toml`` or ``.json``; else a ConfigError."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        found = repr(path.suffix) if path.suffix else "(none)"
        raise ConfigError(f"{path}: unsupported config file suffix {found}; "
                          f"use {' or '.join(SUFFIXES)}")
    return suffix


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_table_file(path: Path) -> dict[str, Any]:
    """The top-level table of a TOML or JSON config file, with a :class:`ConfigError` naming
    the file for anything else: missing, a directory or FIFO, oversized, not UTF-8, invalid,
    duplicate JSON keys, nested too deeply."""
    suffix = config_suffix(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{path}: is a directory, not a config file")
    if not stat.S_ISREG(info.st_mode):
        # A FIFO or device would block or never end: refuse instead of hanging.
        raise ConfigError(f"{path}: not a regular file")
    if info.st_size > _MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file is {info.st_size} bytes; the limit is "
                          f"{_MAX_CONFIG_BYTES} (is this the right file?)")
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from exc
    data: Any
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            # Python 3.11 puts "(at line L, column C)" into the message itself.
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
        except RecursionError:
            raise ConfigError(f"{path}: invalid TOML: arrays or tables nest too deeply") from None
    else:
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicates)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from exc
        except ValueError as exc:
            raise ConfigError(f"{path}: invalid JSON: {exc}") from exc
        except RecursionError:
            raise ConfigError(f"{path}: invalid JSON: arrays or objects nest too deeply") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a JSON object, "
                              f"not {type(data).__name__}")
    table: dict[str, Any] = data
    return table


def dumps_toml(data: Mapping[str, Any], header: Iterable[str] = ()) -> str:
    """``data`` as a TOML document, after ``header`` as comment lines."""
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header)
    try:
        body = tomli_w.dumps(data)
    except TypeError as exc:
        raise ConfigError(f"cannot write this value as TOML: {exc}") from exc
    return comments + ("\n" if comments and body else "") + body


def write_config_file(path: Path, text: str, *, private: bool, make_parents: bool = False) -> None:
    """Replace the config file ``path`` with ``text``: mode 0600 when it holds secrets."""
    try:
        atomic_write(path, text, mode=0o600 if private else 0o644, make_parents=make_parents)
    except (OSError, UnicodeEncodeError) as exc:
        raise ConfigError(f"{path}: cannot write config file ({exc})") from exc
