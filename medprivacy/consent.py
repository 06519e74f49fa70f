"""Which servers the user agreed to send data to: the Slicer modules ask once per server before the first upload.

Kept in the core (no Qt, no Slicer) so both modules remember consent under the same server names.
"""

from __future__ import annotations

import json


def normalized_server_url(url: str) -> str:
    """The form under which consent to upload to a server is remembered (case of scheme/host, trailing slash)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url.strip())
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), "", ""))


def consented_servers(stored: str | None) -> list[str]:
    """The servers in a stored consent list (JSON text: QSettings turns a one-element list into a plain string in
    INI files); anything unreadable counts as no consent."""
    try:
        servers = json.loads(stored or "[]")
    except (TypeError, ValueError):
        return []
    return [str(server) for server in servers] if isinstance(servers, list) else []


def with_consent(stored: str | None, url: str) -> str:
    """The stored consent list with ``url``'s server added, as JSON text to store."""
    servers = consented_servers(stored)
    server = normalized_server_url(url)
    return json.dumps(servers if server in servers else servers + [server])
