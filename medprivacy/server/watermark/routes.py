"""The watermark endpoints on the FastAPI application; the request checks are the server's own (``app.py``)."""

from __future__ import annotations

import asyncio
import logging
import threading

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ...transport.contract import WATERMARK_CLASSIFY_PATH, WATERMARK_LESIONS_PATH, WATERMARK_OPTIMIZE_PATH
from ...transport.wire import CONTENT_TYPE
from ..schema import ClassifyQuery, LesionsQuery, NoQuery, parse_query
from .scoring import SearchCancelled
from .service import WatermarkService

log = logging.getLogger("medprivacy.server")


def add_watermark_routes(app, service, *, require_token, check_api_version, read_body, response_dtype) -> None:
    """Register the MedLocker endpoints on ``app``; the dependencies are the server's own checks."""
    wm: WatermarkService = service.watermark

    @app.post(WATERMARK_CLASSIFY_PATH, dependencies=[Depends(require_token)])
    async def watermark_classify(request: Request) -> JSONResponse:
        check_api_version(request)
        query = parse_query(request.query_params, ClassifyQuery)
        body = await read_body(request, CONTENT_TYPE)
        return JSONResponse(await run_in_threadpool(wm.classify, body, query.models))

    @app.post(WATERMARK_LESIONS_PATH, dependencies=[Depends(require_token)])
    async def watermark_lesions(request: Request) -> Response:
        check_api_version(request)
        query = parse_query(request.query_params, LesionsQuery)
        dtype = response_dtype(request)
        body = await read_body(request, CONTENT_TYPE)
        answer = await run_in_threadpool(wm.lesions, body, query.model, dtype)
        return Response(content=answer, media_type=CONTENT_TYPE)

    @app.post(WATERMARK_OPTIMIZE_PATH, dependencies=[Depends(require_token)])
    async def watermark_optimize(request: Request) -> JSONResponse:
        check_api_version(request)
        parse_query(request.query_params, NoQuery)
        body = await read_body(request, "application/json")
        cancel = threading.Event()
        task = asyncio.ensure_future(run_in_threadpool(wm.optimize, body, cancel))
        # A search can take minutes; a client that gave up should not keep the models busy.
        while True:
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if done:
                break
            if await request.is_disconnected():
                cancel.set()
        try:
            return JSONResponse(task.result())
        except SearchCancelled:
            log.info("watermark optimize: client disconnected, search stopped")
            return JSONResponse({"detail": "client disconnected; search stopped"}, status_code=499)
