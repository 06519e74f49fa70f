"""Protecting a batch of image files with one key: the code path shared by ``medprivacy watermark protect`` and the
Slicer module's Dataset tab.

Order of work: every input is read and checked first (``plan_protection``), so a bad file stops the batch before the
server spends time on it; then the server's classifiers and lesion segmenter are checked (``check_classifiers``,
``choose_lesion_source``); then ``protect_files`` searches each image on the server, blends the logo locally into
the exact pixels, saves the key with the image's entry, and then writes the result in the input's own format. The
key on disk therefore always covers every protected file on disk, however the batch stops (an error, a cancel,
SIGTERM or SIGKILL, a full disk), because only that key can restore them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import CancelledError, InputError
from .boxes import DEFAULT_MODE
from .optimizer import (
    DEFAULT_ALPHA_BOUNDS,
    DEFAULT_CROSSOVER_RATE,
    DEFAULT_GENERATIONS,
    DEFAULT_LOCAL_ITERATIONS,
    DEFAULT_POPULATION,
    DEFAULT_STEP,
)
from .true_labels import describe_target

LESION_CHOICES = ("auto", "server", "none")

Progress = Callable[[str, "float | None"], None]


@dataclass
class SearchSettings:
    """What the server's watermark search is asked for (``WatermarkClient.optimize`` parameters).

    ``seed`` seeds the first image's search; the n-th image of a batch uses ``seed + n``, so a batch is reproducible
    without giving every image the same search.
    """

    mode: str = DEFAULT_MODE
    models: list[str] | None = None
    weights: list[float] | None = None
    label: int | None = None
    sl: float = 4.0
    population: int = DEFAULT_POPULATION
    generations: int = DEFAULT_GENERATIONS
    crossover_rate: float = DEFAULT_CROSSOVER_RATE
    step: int = DEFAULT_STEP
    local_iterations: int = DEFAULT_LOCAL_ITERATIONS
    alpha_range: tuple[float, float] = DEFAULT_ALPHA_BOUNDS
    mutation: str = "basin-hopping"
    max_evaluations: int | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def request(self, lesions: str, index: int = 0) -> dict[str, Any]:
        """Keyword arguments of ``WatermarkClient.optimize`` for the ``index``-th image of a batch."""
        if self.sl <= 0:
            raise InputError(f"the logo scale sl must be positive (got {self.sl:g})")
        if self.weights is not None and (self.models is None or len(self.weights) != len(self.models)):
            raise InputError("give one weight per chosen source model, or no weights at all")
        return dict(
            mode=self.mode,
            lesions=lesions,
            models=self.models,
            weights=self.weights,
            label=self.label,
            sl=self.sl,
            population=self.population,
            generations=self.generations,
            crossover_rate=self.crossover_rate,
            step=self.step,
            local_iterations=self.local_iterations,
            alpha_range=[float(v) for v in self.alpha_range],
            mutation=self.mutation,
            max_evaluations=self.max_evaluations,
            seed=None if self.seed is None else int(self.seed) + index,
            **self.extra,
        )


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files MedLocker reads in ``folder`` (not its subfolders), sorted by name; hidden files are skipped."""
    from . import io as mio

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"input folder {folder} does not exist or is not a folder")
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            mio.image_format(path)
        except InputError:
            continue  # a README or a spreadsheet next to the images is not an error
        found.append(path)
    if not found:
        raise InputError(f"{folder} holds no PNG, JPEG, TIFF, NIfTI or DICOM image")
    return found


def check_target(source: Path, target: Path, overwrite: bool) -> None:
    if target.exists() and target.resolve() == source.resolve():
        raise InputError(f"the output {target} would overwrite its input; choose another output folder")
    if target.exists() and not overwrite:
        raise InputError(f"{target} already exists; pass --overwrite or choose another output folder")


def plan_protection(
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    key,
    logo,
    sl: float,
    overwrite: bool = False,
    key_label: str = "the key",
) -> list[tuple[Path, Path]]:
    """(input, output) per image after checking every input: readable, watermarkable, logo fits, name unused."""
    from . import blending, io as mio

    jobs, names = [], {}
    for path in images:
        path = Path(path)
        image = mio.read_image(path)
        blending.check_image(image.pixels, path.name)
        try:
            blending.fitted_size(image.pixels.shape, logo.shape, sl)
        except InputError as exc:
            raise InputError(f"{path.name}: {exc}") from None
        if path.name in names:
            raise InputError(
                f"two inputs are named {path.name} ({names[path.name]} and {path}); "
                "names identify images in the key, rename one"
            )
        if path.name in key:
            raise InputError(f"{path.name} is already in {key_label}; each image name can be protected once per key")
        names[path.name] = path
        target = Path(out_dir) / mio.output_name(path)
        check_target(path, target, overwrite)
        jobs.append((path, target))
    return jobs


