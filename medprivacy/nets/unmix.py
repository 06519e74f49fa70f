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
        self.to_scale_shift = nn.Sequential(
            nn.Linear(1, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2 * channels)
        )
        # Start as a plain instance norm (scale 1, shift 0) so early training is stable.
        nn.init.zeros_(self.to_scale_shift[-1].weight)
        nn.init.zeros_(self.to_scale_shift[-1].bias)

    def forward(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        scale, shift = self.to_scale_shift(lam.view(-1, 1).to(x.dtype)).chunk(2, dim=1)
        view = (-1, x.shape[1], 1, 1, 1)
        return self.norm(x) * (1 + scale.view(view)) + shift.view(view)


class _ConvBlock(nn.Module):
    """One or two 3×3×3 convolutions, each followed by λ-conditioned AdaIN and LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, convs: int = 2):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1) for i in range(convs)
        )
        self.norms = nn.ModuleList(AdaptiveInstanceNorm3d(out_channels) for _ in range(convs))
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = self.act(norm(conv(x), lam))
        return x


class UnmixNet(nn.Module):
    """Predicts the target segmentation logits from the mixed prediction, the reference segmentation and λ.

    Input channels: mixed class probabilities (C), one-hot reference labels (C) and the naive unmixing of eq. 4
    (C); the naive estimate is cheap to compute and gives the network the answer it only needs to denoise.
    A small U-Net with four convolutional blocks (strided encoder, bottleneck, two decoder blocks) as in the
    paper. Only the last block runs at full resolution, on the raw inputs plus upsampled context: on a CPU,
    few-channel full-resolution convolutions cost more than everything else together.
    """

    def __init__(self, num_classes: int = 4, features: int = 8):
        super().__init__()
        self.num_classes = num_classes
        f = features
        in_channels = 3 * num_classes
        self.down = nn.Conv3d(in_channels, 2 * f, 3, stride=2, padding=1)
        self.down_norm = AdaptiveInstanceNorm3d(2 * f)
        self.enc = _ConvBlock(2 * f, 2 * f, convs=1)
        self.bottleneck = _ConvBlock(2 * f, 4 * f)
        self.dec2 = _ConvBlock(4 * f + 2 * f, 2 * f, convs=1)
        self.dec1 = _ConvBlock(2 * f + in_channels, f, convs=1)
        self.pool = nn.MaxPool3d(2)
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.head = nn.Conv3d(f, num_classes, 1)

    def forward(self, mixed_probs: torch.Tensor, reference_onehot: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        lam_b = lam.view(-1, 1, 1, 1, 1).to(mixed_probs.dtype)
        naive = (mixed_probs - (1 - lam_b) * reference_onehot) / lam_b.clamp_min(1e-3)
        x = torch.cat([mixed_probs, reference_onehot, naive], dim=1)
        e = self.enc(self.act(self.down_norm(self.down(x), lam)), lam)
        b = self.bottleneck(self.pool(e), lam)
        d2 = self.dec2(torch.cat([self.up(b), e], dim=1), lam)
        d1 = self.dec1(torch.cat([self.up(d2), x], dim=1), lam)
        # Residual on the naive estimate: the network learns a correction, which trains much faster on CPU.
        return self.head(d1) + 4.0 * naive
