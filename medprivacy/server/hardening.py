"""Process- and connection-level protections of the server that the web framework does not give.

``limit_malloc_arenas`` and ``start_heap_trimmer``: glibc's malloc gives each thread that allocates its own arena
(up to 8 per core), and memory freed in an arena is rarely handed back to the system. The server answers requests
from a pool of worker threads, each allocating and freeing large buffers (decoded tensors, network activations),
so under load every worker grows its own heap: 8 clients for 9 minutes took the default server from 463 to
1716 MiB. Two arenas stop that, but a heap still keeps the holes that freed buffers leave (after the first large
free glibc raises its mmap threshold to 32 MiB, so later tensors come from the heap, and only memory at the heap's
top is given back): in a 10-minute soak of 8 clients the resident size still crept by 12 % after the first minute
(minute medians 1018 -> 1138 MiB). So a daemon thread also calls ``malloc_trim(0)`` every 2 s, which returns the
free pages inside the heap too: the same soak then stays flat (minute medians 817 -> 865 -> 880 MiB, the level
reached at 90 s; every 10 s it stayed flat too, at a higher level, ~1100 MiB). Forcing every buffer of 1 MiB or
more through mmap kept memory flat as well, but halved the throughput: every activation then costs fresh page
faults, where a trim every 2 s costs nothing measurable. The arena limit must be set before the
process starts many threads, so the ``serve`` entry points call it first, before numpy or torch are imported.
An operator's own ``MALLOC_ARENA_MAX`` wins.

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
import threading
import time

#: Two arenas: the main one and one shared by the worker threads (what MALLOC_ARENA_MAX=2 gives).
DEFAULT_MALLOC_ARENAS = 2
#: Seconds between two malloc_trim calls: often enough that freed heap pages never pile up (every 10 s the 8-client
#: soak held ~1100 MiB, every 2 s ~870 MiB), rare enough to cost nothing measurable (one trim of the server's heap
#: takes about 7 ms; 25 forward passes of mixup-seg took the same time with and without it).
TRIM_INTERVAL_S = 2.0
_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)

log = logging.getLogger("medprivacy.server")

_allocator: str | None = None


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        _ = (libc.mallopt, libc.malloc_trim)  # both must exist: glibc, not musl
    except (OSError, AttributeError):
        return None
    return libc


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
    libc = _glibc()
    if libc is None:
        return "system allocator (not glibc on Linux: arena limit not applicable)"
    if libc.mallopt(_M_ARENA_MAX, int(arenas)) != 1:
        return "glibc allocator (mallopt refused the arena limit)"
    # Children (a subprocess the operator adds) inherit the same behaviour.
    os.environ["MALLOC_ARENA_MAX"] = str(int(arenas))
    return f"glibc malloc limited to {int(arenas)} arenas (as MALLOC_ARENA_MAX={int(arenas)})"


def start_heap_trimmer(interval: float = TRIM_INTERVAL_S) -> str:
    """Hand freed heap memory back to the system every ``interval`` seconds (glibc ``malloc_trim``), from a daemon
    thread; returns a description for the log."""
    libc = _glibc()
    if libc is None:
        return "no heap trimming (not glibc)"

    def trim() -> None:
        while True:
            time.sleep(interval)
            libc.malloc_trim(0)

    threading.Thread(target=trim, name="malloc-trim", daemon=True).start()
    return f"freed heap memory returned to the system every {interval:g} s (malloc_trim)"


def request_timeout_protocol(timeout: float):
    """A uvicorn h11 protocol class that closes connections whose request headers stall for ``timeout`` seconds."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps({"detail": f"request headers did not arrive within {timeout:g} s; connection closed"}).encode()
    answer = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )

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
                log.info(
                    "connection from %s sent no complete request within %g s; closed",
                    self.client[0] if self.client else "?",
                    timeout,
                )
                self.transport.write(answer)
            self.transport.close()

    return RequestTimeoutH11Protocol
