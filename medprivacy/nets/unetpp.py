"""Adapter so MONAI's BasicUNetPlusPlus (the paper's U-Net++) can stand wherever a plain U-Net does."""

from __future__ import annotations

from torch import nn


class FinalLogits(nn.Module):
    """BasicUNetPlusPlus returns a list of deep-supervision heads; callers only want the final logits."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out[0] if isinstance(out, (list, tuple)) else out
