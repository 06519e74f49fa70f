"""A labelled dataset on disk for ``medprivacy obfuscate train``: a folder with one subfolder per class, or a CSV.

Folder: ``DATASET/<class name>/<files>``; class names are the subfolder names in sorted order, every readable frame
file inside (not in deeper folders, hidden files skipped) is one example, and every frame of a multi-frame file
(a run) gets the label of its folder. CSV: one ``path,label`` row per file (a header row ``path,label`` is
allowed), paths relative to the CSV's folder; classes are the distinct labels in sorted order.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CancelledError, InputError
from ..imageio import has_suffix_of
from .io import READ_FORMATS, read_frames


@dataclass
class LabelledFiles:
    paths: list
    labels: list  # class index per file
    classes: list

    def counts(self) -> dict:
        return {name: sum(1 for label in self.labels if label == i) for i, name in enumerate(self.classes)}


def _readable(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and has_suffix_of(path, READ_FORMATS)


def dataset_files(dataset: str | os.PathLike) -> LabelledFiles:
    """The files and labels of a dataset folder or CSV, or a one-line InputError saying what is wrong with it."""
    dataset = Path(dataset)
    if dataset.is_dir():
        folders = sorted(p for p in dataset.iterdir() if p.is_dir() and not p.name.startswith("."))
        classes, paths, labels = [], [], []
        for folder in folders:
            files = sorted(p for p in folder.iterdir() if _readable(p))
            if not files:
                continue
            classes.append(folder.name)
            paths += files
            labels += [len(classes) - 1] * len(files)
        if len(classes) < 2:
            found = f"only the class folder {classes[0]!r}" if classes else "no class folder with image files"
            raise InputError(
                f"{dataset} has {found}; a classifier needs at least two classes: one subfolder per class, "
                "each holding PNG, TIFF, DICOM, NIfTI or NRRD frames"
            )
        return LabelledFiles(paths, labels, classes)
    if dataset.is_file() and dataset.suffix.lower() == ".csv":
        return _csv_files(dataset)
    if not dataset.exists():
        raise InputError(
            f"dataset {dataset} does not exist; give a folder with one subfolder per class, or a CSV of path,label"
        )
    raise InputError(
        f"dataset {dataset} is neither a folder nor a .csv file; give a folder with one subfolder per class, or a "
        "CSV of path,label"
    )


def _csv_files(path: Path) -> LabelledFiles:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(
            f"cannot read {path} as CSV ({type(exc).__name__}); write one 'path,label' row per file"
        ) from None
    if rows and [cell.strip().lower() for cell in rows[0]] == ["path", "label"]:
        rows = rows[1:]
    entries = []
    for number, row in enumerate(rows, start=1):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise InputError(f"{path} row {number} is {','.join(row)[:80]!r}; every row must be 'path,label'")
        file = Path(row[0].strip())
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            raise InputError(f"{path} row {number}: {file} does not exist")
        entries.append((file, row[1].strip()))
    classes = sorted({label for _, label in entries})
    if len(classes) < 2:
        found = f"only the label {classes[0]!r}" if classes else "no rows"
        raise InputError(f"{path} has {found}; a classifier needs at least two classes")
    index = {name: i for i, name in enumerate(classes)}
    return LabelledFiles([f for f, _ in entries], [index[label] for _, label in entries], classes)


def obfuscate_dataset(
    files: LabelledFiles,
    obfuscator,
    progress: Callable[[str, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every frame of every file through the site key: (codes (N, h, w) uint8, labels (N,) int64)."""
    codes, labels = [], []
    for number, (path, label) in enumerate(zip(files.paths, files.labels)):
        if cancel is not None and cancel():
            raise CancelledError(f"obfuscation cancelled after {number} of {len(files.paths)} files")
        if progress is not None:
            progress(
                f"obfuscating {Path(path).name} ({number + 1}/{len(files.paths)})", number / max(1, len(files.paths))
            )
        frames = read_frames(path)
        codes.append(obfuscator.obfuscate(frames.pixels))
        labels.append(np.full(frames.count, label, dtype=np.int64))
    return np.concatenate(codes), np.concatenate(labels)


def train_on_server(
    dataset: str | os.PathLike,
    key,
    client,
    steps: int,
    name: str = "",
    progress: Callable[[str, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> dict:
    """Obfuscate a labelled dataset (folder per class, or CSV) under the site ``key`` here, train a model on the
    server (an ``ObfuscationClient``) and follow the job; a cancel cancels the job there too. Returns the finished job
    (its ``model`` is the new model id). The Slicer logic and the worker process share this path."""
    from .transform import Obfuscator

    files = dataset_files(dataset)
    client.info()

    def stage(text, fraction):
        if progress is not None:
            progress(text, 0.3 * (fraction or 0.0))

    codes, labels = obfuscate_dataset(files, Obfuscator(key), progress=stage, cancel=cancel)
    if progress is not None:
        progress(f"uploading {len(codes)} obfuscated frames", 0.3)
    job = client.submit_training(codes, labels, files.classes, key.key_id, name=name, steps=int(steps))

    def follow(state):
        if progress is not None:
            done = state.get("progress") or {}
            fraction = float(done.get("fraction") or 0.0)
            accuracy = done.get("validation_accuracy")
            text = f"training on the server: step {done.get('step', 0)}/{done.get('steps', steps)}"
            progress(
                text + (f", validation accuracy {accuracy:.3f}" if accuracy is not None else ""), 0.3 + 0.7 * fraction
            )

    return client.wait(job["job"], progress=follow, cancel=cancel, poll=0.5)
