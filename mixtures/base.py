"""The controller contract: what the trainer gives a mixture controller and what it gets back.

Controllers are pure decision logic on numpy arrays. They never import the trainer and never talk
to torch.distributed: the trainer reduces statistics over ranks before ``observe`` and makes sure
every rank uses rank 0's weights.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


class MixtureConfigError(ValueError):
    """A mixture knob with a bad value; the message names the knob (``mixture.<name>``)."""


@dataclass(frozen=True)
class Request:
    """Signals a controller needs at one step. The trainer computes only what is asked for.

    Reference names (for ``align``): ``"heldout"`` — a mixed batch from every domain's held-out
    training slice (``data.reference_fraction``; DoGE universal), every domain represented: equal
    counts, the remainder (or, with fewer sequences than domains, every sequence) on distinct
    domains drawn at random per step; ``"heldout:<domain>"`` — a batch of that domain's slice;
    ``"target:<name>"`` — a batch of the named target set's few-shot pool (train split; DGA, DoGE
    OOD); ``"valid:<domain>"`` — a batch of that domain's validation split, which evaluation also
    reports (the trainer says so when a run steers on it); ``"heldout:*"``, ``"target:*"`` and
    ``"valid:*"`` expand to the slice of every domain with a validation split (the domains evaluation
    reports; every domain when none has one), every target set (sorted by name) and every
    validation split, in domain order, for controllers that measure many tasks (TiKMiX). Columns
    of ``DomainStats.align`` follow the expanded list, given in ``DomainStats.align_names``.
    """

    loss: bool = True
    """Per-domain mean training loss and token counts (cheap; always available)."""
    align: tuple[str, ...] = ()
    """Reference gradients r to align every domain gradient with: align[i, r] = <g_i, r>."""
    norms: bool = False
    """Per-domain gradient norms ||g_i|| (exact when affordable, sketched otherwise)."""
    gram: bool = False
    """The K x K Gram <g_i, g_j> (its diagonal are the squared norms)."""
    source: str = "in_batch"
    """Where per-domain gradients come from: "in_batch" (the training step's own batch, split by
    domain inside its backward), "probe_batch" (a separate batch of ``probe_sequences`` sequences
    per domain drawn from the training data, forward/backward without touching the training
    gradient; every domain gets a signal even at weight ~0) or "auto" (in_batch when the step's
    global batch holds every domain, probe_batch otherwise: the training batch's signal costs
    nothing extra, the probe batch only steps in for a domain the sampler left out)."""
    probe_sequences: int = 16
    """Sequences per domain in a probe batch (source="probe_batch")."""
    ref_sequences: int | None = 16
    """Sequences in each reference batch; None lets the trainer pick DoGE's b_T rule:
    max(4, global batch // (K + 1)) — the held-out mix as one more "domain" of the batch."""
    ref_model_loss: bool = False
    """Per-domain clipped excess loss against the reference model, on the same batch (DoReMi)."""
    precondition: bool = False
    """Replace each reference gradient r by D⁻¹r, D = diag(sqrt(v̂) + eps) from the optimizer's
    second moments (Adam), so align[i, k] = <g_i, D⁻¹ r_k>: influence under a diagonal curvature.
    Identity before the optimizer's first step."""
    per_sample: bool = False
    """With source="probe_batch": also return every probe sequence's own alignments
    (``DomainStats.sample_align``, ``sample_domain``); ``align`` is then their per-domain mean."""
    grad_var: bool = False
    """Per-domain per-sequence gradient variance σ_k² (``DomainStats.grad_var``: the trace of the
    covariance of the gradients of single sequences' mean token loss), unbiased, from the pieces of
    each domain's gradient the probe sees (micro-batches x ranks, or single sequences:
    ``probe.grad_var``); implies ``norms``."""
    params: str = "all"
    """Which parameters the per-domain norms/Gram cover: "all", or "final" (the model's last block,
    R&B's cheap final-layer gradients). Alignments and variances need "all"."""
    accumulate: bool = False
    """With norms/Gram from the training batch: add this step's per-domain gradients to a running
    sum instead of reporting them (``DomainStats`` then has no gradient fields); the next step whose
    request asks for the same statistics with accumulate=False reports those of the whole sum,
    i.e. of each domain's mean gradient over every sequence of those steps (R&B's round). The sum
    is part of the checkpoint."""

    @property
    def any_gradient(self) -> bool:
        return bool(self.align) or self.norms or self.gram or self.grad_var


@dataclass
class DomainStats:
    """Per-step statistics, already reduced over data-parallel ranks and micro-batches.

    ``loss[i]`` is NaN and ``tokens[i]`` is 0 for a domain absent from the step. Gradient
    statistics refer to g_i = the gradient of domain i's *mean* token loss (unweighted), at the
    parameters before this step's update; NaN rows for absent domains.
    """

    step: int
    lr: float
    loss: np.ndarray  # [K] mean token loss per domain
    tokens: np.ndarray  # [K] token counts
    align: np.ndarray | None = None  # [K, R] <g_i, r_k>, columns in Request.align order
    ref_norms: np.ndarray | None = None  # [R] ||r_k||
    gram: np.ndarray | None = None  # [K, K]
    norms: np.ndarray | None = None  # [K] ||g_i||
    excess_loss: np.ndarray | None = None  # [K] mean over domain tokens of max(loss - ref_loss, 0)
    ref_loss: np.ndarray | None = None  # [K] reference model's mean token loss per domain
    sample_weights: np.ndarray | None = None  # [K] the distribution this step's batch was drawn from
    align_names: tuple[str, ...] | None = None  # the reference names behind align's columns (expanded)
    sample_align: np.ndarray | None = None  # [n, R] <g_s, r_k> of each probe sequence s (mean token loss)
    sample_domain: np.ndarray | None = None  # [n] domain index of each probe sequence
    grad_var: np.ndarray | None = None  # [K] σ_k²: trace of the per-sequence gradient covariance (NaN: < 2 pieces)
    extra: dict = field(default_factory=dict)
    """Loose facts about the step: "batch_sequences" (the global batch, sequences) always;
    "sequences" ([K], the sequences behind the gradient statistics) with ``grad_var``."""

    def finite(self) -> bool:
        """True when every statistic of the present domains is finite."""
        present = self.tokens > 0
        arrays = [self.loss[present]]
        for a in (self.align, self.norms, self.excess_loss, self.ref_loss):
            if a is not None:
                arrays.append(np.asarray(a)[present])
        if self.gram is not None:
            arrays.append(np.asarray(self.gram)[np.ix_(present, present)])
        if self.ref_norms is not None:
            arrays.append(np.asarray(self.ref_norms))
        return all(np.all(np.isfinite(a)) for a in arrays) and math.isfinite(self.lr)


def check_weights(weights, domains: list[str], knob: str) -> np.ndarray:
    """Validate a weight vector or name->weight map and return it normalised, in domain order."""
    if isinstance(weights, dict):
        unknown = sorted(set(weights) - set(domains))
        if unknown:
            raise MixtureConfigError(f"{knob} names unknown domains {unknown}; the domains are {domains}")
        missing = [d for d in domains if d not in weights]
        if missing:
            raise MixtureConfigError(
                f"{knob} gives no weight for domains {missing}; give every domain a weight (0 is allowed)"
            )
        weights = [weights[d] for d in domains]
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise MixtureConfigError(f"{knob} must be numbers, got {weights!r}") from None
    if w.shape != (len(domains),):
        raise MixtureConfigError(f"{knob} has {w.size} entries but there are {len(domains)} domains {domains}")
    if not np.all(np.isfinite(w)):
        raise MixtureConfigError(f"{knob} contains NaN or infinite values: {w.tolist()}")
    if np.any(w < 0):
        raise MixtureConfigError(f"{knob} contains negative weights: {w.tolist()}")
    if w.sum() <= 0:
        raise MixtureConfigError(f"{knob} sums to zero; at least one domain needs a positive weight")
    return w / w.sum()


def apply_floor(w: np.ndarray, floor: float) -> np.ndarray:
    """Mix with uniform so every entry is at least floor/K (controllers.md: the shared floor rule)."""
    if floor <= 0:
        return w
    return (1.0 - floor) * w + floor / w.size


class Controller(ABC):
    """Base class. Subclasses set ``name`` and ``Config`` (a dataclass of their knobs)."""

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(
        self, domains: list[str], cfg: Any, *, domain_tokens: np.ndarray | None = None, run_tokens: int | None = None
    ):
        """``domain_tokens``: training tokens per domain (temperature, UniMax, natural priors);
        ``run_tokens``: the run's whole training-token budget (steps x global batch x seq_len)."""
        self.domains = list(domains)
        self.K = len(domains)
        self.cfg = cfg
        self.domain_tokens = None if domain_tokens is None else np.asarray(domain_tokens, dtype=np.float64)
        self.run_tokens = None if run_tokens is None else int(run_tokens)
        self._weights = np.full(self.K, 1.0 / self.K)
        self._sum = np.zeros(self.K)
        self._count = 0

    @property
    def weights(self) -> np.ndarray:
        """Sampling distribution for the next shard."""
        return self._weights

    @property
    def loss_weights(self) -> np.ndarray:
        """Per-domain multipliers of the training loss (ones unless the method reweights the loss)."""
        return np.ones(self.K)

    @property
    def mixture(self) -> np.ndarray:
        """The method's current distribution over domains. Equal to ``weights`` unless the method
        acts through the loss instead of the sampler (DoGE/DoReMi proxy mode)."""
        return self._weights

    def request(self, step: int) -> Request:
        return Request()

    @property
    def references(self) -> tuple[str, ...]:
        """Every reference name (``Request.align``) this controller may ask for during the run,
        known before the run starts: the trainer sets data aside for held-out references and says
        up front when a reference draws from data that evaluation reports."""
        return ()

    @property
    def reference_model(self) -> str | None:
        """The run directory of a frozen reference model whose losses this controller asks for
        (``Request.ref_model_loss``): loaded by the trainer before step 0. None: no such model."""
        return None

    @property
    def accumulates(self) -> bool:
        """Whether its requests sum per-domain gradients over several steps (``Request.accumulate``):
        the trainer then keeps the running sum, and puts it in the checkpoint."""
        return False

    @property
    def adaptive(self) -> bool:
        """Whether weights can change during a run (static controllers skip the per-step sync)."""
        return True

    def update(self, stats: DomainStats) -> dict:
        """``observe(stats)``, then the metrics the observation changed ({} when none did): the one
        call a trainer makes per step, so it never has to order observe and metrics itself."""
        before = self.metrics()
        self.observe(stats)
        after = self.metrics()
        return after if after != before else {}

    @abstractmethod
    def observe(self, stats: DomainStats) -> None:
        """Update from one step's statistics. Must leave state untouched when ``stats`` is not finite.

        A controller adds its new weights to the running average (``_record``) itself, on the
        steps it actually updates: a step skipped for non-finite statistics is not an update and
        enters neither the weights nor the average's count."""

    def metrics(self) -> dict[str, float]:
        """Scalars about the last update worth logging (e.g. TiKMiX's ``pareto_relaxed``); the trainer
        writes them as ``mixture/<key>`` in the step's record."""
        return {}

    def _record(self) -> None:
        """Add the current weights to the running average; called by ``observe`` once per update."""
        self._sum += self._weights
        self._count += 1

    exported: ClassVar[str] = "time average"
    """What ``average_weights`` is, in words, for the end-of-run summary."""

    @property
    def average_weights(self) -> np.ndarray:
        """What a proxy search exports: the time average of the weights (current weights if none yet)."""
        return self._sum / self._count if self._count else self._weights.copy()

    def state_dict(self) -> dict:
        return {"weights": self._weights.copy(), "sum": self._sum.copy(), "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        self._weights = np.asarray(state["weights"], dtype=np.float64).copy()
        self._sum = np.asarray(state["sum"], dtype=np.float64).copy()
        self._count = int(state["count"])


REGISTRY: dict[str, type[Controller]] = {}


def register(cls: type[Controller]) -> type[Controller]:
    REGISTRY[cls.name] = cls
    return cls


def config_from_dict(config_cls: type, values: dict, prefix: str = "mixture"):
    """Build a knob dataclass from a plain dict, naming unknown knobs and allowed ones."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise MixtureConfigError(
            f"unknown knob(s) {', '.join(prefix + '.' + u for u in unknown)}; allowed: {', '.join(sorted(names))}"
        )
    cfg = config_cls(**values)
    validate = getattr(cfg, "validate", None)
    if validate:
        validate()
    return cfg


def build_controller(name: str, domains: list[str], values: dict, *, domain_tokens=None, run_tokens=None) -> Controller:
    if name not in REGISTRY:
        raise MixtureConfigError(
            f"mixture.name={name!r} is not a registered controller; allowed: {', '.join(sorted(REGISTRY))}"
        )
    cls = REGISTRY[name]
    cfg = config_from_dict(cls.Config, values)
    return cls(domains, cfg, domain_tokens=domain_tokens, run_tokens=run_tokens)
