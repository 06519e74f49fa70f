"""The obfuscation transform: frame -> normalise -> resize -> VAE (keyed latent sample) -> keyed dither ->
quantise -> secret many-to-one mapping -> uint8 codes. See :mod:`medprivacy.obfuscation` for why each step is there.

``Obfuscator(key).obfuscate(frames)`` is all a caller needs; the steps are separate functions so the evaluation can
run the same code with its own (attacker's) keys.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from ..errors import InputError
from .key import MappingParams, SiteKey

#: Percentiles of a frame's intensities mapped to 0 and 1: robust to a few hot or dead pixels.
NORMALISE_PERCENTILES = (0.5, 99.5)
#: Frames go through the VAE this many at a time (memory stays flat for long runs).
BATCH = 64


def normalise(frames: np.ndarray) -> np.ndarray:
    """(T, H, W) frames of any numeric type -> float32 in [0, 1], each frame stretched between its own 0.5th and
    99.5th percentile (the VAE was trained on frames normalised the same way). A constant frame is an error."""
    frames = np.asarray(frames)
    if frames.ndim != 3 or min(frames.shape) < 1:
        raise InputError(f"frames must have shape (T, H, W) with T, H, W >= 1, got {frames.shape}")
    if frames.dtype.kind not in "biuf":
        raise InputError(f"frames of type {frames.dtype} cannot be obfuscated; give gray intensities")
    values = frames.astype(np.float64)
    if not np.isfinite(values).all():
        raise InputError("the frames contain NaN or infinite values; fix or re-export them")
    low = np.percentile(values, NORMALISE_PERCENTILES[0], axis=(1, 2), keepdims=True)
    high = np.percentile(values, NORMALISE_PERCENTILES[1], axis=(1, 2), keepdims=True)
    flat = (high - low).reshape(-1) <= 0
    if flat.any():
        first = int(np.nonzero(flat)[0][0])
        raise InputError(f"frame {first} is empty (one intensity almost everywhere); remove it or check the export")
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


def resize(frames: np.ndarray, size) -> np.ndarray:
    """(T, H, W) float32 -> (T, size[0], size[1]) float32, bilinear, antialiased when shrinking."""
    import torch
    import torch.nn.functional as F

    size = (int(size[0]), int(size[1]))
    if tuple(frames.shape[1:]) == size:
        return np.ascontiguousarray(frames, dtype=np.float32)
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))[:, None]
        return (
            F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[:, 0].clamp(0, 1).numpy()
        )


def frame_digest(frame: np.ndarray) -> bytes:
    """Fingerprint of one model-size frame (float32 bytes): the same frame always gets the same randomness."""
    array = np.ascontiguousarray(frame, dtype="<f4")
    return hashlib.sha256(struct.pack("<II", *array.shape) + array.tobytes()).digest()


def keystream_normals(seed: bytes, count: int) -> np.ndarray:
    """``count`` standard normal numbers from a ChaCha20 keystream keyed by the 32-byte ``seed`` (Box-Muller):
    a CSPRNG, so without the key nobody can predict or reproduce them."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    pairs = (count + 1) // 2
    stream = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor().update(b"\x00" * (8 * pairs))
    words = np.frombuffer(stream, dtype="<u4").astype(np.float64)
    # (k + 0.5) / 2^32 lies strictly inside (0, 1), so the logarithm is finite.
    u1, u2 = (words[0::2] + 0.5) / 2.0**32, (words[1::2] + 0.5) / 2.0**32
    radius = np.sqrt(-2.0 * np.log(u1))
    return np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:count]


def frame_noise(key_seed_of, frames: np.ndarray, latent_size: int):
    """Per-frame keyed noise: (latent eps (T, latent), dither (T, H, W)) from ``key_seed_of(digest) -> 32 bytes``."""
    pixels = int(np.prod(frames.shape[1:]))
    eps = np.empty((len(frames), latent_size), dtype=np.float32)
    dither = np.empty(frames.shape, dtype=np.float32)
    for i, frame in enumerate(frames):
        normals = keystream_normals(key_seed_of(frame_digest(frame)), latent_size + pixels)
        eps[i] = normals[:latent_size]
        dither[i] = normals[latent_size:].reshape(frames.shape[1:])
    return eps, dither


def vae_sample(vae, frames: np.ndarray, eps: np.ndarray, temperature: float, scale, device: str = "cpu") -> np.ndarray:
    """Decode the latent mu + temperature * scale * eps of each model-size frame (T, H, W) -> (T, H, W) in [0, 1].

    ``scale`` (one value per latent dimension) is the spread of the posterior means over the VAE's training frames
    (``vae.latent_scale``), so temperature 1 moves a frame about as far as frames differ from each other."""
    import torch

    out = np.empty(frames.shape, dtype=np.float32)
    scale_t = torch.as_tensor(np.asarray(scale, dtype=np.float32), device=device)
    with torch.inference_mode():
        for start in range(0, len(frames), BATCH):
            x = torch.from_numpy(frames[start : start + BATCH])[:, None].to(device)
            mu, _ = vae.encode_forward(x)
            noise = torch.from_numpy(eps[start : start + BATCH]).to(device)
            z = mu + float(temperature) * scale_t * noise
            out[start : start + BATCH] = vae.decode_forward(z, True)[:, 0].float().cpu().numpy()
    return out


