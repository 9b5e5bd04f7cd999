"""The ``pear-mqtt`` command line: all argument parsing lives in this package."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
