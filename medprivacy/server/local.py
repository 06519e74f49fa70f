"""A ``medprivacy serve`` child process on this machine: the one way the demo, the benchmarks and the tests start a
local inference server.

``launch_local_server`` starts ``python -m medprivacy.cli serve`` on a free port of 127.0.0.1 (unless the arguments
name a host) with its output in a log file and returns at once, so several slow, import-heavy startups can overlap;
``LocalServer.wait_ready`` then blocks until ``/v1/health`` answers, and ``stop`` ends it (also as a context
manager). Nothing of the server is imported here: the child is a real server process, reached over real HTTP(S).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ServerError
from ..transport.contract import HEALTH_PATH

SERVE_COMMAND = [sys.executable, "-m", "medprivacy.cli", "serve"]
START_TIMEOUT = 120.0


def free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago (the server binds it right after; a clash is very unlikely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def option_value(args: list[str], name: str) -> str | None:
    """The value of ``name`` in command-line ``args`` (``--name value`` or ``--name=value``), or None."""
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


@dataclass
class LocalServer:
    url: str
    process: subprocess.Popen
    args: list[str]
    log_path: Path
    #: Put the whole server log into a start-up error (tests: the log goes away with the server's scratch folder).
    errors_with_log: bool = False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def wait_ready(self, timeout: float = START_TIMEOUT, ca_bundle: str | os.PathLike | None = None) -> LocalServer:
        """Block until /v1/health answers; on failure stop the server and raise ServerError naming its log.

        ``ca_bundle`` is only for the readiness poll of an https server; without it the certificate is not checked
        here (whoever uses the server checks it through the real client)."""
        import requests

        poll = requests.Session()
        poll.trust_env = False  # no proxy for a loopback server
        verify = str(ca_bundle) if ca_bundle is not None else False
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    raise ServerError(
                        f"the local server exited (code {self.process.returncode}); "
                        f"see {self.log_path}{self._log_text()}"
                    )
                try:
                    if poll.get(self.url + HEALTH_PATH, timeout=1.0, verify=verify).status_code == 200:
                        return self
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"the local server did not answer {HEALTH_PATH} within {timeout:.0f} s; "
                        f"see {self.log_path}{self._log_text()}"
                    )
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        finally:
            poll.close()

    def _log_text(self) -> str:
        return ":\n" + self.log() if self.errors_with_log else ""

    def stop(self) -> None:
        """Terminate the server and wait for it; kill it if it does not exit in time."""
        # uvicorn waits for open keep-alive connections (a TLS one until its 30 s shutdown timeout) after the
        # first SIGTERM; a second one makes it quit at once.
        for signal_count in range(2):
            if self.process.poll() is not None:
                break
            self.process.terminate()
            try:
                self.process.wait(timeout=3 if signal_count == 0 else 10)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def launch_local_server(
    args: list[str],
    log_path: str | os.PathLike,
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    port: int = 0,
) -> LocalServer:
    """Start ``medprivacy serve <args> --port <port or a free one>`` and return at once; ``wait_ready()`` before use.

    ``env`` replaces the child's environment when given (default: this process's). The URL follows the arguments:
    https with ``--ssl-certfile``, the ``--host`` given (a wildcard bind is reached through 127.0.0.1)."""
    args = [str(a) for a in args]
    port = port or free_port()
    args += ["--port", str(port)]
    host = option_value(args, "--host") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"  # a wildcard bind is reachable through loopback
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if option_value(args, "--ssl-certfile") else "http"
    log_path = Path(log_path)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [*SERVE_COMMAND, *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(cwd) if cwd is not None else None,
        )
    return LocalServer(f"{scheme}://{host}:{port}", process, args, log_path)


def start_local_server(
    args: list[str], log_path: str | os.PathLike, *, timeout: float = START_TIMEOUT, **kwargs
) -> LocalServer:
    """``launch_local_server(...).wait_ready(timeout)``: a local server that answers /v1/health."""
    return launch_local_server(args, log_path, **kwargs).wait_ready(timeout)
