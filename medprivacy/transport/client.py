"""HTTP client for the MedPrivacy inference server.

Every failure becomes one line from :mod:`medprivacy.errors` that names the problem and the fix, because the
caller is a clinician in Slicer or a CLI user, not someone reading a urllib3 traceback. The token never appears in
a message or a log record.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Union
from urllib.parse import urlsplit

import numpy as np
import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ReadTimeoutError
from urllib3.util.retry import Retry

from .. import __version__
from ..cancellation import Cancel, cancel_check
from ..errors import AuthError, CancelledError, InputError, ServerError, VersionMismatchError
from .contract import API_HEADER, API_VERSION, HEALTH_PATH, INFO_PATH, RESPONSE_DTYPE_HEADER, SEGMENT_PATHS
from .wire import CONTENT_TYPE, decode_tensor_raw, encode_tensor, to_float32

log = logging.getLogger("medprivacy.transport")

TOKEN_ENV = "MEDPRIVACY_TOKEN"
#: /v1/health and /v1/info answer at once on a working server, busy or not (they never wait for the models), so a
#: server that accepts the connection but stays silent is recognised after this many seconds, not after the long
#: read timeout meant for inference.
QUICK_READ_TIMEOUT = 10.0
#: A server returns one probability map per class; far more than any tissue model has, so a bigger answer is
#: garbage and must not be allowed to allocate memory.
MAX_CLASSES = 256

Progress = Union[Callable[[int, int], Any], None]


class _NoReadTimeoutRetry(Retry):
    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        if isinstance(error, ReadTimeoutError):
            raise error
        return super().increment(method, url, response, error, _pool, _stacktrace)


class InferenceClient:
    """Talks to one server. Thread-compatible, not thread-safe: use one client per worker thread."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        token_file: str | os.PathLike | None = None,
        ca_bundle: str | os.PathLike | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        retries: int = 3,
        request_patches: int = 64,
        timeout_hint: str = "raise the read timeout",
    ):
        self.url = _normalise_url(url)
        if request_patches < 1:
            raise InputError(f"request_patches must be at least 1 (got {request_patches})")
        if connect_timeout <= 0 or read_timeout <= 0:
            raise InputError("connect and read timeouts must be positive numbers of seconds")
        if retries < 0:
            raise InputError(f"retries must be 0 or more (got {retries})")
        if ca_bundle is not None and not Path(ca_bundle).is_file():
            raise InputError(
                f"CA bundle {ca_bundle} does not exist; pass the PEM file with the server's CA certificate"
            )
        self._token = _resolve_token(token, token_file)
        self.ca_bundle = str(ca_bundle) if ca_bundle is not None else None
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        #: How the caller raises the read timeout, named in the timeout message (the CLI says --timeout).
        self.timeout_hint = timeout_hint
        self.request_patches = int(request_patches)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._server_info: dict[str, Any] | None = None
        if urlsplit(self.url).scheme == "http" and not _is_loopback(urlsplit(self.url).hostname or ""):
            log.warning(
                "%s uses plain HTTP: patches and token travel unencrypted; ask the operator for an https URL", self.url
            )

        retry = _NoReadTimeoutRetry(
            total=retries,
            connect=retries,
            status=retries,
            # One resend covers a keep-alive connection the server closed just as we reused it. Read timeouts
            # are never resent (see _NoReadTimeoutRetry): the server may still be working and a resend doubles the wait.
            read=min(1, retries),
            # SSL failures and the like will not fix themselves by retrying.
            other=0,
            redirect=0,
            status_forcelist=(502, 503, 504),
            # Segmentation is a pure function of the patches, so resending a POST is safe.
            allowed_methods=frozenset({"GET", "POST"}),
            backoff_factor=0.5,
            raise_on_status=False,
            respect_retry_after_header=True,
        )
        self._session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers.update({API_HEADER: str(API_VERSION), "User-Agent": f"medprivacy/{__version__}"})
        if self._token is not None:
            self._session.headers["Authorization"] = f"Bearer {self._token}"

    def __repr__(self) -> str:
        return f"InferenceClient({self.url!r}, auth={'on' if self._token else 'off'})"

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- plain calls -----------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._json(self._request("GET", HEALTH_PATH))

    def info(self) -> dict[str, Any]:
        """Server description (GET /v1/info); raises VersionMismatchError when the API versions differ."""
        info = self._json(self._request("GET", INFO_PATH))
        if not isinstance(info, dict) or "api_version" not in info:
            raise ServerError(
                f"{self.url} answered /v1/info without an api_version; check that the URL points at a MedPrivacy server"
            )
        if info["api_version"] != API_VERSION:
            raise VersionMismatchError(
                f"server {self.url} speaks MedPrivacy API version {info['api_version']} "
                f"but this client speaks {API_VERSION}; upgrade the older side so both match"
            )
        self._server_info = info
        return info

    def check_connection(self) -> str:
        """One line for the user: where, which server, which models, which device, whether auth is on."""
        info = self.info()
        models = ", ".join(sorted(info.get("models", {}))) or "none"
        auth = "on" if info.get("auth_required", self._token is not None) else "off"
        return (
            f"connected to {self.url} — server {info.get('server_version', '?')}, models {models}, "
            f"device {info.get('device', '?')}, auth {auth}"
        )

    # -- segmentation ----------------------------------------------------------------------------------------
    def segment(
        self,
        patches: np.ndarray,
        endpoint: str = "mixup",
        upload_dtype: str = "uint8",
        response_dtype: str = "uint8",
        progress: Progress = None,
        cancel: Cancel = None,
    ) -> np.ndarray:
        """Class probabilities (N, C, D, H, W) float32 for patches (N, 1, D, H, W) float32 in [0, 1].

        Patches go out in requests of at most ``request_patches``, in the order given: shuffling them so the
        server cannot group the mixtures of one location is the caller's job.
        """
        if endpoint not in SEGMENT_PATHS:
            raise InputError(f"unknown endpoint {endpoint!r}; use 'mixup' or 'baseline'")
        if upload_dtype not in ("uint8", "float16"):
            raise InputError(f"upload dtype must be uint8 or float16, not {upload_dtype!r}")
        if response_dtype not in ("uint8", "float16"):
            raise InputError(f"response dtype must be uint8 or float16, not {response_dtype!r}")
        patches = np.asarray(patches)
        if patches.ndim != 5 or patches.shape[1] != 1 or patches.shape[0] == 0:
            raise InputError(f"patches must have shape (N>0, 1, D, H, W), got {patches.shape}")
        is_cancelled = cancel_check(cancel)
        path = SEGMENT_PATHS[endpoint]
        total = patches.shape[0]
        spatial = patches.shape[2:]
        out: np.ndarray | None = None
        for start in range(0, total, self.request_patches):
            if is_cancelled():
                raise CancelledError(f"segmentation cancelled after {start} of {total} patches")
            chunk = patches[start : start + self.request_patches]
            body = encode_tensor(chunk, dtype=upload_dtype)
            self._check_size(body, chunk.shape[0])
            response = self._request(
                "POST",
                path,
                data=body,
                headers={"Content-Type": CONTENT_TYPE, RESPONSE_DTYPE_HEADER: response_dtype},
            )
            self.bytes_sent += len(body)
            self.bytes_received += len(response.content)
            probs = self._decode_probabilities(response, chunk.shape[0], spatial)
            if out is None:
                out = np.empty((total, probs.shape[1], *spatial), dtype=np.float32)
            elif probs.shape[1] != out.shape[1]:
                raise ServerError(
                    f"{self.url} changed its number of classes mid-run ({out.shape[1]} then {probs.shape[1]}); "
                    "retry the segmentation"
                )
            out[start : start + chunk.shape[0]] = probs
            if progress is not None:
                progress(start + chunk.shape[0], total)
        assert out is not None
        return out

    def _check_size(self, body: bytes, count: int) -> None:
        # A server that refuses a large body mid-upload often just resets the connection; knowing its limit
        # (from an earlier info()) lets us give the real reason instead.
        limit = (self._server_info or {}).get("max_request_bytes")
        if isinstance(limit, int) and len(body) > limit:
            raise ServerError(
                f"a request of {count} patches is {len(body)} bytes, over the server's limit of {limit}; "
                "lower request_patches or ask the operator to raise --max-request-mb"
            )

    def _decode_probabilities(self, response, count: int, spatial: tuple[int, ...]) -> np.ndarray:
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type != CONTENT_TYPE:
            raise ServerError(
                f"{self.url} answered {content_type or 'no content type'} instead of a tensor; "
                "check that the URL points at a MedPrivacy server"
            )
        try:
            raw, _ = decode_tensor_raw(response.content, max_elements=count * MAX_CLASSES * int(np.prod(spatial)))
        except InputError as exc:
            raise ServerError(
                f"{self.url} sent an unreadable answer ({exc}); retry, and report it to the operator if it persists"
            ) from None
        if raw.ndim != 5 or raw.shape[0] != count or tuple(raw.shape[2:]) != tuple(spatial) or raw.shape[1] < 1:
            raise ServerError(
                f"{self.url} answered shape {list(raw.shape)} for {count} patches of {list(spatial)}; "
                "client and server disagree on the model, check /v1/info"
            )
        return to_float32(raw)

    # -- HTTP plumbing ---------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs):
        exceptions = requests.exceptions
        url = self.url + path
        quick = method == "GET"
        read_timeout = min(self.read_timeout, QUICK_READ_TIMEOUT) if quick else self.read_timeout
        try:
            response = self._session.request(
                method,
                url,
                timeout=(self.connect_timeout, read_timeout),
                verify=self.ca_bundle if self.ca_bundle is not None else True,
                allow_redirects=False,
                **kwargs,
            )
        # Order matters: SSLError and ConnectTimeout are both ConnectionErrors.
        except exceptions.SSLError as exc:
            reason = _reason(exc)
            if "CERTIFICATE_VERIFY_FAILED" not in reason and "certificate verify failed" not in reason:
                raise ServerError(
                    f"TLS handshake with {self.url} failed ({reason}); if the server runs without --ssl-certfile use http://"
                ) from None
            hint = (
                "pass --ca-bundle with the server's CA certificate"
                if self.ca_bundle is None
                else f"check that {self.ca_bundle} holds the CA certificate that signed the server's certificate"
            )
            raise ServerError(f"TLS certificate of {self.url} could not be verified ({reason}); {hint}") from None
        except exceptions.ConnectTimeout:
            raise ServerError(
                f"timed out connecting to {self.url} after {self.connect_timeout:g} s (connect timeout); "
                "check the URL and firewall, or raise the connect timeout on a slow network"
            ) from None
        except exceptions.ReadTimeout:
            if quick:
                raise ServerError(
                    f"{self.url} accepted the connection but did not answer {path} within {read_timeout:g} s; "
                    "check that the URL points at a running MedPrivacy server (not another service) "
                    "and that it is not stuck"
                ) from None
            raise ServerError(
                f"{self.url} did not answer within {read_timeout:g} s (read timeout); "
                f"{self.timeout_hint}, the server may be busy or slow"
            ) from None
        except exceptions.ConnectionError as exc:
            if _is_reset_during_upload(exc) and "data" in kwargs:
                raise ServerError(
                    f"{self.url} dropped the connection while receiving {len(kwargs['data'])} bytes "
                    "(likely over its size limit); "
                    "lower request_patches or ask the operator to raise --max-request-mb"
                ) from None
            raise ServerError(
                f"cannot reach {self.url} ({_reason(exc)}); check the URL and that the server is running"
            ) from None
        except exceptions.RequestException as exc:
            raise ServerError(f"request to {self.url} failed ({_reason(exc)}); check the URL") from None
        if response.status_code >= 300:
            self._raise_for_status(response, path)
        return response

    def _raise_for_status(self, response, path: str) -> None:
        status = response.status_code
        detail = error_detail(response)
        if status == 401:
            raise AuthError(f"{self.url} requires a token; pass --token-file or set {TOKEN_ENV}")
        if status == 403:
            raise AuthError(
                f"{self.url} rejected the token; check --token-file / {TOKEN_ENV} against the token the operator set"
            )
        if status == 409:
            raise VersionMismatchError(
                detail or f"{self.url} speaks another MedPrivacy API version; upgrade the older side"
            )
        if status == 413:
            # The server's detail ends with its own hint for a generic caller; ours names the client setting.
            raise ServerError(
                f"request too large for {self.url} ({detail.split(';')[0] or 'HTTP 413'}); "
                "lower request_patches or ask the operator to raise --max-request-mb"
            )
        if 300 <= status < 400:
            where = response.headers.get("Location", "another address")
            raise ServerError(
                f"{self.url} redirects to {where}; use that URL directly (redirects are not followed, "
                "to keep the token)"
            )
        if status == 404 and not detail.startswith("baseline"):
            raise ServerError(
                f"{self.url}{path} does not exist (HTTP 404 {detail}); check that the URL points at a MedPrivacy server"
            )
        raise ServerError(f"{self.url} answered HTTP {status}: {detail or response.reason}")

    @staticmethod
    def _json(response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise ServerError(
                f"{response.url} did not answer JSON; check that the URL points at a MedPrivacy server"
            ) from None


def _normalise_url(url: str) -> str:
    url = str(url).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"server URL {url!r} must look like https://host:port or http://127.0.0.1:8765")
    if parts.username or parts.password:
        raise InputError(
            "server URL must not contain a user name or password; pass the token with --token-file or MEDPRIVACY_TOKEN"
        )
    if parts.query or parts.fragment:
        raise InputError(
            f"server URL {url!r} must not have a query or fragment; give only scheme, host, port and path prefix"
        )
    return url


