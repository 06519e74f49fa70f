"""Save and load networks as safetensors + manifest entries (never pickle: weights are data, not code)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, VersionMismatchError
from ..files import write_bytes_atomically

#: Weights shipped with the extension; MEDPRIVACY_MODELS_DIR overrides it (e.g. a server holding retrained models).
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / "Resources" / "Models"
MANIFEST_NAME = "manifest.json"


def models_dir(path: str | os.PathLike | None = None) -> Path:
    if path is not None:
        return Path(path)
    return Path(os.environ.get("MEDPRIVACY_MODELS_DIR", DEFAULT_MODELS_DIR))


@dataclass
class ModelSpec:
    """What a weight file is. ``arch`` holds the builder name and its keyword arguments."""

    name: str
    file: str
    arch: dict[str, Any]
    role: str  # "server" (runs on the inference server) or "client" (runs next to the user's data)
    patch_size: list[int]
    labels: dict[str, str]
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "arch": self.arch,
            "role": self.role,
            "patch_size": list(self.patch_size),
            "labels": self.labels,
            **self.extra,
        }

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> ModelSpec:
        known = {"file", "sha256", "arch", "role", "patch_size", "labels"}
        return cls(
            name=name,
            file=data["file"],
            sha256=data.get("sha256", ""),
            arch=data["arch"],
            role=data["role"],
            patch_size=list(data["patch_size"]),
            labels=dict(data["labels"]),
            extra={k: v for k, v in data.items() if k not in known},
        )


def resolve_device(requested: str) -> str:
    """ "auto" → cuda when torch sees a GPU, else cpu; "cuda" without a GPU is a user error, not a silent fallback."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"--device cuda was asked but torch {torch.__version__} sees no CUDA GPU; "
                "use --device cpu or install a CUDA build of torch"
            )
        return "cuda"
    if requested == "cpu":
        return "cpu"
    raise InputError(f"unknown device {requested!r}; use auto, cpu or cuda")


def build_network(arch: dict[str, Any]):
    """Instantiate an untrained network from a manifest ``arch`` entry."""
    from monai.networks.nets import BasicUNetPlusPlus, UNet

    from .unmix import UnmixNet

    kwargs = {k: v for k, v in arch.items() if k != "name"}
    name = arch["name"]
    if name == "unet":
        return UNet(spatial_dims=3, **kwargs)
    if name == "unetplusplus":
        # The paper's segmentation network (Zhou et al.); selectable for GPU training with --arch unetplusplus.
        from .unetpp import FinalLogits

        return FinalLogits(BasicUNetPlusPlus(spatial_dims=3, **kwargs))
    if name == "unmix":
        return UnmixNet(**kwargs)
    # 2D networks for MedLocker watermarks: classifiers take float32 (N, 3, H, W) in [0, 1] and return logits (N, 2).
    # Defaults below follow the shared contract; any key in ``arch`` overrides them (e.g. widths for small presets).
    if name == "resnet18":
        from monai.networks.nets import resnet18

        return resnet18(**{"spatial_dims": 2, "n_input_channels": 3, "num_classes": 2, **kwargs})
    if name == "densenet121":
        from monai.networks.nets import DenseNet121

        return DenseNet121(**{"spatial_dims": 2, "in_channels": 3, "out_channels": 2, **kwargs})
    if name == "efficientnet-b0":
        import torch
        from monai.networks.nets import EfficientNetBN

        params = {"spatial_dims": 2, "in_channels": 3, "num_classes": 2, "pretrained": False, **kwargs}
        net = EfficientNetBN("efficientnet-b0", **params)
        # MONAI draws the head uniformly in +-1/sqrt(num_classes) (TF's rule for 1000 classes): for two classes the
        # initial logits have a standard deviation near 14 and training from scratch never left chance level.
        torch.nn.init.normal_(net._fc.weight, std=0.01)
        torch.nn.init.zeros_(net._fc.bias)
        return net
    if name == "vit":
        from monai.networks.nets import ViT

        from .unetpp import FinalLogits

        params = {
            "spatial_dims": 2,
            "in_channels": 3,
            "img_size": [128, 128],
            "patch_size": 16,
            "hidden_size": 192,
            "mlp_dim": 384,
            "num_layers": 6,
            "num_heads": 3,
            "classification": True,
            "num_classes": 2,
            # MONAI's default head ends in Tanh, which would squash logits into [-1, 1]; plain logits for CE.
            "post_activation": None,
            **kwargs,
        }
        # ViT returns (logits, hidden states); FinalLogits keeps the logits only.
        return FinalLogits(ViT(**params))
    if name == "vgg":
        from .vgg import VGGClassifier

        return VGGClassifier(**kwargs)
    if name == "unet2d":
        params = {
            "spatial_dims": 2,
            "in_channels": 3,
            "out_channels": 2,
            "channels": [16, 32, 64, 128],
            "strides": [2, 2, 2],
            "num_res_units": 1,
            **kwargs,
        }
        return UNet(**params)
    # ObfuscationPrivacy: the client's VAE, the classifiers servers train on obfuscated frames, the evaluation's
    # attackers.
    if name == "varautoencoder":
        from .obfuscation import build_vae

        return build_vae(arch)
    if name == "code-classifier":
        from .obfuscation import build_code_classifier

        return build_code_classifier(arch)
    if name == "obf-attack":
        from .obfuscation import build_attack_net

        return build_attack_net(arch)
    raise InputError(
        f"unknown network architecture {name!r} in the model manifest; expected unet, unetplusplus, unmix, "
        "resnet18, densenet121, efficientnet-b0, vit, vgg, unet2d, varautoencoder, code-classifier or obf-attack"
    )


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(directory: str | os.PathLike | None = None) -> dict[str, Any]:
    path = models_dir(directory) / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"no model manifest at {path}; run 'medprivacy mixup train' or set MEDPRIVACY_MODELS_DIR")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(
            f"model manifest {path} is not valid JSON ({exc.msg}); restore it from the repository"
        ) from None


