"""The installed package version (its own module, so that code inside the package can read it without
importing the package ``__init__`` and closing an import cycle)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cellsymphony")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
