"""What every request to the inference server goes through before its route runs: the bearer token, the API
version, the body's type, size and pace (a client that stalls or trickles must not hold a connection forever), the
response dtype, and the handlers that turn refusals, vanished clients and bugs into one-line answers.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from ..transport.contract import API_HEADER, API_VERSION, RESPONSE_DTYPE_HEADER, RESPONSE_DTYPES
from .schema import RequestError as _HTTPError
from .service import ServerConfig

log = logging.getLogger("medprivacy.server")

#: The slowest average upload accepted once ``ServerConfig.request_timeout`` seconds have passed.
MIN_UPLOAD_BYTES_PER_S = 1024


class ClientGone(Exception):
    """The client closed the connection before its request body arrived: nobody is left to answer."""

    def __init__(self, received: int):
        super().__init__(f"client disconnected after {received} bytes")
        self.received = received


def add_error_handlers(app: FastAPI) -> None:
    """Refusals answer with their one-line detail, a client gone mid-upload gets nothing, a bug gets a 500."""

    @app.exception_handler(_HTTPError)
    async def _http_error(request: Request, exc: _HTTPError):
        headers = dict(exc.headers or {})
        if (
            request.method == "POST"
            and not getattr(request.state, "body_complete", False)
            and _large_or_unknown(request)
        ):
            # Refused before a large body was read: close instead of receiving megabytes nobody wants. A small
            # body is left for the connection to discard: closing with unread data makes the kernel reset the
            # connection, and the client could lose the answer explaining why.
            headers["Connection"] = "close"
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        # A client that gave up mid-upload is not a server error: one line, no traceback, nothing to answer.
        log.info(
            "client %s disconnected during the upload to %s after %d bytes; request dropped",
            request.client.host if request.client else "?",
            request.url.path,
            exc.received,
        )
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {
                "detail": f"internal server error ({type(exc).__name__}); "
                "the operator can find the cause in the server log"
            },
            status_code=500,
        )


@dataclass(frozen=True)
class RequestGuards:
    """The checks routes call or depend on, bound to one server's token and limits (``request_guards``)."""

    require_token: Callable
    check_api_version: Callable
    read_body: Callable
    response_dtype: Callable


def request_guards(config: ServerConfig) -> RequestGuards:
    token = config.token.encode("utf-8") if config.token is not None else None

    async def require_token(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise _HTTPError(
                401,
                "this server requires a bearer token; pass --token-file or set MEDPRIVACY_TOKEN on the client",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(given.strip().encode("utf-8"), token):
            log.warning("rejected a request with a wrong token from %s", request.client.host if request.client else "?")
            raise _HTTPError(403, "bearer token rejected; ask the server operator for the current token")

    def check_api_version(request: Request) -> None:
        given = request.headers.get(API_HEADER)
        # A missing header is allowed so an operator can probe with curl; a different version is not.
        if given is not None and given.strip() != str(API_VERSION):
            raise _HTTPError(
                409,
                f"client speaks MedPrivacy API version {given.strip()[:20]} "
                f"but this server speaks version {API_VERSION}; upgrade the older side so both match",
            )

    async def read_body(request: Request, content_type: str | None = None) -> bytes:
        """The whole request body, refused early when it has the wrong type, is too large, stalls or trickles.

        Every route that takes a body reads it through here, giving the ``content_type`` it expects (None skips
        that check, for routes written before it existed).
        """
        given = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type is not None and given != content_type:
            raise _HTTPError(
                415,
                f"this endpoint takes Content-Type {content_type}, not {given[:60] or 'none'}; "
                "send the body with that Content-Type header",
            )
        limit = config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise _HTTPError(400, "Content-Length header is not a number; fix the client") from None
            if size > limit:
                raise _HTTPError(413, _too_large(size, limit))
        timeout = config.request_timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        chunks, received = [], 0
        stream = request.stream()
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), timeout)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    log.info(
                        "request body from %s stalled after %d bytes; connection closed",
                        request.client.host if request.client else "?",
                        received,
                    )
                    raise _HTTPError(
                        408,
                        f"the request body stalled: nothing arrived for {timeout:g} s after {received} bytes; "
                        "check the network and send the request again",
                        headers={"Connection": "close"},
                    ) from None
                # Content-Length can be absent (chunked upload) or lie, so count while reading too.
                received += len(chunk)
                if received > limit:
                    raise _HTTPError(413, _too_large(received, limit, at_least=True))
                elapsed = loop.time() - started
                if elapsed > timeout and received < MIN_UPLOAD_BYTES_PER_S * elapsed:
                    raise _HTTPError(
                        408,
                        f"the request body arrives too slowly ({received / elapsed:.0f} bytes/s after "
                        f"{elapsed:.0f} s; at least {MIN_UPLOAD_BYTES_PER_S} needed); check the network",
                        headers={"Connection": "close"},
                    )
                chunks.append(chunk)
        except ClientDisconnect:
            raise ClientGone(received) from None
        finally:
            await stream.aclose()
        request.state.body_complete = True
        return b"".join(chunks)

    def response_dtype(request: Request) -> str:
        wanted = request.headers.get(RESPONSE_DTYPE_HEADER, "uint8").strip().lower()
        if wanted not in RESPONSE_DTYPES:
            raise _HTTPError(422, f"{RESPONSE_DTYPE_HEADER} must be uint8 or float16, not {wanted[:20]!r}")
        return wanted

    return RequestGuards(require_token, check_api_version, read_body, response_dtype)


def _large_or_unknown(request: Request, threshold: int = 1 << 20) -> bool:
    try:
        return int(request.headers.get("content-length", "")) > threshold
    except ValueError:
        return True


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    what = "request body exceeds" if at_least else f"request body of {size} bytes exceeds"
    return (
        f"{what} this server's limit of {limit} bytes; "
        "send fewer patches per request or ask the operator to raise --max-request-mb"
    )
