"""MedPrivacy core: algorithms, networks, wire format, client and server. Never imports slicer or qt."""

from __future__ import annotations

__version__ = "0.1.0"
#: Bumped whenever the wire format or endpoint semantics change; client and server must agree.
API_VERSION = 1
