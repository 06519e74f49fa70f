"""MedLocker key files: a key (``watermark.key``) encrypted and authenticated on disk.

Key file layout: a 41-byte header ``MEDLOCKR | version | kdf | salt(16) | log2 N | r | p | nonce(12)`` followed by
AES-256-GCM ciphertext of the key's npz archive (``key.pack_key``).
The header is the AEAD's associated data, so changing any byte of the file makes it unreadable. The AES key comes
from a passphrase through scrypt (N = 2^17, r = 8, p = 1: 128 MiB, about half a second; a fresh 16-byte salt per
file) or from a 32-byte key file through HKDF-SHA256 with that salt. Files are written atomically with mode 0600.

Per-user keys: ``issue_user_key`` re-encrypts a chosen subset of entries under the user's own passphrase or key
file, optionally without original pixels (then the user can only remove the watermark approximately).

The key itself, and ``verify``, ``unlock`` and ``unlock_approximate``, live in ``watermark.key``; they are imported
here too, where callers have always found them.
"""

from __future__ import annotations

import os
import secrets
import stat
import struct
import sys
import unicodedata
from pathlib import Path
from typing import Iterable

from ..errors import InputError
from ..files import write_bytes_atomically
from .key import (
    FORMAT_VERSION,
    KeyEntry,
    WatermarkKey,
    image_sha256,
    pack_key,
    unlock,
    unlock_approximate,
    unpack_key,
    verify,
)

__all__ = [
    "KeyEntry",
    "KeyWriter",
    "WatermarkKey",
    "generate_key_file",
    "image_sha256",
    "issue_user_key",
    "load_key",
    "save_key",
    "unlock",
    "unlock_approximate",
    "verify",
]

# The on-disk identifiers keep the method's name (MedLocker): every key already issued carries them, and a key
# that no longer opens loses the originals it holds.
MAGIC = b"MEDLOCKR"
KDF_SCRYPT, KDF_KEY_FILE = 1, 2
#: OWASP's recommended scrypt setting: 128 MiB of memory per guess makes GPU/ASIC passphrase guessing costly.
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 17, 8, 1
#: Refuse headers asking for more than 1 GiB of scrypt memory: a crafted file must not exhaust the machine.
MAX_SCRYPT_LOG2_N = 20
MIN_SCRYPT_LOG2_N = 10
KEY_FILE_BYTES = 32
_HEADER = struct.Struct(">8sBB16sBBB12s")
_HKDF_INFO = b"medprivacy medlocker key file v1"
_TAG_BYTES = 16


def generate_key_file(path: str | os.PathLike, force: bool = False) -> Path:
    """Write 32 random bytes (mode 0600) to use instead of a passphrase; refuses to overwrite without ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise InputError(
            f"{path} already exists; keys encrypted with it would become unreadable if it were replaced "
            "(pass force to overwrite)"
        )
    _write_key_file(path, secrets.token_bytes(KEY_FILE_BYTES))
    return path


def save_key(
    key: WatermarkKey,
    path: str | os.PathLike,
    *,
    passphrase: str | bytes | None = None,
    key_file: str | os.PathLike | None = None,
    scrypt_log2_n: int = SCRYPT_LOG2_N,
) -> Path:
    """Encrypt ``key`` to ``path`` (atomic, mode 0600) under a passphrase or a 32-byte key file."""
    return KeyWriter(path, passphrase=passphrase, key_file=key_file, scrypt_log2_n=scrypt_log2_n).save(key)


class KeyWriter:
    """Saves one key file as often as needed (after every protected image) with the AES key derived once.

    A passphrase costs a second of scrypt per derivation; saving after every image of a batch must not. Each
    save still gets a fresh 12-byte nonce (random nonces are safe for far more saves than any batch makes) and
    is written atomically, so the file on disk is always a complete key.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        passphrase: str | bytes | None = None,
        key_file: str | os.PathLike | None = None,
        scrypt_log2_n: int = SCRYPT_LOG2_N,
    ):
        if not (MIN_SCRYPT_LOG2_N <= int(scrypt_log2_n) <= MAX_SCRYPT_LOG2_N):
            raise InputError(f"scrypt cost 2^{scrypt_log2_n} is outside 2^{MIN_SCRYPT_LOG2_N}..2^{MAX_SCRYPT_LOG2_N}")
        self.path = Path(path)
        self._kdf, secret = _credential(passphrase, key_file)
        self._salt = secrets.token_bytes(16)
        self._cost = (int(scrypt_log2_n), SCRYPT_R, SCRYPT_P) if self._kdf == KDF_SCRYPT else (0, 0, 0)
        self._aes_key = _derive(self._kdf, secret, self._salt, *self._cost)

    def save(self, key: WatermarkKey) -> Path:
        if not isinstance(key, WatermarkKey) or len(key) == 0:
            raise InputError("nothing to save: the key holds no protected image")
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = secrets.token_bytes(12)
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, self._kdf, self._salt, *self._cost, nonce)
        try:
            sealed = AESGCM(self._aes_key).encrypt(nonce, pack_key(key), header)
        except OverflowError:
            raise InputError(
                "the key is too large for one file (over 2 GiB); split the dataset across several keys"
            ) from None
        _write_key_file(self.path, header + sealed)
        return self.path


