"""The site key of ObfuscationPrivacy: every secret the transform needs, in one private folder, never uploaded.

Layout of the key folder (0700; both files 0600, written atomically):

``obfuscation_key.json``
    format and version; ``key_id`` (a public fingerprint, HMAC of the secret: servers use it to refuse frames made
    with another key, and it reveals nothing about the key); ``secret`` (32 CSPRNG bytes, base64: every frame's
    latent sample and dither noise come from HMAC(secret, frame)); ``mapping`` (the many-to-one table: for each of
    ``levels`` quantised intensities, which of ``codes`` output codes it becomes, a balanced assignment in an order
    shuffled by a CSPRNG, and the uint8 value each code is written as); ``params`` (frame size, latent temperature,
    dither); ``vae`` (architecture, where the weights came from, their sha256, and the latent noise scale);
    ``mac``.
``vae.safetensors``
    the VAE the transform runs: a copy of the shipped ``obf-vae`` weights, or weights fine-tuned on the site's own
    frames (then secret too). Keeping a copy in the key means an update of the shipped weights can never change
    what a key produces: frames obfuscated for training and for later inference go through the same network.

Integrity: ``mac`` is HMAC-SHA256 under a key derived from the secret, over the JSON (without ``mac``) including
the VAE file's sha256. Loading refuses a folder or file that other users can read, a changed byte anywhere, or
VAE weights that do not match. This detects damage, hand edits and swapped files; it cannot stop someone who can
write the folder, since that person holds the key anyway.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import InputError, VersionMismatchError

KEY_FILE = "obfuscation_key.json"
VAE_FILE = "vae.safetensors"
FORMAT = "medprivacy-obfuscation-key"
FORMAT_VERSION = 1
SECRET_BYTES = 32
KEY_ID_CHARS = 16
KEY_DIR_ENV = "MEDPRIVACY_OBFUSCATION_KEY_DIR"
_MAC_LABEL = b"medprivacy obfuscation key integrity v1"
_ID_LABEL = b"medprivacy obfuscation key id v1"

Progress = Callable[[str, "float | None"], None]


def default_key_dir() -> Path:
    return Path(os.environ.get(KEY_DIR_ENV, Path.home() / ".medprivacy" / "obfuscation-key"))


@dataclass(frozen=True)
class MappingParams:
    """What the transform does with the VAE's output (see ``medprivacy.obfuscation`` for why these values)."""

    levels: int  # quantisation levels of the VAE output in [0, 1]
    codes: int  # output codes; levels / codes input levels share each code (the mapping is many-to-one)
    dither: float  # standard deviation of the per-pixel noise added before quantising, in quantisation steps
    temperature: float  # scale of the per-frame latent sample around the posterior mean (1: a proper VAE sample)
    frame_size: tuple  # (H, W) the frames are resized to: the VAE's input size

    def check(self) -> MappingParams:
        if not (2 <= self.codes <= 256 and self.codes < self.levels <= 4096 and self.levels % self.codes == 0):
            raise InputError(
                f"the mapping needs 2 <= codes < levels <= 4096 with levels a multiple of codes "
                f"(got {self.levels} levels, {self.codes} codes): it must be many-to-one"
            )
        if not (0.0 <= self.dither <= 64.0) or not (0.0 <= self.temperature <= 4.0):
            raise InputError(
                f"dither {self.dither} must lie in [0, 64] quantisation steps and temperature {self.temperature} in "
                "[0, 4]"
            )
        size = tuple(int(v) for v in self.frame_size)
        if len(size) != 2 or min(size) < 8:
            raise InputError(f"frame size {self.frame_size} must be (H, W), both at least 8")
        return self

    def to_json(self) -> dict:
        return {
            "levels": self.levels,
            "codes": self.codes,
            "dither": self.dither,
            "temperature": self.temperature,
            "frame_size": [int(v) for v in self.frame_size],
        }


