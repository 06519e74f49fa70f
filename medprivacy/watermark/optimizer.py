"""Evolution strategy with basin-hopping mutation over the watermark parameters (alpha, x, y) (MedLocker sec. 2.1).

Each generation, for every individual X (paper eq. 4-6):

1. mutation. ``"basin-hopping"``: ``local_iterations`` hops from X, each moving x and y by a random whole
   number of pixels in [-step, step] and alpha by a random amount in [-alpha_step, alpha_step]; a hop is kept when
   it scores no worse than where it started, so the mutant M is the best point of a short local walk.
   ``"random"`` (the paper's "Random Mutation" ablation): M is drawn uniformly from the whole feasible domain,
   with no local search; this is the classic uniform-mutation operator. It is cheap (M is never scored) but
   undirected, which is why the paper finds it much weaker where the domain is large (WAP) and about as good
   where it is small (WSM-in).
2. binomial crossover: each gene comes from M with probability ``crossover_rate``, else from X.
3. greedy selection: the child replaces X if it scores no worse.

Positions are whole pixels and always feasible (mutants and children are projected onto the placement's nearest
feasible position), alpha is clipped to ``alpha_bounds``. Candidates are scored in batches through the caller's
``score(params) -> (objective, fooled)``; the search stops as soon as a scored candidate is ``fooled`` (every
target model misclassifies it), when ``max_evaluations`` is spent, or after ``generations``. The objective is
minimised; for MedLocker it is the weighted ensemble probability of the true class (or, without a label, of
each model's own clean-image prediction), eq. 3 and 8, see ``ensemble_objective``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import InputError
from .boxes import Placement

#: The paper's settings (sec. 3): population, generations, crossover rate, step (px), hops, alpha range.
DEFAULT_POPULATION = 50
DEFAULT_GENERATIONS = 3
DEFAULT_CROSSOVER_RATE = 0.9
DEFAULT_STEP = 10
DEFAULT_LOCAL_ITERATIONS = 3
DEFAULT_ALPHA_BOUNDS = (100.0, 255.0)
MUTATIONS = ("basin-hopping", "random")

Score = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]


@dataclass
class GenerationRecord:
    generation: int  # 0 = the initial population
    evaluations: int  # candidates scored so far
    best_objective: float  # best scored so far (a fooled candidate counts before any unfooled one)
    population_mean: float  # mean objective of the population; nan if the generation was cut short before it was known
    fooled: bool


@dataclass
class OptimizeResult:
    params: np.ndarray  # (alpha, x, y), float64; x and y whole pixels
    objective: float
    fooled: bool
    evaluations: int
    stop_reason: str  # "fooled", "generations" or "budget"
    history: list[GenerationRecord] = field(default_factory=list)

    @property
    def alpha(self) -> float:
        return float(self.params[0])

    @property
    def x(self) -> int:
        return int(self.params[1])

    @property
    def y(self) -> int:
        return int(self.params[2])


def ensemble_objective(probabilities, target, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 8 and the stop test from class probabilities ``(K models, M candidates, C classes)``.

    ``target`` is one class for every model (the true label), or one class per model (K values): without a label,
    each model's own prediction on the clean image, so that every model is pushed away from what it answered
    before rather than all towards a class some of them may already have been right about.
    objective = sum_k weights[k] * p_k[:, target_k] (weights default to 1/K, the paper's 0.25 for four models);
    fooled = every model's top class differs from its target.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim == 2:
        probs = probs[None]
    k = probs.shape[0] if probs.ndim == 3 else 0
    targets = (
        np.broadcast_to(np.asarray(target, dtype=np.int64).reshape(-1), (k,)) if np.size(target) in (1, k) else None
    )
    if probs.ndim != 3 or targets is None or not ((0 <= targets) & (targets < probs.shape[2])).all():
        raise ValueError(
            f"expected probabilities (models, candidates, classes) and one class index (or one per model) below "
            f"{probs.shape[-1]}, got {probs.shape} and {target}"
        )
    beta = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if beta.shape != (k,) or (beta < 0).any() or beta.sum() <= 0:
        raise ValueError(f"need {k} non-negative model weights, got {weights}")
    target_probs = np.take_along_axis(probs, targets[:, None, None], axis=2)[:, :, 0]  # (K, M)
    objective = np.einsum("k,km->m", beta, target_probs)
    fooled = (probs.argmax(axis=2) != targets[:, None]).all(axis=0)
    return objective, fooled


class _Stop(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Evaluator:
    """Scores batches through the caller, counts evaluations, keeps the best candidate and raises _Stop."""

    def __init__(self, score: Score, budget: int | None):
        self.score = score
        self.budget = budget
        self.evaluations = 0
        self.best_params: np.ndarray | None = None
        self.best_objective = np.inf
        self.best_fooled = False

    def __call__(self, params: np.ndarray) -> np.ndarray:
        take = len(params) if self.budget is None else min(len(params), self.budget - self.evaluations)
        if take <= 0:
            raise _Stop("budget")
        objective, fooled = self.score(params[:take].copy())
        objective = np.asarray(objective, dtype=np.float64).reshape(-1)
        fooled = np.asarray(fooled, dtype=bool).reshape(-1)
        if objective.shape != (take,) or fooled.shape != (take,):
            raise ValueError(
                f"score() returned {objective.shape[0]} objectives and {fooled.shape[0]} fooled flags "
                f"for {take} candidates"
            )
        if np.isnan(objective).any():
            raise ValueError("score() returned NaN objectives")
        self.evaluations += take
        self._keep_best(params[:take], objective, fooled)
        if fooled.any():
            raise _Stop("fooled")
        if take < len(params) or (self.budget is not None and self.evaluations >= self.budget):
            raise _Stop("budget")
        return objective

    def _keep_best(self, params, objective, fooled) -> None:
        pool = np.flatnonzero(fooled) if fooled.any() else np.arange(len(objective))
        i = pool[np.argmin(objective[pool])]
        if (fooled[i] and not self.best_fooled) or (
            fooled[i] == self.best_fooled and objective[i] < self.best_objective
        ):
            self.best_params, self.best_objective, self.best_fooled = (
                params[i].copy(),
                float(objective[i]),
                bool(fooled[i]),
            )


def optimize_watermark(
    score: Score,
    placement: Placement,
    *,
    population: int = DEFAULT_POPULATION,
    generations: int = DEFAULT_GENERATIONS,
    crossover_rate: float = DEFAULT_CROSSOVER_RATE,
    step: int = DEFAULT_STEP,
    local_iterations: int = DEFAULT_LOCAL_ITERATIONS,
    alpha_bounds: tuple[float, float] = DEFAULT_ALPHA_BOUNDS,
    alpha_step: float | None = None,
    mutation: str = "basin-hopping",
    max_evaluations: int | None = None,
    rng: np.random.Generator | int | None = None,
) -> OptimizeResult:
    """Search (alpha, x, y) minimising ``score``'s objective over positions allowed by ``placement``.

    ``score(params)`` gets an (M, 3) float64 array of (alpha, x, y) rows and returns (objective (M,), fooled (M,)).
    ``alpha_step`` defaults to ``step`` taken as the same fraction of the alpha range as ``step`` is of the
    position range, so one hop moves every parameter comparably. ``rng``: a Generator or a seed.
    Evaluations: ``population`` for the start, then per generation ``local_iterations * population`` hops
    (basin hopping only) plus one per child that differs from both its parent and an already scored mutant.
    """
    _check_options(
        population, generations, crossover_rate, step, local_iterations, alpha_bounds, mutation, max_evaluations
    )
    population, generations, step, local_iterations = (
        int(population),
        int(generations),
        int(step),
        int(local_iterations),
    )
    max_evaluations = None if max_evaluations is None else int(max_evaluations)
    rng = np.random.default_rng(rng)
    low, high = float(alpha_bounds[0]), float(alpha_bounds[1])
    if alpha_step is None:
        alpha_step = step * (high - low) / max(placement.max_x, placement.max_y, 1)
    evaluate = _Evaluator(score, max_evaluations)
    history: list[GenerationRecord] = []
    pop_obj = None
    generation = 0

    def record(done: bool = True) -> None:
        mean = float(np.mean(pop_obj)) if done and pop_obj is not None else float("nan")
        history.append(
            GenerationRecord(generation, evaluate.evaluations, evaluate.best_objective, mean, evaluate.best_fooled)
        )

    def repair(params: np.ndarray) -> np.ndarray:
        params[:, 0] = np.clip(params[:, 0], low, high)
        params[:, 1:] = placement.project(params[:, 1:])
        return params

    def random_individuals(count: int) -> np.ndarray:
        return np.column_stack([rng.uniform(low, high, count), placement.sample(count, rng)]).astype(np.float64)

    try:
        pop = random_individuals(population)
        pop_obj = evaluate(pop)
        record()
        for generation in range(1, generations + 1):  # noqa: B007 -- record() reads it through the closure
            if mutation == "basin-hopping":
                mutant, mutant_obj = pop.copy(), pop_obj.copy()
                for _ in range(local_iterations):
                    hop = mutant.copy()
                    hop[:, 0] += rng.uniform(-alpha_step, alpha_step, population)
                    hop[:, 1:] += rng.integers(-step, step + 1, size=(population, 2))
                    hop = repair(hop)
                    hop_obj = evaluate(hop)
                    keep = hop_obj <= mutant_obj
                    mutant[keep], mutant_obj[keep] = hop[keep], hop_obj[keep]
            else:
                mutant, mutant_obj = random_individuals(population), np.full(population, np.nan)
            child = repair(np.where(rng.random(pop.shape) <= crossover_rate, mutant, pop))
            # A child equal to its mutant or parent already has a score: re-scoring it would only spend queries.
            child_obj = np.full(population, np.nan)
            same_parent = (child == pop).all(axis=1)
            same_mutant = (child == mutant).all(axis=1) & ~np.isnan(mutant_obj)
            child_obj[same_mutant] = mutant_obj[same_mutant]
            child_obj[same_parent] = pop_obj[same_parent]
            fresh = np.isnan(child_obj)
            if fresh.any():
                child_obj[fresh] = evaluate(child[fresh])
            better = child_obj <= pop_obj
            pop[better], pop_obj[better] = child[better], child_obj[better]
            record()
        stop_reason = "generations"
    except _Stop as stop:
        stop_reason = stop.reason
        if not history or history[-1].evaluations != evaluate.evaluations:
            record(done=False)
    return OptimizeResult(
        params=evaluate.best_params,
        objective=evaluate.best_objective,
        fooled=evaluate.best_fooled,
        evaluations=evaluate.evaluations,
        stop_reason=stop_reason,
        history=history,
    )


def _check_options(
    population, generations, crossover_rate, step, local_iterations, alpha_bounds, mutation, max_evaluations
) -> None:
    if int(population) < 1 or int(generations) < 0 or int(local_iterations) < 0 or int(step) < 1:
        raise InputError(
            f"population ({population}) and step ({step}) must be at least 1, generations ({generations}) and "
            f"local iterations ({local_iterations}) at least 0"
        )
    if not (0.0 <= float(crossover_rate) <= 1.0):
        raise InputError(f"crossover rate {crossover_rate} must lie in [0, 1]")
    low, high = alpha_bounds
    if not (0.0 <= float(low) <= float(high) <= 255.0):
        raise InputError(
            f"alpha bounds {tuple(alpha_bounds)} must satisfy 0 <= low <= high <= 255 (the paper uses 100-255)"
        )
    if mutation not in MUTATIONS:
        raise InputError(f"unknown mutation {mutation!r}; use one of {', '.join(MUTATIONS)}")
    if max_evaluations is not None and int(max_evaluations) < 1:
        raise InputError(f"max evaluations {max_evaluations} must be at least 1")
