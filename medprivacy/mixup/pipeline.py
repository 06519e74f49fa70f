"""Private segmentation of one scan: prepare → mix → send (shuffled) → unmix → average over TTA → stitch → back.

Each TTA copy cuts the scan on its own shifted patch grid, so no voxel sits at a patch border in every copy; the
copies' answers are averaged per voxel, weighted towards patch centres. Memory stays bounded whatever k is: the
shuffled rows are mixed, sent and unmixed one request at a time into one running average per class.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..cancellation import cancel_check
from ..errors import CancelledError, InputError, VersionMismatchError
from ..labels import NUM_CLASSES
from .mixing import (
    DEFAULT_LAMBDA_RANGE,
    MixPlan,
    copy_weights,
    mix,
    naive_unmix,
    one_hot,
    orient,
    orient_rows,
    plan_mixing,
    unorient,
)
from .patches import PatchGrid, ScoreAccumulator
from .privacy import PrivacySettings, privacy_settings
from .warp import SecretWarp, secret_warp

Progress = Callable[[str, float], None]

#: Background one-hot, used wherever no patch was segmented (outside the brain's bounding box).
_BACKGROUND = np.eye(NUM_CLASSES, dtype=np.float32)[0]
#: Patches per learned-unmixing forward pass: at 48³, unmixing a whole 64-patch request at once raised the client's
#: peak memory on a 256³ scan from 1.9 to 3.5 GB (bench/mixup_bench.py, k=1).
_UNMIX_ROWS = 8


@dataclass
class PreparedScan:
    """A scan on the model grid, normalised and cut into patches, plus what is needed to go back."""

    image: object  # the user's SimpleITK image (defines the output grid)
    transform: object  # model grid → scan affine, or None when the scan is already on the model grid
    volume: np.ndarray  # (Z, Y, X) normalised model-grid volume
    grid: PatchGrid  # the unshifted grid (TTA copy 0, and the plain baseline)
    patches: np.ndarray  # (N, D, H, W) patches of ``grid``

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return self.grid.patch_size


@dataclass
class PrivateSegmentation:
    labelmap: object  # SimpleITK uint8 image on the input's exact grid: 0 bg, 1 CSF, 2 GM, 3 WM
    uploaded: object | None  # SimpleITK float image of the first TTA copy's mixed patches on the model grid
    stats: dict = field(default_factory=dict)
    session: UploadSession | None = None  # the run's secrets (client memory only): what was sent and how


def prepare_scan(image, patch_size: tuple[int, int, int]) -> PreparedScan:
    import SimpleITK as sitk

    from .geometry import to_model_grid
    from .intensity import normalize_intensity
    from .model_space import analysis_mask, patch_grid

    resampled, transform = to_model_grid(image)
    try:
        volume = normalize_intensity(sitk.GetArrayFromImage(resampled), analysis_mask())
    except ValueError as exc:
        raise InputError(f"after alignment to the brain template, {exc}; check that the scan is a brain T1") from None
    grid = patch_grid(tuple(patch_size))
    return PreparedScan(image, transform, volume, grid, grid.extract(volume))


def background_outside_analysis(scores: np.ndarray) -> np.ndarray:
    """A copy of (C, Z, Y, X) model-grid scores with background outside the analysis region, where no answer is
    trusted (what ``finish_labelmap`` labels, and what the decision weights are fitted on)."""
    from .model_space import analysis_mask

    scores = np.array(scores, dtype=np.float32, copy=True)
    scores[:, ~analysis_mask()] = _BACKGROUND[:, None]
    return scores


def finish_labelmap(prepared: PreparedScan, scores: np.ndarray, decision_weights=None):
    """(C, Z, Y, X) class scores on the model grid → labelmap on the user's grid.

    ``decision_weights`` (one per class, from the model's manifest) scale the scores before the argmax; they were
    fitted on validation scans so that thin classes such as CSF are not lost to averaging (see calibrate.py).
    """
    import SimpleITK as sitk

    from .geometry import probabilities_to_input_grid

    scores = background_outside_analysis(scores)
    if decision_weights is not None:
        scores *= np.asarray(decision_weights, dtype=np.float32).reshape(-1, 1, 1, 1)
    labels = probabilities_to_input_grid(scores, prepared.transform, prepared.image)
    labelmap = sitk.GetImageFromArray(labels.astype(np.uint8))
    labelmap.CopyInformation(prepared.image)
    return labelmap


class Unmixer:
    """Turns mixed probabilities back into target class scores, naively (eq. 4) or with the learned network."""

    def __init__(self, mode: str, server_info: dict, patch_size, models_dir=None):
        if mode not in ("naive", "learned"):
            raise InputError(f"unknown unmixing mode {mode!r}; use naive or learned")
        self.mode = mode
        self.net = None
        self.decision_weights = None
        self.lambda_range = tuple(server_info["models"]["mixup-seg"].get("lambda_range", DEFAULT_LAMBDA_RANGE))
        if mode == "learned":
            from ..nets import load_model

            self.net, spec = load_model("mixup-unmix", models_dir)
            expected = spec.extra.get("paired_with", {}).get("mixup-seg")
            actual = server_info["models"]["mixup-seg"].get("sha256")
            if expected and actual != expected:
                raise VersionMismatchError(
                    f"the server's mixup-seg model ({str(actual)[:12]}…) is not the one this client's unmixing "
                    f"network was trained with ({expected[:12]}…); update the extension or the server, or use "
                    "--unmix naive"
                )
            if tuple(spec.patch_size) != tuple(patch_size):
                raise VersionMismatchError(
                    f"unmixing network patch size {spec.patch_size} differs from the server's {list(patch_size)}; "
                    "update the extension"
                )
            self.lambda_range = tuple(spec.extra.get("lambda_range", self.lambda_range))
            self.decision_weights = spec.extra.get("decision_weights")

    def __call__(self, mixed_probs: np.ndarray, reference_onehot: np.ndarray, lam: np.ndarray) -> np.ndarray:
        if self.net is None:
            return naive_unmix(mixed_probs, reference_onehot, lam)
        import torch

        out = np.empty(mixed_probs.shape, dtype=np.float32)
        with torch.inference_mode():
            for begin in range(0, len(mixed_probs), _UNMIX_ROWS):
                part = slice(begin, begin + _UNMIX_ROWS)
                logits = self.net(
                    torch.from_numpy(mixed_probs[part]),
                    torch.from_numpy(reference_onehot[part]),
                    torch.from_numpy(lam[part]),
                )
                out[part] = torch.softmax(logits, dim=1).numpy()
        return out


def check_server_model(client, patch_size) -> dict:
    """The server's info, once it is known to serve a 'mixup-seg' model for the key's patch size."""
    info = client.info()
    model = info.get("models", {}).get("mixup-seg")
    if model is None:
        raise VersionMismatchError(
            "the server holds no 'mixup-seg' model; ask its operator to install the MedPrivacy models"
        )
    if tuple(model["patch_size"]) != tuple(patch_size):
        raise VersionMismatchError(
            f"the server's model uses {tuple(model['patch_size'])} patches but your key has {tuple(patch_size)}; "
            "generate a new key"
        )
    return info


@dataclass
class UploadSession:
    """Everything secret about one private run, kept on the client: the scan as it is cut (deformed when the level
    asks for it), the analysis region in that frame, each TTA copy's patch grid, and how every row is mixed."""

    settings: PrivacySettings
    volume: np.ndarray  # (Z, Y, X) the scan in the frame patches are cut from
    mask: np.ndarray  # analysis region in that frame
    grids: list  # one PatchGrid per TTA copy
    plan: MixPlan
    warp: SecretWarp | None

    def __len__(self) -> int:
        return len(self.plan)

    def copy_rows(self, copy: int) -> np.ndarray:
        return np.nonzero(self.plan.copy == copy)[0]


def plan_session(
    prepared: PreparedScan, bank, settings: PrivacySettings, rng: np.random.Generator, lambda_range=DEFAULT_LAMBDA_RANGE
) -> UploadSession:
    """Draw every secret of one private run: the deformation, the copies' grid offsets, and each row's reference,
    orientations, fill and λ (privacy.py says what each one is for)."""
    from ..data.template import load_template
    from .model_space import analysis_mask, copy_grid, secret_copy_grids

    mask = analysis_mask()
    volume = prepared.volume
    warp = None
    if settings.scan_warp > 0:
        reference = load_template().image
        warp = secret_warp(reference, settings.scan_warp, rng, mask)
        volume = warp.warp_volume(volume, reference)
        mask = warp.warp_volume(mask.astype(np.float32), reference) > 0.5
    patch = prepared.patch_size
    if settings.secret_offsets:
        grids = secret_copy_grids(mask, patch, settings.tta, rng)
    else:
        grids = [copy_grid(patch, c) for c in range(settings.tta)]
    real_rows = sum(len(g) for g in grids)
    plan = plan_mixing(
        [len(g) for g in grids],
        len(bank),
        rng,
        lambda_range,
        settings.target_orientations,
        settings.reference_orientations,
        decoys=int(round(settings.decoy_fraction * real_rows)),
    )
    return UploadSession(settings, volume, mask, grids, plan, warp)


def make_uploads(session: UploadSession, bank, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For ``rows`` of the plan: (mixed (n, D, H, W), reference one-hot (n, C, D, H, W), scan part (n, D, H, W), scan
    voxels (n, D, H, W) bool): exactly what is sent, what the client needs to unmix the answers, what must never be
    sent, and which voxels of each upload hold the scan (the rest is fill, whose answer says nothing about the scan).

    With ``fill_background``, every voxel where the scan has no signal (0: outside the analysis region, past the
    volume's edge, or background inside it) takes private reference texture instead, so no upload shows an outline.
    """
    plan = session.plan
    fill_images = orient_rows(bank.images[plan.fill_index[rows]], plan.fill_orientation[rows]).astype(np.float32)
    size = tuple(bank.patch_size)
    targets = np.empty((len(fill_images),) + size, dtype=np.float32)
    scan_voxels = np.ones((len(fill_images),) + size, dtype=bool)
    for n, row in enumerate(np.arange(len(plan))[rows]):
        if plan.copy[row] < 0:  # decoy: a second reference patch stands in for the scan
            targets[n] = fill_images[n]
            scan_voxels[n] = False
            continue
        patch = session.grids[plan.copy[row]].extract_one(session.volume, plan.location[row])
        code = plan.target_orientation[row]
        if session.settings.fill_background:
            has_signal = patch != 0
            patch = np.where(has_signal, patch, fill_images[n])
            scan_voxels[n] = orient(has_signal, code)
        targets[n] = orient(patch, code)
    references = orient_rows(bank.images[plan.reference_index[rows]], plan.reference_orientation[rows]).astype(
        np.float32
    )
    reference_labels = orient_rows(bank.labels[plan.reference_index[rows]], plan.reference_orientation[rows])
    return mix(targets, references, plan.lam[rows]), one_hot(reference_labels, NUM_CLASSES), targets, scan_voxels


@dataclass
class PrivateScores:
    """What one private run produced, per unmixer: class scores (C, Z, Y, X) on the model grid."""

    averaged: dict  # over all k copies (the result)
    first_copy: dict  # copy 0 alone (the no-TTA result), when asked for
    first_copy_mixed: np.ndarray | None  # (N, D, H, W) what was uploaded for copy 0, when asked for (as sent)
    stats: dict
    session: UploadSession | None = None


def private_scores(
    prepared: PreparedScan,
    client,
    bank,
    unmixers: dict,
    settings: PrivacySettings,
    rng: np.random.Generator,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    keep_first_copy: bool = False,
    score_first_copy: bool = False,
) -> PrivateScores:
    """Send every row of a freshly drawn upload session (``plan_session``) in its shuffled order, unmix each answer,
    turn it back and average it into the volume (weighted by λ⁶, see ``copy_weights``), for every unmixer."""
    lambda_range = next(iter(unmixers.values())).lambda_range
    session = plan_session(prepared, bank, settings, rng, lambda_range)
    plan, grids = session.plan, session.grids
    shape, patch = session.volume.shape, prepared.patch_size
    averaged = {name: ScoreAccumulator(NUM_CLASSES, shape, patch) for name in unmixers}
    first = {name: ScoreAccumulator(NUM_CLASSES, shape, patch) for name in unmixers} if score_first_copy else {}
    first_mixed = np.zeros((len(grids[0]),) + patch, dtype=np.float32) if keep_first_copy else None
    step = max(1, int(getattr(client, "request_patches", 64)))
    sent_before, received_before = client.bytes_sent, client.bytes_received
    started = time.perf_counter()
    is_cancelled = cancel_check(cancel)
    for begin in range(0, len(plan), step):
        if is_cancelled():
            raise CancelledError("segmentation cancelled; nothing was written")
        rows = slice(begin, begin + step)
        location, copy, lam, turn = plan.location[rows], plan.copy[rows], plan.lam[rows], plan.target_orientation[rows]
        mixed, reference_onehot, _, scan_voxels = make_uploads(session, bank, rows)
        answer = client.segment(mixed[:, None], endpoint="mixup", cancel=cancel)
        weights = copy_weights(lam)
        for name, unmix in unmixers.items():
            estimate = unmix(answer, reference_onehot, lam)
            for row, (c, i) in enumerate(zip(copy, location)):
                if c < 0:
                    continue  # a decoy's answer says nothing about the scan
                scores, voxels = unorient(estimate[row], turn[row]), unorient(scan_voxels[row], turn[row])
                averaged[name].add(grids[c], i, scores, weights[row], voxels)
                if c == 0 and name in first:
                    first[name].add(grids[0], i, scores, voxel_mask=voxels)
        if first_mixed is not None:
            is_first = copy == 0
            first_mixed[location[is_first]] = mixed[is_first]
        if progress is not None:
            progress("segmenting mixed patches on the server", min(1.0, (begin + step) / len(plan)))
    stats = {
        "patches_sent": len(plan),
        "decoys_sent": int(plan.is_decoy.sum()),
        "bytes_sent": client.bytes_sent - sent_before,
        "bytes_received": client.bytes_received - received_before,
        "server_seconds": time.perf_counter() - started,
        "privacy": settings.to_json(),
    }

    def result(accumulator):
        scores = accumulator.result(_BACKGROUND)
        if session.warp is None:
            return scores
        from ..data.template import load_template

        return session.warp.unwarp_scores(scores, load_template().image, _BACKGROUND)

    return PrivateScores(
        averaged={name: result(acc) for name, acc in averaged.items()},
        first_copy={name: result(acc) for name, acc in first.items()},
        first_copy_mixed=first_mixed,
        stats=stats,
        session=session,
    )


def segment_private(
    image,
    client,
    bank,
    *,
    privacy: str | PrivacySettings | None = None,
    tta: int | None = None,
    unmix: str = "learned",
    seed: int | None = None,
    keep_uploaded: bool = False,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> PrivateSegmentation:
    """Segment ``image`` (SimpleITK, any grid) on a remote server that only ever receives mixed patches.

    ``privacy``: a level name of privacy.LEVELS (default: the default level) or settings; ``tta`` overrides its
    number of copies. ``seed`` fixes every secret draw (tests only); by default they come from OS entropy.
    """
    import SimpleITK as sitk

    settings = privacy if isinstance(privacy, PrivacySettings) else privacy_settings(privacy, tta)
    if isinstance(privacy, PrivacySettings) and tta is not None:
        settings = settings.with_changes(tta=tta, level=settings.level)
    if settings.tta < 1:
        raise InputError("--tta must be at least 1")
    started = time.perf_counter()
    report = progress or (lambda stage, fraction: None)
    info = check_server_model(client, bank.patch_size)
    unmixer = Unmixer(unmix, info, bank.patch_size)
    report("aligning the scan to the brain template", 0.0)
    prepared = prepare_scan(image, bank.patch_size)
    scores = private_scores(
        prepared,
        client,
        bank,
        {unmix: unmixer},
        settings,
        np.random.default_rng(seed),
        progress,
        cancel,
        keep_first_copy=keep_uploaded,
    )
    report("resampling the result onto the scan", 1.0)
    labelmap = finish_labelmap(prepared, scores.averaged[unmix], unmixer.decision_weights)
    uploaded = None
    if scores.first_copy_mixed is not None:
        # As sent: each patch of copy 0 where it was cut, in the orientation it travelled in.
        volume = scores.session.grids[0].stitch(scores.first_copy_mixed[:, None], background=np.zeros(1, np.float32))[0]
        uploaded = sitk.GetImageFromArray(volume)
        from ..data.template import load_template

        uploaded.CopyInformation(load_template().image)
    stats = dict(scores.stats)
    stats.update(
        seconds=time.perf_counter() - started, tta=settings.tta, unmix=unmix, patches=len(scores.session.grids[0])
    )
    return PrivateSegmentation(labelmap=labelmap, uploaded=uploaded, stats=stats, session=scores.session)


def plain_scores(
    prepared: PreparedScan, client, progress: Progress | None = None, cancel=None
) -> tuple[np.ndarray, dict]:
    """Class scores (C, Z, Y, X) from the server's baseline endpoint, which receives the unmixed patches."""
    sent_before, received_before = client.bytes_sent, client.bytes_received
    probs = client.segment(
        prepared.patches[:, None],
        endpoint="baseline",
        progress=(lambda d, t: progress("baseline", d / t)) if progress else None,
        cancel=cancel,
    )
    stats = {"bytes_sent": client.bytes_sent - sent_before, "bytes_received": client.bytes_received - received_before}
    return prepared.grid.stitch(probs, background=_BACKGROUND), stats


def segment_plain(
    image, client, patch_size, progress: Progress | None = None, cancel=None, prepared: PreparedScan | None = None
) -> tuple[object, dict]:
    """Evaluation baseline: unmixed patches to the server's baseline endpoint (never used for private work)."""
    started = time.perf_counter()
    prepared = prepared or prepare_scan(image, patch_size)
    scores, stats = plain_scores(prepared, client, progress, cancel)
    decision_weights = client.info().get("models", {}).get("plain-seg", {}).get("decision_weights")
    stats["seconds"] = time.perf_counter() - started
    return finish_labelmap(prepared, scores, decision_weights), stats
