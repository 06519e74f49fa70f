"""``python -m medprivacy.server``: the ``serve`` command alone.

A GPU box that only serves needs neither the client-side commands nor their dependencies; this entry point
imports nothing beyond the server.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import MedPrivacyError
from . import cli


def main(argv: list[str] | None = None) -> int:
    from .hardening import limit_malloc_arenas

    limit_malloc_arenas()  # first, before anything starts threads
    parser = argparse.ArgumentParser(
        prog="python -m medprivacy.server", description="run the MedPrivacy inference server"
    )
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(cli.run(args) or 0)
    except MedPrivacyError as exc:
        # Same contract as `medprivacy`: one line and exit status 2 for mistakes in input or configuration.
        print(f"medprivacy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
