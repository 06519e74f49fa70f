"""The networks MedLocker attacks and the lesion segmenter that keeps watermarks off lesions.

Four 2D "lesion / no lesion" classifiers of different families (ResNet18, DenseNet121 and EfficientNet-B0 from
MONAI, and a VGG-style CNN built from MONAI convolution blocks, which replaced a small ViT that never left chance
on CPU: the paper's source and target backbones) and a 2D U-Net lesion segmenter from MONAI, all through
:func:`medprivacy.nets.build_network`. Classifiers take float32 (N, 3, H, W) in [0, 1] and return logits (N, 2);
the segmenter returns (N, 2, H, W) logits (channel 1: lesion). Manifest names are in :data:`MODEL_NAMES`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import InputError

CLASSIFIER_FAMILIES = ("resnet18", "densenet121", "efficientnet-b0", "vgg")
SEGMENTER_FAMILY = "unet2d"
FAMILIES = CLASSIFIER_FAMILIES + (SEGMENTER_FAMILY,)
MODEL_NAMES = {
    "resnet18": "wm-cls-resnet18",
    "densenet121": "wm-cls-densenet121",
    "efficientnet-b0": "wm-cls-efficientnet-b0",
    "vgg": "wm-cls-vgg",
    "unet2d": "wm-lesion-seg",
}
CLASSIFIER_NAMES = tuple(MODEL_NAMES[f] for f in CLASSIFIER_FAMILIES)
SEGMENTER_NAME = MODEL_NAMES[SEGMENTER_FAMILY]
LABELS = {"0": "no lesion", "1": "lesion"}

#: Width settings per preset; anything here overrides the contract defaults in ``build_network``.
#: cpu-small keeps the five weight files at ~31 MB together (float32) and the training within a CPU budget:
#: ResNet18 at 3/8 width with the usual stride-2 stem (MONAI's default stem keeps full resolution: 4x the cost),
#: DenseNet121 with 32 initial features and growth 16 (121 layers kept), EfficientNet-B0 as specified.
WIDTHS: dict[str, dict[str, dict[str, Any]]] = {
    "cpu-small": {
        "resnet18": {"widen_factor": 0.375, "conv1_t_stride": 2},
        "densenet121": {"init_features": 32, "growth_rate": 16},
        "efficientnet-b0": {},
        "vgg": {},
        "unet2d": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1},
    },
    "smoke": {
        "resnet18": {"widen_factor": 0.125, "conv1_t_stride": 2},
        "densenet121": {"init_features": 8, "growth_rate": 4, "bn_size": 2},
        "efficientnet-b0": {},  # MONAI fixes B0's widths; only the input is smaller
        "vgg": {"channels": [4, 8], "convs_per_stage": 1},
        "unet2d": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0},
    },
}


def model_name(family: str) -> str:
    if family not in MODEL_NAMES:
        raise InputError(f"unknown network family {family!r}; use {', '.join(FAMILIES)}")
    return MODEL_NAMES[family]


def model_file(family: str) -> str:
    return model_name(family).replace("-", "_") + ".safetensors"


def model_arch(family: str, size, overrides: dict | None = None) -> dict[str, Any]:
    """The manifest ``arch`` entry: the contract's arguments written out, then ``overrides`` (widths)."""
    height, width = _pair(size)
    if family == "resnet18":
        arch = {"name": "resnet18", "spatial_dims": 2, "n_input_channels": 3, "num_classes": 2}
    elif family == "densenet121":
        arch = {"name": "densenet121", "spatial_dims": 2, "in_channels": 3, "out_channels": 2}
    elif family == "efficientnet-b0":
        arch = {"name": "efficientnet-b0", "spatial_dims": 2, "in_channels": 3, "num_classes": 2, "pretrained": False}
    elif family == "vgg":
        # Replaced a small ViT, which did not leave chance level on CPU (validation 0.50 after 500 of 2000 steps
        # at 2e-4; it could not fit 64 images in 60 steps). See nets/vgg.py.
        arch = {
            "name": "vgg",
            "spatial_dims": 2,
            "in_channels": 3,
            "num_classes": 2,
            "channels": [16, 32, 64, 128],
            "convs_per_stage": 2,
            "stem_stride": 2,
        }
    elif family == "unet2d":
        arch = {
            "name": "unet2d",
            "spatial_dims": 2,
            "in_channels": 3,
            "out_channels": 2,
            "channels": [16, 32, 64, 128],
            "strides": [2, 2, 2],
            "num_res_units": 1,
        }
    else:
        raise InputError(f"unknown network family {family!r}; use {', '.join(FAMILIES)}")
    arch.update(overrides or {})
    return arch


def build_model(family: str, size, overrides: dict | None = None):
    """``(untrained network, arch dict)`` for ``family`` at input ``size`` (H, W)."""
    from ..nets import build_network

    arch = model_arch(family, size, overrides)
    return build_network(arch), arch


