"""How long work learns that the user pressed Cancel: a callable returning True, a threading.Event, or None.

Shared by the algorithms (the Mixup pipeline checks between requests), the HTTP clients (between uploads) and the
Slicer modules, which is why it lives at the bottom of the package rather than in any of them.
"""

from __future__ import annotations

import threading
from typing import Callable, Union

from .errors import InputError

Cancel = Union[Callable[[], bool], threading.Event, None]


def cancel_check(cancel: Cancel) -> Callable[[], bool]:
    """A no-argument predicate from a cancel callable, a threading.Event or None."""
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise InputError("cancel must be a callable returning bool or a threading.Event")
