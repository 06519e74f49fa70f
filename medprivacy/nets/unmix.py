"""Client-side unmixing network: a small 3D U-Net whose normalisation layers are adaptive instance norm
conditioned on the mixing coefficient λ (Kim et al., Mixup-Privacy, sec. 4 "Implementation details")."""
from __future__ import annotations

import torch
from torch import nn


class AdaptiveInstanceNorm3d(nn.Module):
    """Instance norm whose scale and shift are predicted from λ, so one network serves every mixing weight."""

    def __init__(self, channels: int, hidden: int = 32):
        super().__init__()
        self.norm = nn.InstanceNorm3d(channels, affine=False)
        self.to_scale_shift = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2 * channels))
        # Start as a plain instance norm (scale 1, shift 0) so early training is stable.
        nn.init.zeros_(self.to_scale_shift[-1].weight)
        nn.init.zeros_(self.to_scale_shift[-1].bias)

    def forward(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        scale, shift = self.to_scale_shift(lam.view(-1, 1).to(x.dtype)).chunk(2, dim=1)
        view = (-1, x.shape[1], 1, 1, 1)
        return self.norm(x) * (1 + scale.view(view)) + shift.view(view)


class _ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm1 = AdaptiveInstanceNorm3d(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm2 = AdaptiveInstanceNorm3d(out_channels)
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(x), lam))
        return self.act(self.norm2(self.conv2(x), lam))


class UnmixNet(nn.Module):
    """Predicts the target segmentation logits from the mixed prediction, the reference segmentation and λ.

    Input channels: mixed class probabilities (C), one-hot reference labels (C) and the naive unmixing of eq. 4
    (C); the naive estimate is cheap to compute and gives the network the answer it only needs to denoise.
    Four convolutional blocks (two down, bottleneck, one up) as in the paper's "small U-Net".
    """

    def __init__(self, num_classes: int = 4, features: int = 16):
        super().__init__()
        self.num_classes = num_classes
        f = features
        self.enc1 = _ConvBlock(3 * num_classes, f)
        self.enc2 = _ConvBlock(f, 2 * f)
        self.bottleneck = _ConvBlock(2 * f, 2 * f)
        self.dec1 = _ConvBlock(4 * f + f, f)
        self.pool = nn.MaxPool3d(2)
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.head = nn.Conv3d(f, num_classes, 1)

    def forward(self, mixed_probs: torch.Tensor, reference_onehot: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        lam_b = lam.view(-1, 1, 1, 1, 1).to(mixed_probs.dtype)
        naive = (mixed_probs - (1 - lam_b) * reference_onehot) / lam_b.clamp_min(1e-3)
        x = torch.cat([mixed_probs, reference_onehot, naive], dim=1)
        e1 = self.enc1(x, lam)
        e2 = self.enc2(self.pool(e1), lam)
        b = self.bottleneck(e2, lam)
        d1 = self.dec1(torch.cat([self.up(torch.cat([b, e2], dim=1)), e1], dim=1), lam)
        # Residual on the naive estimate: the network learns a correction, which trains much faster on CPU.
        return self.head(d1) + 4.0 * naive
