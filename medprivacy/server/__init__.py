"""Inference server (FastAPI + uvicorn). Needs the ``server`` extra: ``pip install medprivacy[server]``.

``create_app(ServerConfig(...))`` builds the application; ``medprivacy serve`` (or ``python -m medprivacy.server``)
runs it.
"""

from __future__ import annotations

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str):
    # Lazy, so `medprivacy serve --help` and the startup refusals do not wait for fastapi and torch to import.
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
