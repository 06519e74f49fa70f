"""ObfuscationPrivacy (Popescu et al. 2022): train and run classifiers remotely on frames nobody there can read back.

(Design notes: provisional, rewritten once the trade-off is measured.)
"""
from __future__ import annotations

DEFAULT_LEVELS = 32
DEFAULT_CODES = 8
DEFAULT_DITHER = 1.0
DEFAULT_TEMPERATURE = 0.5
