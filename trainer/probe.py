"""Per-domain gradient statistics inside the ordinary training backward (gradient-probe.md).

The probe-aware layers of ``trainer.models.layers`` split every weight gradient of a probed
micro-batch into per-domain pieces (their sum is the training gradient) and hand each piece to the
step's accumulators here. Every statistic is built from LINEAR maps of those pieces, so the state
adds up across micro-batches and data-parallel ranks with one all-reduce, and the non-linear part
(products) happens once, in ``finish``:

- alignments (Tier A): a[i, r] += <piece_i, ref_r>, K x R floats; all-reduce K·R floats;
- exact norms/Gram (Tier B): the pieces themselves, summed into K x P accumulators (one row per
  domain, all trainable parameters flattened); all-reduce K·P floats; Gram = A Aᵀ. The probe cannot
  tell whether more micro-batches (or ranks) will come, and the Gram of a sum is not the sum of
  Grams, so exact mode ALWAYS accumulates; alignments then come from A as well (A·Rᵀ);
- sketched norms/Gram (Tier C): CountSketch of every piece into K x m, all-reduce K·m floats,
  Gram ≈ S Sᵀ (unbiased). Used when asked for (sketch_dim > 0) or when K·P·4 bytes exceeds the
  exact budget.
- direct norms/Gram: when the step is ONE micro-batch on ONE data-parallel rank (``ProbeSpec.
  micro_batches == 1``), every domain's gradient is complete inside that backward, so each layer's
  products are taken as its pieces arrive: Gram += pieces piecesᵀ, a K x K float64 state, no
  K x P accumulators to fill, zero and read. A layer materialises all its domains' pieces at once
  (K x the parameter, within the exact budget). Tied weights need the cross terms between their
  uses (<head_i, emb_j>): the rows an embedding lookup touches are noted in the forward, and each
  use's parts on those rows are kept (K x rows x width) for the next use's cross terms.

- per-domain gradient variance (``ProbeSpec.variance``): σ_k², the trace of the covariance of
  single sequences' gradients, from the pieces of domain k's gradient the backward already
  materialises. Each piece j (a micro-batch on a rank, b_j of domain k's sequences; or, with
  "sequence", each sequence alone) has sum G_j; with n = Σ_j b_j and G = Σ_j G_j, the unbiased
  estimator is σ̂² = c² (Σ_j ‖G_j‖²/b_j − ‖G‖²/n) / (m − 1) over the m pieces, c turning piece
  sums into per-sequence gradients: with ḡ_j = cG_j/b_j and ḡ = cG/n, E‖ḡ_j‖² = ‖μ‖² + σ²/b_j
  and E‖ḡ‖² = ‖μ‖² + σ²/n, so E[Σ_j b_j‖ḡ_j‖² − n‖ḡ‖²] = (m − 1)σ²; with one piece per sequence
  it is the sample variance Σ_s ‖g_s − ḡ‖²/(n − 1). Σ_j ‖G_j‖²/b_j is linear in the pieces' squared
  norms, so it adds up over micro-batches and ranks with the other small accumulators; ‖G‖² is
  the norm tier's. A piece's squared norm is taken layer by layer as its parts arrive (a K-vector,
  or one float per sequence); a tied matrix's two uses need their cross term, taken on the table
  rows the piece's own lookups touched (noted in the forward).

Tied weights need no special case: both uses of the shared matrix (LM head and input embedding)
key into the same parameter slot, so their pieces land in the same accumulator row (exact), are
dotted with the same reference slice (alignment, linear) and hashed with the same sketch map; the
cross terms <emb_i, head_j> then appear in the products taken in ``finish``.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from . import dist
from .config import ConfigError
from .models.layers import ProbeAware, Tap, segment_sums


@dataclass
class ProbeSpec:
    refs: int = 0
    """Number of reference vectors to align with (Tier A)."""
    norms: bool = False
    """Per-domain ||g_i||."""
    gram: bool = False
    """K x K Gram <g_i, g_j>."""
    sketch_dim: int = 0
    """0 = exact norms/Gram (K x P accumulators while they fit the budget); > 0 = CountSketch of this
    total dimension m (Tier C; relative std of a squared norm <= sqrt(2/m))."""
    seed: int = 0
    """Sketch seed: the same on every rank, a new one every step."""
    micro_batches: int = 0
    """Probed micro-batches this step on this rank, when known (0 = unknown). With exactly one and
    one data-parallel rank, norms/Gram are taken directly in the backward (the direct tier)."""
    extra_groups: int = 0
    """Reference groups after the K domains (group ids K, K+1, ...): rows of the micro-batch whose
    pieces enter the products (a reference's alignments and norm are Gram entries) but never the
    training gradient. The direct tier only."""
    variance: str = ""
    """Per-domain gradient variance σ_k² (``ProbeResult.grad_var``; needs ``norms``): "" none,
    "pieces" (the pieces are the micro-batches on each rank: free, m = micro-batches x ranks), or
    "sequence" (every sequence its own piece: m = the domain's sequences; the layers then
    materialise one piece per sequence, chunked within the transient budget, and sum them into
    the domains' pieces, which every other tier, the direct one included, then takes as usual)."""
    rows: bool = False
    """Return the reduced exact K x P rows themselves (``ProbeResult.rows``, unscaled), e.g. to sum
    them over several steps; forces the exact tier (no sketch, no direct products)."""

    @property
    def products(self) -> bool:
        return self.norms or self.gram


@dataclass
class ProbeResult:
    align: np.ndarray | None = None
    """[K, R] <g_i, r_k>."""
    norms: np.ndarray | None = None
    """[K] ||g_i|| (not squared)."""
    gram: np.ndarray | None = None
    """[K, K] <g_i, g_j>."""
    sketch_dim: int = 0
    """0 when norms/Gram are exact, else the sketch dimension they were estimated with."""
    grad_var: np.ndarray | None = None
    """[K] σ_k², the per-sequence gradient variance of each domain (NaN with fewer than 2 pieces)."""
    pieces: np.ndarray | None = None
    """[K] how many pieces σ_k² was estimated from."""
    sequences: np.ndarray | None = None
    """[K] the sequences of each domain behind the statistics (with ``variance``): σ_k²/n_k is the
    part of ‖g_k‖² that is sampling noise, E‖g_k‖² = ‖∇L_k‖² + σ_k²/n_k."""
    rows: torch.Tensor | None = None
    """[K, P] the reduced exact rows (``ProbeSpec.rows``): a view valid until the next step starts."""


class _Slot(NamedTuple):
    """Where a trainable parameter lives in the flattened [P] gradient layout."""

    index: int
    offset: int
    numel: int
    width: int  # last dimension (row length for embedding tables)
    counted: bool = True  # False: a tensor-parallel replica another TP rank contributes (counted once)


class _Exact:
    """The K x P per-domain accumulators of exact norms/Gram, one buffer reused across steps. Rather
    than zeroing K·P floats every step, the first piece a (parameter, domain) pair receives is copied
    in and later ones are added; ``seal`` zeroes what nothing wrote (absent domains, unused layers)."""

    def __init__(self, buffer: torch.Tensor, slots: list[_Slot]):
        self.rows, self.slots = buffer, slots
        self.written: list[set[int]] = [set() for _ in slots]

    def block(self, slot: _Slot) -> torch.Tensor:
        return self.rows[:, slot.offset : slot.offset + slot.numel]

    def add(self, slot: _Slot, dom: int, piece: torch.Tensor) -> None:
        """rows[dom] += piece over this parameter's columns (piece flattened, any float dtype)."""
        target = self.block(slot)[dom]
        if dom in self.written[slot.index]:
            target.add_(piece)
        else:
            target.copy_(piece)
            self.written[slot.index].add(dom)

    def table(self, slot: _Slot, dom: int) -> torch.Tensor:
        """Domain ``dom``'s [rows, width] view of an embedding table's columns, zeroed on first use."""
        target = self.block(slot)[dom].view(-1, slot.width)
        if dom not in self.written[slot.index]:
            target.zero_()
            self.written[slot.index].add(dom)
        return target

    def seal(self) -> None:
        for slot in self.slots:
            block = self.block(slot)
            for dom in set(range(self.rows.shape[0])) - self.written[slot.index]:
                block[dom].zero_()


class _Direct:
    """Exact Gram of one micro-batch on one rank, taken layer by layer in the backward (the direct
    tier of the module docstring). ``rows``: per parameter slot, the sorted table rows its embedding
    lookups touched (noted in the forward); ``stash``: per such slot, the sum of the parts seen so far
    on those rows, [K, rows, width], for the cross terms of the next part of the same parameter."""

    def __init__(self, K: int, device):
        self.K = K
        self.gram = torch.zeros(K, K, dtype=torch.float64, device=device)
        self.rows: dict[int, torch.Tensor] = {}
        self.stash: dict[int, torch.Tensor] = {}

    def note_rows(self, slot: _Slot, ids: torch.Tensor) -> None:
        seen = torch.unique(ids.reshape(-1))
        if slot.index in self.rows:
            seen = torch.unique(torch.cat([self.rows[slot.index], seen]))
        self.rows[slot.index] = seen

    def _add(self, slot: _Slot, index: torch.Tensor, own: torch.Tensor, on_rows: torch.Tensor | None) -> None:
        """One part of a parameter's per-domain gradient: ``own`` its products with itself [k, k],
        ``on_rows`` the part on the slot's noted rows [k, rows, width] (None for an untied layer)."""
        cell = (index.unsqueeze(1), index.unsqueeze(0))
        self.gram[cell] += own
        if on_rows is None:
            return
        before = self.stash.get(slot.index)
        if before is not None:  # <part_i, earlier_j> + <earlier_i, part_j>
            cross = _products(on_rows.reshape(on_rows.shape[0], -1), before.reshape(self.K, -1))
            self.gram[index, :] += cross
            self.gram[:, index] += cross.T
        else:
            before = self.stash[slot.index] = on_rows.new_zeros(self.K, *on_rows.shape[1:])
        before.index_add_(0, index, on_rows)

    def dense(self, slot: _Slot, index: torch.Tensor, flat: torch.Tensor) -> None:
        rows = self.rows.get(slot.index)
        on_rows = None if rows is None else flat.view(flat.shape[0], -1, slot.width)[:, rows]
        self._add(slot, index, _products(flat, flat), on_rows)

    def sparse(
        self, slot: _Slot, index: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, bounds: list[int]
    ) -> None:
        rows = self.rows[slot.index]
        at = torch.searchsorted(rows, ids)
        compact = values.new_zeros(len(bounds) - 1, rows.numel(), slot.width)
        for j in range(len(bounds) - 1):
            compact[j].index_add_(0, at[bounds[j] : bounds[j + 1]], values[bounds[j] : bounds[j + 1]])
        flat = compact.reshape(compact.shape[0], -1)
        self._add(slot, index, _products(flat, flat), compact)


class _Squares:
    """Squared norms of the variance pieces of one micro-batch, summed over the layers as their parts
    arrive: a piece is one group the layers see (a domain block, or one sequence with
    ``variance="sequence"``). A tied matrix's parts meet on the table rows the piece's own lookups
    touched (``own``, noted in the forward; its dense part is zero nowhere else that matters): each
    later part adds 2<part, earlier parts> there (``stash``)."""

    def __init__(self, groups: int, device):
        self.sq = torch.zeros(groups, dtype=torch.float64, device=device)
        self.own: dict[int, list[torch.Tensor]] = {}
        self.stash: dict[int, list[torch.Tensor | None]] = {}

    def note_rows(self, slot: _Slot, ids: torch.Tensor, seq_bounds: list[int]) -> None:
        per_seq = ids.reshape(seq_bounds[-1], -1)
        seen = [torch.unique(per_seq[a:b]) for a, b in zip(seq_bounds[:-1], seq_bounds[1:])]
        if slot.index in self.own:  # a second lookup of the same table
            seen = [torch.unique(torch.cat([old, new])) for old, new in zip(self.own[slot.index], seen)]
        self.own[slot.index] = seen
        self.stash[slot.index] = [None] * len(seen)

    def _meet(self, slot: _Slot, g: int, part: torch.Tensor) -> None:
        earlier = self.stash[slot.index][g]
        if earlier is None:
            self.stash[slot.index][g] = part.float().clone()
        else:
            self.sq[g] += 2 * torch.dot(part.reshape(-1).float(), earlier.reshape(-1)).double()
            earlier += part

    def dense(self, slot: _Slot, first: int, pieces: torch.Tensor) -> None:
        flat = pieces.reshape(pieces.shape[0], -1).float()
        self.sq[first : first + flat.shape[0]] += _squared_norms(flat)
        for j, rows in enumerate(self.own.get(slot.index, [])[first : first + flat.shape[0]]):
            self._meet(slot, first + j, flat[j].view(-1, slot.width)[rows])

    def rows(self, slot: _Slot, ids: torch.Tensor, values: torch.Tensor, bounds: list[int]) -> None:
        own = self.own.get(slot.index)
        for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if a == b:
                continue
            touched, at = torch.unique(ids[a:b], return_inverse=True)
            part = values.new_zeros(touched.numel(), slot.width, dtype=torch.float32)
            part.index_add_(0, at, values[a:b].float())  # a row looked up twice is one row of the gradient
            self.sq[g] += _squared_norms(part.reshape(1, -1))[0]
            if own is not None:
                if own[g].numel() != touched.numel():  # the table's other lookups touched more rows
                    part = part.new_zeros(own[g].numel(), slot.width).index_copy_(
                        0, torch.searchsorted(own[g], touched), part
                    )
                self._meet(slot, g, part)


class _StepState:
    """The linear accumulators of one optimizer step (see the module docstring)."""

    def __init__(
        self,
        K: int,
        spec: ProbeSpec,
        refs: torch.Tensor | None,
        exact: _Exact | None,
        sketch_dim: int,
        device,
        layout=None,
        direct: _Direct | None = None,
    ):
        self.K, self.spec, self.refs, self.sketch_dim = K, spec, refs, sketch_dim
        self.layout = layout  # the model's tensor-parallel layout (Probe.layout), None without TP
        self.seqs = torch.zeros(K, device=device)
        self.micro_batches = 0
        self.exact = exact
        self.direct = direct
        self.align = (
            torch.zeros(K, spec.refs, dtype=torch.float64, device=device) if spec.refs and exact is None else None
        )
        self.sketch = torch.zeros(K, sketch_dim, device=device) if sketch_dim else None
        # variance: per micro-batch (squares, domain of each group, sequences of each group), folded
        # into q[k] = Σ_j ‖G_jk‖²/b_jk and the piece counts m[k] before the reduction
        self.squares: list[tuple[_Squares, torch.Tensor, torch.Tensor]] = []
        self.q = torch.zeros(K, dtype=torch.float64, device=device) if spec.variance else None
        self.m = torch.zeros(K, dtype=torch.float64, device=device) if spec.variance else None

    def _fold_squares(self) -> None:
        for squares, group_domain, sizes in self.squares:
            train = group_domain < self.K - self.spec.extra_groups
            self.q.index_add_(0, group_domain[train], squares.sq[train] / sizes[train])
            self.m.index_add_(0, group_domain[train], torch.ones_like(squares.sq[train]))
        self.squares = []

    def _refs_of(self, slot: _Slot) -> torch.Tensor:
        return self.refs[:, slot.offset : slot.offset + slot.numel]

    def _hash(self, slot: _Slot) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's CountSketch map of one parameter: a bucket in [0, m) and a ±1 sign per entry.
        Regenerated from (seed, parameter index) on demand rather than stored (8 bytes per parameter
        otherwise); identical on every rank and for both uses of a tied matrix."""
        device = self.sketch.device
        state = np.random.SeedSequence([self.spec.seed % (1 << 64), slot.index]).generate_state(1, np.uint64)[0]
        gen = torch.Generator(device=device).manual_seed(int(state))
        bucket = torch.randint(self.sketch_dim, (slot.numel,), generator=gen, device=device)
        sign = torch.randint(2, (slot.numel,), generator=gen, device=device).float().mul_(2).sub_(1)
        return bucket, sign

    def dense(self, slot: _Slot, doms: list[int], index: torch.Tensor, pieces: torch.Tensor) -> None:
        """Add dense pieces [k, *shape] of domains ``doms`` (the same as a tensor: ``index``) to every
        requested accumulator."""
        flat = pieces.reshape(pieces.shape[0], slot.numel)
        if self.exact is not None:
            for j, dom in enumerate(doms):
                self.exact.add(slot, dom, flat[j])
            return
        flat = flat.float()
        if self.align is not None:
            self.align.index_add_(0, index, _products(flat, self._refs_of(slot)))
        if self.direct is not None:
            self.direct.dense(slot, index, flat)
        if self.sketch is not None:
            bucket, sign = self._hash(slot)
            sketched = flat.new_zeros(flat.shape[0], self.sketch_dim).index_add_(1, bucket, flat * sign)
            self.sketch.index_add_(0, index, sketched)

    def rows(
        self,
        slot: _Slot,
        doms: list[int],
        index: torch.Tensor,
        ids: torch.Tensor,
        values: torch.Tensor,
        bounds: list[int],
    ) -> None:
        """Add embedding pieces: domain doms[j]'s piece scatters values[b[j]:b[j+1]] into the table rows
        ids[b[j]:b[j+1]] (b = bounds); only the touched rows are read or written."""
        values = values.float()
        if self.exact is not None:
            for j, dom in enumerate(doms):
                self.exact.table(slot, dom).index_add_(
                    0, ids[bounds[j] : bounds[j + 1]], values[bounds[j] : bounds[j + 1]]
                )
            return
        if self.align is not None:
            ref_rows = self._refs_of(slot).view(self.spec.refs, -1, slot.width)[:, ids]  # [R, n, d]
            # per token an fp32 dot over one row (d terms), summed over the tokens in float64
            per_token = torch.einsum("rnd,nd->nr", ref_rows, values).double()
            self.align.index_add_(0, index, segment_sums(per_token, bounds))
        if self.direct is not None:
            self.direct.sparse(slot, index, ids, values, bounds)
        if self.sketch is not None:
            bucket, sign = self._hash(slot)
            buckets = bucket.view(-1, slot.width)[ids]
            signed = values * sign.view(-1, slot.width)[ids]
            for j, dom in enumerate(doms):
                s, e = bounds[j], bounds[j + 1]
                self.sketch[dom].index_add_(0, buckets[s:e].reshape(-1), signed[s:e].reshape(-1))

    def all_reduce(self) -> None:
        """Sum the state over data-parallel ranks: the small accumulators in one collective, the exact
        K x P ones (only present when exact norms/Gram were asked for) in a second."""
        if self.q is not None:
            self._fold_squares()
        small = [t for t in (self.align, self.sketch, self.q, self.m) if t is not None]
        flat = torch.cat([self.seqs.double()] + [t.reshape(-1).double() for t in small])
        dist.all_reduce_sum(flat)
        self.seqs.copy_(flat[: self.K])
        at = self.K
        for t in small:
            t.view(-1).copy_(flat[at : at + t.numel()])
            at += t.numel()
        if self.exact is not None:
            self.exact.seal()
            if self.layout is None:
                dist.all_reduce_sum(self.exact.rows)
            else:  # each TP rank's rows cover its own shard: summed over its data-parallel peers only
                self.layout.dp_sum(self.exact.rows)


class _MicroBatch:
    """The Recording the probe-aware layers see for one micro-batch (see layers.Recording).

    The groups the layers split by are the micro-batch's domain blocks, or, with
    ``variance="sequence"``, its sequences: each layer then hands over one piece per sequence,
    whose squared norms the variance takes before the pieces of a domain are summed for the other
    statistics."""

    def __init__(self, probe: Probe, state: _StepState, seq_domains: torch.Tensor):
        seq = seq_domains.detach().to("cpu", torch.int64).reshape(-1)
        if seq.numel() == 0:
            raise ValueError("micro_batch() needs at least one sequence")
        if bool((seq[1:] < seq[:-1]).any()) or int(seq.min()) < 0 or int(seq.max()) >= state.K:
            raise ValueError(f"seq_domains must be sorted ascending in [0, {state.K}); got {seq.tolist()}")
        counts = torch.bincount(seq, minlength=state.K)
        state.micro_batches += 1
        if state.direct is not None and state.micro_batches > 1:
            raise RuntimeError(
                "a second probed micro-batch in a step started with ProbeSpec.micro_batches=1: "
                "the direct norms/Gram of the first are already taken"
            )
        if probe.counts_sequences:
            state.seqs += counts.to(state.seqs)
        self.probe, self.state, self.sequences = probe, state, seq.numel()
        self.domains = torch.nonzero(counts).flatten().tolist()
        self.seq_bounds = [0] + torch.cumsum(counts[self.domains], 0).tolist()
        self.device = probe.device
        self.domains_t = torch.tensor(self.domains, device=self.device)
        self.per_sequence = state.spec.variance == "sequence"
        if self.per_sequence:
            self.group_domain = seq.tolist()
            self.group_bounds = list(range(seq.numel() + 1))
        else:
            self.group_domain = self.domains
            self.group_bounds = self.seq_bounds
        self.train_groups = sum(1 for d in self.group_domain if d < probe.K)
        self.domain_index = {d: i for i, d in enumerate(self.domains)}
        self._pending: torch.Tensor | None = None
        self.squares = None
        if state.spec.variance:
            self.squares = _Squares(len(self.group_domain), self.device)
            group_domain = torch.tensor(self.group_domain, device=self.device)
            sizes = torch.diff(torch.tensor(self.group_bounds, device=self.device)).double()
            state.squares.append((self.squares, group_domain, sizes))
        self._bounds: dict[int, list[int]] = {}

    def slot(self, param):
        return None if param is None or not param.requires_grad else self.probe.slot_of(param)

    def bounds(self, rows: int) -> list[int]:
        if rows not in self._bounds:
            per_seq, rest = divmod(rows, self.sequences)
            if rest:
                raise ValueError(
                    f"a probed activation has {rows} rows, not a multiple of the {self.sequences} sequences"
                )
            self._bounds[rows] = [s * per_seq for s in self.group_bounds]
        return self._bounds[rows]

    def chunk(self, numel: int) -> int:
        if self.state.direct is not None and not self.per_sequence:
            # products between every pair of domains need them all at once (per sequence, the
            # domains' sums are complete after the last chunk: ``dense``)
            return len(self.domains)
        return max(1, self.probe.transient_bytes // (4 * numel))

    def note_rows(self, slot, ids: torch.Tensor) -> None:
        if slot is None or not slot.counted:
            return
        if self.state.direct is not None:
            self.state.direct.note_rows(slot, ids)
        if self.squares is not None and slot.index in self.probe.tied:
            self.squares.note_rows(slot, ids, self.group_bounds)

    def workspace(self, k: int, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        return self.probe.workspace(k * shape.numel(), like).view(k, *shape)

    def _open_state(self) -> _StepState:
        """The step this micro-batch belongs to, refusing a backward that arrives after finish()."""
        if self.probe._state is not self.state:
            raise RuntimeError("a probed micro-batch's backward ran after Probe.finish() of its step")
        return self.state

    def dense(self, slot, first: int, pieces: torch.Tensor) -> None:
        if not slot.counted:
            return
        state, k = self._open_state(), pieces.shape[0]
        if self.squares is not None:
            self.squares.dense(slot, first, pieces)
        if not self.per_sequence:
            state.dense(slot, self.domains[first : first + k], self.domains_t[first : first + k], pieces)
            return
        # the chunk's sequences summed into their domains' pieces, handed over once all have come: the
        # other statistics (the direct tier's products in particular) see whole domain pieces
        if first == 0:
            self._pending = pieces.new_zeros(len(self.domains), *pieces.shape[1:], dtype=torch.float32)
        for j in range(k):
            self._pending[self.domain_index[self.group_domain[first + j]]] += pieces[j]
        if first + k == len(self.group_domain):
            pending, self._pending = self._pending, None
            state.dense(slot, self.domains, self.domains_t, pending)

    def rows(self, slot, ids, values, bounds) -> None:
        if not slot.counted:
            return
        state = self._open_state()
        if self.squares is not None:
            self.squares.rows(slot, ids, values, bounds)
        if self.per_sequence:  # domain d's rows start at its first sequence's
            bounds = [bounds[g] for g in self.seq_bounds]
        state.rows(slot, self.domains, self.domains_t, ids, values, bounds)


def _full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's real shape: DeepSpeed's ZeRO-3 keeps a partitioned parameter's as ``ds_shape``
    (``p.shape`` is (0,) between uses); the pieces and gradients the probe sees are full-shaped."""
    return torch.Size(getattr(p, "ds_shape", p.shape))


def _products(a: torch.Tensor, b: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """a @ bᵀ (float64) for long rows: fp32 partial products over blocks of ``block`` columns (one
    batched GEMM), summed in float64. A single fp32 GEMM over millions of columns loses up to ~1e-4
    relative (measured: 1.3e-4 for a piece aligned with its reference at GPT-2-small width), more
    than the exact tiers allow (gradient-probe.md P5: 1e-5); this keeps ~1e-7 at fp32 speed. Every
    tier goes through it (alignments of Tier A per parameter, exact rows' products)."""
    whole = a.shape[1] // block * block
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    if whole:
        ab = a[:, :whole].unflatten(1, (-1, block)).transpose(0, 1)
        bb = b[:, :whole].unflatten(1, (-1, block)).transpose(0, 1)
        out += torch.bmm(ab, bb.transpose(1, 2)).double().sum(0)
    if whole < a.shape[1]:
        out += (a[:, whole:] @ b[:, whole:].T).double()
    return out


def gram(rows: torch.Tensor) -> np.ndarray:
    """rows rowsᵀ in float64 (numpy), with the blocked fp32 products of :func:`_products`."""
    return _products(rows, rows).cpu().numpy()


def _squared_norms(rows: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """‖row‖² (float64) of each row: fp32 norms of ``block``-column pieces, squared and summed in
    float64. One fp32 norm over a K x P row loses precision with P (measured 7e-4 relative at 7.2M
    parameters, ~1e-2 at 85M); the pieces' norms need no K x P temporary."""
    whole = rows.shape[1] // block * block
    out = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    if whole:
        out += (torch.linalg.vector_norm(rows[:, :whole].unflatten(1, (-1, block)), dim=2).double() ** 2).sum(1)
    if whole < rows.shape[1]:
        out += torch.linalg.vector_norm(rows[:, whole:], dim=1).double() ** 2
    return out


class Probe:
    """Per-domain gradient statistics of a model built from probe-aware layers.

    Per optimizer step: ``start(spec, refs)``, then one ``with micro_batch(seq_domains):`` around each
    micro-batch's forward and backward, then ``finish(domain_scale)`` (a collective under DDP: every
    rank calls it). ``reference_gradient`` computes a reference vector without touching the training
    gradient. Memory: R·P floats for the references during a step; K·P floats for exact norms/Gram,
    allocated on first use and kept between steps (no per-step allocation or zeroing); K·m for a
    sketch; a transient of at most ``transient_bytes`` per layer for the dense pieces.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        num_domains: int,
        *,
        exact_budget_bytes: int = 512 << 20,
        fallback_sketch_dim: int = 4096,
        transient_bytes: int = 64 << 20,
        scope: torch.nn.Module | None = None,
    ):
        """``fallback_sketch_dim``: sketch dimension used when exact norms/Gram exceed the budget and
        the spec asked for exact; ``transient_bytes``: cap on the dense pieces a layer materialises at
        once (it then processes its domains in chunks); ``scope``: a submodule of ``model`` (e.g. its
        last block) whose parameters alone the statistics cover: the layers outside it keep the stock
        backward. Several probes may share a model; :meth:`attach` hands the layers to one."""
        if isinstance(model, DistributedDataParallel):
            model = model.module
        # Tensor parallelism (engine=megatron: ``MegatronGPT.parallel_layout``): pieces cover this
        # rank's shard; replicated parameters are counted on TP rank 0 only, so sums over every rank
        # (alignments) and TP sums of local products (norms/Gram over DP-reduced rows) are exact.
        self.layout = getattr(model, "parallel_layout", None)
        tp = self.layout is not None and self.layout.tp_size > 1
        self.counts_sequences = not tp or self.layout.tp_rank == 0
        self.K = num_domains
        self.exact_budget_bytes = exact_budget_bytes
        self.fallback_sketch_dim = fallback_sketch_dim
        self.transient_bytes = transient_bytes
        within = model if scope is None else scope
        self.params = [p for p in within.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the probe's scope has no trainable parameters")
        self.device = self.params[0].device
        self._slots: dict[int, _Slot] = {}
        offset = 0
        for i, p in enumerate(self.params):
            shape = _full_shape(p)  # not p.shape: (0,) for a partitioned ZeRO-3 parameter
            self._slots[id(p)] = _Slot(i, offset, shape.numel(), shape[-1], not tp or self.layout.counted_here(p))
            offset += shape.numel()
        self.P = offset
        self._tap = Tap()
        self._layers = [m for m in within.modules() if isinstance(m, ProbeAware)]
        covered = set()
        # (layer, attribute) -> slot: FSDP2 swaps a layer's sharded parameter for a gathered one during
        # its forward and backward, which ``slot_of`` then finds by where it sits
        self._places: dict[tuple[int, str], _Slot] = {}
        for m in self._layers:
            m._tap = self._tap
            covered.update(id(p) for p in m.parameters(recurse=False))
            for name, p in m.named_parameters(recurse=False):
                if id(p) in self._slots:
                    self._places[(id(m), name)] = self._slots[id(p)]
        self._sharded = any(hasattr(p, "full_tensor") for p in self.params)
        missing = [n for n, p in within.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise ValueError(f"parameters outside probe-aware layers would be missing from every statistic: {missing}")
        # The direct tier keeps a parameter's earlier parts only on the rows embedding lookups touch,
        # so it is exact when a parameter has at most one dense (non-lookup) use; a weight shared by
        # two linear layers would need K x P after all.
        dense_uses: dict[int, int] = {}
        for m in self._layers:
            if not isinstance(m, torch.nn.Embedding):
                for p in m.parameters(recurse=False):
                    dense_uses[id(p)] = dense_uses.get(id(p), 0) + 1
        self._direct_ok = all(n <= 1 for n in dense_uses.values()) and not tp
        tables = [m for m in self._layers if isinstance(m, torch.nn.Embedding)]
        looked_up = {id(p) for m in tables for p in m.parameters(recurse=False)}
        # slot indices of matrices used both as a lookup table and densely (tied embedding and head)
        self.tied = {self._slots[i].index for i in looked_up if i in dense_uses and i in self._slots}
        self._largest = max(_full_shape(p).numel() for p in self.params)
        self._state: _StepState | None = None
        self._exact_rows: torch.Tensor | None = None  # K x P, allocated on first use, kept between steps
        self._workspace: dict[tuple, torch.Tensor] = {}  # (dtype, device) -> the layers' buffer for dense pieces
        self._warned = False

    @property
    def sharded(self) -> bool:
        """Whether the parameters are FSDP2 shards (autograd.grad cannot reach them)."""
        return self._sharded

    def attach(self) -> None:
        """Point this probe's layers at it again (after another probe on the same model used them)."""
        for m in self._layers:
            m._tap = self._tap

    def workspace(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A flat buffer of at least ``numel`` entries for a layer's dense pieces, kept between layers
        and steps. The pieces are consumed inside the layer's backward (copied, reduced or summed),
        and a fresh allocation of that size every layer and step costs more in page faults than the
        products taken from it (measured 0.17 s per 463 MB on CPU, 2-3% of a step)."""
        key = (like.dtype, like.device)
        buf = self._workspace.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._workspace[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel]

    def slot_of(self, param: torch.Tensor) -> _Slot:
        slot = self._slots.get(id(param))
        if slot is None:
            # a gathered FSDP parameter: persistent across steps, so found once and kept
            slot = next(
                (
                    self._places[(id(m), name)]
                    for m in self._layers
                    for name, p in m._parameters.items()
                    if p is param and (id(m), name) in self._places
                ),
                None,
            )
            if slot is None:
                raise ValueError(
                    "a probed layer's parameter is not among the probe's trainable parameters "
                    "(created or unfrozen after the Probe?)"
                )
            self._slots[id(param)] = slot
        return slot

    def reference_gradient(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """Gradient of ``loss`` w.r.t. every trainable parameter (model.parameters() order) via
        torch.autograd.grad: nothing is accumulated into .grad and no DDP hook fires (those sit on the
        gradient-accumulation nodes). Compute ``loss`` with the UNWRAPPED module, outside micro_batch()."""
        if self._tap.current is not None:
            raise RuntimeError(
                "reference_gradient() inside micro_batch(): its forward would be recorded as training data"
            )
        if self._sharded:
            return self._sharded_reference_gradient(loss)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return [p.new_zeros(_full_shape(p)) if g is None else g for p, g in zip(self.params, grads)]

    def _sharded_reference_gradient(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """FSDP2: autograd cannot reach a sharded parameter (the graph holds the gathered one), so
        the reference takes an ordinary backward, whose reduce-scatter averages the gradients of the
        identical reference batch on every rank, gathers the shards and clears ``.grad`` again. It
        must run before the step's training backward, with no gradient accumulated."""
        if any(p.grad is not None for p in self.params):
            raise RuntimeError("a sharded reference gradient needs empty .grad (call it before the training backward)")
        loss.backward()
        grads = [
            torch.zeros(_full_shape(p), device=self.device) if p.grad is None else p.grad.full_tensor()
            for p in self.params
        ]
        for p in self.params:
            p.grad = None
        return grads

    def _tp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of per-shard partial products over the tensor-parallel group (identity without TP).
        Only exact rows reach it: their replicated columns are zero on TP ranks other than 0."""
        return t if self.layout is None else self.layout.tp_sum(t)

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel position (TP ranks of one replica share it)."""
        if self.layout is not None:
            return self.layout.dp_rank
        return torch.distributed.get_rank() if dist.active() else 0

    @property
    def dp_size(self) -> int:
        if self.layout is not None:
            return self.layout.dp_size
        return torch.distributed.get_world_size() if dist.active() else 1

    def dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a per-replica quantity (e.g. probe-batch token counts) over data-parallel ranks."""
        return dist.all_reduce_sum(t) if self.layout is None else self.layout.dp_sum(t)

    def squared_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """||g||² (float64 scalar) of a gradient list in ``self.params`` order, identical on every rank
        of a replica: shards summed over the TP group, replicated parameters counted once."""
        sq = sum(
            ((g.double() ** 2).sum() for g, p in zip(grads, self.params) if self._slots[id(p)].counted),
            torch.zeros((), dtype=torch.float64, device=self.device),
        )
        return self._tp_sum(sq.reshape(1)).reshape(())

    def _exact_fits(self) -> bool:
        return self.K * self.P * 4 <= self.exact_budget_bytes

    def start(
        self, spec: ProbeSpec, refs: list[list[torch.Tensor]] | None = None, *, groups: int | None = None
    ) -> None:
        """Begin an optimizer step's statistics; refs[r] is a full gradient-shaped list (same order as
        the parameters) and must be identical on every rank. ``groups`` replaces the number of domains
        for this step, for alignments only (per-sequence alignments: one group per sequence)."""
        refs = refs or []
        K = (self.K if groups is None else int(groups)) + spec.extra_groups
        if groups is not None and spec.products:
            raise ValueError("groups= other than the probe's domain count works for alignments only, not norms/Gram")
        if spec.extra_groups and not self.direct_applies(spec):
            raise ValueError(
                "ProbeSpec.extra_groups (reference rows in the training micro-batch) needs the direct "
                "tier: norms/Gram, one micro-batch on one rank, within the exact budget"
            )
        if len(refs) != spec.refs:
            raise ValueError(f"spec.refs={spec.refs} but {len(refs)} reference vectors were given")
        if spec.variance not in ("", "pieces", "sequence"):
            raise ValueError(f"ProbeSpec.variance={spec.variance!r}; allowed: '', 'pieces', 'sequence'")
        if spec.variance and not spec.norms:
            raise ValueError("ProbeSpec.variance needs norms (σ² subtracts the mean gradient's squared norm)")
        if spec.variance and self.layout is not None and self.layout.tp_size > 1:
            raise ConfigError(
                "per-domain gradient variance is not supported under tensor parallelism "
                f"(engine.megatron.tensor_parallel={self.layout.tp_size}): use tensor_parallel=1"
            )
        for r in refs:
            if len(r) != len(self.params) or any(t.shape != _full_shape(p) for t, p in zip(r, self.params)):
                raise ValueError("a reference vector must have one tensor per trainable parameter, shaped like it")
        flat_refs = (
            torch.stack([torch.cat([t.detach().reshape(-1).float() for t in r]) for r in refs]).to(self.device)
            if refs
            else None
        )
        direct = _Direct(K, self.device) if self.direct_applies(spec) else None
        exact = spec.products and spec.sketch_dim == 0 and direct is None and self._exact_fits()
        if spec.rows and not exact:
            raise ConfigError(
                f"the per-domain gradient rows need exact K x P accumulators: {self.K * self.P * 4 / 2**20:.0f} MiB, "
                f"over probe.exact_budget_mb={self.exact_budget_bytes >> 20} (raise it; probe.sketch_dim must be 0)"
            )
        if spec.products and not exact and direct is None and self.layout is not None and self.layout.tp_size > 1:
            # every TP rank would hash its own shard with the same per-parameter map: correlated
            # buckets across shards, a biased estimate. Refused rather than wrong.
            raise ConfigError(
                f"sketched norms/Gram are not supported under tensor parallelism (engine.megatron.tensor_parallel="
                f"{self.layout.tp_size}); set probe.sketch_dim=0 and raise probe.exact_budget_mb to at least "
                f"{-(-self.K * self.P * 4 // 2**20)} (exact K x P accumulators of this rank's shard)"
            )
        sketch_dim = 0
        if spec.products and not exact and direct is None:
            sketch_dim = spec.sketch_dim or self.fallback_sketch_dim
            if spec.sketch_dim == 0 and not self._warned:
                warnings.warn(
                    f"exact norms/Gram need K·P·4 = {self.K * self.P * 4 / 2**20:.0f} MiB of accumulators, over the "
                    f"{self.exact_budget_bytes / 2**20:.0f} MiB budget: sketching them (m = {sketch_dim})",
                    stacklevel=2,
                )
                self._warned = True
        if exact and self._exact_rows is None:
            self._exact_rows = torch.empty(self.K, self.P, device=self.device)
        accumulators = _Exact(self._exact_rows, list(self._slots.values())) if exact else None
        self._state = _StepState(K, spec, flat_refs, accumulators, sketch_dim, self.device, self.layout, direct)

    def direct_applies(self, spec: ProbeSpec) -> bool:
        """Whether ``spec``'s exact norms/Gram are taken by the direct tier: one micro-batch on one
        data-parallel rank, no tensor parallelism, no parameter shared by two dense layers, and one
        layer's pieces of every domain (K x its largest parameter) within the exact budget."""
        groups = self.K + spec.extra_groups
        return (
            spec.products
            and not spec.rows
            and spec.sketch_dim == 0
            and spec.micro_batches == 1
            and self.dp_size == 1
            and self._direct_ok
            and groups * self._largest * 4 <= self.exact_budget_bytes
        )

    @contextlib.contextmanager
    def micro_batch(self, seq_domains: torch.Tensor):
        """While active, forward passes through the probe-aware layers record this micro-batch's domain
        blocks (seq_domains[b] sorted ascending: the domain of each row of a [b, T] batch), and their
        backward (inside or after the block) adds the per-domain pieces to this step's statistics."""
        if self._state is None:
            raise RuntimeError("Probe.micro_batch() before start()")
        if self._tap.current is not None:
            raise RuntimeError("Probe.micro_batch() blocks do not nest")
        if any(m._tap is not self._tap for m in self._layers):
            raise RuntimeError("another Probe has been attached to this model since; use that one")
        recording = _MicroBatch(self, self._state, seq_domains)
        spec = self._state.spec
        if spec.refs or spec.products:  # an empty spec leaves the layers on the stock path
            self._tap.set(recording)
        try:
            yield
        finally:
            self._tap.set(None)

    def finish(self, domain_scale: np.ndarray) -> ProbeResult:
        """Reduce over micro-batches and ranks; statistics of v_i = domain_scale[i] · (sum over
        micro-batches and ranks of domain i's pieces). NaN rows/entries for domains absent everywhere."""
        scale = np.asarray(domain_scale, dtype=np.float64).reshape(-1)
        state, self._state = self._state, None
        if state is None:
            raise RuntimeError("Probe.finish() before start()")
        if scale.shape != (state.K,):
            raise ValueError(f"domain_scale has {scale.size} entries, expected {state.K}")
        state.all_reduce()
        scale = np.where(state.seqs.cpu().numpy() > 0, scale, np.nan)
        spec, out = state.spec, ProbeResult(sketch_dim=state.sketch_dim)
        rows = state.exact.rows if state.exact is not None else state.sketch
        if spec.refs:
            raw = self._tp_sum(_products(rows, state.refs)) if state.exact is not None else state.align
            out.align = scale[:, None] * raw.cpu().numpy()
        squared = None
        if spec.products and state.direct is not None:
            raw = state.direct.gram.cpu().numpy()
            out.gram = np.outer(scale, scale) * raw if spec.gram else None
            squared = np.diag(raw)
        elif spec.products:
            if spec.gram:
                raw = self._tp_sum(_products(rows, rows)).cpu().numpy()
                out.gram = np.outer(scale, scale) * raw
                squared = np.diag(raw)
            else:
                squared = self._tp_sum(_squared_norms(rows)).cpu().numpy()
        if spec.norms:
            out.norms = np.abs(scale) * np.sqrt(squared)
        if spec.variance:
            train = slice(0, state.K - spec.extra_groups)
            n = state.seqs.double().cpu().numpy()[train]
            q, m = state.q.cpu().numpy()[train], state.m.cpu().numpy()[train]
            with np.errstate(invalid="ignore", divide="ignore"):
                var = scale[train] ** 2 * (n**2 * q - n * squared[train]) / (m - 1)
            out.grad_var, out.pieces, out.sequences = np.where(m >= 2, var, np.nan), m, n
        if spec.rows:
            out.rows = state.exact.rows
        return out
