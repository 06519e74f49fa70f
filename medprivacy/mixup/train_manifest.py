"""Where a Mixup-Privacy training run starts from and what it leaves: the weights of a previous stage
(``--init-from``) and the three saved networks with their manifest record (command, config, data, metrics).
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import asdict

LABEL_NAMES = {"0": "Background", "1": "CSF", "2": "Gray matter", "3": "White matter"}


def initialise_from(folder: str, nets: dict) -> dict:
    """Load weights for every network from ``folder`` (same architectures); returns that folder's training record
    so the new manifest keeps the whole chain of commands needed to reproduce the final weights."""
    from ..errors import InputError
    from ..nets import load_manifest, load_model

    manifest = load_manifest(folder)
    for name, net in nets.items():
        loaded, _ = load_model(name, folder)
        try:
            net.load_state_dict(loaded.state_dict())
        except RuntimeError:
            raise InputError(
                f"--init-from {folder}: {name} has a different architecture; use the same preset and --arch"
            ) from None
    previous = dict(manifest.get("training", {}))
    previous["weights_sha256"] = {name: manifest["models"][name]["sha256"] for name in nets}
    return previous


def save_trained_networks(
    seg,
    unmix,
    plain,
    seg_arch,
    unmix_arch,
    config,
    out_dir,
    data_description,
    metrics,
    history,
    step,
    started,
    command,
    previous_stage=None,
):
    from ..nets import ModelSpec, save_model

    patch = [config.patch_size] * 3
    lambda_range = [float(v) for v in config.lambda_range]
    seg_spec = save_model(
        seg,
        ModelSpec(
            "mixup-seg",
            "mixup_seg.safetensors",
            seg_arch,
            "server",
            patch,
            LABEL_NAMES,
            extra={"input": "mixed", "lambda_range": lambda_range},
        ),
        out_dir,
    )
    save_model(
        unmix,
        ModelSpec(
            "mixup-unmix",
            "mixup_unmix.safetensors",
            unmix_arch,
            "client",
            patch,
            LABEL_NAMES,
            # The unmixer learned this particular segmenter's errors: pair them so a client refuses a mismatched server.
            extra={"paired_with": {"mixup-seg": seg_spec.sha256}, "lambda_range": lambda_range},
        ),
        out_dir,
    )
    training = {
        "command": command or "medprivacy mixup train " + " ".join(shlex.quote(a) for a in sys.argv[3:]),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "data": data_description,
        "iterations_done": step,
        **({"continued_from": previous_stage} if previous_stage else {}),
        "seconds": round(time.time() - started, 1),
        "torch": __import__("torch").__version__,
        "validation_patch_metrics": metrics,
        "validation_history": history,
    }
    save_model(
        plain,
        ModelSpec(
            "plain-seg",
            "plain_seg.safetensors",
            seg_arch,
            "server",
            patch,
            LABEL_NAMES,
            extra={"input": "plain", "purpose": "evaluation baseline"},
        ),
        out_dir,
        training=training,
    )
