"""MixupPrivacy's tasks of the worker process (``medprivacy.worker``): key generation and private segmentation.

Loaded by task name only, so a worker running another feature's task never imports MONAI or torch. Each task takes
the worker's ``Task`` (request parts, progress, cancel, the outputs it wrote) and returns the result's outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..transport import InferenceClient


def keygen(task) -> dict[str, Any]:
    from .bank import generate_bank

    options = {k: task.options[k] for k in ("subjects", "patches", "deformation") if task.options.get(k) is not None}
    if task.options.get("patch_size"):
        options["patch_size"] = tuple(int(v) for v in task.options["patch_size"])
    key_dir = task.options.get("key_dir") or None
    existed = key_dir is not None and Path(key_dir).exists()
    bank = generate_bank(key_dir, force=bool(task.options.get("force")), progress=task.progress, **options)
    if not existed and bank.directory is not None:
        task.wrote(Path(bank.directory))
    return {"key_dir": str(bank.directory), "patches": len(bank), "patch_size": list(bank.patch_size)}


def segment(task) -> dict[str, Any]:
    from ..files import check_writable_folder
    from .bank import ReferenceBank
    from .io import check_labelmap_path, read_image, write_image, write_labelmap
    from .pipeline import segment_private

    labelmap_path = check_labelmap_path(task.path("outputs", "labelmap"))
    uploaded_path, rebuild_path = task.path("outputs", "uploaded", False), task.path("outputs", "rebuild", False)
    for extra in (uploaded_path, rebuild_path):
        if extra is not None:
            check_writable_folder(extra.parent, f"folder of {extra.name}")
    image = read_image(task.input_file("image"))
    bank = ReferenceBank.load(task.options.get("key_dir") or None)
    client = task.client(InferenceClient)
    tta = task.options.get("tta")
    result = segment_private(
        image,
        client,
        bank,
        privacy=task.options.get("privacy"),
        tta=None if tta is None else int(tta),
        unmix=task.options.get("unmix", "learned"),
        seed=task.options.get("seed"),
        keep_uploaded=uploaded_path is not None,
        progress=task.progress,
        cancel=task.cancelled,
    )
    outputs: dict[str, Any] = {"stats": result.stats}
    if rebuild_path is not None:
        from .audit.attack import server_rebuild

        write_image(server_rebuild(result.session, bank, progress=task.progress), rebuild_path)
        task.wrote(rebuild_path)
        outputs["rebuild"] = str(rebuild_path)
    if uploaded_path is not None:
        write_image(result.uploaded, uploaded_path)
        task.wrote(uploaded_path)
        outputs["uploaded"] = str(uploaded_path)
    write_labelmap(result.labelmap, labelmap_path)
    task.wrote(labelmap_path)
    outputs["labelmap"] = str(labelmap_path)
    return outputs


TASKS = {"mixup-keygen": keygen, "mixup-segment": segment}
