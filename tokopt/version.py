"""tokopt's version (engine manifests record it)."""

__version__ = "0.1.0"
