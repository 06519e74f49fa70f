"""FastAPI inference server: segments mixed patches it cannot read and keeps nothing it receives.

The server holds the manifest entries with role "server": ``mixup-seg`` (trained on mixed patches; the only model a
clinical deployment needs) and ``plain-seg`` (a baseline on unmixed patches, served only with
``enable_baseline`` because whoever calls it sends readable images). Entries with task "classify" or
"segment-lesion" are the MedLocker models behind ``/v1/watermark/*`` (see the ``watermark`` package beside this
file). ObfuscationPrivacy needs no shipped model: clients upload obfuscated frames and the server trains their
classifiers (``/v1/obfuscation/*``, see the ``obfuscation`` package).

The app is built here with its own routes (health, info, mixup, baseline); ``service`` holds what is served and
``guards`` what every request goes through.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..transport.contract import HEALTH_PATH, INFO_PATH
from ..transport.wire import CONTENT_TYPE
from .guards import add_error_handlers, request_guards
from .schema import NoQuery, RequestError as _HTTPError, parse_query
from .service import BASELINE, MIXUP, InferenceService, ServerConfig

BASELINE_DISABLED = (
    "baseline endpoint is disabled on this server; start it with --enable-baseline "
    "(evaluation only: it receives unmixed images)"
)


def create_app(config: ServerConfig) -> FastAPI:
    """Build the FastAPI application; models are read from the manifest now and loaded on first use.

    Call ``app.state.service.load_models()`` to load the weights before serving (the CLI does).
    """
    service = InferenceService(config)
    # No interactive docs or schema: nothing here is for browsing, and less surface is less to secure.
    app = FastAPI(
        title="MedPrivacy inference server", version=__version__, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.service = service
    add_error_handlers(app)
    guards = request_guards(config)

    async def segment(request: Request, kind: str) -> Response:
        guards.check_api_version(request)
        parse_query(request.query_params, NoQuery)
        dtype = guards.response_dtype(request)
        body = await guards.read_body(request, CONTENT_TYPE)
        answer = await run_in_threadpool(service.segment, kind, body, dtype)
        return Response(content=answer, media_type=CONTENT_TYPE)

    @app.get(HEALTH_PATH)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(INFO_PATH, dependencies=[Depends(guards.require_token)])
    async def info() -> dict[str, Any]:
        return service.info()

    @app.post(MIXUP.path, dependencies=[Depends(guards.require_token)])
    async def mixup_segment(request: Request) -> Response:
        if MIXUP.kind not in service.models:
            raise _HTTPError(404, "this server holds no mixup-seg model (MedLocker models only)")
        return await segment(request, MIXUP.kind)

    @app.post(BASELINE.path, dependencies=[Depends(guards.require_token)])
    async def baseline_segment(request: Request) -> Response:
        if BASELINE.kind not in service.models:
            raise _HTTPError(404, BASELINE_DISABLED)
        return await segment(request, BASELINE.kind)

    from .watermark import add_watermark_routes

    add_watermark_routes(
        app,
        service,
        require_token=guards.require_token,
        check_api_version=guards.check_api_version,
        read_body=guards.read_body,
        response_dtype=guards.response_dtype,
    )
    from .obfuscation import add_obfuscation_routes

    add_obfuscation_routes(
        app,
        service,
        require_token=guards.require_token,
        check_api_version=guards.check_api_version,
        read_body=guards.read_body,
    )
    return app
