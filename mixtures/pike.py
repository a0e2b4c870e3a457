"""PiKE: adaptive data mixing under low gradient conflicts, and Balanced-PiKE (controllers.md §8.5).

Source: Li et al., arXiv 2502.06244 (NeurIPS 2025), Algorithm 1 (the practical version); no public
code was found, so everything below the paper's rule is the project's. Every T0 = ``update_every``
steps (the steps with (step + 1) % T0 == 0, like DGA), with a_k = ‖∇L_k‖² the squared norm of
domain k's mean-loss gradient, v_k = σ_k² its per-sequence gradient variance and b the step's global
batch in sequences (``DomainStats.extra["batch_sequences"]``):

    step_k = ζ1 · y_k² a_k / S_a − ζ2 · y_k² (v_k / (2b)) / S_v
    log w_k += step_k,   w ← w / ‖w‖₁

The sampler draws the next batches from w (resampling: ``weights`` is the mixture). The paper's
step is ζ1 a_k − ζ2 v_k/(2b) with ζ1, ζ2 standing for αηβ and αLη², for which it gives no universal
values. Project choices:

- ``normalise="mean"`` (default): S_a = mean over the present domains of y_k² a_k and S_v that of
  y_k² v_k/(2b), so each term is divided by its own mean over the domains. The step is then free of
  the scale of the gradients, of the learning rate and of the batch size (b cancels), the same
  same ζ1 = ζ2 mean the same thing on any model, and a domain at the mean of both terms stays put.
- Defaults ζ1 = ζ2 = 0.1: the normalised terms, measured on a few sequences per domain, carry a
  sampling spread of order 1 per update, so a unit step makes the weights a random walk (in the
  study, ζ = 1 swung single domains to 0.5-0.6 and back within 150 steps); see ``zeta1``.
- ``debias`` (default on): a_k = ‖g_k‖² − σ̂_k²/n_k, floored at 0, an unbiased estimate of
  ‖∇L_k‖² (the measured squared norm of a mean over n_k sequences has σ_k²/n_k of noise in it).
  ``normalise="none"``: S_a = S_v = 1, the paper's raw constants (retune per run). A normaliser of
  0 (every present domain's term is 0) makes that term 0.
- Balanced-PiKE (``tau`` > 0): the tilted objective (1/τ) log Σ_k exp(τ L_k) is realised as
  per-domain loss weights y = K · softmax(τ L) (``loss_weights``; the trainer multiplies domain k's
  token losses by y_k), L the update step's per-domain training losses, recomputed on every update
  step and applied from the next step on. The mixed batch's gradient is then Σ_k w_k y_k ∇L_k, so
  domain k's descent term and its variance both carry y_k²: the PiKE step of the same update uses
  the new y (the weights that the next batches, drawn from the new w, are trained with). The
  reference writes y = τ·softmax(τL); K·softmax(τL) is scaled so that τ → 0 gives plain PiKE
  (y ≡ 1), and the constant factor cancels under ``normalise="mean"``. Only domains with a training
  loss in the step are re-tilted, within the y mass they had (Σ_k y_k stays K); the others keep
  their y. ``tau`` = 0: y ≡ 1, plain PiKE.
- Presence (controllers.md §0): a domain takes part when its statistics were measured (its tokens
  with ``source="in_batch"``, its non-NaN rows with a probe batch); an absent domain keeps its
  log-weight (``mirror_step``). A domain whose variance could not be estimated (σ_k² NaN: fewer than
  two pieces of its gradient) while its norm is known is absent from that update too, rather than
  the whole step being skipped. Any other non-finite value (a norm, an infinite variance, the loss
  of a domain in the batch, the learning rate) skips the update and changes nothing.
- σ̂² is non-negative in exact arithmetic; a rounding-level negative estimate is read as 0.
- ``floor`` mixes the output with uniform and never enters the state (``LearnedMixture``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .base import Request, register
from .common import LearnedMixture, check_knob, is_number, mirror_step, present_domains, require, softmax

SOURCES = ("auto", "in_batch", "probe_batch")
NORMALISE = ("mean", "none")


@dataclass
class PikeConfig:
    name: str = "pike"
    """Registry name."""
    update_every: int = 10
    """T0: the weights are updated on every T0-th step (the paper's re-estimation interval; it gives
    no value). 10, as DGA's T_r: the statistics are measured on update steps only, so their cost
    (per-sequence pieces, or a probe batch when the batch misses a domain) is spread over T0 steps."""
    zeta1: float = 0.1
    """ζ1, the weight of the descent term y_k² ‖∇L_k‖² (over its mean across domains by default).
    With a few sequences per domain per step each normalised term has a sampling spread of order 1,
    so one update's log-step carries noise of order ζ: at 0.1 that noise adds up to a spread of
    about 0.1·√U after U updates (0.4 after 15), while a consistent signal moves a weight by e^{0.1 U}."""
    zeta2: float = 0.1
    """ζ2, the weight of the noise term y_k² σ_k²/(2b) (over its mean across domains by default)."""
    debias: bool = True
    """Estimate ‖∇L_k‖² without its sampling noise: the measured squared norm of a mean over n_k
    sequences is ‖∇L_k‖² + σ_k²/n_k in expectation, so σ̂_k²/n_k is subtracted (floored at 0;
    n_k from ``DomainStats.extra["sequences"]``). False: the measured squared norm, which favours
    the domains with the fewest sequences in the batch."""
    normalise: str = "mean"
    """"mean": divide each term by its mean over the present domains (scale-free across models, LRs
    and batch sizes; the paper gives no universal ζ); "none": the paper's raw step."""
    tau: float = 0.0
    """τ of Balanced-PiKE: loss weights y = K·softmax(τ L) over the domains; 0 is plain PiKE (y ≡ 1).
    The paper finds τ ≈ 1–3 best."""
    floor: float = 0.0
    """Mix the output with uniform: w ← (1 - floor) w + floor/K (not fed back into the state)."""
    source: str = "auto"
    """Where the per-domain gradients come from: "auto" (the training batch when it holds every
    domain, else a probe batch), "in_batch" (always the training batch; an absent domain is
    skipped) or "probe_batch" (always ``probe_sequences`` sequences per domain)."""
    probe_sequences: int = 16
    """Sequences per domain in a probe batch."""

    def validate(self) -> None:
        check_knob(
            isinstance(self.update_every, int) and not isinstance(self.update_every, bool) and self.update_every >= 1,
            "update_every",
            self.update_every,
            "must be an integer >= 1",
        )
        for knob in ("zeta1", "zeta2"):
            value = getattr(self, knob)
            check_knob(is_number(value) and value >= 0, knob, value, "must be a number >= 0")
        check_knob(self.normalise in NORMALISE, "normalise", self.normalise, f"must be one of {list(NORMALISE)}")
        check_knob(is_number(self.tau) and self.tau >= 0, "tau", self.tau, "must be a number >= 0")
        check_knob(is_number(self.floor) and 0 <= self.floor <= 1, "floor", self.floor, "must be in [0, 1]")
        check_knob(self.source in SOURCES, "source", self.source, f"must be one of {list(SOURCES)}")
        check_knob(
            isinstance(self.probe_sequences, int)
            and not isinstance(self.probe_sequences, bool)
            and self.probe_sequences > 0,
            "probe_sequences",
            self.probe_sequences,
            "must be a positive integer",
        )


