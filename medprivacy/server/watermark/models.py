"""The watermark models one server holds: manifest classifiers and lesion segmenters, and operators' TorchScript
classifiers (``--extra-classifier``), loaded on first use."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import InputError
from ...transport.contract import WATERMARK_CLASSIFY_PATH, WATERMARK_LESIONS_PATH

log = logging.getLogger("medprivacy.server")

TASK_CLASSIFY = "classify"
TASK_SEGMENT = "segment-lesion"
DEFAULT_SIZE = (224, 224)


@dataclass(frozen=True)
class ExtraClassifier:
    """A user's TorchScript classifier: float32 (N, 3, H, W) in [0, 1] -> logits (N, C)."""

    name: str
    path: Path
    size: tuple[int, int] = DEFAULT_SIZE


_EXTRA_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63})=(?P<path>.+?)(?::(?P<h>\d+)x(?P<w>\d+))?$")


def parse_extra_classifier(text: str) -> ExtraClassifier:
    """``NAME=path.pt[:HxW]`` -> ExtraClassifier (input size default 224x224); checks the file is readable."""
    match = _EXTRA_RE.match(str(text).strip())
    if not match:
        raise InputError(
            f"--extra-classifier {text!r} must look like NAME=model.pt or NAME=model.pt:224x224 "
            "(NAME: letters, digits, '.', '_', '-')"
        )
    path = Path(match["path"]).expanduser()
    if not path.is_file():
        raise InputError(
            f"--extra-classifier {match['name']}: {path} does not exist; give a TorchScript file (torch.jit.save)"
        )
    size = (int(match["h"]), int(match["w"])) if match["h"] else DEFAULT_SIZE
    if not (1 <= size[0] <= 4096 and 1 <= size[1] <= 4096):
        raise InputError(
            f"--extra-classifier {match['name']}: input size {size[0]}x{size[1]} must lie between 1x1 and 4096x4096"
        )
    return ExtraClassifier(match["name"], path, size)


class ServedModel:
    """One classifier or lesion segmenter: its description, and its network once loaded."""

    def __init__(
        self,
        name: str,
        task: str,
        size,
        labels: dict[str, str],
        sha256: str,
        arch: str,
        spec=None,
        script: Path | None = None,
    ):
        self.name, self.task, self.labels, self.sha256, self.arch = name, task, labels, sha256, arch
        self.size = (int(size[0]), int(size[1]))
        self.spec, self.script = spec, script
        self.net = None
        self.classes = len(labels) if labels else None

    def describe(self) -> dict[str, Any]:
        return {
            "endpoint": WATERMARK_CLASSIFY_PATH if self.task == TASK_CLASSIFY else WATERMARK_LESIONS_PATH,
            "task": self.task,
            "patch_size": list(self.size),
            "labels": dict(self.labels),
            "sha256": self.sha256,
            "arch": self.arch,
            "in_channels": 3,
            "out_channels": self.classes,
        }


class WatermarkModels:
    """The MedLocker models one server holds: classifiers by name and lesion segmenters by name."""

    def __init__(self, entries: dict[str, Any], models_dir: Path, extra: tuple[ExtraClassifier, ...] = ()):
        from ...nets.registry import ModelSpec, file_sha256

        self.models_dir = models_dir
        self.classifiers: dict[str, ServedModel] = {}
        self.segmenters: dict[str, ServedModel] = {}
        for name, entry in sorted(entries.items()):
            task = entry.get("task") if isinstance(entry, dict) else None
            if task not in (TASK_CLASSIFY, TASK_SEGMENT) or entry.get("role") != "server":
                continue
            try:
                spec = ModelSpec.from_json(name, entry)
                size = [int(v) for v in spec.patch_size]
                arch = str(spec.arch["name"])
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(
                    f"manifest entry {name!r} is incomplete ({type(exc).__name__}: {exc}); restore manifest.json"
                ) from None
            if len(size) != 2 or min(size) < 1:
                raise InputError(f"manifest entry {name!r} has patch_size {spec.patch_size}; a 2D model needs [H, W]")
            model = ServedModel(
                name, task, size, {str(k): str(v) for k, v in spec.labels.items()}, spec.sha256, arch, spec=spec
            )
            (self.classifiers if task == TASK_CLASSIFY else self.segmenters)[name] = model
        for item in extra:
            if item.name in self.classifiers or item.name in self.segmenters or item.name in entries:
                raise InputError(
                    f"--extra-classifier name {item.name!r} is already a model of this server; choose another name"
                )
            self.classifiers[item.name] = ServedModel(
                item.name, TASK_CLASSIFY, item.size, {}, file_sha256(item.path), "torchscript", script=item.path
            )

    def __bool__(self) -> bool:
        return bool(self.classifiers or self.segmenters)

    def all(self) -> list[ServedModel]:
        return [*self.classifiers.values(), *self.segmenters.values()]

    def describe(self) -> dict[str, Any]:
        return {m.name: m.describe() for m in self.all()}

    def ensure_loaded(self, model: ServedModel, device: str):
        """Load ``model`` (caller holds the inference lock)."""
        if model.net is not None:
            return model.net
        started = time.perf_counter()
        if model.script is not None:
            model.net = load_torchscript(model, device)
        else:
            from ...nets.registry import load_model

            model.net, _ = load_model(model.name, self.models_dir, device)
        log.info(
            "loaded %s (%s, %s) on %s in %.1f s",
            model.name,
            model.arch,
            model.task,
            device,
            time.perf_counter() - started,
        )
        return model.net


def load_torchscript(model: ServedModel, device: str):
    import torch

    try:
        net = torch.jit.load(str(model.script), map_location=device)
    except Exception as exc:  # torch raises RuntimeError, ValueError or its own types for a non-TorchScript file
        raise InputError(
            f"--extra-classifier {model.name}: {model.script} is not a TorchScript file "
            f"({str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__}); "
            "save it with torch.jit.save"
        ) from None
    net.eval()
    # One probe now, so a wrong input size or output shape stops the server at startup, not a user's request.
    try:
        with torch.inference_mode():
            out = logits_of(net(torch.zeros((1, 3, *model.size), device=device)))
    except Exception as exc:
        raise InputError(
            f"--extra-classifier {model.name}: the model fails on a 1x3x{model.size[0]}x{model.size[1]} input "
            f"({str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__}); "
            "give its input size as :HxW"
        ) from None
    if out.ndim != 2 or out.shape[0] != 1 or out.shape[1] < 2:
        raise InputError(
            f"--extra-classifier {model.name}: the model returns shape {tuple(out.shape)}; "
            "a classifier must return logits (N, C) with C >= 2"
        )
    model.classes = int(out.shape[1])
    model.labels = {str(i): f"class {i}" for i in range(model.classes)}
    return net


def logits_of(out):
    # Some networks (e.g. ViT) return (logits, extras).
    return out[0] if isinstance(out, (tuple, list)) else out
