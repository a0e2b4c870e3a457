"""TiKMiX-D and TiKMiX-M: stage-wise mixtures chosen from group influence (controllers.md §3).

Source: Wang et al. (ByteDance), arXiv 2508.17677v1; no public code. The run is cut into ``stages``
stages (or stages of ``stage_tokens`` training tokens); the first trains on the prior (uniform or
natural). At each
stage boundary the controller asks for one measurement: ``sequences_per_domain`` probe sequences of
every domain's training data and one gradient per validation task (``tasks``). The trainer returns
``align[j, i] = <ḡ_j, H⁻¹∇ℓ_{v_i}>`` (ḡ_j the gradient of domain j's token-mean loss, H = I or Adam's
diagonal with ``precondition``), which is already the *benefit* orientation of §3.6 (positive =
training on domain j lowers task i's loss), so the influence matrix is S = alignᵀ (tasks × domains).

TiKMiX-D (paper Eqs. 9-11) minimises over the simplex

    α·std(P̂) − β·Σ_i P̂_i − γ·H(w),   P = S·w,  P̂_i = P_i / (max_j |S_ij| + 1e-8),  H(w) = −Σ w log w

with SLSQP from the uniform mixture (the std smoothed, below), subject to the Pareto constraint
S·w ≥ S·w_prior (w_prior = the previous stage's mixture). TiKMiX-M (paper Algorithm 1) labels N
mixtures drawn by Latin hypercube sampling in a per-domain box with their measured influence
y = Σ_i P̂_i, fits a LightGBM surrogate y ≈ f(w), and searches it with annealed Dirichlet sampling
started at the TiKMiX-D solution (box and search: below).

Project choices (controllers.md §3.6; every one is a knob or a constant below):

- Curvature H = I; ``precondition`` swaps in H ≈ diag(√v̂ + ε) from Adam's second moments.
- Normaliser max_j |S_ij| + 1e-8: the absolute value (a deviation from the paper's max_j S_ij) keeps
  the sign of a task where every domain is harmful. std is the population std (ddof = 0).
- Kink of the std (pitfall §3.7). std(P̂) is not differentiable where all P̂_i are equal, and the
  optimum often lies there (the std term pulls the tasks level); SLSQP, which assumes a smooth
  objective, stalls short of it (against an exact conic solve: off by more than 1e-6 in 10-16% of
  random 8-domain, 2-task problems, by up to 3e-3). SLSQP therefore minimises √(var(P̂) + δ²)
  for δ = 1e-2, 1e-4, 1e-6, 1e-8 (``SMOOTHING``), each solve started from the previous answer,
  then restarts at the last δ while that still lowers the objective (``SLSQP_RESTARTS``: SLSQP's
  stopping test can fire early where small weights make the entropy's curvature large). The
  smoothed std exceeds the std by at most δ, so the answer is within α·1e-8 of the optimum when the
  solves converge; ``info["objective"]`` and the metrics report the exact, unsmoothed objective.
  The epigraph form (min t s.t. n·t² ≥ ‖P̂ − mean P̂‖²) was not used: its constraint's gradient
  vanishes at the kink, so where the optimum sits the KKT conditions SLSQP solves for have, in
  general, no solution. The Pareto handling below is unchanged: every solve carries the
  constraint, and the last kept solve's status is what counts as "SLSQP failed".
- "Infeasible" Pareto constraint. w = w_prior always satisfies S·w ≥ S·w_prior, so the constraint is
  never infeasible in the strict sense. What does happen (pitfall §3.7) is that it admits *only*
  w_prior: whenever every direction of change lowers some task's influence — typically when each
  domain helps its own validation split most, as with ``valid:*`` tasks — the constrained problem
  freezes the mixture. The controller treats three cases as infeasible and solves again without the
  constraint, reporting ``pareto_relaxed = 1`` (``metrics()``, ``last_message`` and a
  ``RuntimeWarning``): (1) the feasible set is {w_prior} alone (K small linear programs: no weight
  can rise by more than 1e-6), (2) SLSQP reports failure, (3) its answer violates the constraint by
  more than 1e-6 on the normalised scale (S's rows divided by their normalisers, a positive
  rescaling of the same constraint).
- Weights and cadence: ``weights`` is the current stage's mixture and the sampler draws it (TiKMiX
  is a resampling method; loss weights stay 1). ``floor`` mixes each published mixture with uniform;
  the published (floored) mixture is what the stage trained on, so it is the next w_prior and
  TiKMiX-M's w_orig. Stage boundaries are the multiples of ``stage_tokens``; after the
  training tokens reach one, the next ``request`` asks for the measurement and its ``observe``
  solves. A measurement with any non-finite value (or a domain the trainer could not probe: NaN
  rows) leaves the weights as they are and is asked for again on the next step. If one step's tokens
  cross several boundaries, the measurement is made once and the next boundary is the first
  multiple above the tokens seen.
- The stage clock counts every observed step's training tokens, finite loss or not (those tokens
  were consumed either way); nothing else changes on a non-finite step.
- ``average_weights`` (what a proxy search exports) is the last stage's mixture, the method's own
  output, not a time average over stages.
- TiKMiX-M labels: the trainer returns every probe sequence's own alignment (``per_sample``). A
  candidate w's label is measured on a mixed sample of ``mix_sequences`` sequences (per-domain
  counts by largest remainder of w), each domain's sequences drawn with replacement from its probe
  sequences; P = the mean of their alignments (the token-mean gradient of the mixed sample:
  sequences have equal length) and y = Σ_i P̂_i with the stage's normalisers. This replaces §3.6's
  "freshly drawn 1M-token mixed sample per candidate" (256 extra gradient passes per stage) by a
  resampling of the probe pool: first-order influence at fixed θ is linear in w, so the only label
  noise is the resampling one, the kind of noise the surrogate is there to smooth.
- TiKMiX-M randomness is a pure function of (``seed``, stage index): candidates and search use
  ``default_rng([seed, stage, 1])``, candidate c's label sample ``default_rng([seed, stage, 2, c+1])``
  (NumPy seed sequences ignore trailing zeros, hence no 0 tags). The stage index is 1 for the first
  update (stage 0 runs on the prior).
- Surrogate: LightGBM with RegMix's settings (learning rate 1e-2, up to 1000 rounds, early stopping
  after 3 rounds without improvement, seed 42) on labels standardised to mean 0 / std 1 (ranking
  unchanged; keeps split gains above LightGBM's numeric floors when influences are tiny). A seeded
  random 20% of the labelled mixtures is held out for early stopping; the model at the best round,
  trained on the other 80%, is the surrogate. For ~200 training rows: ``num_leaves`` 31 (LightGBM's
  default) with ``min_data_in_leaf`` 3 (the default 20 would allow at most ~10 leaves and blur the
  optimum), single-threaded and ``deterministic`` so a stage's result is reproducible.
- Box: lo·min(w_orig, w_d) ≤ w ≤ hi·max(w_orig, w_d) per domain, with ``box`` = [lo, hi], w_orig
  the previous stage's mixture and w_d the TiKMiX-D solution. The paper's box [lo, hi]·w_orig does
  not contain w_d in most stages, yet the search starts there: a surrogate fitted on labels from
  that box extrapolates (a tree ensemble repeats its outermost leaves), and the search's answer
  scored below its start on the noise-free influence in 43 of 60 random problems. This box is the
  smallest holding both [lo, hi]·w_orig and [lo, hi]·w_d, so it contains w_orig, w_d and the
  segment between them, and is the paper's box when w_d = w_orig. A box scaled around w_d alone
  would pin a domain that TiKMiX-D set to ~0 at ~0.
- Candidates: batches of N Latin-hypercube points in the box are normalised and rejected until N
  lie in it. After 100 batches (a very uneven mixture with many domains can make acceptance rare)
  the missing candidates are rejected points pulled toward (w_orig + w_d)/2 just far enough to enter
  the box (it is convex and contains that point); their number is reported as ``candidates_shrunk``.
- Search: T = 5 rounds of N = 10,000 draws ~ Dirichlet(α_t·w_best), w_best ← mean of the top-100
  predicted, α_t = geomspace(50, 1000, T): coarse to fine, the project's deliberate order (the
  paper's text runs from α_max to α_min; give ``concentration: [1000, 50]`` for that). Every draw
  outside the box is pulled toward w_best until it enters it, so the surrogate only ranks mixtures
  like those it was fitted on. Dirichlet parameters are floored at 1e-3 so a domain at weight 0 can
  be drawn again. If every label is equal the surrogate has nothing to rank and the search returns
  the TiKMiX-D solution.
- Guard: the answer replaces w_d only if it beats w_d on the noise-free influence Σ_i P̂_i(S·w),
  what the labels estimate: S's columns are the per-domain means of the probe alignments, so this
  is the label's expectation for a mixed sample drawn in proportion to w (the largest-remainder
  counts only round w, in steps of 1/``mix_sequences``, which would make nearby mixtures tie; and
  the sampler trains on w itself). Otherwise w_d is kept, reported as the metric ``kept_start`` = 1
  and in ``last_message``. A surrogate fitted on noisy labels can rank wrongly, and a top-k mean
  drifts into the box's interior while a linear influence peaks on its boundary: without the guard
  the box-confined search still ended below w_d in 19 of those 60 problems.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .base import Controller, MixtureConfigError, Request, apply_floor, check_weights, register
from .common import check_knob, is_number

NORM_EPS = 1e-8
"""ε of the per-task normaliser max_j |S_ij| + ε (the paper's 1e-8)."""
PARETO_TOL = 1e-6
"""Allowed violation of the Pareto constraint, on the normalised scale, before it counts as failed."""
COLLAPSE_TOL = 1e-6
"""The Pareto set counts as {w_prior} when no weight can rise by more than this within it."""
ENTROPY_TINY = 1e-12
"""Weights below this use log(1e-12) in the entropy gradient (the true slope is −∞ at 0)."""
SLSQP_FTOL = 1e-10
SLSQP_MAXITER = 1000
SMOOTHING = (1e-2, 1e-4, 1e-6, 1e-8)
"""δ of the smoothed std √(var(P̂) + δ²), one SLSQP solve per δ, each started from the previous
answer. The last δ bounds how far the answer's exact objective can exceed the optimum: α·δ."""
SLSQP_RESTARTS = 10
"""At most this many extra solves at the last δ, each from the previous answer, while they lower it."""
SURROGATE_PARAMS = {
    "objective": "regression",
    "learning_rate": 1e-2,
    "num_leaves": 31,
    "min_data_in_leaf": 3,
    "seed": 42,
    "deterministic": True,
    "force_col_wise": True,
    "num_threads": 1,
    "verbose": -1,
}
"""LightGBM parameters of the TiKMiX-M surrogate (``seed`` is replaced by the ``seed`` knob)."""
SURROGATE_ROUNDS = 1000
SURROGATE_EARLY_STOP = 3
SURROGATE_HOLDOUT = 0.2
"""Share of the labelled mixtures held out for early stopping."""
DIRICHLET_MIN_ALPHA = 1e-3
CANDIDATE_BATCHES = 100
PRIORS = ("uniform", "natural")


# ---------------------------------------------------------------- objective (TiKMiX-D)


def task_normalisers(S: np.ndarray) -> np.ndarray:
    """1 / (max_j |S_ij| + 1e-8) per task i (row of S): P̂_i = P_i times this."""
    S = np.asarray(S, dtype=np.float64)
    return 1.0 / (np.max(np.abs(S), axis=1) + NORM_EPS)


def normalised_performance(S: np.ndarray, w: np.ndarray) -> np.ndarray:
    """P̂ = (S·w)_i / (max_j |S_ij| + 1e-8); ``w`` is one mixture [K] or a batch [N, K] (→ [N, n])."""
    S = np.asarray(S, dtype=np.float64)
    return (np.asarray(w, dtype=np.float64) @ S.T) * task_normalisers(S)


def entropy(w: np.ndarray) -> float:
    """H(w) = −Σ w_j log w_j with 0 log 0 = 0."""
    w = np.asarray(w, dtype=np.float64)
    positive = w[w > 0]
    return float(-np.sum(positive * np.log(positive)))


def tikmix_objective(w: np.ndarray, S: np.ndarray, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0) -> float:
    """α·std(P̂) − β·Σ_i P̂_i − γ·H(w) (lower is better; population std, ddof = 0)."""
    p = normalised_performance(S, w)
    return float(alpha * np.std(p) - beta * np.sum(p) - gamma * entropy(w))


def _smoothed_objective(S_hat: np.ndarray, alpha: float, beta: float, gamma: float, delta: float):
    """α·√(var(P̂) + δ²) − β·Σ_i P̂_i − γ·H(w) and its gradient in w, for the normalised matrix Ŝ (P̂ = Ŝ·w).

    std(P̂) is a norm of the centred affine map w ↦ P̂ − mean(P̂), not differentiable where all P̂ are
    equal. Handed to SLSQP as it is, that kink stalls the solver short of the optimum when the
    optimum lies on it or the path crosses it (module docstring). √(var + δ²) is smooth for δ > 0
    and exceeds std by at most δ, so its minimiser is within α·δ of the exact optimum.
    ∂/∂w = α·Ŝᵀ(P̂ − mean P̂)/(n·√(var + δ²)) − β·Ŝᵀ1 + γ·(log w + 1). The objective stays convex
    (√(var + δ²) = ‖(P̂ − mean P̂, √n·δ)‖/√n, a norm of an affine map of w), so SLSQP's local
    answer is the global one.
    """
    n = S_hat.shape[0]
    column_sums = S_hat.sum(axis=0)

    def fun(w):
        p = S_hat @ w
        return float(alpha * math.sqrt(np.var(p) + delta * delta) - beta * p.sum() - gamma * entropy(w))

    def jac(w):
        p = S_hat @ w
        g_std = S_hat.T @ ((p - p.mean()) / (n * math.sqrt(np.var(p) + delta * delta)))
        return alpha * g_std - beta * column_sums + gamma * (np.log(np.maximum(w, ENTROPY_TINY)) + 1.0)

    return fun, jac


def _to_simplex(x: np.ndarray) -> np.ndarray | None:
    """Clip tiny negatives of a solver answer and renormalise; None if it is not usable."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, None)
    total = x.sum()
    if not np.all(np.isfinite(x)) or not total > 0:
        return None
    return x / total


def pareto_collapsed(S: np.ndarray, w_prior: np.ndarray, tol: float = COLLAPSE_TOL) -> bool:
    """Whether {w ∈ simplex : S·w ≥ S·w_prior} is the single point w_prior.

    The set always contains w_prior; it is that point alone iff no weight can rise above its prior
    value inside it (the weights sum to 1, so none can fall either). One linear program per domain
    (HiGHS), stopping at the first domain with room. A solver failure counts as "not collapsed" and
    leaves the decision to SLSQP.
    """
    from scipy.optimize import linprog

    S_hat = np.asarray(S, dtype=np.float64) * task_normalisers(S)[:, None]
    w_prior = np.asarray(w_prior, dtype=np.float64)
    K = w_prior.size
    for j in range(K):
        c = np.zeros(K)
        c[j] = -1.0
        res = linprog(
            c,
            A_ub=-S_hat,
            b_ub=-(S_hat @ w_prior),
            A_eq=np.ones((1, K)),
            b_eq=[1.0],
            bounds=[(0.0, 1.0)] * K,
            method="highs",
        )
        if res.status != 0 or res.x[j] - w_prior[j] > tol:
            return False
    return True


def solve_tikmix_d(
    S, w_prior, *, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0, pareto: bool = True
) -> tuple[np.ndarray, dict]:
    """TiKMiX-D: the mixture minimising ``tikmix_objective`` over the simplex.

    ``S`` is the n×K influence matrix (tasks × domains, benefit orientation), ``w_prior`` the
    previous stage's mixture. SLSQP (bounds [0, 1], Σw = 1) minimises the smoothed objective
    (``_smoothed_objective``) once per δ of ``SMOOTHING``, the first solve from the uniform mixture
    and each later one from the previous answer, then restarts at the last δ (up to
    ``SLSQP_RESTARTS`` times) while that lowers it; the last kept solve's status is the solve's.
    With ``pareto`` every solve also keeps S·w ≥ S·w_prior. When that constraint admits only
    w_prior, SLSQP fails, or its answer violates the constraint by more than ``PARETO_TOL``
    (normalised scale), the problem is solved again without it and ``info["pareto_relaxed"]`` is
    True. Every answer's tiny negatives are clipped and it is renormalised; if even the
    unconstrained solve gives no usable point, w_prior is returned with ``info["success"] = False``.

    ``info``: pareto_relaxed, success, message (empty when all went to plan), objective,
    objective_uniform, objective_prior (all three the exact, unsmoothed objective), influence
    (Σ P̂ of the answer), violation (largest normalised shortfall S·w_prior − S·w, ≥ 0).
    """
    from scipy.optimize import minimize

    S = np.asarray(S, dtype=np.float64)
    w_prior = np.asarray(w_prior, dtype=np.float64)
    if S.ndim != 2 or w_prior.shape != (S.shape[1],):
        raise ValueError(
            "solve_tikmix_d: S must be tasks x domains and w_prior one weight per domain, "
            f"got {S.shape} and {w_prior.shape}"
        )
    if not (np.all(np.isfinite(S)) and np.all(np.isfinite(w_prior))):
        raise ValueError("solve_tikmix_d: S and w_prior must be finite")
    K = S.shape[1]
    S_hat = S * task_normalisers(S)[:, None]
    floor_rhs = S_hat @ w_prior
    final_fun, _ = _smoothed_objective(S_hat, alpha, beta, gamma, SMOOTHING[-1])

    def slsqp(constrained: bool):
        """(result of the last kept solve, its answer on the simplex or None when a solve gave no usable point)."""
        constraints = [{"type": "eq", "fun": lambda w: np.array([w.sum() - 1.0]), "jac": lambda w: np.ones((1, K))}]
        if constrained:
            constraints.append({"type": "ineq", "fun": lambda w: S_hat @ w - floor_rhs, "jac": lambda w: S_hat})

        def run(delta, start):
            fun, jac = _smoothed_objective(S_hat, alpha, beta, gamma, delta)
            res = minimize(
                fun,
                start,
                jac=jac,
                method="SLSQP",
                bounds=[(0.0, 1.0)] * K,
                constraints=constraints,
                options={"ftol": SLSQP_FTOL, "maxiter": SLSQP_MAXITER},
            )
            return res, _to_simplex(res.x)

        x = np.full(K, 1.0 / K)
        for delta in SMOOTHING:
            res, x = run(delta, x)
            if x is None:
                return res, None
        # SLSQP stops at the first step that changes f by less than ftol, which its quasi-Newton
        # model can take well short of the optimum when the entropy's curvature 1/w_j is large
        # (small weights, small γ); a fresh start resets that model.
        for _ in range(SLSQP_RESTARTS):
            again, y = run(SMOOTHING[-1], x)
            if y is None or not final_fun(y) < final_fun(x):
                break
            res, x = again, y
        return res, x

    info = {"pareto_relaxed": False, "success": True, "message": ""}
    w = None
    if K == 1:
        w = np.ones(1)
    elif pareto:
        if pareto_collapsed(S, w_prior):
            reason = (
                "the Pareto constraint S·w >= S·w_prior admits only the previous mixture "
                "(every change lowers some task's influence)"
            )
        else:
            res, x = slsqp(True)
            shortfall = math.inf if x is None else float(np.max(floor_rhs - S_hat @ x, initial=0.0))
            if res.success and shortfall <= PARETO_TOL:
                w = x
            elif not res.success:
                reason = f"SLSQP with the Pareto constraint failed ({res.message})"
            else:
                reason = f"SLSQP's answer violates the Pareto constraint by {shortfall:.2e}"
        if w is None:
            info["pareto_relaxed"] = True
            info["message"] = reason + "; solved again without it (pareto_relaxed=1)"
    if w is None:
        res, w = slsqp(False)
        if w is None:
            w = w_prior.copy()
            info["success"] = False
            info["message"] = (
                info["message"] + "; " if info["message"] else ""
            ) + f"SLSQP gave no usable mixture ({res.message}); keeping the previous mixture"
        elif not res.success:
            info["message"] = (
                info["message"] + "; " if info["message"] else ""
            ) + f"SLSQP: {res.message} (answer kept)"
    uniform = np.full(K, 1.0 / K)
    info.update(
        objective=tikmix_objective(w, S, alpha, beta, gamma),
        objective_uniform=tikmix_objective(uniform, S, alpha, beta, gamma),
        objective_prior=tikmix_objective(w_prior, S, alpha, beta, gamma),
        influence=float(np.sum(S_hat @ w)),
        violation=float(np.max(floor_rhs - S_hat @ w, initial=0.0)),
    )
    return w, info


# ---------------------------------------------------------------- candidates, labels, surrogate, search (TiKMiX-M)


def latin_hypercube(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """n points in [0, 1)^k, one per stratum [s/n, (s+1)/n) in every coordinate (strata shuffled
    independently per coordinate, uniform position inside the stratum)."""
    strata = np.stack([rng.permutation(n) for _ in range(k)], axis=1)
    return (strata + rng.random((n, k))) / n


def search_box(w_orig, w_start, box=(0.5, 2.0)) -> tuple[np.ndarray, np.ndarray]:
    """TiKMiX-M's per-domain box [lower, upper] = [lo·min(w_orig, w_start), hi·max(w_orig, w_start)].

    The paper's box is [lo, hi]·w_orig, but its search starts at the TiKMiX-D solution w_start,
    usually outside that box, where a surrogate fitted on the box's labels only extrapolates. This
    box is the smallest one holding both scaled boxes, so it contains w_orig, w_start and the segment
    between them (a box is convex). It is the paper's box when w_start = w_orig. A box scaled around
    w_start alone would not do: where TiKMiX-D sets a weight to ~0 it would pin that domain at ~0.
    """
    w_orig = np.asarray(w_orig, dtype=np.float64)
    w_start = np.asarray(w_start, dtype=np.float64)
    return float(box[0]) * np.minimum(w_orig, w_start), float(box[1]) * np.maximum(w_orig, w_start)


def in_box(x: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Which rows of x satisfy lower ≤ x ≤ upper in every coordinate (1e-12 slack)."""
    return np.all((x >= lower - 1e-12) & (x <= upper + 1e-12), axis=-1)


def shrink_into_box(x: np.ndarray, centre: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """centre + t·(x − centre) with the largest t ∈ [0, 1] that lies in the box (rows of x and the
    centre on the simplex; the result stays on it). ``centre`` must lie in the box."""
    d = x - centre
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(d > 0, (upper - centre) / d, np.inf)
        down = np.where(d < 0, (centre - lower) / -d, np.inf)
    t = np.clip(np.minimum(up, down).min(axis=-1), 0.0, 1.0)
    return centre + t[:, None] * d


def box_candidates(
    lower, upper, centre, n: int, rng: np.random.Generator, max_batches: int = CANDIDATE_BATCHES
) -> tuple[np.ndarray, int]:
    """n mixtures in the box [lower, upper] on the simplex (TiKMiX-M's Algorithm 1, step 1).

    Repeats: n Latin-hypercube points mapped to [lower, upper], normalised to sum 1, kept if still
    inside the box; until n are kept. After ``max_batches`` batches the missing ones are the first
    rejected points pulled toward ``centre`` (a mixture in the box) until they enter it
    (``shrink_into_box``). Returns (candidates [n, K], number pulled in).
    """
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    kept, rejected, count = [], [], 0
    for _ in range(max_batches):
        x = lower + (upper - lower) * latin_hypercube(n, lower.size, rng)
        x /= x.sum(axis=1, keepdims=True)
        ok = in_box(x, lower, upper)
        kept.append(x[ok])
        rejected.append(x[~ok])
        count += int(ok.sum())
        if count >= n:
            return np.concatenate(kept)[:n], 0
    missing = n - count
    pulled = shrink_into_box(np.concatenate(rejected)[:missing], np.asarray(centre, dtype=np.float64), lower, upper)
    return np.concatenate(kept + [pulled]), missing


def fit_surrogate(X: np.ndarray, y: np.ndarray, rng: np.random.Generator, seed: int = 42) -> tuple[Callable, dict]:
    """LightGBM regression y ≈ f(w) (RegMix's settings, ``SURROGATE_PARAMS``).

    Labels are standardised; a random ``SURROGATE_HOLDOUT`` share of the rows (drawn from ``rng``,
    at least one) is the early-stopping set and the rest the training set. Returns (predict, info)
    with predict mapping mixtures [N, K] to standardised predictions [N] and info["rounds"] the best
    round.
    """
    import lightgbm as lgb

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    z = (y - y.mean()) / y.std()
    order = rng.permutation(len(y))
    n_valid = max(1, round(SURROGATE_HOLDOUT * len(y)))
    valid, train = order[:n_valid], order[n_valid:]
    params = {**SURROGATE_PARAMS, "seed": int(seed)}
    train_set = lgb.Dataset(X[train], z[train], params={"verbose": -1})
    valid_set = lgb.Dataset(X[valid], z[valid], reference=train_set)
    booster = lgb.train(
        params,
        train_set,
        num_boost_round=SURROGATE_ROUNDS,
        valid_sets=[valid_set],
        callbacks=[lgb.early_stopping(SURROGATE_EARLY_STOP, verbose=False)],
    )
    rounds = int(booster.best_iteration) or booster.current_iteration()

    def predict(W: np.ndarray) -> np.ndarray:
        return booster.predict(np.asarray(W, dtype=np.float64), num_iteration=rounds)

    return predict, {"rounds": rounds, "train_rows": int(train.size), "valid_rows": int(valid.size)}


def dirichlet_search(
    predict: Callable,
    w_start,
    lower,
    upper,
    rng: np.random.Generator,
    *,
    rounds: int = 5,
    draws: int = 10_000,
    top_k: int = 100,
    concentration=(50.0, 1000.0),
) -> tuple[np.ndarray, dict]:
    """Annealed Dirichlet search of a surrogate inside the box (TiKMiX-M's Algorithm 1, step 4).

    For α_t in geomspace(concentration[0], concentration[1], rounds): draw ``draws`` mixtures ~
    Dirichlet(max(α_t·w_best, 1e-3)), pull each draw outside [lower, upper] toward w_best until it
    enters the box (``shrink_into_box``: its direction from w_best is kept, its step shortened),
    predict them, w_best ← mean of the ``top_k`` highest predictions (ties broken by draw order).
    The box is where the surrogate's labels were measured: outside it a tree ensemble just repeats
    the values of its outermost leaves. ``w_start`` must lie in the box, and then every w_best does
    (a mean of points of a convex set). Returns (w_best, info) with info["trajectory"] the w_best
    after every round.
    """
    w = np.asarray(w_start, dtype=np.float64).copy()
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    trajectory = []
    for alpha_t in np.geomspace(concentration[0], concentration[1], rounds):
        cloud = rng.dirichlet(np.maximum(alpha_t * w, DIRICHLET_MIN_ALPHA), size=draws)
        outside = ~in_box(cloud, lower, upper)
        cloud[outside] = shrink_into_box(cloud[outside], w, lower, upper)
        best = np.argsort(-np.asarray(predict(cloud)), kind="stable")[:top_k]
        w = cloud[best].mean(axis=0)
        w /= w.sum()
        trajectory.append(w.copy())
    return w, {"trajectory": trajectory}


def search_tikmix_m(
    label_fn: Callable,
    influence_fn: Callable,
    w_orig,
    w_start,
    rng: np.random.Generator,
    *,
    n_labels: int = 256,
    box=(0.5, 2.0),
    rounds: int = 5,
    draws: int = 10_000,
    top_k: int = 100,
    concentration=(50.0, 1000.0),
    seed: int = 42,
) -> tuple[np.ndarray, dict]:
    """TiKMiX-M: candidates in the box → labels → surrogate → Dirichlet search in the box → guard.

    ``label_fn`` maps candidate mixtures [N, K] to their measured aggregate influence y [N]
    (higher is better) and ``influence_fn`` to its noise-free value, what the labels measure;
    ``w_orig`` is the previous stage's mixture and ``w_start`` where the search starts (the
    TiKMiX-D solution in the controller); the box is ``search_box(w_orig, w_start, box)``;
    ``rng`` drives the candidates, the hold-out split and the search; ``seed`` is the surrogate's.

    Guard: a surrogate fitted on noisy labels can rank wrongly, and the top-k mean drifts toward
    the inside of the box, so when the search's answer does not beat ``w_start`` on
    ``influence_fn``, ``w_start`` is returned and info["kept_start"] is True: the output never
    scores below the TiKMiX-D solution on the quantity the labels estimate.

    Returns (w, info) with the candidates, labels, the box (lower, upper), surrogate rounds, the
    number of candidates pulled into the box, the search trajectory, flat_labels and kept_start.
    """
    w_orig = np.asarray(w_orig, dtype=np.float64)
    w_start = np.asarray(w_start, dtype=np.float64)
    lower, upper = search_box(w_orig, w_start, box)
    candidates, shrunk = box_candidates(lower, upper, 0.5 * (w_orig + w_start), n_labels, rng)
    labels = np.asarray(label_fn(candidates), dtype=np.float64)
    if labels.shape != (n_labels,) or not np.all(np.isfinite(labels)):
        raise ValueError(f"search_tikmix_m: label_fn must give {n_labels} finite labels, got shape {labels.shape}")
    info = {
        "candidates": candidates,
        "labels": labels,
        "lower": lower,
        "upper": upper,
        "candidates_shrunk": shrunk,
        "rounds": 0,
        "trajectory": [],
        "flat_labels": bool(np.ptp(labels) == 0),
        "kept_start": True,
    }
    if info["flat_labels"]:
        return w_start.copy(), info
    predict, fit = fit_surrogate(candidates, labels, rng, seed)
    w, search = dirichlet_search(
        predict, w_start, lower, upper, rng, rounds=rounds, draws=draws, top_k=top_k, concentration=concentration
    )
    info.update(rounds=fit["rounds"], trajectory=search["trajectory"])
    found, start = np.asarray(influence_fn(np.stack([w, w_start])), dtype=np.float64)
    if found > start:
        info["kept_start"] = False
        return w, info
    return w_start.copy(), info


def largest_remainder(w, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` closest to w·total: floors, then one more for the largest
    fractional parts (ties to the lower index)."""
    w = np.asarray(w, dtype=np.float64)
    raw = w / w.sum() * total
    counts = np.floor(raw).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(raw - counts), kind="stable")[:short]] += 1
    return counts


def mixed_sample_label(w, sample_align, sample_domain, S, mix_sequences: int, rng: np.random.Generator) -> float:
    """The measured influence y = Σ_i P̂_i of one mixed sample drawn for mixture w.

    Domain j contributes ``largest_remainder(w, mix_sequences)[j]`` sequences drawn with
    replacement from its probe sequences (``sample_domain == j``, in their order; for j = 0..K−1,
    ``rng.integers(0, n_j, size=count_j)`` picks them). P is the mean of the drawn sequences'
    alignments [R] and P̂_i = P_i / (max_j |S_ij| + 1e-8) with the stage's S.
    """
    sample_align = np.asarray(sample_align, dtype=np.float64)
    sample_domain = np.asarray(sample_domain)
    counts = largest_remainder(w, mix_sequences)
    total = np.zeros(sample_align.shape[1])
    for j, count in enumerate(counts):
        if count == 0:
            continue
        rows = np.flatnonzero(sample_domain == j)
        if rows.size == 0:
            raise ValueError(f"TiKMiX-M: domain {j} needs {count} sequences but has no probe sequence")
        total += sample_align[rows[rng.integers(0, rows.size, size=count)]].sum(axis=0)
    return float(np.sum(total / mix_sequences * task_normalisers(S)))


# ---------------------------------------------------------------- controllers


def check_int(value, knob: str, minimum: int) -> None:
    check_knob(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        knob,
        value,
        f"must be an integer >= {minimum}",
    )


def check_pair(value, knob: str) -> tuple[float, float]:
    """A two-number list (YAML [a, b]) as a tuple, or a MixtureConfigError naming the knob."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(is_number(v) for v in value)
    check_knob(ok, knob, value, "must be a list of two finite numbers")
    return float(value[0]), float(value[1])


def check_task(value) -> None:
    ok = isinstance(value, str) and (
        value == "heldout"
        or any(value.startswith(p) and len(value) > len(p) for p in ("target:", "heldout:", "valid:"))
    )
    check_knob(
        ok,
        "tasks",
        value,
        'entries must be "target:<name>", "heldout:<domain>", "valid:<domain>", "target:*", '
        '"heldout:*", "valid:*" or "heldout"',
    )


@dataclass
class TikmixDConfig:
    name: str = "tikmix_d"
    """Registry name."""
    stages: int = 2
    """Stages in the run: the first trains on the prior, and at the start of each later one the
    mixture is solved again (stages - 1 measurements). The paper's 1B runs have 2 stages of 500B
    tokens, one transition; each measurement costs about sequences_per_domain x K + 16 x tasks
    sequences of forward/backward, so a few stages keep the method's cost near a static run's."""
    stage_tokens: int | None = None
    """Training tokens per stage instead of ``stages``: the mixture is re-solved at every multiple.
    Null: the run's token budget / ``stages``."""
    sequences_per_domain: int = 32
    """Group-gradient budget per domain, in probe sequences of the training data (tokens = this x
    data.seq_len); every domain gets the same budget so the columns of S are comparable. The paper
    uses 0.1B tokens per domain (scope uncertain, controllers.md §3.5)."""
    tasks: list = field(default_factory=lambda: ["target:*", "heldout:*"])
    """Validation tasks, one gradient each: "target:<name>" (a target set's few-shot pool),
    "heldout:<domain>" (the domain's held-out training slice, data.reference_fraction), "heldout"
    (their mix), "valid:<domain>" (the validation split evaluation reports: steering on it is said
    at the start and in the summary), or the wildcards "target:*", "heldout:*" (every domain that
    evaluation reports, i.e. with a validation split) and "valid:*"."""
    precondition: bool = False
    """Influence under Adam's diagonal curvature H ≈ diag(√v̂ + ε) instead of H = I."""
    prior: str = "uniform"
    """Mixture of the first stage: "uniform" or "natural" (proportional to the domains' tokens)."""
    alpha: float = 1.0
    """α, weight of std(P̂) (balance across tasks) in the objective (paper: 1)."""
    beta: float = 1.0
    """β, weight of Σ_i P̂_i (total influence) in the objective (paper: 1)."""
    gamma: float = 1.0
    """γ, weight of the entropy H(w) (diversity of the mixture) in the objective (paper: 1)."""
    pareto: bool = True
    """Keep S·w ≥ S·w_prior (no task loses influence against the previous stage's mixture); when
    it cannot be met usefully the stage is solved without it and logs pareto_relaxed=1."""
    floor: float = 0.0
    """Mix every published mixture with uniform: w ← (1 - floor) w + floor/K."""

    def validate(self) -> None:
        check_int(self.stages, "stages", 1)
        check_knob(
            self.stage_tokens is None
            or is_number(self.stage_tokens)
            and self.stage_tokens >= 1
            and float(self.stage_tokens).is_integer(),
            "stage_tokens",
            self.stage_tokens,
            "must be a whole number of tokens >= 1 (or null: the run's tokens / mixture.stages)",
        )
        check_int(self.sequences_per_domain, "sequences_per_domain", 1)
        check_knob(
            isinstance(self.tasks, (list, tuple)) and len(self.tasks) > 0,
            "tasks",
            self.tasks,
            "must be a non-empty list of validation task names",
        )
        for task in self.tasks:
            check_task(task)
        check_knob(len(set(self.tasks)) == len(self.tasks), "tasks", self.tasks, "lists a task twice")
        check_knob(isinstance(self.precondition, bool), "precondition", self.precondition, "must be true or false")
        check_knob(self.prior in PRIORS, "prior", self.prior, f"must be one of {list(PRIORS)}")
        for knob in ("alpha", "beta", "gamma"):
            value = getattr(self, knob)
            check_knob(is_number(value) and value >= 0, knob, value, "must be a finite number >= 0")
        check_knob(isinstance(self.pareto, bool), "pareto", self.pareto, "must be true or false")
        check_knob(is_number(self.floor) and 0 <= self.floor <= 1, "floor", self.floor, "must be in [0, 1]")


@dataclass
class TikmixMConfig(TikmixDConfig):
    name: str = "tikmix_m"
    """Registry name."""
    n_labels: int = 256
    """N_label, mixtures labelled per stage to fit the surrogate (the paper's appendix uses 256)."""
    box: list = field(default_factory=lambda: [0.5, 2.0])
    """[lo, hi]: candidates lie in lo·w_orig ≤ w ≤ hi·w_orig, w_orig the previous stage's mixture;
    needs 0 ≤ lo < 1 < hi (the paper's appendix range)."""
    mix_sequences: int | None = None
    """Sequences in each candidate's mixed sample, drawn with replacement from the probe
    sequences. Null: K x sequences_per_domain // 2 (half the probe pool)."""
    rounds: int = 5
    """T, rounds of the annealed Dirichlet search."""
    draws: int = 10_000
    """N, Dirichlet draws scored by the surrogate per round."""
    top_k: int = 100
    """k, best-predicted draws averaged into the next w_best."""
    concentration: list = field(default_factory=lambda: [50.0, 1000.0])
    """[first, last] Dirichlet concentration, log-spaced over the rounds and multiplying w_best;
    rising = coarse to fine (the project's choice; [1000, 50] is the paper's literal order)."""
    seed: int = 42
    """Seed of the candidates, label samples, search and LightGBM (with the stage index)."""

    def validate(self) -> None:
        super().validate()
        check_int(self.n_labels, "n_labels", 10)
        lo, hi = check_pair(self.box, "box")
        check_knob(0 <= lo < 1 < hi, "box", self.box, "must be [lo, hi] with 0 <= lo < 1 < hi")
        if self.mix_sequences is not None:
            check_int(self.mix_sequences, "mix_sequences", 1)
        check_int(self.rounds, "rounds", 1)
        check_int(self.draws, "draws", 1)
        check_int(self.top_k, "top_k", 1)
        check_knob(self.top_k <= self.draws, "top_k", self.top_k, f"must be <= mixture.draws={self.draws}")
        first, last = check_pair(self.concentration, "concentration")
        check_knob(first > 0 and last > 0, "concentration", self.concentration, "must be two numbers > 0")
        check_knob(
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**32,
            "seed",
            self.seed,
            "must be an integer in [0, 2**32)",
        )


def prior_weights(prior: str, K: int, domain_tokens: np.ndarray | None, domains: list[str]) -> np.ndarray:
    """The first stage's mixture: uniform, or proportional to the domains' training tokens."""
    if prior == "uniform":
        return np.full(K, 1.0 / K)
    if domain_tokens is None:
        raise MixtureConfigError('mixture.prior="natural" needs the domains\' token counts, which were not given')
    return check_weights(domain_tokens, domains, 'mixture.prior="natural" (the domains\' token counts)')


@register
class TikmixD(Controller):
    """TiKMiX-D: at every stage boundary, the mixture solving the group-influence objective."""

    name = "tikmix_d"
    Config = TikmixDConfig
    per_sample = False

    def __init__(self, domains, cfg: TikmixDConfig, **context):
        super().__init__(domains, cfg, **context)
        if cfg.stage_tokens is None and self.run_tokens is None:
            raise MixtureConfigError(
                "mixture.stage_tokens must be set: the run's token budget, which mixture.stages "
                "divides, is not known here"
            )
        self._stage_tokens = (
            int(cfg.stage_tokens) if cfg.stage_tokens is not None else max(1, self.run_tokens // cfg.stages)
        )
        self._prior = prior_weights(cfg.prior, self.K, self.domain_tokens, self.domains)
        self._weights = np.array(apply_floor(self._prior, cfg.floor))
        self._tokens_seen = 0
        self._next_boundary = self._stage_tokens
        self._stage = 0
        self._metrics: dict[str, float] = {}
        self.last_message = ""
        """What the last measurement step did, in words (solver trouble, relaxation, a retry)."""
        self.last_info: dict = {}
        """Diagnostics of the last update (solver info; for TiKMiX-M also candidates and labels)."""

    @property
    def pending(self) -> bool:
        """Whether a stage boundary has been reached and the measurement is still to be made."""
        return self._tokens_seen >= self._next_boundary

    @property
    def stage(self) -> int:
        """Index of the stage being trained (0: the prior)."""
        return self._stage

    @property
    def references(self) -> tuple[str, ...]:
        return tuple(self.cfg.tasks)

    def request(self, step: int) -> Request:
        if not self.pending:
            return Request()
        cfg = self.cfg
        return Request(
            align=tuple(cfg.tasks),
            source="probe_batch",
            probe_sequences=cfg.sequences_per_domain,
            precondition=cfg.precondition,
            per_sample=self.per_sample,
        )

    exported = "last stage's solution"

    @property
    def average_weights(self) -> np.ndarray:
        """The last stage's mixture: TiKMiX's output is its latest solution, not a time average."""
        return self._weights.copy()

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def _measurement(self, stats) -> np.ndarray | None:
        """S = alignᵀ (tasks x domains) when the measurement is usable, else None."""
        if stats.align is None:
            return None
        align = np.asarray(stats.align, dtype=np.float64)
        if align.ndim != 2 or align.shape[0] != self.K:
            raise ValueError(
                f"{self.name}: step {stats.step} gives align of shape {align.shape}, expected ({self.K}, tasks)"
            )
        if not (np.all(np.isfinite(align)) and stats.finite()):
            return None
        return align.T

    def observe(self, stats) -> None:
        tokens = np.asarray(stats.tokens, dtype=np.float64)
        measuring = self.pending  # the request of this step asked for the measurement
        if np.all(np.isfinite(tokens)):
            self._tokens_seen += round(float(tokens.sum()))
        if not measuring or stats.align is None:
            return
        S = self._measurement(stats)
        if S is None:
            self.last_message = (
                f"stage {self._stage + 1}: the measurement at step {stats.step} is not finite; "
                "weights unchanged, measuring again at the next step"
            )
            return
        stage = self._stage + 1
        w, metrics, message = self._solve(S, stats, stage)
        self._weights = np.array(apply_floor(w, self.cfg.floor))
        self._stage = stage
        self._next_boundary = (self._tokens_seen // self._stage_tokens + 1) * self._stage_tokens
        self._metrics = {"stage": float(stage), "tasks": float(S.shape[0]), **metrics}
        self.last_message = f"stage {stage}: " + (message or "solved")
        if metrics.get("pareto_relaxed"):
            warnings.warn(f"{self.name} {self.last_message}", RuntimeWarning, stacklevel=2)

    def _solve(self, S: np.ndarray, stats, stage: int) -> tuple[np.ndarray, dict, str]:
        """(new mixture before the floor, metrics, message) for one measurement."""
        cfg = self.cfg
        w, info = solve_tikmix_d(S, self._weights, alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma, pareto=cfg.pareto)
        self.last_info = info
        metrics = {
            "pareto_relaxed": float(info["pareto_relaxed"]),
            "objective": info["objective"],
            "objective_uniform": info["objective_uniform"],
            "objective_prior": info["objective_prior"],
            "influence": info["influence"],
        }
        return w, metrics, info["message"]

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "prior": self._prior.copy(),
            "tokens_seen": self._tokens_seen,
            "next_boundary": self._next_boundary,
            "stage": self._stage,
            "metrics": [[k, v] for k, v in self._metrics.items()],
            "message": self.last_message,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._prior = np.asarray(state["prior"], dtype=np.float64).copy()
        self._tokens_seen = int(state["tokens_seen"])
        self._next_boundary = int(state["next_boundary"])
        self._stage = int(state["stage"])
        self._metrics = {str(k): float(v) for k, v in state["metrics"]}
        self.last_message = str(state["message"])


@register
class TikmixM(TikmixD):
    """TiKMiX-M: TiKMiX-D's solution refined by a LightGBM surrogate of measured mixture influence."""

    name = "tikmix_m"
    Config = TikmixMConfig
    per_sample = True

    def __init__(self, domains, cfg: TikmixMConfig, **context):
        import importlib.util

        if importlib.util.find_spec("lightgbm") is None:  # an optional extra: refused before step 0
            raise MixtureConfigError(
                "mixture.name=tikmix_m needs LightGBM for its surrogate: pip install 'mixtrain[tikmix]' "
                "(or use mixture=tikmix_d, which needs none)"
            )
        super().__init__(domains, cfg, **context)

    @property
    def mix_sequences(self) -> int:
        """Sequences per candidate's mixed sample (the knob, or K x sequences_per_domain // 2)."""
        if self.cfg.mix_sequences is not None:
            return self.cfg.mix_sequences
        return max(1, self.K * self.cfg.sequences_per_domain // 2)

    def _measurement(self, stats) -> np.ndarray | None:
        S = super()._measurement(stats)
        if S is None:
            return None
        for name in ("sample_align", "sample_domain"):
            if getattr(stats, name) is None:
                raise ValueError(
                    f"{self.name}: step {stats.step} has no DomainStats.{name}, which its Request asked for"
                )
        sample_align, sample_domain = np.asarray(stats.sample_align, dtype=np.float64), np.asarray(stats.sample_domain)
        if sample_align.ndim != 2 or sample_align.shape != (sample_domain.size, S.shape[0]):
            raise ValueError(
                f"{self.name}: step {stats.step} gives sample_align {sample_align.shape} for "
                f"{sample_domain.size} probe sequences and {S.shape[0]} tasks"
            )
        if not np.all(np.isfinite(sample_align)):
            return None
        return S

    def _solve(self, S: np.ndarray, stats, stage: int) -> tuple[np.ndarray, dict, str]:
        cfg = self.cfg
        w_d, metrics_d, message = super()._solve(S, stats, stage)
        info_d = self.last_info
        sample_align = np.asarray(stats.sample_align, dtype=np.float64)
        sample_domain = np.asarray(stats.sample_domain)
        mix = self.mix_sequences

        def label_fn(candidates: np.ndarray) -> np.ndarray:
            return np.array(
                [
                    mixed_sample_label(
                        w, sample_align, sample_domain, S, mix, np.random.default_rng([cfg.seed, stage, 2, c + 1])
                    )
                    for c, w in enumerate(candidates)
                ]
            )

        def influence_fn(candidates: np.ndarray) -> np.ndarray:
            """Σ_i P̂_i of S·w: S's columns are the per-domain means of the rows the labels resample."""
            return np.sum(normalised_performance(S, candidates), axis=-1)

        rng = np.random.default_rng([cfg.seed, stage, 1])
        w, info = search_tikmix_m(
            label_fn,
            influence_fn,
            self._weights,
            w_d,
            rng,
            n_labels=cfg.n_labels,
            box=tuple(cfg.box),
            rounds=cfg.rounds,
            draws=cfg.draws,
            top_k=cfg.top_k,
            concentration=tuple(cfg.concentration),
            seed=cfg.seed,
        )
        self.last_info = {**info, "tikmix_d": info_d, "w_start": w_d}
        metrics = {
            "pareto_relaxed": metrics_d["pareto_relaxed"],
            "objective": tikmix_objective(w, S, cfg.alpha, cfg.beta, cfg.gamma),
            "objective_start": metrics_d["objective"],
            "objective_uniform": metrics_d["objective_uniform"],
            "objective_prior": metrics_d["objective_prior"],
            "influence": float(np.sum(normalised_performance(S, w))),
            "influence_start": metrics_d["influence"],
            "surrogate_rounds": float(info["rounds"]),
            "candidates_shrunk": float(info["candidates_shrunk"]),
            "kept_start": float(info["kept_start"]),
        }
        if info["flat_labels"]:
            message = (message + "; " if message else "") + "every label is equal: kept the TiKMiX-D solution"
        elif info["kept_start"]:
            message = (
                message + "; " if message else ""
            ) + "the search did not beat the TiKMiX-D solution on the noise-free influence: kept it"
        return w, metrics, message
