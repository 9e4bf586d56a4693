"""quantport's version, in a module of its own so that any part of the package can read it without
importing the package root (which would be an import cycle)."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