def load_key(
    path: str | os.PathLike, *, passphrase: str | bytes | None = None, key_file: str | os.PathLike | None = None
) -> WatermarkKey:
    """Decrypt and check a key file; InputError on a wrong passphrase/key file or any modified byte."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    given, secret = _credential(passphrase, key_file)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"key file {path} does not exist")
    blob = path.read_bytes()
    if len(blob) < _HEADER.size + _TAG_BYTES or not blob.startswith(MAGIC):
        raise InputError(f"{path} is not a MedLocker key file")
    header = blob[: _HEADER.size]
    _, version, kdf, salt, log2_n, r, p, nonce = _HEADER.unpack(header)
    if version != FORMAT_VERSION or kdf not in (KDF_SCRYPT, KDF_KEY_FILE):
        raise InputError(
            f"{path} is a MedLocker key of an unknown version ({version}); update MedPrivacy or the file is damaged"
        )
    if kdf == KDF_SCRYPT and not (MIN_SCRYPT_LOG2_N <= log2_n <= MAX_SCRYPT_LOG2_N and 1 <= r <= 32 and 1 <= p <= 16):
        raise InputError(f"cannot open {path}: its header is damaged")
    if given != kdf:
        wanted = "a passphrase" if kdf == KDF_SCRYPT else "a key file"
        raise InputError(f"{path} is locked with {wanted}; give {wanted} instead")
    try:
        payload = AESGCM(_derive(kdf, secret, salt, log2_n, r, p)).decrypt(nonce, blob[_HEADER.size :], header)
    except InvalidTag:
        credential = "passphrase" if kdf == KDF_SCRYPT else "key file"
        raise InputError(f"cannot open {path}: wrong {credential}, or the file was modified or damaged") from None
    return unpack_key(payload, path)


def issue_user_key(
    key: WatermarkKey,
    names: Iterable[str],
    path: str | os.PathLike,
    *,
    passphrase: str | bytes | None = None,
    key_file: str | os.PathLike | None = None,
    include_originals: bool = True,
    scrypt_log2_n: int = SCRYPT_LOG2_N,
) -> WatermarkKey:
    """Save, under the user's own passphrase or key file, a key that holds only the images in ``names``."""
    user_key = key.subset(names, include_originals=include_originals)
    save_key(user_key, path, passphrase=passphrase, key_file=key_file, scrypt_log2_n=scrypt_log2_n)
    return user_key


def _credential(passphrase, key_file) -> tuple[int, bytes]:
    if (passphrase is None) == (key_file is None):
        raise InputError("give either a passphrase or a key file (exactly one)")
    if passphrase is not None:
        # NFC: the same passphrase typed on macOS (often decomposed accents) and elsewhere gives the same bytes.
        secret = (
            unicodedata.normalize("NFC", passphrase).encode("utf-8")
            if isinstance(passphrase, str)
            else bytes(passphrase)
        )
        if not secret:
            raise InputError("the passphrase is empty")
        return KDF_SCRYPT, secret
    return KDF_KEY_FILE, _read_key_file(Path(key_file))


def _read_key_file(path: Path) -> bytes:
    if not path.is_file():
        raise InputError(f"key file {path} does not exist; create one with generate_key_file")
    if not sys.platform.startswith("win") and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InputError(f"key file {path} is readable by other users; run 'chmod 600 {path}' (it is a secret)")
    secret = path.read_bytes()
    if len(secret) != KEY_FILE_BYTES:
        raise InputError(
            f"key file {path} holds {len(secret)} bytes, not {KEY_FILE_BYTES}; give the file made by generate_key_file"
        )
    return secret


def _derive(kdf: int, secret: bytes, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    from cryptography.hazmat.primitives import hashes

    if kdf == KDF_SCRYPT:
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

        return Scrypt(salt=salt, length=32, n=2**log2_n, r=r, p=p).derive(secret)
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_HKDF_INFO).derive(secret)


def _write_key_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the first byte, atomically, read back and flushed (a lost key loses data)."""
    if not path.parent.is_dir():
        raise InputError(f"output folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file name for the key")
    # The temporary file is created 0600 (mkstemp), so the key is never readable by others, not even half-written;
    # files.py opens it in binary mode, so Windows does not turn 0x0A bytes of the ciphertext into CR LF.
    write_bytes_atomically(path, data, mode=0o600)