def batch_sequences(stats, controller: str) -> float:
    """b, the step's global batch in sequences, which the trainer puts in ``DomainStats.extra``."""
    b = stats.extra.get("batch_sequences")
    where = f"{controller}: step {stats.step} has"
    if b is None:
        raise ValueError(f"{where} no DomainStats.extra['batch_sequences'] (the global batch in sequences)")
    if not (isinstance(b, numbers.Real) and not isinstance(b, bool) and math.isfinite(b) and b > 0):
        raise ValueError(f"{where} DomainStats.extra['batch_sequences']={b!r}, not a number > 0")
    return float(b)


def sequences(stats, controller: str) -> np.ndarray:
    """n_k, the sequences behind each domain's gradient statistics (``DomainStats.extra``)."""
    n = stats.extra.get("sequences")
    if n is None:
        raise ValueError(
            f"{controller}: step {stats.step} has no DomainStats.extra['sequences'] (per-domain sequences "
            "behind the variances), which mixture.debias needs"
        )
    return np.asarray(n, dtype=np.float64)


@register
class PiKE(LearnedMixture):
    name = "pike"
    Config = PikeConfig

    def __init__(self, domains, cfg: PikeConfig, **context):
        super().__init__(domains, cfg, **context, floor=cfg.floor)
        self._logw = np.full(self.K, -math.log(self.K))
        self._y = np.ones(self.K)
        self._publish()

    def _learned(self) -> np.ndarray:
        return np.exp(self._logw)

    @property
    def loss_weights(self) -> np.ndarray:
        """y: Balanced-PiKE's per-domain loss weights (ones when tau = 0)."""
        return self._y.copy()

    def updates_at(self, step: int) -> bool:
        """Whether step ``step`` is an update step (the last of every block of ``update_every``)."""
        return (step + 1) % self.cfg.update_every == 0

    def request(self, step: int) -> Request:
        if not self.updates_at(step):
            return Request()
        return Request(norms=True, grad_var=True, source=self.cfg.source, probe_sequences=self.cfg.probe_sequences)

    def _tilted(self, loss: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """y after this step's losses: (their y mass) · softmax(τ L) over the domains in the batch."""
        y = self._y.copy()
        seen = tokens > 0
        if self.cfg.tau > 0 and seen.any():
            y[seen] = self._y[seen].sum() * softmax(self.cfg.tau * loss[seen])
        return y

    def observe(self, stats) -> None:
        if not self.updates_at(stats.step):
            return
        cfg = self.cfg
        norms, grad_var = require(stats, self.name, "norms", "grad_var")
        b = batch_sequences(stats, self.name)
        unknown = np.isnan(grad_var) & np.isfinite(norms)  # < 2 pieces: absent from this update
        present = present_domains(stats, [norms, np.where(unknown, 0.0, grad_var)], probed=cfg.source != "in_batch")
        if present is None:
            return
        present &= ~unknown
        if not present.any():
            return
        y = self._tilted(np.asarray(stats.loss, dtype=np.float64), np.asarray(stats.tokens))
        y2 = np.where(present, y**2, 0.0)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            squared = norms**2
            if cfg.debias:
                squared = np.maximum(squared - np.maximum(grad_var, 0.0) / sequences(stats, self.name), 0.0)
            descent = np.where(present, y2 * squared, 0.0)
            noise = np.where(present, y2 * np.maximum(grad_var, 0.0) / (2.0 * b), 0.0)
            if cfg.normalise == "mean":
                s_a, s_v = descent[present].mean(), noise[present].mean()
            else:
                s_a = s_v = 1.0
            step = cfg.zeta1 * (descent / s_a if s_a != 0 else 0.0) - cfg.zeta2 * (noise / s_v if s_v != 0 else 0.0)
        step = np.where(present, step, 0.0)
        if not np.all(np.isfinite(step)):  # an overflow in ‖g‖² or the normalisers: not an update
            return
        self._logw = mirror_step(self._logw, step, present)
        self._y = y
        self._publish()
        self._record()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "logw": self._logw.copy(), "y": self._y.copy()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._logw = np.asarray(state["logw"], dtype=np.float64).copy()
        self._y = np.asarray(state["y"], dtype=np.float64).copy()
        self._publish()
