"""A MedLocker key in memory: what each protected image needs to be recognised and restored, and its archive form.

Per image a key entry holds the watermark parameters (alpha, x, y, sl), the logo's fingerprint, the sha256 of the
protected image (``verify`` tells whether an image belongs to the key) and of the original, the original dtype
and shape, and the original pixels under the logo, so ``unlock`` is bit-exact even where alpha = 255 erased
them. The logos themselves (public: they are visible on every image) travel in the key for ``unlock_approximate``,
the paper's parameter-only inverse blending (eq. 9).

``pack_key`` turns a key into an npz archive (``allow_pickle=False``; JSON manifest as bytes plus the pixel arrays)
and ``unpack_key`` checks and reads one back; ``keyfile`` encrypts that archive to disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import InputError
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

# The archive's identifiers keep the method's name (MedLocker): every key already issued carries them, and a key
# that no longer opens loses the originals it holds.
FORMAT_VERSION = 1
MANIFEST_FORMAT = "medprivacy-medlocker-key"


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
            "name": self.name,
            "alpha": self.alpha,
            "x": self.x,
            "y": self.y,
            "sl": self.sl,
            "logo_size": list(self.logo_size),
            "logo_sha256": self.logo_sha256,
            "image_sha256": self.image_sha256,
            "original_sha256": self.original_sha256,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "original": original_name,
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

    def protect(
        self, name: str, image: np.ndarray, logo, alpha: float, x: int, y: int, sl: float = DEFAULT_SL, window=None
    ) -> np.ndarray:
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
            name=name,
            alpha=check_alpha(alpha),
            x=int(x),
            y=int(y),
            sl=float(sl),
            logo_size=fitted.size,
            logo_sha256=logo_sha256(rgba),
            image_sha256=image_sha256(protected),
            original_sha256=image_sha256(image),
            dtype=image.dtype.name,
            shape=tuple(image.shape),
            window=window,
            original=image[fitted.region(x, y)].copy(),
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
    entry = (
        key.find(image) if isinstance(key, WatermarkKey) else (key if key.image_sha256 == image_sha256(image) else None)
    )
    if entry is None:
        raise InputError(
            "this image is not protected by this key, or it was changed after protection "
            "(re-saved lossily, resized, edited)"
        )
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
        raise InputError(
            f"this key holds only the watermark parameters of {entry.name!r}, not the pixels under the logo; "
            "use approximate removal or ask the dataset owner for a full key"
        )
    restored = image.copy()
    restored[entry.region] = entry.original
    if image_sha256(restored) != entry.original_sha256:
        raise InputError(
            f"the key entry for {entry.name!r} does not restore the original image; "
            "the key is inconsistent, ask the owner for a new one"
        )
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
            raise InputError(
                f"approximate removal of {entry.name!r} needs the logo it was protected with; give the logo picture"
            )
    elif logo_sha256(logo) != entry.logo_sha256:
        raise InputError(
            f"this is not the logo {entry.name!r} was protected with (fingerprint differs); "
            "give the original logo picture"
        )
    fitted = fit_logo(logo, entry.shape, entry.sl)
    if fitted.size != tuple(entry.logo_size):
        raise InputError(
            f"the logo resizes to {fitted.size} instead of {tuple(entry.logo_size)} for {entry.name!r}; "
            "the key and this version disagree"
        )
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
        warnings.warn(
            f"parameter-only removal is approximate: {approximate} of {exact.size} pixels under the logo of "
            f"{entry.name!r} are not exactly the original (high alpha, rounding); "
            "a key with original pixels restores them bit-exactly",
            UserWarning,
            stacklevel=2,
        )
    return restored, approximate


# --- archive form -----------------------------------------------------------------------------------------------------


def pack_key(key: WatermarkKey) -> bytes:
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
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "entries": entries,
        "logos": logos,
    }
    arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def unpack_key(payload: bytes, path: Path) -> WatermarkKey:
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
        raise InputError(
            f"key file {path} decrypts but its content is invalid ({type(exc).__name__}: {str(exc)[:120]}); "
            "ask for a new key"
        ) from None
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
        name=str(item["name"]),
        alpha=check_alpha(item["alpha"]),
        x=int(item["x"]),
        y=int(item["y"]),
        sl=float(item["sl"]),
        logo_size=(int(item["logo_size"][0]), int(item["logo_size"][1])),
        logo_sha256=str(item["logo_sha256"]),
        image_sha256=str(item["image_sha256"]),
        original_sha256=str(item["original_sha256"]),
        dtype=dtype.name,
        shape=shape,
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
