"""The training loop: one loop for every controller and engine.

    weights -> sampler.plan_shard -> steps (engine.forward_backward, optimizer_step)
            -> DomainStats (reduced over ranks) -> controller.update -> next shard's weights

New weights apply at the next shard boundary and are rank 0's, broadcast, so every rank samples
the same plan. This module keeps the shard/step/evaluation cycle; what a run is built from is
``trainer.build``, what it saves is one stateful map (``Loop.states``: ``trainer.checkpoint``),
its records are ``trainer.metrics``, its end-of-run files ``trainer.artifacts``, and optional
features (the online curriculum, fault injection, the logs) are callbacks (``trainer.callbacks``).
A resumed run replays the same shard plans and continues bit-exactly.

A curriculum (``curriculum=irreducible*``, ``trainer.curriculum``) changes only which samples of
each domain a shard takes (the sampler's within-domain order) and restricts the main run to the
non-holdout samples; the online variant adds a proxy model trained one step per main step.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
import torch

from mixtures import DomainStats

from . import artifacts, build, checkpoint, dist, metrics, resume, rundir
from .artifacts import RunResult
from .callbacks import stateful
from .config import Config
from .console import say
from .data.sampler import DataExhausted, DomainSampler
from .engines import MicroBatch
from .errors import Diverged
from .schedule import lr_at
from .signals import NOTHING, GradientRound, ReferenceModel, Signals
from .train_state import TrainState

__all__ = ["Diverged", "Loop", "RunResult", "lr_at", "run"]


class Loop:
    def __init__(self, cfg: Config):
        prepared = build.prepare(cfg)  # nothing is written yet
        for f in dataclasses.fields(prepared):
            setattr(self, f.name, getattr(prepared, f.name))
        self.state = TrainState(self.K)
        self.lock = rundir.RunLock(self.run_dir) if self.rank == 0 else None
        try:
            build.start(self)
        except BaseException:
            self.close()
            raise

    @property
    def states(self) -> dict:
        """Everything a restart needs besides the engine's own part, by name (the checkpoint's
        stateful map; ``engine`` writes and reads its part in its own format)."""
        return {"controller": self.controller, "loop": self.state, "sampler": self.cursor, **stateful(self.callbacks)}

    # ---- the counters and the shard in progress (what tests and benchmarks read) ---------------
    @property
    def step(self) -> int:
        return self.state.step

    @property
    def history(self) -> list[dict]:
        return self.state.history

    @property
    def plan(self):
        return self.cursor.plan

    @property
    def sampler(self) -> DomainSampler:
        return self.cursor.sampler

    # ---- the run directory --------------------------------------------------------------------
    def close(self) -> None:
        """Release the run directory (the job is over, or its launch was refused)."""
        if self.lock is not None:
            self.lock.release()

    def _save(self) -> None:
        resume.save(self)

    # ---- data ---------------------------------------------------------------------------------
    def _sync(self, v: np.ndarray) -> np.ndarray:
        """Rank 0's vector on every rank, bit for bit."""
        return dist.broadcast(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))).numpy()

    def _next_shard(self) -> None:
        weights = self.controller.weights
        if self.controller.adaptive:
            weights = self._sync(weights)
        score_fn = next((f for f in (cb.score_fn() for cb in self.callbacks) if f is not None), None)
        plan = self.cursor.next_shard(weights, score_fn=score_fn)
        rec = metrics.shard_record(self.step, plan, weights, self.data.domains)
        self.state.history.append(rec)
        for cb in self.callbacks:
            cb.on_shard(self, plan, rec)

    def _step_counts(self) -> np.ndarray:
        """Sequences per domain in this step's global batch (every rank's rows)."""
        pos = (self.step % self.cfg.data.steps_per_shard) * self.global_batch
        return np.bincount(self.plan.domains[pos : pos + self.global_batch], minlength=self.K)

    def _batch(self) -> list[MicroBatch]:
        t = self.cfg.train
        pos = (self.step % self.cfg.data.steps_per_shard) * self.global_batch
        tokens, doms = self.data.step_rows(self.plan, pos, self.global_batch, self.dp_rank, self.dp_size)
        out = []
        for m in range(t.grad_accum):
            r = slice(m * t.micro_batch, (m + 1) * t.micro_batch)
            order = np.argsort(doms[r], kind="stable")  # domain-contiguous rows (the probe's layout)
            out.append(MicroBatch(torch.from_numpy(tokens[r][order]), torch.from_numpy(doms[r][order])))
        return out

    # ---- evaluation ---------------------------------------------------------------------------
    def _eval_groups(self) -> dict[str, object]:
        groups = {metrics.eval_key(d): self.data.valid[d] for d in self.data.domains if d in self.data.valid}
        for name, splits in self.data.targets.items():
            groups[metrics.target_key(name)] = splits.get("valid") or splits.get("train")
        return groups

    def evaluate(self, per_sequence: bool = False):
        """Mean token loss of every evaluation group (``data.eval_sequences`` fixed sequences each,
        split over the data-parallel ranks), plus the token-weighted and macro averages over the
        domains. With ``per_sequence``, also {group: each sequence's mean token loss} (same order on
        every run of the same data: what paired comparisons between runs need)."""
        groups = self._eval_groups()
        if not groups:
            return ({}, {}) if per_sequence else {}
        indices = [view.eval_indices(self.cfg.data.eval_sequences) for view in groups.values()]
        sums = torch.zeros(sum(i.size for i in indices), dtype=torch.float64)
        mb, at = self.cfg.train.micro_batch, 0
        for view, idx in zip(groups.values(), indices):
            mine = np.arange(idx.size)[self.dp_rank :: self.dp_size]
            for s in range(0, mine.size, mb):
                rows = mine[s : s + mb]
                sums[at + rows] = self.engine.sequence_loss_sums(torch.from_numpy(view.get(idx[rows])))
            at += idx.size
        dist.all_reduce_sum(sums)  # every rank wrote its own sequences, zeros elsewhere
        seq = np.split(sums.numpy() / self.cfg.data.seq_len, np.cumsum([i.size for i in indices])[:-1])
        out = metrics.evaluation(list(groups), seq)
        return (out, dict(zip(groups, seq))) if per_sequence else out

    # ---- the loop -----------------------------------------------------------------------------
    @property
    def reference(self):
        """DoReMi's frozen reference model (its callback's), or None."""
        return next((cb.model for cb in self.callbacks if isinstance(cb, ReferenceModel)), None)

    @property
    def signals(self):
        """Measurement beyond per-domain losses, built on first use (static runs never pay for it)."""
        if self._signals is None:
            self._signals = Signals(
                self.engine,
                self.data,
                self.cfg.train.seed,
                self.cfg.probe,
                self.reference,
                self.global_batch,
                self.cfg.train.grad_accum,
                next((cb for cb in self.callbacks if isinstance(cb, GradientRound)), None),
            )
        return self._signals

    def _train_step(self, lr: float) -> tuple[dict, DomainStats]:
        """One optimizer step with the measurements the controller asked for (at the same θ)."""
        lw = np.asarray(self.controller.loss_weights, dtype=np.float64)
        req = self.controller.request(self.step) if self.controller.adaptive else None
        if self.controller.adaptive:
            lw = self._sync(lw)
        measuring = req is not None and (req.any_gradient or req.ref_model_loss)
        m = self.signals.begin(req, self.step, self._step_counts()) if measuring else NOTHING
        sums, counts = self.engine.forward_backward(
            m.micro_batches(self._batch()), torch.from_numpy(lw), self.K, probe=m.probe, on_losses=m.on_losses
        )
        reduced = dist.all_reduce_sum(torch.cat([sums, counts])).numpy()
        sums, counts = reduced[: self.K], reduced[self.K :]
        present = counts > 0
        stats = DomainStats(
            step=self.step,
            lr=lr,
            loss=np.where(present, sums / np.where(present, counts, 1), np.nan),
            tokens=counts,
            sample_weights=self.plan.weights.copy(),
            extra={"batch_sequences": self.global_batch},
        )
        t = self.cfg.train
        stats = m.finish(stats, lw, t.micro_batch * t.grad_accum * self.cfg.data.seq_len)
        bad = [d for d, ok in zip(self.data.domains, np.isfinite(stats.loss) | ~present) if not ok]
        if bad:  # never stepped: the parameters stay those of the last good step
            self._nonfinite(f"training loss not finite in {', '.join(bad)}", can_skip=self.engine.skips_nonfinite)
            self.engine.discard_gradients()
            gnorm = float("nan")
        else:
            gnorm = self.engine.optimizer_step(lr)  # an engine that skips_nonfinite did not step on a NaN norm
            if not np.isfinite(gnorm):
                self._nonfinite(
                    f"gradient norm {gnorm} with finite losses in every domain", can_skip=self.engine.skips_nonfinite
                )
            else:
                self.state.nonfinite_in_row = 0
        self.state.tokens_seen += counts
        learned = self.controller.mixture if self.controller.adaptive else None
        rec = metrics.step_record(
            self.step, lr, sums, counts, gnorm, stats, self.data.domains, self.plan.weights,
            self.state.tokens_seen, req, lw, learned,
        )  # fmt: skip
        return rec, stats

    def _nonfinite(self, what: str, can_skip: bool) -> None:
        """train.on_nonfinite: raise Diverged, or count a skipped step (and raise after too many)."""
        t = self.cfg.train
        self.state.nonfinite_in_row += 1
        n = self.state.nonfinite_in_row
        if t.on_nonfinite == "skip" and can_skip and n <= t.max_nonfinite:
            say(
                self.rank,
                f"warning: step {self.step}: {what}; update skipped "
                f"({n} in a row, train.max_nonfinite={t.max_nonfinite})",
            )
            return
        last = checkpoint.latest(self.ckpt_root)
        why = (
            "train.on_nonfinite=abort"
            if t.on_nonfinite == "abort"
            else f"{n} in a row > train.max_nonfinite={t.max_nonfinite}"
            if can_skip
            else f"engine={self.cfg.engine.name} has already stepped"
        )
        raise Diverged(
            f"the run diverged at step {self.step}: {what} ({why}); nothing of this step was saved, "
            f"the last good checkpoint is {last or 'none (no checkpoint was written yet)'}. "
            "Lower train.lr or raise train.warmup_steps, or set train.on_nonfinite=skip"
        )

    def train(self) -> RunResult:
        cfg, t = self.cfg, self.cfg.train
        for line in artifacts.banner(self):
            say(self.rank, line)
        from tqdm import tqdm

        bar = tqdm(
            total=t.steps,
            initial=self.step,
            disable=self.rank != 0 or not cfg.run.progress,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stdout,
            # a log file (SLURM, CI) gets a line every 15 s instead of one per step
            mininterval=0.1 if sys.stdout.isatty() else 15,
        )
        try:
            while self.step < t.steps and self.advance(bar):
                pass
        finally:
            bar.close()
        return self._finish()

    def advance(self, bar=None) -> bool:
        """One optimizer step with everything around it (a new shard at a boundary, the
        controller's update, logging, evaluation and checkpoints on their cadence); False, with
        nothing done, when the data ran out (data.exhaustion=stop)."""
        cfg, t = self.cfg, self.cfg.train
        if self.step % cfg.data.steps_per_shard == 0:
            try:
                self._next_shard()
            except DataExhausted as e:
                say(self.rank, f"stopping at step {self.step}: {e}")
                return False
        t0 = time.perf_counter()
        rec, stats = self._train_step(lr_at(self.step, t))
        rec[metrics.TOKENS_PER_SEC] = float(stats.tokens.sum() / (time.perf_counter() - t0))
        if self.controller.adaptive:  # controllers skip non-finite steps themselves
            rec.update(metrics.controller_metrics(self.controller.update(stats)))  # logged on the step they change
        for cb in self.callbacks:
            cb.on_step(self, rec, stats)
        self.state.step += 1
        if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
            results = {"step": self.step, **self.evaluate()}
            for cb in self.callbacks:
                cb.on_eval(self, results)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{rec['train/loss']:.3f}", tok_s=f"{rec[metrics.TOKENS_PER_SEC] or 0:.0f}", refresh=False
            )
        if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.steps:
            self._save()
        for cb in self.callbacks:
            cb.on_step_end(self)
        return True

    def _finish(self) -> RunResult:
        final_eval, per_sequence = self.evaluate(per_sequence=True)
        self._save()  # before the evaluation is logged: re-running a finished run logs it once, not twice
        final = np.asarray(self.controller.mixture)
        avg = self.controller.average_weights if self.controller.adaptive else final
        if self.history:
            self.history[-1]["end_step"] = self.step
        result = RunResult(self.run_dir, self.step, self.data.domains, final, np.asarray(avg), final_eval)
        if self.rank == 0:
            prefixes = [v.stream.prefix for v in self.data.train]
            artifacts.write(
                result,
                mixture=self.cfg.mixture["name"],
                run_id=self.run_id,
                prefixes=prefixes,
                per_sequence=per_sequence,
            )
        for cb in self.callbacks:
            cb.on_end(self, result)
        if self.rank == 0:
            if self.cfg.run.plots:
                from .plots import plot_run

                plot_run(self.run_dir, self.data.domains)
            exported = self.controller.exported if self.controller.adaptive else "fixed"
            say(0, artifacts.summary(result, self.state.tokens_seen, exported, self.steers_on_eval))
        return result


def run(cfg: Config) -> RunResult:
    loop = Loop(cfg)
    try:
        return loop.train()
    finally:
        loop.close()