def make_output_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and check a file can be written there (root ignores permission bits; a
    read-only mount or a full disk shows only when one tries), so a batch never fails after the server worked."""
    from ..files import check_writable_folder, os_error_reason

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"cannot create {what} {folder} ({os_error_reason(exc)}); choose a folder you can write to"
        ) from None
    return check_writable_folder(folder, what)


def prepare_folders(output_dir: str | os.PathLike, key_path: str | os.PathLike, key_what: str = "key folder") -> None:
    """Every place a protection batch writes to, tried before any image is searched."""
    from ..files import check_writable_folder

    make_output_folder(output_dir)
    check_writable_folder(Path(key_path).parent, key_what)


def check_classifiers(client, models: Sequence[str] | None) -> dict[str, Any]:
    """The server's /v1/info after checking that it serves classifiers, and every one of ``models``."""
    info = client.info()
    available = {n: d for n, d in info.get("models", {}).items() if d.get("task") == "classify"}
    if not available:
        raise InputError(f"{client.url} holds no watermark classifier; ask the operator to serve MedLocker models")
    unknown = [m for m in models or [] if m not in available]
    if unknown:
        raise InputError(
            f"{client.url} has no classifier {', '.join(map(repr, unknown))}; it has {', '.join(sorted(available))}"
        )
    return info


def choose_lesion_source(
    mode: str, lesions: str, info: dict[str, Any], note: Callable[[str], None] | None = None
) -> str:
    """What the server is told about lesions ("server" or "none") for ``lesions`` in ``LESION_CHOICES``."""
    if lesions not in LESION_CHOICES:
        raise InputError(f"lesions must be one of {', '.join(LESION_CHOICES)}, not {lesions!r}")
    has_segmenter = any(d.get("task") == "segment-lesion" for d in info.get("models", {}).values())
    if mode == "wap":
        return "none"
    if lesions == "none":
        if mode == "keep-in":
            raise InputError("--mode keep-in needs lesion boxes; use --lesions auto or server")
        return "none"
    if not has_segmenter:
        if mode == "keep-in" or lesions == "server":
            raise InputError(
                f"the server holds no lesion segmenter, so it cannot find lesions for --mode {mode}; use --mode wap"
            )
        if note is not None:
            note("note: the server holds no lesion segmenter; keep-out places the logo anywhere")
        return "none"
    return "server"


def protect_files(
    jobs: Sequence[tuple[Path, Path]],
    client,
    key,
    logo: np.ndarray,
    settings: SearchSettings,
    lesions: str,
    key_path: str | os.PathLike,
    credentials: dict[str, Any],
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    on_image: Callable[[Path, Path, Any, dict[str, Any]], None] | None = None,
    on_partial_save: Callable[[str], None] | None = None,
    labels: dict[str, int] | None = None,
) -> int:
    """Protect every (input, output) of ``jobs`` into ``key``, saving the key after each image; returns the number
    protected.

    The key file is rewritten (atomically) with each image's entry before that image's protected file is written,
    so whenever the batch stops (an error, a cancel, SIGTERM, SIGKILL, a power cut) every protected file on disk
    can be restored with the key on disk. ``labels`` maps input file names to their true class (the search then
    pushes every model away from it); images without one are pushed away from each model's own clean answer.
    ``progress(text, fraction)`` is called before each image, ``on_image(input, output, image, answer)`` after it.
    ``cancel()`` is checked between images (the search of the current image is not interrupted); cancelling raises
    CancelledError. On an early stop after some images ``on_partial_save`` gets a one-line note.
    """
    from . import io as mio
    from .keyfile import KeyWriter

    key_path = Path(key_path)
    key_existed = key_path.exists()
    writer = KeyWriter(key_path, **credentials)
    done = 0
    try:
        for index, (path, target) in enumerate(jobs):
            if cancel is not None and cancel():
                raise CancelledError(f"protection cancelled after {done} of {len(jobs)} image(s)")
            if progress is not None:
                progress(f"protecting {path.name} ({index + 1} of {len(jobs)})", index / max(1, len(jobs)))
            image = mio.read_image(path)
            request = settings.request(lesions, index)
            if labels is not None and path.name in labels:
                request["label"] = int(labels[path.name])
            answer = client.optimize(image.pixels, logo, window=image.window, **request)
            found = answer["params"]
            protected = key.protect(
                path.name, image.pixels, logo, found["alpha"], found["x"], found["y"], settings.sl, image.window
            )
            ours = list(key[path.name].logo_size)
            if ours != list(answer["logo_size"]):
                key.remove(path.name)
                raise InputError(
                    f"the server sized the logo {answer['logo_size']} but this client {ours}; "
                    "update client and server to the same MedPrivacy version"
                )
            # Key first, image second: a protected file must never exist without the key entry that restores it.
            try:
                writer.save(key)
            except BaseException:
                key.remove(path.name)
                raise
            before = _file_identity(target)
            try:
                mio.write_image(image, protected, target)
            except BaseException:
                # A stop (SIGTERM) can land after the atomic rename put the new file in place; then the entry must
                # stay, since only it restores that file. Roll back only when the target is still what it was.
                if _file_identity(target) == before:
                    key.remove(path.name)
                    if len(key):
                        _try_save(writer, key)
                    elif not key_existed:
                        key_path.unlink(missing_ok=True)  # a key for no image at all would only mislead
                raise
            done += 1
            if on_image is not None:
                on_image(path, target, image, answer)
    except BaseException:
        if done and on_partial_save is not None:
            on_partial_save(
                f"key {key_path} holds the {done} image(s) protected before the stop; protect the others with --append"
            )
        raise
    if progress is not None:
        progress(f"protected {done} image(s); key saved", 1.0)
    return done


