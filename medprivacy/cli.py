"""``medprivacy`` command line: serve, mixup (keygen/segment/eval/train) and demo.

User mistakes (MedPrivacyError) print one line and exit 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from . import __version__
from .errors import MedPrivacyError

#: (name, help, add_arguments(parser), run(args) -> int); modules register lazily so `--help` stays fast.
_COMMANDS: list[tuple[str, str, str]] = [
    ("serve", "run the inference server (FastAPI + uvicorn)", "medprivacy.server.cli"),
    ("mixup", "Mixup-Privacy segmentation: keygen, segment, eval, train", "medprivacy.mixup.cli"),
    ("watermark", "MedLocker adversarial watermarking: protect, unlock, verify", "medprivacy.medlocker.cli"),
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
    return client_class(args.server, token_file=args.token_file, ca_bundle=args.ca_bundle, read_timeout=args.timeout)


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args._run
    try:
        return int(run(args) or 0)
    except MedPrivacyError as exc:
        print(f"medprivacy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medprivacy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