def quantise(values: np.ndarray, dither: np.ndarray, params: MappingParams) -> np.ndarray:
    """Levels 0..levels-1 of ``values`` in [0, 1] after adding ``dither`` (standard normals) times the dither width."""
    noisy = values.astype(np.float64) + dither.astype(np.float64) * (params.dither / params.levels)
    return np.clip(np.floor(noisy * params.levels), 0, params.levels - 1).astype(np.int64)


def apply_mapping(levels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The secret many-to-one lookup: quantised levels -> uint8 codes."""
    return np.asarray(table, dtype=np.uint8)[levels]


class Obfuscator:
    """The transform of one site key. ``obfuscate`` is deterministic for a key and a frame, and what it returns is
    exactly what may leave the computer."""

    def __init__(self, key: SiteKey, device: str = "cpu"):
        self.key = key
        self.device = device
        self.vae = load_key_vae(key, device)
        self.latent_size = int(key.vae["arch"]["latent_size"])

    @property
    def frame_size(self) -> tuple[int, int]:
        return tuple(self.key.params.frame_size)  # type: ignore[return-value]

    def prepare(self, frames: np.ndarray) -> np.ndarray:
        """Normalised frames at the model size: the input of the VAE, and what the evaluation calls "the original"."""
        return resize(normalise(frames), self.frame_size)

    def obfuscate(self, frames: np.ndarray, progress=None) -> np.ndarray:
        """(T, H, W) frames (any size and numeric type) -> (T, h, w) uint8 codes at the key's frame size.

        Frames are prepared a batch at a time, so a long run of large frames never exists as float64 all at once."""
        frames = np.asarray(frames)
        if frames.ndim != 3 or min(frames.shape) < 1:
            raise InputError(f"frames must have shape (T, H, W) with T, H, W >= 1, got {frames.shape}")
        out = np.empty((len(frames),) + self.frame_size, dtype=np.uint8)
        for start in range(0, len(frames), BATCH):
            try:
                out[start : start + BATCH] = self.obfuscate_prepared(self.prepare(frames[start : start + BATCH]))
            except InputError as exc:
                raise InputError(_renumber(str(exc), start)) from None
            if progress is not None:
                progress(min(start + BATCH, len(frames)), len(frames))
        return out

    def obfuscate_prepared(self, prepared: np.ndarray, progress=None) -> np.ndarray:
        """Codes of frames already normalised and resized (``prepare``); ``progress(done, total)`` after each batch."""
        out = np.empty(prepared.shape, dtype=np.uint8)
        for start in range(0, len(prepared), BATCH):
            chunk = np.ascontiguousarray(prepared[start : start + BATCH], dtype=np.float32)
            eps, dither = frame_noise(self.key.frame_seed, chunk, self.latent_size)
            decoded = vae_sample(
                self.vae, chunk, eps, self.key.params.temperature, self.key.vae["latent_scale"], self.device
            )
            out[start : start + BATCH] = apply_mapping(quantise(decoded, dither, self.key.params), self.key.table)
            if progress is not None:
                progress(min(start + BATCH, len(prepared)), len(prepared))
        return out


def _renumber(message: str, offset: int) -> str:
    """ "frame 3 is empty" of a batch starting at ``offset`` -> the frame's number in the whole run."""
    import re

    return re.sub(r"^frame (\d+)", lambda m: f"frame {int(m.group(1)) + offset}", message)


def load_key_vae(key: SiteKey, device: str = "cpu"):
    """The VAE stored in the key folder (its sha256 was checked when the key was loaded)."""
    from safetensors.torch import load_file

    from ..nets.registry import build_network

    net = build_network(key.vae["arch"])
    try:
        net.load_state_dict(load_file(str(key.vae_path), device="cpu"))
    except (RuntimeError, KeyError) as exc:
        raise InputError(
            f"the VAE in {key.directory} does not fit its recorded architecture ({str(exc).splitlines()[0][:120]}); "
            "restore the key folder from your backup"
        ) from None
    return net.to(device).eval()


def obfuscate_with(
    vae,
    prepared: np.ndarray,
    table: np.ndarray,
    params: MappingParams,
    scale,
    rng: np.random.Generator,
    device: str = "cpu",
) -> np.ndarray:
    """The transform with noise from ``rng`` instead of a key's keystream: what an attacker running this code with a
    key of its own (threat model a) produces. Same distribution as ``Obfuscator``; not reproducible by frame."""
    latent = len(scale)
    eps = rng.standard_normal((len(prepared), latent)).astype(np.float32)
    dither = rng.standard_normal(prepared.shape).astype(np.float32)
    decoded = vae_sample(vae, prepared, eps, params.temperature, scale, device)
    return apply_mapping(quantise(decoded, dither, params), table)
