"""The VAE of the obfuscation transform: MONAI ``VarAutoEncoder``, its training, and its latent noise scale.

Training minimises the negative evidence lower bound with a Gaussian likelihood of fixed width ``sigma`` (squared
error / 2 sigma^2 summed over pixels, plus the KL divergence of the posterior from N(0, I)). The latent noise of
the transform is scaled per dimension by ``latent_scale``: the standard deviation of the posterior means over the
training frames. The posterior's own standard deviation is useless for that: a trained VAE keeps it tiny on the
dimensions the decoder uses (measured: decoding mu + sigma * eps changes no pixel visibly), so noise that matters
must be measured against how much real frames differ from each other.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from ..errors import CancelledError, InputError
from ..nets.obfuscation import build_vae  # noqa: F401  (the network's home is nets/)

ARCH_NAME = "varautoencoder"


def vae_arch(frame_size=(64, 64), latent_size: int = 32, channels=(16, 32, 64, 128), strides=(2, 2, 2, 2)) -> dict:
    return {
        "name": ARCH_NAME,
        "spatial_dims": 2,
        "in_shape": [1, int(frame_size[0]), int(frame_size[1])],
        "out_channels": 1,
        "latent_size": int(latent_size),
        "channels": list(channels),
        "strides": list(strides),
    }


@dataclass
class VAESettings:
    steps: int = 4000
    batch_size: int = 32
    learning_rate: float = 2e-3
    sigma: float = 0.05  # width of the Gaussian likelihood: smaller keeps more detail, larger a smoother latent
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def train_vae(
    frames: np.ndarray,
    arch: dict,
    settings: VAESettings,
    device: str = "cpu",
    init_state: dict | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
):
    """Train (or, from ``init_state``, fine-tune) a VAE on normalised model-size frames (N, H, W) in [0, 1].

    Returns (network in eval mode, metrics). ``progress(step, steps, loss)`` is called every 100 steps."""
    import torch

    frames = np.ascontiguousarray(frames, dtype=np.float32)
    if frames.ndim != 3 or len(frames) < 2 or tuple(frames.shape[1:]) != tuple(arch["in_shape"][1:]):
        raise InputError(
            f"VAE training needs at least two frames of {arch['in_shape'][1]}x{arch['in_shape'][2]}, got {frames.shape}"
        )
    torch.manual_seed(settings.seed)
    net = build_vae(arch).to(device)
    if init_state is not None:
        net.load_state_dict(init_state)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.learning_rate)
    from .classifier import warmup_cosine

    scheduler = warmup_cosine(optimizer, settings.steps)
    rng = np.random.default_rng([settings.seed, 11])
    pixels = float(np.prod(frames.shape[1:]))
    started, recent = time.perf_counter(), []
    net.train()
    for step in range(1, settings.steps + 1):
        if cancel is not None and cancel():
            raise CancelledError(f"VAE training cancelled at step {step - 1} of {settings.steps}")
        x = torch.from_numpy(frames[rng.integers(len(frames), size=min(settings.batch_size, len(frames)))])[:, None].to(
            device
        )
        mu, logvar = net.encode_forward(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        decoded = net.decode_forward(z, True)
        reconstruction = ((decoded - x) ** 2).sum(dim=(1, 2, 3)).mean() / (2 * settings.sigma**2)
        kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(dim=1)).mean()
        loss = (reconstruction + kl) / pixels
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        recent.append(float(((decoded.detach() - x) ** 2).mean()))
        if progress is not None and (step % 100 == 0 or step == settings.steps):
            progress(step, settings.steps, float(np.mean(recent[-100:])))
    net.eval()
    return net, {
        "steps": settings.steps,
        "final_mse": round(float(np.mean(recent[-200:])), 6),
        "seconds": round(time.perf_counter() - started, 1),
        "settings": settings.to_json(),
    }


def latent_scale(net, frames: np.ndarray, device: str = "cpu", batch: int = 256) -> list:
    """Per-dimension standard deviation of the posterior means over ``frames``: the unit of the latent noise."""
    import torch

    means = []
    with torch.inference_mode():
        for start in range(0, len(frames), batch):
            mu, _ = net.encode_forward(
                torch.from_numpy(np.ascontiguousarray(frames[start : start + batch], dtype=np.float32))[:, None].to(
                    device
                )
            )
            means.append(mu.float().cpu().numpy())
    spread = np.concatenate(means).std(axis=0)
    return [round(float(max(v, 1e-6)), 6) for v in spread]
