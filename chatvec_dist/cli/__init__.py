"""The `chatvec` command line."""

from .main import main

__all__ = ["main"]
