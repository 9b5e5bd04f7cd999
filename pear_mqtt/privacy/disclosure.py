"""The disclosure rules: which sharing level governs each field an insight can carry (a
derived field follows the field it derives from), and the checks a published insight and a
sealed contribution must pass. The filter applies them, the wire models and the bridge's
admission enforce them; docs/DESIGN.md states them in words.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from ..model.insight import PriceData, SalesData, SharingLevel, TrendData
from .ranges import ValueRange

__all__ = [
    "ADDITIVE_FIELDS",
    "CHANGE_FIELDS",
    "DERIVED_FROM",
    "FIELDS",
    "SAMPLE_SIZE_SOURCE",
    "TEXT_FIELDS",
    "Action",
    "check_contribution",
    "check_shared",
    "field_action",
    "field_level",
    "more_restrictive",
    "sample_size_level",
]

ADDITIVE_FIELDS: frozenset[str] = frozenset({"units", "revenue", "transactions"})
"""Numeric fields that add up across stores of a company (sums); every other field is averaged."""

FIELDS: dict[str, frozenset[str]] = {
    "price_data": frozenset(PriceData.model_fields),
    "sales_data": frozenset(SalesData.model_fields),
    "trends": frozenset(TrendData.model_fields),
}
"""The fields each group may hold: those of its model, nothing else."""

TEXT_FIELDS: frozenset[tuple[str, str]] = frozenset({("price_data", "currency"),
                                                     ("trends", "direction")})
"""The (group, field) pairs that hold text; every other field holds a number."""

DERIVED_FROM: dict[tuple[str, str], str] = {
    ("trends", "price_change_pct"): "price_data",
    ("trends", "direction"): "price_data",
    ("trends", "demand_change_pct"): "sales_data",
}
"""The group a derived field is computed from: it never discloses more than that group."""

CHANGE_FIELDS: frozenset[tuple[str, str]] = frozenset({("trends", "price_change_pct"),
                                                       ("trends", "demand_change_pct")})
"""Changes over the previous window. Under ``ranges_only`` they are not published at all: an
exact or bucketed change combined with successive buckets narrows the value itself below its
bucket."""

SAMPLE_SIZE_SOURCE = "sales_data"
"""``sample_size`` is the window's transaction count: it follows the sales group's level."""

# Per group, per field: (holds text, source group of a derived field, is a change). Built once
# so that checking a received insight costs a dict lookup per field.
_SPEC: dict[str, dict[str, tuple[bool, str | None, bool]]] = {
    group: {name: ((group, name) in TEXT_FIELDS, DERIVED_FROM.get((group, name)),
                   (group, name) in CHANGE_FIELDS) for name in names}
    for group, names in FIELDS.items()}

_RANK = {SharingLevel.NONE: 0, SharingLevel.AGGREGATED: 1, SharingLevel.RANGES_ONLY: 2,
         SharingLevel.FULL: 3}
_SHAREABLE = (SharingLevel.FULL, SharingLevel.RANGES_ONLY)
_DIRECTIONS = frozenset({"up", "down", "flat"})

Action = Literal["exact", "bucket", "text", "seal", "drop"]
"""What the filter does with one field: publish it exactly, publish its bucket, publish it as
text, seal it to the aggregator, or leave it out."""


def more_restrictive(a: SharingLevel, b: SharingLevel) -> SharingLevel:
    """The level that discloses less (none < aggregated < ranges_only < full)."""
    return a if _RANK[SharingLevel(a)] <= _RANK[SharingLevel(b)] else b


def field_level(levels: Mapping[str, SharingLevel], group: str, field: str) -> SharingLevel:
    """The effective level of ``group.field`` under ``levels`` (a group left out is
    ``none``): the group's own, or for a derived field the more restrictive of the group's
    and its source's."""
    own = levels.get(group, SharingLevel.NONE)
    source = DERIVED_FROM.get((group, field))
    if source is None:
        return SharingLevel(own)
    return more_restrictive(own, levels.get(source, SharingLevel.NONE))


def sample_size_level(levels: Mapping[str, SharingLevel]) -> SharingLevel:
    """The effective level of ``sample_size`` under ``levels``."""
    return SharingLevel(levels.get(SAMPLE_SIZE_SOURCE, SharingLevel.NONE))


def field_action(levels: Mapping[str, SharingLevel], group: str, field: str) -> Action:
    """What the filter does with ``group.field`` under ``levels``."""
    level = field_level(levels, group, field)
    if (group, field) in TEXT_FIELDS:
        # Text is never aggregated: a currency only labels the sealed prices.
        return "text" if level in _SHAREABLE else "drop"
    if level is SharingLevel.FULL:
        return "exact"
    if level is SharingLevel.RANGES_ONLY:
        return "drop" if (group, field) in CHANGE_FIELDS else "bucket"
    if level is SharingLevel.AGGREGATED:
        return "seal"
    return "drop"


