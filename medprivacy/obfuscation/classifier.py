"""The classifier a server trains on obfuscated frames, and the training loop shared by the server and the evaluation.

Input: uint8 frames (N, H, W). An obfuscated frame holds codes, not intensities: a code's number says nothing about
its neighbours' (the mapping shuffled them). So the front end turns each frame into local code histograms: a one-hot
channel per code value seen in the training frames (at most :data:`MAX_CODES`), averaged over 4x4 blocks. What a
code means (which intensities it stands for) the first convolution learns; the averaging keeps the network from
memorising the per-pixel dither noise (measured: a learned per-code embedding at full resolution, or codes read as
intensities, fitted the training frames perfectly and stayed near chance on new ones). A MONAI residual body
(strided ``ResidualUnit``s, instance norm) and global average pooling follow.

The evaluation's plain baseline uses the same network with an ``intensity`` front end (the frame / 255, averaged
over the same blocks), so both see 16x16 maps of a 64x64 frame and train with the same budget.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from ..errors import CancelledError, InputError
from ..nets.obfuscation import build_code_classifier  # noqa: F401  (the network's home is nets/)

ARCH_NAME = "code-classifier"
#: Obfuscated frames hold a few codes (the key's); frames with more distinct values were not obfuscated.
MAX_CODES = 64
DEFAULT_ARCH = {"name": ARCH_NAME, "input": "codes", "pool": 4, "channels": [32, 64, 64], "subunits": 2}


def strides_for(side: int, pool: int, units: int) -> list:
    """Stride 2 while the feature map keeps at least 2x2 pixels (instance norm needs more than one), then 1."""
    size, strides = side // pool, []
    for _ in range(units):
        strides.append(2 if size // 2 >= 2 else 1)
        size = size // strides[-1]
    return strides


def code_values(frames: np.ndarray) -> list:
    """The distinct values of obfuscated frames: the classifier's one-hot channels."""
    values = np.flatnonzero(np.bincount(np.asarray(frames, dtype=np.uint8).ravel(), minlength=256))
    if len(values) > MAX_CODES:
        raise InputError(
            f"the frames hold {len(values)} distinct values; obfuscated frames hold at most {MAX_CODES} codes: "
            "these look like plain images, obfuscate them with the site key first"
        )
    return [int(v) for v in values]


@dataclass
class TrainSettings:
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 2e-3
    validation_fraction: float = 0.1
    validate_every: int = 100
    max_shift: int = (
        3  # augmentation: random translation in pixels (the mapping is per pixel, so shifts commute with it)
    )
    seed: int = 0

    def check(self) -> TrainSettings:
        if not (1 <= self.steps <= 100_000 and 1 <= self.batch_size <= 1024 and 0 < self.learning_rate <= 1.0):
            raise InputError("training needs 1 <= steps <= 100000, 1 <= batch size <= 1024 and 0 < learning rate <= 1")
        if not (0.0 <= self.validation_fraction < 0.5) or self.validate_every < 1 or not (0 <= self.max_shift <= 16):
            raise InputError("validation fraction must lie in [0, 0.5), validate_every >= 1 and max_shift in 0..16")
        return self

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    net: object
    arch: dict
    metrics: dict


