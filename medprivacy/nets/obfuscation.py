"""The network definitions of ObfuscationPrivacy, built from manifest entries like every other shipped network: the
site's VAE, the code classifier servers train on obfuscated frames, and the evaluation's attack network. The
training and attacks that use them live in ``medprivacy.obfuscation``.
"""

from __future__ import annotations

#: The attack network compares each pixel's code with its neighbours in a 5x5 window: 24 channels.
NEIGHBOURHOOD = 5


def build_vae(arch: dict):
    from monai.networks.nets import VarAutoEncoder

    kwargs = {k: v for k, v in arch.items() if k != "name"}
    return VarAutoEncoder(**kwargs)


def build_code_classifier(arch: dict):
    """``arch``: input ("codes" with ``code_values``, or "intensity"), pool, channels, strides, subunits, classes."""
    import torch
    from monai.networks.blocks import ResidualUnit

    class CodeClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.input = arch.get("input", "codes")
            self.pool = int(arch.get("pool", 4))
            if self.input == "codes":
                self.register_buffer(
                    "code_values", torch.tensor([int(v) for v in arch["code_values"]], dtype=torch.long)
                )
                channels = len(arch["code_values"])
            else:
                channels = 1
            layers = []
            for out, stride in zip(arch["channels"], arch["strides"]):
                layers.append(
                    ResidualUnit(
                        2,
                        channels,
                        int(out),
                        strides=int(stride),
                        subunits=int(arch.get("subunits", 2)),
                        norm="INSTANCE",
                        act="PRELU",
                    )
                )
                channels = int(out)
            self.body = torch.nn.Sequential(*layers)
            self.head = torch.nn.Linear(channels, int(arch["classes"]))

        def forward(self, frames):
            if self.input == "codes":
                x = (frames[:, None].long() == self.code_values[None, :, None, None]).float()
            else:
                x = frames[:, None].float() / 255.0
            if self.pool > 1:
                x = torch.nn.functional.avg_pool2d(x, self.pool)
            return self.head(self.body(x).mean(dim=(2, 3)))

    return CodeClassifier()


def invariant_features(codes):
    """Key-independent features of uint8 codes (N, H, W) as a float tensor (N, 25, H, W): the frequency of each
    pixel's code within its frame, and whether each of the 24 neighbours in a 5x5 window has the same code."""
    import torch

    codes = codes.long()
    n, h, w = codes.shape
    counts = torch.zeros((n, 256), dtype=torch.float32, device=codes.device)
    counts.scatter_add_(1, codes.reshape(n, -1), torch.ones((n, h * w), device=codes.device))
    frequency = torch.gather(counts / (h * w), 1, codes.reshape(n, -1)).reshape(n, 1, h, w)
    half = NEIGHBOURHOOD // 2
    padded = torch.nn.functional.pad(codes[:, None].float(), (half,) * 4, mode="replicate")
    same = [
        (padded[:, :, dy : dy + h, dx : dx + w] == codes[:, None]).float()
        for dy in range(NEIGHBOURHOOD)
        for dx in range(NEIGHBOURHOOD)
        if (dy, dx) != (half, half)
    ]
    return torch.cat([frequency] + same, dim=1)


def build_attack_net(arch: dict):
    """``arch``: input "invariant" (threat a) or "onehot" with ``code_values`` (a known or estimated table), and
    the U-Net ``channels``/``strides``. Output: the reconstruction in [0, 1], (N, H, W)."""
    import torch
    from monai.networks.nets import UNet

    class AttackNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.input = arch["input"]
            if self.input == "onehot":
                self.register_buffer(
                    "code_values", torch.tensor([int(v) for v in arch["code_values"]], dtype=torch.long)
                )
                channels_in = len(arch["code_values"])
            else:
                channels_in = 1 + NEIGHBOURHOOD * NEIGHBOURHOOD - 1
            self.unet = UNet(
                spatial_dims=2,
                in_channels=channels_in,
                out_channels=1,
                channels=list(arch["channels"]),
                strides=list(arch["strides"]),
                num_res_units=int(arch.get("num_res_units", 1)),
            )

        def features(self, codes):
            if self.input == "onehot":
                return (codes[:, None].long() == self.code_values[None, :, None, None]).float()
            return invariant_features(codes)

        def forward(self, codes):
            return torch.sigmoid(self.unet(self.features(codes)))[:, 0]

    return AttackNet()