def check_shared(levels: Mapping[str, SharingLevel], groups: Mapping[str, Mapping[str, object]],
                 sample_size: object) -> None:
    """The rules of a published insight; ValueError naming the offending field.

    ``levels`` names the level of every group in ``groups`` and nothing else; a group with no
    field of its own is there only as the source of a published derived field (its level
    lets the reader check that field). Each group holds only its own fields: exact numbers at
    ``full``, buckets at ``ranges_only``, text as is. A derived field is present only where
    its effective level allows; ``sample_size`` is exact only at ``full`` sales, a bucket only
    at ``ranges_only`` sales, and absent otherwise.
    """
    if levels.keys() != groups.keys():
        raise ValueError("levels must name exactly the groups present")
    full, ranges = SharingLevel.FULL, SharingLevel.RANGES_ONLY
    for group, level in levels.items():
        spec = _SPEC.get(group)
        if spec is None:
            raise ValueError(f"unknown field group {group!r}")
        if level is not full and level is not ranges:
            raise ValueError(f"group {group!r} at level {SharingLevel(level).value!r} cannot "
                             "be shared in an insight")
        for name, value in groups[group].items():
            field = spec.get(name)
            if field is None:
                raise ValueError(f"{group}.{name}: not a field of {group}")
            text, source, change = field
            kind = type(value)
            if text:
                if not isinstance(value, str) or not _valid_text(name, value):
                    raise ValueError(f"{group}.{name}: not a valid {name}")
            # Fast path for the allowed cases (isinstance on a pydantic model is slow).
            elif not (kind is float if level is full else kind is ValueRange):
                if isinstance(value, bool) or not isinstance(value, int | float | ValueRange):
                    raise ValueError(f"{group}.{name}: not a number")
                if level is full:
                    if isinstance(value, ValueRange):
                        raise ValueError(f"{group}.{name}: a full group holds exact values")
                elif not isinstance(value, ValueRange):
                    raise ValueError(f"{group}.{name}: a ranges_only group holds no exact "
                                     "numbers")
            if source is not None:
                # Its effective level (the more restrictive of its group's and its source's)
                # must publish it: a change only at full, text at full or ranges_only.
                src = levels.get(source)
                if not ((level is full and src is full) if change
                        else (src is full or src is ranges)):
                    raise ValueError(f"{group}.{name}: not published at {group} "
                                     f"{SharingLevel(level).value!r} with {source} at "
                                     f"{_named(levels, source)}")
    if sample_size is not None:
        source_level = levels.get(SAMPLE_SIZE_SOURCE)
        exact = type(sample_size) is int
        if not ((source_level is full and exact)
                or (source_level is ranges and isinstance(sample_size, ValueRange))):
            raise ValueError(f"sample_size: {'an exact' if exact else 'a bucketed'} sample size "
                             f"needs sales_data at {'full' if exact else 'ranges_only'}, not "
                             f"{_named(levels, SAMPLE_SIZE_SOURCE)}")
    for group, fields in groups.items():
        if not fields and group not in _sources(groups, sample_size):
            raise ValueError(f"group {group!r} is empty and no published field derives from it")


def _sources(groups: Mapping[str, Mapping[str, object]], sample_size: object) -> set[str]:
    """The groups the published derived fields (and sample size) of ``groups`` derive from."""
    out = {SAMPLE_SIZE_SOURCE} if sample_size is not None else set()
    for group, fields in groups.items():
        out.update(source for name in fields
                   if (source := DERIVED_FROM.get((group, name))) is not None)
    return out


def check_contribution(values: Mapping[str, Mapping[str, float]]) -> None:
    """The rules of a sealed contribution's values (ValueError naming the field): known
    numeric fields of known groups, additive ones not negative."""
    for group, fields in values.items():
        known = FIELDS.get(group)
        if known is None:
            raise ValueError(f"unknown field group {group!r}")
        for name, value in fields.items():
            if name not in known or (group, name) in TEXT_FIELDS:
                raise ValueError(f"{group}.{name}: not a numeric field of {group}")
            if name in ADDITIVE_FIELDS and value < 0:
                raise ValueError(f"{group}.{name}: an additive metric cannot be negative")


def _valid_text(name: str, value: str) -> bool:
    if name == "direction":
        return value in _DIRECTIONS
    return len(value) == 3 and value.isascii() and value.isalpha() and value.isupper()


def _named(levels: Mapping[str, SharingLevel], group: str) -> str:
    level = levels.get(group)
    return "an unnamed level" if level is None else repr(SharingLevel(level).value)

