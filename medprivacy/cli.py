"""``medprivacy`` command line: serve, mixup (keygen/segment/eval/train), watermark, obfuscate and demo.

User mistakes (MedPrivacyError) print one line and exit 2; Ctrl-C exits 130 and SIGTERM 143, both after removing
half-written files; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Callable

from . import __version__
from .errors import MedPrivacyError

#: (name, help, add_arguments(parser), run(args) -> int); modules register lazily so `--help` stays fast.
_COMMANDS: list[tuple[str, str, str]] = [
    ("serve", "run the inference server (FastAPI + uvicorn)", "medprivacy.server.cli"),
    ("mixup", "Mixup-Privacy segmentation: keygen, segment, eval, train", "medprivacy.mixup.cli"),
    ("watermark", "MedLocker adversarial watermarking: protect, unlock, verify", "medprivacy.watermark.cli"),
    (
        "obfuscate",
        "ObfuscationPrivacy: keygen, apply, train and classify on the server, eval",
        "medprivacy.obfuscation.cli",
    ),
    ("demo", "start a local server and segment a sample brain through the private path", "medprivacy.demo"),
]


def add_server_arguments(parser: argparse.ArgumentParser, timeout: float, timeout_help: str) -> None:
    """Options every client command shares to reach an inference server (read by ``client_from_args``)."""
    parser.add_argument("--server", required=True, help="inference server URL, e.g. https://gpu.example.org:8765")
    parser.add_argument("--token-file", default=None, help="file holding the bearer token (or set MEDPRIVACY_TOKEN)")
    parser.add_argument("--ca-bundle", default=None, help="CA certificate(s) to verify the server's TLS certificate")
    parser.add_argument("--timeout", type=float, default=timeout, help=f"{timeout_help} (default {timeout:g})")


def client_from_args(args: argparse.Namespace, client_class=None):
    """An InferenceClient (or subclass) configured from ``add_server_arguments`` options."""
    if client_class is None:
        from .transport import InferenceClient as client_class
    return client_class(
        args.server,
        token_file=args.token_file,
        ca_bundle=args.ca_bundle,
        read_timeout=args.timeout,
        timeout_hint=f"raise --timeout (now {args.timeout:g} s)",
    )


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="medprivacy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"medprivacy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, module_name in _COMMANDS:
        module = importlib.import_module(module_name)
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that half-written temporary files are removed on the way out."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["serve"]:
        from .server.hardening import limit_malloc_arenas

        limit_malloc_arenas()  # before the imports below start threads (see server/hardening.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args._run
    previous = None
    if threading.current_thread() is threading.main_thread():
        # The default SIGTERM action kills the process on the spot; as an exception it unwinds like Ctrl-C does.
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(run(args) or 0)
    except MedPrivacyError as exc:
        print(f"medprivacy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medprivacy: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("medprivacy: terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
