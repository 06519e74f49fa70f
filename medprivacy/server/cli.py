"""``medprivacy serve``: run the inference server with uvicorn.

Startup refuses configurations that would expose the server or fail later in a confusing way: a non-loopback bind
without a token, half a TLS configuration, an empty token file, or CUDA asked on a machine without it. The process
limits glibc's malloc arenas and serves with a request timeout (see hardening.py).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import stat
from pathlib import Path

from .. import __version__
from ..errors import InputError

TOKEN_ENV = "MEDPRIVACY_TOKEN"
DEFAULT_PORT = 8765
_LOG_LEVELS = ("debug", "info", "warning", "error")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other address requires a token)"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="folder with manifest.json and weights (default: MEDPRIVACY_MODELS_DIR or the shipped Resources/Models)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run the networks (default auto: cuda when available)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help=f"file holding the bearer token clients must send (default: environment variable {TOKEN_ENV})",
    )
    parser.add_argument(
        "--ssl-certfile",
        type=Path,
        default=None,
        help="PEM certificate chain; enables HTTPS together with --ssl-keyfile",
    )
    parser.add_argument("--ssl-keyfile", type=Path, default=None, help="PEM private key for --ssl-certfile")
    parser.add_argument(
        "--audit-dir",
        type=Path,
        default=None,
        help="save a copy of every received batch here (.npy) to audit what the server sees; off by default",
    )
    parser.add_argument(
        "--max-request-mb", type=float, default=256.0, help="largest accepted request body in MiB (default 256)"
    )
    parser.add_argument(
        "--inference-batch",
        type=int,
        default=32,
        help="patches per forward pass (default 32; lower it if the GPU runs out of memory)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="longest silence allowed while a request arrives (headers or body) before the connection is "
        "dropped; uploads must also average 1 KiB/s after that long (default 30)",
    )
    parser.add_argument(
        "--enable-baseline",
        action="store_true",
        help="also serve the unmixed baseline model (evaluation only: its callers send readable images)",
    )
    parser.add_argument(
        "--extra-classifier",
        action="append",
        default=[],
        metavar="NAME=MODEL.pt[:HxW]",
        help="also serve your own TorchScript classifier for MedLocker watermarks (input float32 (N, 3, H, W) "
        "in [0, 1], default 224x224; output logits (N, C)); repeatable. TorchScript is code the server "
        "runs: load only files you trust",
    )
    parser.add_argument(
        "--model-store",
        type=Path,
        default=None,
        help="keep the classifiers clients train on obfuscated frames in this folder across restarts "
        "(default: in memory only, gone when the server stops)",
    )
    parser.add_argument("--log-level", choices=_LOG_LEVELS, default="info", help="log verbosity (default info)")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        # A host name could resolve anywhere; treat it as exposed.
        return False


def read_token(token_file: Path | None) -> str | None:
    """Token from ``token_file``, else from MEDPRIVACY_TOKEN, else None."""
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise InputError(
                f"cannot read token file {token_file} ({reason}); check the path and its permissions"
            ) from None
        token, origin = text.strip(), f"token file {token_file}"
        if not token:
            raise InputError(
                f"token file {token_file} is empty; write a token into it, "
                'e.g. python -c "import secrets; print(secrets.token_urlsafe(32))"'
            )
        _warn_if_shared(Path(token_file))
    else:
        token, origin = os.environ.get(TOKEN_ENV, "").strip(), f"environment variable {TOKEN_ENV}"
        if not token:
            return None
    # HTTP headers carry printable ASCII only; anything else would fail on the client with a cryptic encoding error.
    if not all(33 <= ord(c) <= 126 for c in token):
        raise InputError(
            f"the token in {origin} contains spaces or non-ASCII characters; "
            "use a single word such as the output of secrets.token_urlsafe(32)"
        )
    return token


def _warn_if_shared(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        logging.getLogger("medprivacy.server").warning(
            "token file %s is readable by other users; run chmod 600 on it", path
        )


def _check_readable(path: Path, option: str) -> None:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise InputError(
            f"cannot read {option} {path} ({exc.strerror or type(exc).__name__}); check the path and its permissions"
        ) from None


def _bind(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn so a busy port becomes one clear line instead of a log record and exit 3."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise InputError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
            "choose another --port or stop the program using it"
        ) from None


def run(args: argparse.Namespace) -> int:
    from .hardening import limit_malloc_arenas, request_timeout_protocol, start_heap_trimmer

    # Before anything starts threads (see hardening.py); the entry points call it even earlier.
    allocator = limit_malloc_arenas()
    # Cheap checks first, before torch is imported, so a refused configuration answers instantly.
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = read_token(args.token_file)
    if token is None and not is_loopback(args.host):
        raise InputError(
            f"refusing to bind {args.host} without a token: anyone on the network could use the server; "
            f"pass --token-file or set {TOKEN_ENV} (or bind 127.0.0.1)"
        )
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        raise InputError("TLS needs both --ssl-certfile and --ssl-keyfile; give both or neither")
    tls = args.ssl_certfile is not None
    if tls:
        _check_readable(args.ssl_certfile, "--ssl-certfile")
        _check_readable(args.ssl_keyfile, "--ssl-keyfile")
    if not (args.max_request_mb > 0):
        raise InputError(f"--max-request-mb must be positive (got {args.max_request_mb})")
    if not (0 < args.request_timeout <= 3600):
        raise InputError(f"--request-timeout must be between 0 and 3600 seconds (got {args.request_timeout})")
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be between 1 and 65535 (got {args.port})")
    from .watermark import parse_extra_classifier

    extra = tuple(parse_extra_classifier(text) for text in args.extra_classifier)

    import uvicorn

    from .app import ServerConfig, create_app

    config = ServerConfig(
        models_dir=args.models_dir,
        device=args.device,
        token=token,
        audit_dir=args.audit_dir,
        max_request_bytes=max(1, int(args.max_request_mb * 1024 * 1024)),
        enable_baseline=args.enable_baseline,
        inference_batch=args.inference_batch,
        request_timeout=args.request_timeout,
        extra_classifiers=extra,
        model_store=args.model_store,
    )
    app = create_app(config)
    service = app.state.service

    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=str(args.ssl_certfile) if tls else None,
        ssl_keyfile=str(args.ssl_keyfile) if tls else None,
        log_level=args.log_level,
        server_header=False,
        http=request_timeout_protocol(args.request_timeout),
    )
    try:
        uv_config.load()
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise InputError(
            f"cannot load the TLS certificate or key ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "check that --ssl-certfile and --ssl-keyfile are PEM files that belong together"
        ) from None
    sock = _bind(args.host, args.port)
    try:
        service.load_models()
    except BaseException:
        sock.close()
        raise

    log = logging.getLogger("medprivacy.server")
    log.info("memory: %s; %s", allocator, start_heap_trimmer())
    if args.enable_baseline:
        log.warning("baseline endpoint enabled: its callers send unmixed, readable images (evaluation only)")
    if args.audit_dir is not None:
        log.warning("audit copy on: every received batch is saved under %s", args.audit_dir)
    if not tls and not is_loopback(args.host):
        log.warning(
            "serving plain HTTP on %s: patches and the token travel unencrypted; add --ssl-certfile/--ssl-keyfile",
            args.host,
        )
    host = f"[{args.host}]" if ":" in args.host else args.host
    # ASCII only: a Windows console with a legacy code page cannot print an em dash.
    print(
        f"medprivacy server {__version__} listening on {'https' if tls else 'http'}://{host}:{args.port}"
        f" - device {service.device}, models {', '.join(service.info()['models'])},"
        f" auth {'on' if token else 'off'}, TLS {'on' if tls else 'off'},"
        f" baseline {'on' if args.enable_baseline else 'off'}, audit {'on' if args.audit_dir else 'off'},"
        f" model store {'on' if args.model_store else 'off'}",
        flush=True,
    )
    server = uvicorn.Server(uv_config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1
