"""The package version, in a module of its own so that any module can import it (= pyproject.toml's)."""

__version__ = "0.1.0"
