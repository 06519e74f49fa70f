"""What a curious server holds: the uploads of one private run, exactly as the wire carries them.

``capture`` runs the client's own upload code (pipeline.plan_session and make_uploads, the functions segment_private
sends with) and keeps, next to the uploads, the client's truth about each row, so that the audit can score the
attacks. ``load_audit_dir`` reads what a real server wrote with ``--audit-dir``; there no truth exists, and only the
image measures are reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import InputError


@dataclass
class UploadTruth:
    """Per uploaded row (in send order): TTA copy (-1: decoy), where the patch was cut (start in the frame it was
    cut from), how it was turned, and λ."""

    copy: np.ndarray
    start: np.ndarray  # (N, 3) int
    orientation: np.ndarray
    lam: np.ndarray
    lattice: tuple  # the starts a server could know in advance: the public grids' starts, or () when secret


@dataclass
class CapturedUploads:
    uploads: np.ndarray  # (N, D, H, W) float32, the wire's uint8 codes / 255
    truth: UploadTruth | None
    session: object | None  # pipeline.UploadSession (client secrets), None for an audit folder

    def __len__(self) -> int:
        return len(self.uploads)

    def sample(self, count: int | None, rng: np.random.Generator) -> CapturedUploads:
        """A random ``count`` of the real uploads (decoys dropped: the attacker cannot tell them apart, so sampling
        only real ones favours it), with their truth; all of them when ``count`` is None or not smaller.

        Placement is scored upload by upload, so a sample estimates the placed share without the cost of searching
        every upload over 48 orientations (about a second each on a CPU)."""
        real = np.arange(len(self)) if self.truth is None else np.nonzero(self.truth.copy >= 0)[0]
        if count is None or count >= len(real):
            return self
        rows = np.sort(rng.choice(real, int(count), replace=False))
        truth = None
        if self.truth is not None:
            t = self.truth
            truth = UploadTruth(t.copy[rows], t.start[rows], t.orientation[rows], t.lam[rows], t.lattice)
        return CapturedUploads(self.uploads[rows], truth, self.session)


def as_received(mixed: np.ndarray) -> np.ndarray:
    """What the server decodes from the uint8 wire encoding of ``mixed`` (its codes k/255, ``quantization``)."""
    from ...quantization import to_codes, to_float32

    return to_float32(to_codes(mixed))


def capture(prepared, bank, settings, rng: np.random.Generator, lambda_range=None) -> CapturedUploads:
    """The uploads one private run of ``prepared`` at ``settings`` sends (no server needed), with the truth."""
    from ..mixing import DEFAULT_LAMBDA_RANGE
    from ..pipeline import plan_session

    return of_session(plan_session(prepared, bank, settings, rng, lambda_range or DEFAULT_LAMBDA_RANGE), bank)


def of_session(session, bank, batch: int = 64) -> CapturedUploads:
    """The uploads of a drawn session (pipeline.plan_session), regenerated exactly as they were sent, with the truth."""
    plan, settings = session.plan, session.settings
    from ..pipeline import make_uploads

    uploads = np.empty((len(plan),) + tuple(bank.patch_size), dtype=np.float32)
    for begin in range(0, len(plan), batch):
        rows = slice(begin, begin + batch)
        uploads[rows] = as_received(make_uploads(session, bank, rows)[0])
    starts = np.array(
        [session.grids[c].starts[i] if c >= 0 else (0, 0, 0) for c, i in zip(plan.copy, plan.location)], dtype=np.int64
    ).reshape(-1, 3)
    lattice = () if settings.secret_offsets else tuple(sorted({s for g in session.grids for s in g.starts}))
    truth = UploadTruth(
        copy=plan.copy.copy(),
        start=starts,
        orientation=plan.target_orientation.copy(),
        lam=plan.lam.copy(),
        lattice=lattice,
    )
    return CapturedUploads(uploads, truth, session)


def load_audit_dir(folder: str | Path) -> CapturedUploads:
    """The mixed patches a server saved with ``--audit-dir`` (``*-mixup.npy``, in arrival order)."""
    from ...quantization import to_float32

    files = sorted(Path(folder).glob("*-mixup.npy"))
    if not files:
        raise InputError(
            f"{folder} holds no '*-mixup.npy' files; point --uploads at the folder a server wrote with --audit-dir"
        )
    arrays = []
    for path in files:
        try:
            arrays.append(to_float32(np.load(path, allow_pickle=False)))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} is not a readable audit copy ({exc})") from None
    uploads = np.concatenate(arrays)
    if uploads.ndim == 5:
        uploads = uploads[:, 0]
    if uploads.ndim != 4 or len(set(uploads.shape[1:])) != 1:
        raise InputError(
            f"the audit copies in {folder} hold arrays of shape {uploads.shape}; expected cubic 3D patches"
        )
    return CapturedUploads(uploads.astype(np.float32), None, None)
