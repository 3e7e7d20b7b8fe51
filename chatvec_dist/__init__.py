"""chatvec_dist: add chat vectors (chat − base) to continually pre-trained models, at scale, on Ray."""
from __future__ import annotations

__version__ = "0.1.0"