def warmup_cosine(optimizer, steps: int, warmup_fraction: float = 0.1):
    """Linear warm-up over the first tenth of the steps, then cosine decay to 5 % of the peak rate (any step count)."""
    import math

    import torch

    warmup = max(1, round(steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def split_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): ``fraction`` of each class, at least one per class when possible."""
    rng = np.random.default_rng([seed, 17])
    train, validation = [], []
    for value in np.unique(labels):
        members = rng.permutation(np.nonzero(labels == value)[0])
        count = int(round(fraction * len(members)))
        if fraction > 0 and len(members) > 1:
            count = max(1, count)
        validation.extend(members[:count])
        train.extend(members[count:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(validation, dtype=np.int64))


def check_dataset(frames: np.ndarray, labels: np.ndarray, classes: list, input: str = "codes") -> None:
    """One-line InputError for a training set a code classifier cannot learn from."""
    if frames.ndim != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise InputError(f"training frames must be uint8 (N, H, W) with N >= 1, got {frames.dtype} {frames.shape}")
    if labels.shape != (len(frames),):
        raise InputError(f"there are {len(frames)} frames but {labels.size} labels")
    if len(classes) < 2:
        raise InputError(
            f"a classifier needs at least two classes (got {len(classes)}: {', '.join(map(str, classes)) or 'none'})"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise InputError(f"labels must lie in 0..{len(classes) - 1}")
    present = np.unique(labels)
    if len(present) < 2:
        raise InputError(
            f"every frame has the label {classes[int(present[0])]!r}; a classifier needs frames of at least two classes"
        )
    pool = int(DEFAULT_ARCH["pool"])
    if frames.shape[1] % pool or frames.shape[2] % pool:
        raise InputError(
            f"frames of {frames.shape[2]}x{frames.shape[1]} cannot be pooled in {pool}x{pool} blocks; use sides "
            f"divisible by {pool}"
        )
    if input == "codes":
        code_values(frames)


def train_classifier(
    frames: np.ndarray,
    labels: np.ndarray,
    classes: list,
    settings: TrainSettings,
    device: str = "cpu",
    arch: dict | None = None,
    progress: Callable[[dict], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    lock=None,
) -> TrainResult:
    """Train a ``code-classifier`` on uint8 frames (N, H, W) with integer ``labels``; keeps the weights of the best
    validation accuracy (the last ones without a validation split). ``progress(state)`` gets a dict after every
    validation; ``cancel()`` is checked every step; ``lock`` (e.g. the server's inference lock) is held per step."""
    import contextlib

    import torch

    settings.check()
    frames, labels = np.asarray(frames), np.asarray(labels, dtype=np.int64)
    arch = dict(arch or DEFAULT_ARCH)
    check_dataset(frames, labels, classes, arch.get("input", "codes"))
    arch = dict(arch, classes=len(classes), frame_size=[int(frames.shape[1]), int(frames.shape[2])])
    arch.setdefault("strides", strides_for(min(frames.shape[1:]), int(arch.get("pool", 1)), len(arch["channels"])))
    if arch.get("input", "codes") == "codes":
        arch["code_values"] = code_values(frames)
    pool = int(arch.get("pool", 1))
    if frames.shape[1] % pool or frames.shape[2] % pool:
        raise InputError(
            f"frames of {frames.shape[2]}x{frames.shape[1]} cannot be pooled in {pool}x{pool} blocks; use sides "
            f"divisible by {pool}"
        )
    train_index, val_index = split_validation(labels, settings.validation_fraction, settings.seed)
    torch.manual_seed(settings.seed)
    net = build_code_classifier(arch).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    scheduler = warmup_cosine(optimizer, settings.steps)
    rng = np.random.default_rng([settings.seed, 3])
    frames_t = torch.from_numpy(np.ascontiguousarray(frames))
    labels_t = torch.from_numpy(labels)
    guard = lock if lock is not None else contextlib.nullcontext()
    best, best_state, best_step, history = -1.0, None, 0, []
    started = time.perf_counter()
    batch = min(settings.batch_size, len(train_index))
    for step in range(1, settings.steps + 1):
        if cancel is not None and cancel():
            raise CancelledError(f"training cancelled at step {step - 1} of {settings.steps}")
        index = train_index[rng.integers(len(train_index), size=batch)]
        x = shift_batch(frames_t[index], rng, settings.max_shift)
        with guard:
            net.train()
            loss = torch.nn.functional.cross_entropy(net(x.to(device)), labels_t[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        if step % settings.validate_every == 0 or step == settings.steps:
            state = {"step": step, "steps": settings.steps, "loss": round(float(loss.item()), 4)}
            if len(val_index):
                with guard:
                    probs = predict_probabilities(net, frames[val_index], device)
                accuracy = float((probs.argmax(1) == labels[val_index]).mean())
                state["validation_accuracy"] = round(accuracy, 4)
                if accuracy >= best:
                    best, best_state, best_step = accuracy, copy.deepcopy(net.state_dict()), step
            history.append(state)
            if progress is not None:
                progress(dict(state, seconds=round(time.perf_counter() - started, 1)))
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    metrics = {
        "train_frames": int(len(train_index)),
        "validation_frames": int(len(val_index)),
        "validation_accuracy": round(best, 4) if len(val_index) else None,
        "best_step": best_step or settings.steps,
        "history": history,
        "seconds": round(time.perf_counter() - started, 1),
        "settings": settings.to_json(),
    }
    return TrainResult(net, arch, metrics)


def shift_batch(x, rng, max_shift: int):
    """Random translation of each frame by up to ``max_shift`` pixels, edges replicated."""
    import torch

    if not max_shift:
        return x
    padded = torch.nn.functional.pad(x[:, None].float(), (max_shift,) * 4, mode="replicate")[:, 0].to(x.dtype)
    h, w = x.shape[1:]
    out = torch.empty_like(x)
    shifts = rng.integers(0, 2 * max_shift + 1, size=(len(x), 2))
    for i, (dy, dx) in enumerate(shifts):
        out[i] = padded[i, dy : dy + h, dx : dx + w]
    return out


def predict_probabilities(net, frames: np.ndarray, device: str = "cpu", batch: int = 256) -> np.ndarray:
    """Class probabilities (N, C) float64 for uint8 frames (N, H, W)."""
    import torch

    net.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(frames), batch):
            x = torch.from_numpy(np.ascontiguousarray(frames[start : start + batch])).to(device)
            out.append(torch.softmax(net(x).float(), dim=1).cpu().numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, 0))


def binary_metrics(probability: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, AUC (Mann-Whitney), sensitivity and specificity for class 1 probabilities and 0/1 labels."""
    from scipy.stats import rankdata

    probability, labels = np.asarray(probability, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    predicted = probability >= 0.5
    positives, negatives = labels == 1, labels == 0
    auc = None
    if positives.any() and negatives.any():
        ranks = rankdata(probability)
        auc = (ranks[positives].sum() - positives.sum() * (positives.sum() + 1) / 2) / (
            positives.sum() * negatives.sum()
        )
    return {
        "accuracy": round(float((predicted == positives).mean()), 4),
        "auc": None if auc is None else round(float(auc), 4),
        "sensitivity": round(float(predicted[positives].mean()), 4) if positives.any() else None,
        "specificity": round(float((~predicted[negatives]).mean()), 4) if negatives.any() else None,
        "frames": int(len(labels)),
    }