def write_manifest(manifest: dict[str, Any], directory: str | os.PathLike | None = None) -> Path:
    directory = models_dir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MANIFEST_NAME
    # Weights and manifest are public artefacts: readable by all, like the repository's files.
    write_bytes_atomically(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(), mode=0o644)
    return path


def save_model(
    net, spec: ModelSpec, directory: str | os.PathLike | None = None, training: dict | None = None
) -> ModelSpec:
    """Write weights atomically, record their sha256 and spec in the manifest (merging with other entries)."""
    from safetensors.torch import save

    directory = models_dir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    write_bytes_atomically(directory / spec.file, save(state), mode=0o644)
    spec.sha256 = file_sha256(directory / spec.file)
    try:
        manifest = load_manifest(directory)
    except InputError:
        manifest = {"models": {}}
    manifest.setdefault("models", {})[spec.name] = spec.to_json()
    if training is not None:
        manifest["training"] = training
    write_manifest(manifest, directory)
    return spec


def load_model(name: str, directory: str | os.PathLike | None = None, device: str = "cpu"):
    """Return ``(network in eval mode, ModelSpec)``; refuses files whose sha256 differs from the manifest."""
    from safetensors.torch import load_file

    directory = models_dir(directory)
    manifest = load_manifest(directory)
    entry = manifest.get("models", {}).get(name)
    if entry is None:
        available = ", ".join(sorted(manifest.get("models", {}))) or "none"
        raise InputError(f"model {name!r} is not in {directory / MANIFEST_NAME} (available: {available})")
    spec = ModelSpec.from_json(name, entry)
    path = directory / spec.file
    if not path.is_file():
        raise InputError(
            f"weights file {path} is missing; restore Resources/Models or retrain with 'medprivacy mixup train'"
        )
    actual = file_sha256(path)
    if spec.sha256 and actual != spec.sha256:
        raise VersionMismatchError(
            f"weights {path.name} do not match the manifest (sha256 {actual[:12]}… vs {spec.sha256[:12]}…); "
            "restore the file or retrain"
        )
    net = build_network(spec.arch)
    try:
        net.load_state_dict(load_file(str(path), device="cpu"))
    except (RuntimeError, KeyError) as exc:
        raise VersionMismatchError(
            f"weights {path.name} do not fit architecture {spec.arch['name']} ({str(exc).splitlines()[0]})"
        ) from None
    return net.to(device).eval(), spec
