"""Where trained MedLocker networks go: each one saved with its spec, and the run recorded in the models
manifest's ``watermark_training`` entry (the mixup models' ``training`` entry is left alone)."""

from __future__ import annotations

import shlex

from ..errors import InputError
from .models import LABELS, input_description, model_file, model_name
from .train_plans import WatermarkTrainConfig

MANIFEST_KEY = "watermark_training"


def save_trained_model(net, family: str, arch: dict, config: WatermarkTrainConfig, out_dir, extra: dict) -> None:
    from ..nets import ModelSpec, save_model

    size = [config.size, config.size]
    spec = ModelSpec(
        name=model_name(family),
        file=model_file(family),
        arch=arch,
        role="server",
        patch_size=size,
        labels=dict(LABELS),
        extra={
            "family": family,
            "input": input_description(size),
            **extra,
            "preset": config.preset,
            "seed": config.seed,
        },
    )
    save_model(net, spec, out_dir)


def write_record(out_dir, record: dict) -> None:
    """Read-modify-write of the manifest: only the ``watermark_training`` entry changes.

    A run of a subset of the networks (``--models``) updates their entries and keeps the others'. Every entry
    records the command that trained it; the top-level command, without ``--models``, rebuilds all of them."""
    from ..nets.registry import load_manifest, write_manifest

    try:
        manifest = load_manifest(out_dir)
    except InputError:
        manifest = {"models": {}}
    for metrics in record["models"].values():
        metrics.setdefault("command", record["command"])
    previous = manifest.get(MANIFEST_KEY)
    default_families = list(WatermarkTrainConfig.preset_config(record["config"]["preset"]).families)
    subset = list(record["config"]["families"]) != default_families
    if subset and isinstance(previous, dict) and isinstance(previous.get("models"), dict):
        merged = dict(record, models={**previous["models"], **record["models"]})
        merged["command"] = _without_models_option(record["command"])
        merged["config"] = dict(record["config"], families=default_families)
        merged["seconds"] = round(float(previous.get("seconds", 0)) + float(record.get("seconds", 0)), 1)
        record = merged
    manifest[MANIFEST_KEY] = record
    write_manifest(manifest, out_dir)


def _without_models_option(command: str) -> str:
    parts = shlex.split(command)
    if "--models" in parts:
        at = parts.index("--models")
        del parts[at : at + 2]
    return " ".join(shlex.quote(p) for p in parts)