def _resolve_token(token: str | None, token_file: str | os.PathLike | None) -> str | None:
    # GUI fields hand over "" when left blank; that means "not given", not "an empty token".
    token = token if token is None or token.strip() else None
    token_file = token_file if token_file not in ("", None) else None
    if token is None and token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise InputError(
                f"cannot read token file {token_file} ({reason}); check the path and its permissions"
            ) from None
        if not token.strip():
            raise InputError(f"token file {token_file} is empty; put the token the server operator gave you in it")
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    if token is None:
        return None
    token = token.strip()
    if not token or not all(33 <= ord(c) <= 126 for c in token):
        raise InputError(
            "the token is empty or contains spaces or non-ASCII characters; copy it again from the server operator"
        )
    return token


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_reset_during_upload(exc: BaseException) -> bool:
    # requests wraps urllib3 wraps the OSError, sometimes as an argument rather than a cause: search all of it.
    pending, seen = [exc], 0
    while pending and seen < 20:
        current = pending.pop()
        seen += 1
        if isinstance(current, (BrokenPipeError, ConnectionResetError)):
            return True
        linked = (current.__cause__, current.__context__, getattr(current, "reason", None), *current.args)
        pending.extend(e for e in linked if isinstance(e, BaseException))
    text = str(exc)
    return "Broken pipe" in text or "Connection reset" in text


def _reason(exc: BaseException) -> str:
    """The innermost useful message, on one line, without the pool and URL noise urllib3 wraps around it."""
    text = str(exc)
    for marker in ("[SSL: ", "[Errno ", "Name or service not known", "Connection refused", "certificate verify failed"):
        index = text.find(marker)
        if index >= 0:
            text = text[index:]
            break
    text = re.sub(r"\s*\(_ssl\.c:\d+\)", "", text)
    text = " ".join(text.split()).strip(" )('\"")
    return text[:200] or type(exc).__name__


def error_detail(response) -> str:
    """The server's one-line reason in an error answer (JSON ``detail``, else the start of the body)."""
    try:
        detail = response.json().get("detail", "")
    except (ValueError, AttributeError):
        detail = response.text[:200]
    if not isinstance(detail, str):
        detail = str(detail)
    return " ".join(detail.split())[:300]
