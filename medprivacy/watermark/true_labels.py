"""Which class each image of a batch truly is, and how a report says what the search pushed away from.

A label comes from ``--label`` (one for every image) or a labels CSV (``read_labels_csv``), as a class index or a
class name of the server's classifiers (``classifier_labels``, ``resolve_label``); without one, each model is pushed
away from its own answer on the clean image (``describe_target`` says which).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError


def read_labels_csv(path: str | os.PathLike) -> dict[str, str]:
    """{image file name: label text} from a CSV with a header row holding the columns ``image`` and ``label``.

    The image column may hold file names or paths (only the name is used); a label is a class index or a class
    name (``resolve_labels`` maps it on the server's classifiers).
    """
    import csv

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
            if "image" not in columns or "label" not in columns:
                raise InputError(
                    f"{path} needs a header row with the columns image,label "
                    f"(found {', '.join(columns) or 'no header'})"
                )
            labels: dict[str, str] = {}
            for line, row in enumerate(reader, start=2):
                name = Path(str(row.get(columns["image"]) or "").strip()).name
                label = str(row.get(columns["label"]) or "").strip()
                if not name and not label:
                    continue
                if not name or not label:
                    raise InputError(f"{path} line {line}: give both an image name and its label")
                if labels.get(name, label) != label:
                    raise InputError(f"{path} gives {name} two labels ({labels[name]!r} and {label!r}); keep one")
                labels[name] = label
    except OSError as exc:
        raise InputError(f"cannot read labels file {path} ({exc.strerror or type(exc).__name__})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(
            f"{path} is not a readable CSV file ({exc}); save it as UTF-8 CSV with columns image,label"
        ) from None
    if not labels:
        raise InputError(f"{path} lists no image; give one row per image: name,label")
    return labels


def classifier_labels(info: dict[str, Any], models: Sequence[str] | None) -> dict[int, str]:
    """Class index -> name of the classifiers a search uses (the chosen ones, else every classifier that agrees)."""
    described = {n: d for n, d in info.get("models", {}).items() if d.get("task") == "classify"}
    chosen = [described[m] for m in models] if models else list(described.values())
    names: dict[int, str] = {}
    for description in chosen:
        for index, name in (description.get("labels") or {}).items():
            names.setdefault(int(index), str(name))
    return names


def resolve_label(text: str | int, class_names: dict[int, str], origin: str) -> int:
    """A label given as a class index or a class name -> the class index."""
    value = str(text).strip()
    if value.lstrip("-").isdigit():
        index = int(value)
        if class_names and index not in class_names:
            raise InputError(f"{origin}: class {index} does not exist; the classifiers know {_classes(class_names)}")
        return index
    by_name = {name.lower(): index for index, name in class_names.items()}
    if value.lower() not in by_name:
        raise InputError(f"{origin}: unknown class {value!r}; the classifiers know {_classes(class_names)}")
    return by_name[value.lower()]


def resolve_labels(
    raw: dict[str, str], class_names: dict[int, str], csv_path, images: Sequence[Path]
) -> dict[str, int]:
    """{image name: class index} for the ``images`` of a batch, from ``read_labels_csv``'s output."""
    return {
        Path(p).name: resolve_label(raw[Path(p).name], class_names, f"{csv_path} ({Path(p).name})")
        for p in images
        if Path(p).name in raw
    }


def describe_target(answer: dict[str, Any], label_source: str = "a label") -> str:
    """What the search pushed the models away from, in words (the report must never leave it implicit)."""
    if answer.get("target_source") == "label":
        first = next(iter(answer["before"].values()))
        name = first["labels"].get(str(answer["target"]), f"class {answer['target']}")
        return f"away from the true class {name!r} ({label_source})"
    return (
        "away from each model's own answer on the clean image (no label given: 'fooled' means changed, "
        "not necessarily wrong)"
    )


def _classes(class_names: dict[int, str]) -> str:
    return ", ".join(f"{i} ({n})" for i, n in sorted(class_names.items())) or "none"
