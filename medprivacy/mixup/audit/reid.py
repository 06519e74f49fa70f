"""Re-identification: can a server tell which uploads come from the same person?

As in the paper (Table 2): subjects scanned twice, each scan's uploads turned into the server's best rebuild, and
each rebuild's nearest other rebuild (by correlation, or by 3D MS-SSIM) retrieved; mAP over all queries, where each
query has exactly one right answer (the other visit). Scan-to-scan variation is what a second visit brings: another
head position in another scanner grid (so another registration), another bias field, contrast, noise and gain, with
the same anatomy. The same retrieval on the plain aligned scans is "no protection"; random ranking is "chance".
"""

from __future__ import annotations

import numpy as np

from ...data.synth import REID_SEED_BASE
from ...files import write_atomically

#: A second visit draws its scanner effects and head position from seed + this offset.
SECOND_VISIT_OFFSET = 1_000_000


def visit_seeds(subject: int, visit: int) -> tuple[int, int | None, int]:
    """(anatomy seed, scan seed or None for the subject's own, scanner-space seed) of one visit."""
    seed = REID_SEED_BASE + subject
    if visit == 0:
        return seed, None, seed
    return seed, seed + SECOND_VISIT_OFFSET, seed + SECOND_VISIT_OFFSET


def visit_scan(subject: int, visit: int, patch_size):
    """The visit as the client prepares it: scanner grid → registration → normalised model-grid volume (cached:
    public synthetic data, and registration dominates the time)."""
    from ...data.synth import synthesize_subject, to_scanner_space
    from ..pipeline import PreparedScan, prepare_scan
    from ..train_data import cache_dir

    seed, scan_seed, scanner_seed = visit_seeds(subject, visit)
    path = cache_dir() / "reid" / f"visit-{seed}-{visit}.npz"
    if path.is_file():
        from ..model_space import patch_grid

        with np.load(path, allow_pickle=False) as data:
            volume = data["volume"].astype(np.float32)
        return PreparedScan(None, None, volume, patch_grid(tuple(patch_size)), None)
    image, _ = to_scanner_space(synthesize_subject(seed, scan_seed=scan_seed), scanner_seed)
    prepared = prepare_scan(image, tuple(patch_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    # A cache: no fsync, a copy lost to a power cut is made again.
    write_atomically(path, lambda tmp: np.savez_compressed(tmp, volume=prepared.volume.astype(np.float16)), sync=False)
    return prepared


def mean_average_precision(similarity: np.ndarray, identity: np.ndarray) -> float:
    """mAP of retrieving, for every query, the other scans of the same identity ranked by ``similarity``."""
    precisions = []
    for query in range(len(identity)):
        others = np.array([i for i in range(len(identity)) if i != query])
        order = others[np.argsort(-similarity[query, others], kind="stable")]
        relevant = identity[order] == identity[query]
        if not relevant.any():
            continue
        hits = np.cumsum(relevant)
        precisions.append(float(np.mean(hits[relevant] / (np.nonzero(relevant)[0] + 1))))
    return float(np.mean(precisions))


def chance_map(scans: int) -> float:
    """Expected mAP of a random ranking when each query has one right answer among ``scans − 1``."""
    return float(np.mean(1.0 / np.arange(1, scans)))


def _similarities(volumes: list[np.ndarray]) -> dict[str, np.ndarray]:
    from ..model_space import analysis_mask
    from ..patches import brain_bounding_box
    from .rebuild import ms_ssim_3d, pearson

    mask = analysis_mask()
    box = brain_bounding_box(mask, margin=0)
    n = len(volumes)
    correlation = np.eye(n)
    ms_ssim = np.eye(n)
    for a in range(n):
        for b in range(a + 1, n):
            correlation[a, b] = correlation[b, a] = pearson(volumes[a], volumes[b], mask)
            ms_ssim[a, b] = ms_ssim[b, a] = ms_ssim_3d(volumes[a], volumes[b], box)
    return {"correlation": correlation, "ms_ssim": ms_ssim}


def reidentification(
    settings,
    bank,
    attacker,
    subjects: int,
    variant: str,
    rng: np.random.Generator,
    progress=None,
    sample: int | None = None,
) -> dict:
    """mAP of re-identification among ``subjects`` × 2 visits for: the attack ``variant``'s rebuilds, the oracle
    rebuilds (true places: the bound), and the plain scans (no protection)."""
    from .attack import attack_uploads, oracle_rebuild
    from .capture import capture
    from .rebuild import with_template

    say = progress or (lambda message, fraction=None: None)
    patch = bank.patch_size
    rebuilt, oracle, plain, identity = [], [], [], []
    for subject in range(subjects):
        for visit in (0, 1):
            say(
                f"re-identification: subject {subject + 1}/{subjects}, visit {visit + 1}",
                (2 * subject + visit) / (2 * subjects),
            )
            prepared = visit_scan(subject, visit, patch)
            captured = capture(prepared, bank, settings, rng)
            attacker.lattice = captured.truth.lattice
            (result,) = attack_uploads(
                captured.sample(sample, rng), attacker, prepared.volume.shape, variants=(variant,)
            )
            rebuilt.append(with_template(result.volume, result.coverage))
            bound = oracle_rebuild(captured, prepared.volume.shape)
            oracle.append(with_template(bound.volume, bound.coverage))
            plain.append(prepared.volume)
            identity.append(subject)
    identity = np.array(identity)
    out = {
        "subjects": subjects,
        "scans": len(identity),
        "attack": variant,
        "uploads_attacked_per_scan": sample,
        "chance": round(chance_map(len(identity)), 4),
    }
    for name, volumes in (("attack", rebuilt), ("oracle_bound", oracle), ("no_protection", plain)):
        similarity = _similarities(volumes)
        out[name] = {
            measure: round(mean_average_precision(matrix, identity), 4) for measure, matrix in similarity.items()
        }
    out["attack_map"] = max(out["attack"].values())
    return out
