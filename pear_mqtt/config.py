"""Configuration: per-mode defaults, validation, and loading (NetworkConfigManager)."""

from __future__ import annotations

from .types import NetworkMode, SharingLevel

__all__ = ["default_sharing"]

_DEFAULT_SHARING: dict[NetworkMode, dict[str, SharingLevel]] = {
    NetworkMode.PRIVATE: {
        "price_data": SharingLevel.FULL,
        "sales_data": SharingLevel.FULL,
        "trends": SharingLevel.FULL,
    },
    NetworkMode.CONSORTIUM: {
        "price_data": SharingLevel.RANGES_ONLY,
        "sales_data": SharingLevel.AGGREGATED,
        "trends": SharingLevel.FULL,
    },
    NetworkMode.PUBLIC: {
        "price_data": SharingLevel.AGGREGATED,
        "sales_data": SharingLevel.AGGREGATED,
        "trends": SharingLevel.AGGREGATED,
    },
}


def default_sharing(mode: NetworkMode) -> dict[str, SharingLevel]:
    """The sharing level of every field group in ``mode`` when the config names none."""
    return dict(_DEFAULT_SHARING[NetworkMode(mode)])