@dataclass
class SiteKey:
    """A loaded key folder. ``table[level]`` is the uint8 value a quantised intensity ``level`` is written as."""

    directory: Path
    key_id: str
    secret: bytes = field(repr=False)
    assignment: np.ndarray = field(repr=False)  # (levels,) code index of each quantised level
    code_values: np.ndarray = field(repr=False)  # (codes,) uint8 value written for each code
    params: MappingParams = None  # type: ignore[assignment]
    vae: dict = field(default_factory=dict)  # {"arch": ..., "sha256": ..., "source": ...}
    created: str = ""

    @property
    def table(self) -> np.ndarray:
        return self.code_values[self.assignment]

    @property
    def vae_path(self) -> Path:
        return self.directory / VAE_FILE

    def describe(self) -> str:
        p = self.params
        return (
            f"key {self.key_id}: {p.levels} levels -> {p.codes} codes, dither {p.dither:g}, temperature "
            f"{p.temperature:g}, frames {p.frame_size[0]}x{p.frame_size[1]}, VAE {self.vae.get('source', '?')}"
        )

    def frame_seed(self, digest: bytes) -> bytes:
        """32 bytes for one frame's randomness: only the key holder can compute them."""
        return hmac.new(self.secret, b"frame\x00" + digest, hashlib.sha256).digest()

    @classmethod
    def load(cls, key_dir: str | os.PathLike | None = None) -> SiteKey:
        directory = Path(key_dir) if key_dir is not None else default_key_dir()
        path = directory / KEY_FILE
        if not path.is_file():
            raise InputError(
                f"no obfuscation key in {directory}; create one with 'medprivacy obfuscate keygen --key-dir "
                f"{directory}' "
                "(or 'Generate key' in Slicer)"
            )
        _check_private(directory, path)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(
                f"the obfuscation key in {directory} is damaged ({type(exc).__name__}); restore it from your backup"
            ) from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise InputError(f"{path} is not a MedPrivacy obfuscation key")
        if document.get("version") != FORMAT_VERSION:
            raise VersionMismatchError(
                f"{path} is an obfuscation key of version {document.get('version')}; this MedPrivacy reads "
                f"version {FORMAT_VERSION}: update MedPrivacy"
            )
        try:
            secret = base64.b64decode(document["secret"], validate=True)
            given_mac = str(document["mac"])
        except (KeyError, TypeError, ValueError):
            raise InputError(
                f"the obfuscation key in {directory} is damaged (no secret or integrity code); restore it from your "
                "backup"
            ) from None
        if len(secret) != SECRET_BYTES or not hmac.compare_digest(_mac(secret, document), given_mac):
            raise InputError(
                f"the obfuscation key in {directory} fails its integrity check (a byte was changed or the file is "
                "damaged); restore it from your backup: a new key cannot read data made with the old one"
            )
        vae_path = directory / VAE_FILE
        if not vae_path.is_file():
            raise InputError(
                f"the obfuscation key in {directory} lacks its VAE weights ({VAE_FILE}); restore the whole folder "
                "from your backup"
            )
        _check_private(directory, vae_path)
        from ..nets.registry import file_sha256

        if file_sha256(vae_path) != document["vae"]["sha256"]:
            raise InputError(
                f"{vae_path} does not match the key (sha256 differs): the file was replaced or damaged; "
                "restore the whole key folder from your backup"
            )
        try:
            mapping = document["mapping"]
            params = MappingParams(
                levels=int(mapping["levels"]),
                codes=int(mapping["codes"]),
                dither=float(document["params"]["dither"]),
                temperature=float(document["params"]["temperature"]),
                frame_size=tuple(int(v) for v in document["params"]["frame_size"]),
            ).check()
            assignment = np.asarray(mapping["assignment"], dtype=np.int64)
            code_values = np.asarray(mapping["code_values"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"the obfuscation key in {directory} is incomplete ({type(exc).__name__}); restore it from your backup"
            ) from None
        if (
            assignment.shape != (params.levels,)
            or code_values.shape != (params.codes,)
            or assignment.min() < 0
            or assignment.max() >= params.codes
            or len(set(code_values.tolist())) != params.codes
            or code_values.min() < 0
            or code_values.max() > 255
        ):
            raise InputError(
                f"the mapping table of the key in {directory} is inconsistent; restore it from your backup"
            )
        return cls(
            directory,
            str(document["key_id"]),
            secret,
            assignment,
            code_values.astype(np.uint8),
            params,
            dict(document["vae"]),
            str(document.get("created", "")),
        )


def key_id_of(secret: bytes) -> str:
    return hmac.new(secret, _ID_LABEL, hashlib.sha256).hexdigest()[:KEY_ID_CHARS]


def random_mapping(params: MappingParams, random: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(assignment, code_values): each code gets exactly levels/codes quantised levels, in an order shuffled by
    ``random`` (a ``random.Random``; default the operating system's CSPRNG, ``secrets.SystemRandom``)."""
    params.check()
    random = random or secrets.SystemRandom()
    assignment = [code for code in range(params.codes) for _ in range(params.levels // params.codes)]
    random.shuffle(assignment)
    # Codes are written as evenly spread uint8 values; which level gets which value is what the shuffle hides.
    values = np.round(np.linspace(0, 255, params.codes)).astype(np.int64)
    return np.asarray(assignment, dtype=np.int64), values


def generate_key(
    key_dir: str | os.PathLike | None,
    params: MappingParams,
    vae_state: dict,
    vae_arch: dict,
    vae_source: str,
    force: bool = False,
    random: Any = None,
    secret: bytes | None = None,
    latent_scale: list | None = None,
) -> SiteKey:
    """Create a key folder: a fresh secret and mapping from the CSPRNG, and a copy of ``vae_state`` (safetensors).

    ``random``/``secret`` exist for the evaluation, which needs reproducible victim keys; a site key never passes them.
    Refuses to replace an existing key without ``force``: data obfuscated with it could no longer be classified.
    """
    from safetensors.torch import save

    params.check()
    directory = Path(key_dir) if key_dir is not None else default_key_dir()
    if (directory / KEY_FILE).exists() and not force:
        raise InputError(
            f"an obfuscation key already exists in {directory}; models trained on its frames only work with it, so "
            "pass --force only if you mean to replace it (keep a backup of the old one)"
        )
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} is a file; give a folder for the key")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    secret = secrets.token_bytes(SECRET_BYTES) if secret is None else bytes(secret)
    if len(secret) != SECRET_BYTES:
        raise InputError(f"a key secret has {SECRET_BYTES} bytes")
    assignment, code_values = random_mapping(params, random)
    blob = save({k: v.detach().cpu().contiguous() for k, v in vae_state.items()})
    document = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "key_id": key_id_of(secret),
        "secret": base64.b64encode(secret).decode("ascii"),
        "mapping": {
            "levels": params.levels,
            "codes": params.codes,
            "assignment": assignment.tolist(),
            "code_values": code_values.tolist(),
        },
        "params": {k: v for k, v in params.to_json().items() if k not in ("levels", "codes")},
        "vae": {
            "arch": vae_arch,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "source": vae_source,
            "latent_scale": [float(v) for v in (latent_scale or [1.0] * int(vae_arch["latent_size"]))],
        },
    }
    document["mac"] = _mac(secret, document)
    # The VAE first: a key file that exists always has its weights beside it.
    write_private(directory / VAE_FILE, blob)
    write_private(directory / KEY_FILE, (json.dumps(document, indent=1) + "\n").encode("utf-8"))
    return SiteKey.load(directory)


def _mac(secret: bytes, document: dict) -> str:
    body = {k: v for k, v in document.items() if k != "mac"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
    mac_key = hmac.new(secret, _MAC_LABEL, hashlib.sha256).digest()
    return hmac.new(mac_key, canonical, hashlib.sha256).hexdigest()


def _check_private(directory: Path, path: Path) -> None:
    if sys.platform.startswith("win"):
        return
    if directory.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InputError(
            f"key folder {directory} is accessible to other users; run 'chmod 700 {directory}' (it holds your secret "
            "key)"
        )
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InputError(f"{path} is readable by other users; run 'chmod 600 {path}' (it is part of your secret key)")


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the first byte, atomically, flushed to disk (a lost key loses data)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
