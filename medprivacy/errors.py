"""User-facing errors: each carries one line that names the problem and the fix (no stack trace for the user)."""

from __future__ import annotations


class MedPrivacyError(Exception):
    """Base class for errors caused by input, configuration or environment rather than by a bug."""


class InputError(MedPrivacyError):
    """The image, label, key or option given by the user cannot be used."""


class ServerError(MedPrivacyError):
    """The inference server could not be reached, refused the request or answered something unusable."""


class AuthError(ServerError):
    """Missing or wrong token (HTTP 401/403)."""


class VersionMismatchError(ServerError):
    """Client and server speak different API versions or hold different models."""


class CancelledError(MedPrivacyError):
    """The user cancelled a long operation."""
