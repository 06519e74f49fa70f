"""MedLocker keys: what each protected image needs to be recognised and restored, encrypted and authenticated.

Per image a key entry holds the watermark parameters (alpha, x, y, sl), the logo's fingerprint, the sha256 of the
protected image (``verify`` tells whether an image belongs to the key) and of the original, the original dtype
and shape, and the original pixels under the logo, so ``unlock`` is bit-exact even where alpha = 255 erased
them. The logos themselves (public: they are visible on every image) travel in the key for ``unlock_approximate``,
the paper's parameter-only inverse blending (eq. 9).

Key file layout: a 41-byte header ``MEDLOCKR | version | kdf | salt(16) | log2 N | r | p | nonce(12)`` followed by
AES-256-GCM ciphertext of an npz archive (``allow_pickle=False``; JSON manifest as bytes plus the pixel arrays).
The header is the AEAD's associated data, so changing any byte of the file makes it unreadable. The AES key comes
from a passphrase through scrypt (N = 2^17, r = 8, p = 1: 128 MiB, about half a second; a fresh 16-byte salt per
file) or from a 32-byte key file through HKDF-SHA256 with that salt. Files are written atomically with mode 0600.

Per-user keys: ``issue_user_key`` re-encrypts a chosen subset of entries under the user's own passphrase or key
file, optionally without original pixels (then the user can only remove the watermark approximately).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import stat
import struct
import sys
import time
import unicodedata
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import InputError
from ..files import write_bytes_atomically
from .blending import (
    DEFAULT_SL,
    SUPPORTED_DTYPES,
    as_rgba,
    blend,
    blend_terms,
    check_alpha,
    check_image,
    check_window,
    composite,
    dtype_max,
    fit_logo,
    logo_region,
    logo_sha256,
)

# The on-disk identifiers keep the method's name (MedLocker): every key already issued carries them, and a key
# that no longer opens loses the originals it holds.
MAGIC = b"MEDLOCKR"
FORMAT_VERSION = 1
MANIFEST_FORMAT = "medprivacy-medlocker-key"
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


def image_sha256(image: np.ndarray) -> str:
    """Fingerprint of an image's pixels, dtype and shape (byte order normalised, so it is portable)."""
    array = np.asarray(image)
    canonical = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    digest = hashlib.sha256(f"{array.dtype.name}:{'x'.join(map(str, array.shape))}:".encode())
    digest.update(canonical.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class KeyEntry:
    name: str
    alpha: float
    x: int
    y: int
    sl: float
    logo_size: tuple[int, int]  # (h, w) of the logo as blended
    logo_sha256: str
    image_sha256: str  # the protected image
    original_sha256: str  # the original image: unlock checks its result against it
    dtype: str
    shape: tuple[int, ...]
    window: tuple[int, int] | None = None  # intensity window of the blend; None = the dtype's full range
    original: np.ndarray | None = field(default=None, repr=False, compare=False)  # pixels under the logo

    @property
    def region(self) -> tuple[slice, slice]:
        return logo_region(self.x, self.y, self.logo_size)

    @property
    def params(self) -> tuple[float, int, int]:
        return self.alpha, self.x, self.y

    def _to_json(self, original_name: str | None) -> dict:
        return {
            "name": self.name, "alpha": self.alpha, "x": self.x, "y": self.y, "sl": self.sl,
            "logo_size": list(self.logo_size), "logo_sha256": self.logo_sha256, "image_sha256": self.image_sha256,
            "original_sha256": self.original_sha256, "dtype": self.dtype, "shape": list(self.shape), "original": original_name,
            "window": None if self.window is None else list(self.window),
        }


class WatermarkKey:
    """The entries of a protected dataset, by image name, and the logos they use, by fingerprint."""

    def __init__(self) -> None:
        self._entries: dict[str, KeyEntry] = {}
        self._logos: dict[str, np.ndarray] = {}
        self._by_image: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> KeyEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise InputError(f"no image named {name!r} in this key") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[KeyEntry]:
        return list(self._entries.values())

    def logo(self, fingerprint: str) -> np.ndarray | None:
        return self._logos.get(fingerprint)

    def protect(self, name: str, image: np.ndarray, logo, alpha: float, x: int, y: int, sl: float = DEFAULT_SL,
                window=None) -> np.ndarray:
        """Blend ``logo`` into ``image`` at (alpha, x, y) within the intensity ``window`` (default: the dtype's full
        range), record the entry under ``name``; returns the protected image."""
        if not isinstance(name, str) or not name.strip():
            raise InputError("every protected image needs a non-empty name (e.g. its file name)")
        if name in self._entries:
            raise InputError(f"an image named {name!r} is already in this key; give each image a unique name")
        image = check_image(image)
        rgba = as_rgba(logo)
        fitted = fit_logo(rgba, image.shape, sl)
        window = None if window is None else check_window(window, image.dtype)
        protected = blend(image, fitted, alpha, x, y, window)
        entry = KeyEntry(
            name=name, alpha=check_alpha(alpha), x=int(x), y=int(y), sl=float(sl), logo_size=fitted.size,
            logo_sha256=logo_sha256(rgba), image_sha256=image_sha256(protected), original_sha256=image_sha256(image),
            dtype=image.dtype.name, shape=tuple(image.shape), window=window, original=image[fitted.region(x, y)].copy(),
        )
        self._add(entry, rgba)
        return protected

    def remove(self, name: str) -> None:
        """Forget the entry ``name`` (an image whose protected file could not be written)."""
        entry = self._entries.pop(name, None)
        if entry is not None and self._by_image.get(entry.image_sha256) == name:
            del self._by_image[entry.image_sha256]

    def _add(self, entry: KeyEntry, logo: np.ndarray | None) -> None:
        self._entries[entry.name] = entry
        self._by_image.setdefault(entry.image_sha256, entry.name)
        if logo is not None:
            self._logos.setdefault(entry.logo_sha256, logo)

    def find(self, image: np.ndarray) -> KeyEntry | None:
        """The entry of this exact protected image, or None."""
        name = self._by_image.get(image_sha256(image))
        return self._entries[name] if name is not None else None

    def subset(self, names: Iterable[str], include_originals: bool = True) -> WatermarkKey:
        """A key with only ``names`` (for a user); without original pixels if ``include_originals`` is False."""
        names = list(dict.fromkeys(names))
        missing = [n for n in names if n not in self._entries]
        if missing:
            shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
            raise InputError(f"{len(missing)} requested image(s) are not in this key: {shown}")
        if not names:
            raise InputError("a user key needs at least one image")
        out = WatermarkKey()
        for name in names:
            entry = self._entries[name]
            out._add(entry if include_originals else replace(entry, original=None), self._logos.get(entry.logo_sha256))
        return out


# --- using a key -----------------------------------------------------------------------------------------------

def _entry_for(image: np.ndarray, key: WatermarkKey | KeyEntry) -> KeyEntry:
    if not isinstance(image, np.ndarray):
        raise InputError(f"the image is a {type(image).__name__}, not a pixel array")
    entry = key.find(image) if isinstance(key, WatermarkKey) else (key if key.image_sha256 == image_sha256(image) else None)
    if entry is None:
        raise InputError("this image is not protected by this key, or it was changed after protection (re-saved lossily, resized, edited)")
    return entry


def verify(image: np.ndarray, key: WatermarkKey | KeyEntry) -> KeyEntry | None:
    """The key entry this exact protected image belongs to, or None."""
    if isinstance(key, WatermarkKey):
        return key.find(image)
    return key if key.image_sha256 == image_sha256(image) else None


def unlock(image: np.ndarray, key: WatermarkKey | KeyEntry) -> np.ndarray:
    """The original image, bit for bit, from a protected image and its key."""
    entry = _entry_for(image, key)
    if entry.original is None:
        raise InputError(f"this key holds only the watermark parameters of {entry.name!r}, not the pixels under the logo; "
                         "use approximate removal or ask the dataset owner for a full key")
    restored = image.copy()
    restored[entry.region] = entry.original
    if image_sha256(restored) != entry.original_sha256:
        raise InputError(f"the key entry for {entry.name!r} does not restore the original image; the key is inconsistent, ask the owner for a new one")
    return restored


def unlock_approximate(image: np.ndarray, key: WatermarkKey | KeyEntry, logo=None) -> tuple[np.ndarray, int]:
    """Remove the watermark from the parameters alone by inverse blending (paper eq. 9).

    Returns (restored image, number of pixels under the logo that are not exactly the original). A pixel is exact
    only when exactly one original value blends to what is seen: where alpha * opacity is high (up to 255 * 1,
    where the original is gone) several originals round to the same value, and the nearest one is returned. A
    UserWarning says how many pixels are approximate. ``logo`` defaults to the one stored in the key.
    """
    entry = _entry_for(image, key)
    if logo is None:
        logo = key.logo(entry.logo_sha256) if isinstance(key, WatermarkKey) else None
        if logo is None:
            raise InputError(f"approximate removal of {entry.name!r} needs the logo it was protected with; give the logo picture")
    elif logo_sha256(logo) != entry.logo_sha256:
        raise InputError(f"this is not the logo {entry.name!r} was protected with (fingerprint differs); give the original logo picture")
    fitted = fit_logo(logo, entry.shape, entry.sl)
    if fitted.size != tuple(entry.logo_size):
        raise InputError(f"the logo resizes to {fitted.size} instead of {tuple(entry.logo_size)} for {entry.name!r}; the key and this version disagree")
    dtype = np.dtype(entry.dtype)
    a, b = blend_terms(fitted, entry.alpha, len(entry.shape), dtype, entry.window)
    seen = image[entry.region].astype(np.float64)
    keep = np.broadcast_to(1.0 - a, seen.shape)
    estimate = np.divide(seen - b, keep, out=np.zeros_like(seen), where=keep > 0)
    top = dtype_max(dtype)
    estimate = np.clip(np.rint(estimate), 0, top)
    blended = image[entry.region]
    # The blend is monotone in the original, so the originals that produce ``seen`` form a run of integers:
    # the estimate is exact when it is in that run and neither neighbour is.
    exact = composite(estimate, a, b, dtype) == blended
    exact &= (estimate == 0) | (composite(estimate - 1, a, b, dtype) != blended)
    exact &= (estimate == top) | (composite(estimate + 1, a, b, dtype) != blended)
    if exact.ndim == 3:
        exact = exact.all(axis=2)
    approximate = int((~exact).sum())
    restored = image.copy()
    restored[entry.region] = estimate.astype(dtype)
    if approximate:
        warnings.warn(f"parameter-only removal is approximate: {approximate} of {exact.size} pixels under the logo of {entry.name!r} "
                      "are not exactly the original (high alpha, rounding); a key with original pixels restores them bit-exactly",
                      UserWarning, stacklevel=2)
    return restored, approximate


# --- key files -------------------------------------------------------------------------------------------------

def generate_key_file(path: str | os.PathLike, force: bool = False) -> Path:
    """Write 32 random bytes (mode 0600) to use instead of a passphrase; refuses to overwrite without ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise InputError(f"{path} already exists; keys encrypted with it would become unreadable if it were replaced (pass force to overwrite)")
    _write_key_file(path, secrets.token_bytes(KEY_FILE_BYTES))
    return path


def save_key(key: WatermarkKey, path: str | os.PathLike, *, passphrase: str | bytes | None = None,
             key_file: str | os.PathLike | None = None, scrypt_log2_n: int = SCRYPT_LOG2_N) -> Path:
    """Encrypt ``key`` to ``path`` (atomic, mode 0600) under a passphrase or a 32-byte key file."""
    return KeyWriter(path, passphrase=passphrase, key_file=key_file, scrypt_log2_n=scrypt_log2_n).save(key)


class KeyWriter:
    """Saves one key file as often as needed (after every protected image) with the AES key derived once.

    A passphrase costs a second of scrypt per derivation; saving after every image of a batch must not. Each
    save still gets a fresh 12-byte nonce (random nonces are safe for far more saves than any batch makes) and
    is written atomically, so the file on disk is always a complete key.
    """

    def __init__(self, path: str | os.PathLike, *, passphrase: str | bytes | None = None,
                 key_file: str | os.PathLike | None = None, scrypt_log2_n: int = SCRYPT_LOG2_N):
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
            sealed = AESGCM(self._aes_key).encrypt(nonce, _pack(key), header)
        except OverflowError:
            raise InputError("the key is too large for one file (over 2 GiB); split the dataset across several keys") from None
        _write_key_file(self.path, header + sealed)
        return self.path


def load_key(path: str | os.PathLike, *, passphrase: str | bytes | None = None, key_file: str | os.PathLike | None = None) -> WatermarkKey:
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
    header = blob[:_HEADER.size]
    _, version, kdf, salt, log2_n, r, p, nonce = _HEADER.unpack(header)
    if version != FORMAT_VERSION or kdf not in (KDF_SCRYPT, KDF_KEY_FILE):
        raise InputError(f"{path} is a MedLocker key of an unknown version ({version}); update MedPrivacy or the file is damaged")
    if kdf == KDF_SCRYPT and not (MIN_SCRYPT_LOG2_N <= log2_n <= MAX_SCRYPT_LOG2_N and 1 <= r <= 32 and 1 <= p <= 16):
        raise InputError(f"cannot open {path}: its header is damaged")
    if given != kdf:
        wanted = "a passphrase" if kdf == KDF_SCRYPT else "a key file"
        raise InputError(f"{path} is locked with {wanted}; give {wanted} instead")
    try:
        payload = AESGCM(_derive(kdf, secret, salt, log2_n, r, p)).decrypt(nonce, blob[_HEADER.size:], header)
    except InvalidTag:
        credential = "passphrase" if kdf == KDF_SCRYPT else "key file"
        raise InputError(f"cannot open {path}: wrong {credential}, or the file was modified or damaged") from None
    return _unpack(payload, path)


def issue_user_key(key: WatermarkKey, names: Iterable[str], path: str | os.PathLike, *, passphrase: str | bytes | None = None,
                   key_file: str | os.PathLike | None = None, include_originals: bool = True,
                   scrypt_log2_n: int = SCRYPT_LOG2_N) -> WatermarkKey:
    """Save, under the user's own passphrase or key file, a key that holds only the images in ``names``."""
    user_key = key.subset(names, include_originals=include_originals)
    save_key(user_key, path, passphrase=passphrase, key_file=key_file, scrypt_log2_n=scrypt_log2_n)
    return user_key


def _credential(passphrase, key_file) -> tuple[int, bytes]:
    if (passphrase is None) == (key_file is None):
        raise InputError("give either a passphrase or a key file (exactly one)")
    if passphrase is not None:
        # NFC: the same passphrase typed on macOS (often decomposed accents) and elsewhere gives the same bytes.
        secret = unicodedata.normalize("NFC", passphrase).encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
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
        raise InputError(f"key file {path} holds {len(secret)} bytes, not {KEY_FILE_BYTES}; give the file made by generate_key_file")
    return secret


def _derive(kdf: int, secret: bytes, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    from cryptography.hazmat.primitives import hashes

    if kdf == KDF_SCRYPT:
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

        return Scrypt(salt=salt, length=32, n=2**log2_n, r=r, p=p).derive(secret)
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_HKDF_INFO).derive(secret)


def _pack(key: WatermarkKey) -> bytes:
    arrays: dict[str, np.ndarray] = {}
    logos = {}
    for index, (fingerprint, logo) in enumerate(key._logos.items()):
        logos[fingerprint] = f"logo_{index}"
        arrays[f"logo_{index}"] = logo
    entries = []
    for index, entry in enumerate(key.entries()):
        original_name = None
        if entry.original is not None:
            original_name = f"original_{index}"
            arrays[original_name] = entry.original
        entries.append(entry._to_json(original_name))
    manifest = {"format": MANIFEST_FORMAT, "version": FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "entries": entries, "logos": logos}
    arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _unpack(payload: bytes, path: Path) -> WatermarkKey:
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
            manifest = json.loads(archive["manifest"].tobytes().decode("utf-8"))
            if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != FORMAT_VERSION:
                raise ValueError("unknown manifest format")
            key = WatermarkKey()
            logos = {fp: _checked_logo(archive[name], fp) for fp, name in manifest["logos"].items()}
            for item in manifest["entries"]:
                entry = _checked_entry(item, archive)
                key._add(entry, logos.get(entry.logo_sha256))
    except InputError:
        raise
    except Exception as exc:  # anything unexpected inside an authenticated payload means a bug or a foreign writer
        raise InputError(f"key file {path} decrypts but its content is invalid ({type(exc).__name__}: {str(exc)[:120]}); ask for a new key") from None
    return key


def _checked_logo(array: np.ndarray, fingerprint: str) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 4 or logo_sha256(array) != fingerprint:
        raise ValueError("stored logo does not match its fingerprint")
    return array


def _checked_entry(item: dict, archive) -> KeyEntry:
    dtype = np.dtype(item["dtype"])
    shape = tuple(int(v) for v in item["shape"])
    if dtype not in SUPPORTED_DTYPES or not (len(shape) == 2 or (len(shape) == 3 and shape[2] == 3)):
        raise ValueError(f"unsupported image {dtype} {shape}")
    entry = KeyEntry(
        name=str(item["name"]), alpha=check_alpha(item["alpha"]), x=int(item["x"]), y=int(item["y"]), sl=float(item["sl"]),
        logo_size=(int(item["logo_size"][0]), int(item["logo_size"][1])), logo_sha256=str(item["logo_sha256"]),
        image_sha256=str(item["image_sha256"]), original_sha256=str(item["original_sha256"]), dtype=dtype.name, shape=shape,
        window=None if item.get("window") is None else check_window(item["window"], dtype),
    )
    rows, cols = entry.region
    if not (0 <= entry.x and 0 <= entry.y and cols.stop <= shape[1] and rows.stop <= shape[0]):
        raise ValueError(f"logo region of {entry.name!r} lies outside its image")
    if item["original"] is not None:
        original = archive[item["original"]]
        expected = (rows.stop - rows.start, cols.stop - cols.start) + shape[2:]
        if original.dtype != dtype or original.shape != expected:
            raise ValueError(f"original pixels of {entry.name!r} have shape {original.shape}, expected {expected}")
        entry = replace(entry, original=original)
    return entry


def _write_key_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the first byte, atomically, read back and flushed (a lost key loses data)."""
    if not path.parent.is_dir():
        raise InputError(f"output folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file name for the key")
    # The temporary file is created 0600 (mkstemp), so the key is never readable by others, not even half-written;
    # files.py opens it in binary mode, so Windows does not turn 0x0A bytes of the ciphertext into CR LF.
    write_bytes_atomically(path, data, mode=0o600)
