"""Process- and connection-level protections of the server that the web framework does not give.

``limit_malloc_arenas``: glibc's malloc gives each thread that allocates its own arena (up to 8 per core), and
memory freed in an arena is rarely handed back to the system. The server answers requests from a pool of worker
threads, each allocating and freeing large buffers (decoded tensors, network activations), so under load every
worker grows its own heap: 8 clients for 9 minutes took the default server from 463 to 1716 MiB, while two arenas
kept it flat (933 -> 938 MiB). The limit must be set before the process starts many threads, so the ``serve``
entry points call this first, before numpy or torch are imported. An operator's own ``MALLOC_ARENA_MAX`` wins.

``request_timeout_protocol``: uvicorn drops idle keep-alive connections, but not a connection that never
finishes sending its request headers (nor one that sends nothing): a few such clients would hold sockets forever.
The protocol class below closes a connection whose request headers have not all arrived within the timeout,
with a 408 answer. The body of a request is timed by the application itself (``app.read_body``), which can
answer with a JSON error.
"""
from __future__ import annotations

import json
import logging
import os
import sys

#: Two arenas: the main one and one shared by the worker threads (what MALLOC_ARENA_MAX=2 gives).
DEFAULT_MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)

log = logging.getLogger("medprivacy.server")


_allocator: str | None = None


def limit_malloc_arenas(arenas: int = DEFAULT_MALLOC_ARENAS) -> str:
    """Cap glibc malloc arenas in this process (once); returns a short description of the allocator setting."""
    global _allocator
    if _allocator is None:
        _allocator = _limit_malloc_arenas(arenas)
    return _allocator


def _limit_malloc_arenas(arenas: int) -> str:
    given = os.environ.get("MALLOC_ARENA_MAX")
    if given:
        return f"MALLOC_ARENA_MAX={given} (set by the operator)"
    if not sys.platform.startswith("linux"):
        return "system allocator (no arena limit needed off Linux)"
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = libc.mallopt(_M_ARENA_MAX, int(arenas)) == 1
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt arenas
        return "system allocator (not glibc: arena limit not applicable)"
    if not applied:
        return "glibc allocator (mallopt refused the arena limit)"
    # Children (a DataLoader worker, a subprocess the operator adds) inherit the same behaviour.
    os.environ["MALLOC_ARENA_MAX"] = str(int(arenas))
    return f"glibc malloc limited to {int(arenas)} arenas (as MALLOC_ARENA_MAX={int(arenas)})"


def request_timeout_protocol(timeout: float):
    """A uvicorn h11 protocol class that closes connections whose request headers stall for ``timeout`` seconds."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps({"detail": f"request headers did not arrive within {timeout:g} s; connection closed"}).encode()
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
              b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class RequestTimeoutH11Protocol(H11Protocol):
        _request_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_request_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # The next request on this keep-alive connection gets a full timeout for its headers.
            self._arm_request_timer()

        def connection_lost(self, exc) -> None:
            if self._request_timer is not None:
                self._request_timer.cancel()
                self._request_timer = None
            super().connection_lost(exc)

        def _arm_request_timer(self) -> None:
            if self._request_timer is not None:
                self._request_timer.cancel()
            self._request_timer = self.loop.call_later(timeout, self._request_timed_out)

        def _request_timed_out(self) -> None:
            self._request_timer = None
            if self.transport.is_closing():
                return
            # IDLE: no complete request head since the timer was armed (a request being read or answered has
            # moved h11 on to SEND_BODY or DONE). SEND_BODY after our answer: the rest of a refused request's body,
            # which the connection discards, still arriving a whole timeout later.
            waiting_for_head = self.conn.their_state is h11.IDLE
            draining = self.conn.their_state is h11.SEND_BODY and self.conn.our_state in (h11.DONE, h11.MUST_CLOSE)
            if not (waiting_for_head or draining):
                return
            if self.conn.our_state is h11.IDLE:
                log.info("connection from %s sent no complete request within %g s; closed",
                         self.client[0] if self.client else "?", timeout)
                self.transport.write(answer)
            self.transport.close()

    return RequestTimeoutH11Protocol
