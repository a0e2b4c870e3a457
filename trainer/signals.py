"""Measurement for controllers: turns a controller's ``Request`` into ``DomainStats`` fields.

Per step, only what is requested is computed:

- reference gradients (``"heldout"``: a mixed batch from every domain's held-out training slice,
  every domain represented; ``"heldout:<domain>"``: one domain's slice; ``"target:<name>"``: a
  batch of the target set's few-shot pool; ``"valid:<domain>"``: a batch of one domain's
  validation split, which evaluation also reports; ``"heldout:*"``/``"target:*"``/``"valid:*"``
  expand to all of them; ``mixtures.Request`` documents each), computed
  before the training backward, identical on every rank (same batch, same parameters), optionally
  preconditioned by Adam's second moments;
- per-domain alignments / norms / Gram from the probe, inside the training backward
  (``source="in_batch"``) or on a separate per-domain probe batch (``source="probe_batch"``; ``"auto"``:
  in the batch when it holds every domain,
  processed in chunks, optionally with one alignment row per sequence);
- per-domain gradient variances σ_k² (``Request.grad_var``, PiKE) from the probe's pieces, in the
  mode ``probe.grad_var`` picks;
- norms/Gram of the last block only (``Request.params="final"``: a second probe scoped to it, R&B),
  and per-domain gradients summed over several steps (``Request.accumulate``: :class:`GradientRound`,
  which the checkpoint keeps);
- per-domain excess loss against a frozen reference model on the training batch (DoReMi).

Batches drawn here are pure functions of (seed, step): a resumed run measures the same things.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from mixtures import DomainStats, Request

from . import checkpoint, dist
from .callbacks import Callback, register
from .config import ConfigError, ModelConfig
from .data.domains import DataBundle, SequenceView
from .data.tokenizer import identity_difference
from .engines import load_frozen
from .models import frozen_token_losses, token_losses
from .probe import Probe, ProbeSpec, gram

PIECES_FOR_VARIANCE = 8
"""probe.grad_var=auto estimates from micro-batch pieces when a step has at least this many."""

_REF_STREAM, _PROBE_STREAM = 3, 4
_PROBE_CHUNK = 32  # probe-batch sequences per forward/backward: bounds activation memory


def _draw(view: SequenceView, n: int, rng: np.random.Generator, pool: np.ndarray | None = None) -> np.ndarray:
    """n sequences of ``view`` (from the sample indices ``pool`` if given), without replacement
    while there are enough."""
    size = len(view) if pool is None else pool.size
    picked = rng.choice(size, size=n, replace=n > size)
    return view.get(np.sort(picked if pool is None else pool[picked]))


def mix_counts(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sequences per domain of a held-out mix of n sequences over k domains: n // k each, and one
    more for n % k distinct domains drawn at random, so every domain enters (equal counts when k
    divides n; with n < k, each sequence's domain is a random draw without replacement: the
    official ``mix`` target is a shuffled equal mix of every domain)."""
    counts = np.full(k, n // k, dtype=np.int64)
    counts[rng.choice(k, size=n % k, replace=False)] += 1
    return counts


def expand_references(names, data: DataBundle) -> tuple[str, ...]:
    """Reference names with the wildcards replaced: ``heldout:*`` by the held-out slice of every
    domain evaluation reports (those with a validation split; every domain when none has one), the
    eval-safe twin of ``valid:*``; ``target:*`` by every target set; ``valid:*`` by every
    validation split."""
    out: list[str] = []
    for name in names:
        if name == "heldout:*":
            out += [f"heldout:{d}" for d in ([d for d in data.domains if d in data.valid] or data.domains)]
        elif name == "target:*":
            if not data.targets:
                raise ConfigError("reference 'target:*': this data has no target sets")
            out += [f"target:{t}" for t in sorted(data.targets)]
        elif name == "valid:*":
            valid = [f"valid:{d}" for d in data.domains if d in data.valid]
            if not valid:
                raise ConfigError("reference 'valid:*': no domain has a validation split")
            out += valid
        else:
            out.append(name)
    return tuple(out)


def evaluation_overlap(names, data: DataBundle) -> list[str]:
    """Which (expanded) reference names draw from data that evaluation also reports: a steering
    signal graded on its own target. ``valid:<domain>`` is ``eval/<domain>/loss``'s split; a target
    set with only one split is steered and scored on that split."""
    out = []
    for name in names:
        kind, _, which = name.partition(":")
        if kind == "valid" and which in data.valid:
            out.append(f"{name} (reported as eval/{which}/loss)")
        elif kind == "target" and which in data.targets and set(data.targets[which]) != {"train", "valid"}:
            out.append(f"{name} (the target set has one split, reported as target/{which}/loss)")
    return out


def load_reference_model(run_dir: str, data: DataBundle, device: torch.device) -> torch.nn.Module:
    """The final model of a previous mixtrain run (DoReMi's reference), frozen."""
    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    ckpt = checkpoint.latest(run / "checkpoints")
    if not cfg_path.is_file() or ckpt is None:
        raise ConfigError(
            f"mixture.reference={run_dir!r} is not a finished mixtrain run (needs config.yaml and a checkpoint)"
        )
    saved = yaml.safe_load(cfg_path.read_text())
    meta_tok = checkpoint.load_meta(ckpt).get("fingerprint", {}).get("tokenizer")
    differs = None if meta_tok is None else identity_difference(meta_tok, data.tokenizer)
    if differs:
        raise ConfigError(
            f"mixture.reference={run_dir!r} was trained with another tokenizer than this run's data: {differs}"
        )
    return load_frozen(ModelConfig(**saved["model"]), ckpt, device)


@dataclass
class Measurement:
    """One step's measurement, from :meth:`Signals.begin` to :meth:`finish`.

    The engine reads ``probe`` (record per-domain gradient pieces in the training backward; None:
    not this step) and ``on_losses`` (a per-micro-batch hook on the training losses; None: none);
    the loop passes its micro-batches through :meth:`micro_batches` (which appends fused reference
    rows) and, after the backward, calls :meth:`finish` for the step's DomainStats with the
    requested fields filled (a new object: the one given is not changed)."""

    req: Request | None = None
    source: str = "in_batch"
    step: int = 0
    names: tuple[str, ...] = ()
    probe: Probe | None = None
    on_losses: Callable | None = None
    extra: list[torch.Tensor] | None = None  # fused reference rows, one batch per reference
    ref_norms: np.ndarray | None = None
    spec: ProbeSpec | None = None  # per-sample probes start once the probe batch is drawn
    refs: list | None = None
    signals: Signals | None = None
    using: Probe | None = None  # the probe this step's statistics come from (the full or the scoped one)

    def micro_batches(self, micro_batches: list) -> list:
        """The step's micro-batches with the fused reference rows appended to the last one (group
        K + r for reference r: after every domain, so the rows stay sorted)."""
        if not self.extra:
            return micro_batches
        from .engines import MicroBatch

        K, last = self.signals.K, micro_batches[-1]
        groups = [torch.full((len(t),), K + r, dtype=last.domains.dtype) for r, t in enumerate(self.extra)]
        tokens = torch.cat([last.tokens, *self.extra])
        return [*micro_batches[:-1], MicroBatch(tokens, torch.cat([last.domains, *groups]))]

    def finish(self, stats: DomainStats, loss_weights: np.ndarray, tokens_per_rank: int) -> DomainStats:
        """``stats`` (global token counts) with the requested fields filled."""
        if self.req is None:
            return stats
        fields = self.signals._fields(self, stats.tokens, loss_weights, tokens_per_rank)
        if "extra" in fields:
            fields["extra"] = {**stats.extra, **fields["extra"]}
        return dataclasses.replace(stats, **fields)


NOTHING = Measurement()
"""The measurement of a step that asks for none: no probe, no hook, stats unchanged."""


class ReferenceModel(Callback):
    """A frozen reference model a controller asks for (``Controller.reference_model``: DoReMi's),
    loaded once the engine has its device; the measurement reads it (``Request.ref_model_loss``).
    Stateless: a resumed run loads it again from its run directory."""

    def __init__(self, run_dir: str, data: DataBundle, device: torch.device):
        self.model = load_reference_model(run_dir, data, device)


@register
def _reference_model(loop) -> ReferenceModel | None:
    name = loop.controller.reference_model
    return ReferenceModel(name, loop.data, loop.engine.device) if name else None


class GradientRound(Callback):
    """Per-domain gradients summed over the steps of a round (``Request.accumulate``: R&B), as token
    sums: row k is Σ over the round's tokens of domain k of the token-loss gradient, over the
    probed parameters. Identical on every rank (each step's rows are reduced before they are
    added), so rank 0's copy in the checkpoint is everyone's, and a resumed run continues the round
    bit for bit."""

    name = "gradient_round"

    def __init__(self, K: int):
        self.K = K
        self.sum: torch.Tensor | None = None
        self.tokens = np.zeros(K)
        self.steps = 0

    @property
    def open(self) -> bool:
        return self.steps > 0

    def add(self, rows: torch.Tensor, factor: np.ndarray, tokens: np.ndarray) -> None:
        """Add one step's reduced rows times ``factor`` (per domain: rows -> token sums)."""
        part = rows * torch.as_tensor(factor, dtype=rows.dtype, device=rows.device).unsqueeze(1)
        # a sum loaded from a checkpoint is on the CPU until the first step adds to it
        self.sum = part if self.sum is None else self.sum.to(part.device).add_(part)
        self.tokens = self.tokens + tokens
        self.steps += 1

    def take(self) -> np.ndarray:
        """The Gram of the per-domain mean gradients over the round (NaN for a domain with no
        tokens in it); the round is closed."""
        present = self.tokens > 0
        mean = self.sum / torch.as_tensor(np.where(present, self.tokens, 1.0), dtype=self.sum.dtype).to(
            self.sum.device
        ).unsqueeze(1)
        out = gram(mean)
        out[~present, :] = np.nan
        out[:, ~present] = np.nan
        self.sum, self.tokens, self.steps = None, np.zeros(self.K), 0
        return out

    def state_dict(self) -> dict:
        return {
            "sum": None if self.sum is None else self.sum.detach().cpu().clone(),
            "tokens": torch.from_numpy(self.tokens.copy()),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.sum = state["sum"]
        self.tokens = state["tokens"].numpy().astype(np.float64)
        self.steps = int(state["steps"])


@register
def _gradient_round(loop) -> GradientRound | None:
    return GradientRound(loop.K) if loop.controller.accumulates else None


def final_block(model: torch.nn.Module) -> torch.nn.Module:
    """The last transformer block of a (possibly wrapped) decoder: what ``Request.params="final"``
    covers."""
    inner = model
    while not hasattr(inner, "blocks") and hasattr(inner, "module"):  # DDP, DeepSpeed
        inner = inner.module
    blocks = getattr(inner, "blocks", None)
    if not blocks:
        raise ConfigError(
            f"final-layer gradients need a decoder with .blocks; {type(inner).__name__} has none "
            "(set mixture.params=all)"
        )
    return blocks[-1]


class Signals:
    def __init__(
        self,
        engine,
        data: DataBundle,
        seed: int,
        probe_cfg,
        reference: torch.nn.Module | None,
        global_batch: int,
        grad_accum: int = 1,
        gradient_round: GradientRound | None = None,
    ):
        self.engine = engine
        self.global_batch = global_batch
        self.grad_accum = grad_accum
        self.data = data
        self.seed = seed
        self.K = len(data.domains)
        self.reference = reference
        self.probe_cfg = probe_cfg
        self.probe = Probe(engine.model, self.K, exact_budget_bytes=int(probe_cfg.exact_budget_mb) << 20)
        self._final: Probe | None = None  # scoped to the last block, built on first use
        self._attached = self.probe
        self.round = gradient_round
        self._excess = torch.zeros(2, self.K, dtype=torch.float64)

    # ---- reference gradients ----------------------------------------------------------------
    def _ref_batch(self, name: str, n: int, step: int, r: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, _REF_STREAM, step, r])
        if name == "heldout" or name.startswith("heldout:"):
            slices = self.data.reference
            if slices is None:
                raise RuntimeError(
                    f"reference {name!r} was not declared by the controller (Controller.references), "
                    "so no reference slice was held out of the training data"
                )
            if name == "heldout":
                counts = mix_counts(n, self.K, rng)
                return torch.from_numpy(
                    np.concatenate([_draw(v, int(c), rng, s) for v, s, c in zip(self.data.train, slices, counts) if c])
                )
            domain = name.split(":", 1)[1]
            if domain not in self.data.domains:
                raise ConfigError(f"reference {name!r}: no domain {domain!r}; domains: {self.data.domains}")
            d = self.data.domains.index(domain)
            return torch.from_numpy(_draw(self.data.train[d], n, rng, slices[d]))
        if name.startswith("valid:"):
            domain = name.split(":", 1)[1]
            if domain not in self.data.valid:
                raise ConfigError(
                    f"reference {name!r}: domain {domain!r} has no validation split; "
                    f"domains with one: {[d for d in self.data.domains if d in self.data.valid]}"
                )
            return torch.from_numpy(_draw(self.data.valid[domain], n, rng))
        if name.startswith("target:"):
            target = name.split(":", 1)[1]
            if target not in self.data.targets:
                raise ConfigError(
                    f"reference {name!r}: no target set {target!r}; available: {sorted(self.data.targets)}"
                )
            splits = self.data.targets[target]
            return torch.from_numpy(_draw(splits.get("train") or splits["valid"], n, rng))
        raise ConfigError(
            f"unknown reference gradient {name!r}; use 'heldout', 'heldout:<domain>', 'target:<name>', "
            "'valid:<domain>', 'heldout:*', 'target:*' or 'valid:*'"
        )

    def expand(self, names: tuple[str, ...]) -> tuple[str, ...]:
        return expand_references(names, self.data)

    def _ref_count(self, req: Request) -> int:
        """Sequences of each reference batch: the request's, or DoGE's b_T = max(4, B/(K + 1))."""
        return req.ref_sequences or max(4, self.global_batch // (self.K + 1))

    def _preconditioner(self) -> list[torch.Tensor] | None:
        """1 / (sqrt(v̂) + eps) per parameter from AdamW's bias-corrected second moments, or None
        before the first optimizer step (identity curvature then)."""
        opt = self.engine.optimizer
        inverse = []
        for group in opt.param_groups:
            beta2, eps = group["betas"][1], group["eps"]
            for p in group["params"]:
                state = opt.state.get(p, {})
                if "exp_avg_sq" not in state:
                    return None
                step = float(state["step"])
                second = state["exp_avg_sq"]
                second = second.full_tensor() if hasattr(second, "full_tensor") else second  # FSDP's shard
                v_hat = second / (1 - beta2**step)
                inverse.append((p, 1.0 / (v_hat.sqrt() + eps)))
        by_param = {id(p): d for p, d in inverse}
        return [by_param[id(p)] for p in self.probe.params]

    def _reference_gradients(
        self, names: tuple[str, ...], req: Request, step: int
    ) -> tuple[list[list[torch.Tensor]], np.ndarray]:
        refs, norms = [], []
        model = self.engine.model
        scale = self._preconditioner() if req.precondition else None
        for r, name in enumerate(names):
            batch = self._ref_batch(name, self._ref_count(req), step, r).to(self.engine.device)
            grads = self.probe.reference_gradient(token_losses(model, batch).mean())
            norms.append(float(torch.sqrt(self.probe.squared_norm(grads))))  # TP shards summed, replicas once
            if scale is not None:
                grads = [g * d for g, d in zip(grads, scale)]
            refs.append(grads)
        return refs, np.array(norms)

    def _probe_for(self, req: Request) -> Probe:
        """The probe covering ``req.params``, attached to the model's layers."""
        if req.params == "final":
            if req.align or req.grad_var:
                raise ValueError("Request.params='final' covers norms/Gram only, not alignments or variances")
            if self._final is None:
                model = self.engine.model
                budget = int(self.probe_cfg.exact_budget_mb) << 20
                self._final = Probe(model, self.K, exact_budget_bytes=budget, scope=final_block(model))
            probe = self._final
        elif req.params == "all":
            probe = self.probe
        else:
            raise ValueError(f"Request.params={req.params!r}; allowed: 'all', 'final'")
        if probe is not self._attached:
            probe.attach()
            self._attached = probe
        return probe

    def _variance(self, req: Request, source: str) -> str:
        """The probe's variance mode for ``req`` (probe.grad_var; "auto": pieces when the step has
        enough micro-batches over all ranks, else per sequence)."""
        if not req.grad_var:
            return ""
        mode = self.probe_cfg.grad_var
        if mode == "auto":
            pieces = self.grad_accum * self.probe.dp_size if source == "in_batch" else 0
            mode = "pieces" if pieces >= PIECES_FOR_VARIANCE else "sequence"
        return mode

    # ---- per step -----------------------------------------------------------------------------
    def begin(self, req: Request | None, step: int, batch_counts: np.ndarray | None = None) -> Measurement:
        """Work before the training backward (reference gradients, the probe's start); returns the
        step's measurement (:data:`NOTHING` when ``req`` asks for no gradient signal and no
        reference-model loss). ``batch_counts``: sequences per domain in the step's global batch
        (decides ``source="auto"``)."""
        if req is None or not (req.any_gradient or req.ref_model_loss):
            return NOTHING
        source = req.source
        if source == "auto":
            every = batch_counts is not None and np.all(np.asarray(batch_counts) > 0)
            # a sharded model (FSDP2) takes no probe batch: a domain the batch misses sits the step out
            source = "in_batch" if every or self.probe.sharded else "probe_batch"
        if source == "probe_batch" and self.probe.sharded:
            raise ConfigError(
                "a probe batch (mixture.source=probe_batch) is not supported on engine=fsdp: autograd "
                "cannot reach its sharded parameters; set mixture.source=in_batch or auto (the training "
                "batch; a domain it misses sits the update out)"
            )
        m = Measurement(req=req, source=source, step=step, signals=self)
        if req.ref_model_loss:
            if self.reference is None:
                raise ConfigError(
                    "the controller asks for reference-model losses but no mixture.reference model is loaded"
                )
            self._excess.zero_()
            m.on_losses = self._excess_hook
        if req.per_sample and (source != "probe_batch" or req.norms or req.gram or not req.align):
            raise ValueError("Request.per_sample needs source='probe_batch' and alignments only (no norms/Gram)")
        if not req.any_gradient:
            return m
        m.names = names = self.expand(req.align)
        m.using = probe = self._probe_for(req)
        m.probe = probe if source == "in_batch" else None
        rows = req.accumulate or (self.round is not None and self.round.open)
        if rows and (source != "in_batch" or req.align or req.grad_var or not (req.norms or req.gram)):
            raise ValueError("Request.accumulate sums norms/Gram of the training batch (source='in_batch') only")
        if rows and self.round is None:
            raise RuntimeError("Request.accumulate from a controller whose `accumulates` is False")
        fused = ProbeSpec(
            norms=True, gram=True, micro_batches=self._micro_batches(req, source), extra_groups=len(names)
        )
        if self._fuses(req, source, fused):
            # the references as rows of the training micro-batch: one forward/backward, their
            # alignments and norms Gram entries (finish); nothing gradient-sized is kept
            n = self._ref_count(req)
            m.extra = [self._ref_batch(name, n, step, r) for r, name in enumerate(names)]
            self.probe.start(fused)
            return m
        refs, m.ref_norms = self._reference_gradients(names, req, step)
        spec = ProbeSpec(
            refs=len(refs),
            norms=req.norms or req.gram or req.grad_var,
            gram=req.gram,
            sketch_dim=0 if rows else self.probe_cfg.sketch_dim,
            seed=(self.seed * 1_000_003 + step) & 0x7FFFFFFF,
            micro_batches=self._micro_batches(req, source),
            variance=self._variance(req, source),
            rows=rows,
        )
        if req.per_sample:  # started once the number of probe sequences is known
            m.spec, m.refs = spec, refs
        else:
            probe.start(spec, refs or None)
        return m

    def _fuses(self, req: Request, source: str, spec: ProbeSpec) -> bool:
        """Whether this step's references ride in the training micro-batch: alignments with norms
        (DoGE, DGA) measured in the training batch by the direct tier, on an engine that takes
        reference rows; not with Adam-preconditioned references (D⁻¹r is no gradient of a batch), nor
        with variances (the fused spec has none). Alignments already rule out the scoped probe and
        gradient rounds (both refused with them)."""
        return (
            source == "in_batch"
            and bool(req.align)
            and not req.grad_var
            and (req.norms or req.gram)
            and not req.precondition
            and not req.per_sample
            and self.engine.fuses_reference_rows
            and self.probe.direct_applies(spec)
        )

    def _micro_batches(self, req: Request, source: str) -> int:
        """Probed micro-batches this step on this rank: the engine's accumulation steps, or the probe
        batch's chunks."""
        if source == "in_batch":
            return self.grad_accum
        per_rank = -(-req.probe_sequences // self.probe.dp_size) * self.K
        return -(-per_rank // _PROBE_CHUNK)

    @torch.no_grad()
    def _excess_hook(self, tokens: torch.Tensor, domains: torch.Tensor, losses: torch.Tensor) -> None:
        """Per micro-batch (the engine's ``on_losses``): the excess loss over the reference model."""
        ref = frozen_token_losses(self.reference, tokens)
        excess = (losses.detach() - ref).clamp_min(0).double().sum(dim=1).cpu()
        self._excess[0].index_add_(0, domains.cpu(), excess)
        self._excess[1].index_add_(0, domains.cpu(), ref.double().sum(dim=1).cpu())

    def _probe_batch(self, req: Request, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``probe_sequences`` per domain (rounded up to a multiple of the ranks), split over ranks,
        rows sorted by domain. Returns this rank's tokens, their domains, their global sequence ids
        (domain-major, so also sorted) and the global number of sequences."""
        rng = np.random.default_rng([self.seed, _PROBE_STREAM, step])
        rank, world = self.probe.dp_rank, self.probe.dp_size  # TP ranks of a replica share its rows
        per_rank = -(-req.probe_sequences // world)
        per_domain = per_rank * world
        rows, doms, ids = [], [], []
        for d, view in enumerate(self.data.train):
            batch = _draw(view, per_domain, rng)[rank * per_rank : (rank + 1) * per_rank]
            rows.append(batch)
            doms.append(np.full(len(batch), d))
            ids.append(d * per_domain + rank * per_rank + np.arange(len(batch)))
        cat = lambda parts: torch.from_numpy(np.concatenate(parts))  # noqa: E731
        return cat(rows), cat(doms), cat(ids), per_domain * self.K

    def _run_probe_batch(self, m: Measurement) -> tuple[np.ndarray, np.ndarray | None]:
        """Forward/backward of the probe batch in chunks, without touching the training gradient;
        returns the per-group scale that turns summed token-loss gradients into token means, and
        (per-sample requests) each probed sequence's domain."""
        req = m.req
        tokens, doms, ids, n_global = self._probe_batch(req, m.step)
        groups = ids if req.per_sample else doms
        probe = m.using
        if req.per_sample:
            probe.start(m.spec, m.refs, groups=n_global)
        params = [p for p in self.engine.model.parameters() if p.requires_grad]
        for s in range(0, len(tokens), _PROBE_CHUNK):
            chunk = tokens[s : s + _PROBE_CHUNK].to(self.engine.device)
            with probe.micro_batch(groups[s : s + _PROBE_CHUNK]):
                losses = token_losses(self.engine.model, chunk)
                # autograd.grad, not backward: the probe sees every layer's backward while
                # .grad (the training gradient) and the engine's reduction hooks stay untouched.
                torch.autograd.grad(losses.sum(), params)
        seq_tokens = tokens.shape[1] - 1
        if req.per_sample:
            return np.full(n_global, 1.0 / seq_tokens), np.repeat(np.arange(self.K), n_global // self.K)
        n = probe.dp_sum(torch.bincount(doms, minlength=self.K).double() * seq_tokens).numpy()
        return 1.0 / np.where(n > 0, n, np.nan), None

    def _fields(self, m: Measurement, counts: np.ndarray, loss_weights: np.ndarray, tokens_per_rank: int) -> dict:
        """The DomainStats fields the request asked for (``counts``: global tokens per domain)."""
        req, out = m.req, {}
        if req.any_gradient and m.extra:
            ref_tokens = np.array([t.shape[0] * (t.shape[1] - 1) for t in m.extra], dtype=np.float64)
            scale = np.concatenate(
                [tokens_per_rank / np.where(counts > 0, loss_weights * counts, np.nan), tokens_per_rank / ref_tokens]
            )  # reference rows weigh 1 in the objective
            gram = self.probe.finish(scale).gram
            out["align"] = gram[: self.K, self.K :]
            out["ref_norms"] = np.sqrt(np.diag(gram)[self.K :])
            out["norms"] = np.sqrt(np.diag(gram)[: self.K]) if req.norms else None
            out["gram"] = gram[: self.K, : self.K] if req.gram else None
            out["align_names"] = m.names
        elif req.any_gradient:
            sample_domain = None
            if m.source == "probe_batch":
                scale, sample_domain = self._run_probe_batch(m)
            else:
                scale = tokens_per_rank / np.where(counts > 0, loss_weights * counts, np.nan)
            result = m.using.finish(scale)
            if result.rows is not None:  # a round: this step's token-sum gradients join the sum
                with np.errstate(divide="ignore"):
                    self.round.add(result.rows, tokens_per_rank / np.asarray(loss_weights, dtype=np.float64), counts)
                if req.accumulate:
                    return out
                G = self.round.take()
                result.gram = G if req.gram else None
                result.norms = np.sqrt(np.diag(G)) if req.norms else None
            out.update(align=result.align, norms=result.norms, gram=result.gram, grad_var=result.grad_var)
            if result.sequences is not None:
                out["extra"] = {"sequences": result.sequences}
            if req.per_sample:
                out.update(sample_align=result.align, sample_domain=sample_domain)
                # equal-length sequences: a domain's token-mean gradient is the mean of its sequences'
                out["align"] = np.stack([result.align[sample_domain == d].mean(axis=0) for d in range(self.K)])
            out["ref_norms"] = m.ref_norms
            out["align_names"] = m.names
        if req.ref_model_loss:
            total = dist.all_reduce_sum(self._excess.clone()).numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
                out["excess_loss"] = total[0] / counts
                out["ref_loss"] = total[1] / counts
        return out
