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
from pathlib import Path

import numpy as np
import torch
import yaml

from mixtures import DomainStats

from . import artifacts, build, checkpoint, dist, metrics, rundir
from .artifacts import RunResult
from .callbacks import FACTORIES, Callback, stateful
from .config import Config, ConfigError
from .console import say
from .curriculum import online as _online  # noqa: F401  (registers the online curriculum's callback)
from .data.domains import load_data
from .data.reference import reference_slice, uses_heldout, without
from .data.sampler import DataExhausted, DomainSampler
from .engines import MicroBatch, build_engine, checkpoint_format
from .errors import Diverged
from .schedule import lr_at
from .signals import NOTHING, Signals, evaluation_overlap, expand_references
from .tracking import Tracker
from .train_state import ShardCursor, TrainState, upgrade

__all__ = ["Diverged", "Loop", "RunResult", "lr_at", "run"]


class Loop:
    def __init__(self, cfg: Config):
        self.rank, self.world, _ = dist.init(cfg.engine.backend)
        self.dp_rank, self.dp_size = dist.data_parallel(self.rank, self.world, cfg.engine.tensor_parallel)
        self.run_dir = Path(dist.broadcast_object(cfg.run.dir or f"runs/{cfg.run.name}"))
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(self.run_dir)))
        # Rank 0 builds the demo corpus if needed; the others open it once it exists.
        if self.rank == 0:
            self.data = load_data(cfg.data)
        dist.barrier()
        if self.rank != 0:
            self.data = load_data(cfg.data, quiet=True)
        self.cfg = cfg = build.resolve_model(cfg, self.data)
        self.K = len(self.data.domains)
        t = cfg.train
        self.global_batch = t.micro_batch * t.grad_accum * self.dp_size
        self.controller = build.controller(cfg, self.data, self.global_batch)
        pools = build.pools(cfg, self.data, cfg.data.subset)
        if uses_heldout(self.controller.references):
            # steering data the sampler never draws: a slice of every domain's training samples
            self.data.reference = [
                reference_slice(d, int(n), cfg.data.reference_fraction)
                for d, n in zip(self.data.domains, self.data.train_samples)
            ]
            pools = without(pools, self.data.train_samples, self.data.reference)
        self.steers_on_eval = evaluation_overlap(expand_references(self.controller.references, self.data), self.data)
        if self.steers_on_eval:
            say(
                self.rank,
                "warning: the mixture steers on data that evaluation reports: " + "; ".join(self.steers_on_eval),
            )
        order, self.scores_meta = build.curriculum_order(cfg, self.data, pools)
        sampler = DomainSampler(
            self.data.train_samples,
            cfg.data.steps_per_shard * self.global_batch,
            seed=t.seed,
            exhaustion=cfg.data.exhaustion,
            pools=pools,
            order=order,
            names=self.data.domains,
        )
        self.cursor = ShardCursor(sampler)
        self.state = TrainState(self.K)
        self.fingerprint = build.fingerprint(cfg, self.world, self.data, self.scores_meta)
        self.ckpt_root = self.run_dir / "checkpoints"
        if t.fail_rank >= self.world:
            raise ConfigError(f"train.fail_rank={t.fail_rank} names no rank of this {self.world}-rank job")
        self.lock = rundir.RunLock(self.run_dir) if self.rank == 0 else None
        try:
            self._start(cfg)
        except BaseException:
            self.close()
            raise

    def _start(self, cfg: Config) -> None:
        t = cfg.train
        if dist.broadcast_object(self.run_dir.is_dir()):
            self._take_lock()  # before reading checkpoints that another job might be writing
        resume_from, loaded = build.find_resume(t.resume, self.run_dir, self.ckpt_root, self.rank)
        if resume_from is not None:
            build.check_resume(resume_from, loaded[0], self.fingerprint, cfg.engine)
        kept = checkpoint.run_id(resume_from) if resume_from else None  # None: a fresh run, or one from before run ids
        self.run_id = dist.broadcast_object(kept or rundir.new_run_id())
        # Nothing is written before this point: bad input never touches an existing run.
        self.engine = build_engine(cfg)
        self.reference = None
        if self.controller.reference_model:
            from .signals import load_reference_model

            self.reference = load_reference_model(self.controller.reference_model, self.data, self.engine.device)
        self._signals = None
        self.tracker = Tracker(
            self.run_dir,
            cfg.to_dict(),
            enabled=self.rank == 0,
            wandb=cfg.run,
            run_id=self.run_id,
            log_every=t.log_every,
            total_steps=t.steps,
        )
        self.callbacks: list[Callback] = [cb for make in FACTORIES if (cb := make(self)) is not None]
        self.callbacks.append(self.tracker)  # last: it logs what the others added to a record
        if resume_from is not None:
            checkpoint.restore(resume_from, self.states, engine=self.engine, rank=self.rank, upgrade=upgrade)
            say(self.rank, f"resumed from {resume_from} at step {self.step}")
        self._take_lock()
        if self.rank == 0:
            if t.resume == "replace" and rundir.step_dirs(self.ckpt_root):
                aside = rundir.set_aside(self.run_dir, self.ckpt_root)
                say(self.rank, f"train.resume=replace: the earlier run moved to {aside}")
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            (self.run_dir / checkpoint.RUN_ID_FILE).write_text(self.run_id + "\n")
        self.tracker.open()

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
    def _take_lock(self) -> None:
        """Collective: rank 0 takes the run dir's lock (creating the directory); every rank fails
        alike when another job holds it."""
        refused = None
        if self.lock is not None and not self.lock.taken:
            try:
                warning = self.lock.acquire()
                if warning:
                    say(self.rank, "warning: " + warning)
            except rundir.RunDirBusy as e:
                refused = str(e)
        refused = dist.broadcast_object(refused)
        if refused:
            raise rundir.RunDirBusy(refused)

    def close(self) -> None:
        """Release the run directory (the job is over, or its launch was refused)."""
        if self.lock is not None:
            self.lock.release()

    def _save(self) -> None:
        meta = {"fingerprint": self.fingerprint, "run_id": self.run_id}
        engine_format = checkpoint_format(self.cfg.engine)
        if engine_format is not None:
            meta["engine"] = engine_format

        def before_commit(tmp: Path) -> None:
            for cb in self.callbacks:
                cb.on_save(self, tmp)

        checkpoint.save(
            self.ckpt_root,
            self.step,
            self.states,
            meta,
            self.cfg.train.keep_checkpoints,
            engine=self.engine,
            before_commit=before_commit,
        )

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
        n_params = sum(p.numel() for p in self.engine.model.parameters())
        say(
            self.rank,
            f"run dir {self.run_dir} | {self.world} rank(s) on {self.engine.device} | model {n_params / 1e6:.2f}M "
            f"params | {self.K} domains | global batch {self.global_batch} x {cfg.data.seq_len} tokens | shard "
            f"{self.sampler.shard_size} sequences = {cfg.data.steps_per_shard} steps | mixture {cfg.mixture['name']}",
        )
        if cfg.data.subset != "all":
            say(
                self.rank,
                f"data.subset={cfg.data.subset} (data.holdout_fraction={cfg.data.holdout_fraction}): drawing from "
                f"{int(self.sampler.sizes.sum())} of {int(self.data.train_samples.sum())} training samples",
            )
        if cfg.curriculum.name != "none":
            online = next((cb for cb in self.callbacks if cb.name == "curriculum"), None)
            extra = (
                f"scores {self.scores_meta['dir']}"
                if self.scores_meta
                else f"online proxy {online.num_params / 1e6:.2f}M params, pool {cfg.curriculum.pool_factor}x"
            )
            say(self.rank, f"curriculum {cfg.curriculum.name}: {extra}")
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
