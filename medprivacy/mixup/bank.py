"""The site's private reference bank: reference patches with known segmentations. It is the key.

A bank shipped with the extension would be public and the server could unmix by trying each reference, so
every installation makes its own: synthetic subjects drawn from 128-bit CSPRNG seeds (never stored), or the
site's own labelled scans. Stored in a 0700 folder as 0600 files, and never sent anywhere.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError
from ..files import write_atomically

BANK_FILE = "reference_bank.npz"
META_FILE = "reference_bank.json"
DEFAULT_SUBJECTS = 4
#: 512 patches × 8 flips = 4096 distinct references, 113 MB in memory at 48³ (kept as float16, as stored).
DEFAULT_PATCHES = 512

Progress = Callable[[str, float], None]


def default_key_dir() -> Path:
    return Path(os.environ.get("MEDPRIVACY_KEY_DIR", Path.home() / ".medprivacy" / "mixup-key"))


@dataclass
class ReferenceBank:
    directory: Path
    images: np.ndarray  # (N, D, H, W) float16 (as stored; mixing computes in float32), normalised like the targets
    labels: np.ndarray  # (N, D, H, W) uint8 tissue labels
    meta: dict

    def __len__(self) -> int:
        return len(self.images)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @classmethod
    def load(cls, key_dir: str | os.PathLike | None = None) -> ReferenceBank:
        directory = Path(key_dir) if key_dir is not None else default_key_dir()
        path = directory / BANK_FILE
        if not path.is_file():
            raise InputError(
                f"no private reference bank in {directory}; "
                f"create one with 'medprivacy mixup keygen --key-dir {directory}' (or 'Generate key' in Slicer)"
            )
        _check_private(directory)
        try:
            with np.load(path, allow_pickle=False) as data:
                images, labels = data["images"].astype(np.float16), data["labels"].astype(np.uint8)
            meta = (
                json.loads((directory / META_FILE).read_text(encoding="utf-8"))
                if (directory / META_FILE).is_file()
                else {}
            )
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(
                f"the reference bank in {directory} is damaged ({exc}); "
                "generate a new key with 'medprivacy mixup keygen --force'"
            ) from None
        if images.ndim != 4 or images.shape != labels.shape or len(images) == 0:
            raise InputError(
                f"the reference bank in {directory} has an unexpected shape {images.shape}; generate a new key"
            )
        return cls(directory, images, labels, meta)


def _check_private(directory: Path) -> None:
    if sys.platform.startswith("win"):
        return
    mode = directory.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InputError(
            f"key folder {directory} is accessible to other users; run 'chmod 700 {directory}' "
            "(it holds your private key)"
        )


def _prepare_key_dir(key_dir: str | os.PathLike | None, force: bool) -> Path:
    directory = Path(key_dir) if key_dir is not None else default_key_dir()
    if (directory / BANK_FILE).exists() and not force:
        raise InputError(
            f"a reference bank already exists in {directory}; pass --force to replace it "
            "(segmentations made with it stay valid)"
        )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    return directory


def _write_key_part(path: Path, write: Callable[[object], None]) -> None:
    """Create ``path`` atomically with mode 0600 from the first byte (files.write_atomically's temporary file is
    0600 until the rename): no window where the key is readable by others."""

    def write_file(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    write_atomically(path, write_file, mode=0o600)


def _save(directory: Path, images: np.ndarray, labels: np.ndarray, meta: dict) -> ReferenceBank:
    _write_key_part(
        directory / BANK_FILE,
        lambda h: np.savez_compressed(h, images=images.astype(np.float16), labels=labels.astype(np.uint8)),
    )
    _write_key_part(directory / META_FILE, lambda h: h.write(json.dumps(meta, indent=2).encode()))
    return ReferenceBank(directory, images.astype(np.float16), labels.astype(np.uint8), meta)


def client_patch_size() -> tuple[int, int, int]:
    """Patch size of the local unmixing network, which the bank must match."""
    from ..nets import load_manifest

    try:
        return tuple(load_manifest()["models"]["mixup-unmix"]["patch_size"])  # type: ignore[return-value]
    except (InputError, KeyError):
        return (32, 32, 32)


def generate_bank(
    key_dir: str | os.PathLike | None = None,
    subjects: int = DEFAULT_SUBJECTS,
    patches: int = DEFAULT_PATCHES,
    force: bool = False,
    progress: Progress | None = None,
    patch_size: tuple[int, int, int] | None = None,
    deformation: float = 1.0,
) -> ReferenceBank:
    """Synthesise ``subjects`` reference brains from fresh CSPRNG seeds and keep ``patches`` random patches."""
    from ..data.synth import synthesize_subject
    from .intensity import normalize_intensity
    from .model_space import analysis_mask
    from .sampling import TEXTURE_OVERSAMPLING, sample_reference_patches

    directory = _prepare_key_dir(key_dir, force)
    patch_size = tuple(patch_size or client_patch_size())
    images, labels = [], []
    for i in range(subjects):
        if progress:
            progress(f"synthesising reference subject {i + 1}/{subjects}", i / (subjects + 1))
        subject = synthesize_subject(secrets.randbits(128), deformation=deformation)
        images.append(normalize_intensity(subject.image, analysis_mask()))
        labels.append(subject.labels)
    rng = np.random.default_rng(secrets.randbits(128))
    patch_images, patch_labels = sample_reference_patches(
        images, labels, patches, patch_size, rng, TEXTURE_OVERSAMPLING
    )
    meta = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": f"{subjects} synthetic subjects (CSPRNG seeds, not stored)",
        "patch_size": list(patch_size),
        "patches": patches,
    }
    bank = _save(directory, patch_images, patch_labels, meta)
    if progress:
        progress("reference bank written", 1.0)
    return bank


def import_bank(
    key_dir: str | os.PathLike | None,
    scans: list[tuple[str, str]],
    patches: int = DEFAULT_PATCHES,
    force: bool = False,
    progress: Progress | None = None,
    patch_size: tuple[int, int, int] | None = None,
    subjects: int | None = None,
) -> ReferenceBank:
    """Build the bank from the site's own labelled scans (labels 1 CSF, 2 GM, 3 WM), brought to the model grid."""
    import SimpleITK as sitk

    from .geometry import to_model_grid
    from .intensity import normalize_intensity
    from .io import read_image
    from .model_space import analysis_mask
    from .sampling import TEXTURE_OVERSAMPLING, sample_reference_patches

    directory = _prepare_key_dir(key_dir, force)
    patch_size = tuple(patch_size or client_patch_size())
    images, labels = [], []
    for i, (image_path, label_path) in enumerate(scans):
        if progress:
            progress(f"registering reference scan {i + 1}/{len(scans)}", i / (len(scans) + 1))
        image = read_image(image_path)
        label = sitk.ReadImage(str(label_path))
        resampled, transform = to_model_grid(image)
        model_labels = sitk.GetArrayFromImage(
            to_model_grid(label, transform=transform, interpolator=sitk.sitkNearestNeighbor)[0]
        ).astype(np.uint8)
        if model_labels.max() > 3:
            raise InputError(f"{label_path} has label values above 3; expected 1 CSF, 2 gray matter, 3 white matter")
        images.append(normalize_intensity(sitk.GetArrayFromImage(resampled), analysis_mask()))
        labels.append(model_labels)
    try:
        patch_images, patch_labels = sample_reference_patches(
            images, labels, patches, patch_size, np.random.default_rng(secrets.randbits(128)), TEXTURE_OVERSAMPLING
        )
    except ValueError as exc:
        raise InputError(
            f"cannot build a reference bank from these scans ({exc}); check that the labels cover the brain"
        ) from None
    meta = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": f"{len(scans)} site scans",
        "patch_size": list(patch_size),
        "patches": patches,
    }
    return _save(directory, patch_images, patch_labels, meta)
