"""What ``medprivacy watermark eval`` runs: its settings, the search configurations (Table 1-3 rows) and the
per-image state the runner fills in and the report reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import InputError

ATTACK_SETS = ("all-correct", "all")
#: Never "train": the classifiers were fitted to those images, so rates there say nothing about new data.
EVAL_SPLITS = ("test", "validation")
LESION_SOURCES = ("auto", "server", "truth")
ENSEMBLE = "ensemble"
HELD_OUT_PREFIX = "ensemble-without-"
TABLE3_PREFERRED = "wm-cls-resnet18"
MUTATION_RANDOM_EQUAL = "random-equal-evaluations"
REPORT_FORMAT = "medprivacy-watermark-eval"


# --- configuration ---------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    images: int = 20
    start: int = 0  # offset into the split
    split: str = "test"  # "validation" to choose settings (e.g. the logo) without looking at the test images
    seed: int = 0  # search seed of the first image; image i uses seed + i
    data_seed: int = 0
    size: tuple[int, int] | None = None  # default: the classifiers' input size
    attack: str = "all-correct"
    models: tuple[str, ...] | None = None  # default: every two-class classifier on the server
    held_out: bool = True
    table3: bool = True
    table3_source: str | None = None
    equal_budget_random: bool = False
    lesions: str = "auto"
    sl: float = 4.0
    population: int = 50
    generations: int = 3
    crossover_rate: float = 0.9
    step: int = 10
    local_iterations: int = 3
    alpha_range: tuple[float, float] = (100.0, 255.0)
    max_evaluations: int | None = None
    grid_images: int = 4

    def check(self) -> None:
        if self.images < 1:
            raise InputError(f"--images must be at least 1 (got {self.images})")
        if self.start < 0 or self.seed < 0 or self.data_seed < 0:
            raise InputError("--start, --seed and --data-seed must not be negative")
        if self.split not in EVAL_SPLITS:
            raise InputError(f"--split must be one of {', '.join(EVAL_SPLITS)}")
        if self.attack not in ATTACK_SETS:
            raise InputError(f"--attack must be one of {', '.join(ATTACK_SETS)}")
        if self.lesions not in LESION_SOURCES:
            raise InputError(f"--lesions must be one of {', '.join(LESION_SOURCES)}")
        if self.population < 1 or self.generations < 0 or self.local_iterations < 0 or self.step < 1:
            raise InputError(
                "--population and --step must be at least 1, --generations and --local-iterations at least 0"
            )
        if not 0.0 <= self.crossover_rate <= 1.0:
            raise InputError(f"--crossover-rate {self.crossover_rate} must lie in [0, 1]")
        low, high = self.alpha_range
        if not 0.0 <= low <= high <= 255.0:
            raise InputError(f"alpha range {low:g}-{high:g} must satisfy 0 <= min <= max <= 255")
        if not self.sl > 0:
            raise InputError(f"--sl must be positive (got {self.sl:g})")
        if self.grid_images < 0:
            raise InputError("--grid-images must not be negative")

    def search(self) -> dict[str, Any]:
        return {
            "sl": self.sl,
            "population": self.population,
            "generations": self.generations,
            "crossover_rate": self.crossover_rate,
            "step": self.step,
            "local_iterations": self.local_iterations,
            "alpha_range": [float(v) for v in self.alpha_range],
            "max_evaluations": self.max_evaluations,
        }


@dataclass(frozen=True)
class Run:
    """One search configuration applied to every attacked image it suits."""

    key: str
    source: str  # the row name: a classifier, "ensemble" or "ensemble-without-<name>"
    models: tuple[str, ...]
    mode: str = "wap"
    mutation: str = "basin-hopping"
    lesion_only: bool = False  # keep-in / keep-out: lesion images with lesion boxes only


def plan_runs(classifiers: Sequence[str], config: EvalConfig, table3_source: str | None) -> list[Run]:
    runs = [Run(f"wap/basin-hopping/{name}", name, (name,)) for name in classifiers]
    if len(classifiers) > 1:
        runs.append(Run(f"wap/basin-hopping/{ENSEMBLE}", ENSEMBLE, tuple(classifiers)))
    if config.held_out and len(classifiers) > 2:
        for name in classifiers:
            others = tuple(m for m in classifiers if m != name)
            runs.append(Run(f"wap/basin-hopping/{HELD_OUT_PREFIX}{name}", HELD_OUT_PREFIX + name, others))
    if table3_source is not None:
        mutations = ["basin-hopping", "random"] + ([MUTATION_RANDOM_EQUAL] if config.equal_budget_random else [])
        for mode in ("wap", "keep-in", "keep-out"):
            for mutation in mutations:
                if mode == "wap" and mutation == "basin-hopping":
                    continue  # the Table 1 run of the same source, same seed
                runs.append(
                    Run(
                        f"{mode}/{mutation}/{table3_source}",
                        table3_source,
                        (table3_source,),
                        mode,
                        mutation,
                        mode != "wap",
                    )
                )
    return runs


# --- one image through the evaluation ------------------------------------------------------------------------


@dataclass(eq=False)  # compared by identity: the fields hold arrays
class EvalImage:
    index: int
    seed: int
    label: int
    source: str
    pixels: np.ndarray  # (H, W, 3) uint8
    truth_mask: np.ndarray
    mask: np.ndarray | None = None  # lesion mask used for keep-in/keep-out
    boxes: list = field(default_factory=list)
    feasible: set = field(default_factory=set)  # lesion-constrained modes with room for the logo
    clean: dict[str, np.ndarray] = field(default_factory=dict)  # model -> probabilities (C,)
    runs: dict[str, dict] = field(default_factory=dict)  # run key -> record
    watermarked: dict[str, np.ndarray] = field(default_factory=dict)
