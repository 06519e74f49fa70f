"""A VGG-style 2D classifier built from MONAI convolution blocks (the paper's VGG16 family, at CPU size).

Stages of two 3x3 convolutions (batch norm, ReLU), each stage but the last followed by 2x2 max pooling, then global
average pooling and one linear layer. The very first convolution has stride ``stem_stride`` (2: a quarter of the
cost at full resolution, like ResNet's stem). MONAI's own ``Classifier`` flattens the last feature map into its
linear head, which ties every weight to an image position: on lesions that can be anywhere it memorised the training
set and stayed at chance on validation images, so the head here pools first.
"""

from __future__ import annotations

from torch import nn


class VGGClassifier(nn.Module):
    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        num_classes: int = 2,
        channels=(16, 32, 64, 128),
        convs_per_stage: int = 2,
        stem_stride: int = 2,
    ):
        from monai.networks.blocks import Convolution

        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"VGGClassifier is 2D only (spatial_dims=2), got {spatial_dims}")
        layers: list[nn.Module] = []
        previous = in_channels
        for index, width in enumerate(channels):
            for _ in range(convs_per_stage):
                stride = stem_stride if not layers else 1
                layers.append(
                    Convolution(
                        spatial_dims=2,
                        in_channels=previous,
                        out_channels=width,
                        kernel_size=3,
                        strides=stride,
                        act="relu",
                        norm="batch",
                    )
                )
                previous = width
            if index < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))
