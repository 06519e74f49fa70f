"""MedLocker's task of the worker process (``medprivacy.worker``): protecting a folder of images with one key.

Loaded by task name only: a MedLocker install has no torch or MONAI, and this module never reaches them (the
models run on the server). The task takes the worker's ``Task`` and returns the result's outputs.
"""

from __future__ import annotations

import os
from typing import Any

from ..transport.watermark_client import WatermarkClient
from . import batch, blending

#: The key's passphrase travels in the worker's environment, never in the request file or argv.
PASSPHRASE_ENV = "MEDPRIVACY_KEY_PASSPHRASE"


def protect_folder(task) -> dict[str, Any]:
    passphrase = os.environ.get(PASSPHRASE_ENV) or None
    key_file = task.options.get("key_file") or None
    credentials = {"passphrase": passphrase} if passphrase else {"key_file": key_file} if key_file else None
    if passphrase and task.options.get("scrypt_log2_n") is not None:
        credentials["scrypt_log2_n"] = int(task.options["scrypt_log2_n"])
    logo_path = task.options.get("logo")
    if logo_path and str(logo_path).endswith(".npy"):  # a logo the app already holds as pixels
        import numpy as np

        logo = blending.as_rgba(np.load(logo_path, allow_pickle=False))
    else:
        logo = blending.load_logo(logo_path) if logo_path else blending.default_logo()
    settings = batch.SearchSettings(**(task.options.get("settings") or {}))
    client = task.client(WatermarkClient)
    try:
        done, reports = batch.protect_folder(
            task.path("inputs", "folder"),
            task.path("outputs", "folder"),
            task.path("outputs", "key"),
            client,
            credentials,
            logo,
            settings,
            task.options.get("lesions", "auto"),
            append=bool(task.options.get("append")),
            overwrite=bool(task.options.get("overwrite")),
            progress=task.progress,
        )
    finally:
        client.close()
    return {
        "protected": done,
        "folder": str(task.outputs["folder"]),
        "key": str(task.outputs["key"]),
        "reports": reports,
    }


TASKS = {"watermark-folder": protect_folder}
#: Its finished images stay on a stop: each is complete, and the key on disk always restores it (``batch``).
KEEPS_PARTIAL_OUTPUTS = {"watermark-folder"}
