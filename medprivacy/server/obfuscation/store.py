"""The obfuscation model store: trained models in memory, and with ``--model-store DIR`` on disk (safetensors + JSON,
atomically, 0600 in a 0700 folder), loaded again at the next start."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import InputError
from ...files import write_atomically

log = logging.getLogger("medprivacy.server")

MODEL_FORMAT = "medprivacy-obfuscation-model"
MODEL_ID_RE = re.compile(r"^obf-[0-9a-f]{12}$")


@dataclass
class TrainedModel:
    id: str
    classes: list
    frame_size: list
    key_id: str
    arch: dict
    metrics: dict
    created: str
    name: str = ""
    net: Any = field(default=None, repr=False)
    state: dict | None = field(default=None, repr=False)  # weights not yet on the device (loaded from the store)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "classes": list(self.classes),
            "frame_size": list(self.frame_size),
            "key_id": self.key_id,
            "created": self.created,
            "validation_accuracy": self.metrics.get("validation_accuracy"),
            "train_frames": self.metrics.get("train_frames"),
            "validation_frames": self.metrics.get("validation_frames"),
        }


class ModelStore:
    """The folder of stored models; every file in it is owner-only and written whole."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"--model-store {self.folder} is a file; give a folder")
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    def weights(self, model_id: str) -> Path:
        return self.folder / f"{model_id}.safetensors"

    def load(self) -> dict[str, TrainedModel]:
        """The stored models whose weights match their record (the others are skipped with a warning), by id."""
        from ...nets.registry import file_sha256

        models: dict[str, TrainedModel] = {}
        for meta_path in sorted(self.folder.glob("obf-*.json")):
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                if meta.get("format") != MODEL_FORMAT or not MODEL_ID_RE.match(str(meta.get("id"))):
                    raise ValueError("not a MedPrivacy obfuscation model")
                if file_sha256(self.weights(meta["id"])) != meta["sha256"]:
                    raise ValueError("weights do not match their sha256")
                model = TrainedModel(
                    meta["id"],
                    list(meta["classes"]),
                    list(meta["frame_size"]),
                    str(meta["key_id"]),
                    dict(meta["arch"]),
                    dict(meta.get("metrics", {})),
                    str(meta.get("created", "")),
                    str(meta.get("name", "")),
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("model store: skipping %s (%s)", meta_path.name, exc)
                continue
            models[model.id] = model
        if models:
            log.info("model store %s: %d obfuscation model(s)", self.folder, len(models))
        return models

    def save(self, model: TrainedModel, state: dict) -> None:
        from safetensors.torch import save

        from ...nets.registry import file_sha256

        weights = self.weights(model.id)
        _write_private(weights, save({k: v.detach().cpu().contiguous() for k, v in state.items()}))
        meta = {
            "format": MODEL_FORMAT,
            "version": 1,
            "id": model.id,
            "name": model.name,
            "classes": model.classes,
            "frame_size": model.frame_size,
            "key_id": model.key_id,
            "arch": model.arch,
            "metrics": model.metrics,
            "created": model.created,
            "sha256": file_sha256(weights),
        }
        _write_private(self.folder / f"{model.id}.json", (json.dumps(meta, indent=1) + "\n").encode("utf-8"))


def _write_private(path: Path, data: bytes) -> None:
    # Owner-only and never half-written: a restarted server reloads these; the temporary name ends in .tmp so a
    # listing of *.json never picks one up.
    write_atomically(path, lambda tmp: tmp.write_bytes(data), mode=0o600, temporary_suffix=".tmp")
