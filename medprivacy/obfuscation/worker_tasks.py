"""ObfuscationPrivacy's tasks of the worker process (``medprivacy.worker``): key generation, obfuscating frames,
classifying them on the server and training there from a dataset folder.

Loaded by task name only, like the other features' tasks. Each task takes the worker's ``Task`` and returns the
result's outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError
from ..transport.obfuscation_client import ObfuscationClient


def keygen(task) -> dict[str, Any]:
    from .keygen import create_site_key

    key_dir = task.options.get("key_dir")
    if not key_dir:
        raise InputError("choose a folder for the obfuscation key")
    existed = Path(key_dir).exists()
    key = create_site_key(
        key_dir,
        force=bool(task.options.get("force")),
        vae_from=task.options.get("vae_from") or None,
        models_dir=task.options.get("models_dir") or None,
        progress=task.progress,
    )
    if not existed:
        task.wrote(Path(key_dir))
    return {"key_dir": str(key_dir), "description": key.describe()}


def load_frames(task):
    import numpy as np

    path = task.input_file("frames")
    try:
        frames = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"input frames {path} are not a readable .npy array ({str(exc).splitlines()[0]}); export them again"
        ) from None
    if frames.ndim != 3:
        raise InputError(f"input frames {path} hold a {frames.ndim}-D array; expected (frames, height, width)")
    return frames


def obfuscate(frames, key_dir, progress):
    from .key import SiteKey
    from .transform import Obfuscator

    if not key_dir:
        raise InputError("choose the obfuscation key folder, or generate a key")
    key = SiteKey.load(key_dir)

    def report(done, total):
        progress(f"obfuscating frame {done}/{total}", done / max(1, total))

    return Obfuscator(key).obfuscate(frames, report), key.key_id


def save_array(task, name: str, array) -> str:
    import numpy as np

    from ..files import write_atomically

    path = task.path("outputs", name)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as stream:  # a file object: given a name, np.save would append ".npy" to it
            np.save(stream, np.ascontiguousarray(array), allow_pickle=False)

    write_atomically(path, write, temporary_suffix=".part")
    task.wrote(path)
    return str(path)


def apply(task) -> dict[str, Any]:
    codes, key_id = obfuscate(load_frames(task), task.options.get("key_dir"), task.progress)
    return {"codes": save_array(task, "codes", codes), "key_id": key_id}


def classify(task) -> dict[str, Any]:
    model = task.options.get("model")
    if not model:
        raise InputError("choose a model trained with this key (refresh the list from the server)")
    codes, key_id = obfuscate(load_frames(task), task.options.get("key_dir"), task.progress)
    task.progress("classifying on the server", 0.9)
    client = task.client(ObfuscationClient)
    try:
        answer = client.classify(codes, model, key_id)
    finally:
        client.close()
    return {
        "model": model,
        "classes": list(answer["classes"]),
        "probabilities": answer["probabilities"],
        "predicted": answer["predicted"],
        "key_id": key_id,
    }


def train(task) -> dict[str, Any]:
    from .dataset import train_on_server
    from .key import SiteKey

    dataset, key_dir = task.options.get("dataset"), task.options.get("key_dir")
    if not dataset:
        raise InputError("choose the dataset folder (one subfolder per class)")
    if not key_dir:
        raise InputError("choose the obfuscation key folder, or generate a key")
    key = SiteKey.load(key_dir)
    client = task.client(ObfuscationClient)
    task.cancel_cooperatively()  # a Cancel must reach the server's job: the core cancels it at its next check
    try:
        job = train_on_server(
            dataset,
            key,
            client,
            int(task.options.get("steps") or 1500),
            task.options.get("name") or "",
            task.progress,
            task.cancelled,
        )
    finally:
        client.close()
    return {"job": job}


TASKS = {
    "obfuscation-keygen": keygen,
    "obfuscation-apply": apply,
    "obfuscation-classify": classify,
    "obfuscation-train": train,
}