def build_classifier(family: str, size=(128, 128), overrides: dict | None = None):
    if family not in CLASSIFIER_FAMILIES:
        raise InputError(f"unknown classifier {family!r}; use {', '.join(CLASSIFIER_FAMILIES)}")
    return build_model(family, size, overrides)


def build_segmenter(size=(128, 128), overrides: dict | None = None):
    return build_model(SEGMENTER_FAMILY, size, overrides)


def input_description(size) -> str:
    height, width = _pair(size)
    return f"rgb float [0,1], resized to {height}x{width}"


def _pair(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = (int(s) for s in size)
    return height, width


def to_input(images, size=None):
    """Images -> float32 tensor (N, 3, H, W) in [0, 1].

    numpy input is channels-last as images are stored: (H, W), (H, W, C), (N, H, W) or (N, H, W, C) with C 1, 3
    or 4 (alpha dropped, grey repeated to RGB); uint8 is divided by 255, uint16 by 65535, floats are clipped to
    [0, 1]. torch input is channels-first (C, H, W) or (N, C, H, W). With ``size`` the images are resized
    (bilinear, antialiased) to (H, W), the size a model's manifest ``patch_size`` gives."""
    import torch
    import torch.nn.functional as F

    if isinstance(images, torch.Tensor):
        tensor = images
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4:
            raise InputError(f"expected a (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    else:
        array = np.asarray(images)
        if array.ndim == 2:
            array = array[None, ..., None]
        elif array.ndim == 3:
            array = array[None] if array.shape[-1] in (1, 3, 4) else array[..., None]
        elif array.ndim != 4:
            raise InputError(f"expected images shaped (H, W), (H, W, C) or (N, H, W, C), got {array.shape}")
        tensor = torch.from_numpy(_unit_float(array)).permute(0, 3, 1, 2)
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0
    elif not tensor.is_floating_point():
        raise InputError(f"integer tensors must be uint8; got {tensor.dtype} (give floats in [0, 1])")
    tensor = tensor.float().clamp(0.0, 1.0)
    channels = tensor.shape[1]
    if channels == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    elif channels == 4:
        tensor = tensor[:, :3]
    elif channels != 3:
        raise InputError(f"images need 1, 3 or 4 channels, not {channels}")
    if size is not None:
        height, width = _pair(size)
        if tuple(tensor.shape[-2:]) != (height, width):
            tensor = F.interpolate(
                tensor, size=(height, width), mode="bilinear", align_corners=False, antialias=True
            ).clamp(0.0, 1.0)
    return tensor.contiguous()


def _unit_float(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if array.dtype == bool or np.issubdtype(array.dtype, np.floating):
        return np.ascontiguousarray(array, dtype=np.float32)
    raise InputError(f"images must be uint8, uint16 or float in [0, 1], not {array.dtype}")


def _device_of(net) -> Any:
    try:
        return next(net.parameters()).device
    except StopIteration:
        return "cpu"


def predict_logits(net, images, batch_size: int = 64, size=None):
    """Logits of ``net`` for ``images`` (anything :func:`to_input` takes), in eval mode, batched; a torch tensor."""
    import torch

    tensor = to_input(images, size)
    device = _device_of(net)
    was_training = net.training
    net.eval()
    outputs = []
    try:
        with torch.inference_mode():
            for start in range(0, tensor.shape[0], max(1, batch_size)):
                outputs.append(net(tensor[start : start + batch_size].to(device)).float().cpu())
    finally:
        net.train(was_training)
    return torch.cat(outputs) if outputs else torch.zeros((0, 2))


def predict_proba(net, images, batch_size: int = 64, size=None) -> np.ndarray:
    """Class probabilities (N, 2) float32 (column 1: lesion) of a classifier."""
    import torch

    return torch.softmax(predict_logits(net, images, batch_size, size), dim=1).numpy().astype(np.float32)


def predict_lesion_mask(segmenter, images, batch_size: int = 32, size=None, output_size=None) -> np.ndarray:
    """Boolean lesion masks (N, H, W) from the segmenter; ``output_size`` resizes the lesion probability back
    (bilinear) before thresholding at 0.5, e.g. to the original image's shape for the keep-out boxes."""
    import torch
    import torch.nn.functional as F

    probs = torch.softmax(predict_logits(segmenter, images, batch_size, size), dim=1)[:, 1:2]
    if output_size is not None and tuple(probs.shape[-2:]) != _pair(output_size):
        probs = F.interpolate(probs, size=_pair(output_size), mode="bilinear", align_corners=False)
    return (probs[:, 0] >= 0.5).numpy()


def load_watermark_models(directory: str | os.PathLike | None = None, device: str = "cpu", names=None) -> dict:
    """``{manifest name: (network in eval mode, ModelSpec)}`` for the MedLocker models present in the manifest."""
    from ..nets import load_manifest, load_model

    available = load_manifest(directory).get("models", {})
    wanted = list(names) if names is not None else [n for n in MODEL_NAMES.values() if n in available]
    if not wanted:
        raise InputError("no MedLocker models in the manifest; run 'medprivacy watermark train'")
    return {name: load_model(name, directory, device=device) for name in wanted}
