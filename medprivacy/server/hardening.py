"""Process- and connection-level protections of the server that the web framework does not give.

``limit_malloc_arenas``: glibc's malloc gives each thread that allocates its own arena (up to 8 per core), and
memory freed in an arena is rarely handed back to the system. The server answers requests from a pool of worker
threads, each allocating and freeing large buffers (decoded tensors, network activations), so under load every
worker grows its own heap: 8 clients for 9 minutes took the default server from 463 to 1716 MiB. Two arenas
stop that, but a heap still keeps the holes that large buffers leave (glibc raises its mmap threshold to 32 MiB
after the first large free, so later tensors come from the heap): in a 10-minute soak of 8 clients the resident
size still crept by 12 % after the first minute (minute medians 1018 -> 1138 MiB). Buffers of 1 MiB and more are
therefore always mmapped (their memory returns to the system when freed) and the heap is trimmed once 4 MiB are
free at its top; with both, the same soak stays flat (714 -> 738 MiB, +3.4 %; bench/soak.py). The limits must be set before the process starts many threads, so the ``serve`` entry points call this
first, before numpy or torch are imported. An operator's own ``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` wins.

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
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 4 << 20
# glibc's mallopt parameter numbers (malloc.h) and the environment variables that set the same at startup
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8

log = logging.getLogger("medprivacy.server")


_allocator: str | None = None


def limit_malloc_arenas(arenas: int = DEFAULT_MALLOC_ARENAS) -> str:
    """Cap glibc malloc arenas in this process (once); returns a short description of the allocator setting."""
    global _allocator
    if _allocator is None:
        _allocator = _limit_malloc_arenas(arenas)
    return _allocator


def _limit_malloc_arenas(arenas: int) -> str:
    if not sys.platform.startswith("linux"):
        return "system allocator (glibc settings do not apply off Linux)"
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: no glibc arenas
        return "system allocator (not glibc: arena limit not applicable)"
    settings = []
    for variable, parameter, value in (("MALLOC_ARENA_MAX", _M_ARENA_MAX, int(arenas)),
                                       ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                       ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if os.environ.get(variable):
            settings.append(f"{variable}={os.environ[variable]} (set by the operator)")
        elif mallopt(parameter, value) == 1:
            # Children (a subprocess the operator adds) inherit the same behaviour.
            os.environ[variable] = str(value)
            settings.append(f"{variable}={value}")
        else:
            settings.append(f"{variable} refused by mallopt")
    arena = settings[0]
    summary = f"glibc malloc limited to {int(arenas)} arenas" if arena == f"MALLOC_ARENA_MAX={int(arenas)}" else "glibc malloc"
    return f"{summary} ({', '.join(settings)})"


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
