"""Container tests (a package, so its conftest does not shadow tests/integration's)."""
