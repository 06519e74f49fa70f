"""``medprivacy obfuscate keygen``: a new site key from the CSPRNG, with the shipped VAE or one fine-tuned on
site frames."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError
from .key import MappingParams, SiteKey, generate_key

VAE_MODEL = "obf-vae"
Progress = Callable[[str, "float | None"], None]


def default_params(frame_size=None) -> MappingParams:
    """The defaults chosen by the measured trade-off (see ``medprivacy.obfuscation``)."""
    from . import DEFAULT_CODES, DEFAULT_DITHER, DEFAULT_LEVELS, DEFAULT_TEMPERATURE

    size = tuple(frame_size) if frame_size is not None else shipped_vae_spec().patch_size
    return MappingParams(
        levels=DEFAULT_LEVELS,
        codes=DEFAULT_CODES,
        dither=DEFAULT_DITHER,
        temperature=DEFAULT_TEMPERATURE,
        frame_size=tuple(int(v) for v in size),
    )


def shipped_vae_spec(models_dir=None):
    from ..nets.registry import ModelSpec, load_manifest

    entry = load_manifest(models_dir).get("models", {}).get(VAE_MODEL)
    if entry is None:
        raise InputError(
            f"the model manifest has no {VAE_MODEL!r} entry; regenerate it with 'medprivacy obfuscate train-models' "
            "or restore Resources/Models"
        )
    return ModelSpec.from_json(VAE_MODEL, entry)


def site_frames(paths: list, frame_size) -> np.ndarray:
    """The normalised model-size frames of the site's own files or folders (for fine-tuning the VAE)."""
    from ..imageio import has_suffix_of
    from .io import READ_FORMATS, read_frames
    from .transform import normalise, resize

    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not p.name.startswith(".") and has_suffix_of(p, READ_FORMATS)
            )
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path} does not exist; give the site's frame files or folders holding them")
    if not files:
        raise InputError("no frame files (PNG, TIFF, DICOM, NIfTI, NRRD) in the given --vae-from paths")
    frames = [resize(normalise(read_frames(path).pixels), frame_size) for path in files]
    frames = np.concatenate(frames)
    if len(frames) < 16:
        raise InputError(f"only {len(frames)} frames in the --vae-from paths; fine-tuning the VAE needs at least 16")
    return frames


def create_site_key(
    key_dir: str | os.PathLike | None = None,
    force: bool = False,
    params: MappingParams | None = None,
    vae_from: list | None = None,
    vae_steps: int = 1000,
    models_dir=None,
    device: str = "cpu",
    progress: Progress | None = None,
    cancel=None,
    random=None,
    secret: bytes | None = None,
) -> SiteKey:
    """Generate the key folder. With ``vae_from`` the shipped VAE is fine-tuned on those frames first (its weights
    are then part of the secret); otherwise the key holds a copy of the shipped VAE."""
    from ..nets.registry import load_model
    from .key import KEY_FILE, default_key_dir

    directory = Path(key_dir) if key_dir is not None else default_key_dir()
    if (directory / KEY_FILE).exists() and not force:
        raise InputError(
            f"an obfuscation key already exists in {directory}; models trained on its frames only work with it, so "
            "pass --force only if you mean to replace it (keep a backup of the old one)"
        )
    net, spec = load_model(VAE_MODEL, models_dir, device)
    params = params or default_params(spec.patch_size)
    if tuple(params.frame_size) != tuple(spec.patch_size):
        raise InputError(
            f"the VAE works on {spec.patch_size[0]}x{spec.patch_size[1]} frames, not "
            f"{params.frame_size[0]}x{params.frame_size[1]}"
        )
    scale = list(spec.extra["latent_scale"])
    source = f"shipped {VAE_MODEL} (sha256 {spec.sha256[:12]})"
    if vae_from:
        from .vae import VAESettings, latent_scale, train_vae

        if progress:
            progress("reading the site's frames", 0.0)
        frames = site_frames(vae_from, spec.patch_size)

        def report(step, steps, loss):
            if progress:
                progress(
                    f"fine-tuning the VAE on {len(frames)} site frames: step {step}/{steps}", 0.05 + 0.9 * step / steps
                )

        import secrets

        settings = VAESettings(steps=int(vae_steps), learning_rate=5e-4, seed=secrets.randbits(31))
        net, _ = train_vae(
            frames, spec.arch, settings, device, init_state=net.state_dict(), progress=report, cancel=cancel
        )
        scale = latent_scale(net, frames, device)
        source = f"fine-tuned from the shipped {VAE_MODEL} on {len(frames)} site frames ({vae_steps} steps)"
    if progress:
        progress("writing the key", 0.97)
    key = generate_key(
        directory,
        params,
        net.state_dict(),
        spec.arch,
        source,
        force=force,
        random=random,
        secret=secret,
        latent_scale=scale,
    )
    if progress:
        progress("key written", 1.0)
    return key
