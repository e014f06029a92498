"""The package version, in a module that imports nothing (the daemon and wanctl print it)."""

__version__ = "0.1.0"
