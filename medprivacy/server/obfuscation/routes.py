"""The ObfuscationPrivacy HTTP endpoints and their query/parameter models (the service does the work)."""

from __future__ import annotations

from typing import Optional

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ...transport.contract import (
    OBFUSCATION_CLASSIFY_PATH,
    OBFUSCATION_JOBS_PATH,
    OBFUSCATION_KEY_ID_HEADER,
    OBFUSCATION_MODELS_PATH,
    OBFUSCATION_TRAIN_PATH,
)
from ...transport.wire import CONTENT_TYPE
from ..schema import Name, NoQuery, RequestModel, parse_query
from .service import ObfuscationService


class ObfuscationClassifyQuery(RequestModel):
    model: Optional[Name] = None  # missing: a one-line 422 naming GET /v1/obfuscation/models


def add_obfuscation_routes(app, service, *, require_token, check_api_version, read_body) -> None:
    """Register the ObfuscationPrivacy endpoints on ``app``; the dependencies are the server's own checks."""
    obf: ObfuscationService = service.obfuscation

    @app.post(OBFUSCATION_TRAIN_PATH, dependencies=[Depends(require_token)])
    async def obfuscation_train(request: Request) -> JSONResponse:
        check_api_version(request)
        parse_query(request.query_params, NoQuery)
        body = await read_body(request, "application/json")
        return JSONResponse(await run_in_threadpool(obf.submit, body), status_code=202)

    @app.get(OBFUSCATION_JOBS_PATH, dependencies=[Depends(require_token)])
    async def obfuscation_jobs(request: Request) -> JSONResponse:
        check_api_version(request)
        parse_query(request.query_params, NoQuery)
        return JSONResponse(obf.list_jobs())

    @app.get(OBFUSCATION_JOBS_PATH + "/{job_id}", dependencies=[Depends(require_token)])
    async def obfuscation_job(request: Request, job_id: str) -> JSONResponse:
        check_api_version(request)
        parse_query(request.query_params, NoQuery)
        return JSONResponse(obf.job(job_id))

    @app.delete(OBFUSCATION_JOBS_PATH + "/{job_id}", dependencies=[Depends(require_token)])
    async def obfuscation_cancel(request: Request, job_id: str) -> JSONResponse:
        check_api_version(request)
        parse_query(request.query_params, NoQuery)
        return JSONResponse(obf.cancel(job_id))

    @app.get(OBFUSCATION_MODELS_PATH, dependencies=[Depends(require_token)])
    async def obfuscation_models(request: Request) -> JSONResponse:
        check_api_version(request)
        parse_query(request.query_params, NoQuery)
        return JSONResponse(obf.list_models())

    @app.post(OBFUSCATION_CLASSIFY_PATH, dependencies=[Depends(require_token)])
    async def obfuscation_classify(request: Request) -> JSONResponse:
        check_api_version(request)
        query = parse_query(request.query_params, ObfuscationClassifyQuery)
        body = await read_body(request, CONTENT_TYPE)
        answer = await run_in_threadpool(
            obf.classify, body, query.model, request.headers.get(OBFUSCATION_KEY_ID_HEADER)
        )
        return JSONResponse(answer)