def _file_identity(path: Path):
    """(inode, mtime) of ``path``, or None if absent: an atomic rename onto it changes the inode."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _try_save(writer, key) -> None:
    # Drops the entry of an image that was never written; if even that fails, the stale entry only names an image
    # that does not exist, which costs nothing.
    try:
        writer.save(key)
    except Exception:
        pass


def describe_predictions(answer: dict[str, Any]) -> list[str]:
    """One line per source model, top class before -> after, and a summary line; for the GUI, the worker and logs."""
    params = answer["params"]
    verdict = "every model fooled" if answer.get("fooled") else "not every model fooled"
    lines = [
        f"{verdict}: alpha {params['alpha']:.1f} at x={params['x']} y={params['y']}, "
        f"{answer.get('evaluations', '?')} evaluations"
    ]
    if "target_source" in answer:
        lines.append(f"target: {describe_target(answer)}")
    for name in answer.get("models", []):
        lines.append(f"{name}: {_top(answer['before'][name])} -> {_top(answer['after'][name])}")
    return lines


def _top(prediction: dict[str, Any]) -> str:
    index = prediction["predicted"][0]
    label = prediction["labels"].get(str(index), f"class {index}")
    return f"{label} {prediction['probabilities'][0][index]:.2f}"


def protect_folder(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    key_path: str | os.PathLike,
    client,
    credentials: dict[str, Any] | None,
    logo: np.ndarray,
    settings: SearchSettings | None = None,
    lesions: str = "auto",
    append: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[int, list[str]]:
    """Protect every image file of ``input_dir`` into ``output_dir`` and one key at ``key_path``: the folder workflow
    of the Slicer logic and the worker process. Returns (images protected, one report line per image and note).

    ``credentials``: ``{"passphrase": ...}`` (optionally with ``scrypt_log2_n``) or ``{"key_file": ...}``.
    ``append`` adds to an existing key (opened with the same credentials). Every input is checked before the
    server works; on a cancel or an error the key still holds the images finished so far.
    """
    from .keyfile import WatermarkKey, load_key

    if not credentials:
        raise InputError("the dataset key needs a passphrase or a key file")
    key_path, output_dir = Path(key_path), Path(output_dir)
    if key_path.is_dir():
        raise InputError(f"the key {key_path} is a folder; give a file name for the key")
    if not key_path.parent.is_dir():
        raise InputError(f"the folder of the key {key_path} does not exist; create it first")
    if key_path.exists() and not append:
        raise InputError(f"key {key_path} already exists; choose a new key file or add the images to it")
    settings = settings or SearchSettings()
    opening = {k: v for k, v in credentials.items() if k != "scrypt_log2_n"}
    key = load_key(key_path, **opening) if key_path.exists() else WatermarkKey()
    images = image_files(input_dir)
    if output_dir.resolve() == Path(input_dir).resolve():
        raise InputError("the output folder is the input folder; choose another one so the originals stay untouched")
    if progress:
        progress(f"checking {len(images)} image(s)", 0.0)
    jobs = plan_protection(images, output_dir, key, logo, settings.sl, overwrite, key_label=f"key {key_path}")
    prepare_folders(output_dir, key_path)  # a read-only or full folder: one line now, not after the searches
    reports: list[str] = []
    info = check_classifiers(client, settings.models)
    source = choose_lesion_source(settings.mode, lesions, info, note=reports.append)

    def report(path, target, _image, answer) -> None:
        reports.append(f"{path.name} -> {target.name}: " + "; ".join(describe_predictions(answer)))

    done = protect_files(
        jobs,
        client,
        key,
        logo,
        settings,
        source,
        key_path,
        credentials,
        progress=progress,
        cancel=cancel,
        on_image=report,
        on_partial_save=reports.append,
    )
    return done, reports
