"""The training loop: one loop for every controller and engine.

    weights -> sampler.plan_shard -> steps (engine.forward_backward, optimizer_step)
            -> DomainStats (reduced over ranks) -> controller.observe -> next shard's weights

New weights apply at the next shard boundary and are rank 0's, broadcast, so every rank samples
the same plan. Everything a restart needs goes through ``checkpoint.save``; a resumed run replays
the same shard plans and continues bit-exactly.

A curriculum (``curriculum=irreducible*``, ``trainer.curriculum``) changes only which samples of
each domain a shard takes (the sampler's within-domain order) and restricts the main run to the
non-holdout samples; the online variant adds a proxy model trained one step per main step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from mixtures import DomainStats, build_controller

from . import checkpoint, dist, rundir
from .config import Config, ConfigError
from .data.domains import DataBundle, check_vocab, load_data, shard_fingerprint
from .data.reference import reference_slice, uses_heldout, without
from .data.sampler import DataExhausted, DomainSampler, SampleOrder, ShardPlan
from .engines import MicroBatch, build_engine
from .errors import Diverged
from .export import yaml_text
from .signals import Signals, evaluation_overlap, expand_references
from .tracking import Tracker
from .weights_io import megatron_blend, read_weights, write_weights


@dataclass
class RunResult:
    run_dir: Path
    step: int
    domains: list[str]
    final_weights: np.ndarray
    average_weights: np.ndarray
    eval: dict


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[mixtrain] {msg}", flush=True)


def _resolve_model(cfg: Config, data: DataBundle) -> Config:
    """Fill model.vocab_size from the data and check the data fits the model."""
    model = cfg.model
    if model.vocab_size is None:
        model = dataclasses.replace(model, vocab_size=int(math.ceil(data.vocab_size / 64) * 64))
    check_vocab(data, model.vocab_size)
    if cfg.data.seq_len > model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds the model's context model.max_seq_len={model.max_seq_len}"
        )
    return dataclasses.replace(cfg, model=model)


def _controller(cfg: Config, data: DataBundle, global_batch: int):
    values = dict(cfg.mixture)
    name = values.pop("name")
    if values.get("weights_from"):
        if values.get("weights") is not None:
            raise ConfigError("give mixture.weights or mixture.weights_from, not both")
        values["weights"] = read_weights(values["weights_from"])
    run_tokens = cfg.train.steps * global_batch * cfg.data.seq_len
    return build_controller(name, data.domains, values, domain_tokens=data.train_tokens, run_tokens=run_tokens)


def _pools(cfg: Config, data: DataBundle, subset: str):
    from .curriculum.holdout import subset_pools

    try:
        return subset_pools(data.domains, data.train_samples, cfg.data.holdout_fraction, subset)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _curriculum_order(cfg: Config, data: DataBundle, pools) -> tuple[SampleOrder | None, dict | None]:
    """The sampler's within-domain order for ``curriculum.name`` (and the scores' meta, if any).
    Scores that do not match this run's data are refused here, before anything is written."""
    c = cfg.curriculum
    if c.name == "none":
        return None, None
    full = pools or [np.arange(n, dtype=np.int64) for n in data.train_samples]
    if c.name == "irreducible":
        from .curriculum.pacing import ScoreOrder
        from .curriculum.scores import load_scores

        scores, meta = load_scores(c.scores, data, cfg.data.seq_len, cfg.data.holdout_fraction)
        return ScoreOrder(
            scores,
            full,
            seed=cfg.train.seed,
            steps_per_shard=cfg.data.steps_per_shard,
            total_steps=cfg.train.steps,
            f0=c.f0,
            u_full=c.u_full,
            order=c.order,
        ), meta
    from .curriculum.pacing import OnlineOrder

    return OnlineOrder(full, seed=cfg.train.seed, pool_factor=c.pool_factor), None


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
        self.cfg = cfg = _resolve_model(cfg, self.data)
        self.K = len(self.data.domains)
        t = cfg.train
        self.global_batch = t.micro_batch * t.grad_accum * self.dp_size
        self.controller = _controller(cfg, self.data, self.global_batch)
        pools = _pools(cfg, self.data, cfg.data.subset)
        if uses_heldout(self.controller.references):
            # steering data the sampler never draws: a slice of every domain's training samples
            self.data.reference = [
                reference_slice(d, int(n), cfg.data.reference_fraction)
                for d, n in zip(self.data.domains, self.data.train_samples)
            ]
            pools = without(pools, self.data.train_samples, self.data.reference)
        self.steers_on_eval = evaluation_overlap(expand_references(self.controller.references, self.data), self.data)
        if self.steers_on_eval:
            _say(
                self.rank,
                "warning: the mixture steers on data that evaluation reports: " + "; ".join(self.steers_on_eval),
            )
        order, self.scores_meta = _curriculum_order(cfg, self.data, pools)
        self.sampler = DomainSampler(
            self.data.train_samples,
            cfg.data.steps_per_shard * self.global_batch,
            seed=t.seed,
            exhaustion=cfg.data.exhaustion,
            pools=pools,
            order=order,
            names=self.data.domains,
        )
        self.fingerprint = {
            **cfg.fingerprint(),
            "world_size": self.world,
            "domains": self.data.domains,
            "tokenizer": self.data.tokenizer,
            "shards": shard_fingerprint(self.data),
        }
        if self.data.reference is not None:
            self.fingerprint["data"]["reference_fraction"] = cfg.data.reference_fraction
        if self.scores_meta is not None:  # the scores' content, not just their path, must match on resume
            self.fingerprint["curriculum_scores_key"] = self.scores_meta["key"]
        self.ckpt_root = self.run_dir / "checkpoints"
        if t.fail_rank >= self.world:
            raise ConfigError(f"train.fail_rank={t.fail_rank} names no rank of this {self.world}-rank job")
        self.lock = rundir.RunLock(self.run_dir) if self.rank == 0 else None
        try:
            self._build(cfg)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: Config) -> None:
        t = cfg.train
        if dist.broadcast_object(self.run_dir.is_dir()):
            self._take_lock()  # before reading checkpoints that another job might be writing
        resume_from, loaded = self._find_resume()
        resume_state = self._check_resume(resume_from, loaded) if resume_from else None
        kept = checkpoint.run_id(resume_from) if resume_from else None  # None: a fresh run, or one from before run ids
        self.run_id = dist.broadcast_object(kept or rundir.new_run_id())
        # Nothing is written before this point: bad input never touches an existing run.
        self.engine = build_engine(cfg)
        self.online = None
        if cfg.curriculum.name == "irreducible_online":
            from .curriculum.online import OnlineProxy

            self.online = OnlineProxy(cfg, self.data, _pools(cfg, self.data, "holdout"), self.rank, self.world)
        self._signals = None
        self.reference = None
        if cfg.mixture.get("reference"):
            from .signals import load_reference_model

            self.reference = load_reference_model(cfg.mixture["reference"], self.data, self.engine.device)
        self.step = 0
        self.nonfinite_in_row = 0
        self.tokens_seen = np.zeros(self.K)
        self.history: list[dict] = []
        self.plan: ShardPlan | None = None
        self.shard_start_state = None
        if resume_state is not None:
            resume_state = (self._restore(*resume_state, resume_from), resume_state[1])
            _say(self.rank, f"resumed from {resume_from} at step {self.step}")
        self._take_lock()
        if self.rank == 0:
            if t.resume == "replace" and rundir.step_dirs(self.ckpt_root):
                aside = rundir.set_aside(self.run_dir, self.ckpt_root)
                _say(self.rank, f"train.resume=replace: the earlier run moved to {aside}")
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            (self.run_dir / checkpoint.RUN_ID_FILE).write_text(self.run_id + "\n")
        positions = resume_state[0]["loop"]["tracker"] if resume_state and self.rank == 0 else None
        self.tracker = Tracker(
            self.run_dir,
            cfg.to_dict(),
            enabled=self.rank == 0,
            wandb=cfg.run,
            resume_positions=positions,
            run_id=self.run_id,
        )

    # ---- the run directory and resume -----------------------------------------------------------
    def _take_lock(self) -> None:
        """Collective: rank 0 takes the run dir's lock (creating the directory); every rank fails
        alike when another job holds it."""
        refused = None
        if self.lock is not None and not self.lock.taken:
            try:
                warning = self.lock.acquire()
                if warning:
                    _say(self.rank, "warning: " + warning)
            except rundir.RunDirBusy as e:
                refused = str(e)
        refused = dist.broadcast_object(refused)
        if refused:
            raise rundir.RunDirBusy(refused)

    def close(self) -> None:
        """Release the run directory (the job is over, or its launch was refused)."""
        if self.lock is not None:
            self.lock.release()

    def _find_resume(self) -> tuple[Path | None, tuple | None]:
        """The checkpoint to continue from and what reading it gave (state, meta, rng)."""
        mode = self.cfg.train.resume
        if mode == "replace":
            return None, None
        if mode == "never":
            earlier = rundir.step_dirs(self.ckpt_root)
            if earlier:
                raise ConfigError(
                    f"train.resume=never, but run.dir={str(self.run_dir)!r} holds checkpoints of an earlier run "
                    f"(newest {earlier[-1].name}): continue it with train.resume=auto, start over with "
                    f"train.resume=replace (moves them into {self.run_dir}/replaced-<time>/), or give this run "
                    "another run.dir"
                )
            return None, None
        if mode == "auto":
            path, loaded, warnings = rundir.resume_candidate(self.ckpt_root, self.rank)
            for w in warnings:
                _say(self.rank, "warning: " + w)
            return path, loaded
        path = Path(mode)
        try:
            return path, rundir.read(path, self.rank)
        except rundir.DamagedCheckpoint as e:
            raise ConfigError(f"train.resume={mode!r} is not a readable checkpoint: {e}") from None

    def _check_resume(self, path: Path, loaded: tuple):
        # An engine's own checkpoint (DeepSpeed) is loaded by the engine once built: state is None here.
        state, meta, rng = loaded
        checkpoint.check_engine_format(path, meta.get("engine"), checkpoint.engine_format(self.cfg.engine))
        saved = meta.get("fingerprint", {})
        now = self.fingerprint if "shards" in saved else {k: v for k, v in self.fingerprint.items() if k != "shards"}
        diffs = checkpoint.diff_fingerprints(saved, now)  # "shards": the data itself changed (re-ingested, …)
        if diffs:
            raise checkpoint.CheckpointMismatch(
                f"checkpoint {path} was written with a different configuration; differing knobs:\n  "
                + "\n  ".join(diffs)
                + "\nuse train.resume=replace (moves the old run aside) or another run.dir to start fresh"
            )
        return state, rng

    def _restore(self, state: dict | None, rng, path: Path) -> dict:
        """Load everything a checkpoint holds; returns the loop state (read by the engine for its own
        checkpoint format)."""
        if state is None:
            state = self.engine.load_checkpoint(path)
        else:
            self.engine.load_state_dict(state["engine"])
        self.controller.load_state_dict(state["controller"])
        loop = state["loop"]
        self.step = int(loop["step"])
        self.nonfinite_in_row = int(loop.get("nonfinite_in_row", 0))
        self.tokens_seen = np.asarray(loop["tokens_seen"], dtype=np.float64)
        self.history = list(loop["history"])
        self.sampler.load_state_dict(loop["shard_start_state"])
        if self.online is not None:
            self.online.load_state_dict(state["curriculum"])
        if loop["shard_weights"] is not None:
            # Re-plan the shard in progress from the state it started from: the same pure function
            # (an online curriculum replays the candidate scores the shard was planned from).
            self.shard_start_state = self.sampler.state
            score_fn = None
            if self.online is not None:
                from .curriculum.pacing import replay

                score_fn = replay(loop["shard_recorded"])
            self.plan = self.sampler.plan_shard(np.asarray(loop["shard_weights"]), score_fn=score_fn)
            self.sampler.advance(self.plan)
        if rng is not None:
            checkpoint.set_rng_state(rng)
        return state

    def _save(self) -> None:
        from .data.sampler import SamplerState

        start = self.shard_start_state if self.plan is not None else self.sampler.state
        engine_format = checkpoint.engine_format(self.cfg.engine)  # None (engine=torch): engine state in state.pt
        state = None
        if self.rank == 0:
            state = {
                **({} if engine_format else {"engine": self.engine.state_dict()}),
                "controller": self.controller.state_dict(),
                "loop": {
                    "step": self.step,
                    "nonfinite_in_row": self.nonfinite_in_row,
                    "tokens_seen": self.tokens_seen.tolist(),
                    "history": self.history,
                    "shard_start_state": SamplerState.to_dict(start),
                    "shard_weights": None if self.plan is None else self.plan.weights.tolist(),
                    "tracker": self.tracker.positions(),
                },
            }
            if self.online is not None:
                state["curriculum"] = self.online.state_dict()
                state["loop"]["shard_recorded"] = (
                    None if self.plan is None else [np.asarray(r) for r in self.plan.recorded]
                )
        meta = {"fingerprint": self.fingerprint, "run_id": self.run_id}
        engine_save = None
        if engine_format is not None:  # the engine's own collective save (DeepSpeed) stores `state` too
            meta["engine"] = engine_format
            engine_save = lambda tmp: self.engine.save_checkpoint(tmp, state)  # noqa: E731
        checkpoint.save(
            self.ckpt_root,
            self.step,
            state,
            meta,
            self.cfg.train.keep_checkpoints,
            engine_save=engine_save,
            before_commit=self._fault,
        )

    def _fault(self, tmp: Path | None = None) -> None:
        """train.fail_at_step's injected crash: after the step, or with ``tmp`` (train.fail_in_checkpoint)
        inside that step's checkpoint save, before its rename."""
        t = self.cfg.train
        if (
            not t.fail_at_step
            or self.step != t.fail_at_step
            or t.fail_in_checkpoint != (tmp is not None)
            or t.fail_rank not in (-1, self.rank)
            or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
        ):
            return
        where = (
            f"while writing {tmp} (holding {', '.join(sorted(p.name for p in tmp.iterdir()))})"
            if tmp
            else f"after step {self.step}"
        )
        print(f"[mixtrain] fault injection: killing rank {self.rank} {where}", flush=True)
        sys.stderr.flush()
        if t.fail_rank == -1:
            os._exit(17)  # every rank: no cleanup, like a killed job
        os.kill(os.getpid(), signal.SIGKILL)  # one rank, really killed: the others learn it from torchrun

    # ---- data ---------------------------------------------------------------------------------
    def _sync(self, v: np.ndarray) -> np.ndarray:
        """Rank 0's vector on every rank, bit for bit."""
        return dist.broadcast(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))).numpy()

    def _next_shard(self) -> None:
        weights = self.controller.weights
        if self.controller.adaptive:
            weights = self._sync(weights)
        self.shard_start_state = self.sampler.state
        if self.online is not None:
            # candidates scored by ℓ(snapshot) − ℓ(proxy); then the proxy becomes the snapshot
            self.plan = self.sampler.plan_shard(weights, score_fn=self.online.score)
            self.online.next_shard()
            self.online.take_snapshot()
        else:
            self.plan = self.sampler.plan_shard(weights)
        self.sampler.advance(self.plan)
        rec = {
            "step": self.step,
            "shard": self.plan.shard_index,
            "weights": dict(zip(self.data.domains, map(float, weights))),
            "counts": dict(zip(self.data.domains, map(int, self.plan.counts))),
            # which samples the shard holds, in order: a replayed or skipped shard shows here
            "samples": hashlib.sha256(
                self.plan.domains.astype("<i2").tobytes() + self.plan.indices.astype("<i8").tobytes()
            ).hexdigest()[:16],
        }
        if self.plan.scores is not None:
            cur = self._curriculum_record(self.plan)
            rec["curriculum"] = cur
            self.tracker.log({"step": self.step, **cur})
        self.history.append(rec)
        self.tracker.log_weights(rec)

    def _curriculum_record(self, plan: ShardPlan) -> dict:
        """Per shard: the pacing fraction f(u) and the mean score of the samples drawn (per domain)."""
        out = {}
        if plan.fraction is not None:
            out["curriculum/fraction"] = float(plan.fraction)
        finite = np.isfinite(plan.scores)
        if finite.any():
            out["curriculum/score"] = float(plan.scores[finite].mean())
        for i, d in enumerate(self.data.domains):
            sel = finite & (plan.domains == i)
            if sel.any():
                out[f"curriculum/score/{d}"] = float(plan.scores[sel].mean())
        return out

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
        groups = {f"eval/{d}/loss": self.data.valid[d] for d in self.data.domains if d in self.data.valid}
        for name, splits in self.data.targets.items():
            groups[f"target/{name}/loss"] = splits.get("valid") or splits.get("train")
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
        out = {k: float(s.mean()) for k, s in zip(groups, seq) if s.size}
        dom = [s for k, s in zip(groups, seq) if k.startswith("eval/") and s.size]
        if dom:
            out["eval/loss"] = float(np.concatenate(dom).mean())
            out["eval/macro_loss"] = float(np.mean([s.mean() for s in dom]))
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
        measuring = req is not None and (req.any_gradient or req.ref_model_loss)
        if self.controller.adaptive:
            lw = self._sync(lw)
        state = self.signals.begin(req, self.step, self._step_counts()) if measuring else None
        batch = self.signals.with_reference_rows(state, self._batch()) if measuring else self._batch()
        sums, counts = self.engine.forward_backward(
            batch,
            torch.from_numpy(lw),
            self.K,
            probe=self.signals.in_batch_probe(state) if measuring else None,
            on_losses=self.signals.on_losses(state) if measuring else None,
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
        if measuring:
            t = self.cfg.train
            self.signals.end(state, stats, self.step, lw, t.micro_batch * t.grad_accum * self.cfg.data.seq_len)
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
                self.nonfinite_in_row = 0
        return self._step_record(sums, counts, lr, gnorm, stats, req, lw), stats

    def _nonfinite(self, what: str, can_skip: bool) -> None:
        """train.on_nonfinite: raise Diverged, or count a skipped step (and raise after too many)."""
        t = self.cfg.train
        self.nonfinite_in_row += 1
        if t.on_nonfinite == "skip" and can_skip and self.nonfinite_in_row <= t.max_nonfinite:
            _say(
                self.rank,
                f"warning: step {self.step}: {what}; update skipped "
                f"({self.nonfinite_in_row} in a row, train.max_nonfinite={t.max_nonfinite})",
            )
            return
        last = checkpoint.latest(self.ckpt_root)
        why = (
            "train.on_nonfinite=abort"
            if t.on_nonfinite == "abort"
            else f"{self.nonfinite_in_row} in a row > train.max_nonfinite={t.max_nonfinite}"
            if can_skip
            else f"engine={self.cfg.engine.name} has already stepped"
        )
        raise Diverged(
            f"the run diverged at step {self.step}: {what} ({why}); nothing of this step was saved, "
            f"the last good checkpoint is {last or 'none (no checkpoint was written yet)'}. "
            "Lower train.lr or raise train.warmup_steps, or set train.on_nonfinite=skip"
        )

    def _step_record(self, sums, counts, lr, gnorm, stats: DomainStats, req, lw: np.ndarray) -> dict:
        present = counts > 0
        loss = stats.loss
        self.tokens_seen += counts
        rec = {"step": self.step, "lr": lr, "train/loss": float(sums.sum() / counts.sum()), "train/grad_norm": gnorm}
        w = self.plan.weights
        for i, d in enumerate(self.data.domains):
            if present[i]:
                rec[f"train/loss/{d}"] = float(loss[i])
            rec[f"mixture/weight/{d}"] = float(w[i])
            rec[f"mixture/tokens/{d}"] = float(self.tokens_seen[i])
        rec["mixture/entropy"] = float(-(w[w > 0] * np.log(w[w > 0])).sum())
        self._log_signals(rec, stats, req, lw)
        return rec

    def _log_signals(self, rec: dict, stats: DomainStats, req, lw: np.ndarray) -> None:
        """What the controller saw this step and the loss weights it used, per domain."""
        columns = {}
        if stats.align is not None:
            for r, name in enumerate(stats.align_names or req.align):
                columns[f"probe/align/{name}"] = stats.align[:, r]
        if stats.norms is not None:
            columns["probe/grad_norm"] = stats.norms
        if stats.excess_loss is not None:
            columns["mixture/excess_loss"] = stats.excess_loss
        for key, values in columns.items():
            for d, v in zip(self.data.domains, values):
                if np.isfinite(v):
                    rec[f"{key}/{d}"] = float(v)
        if self.controller.adaptive:  # the method's own distribution (differs from the sampler's in proxy mode)
            for d, v in zip(self.data.domains, self.controller.mixture):
                rec[f"mixture/learned/{d}"] = float(v)
        if not np.allclose(lw, 1.0):
            for d, v in zip(self.data.domains, lw):
                rec[f"mixture/loss_weight/{d}"] = float(v)

    def train(self) -> RunResult:
        cfg, t = self.cfg, self.cfg.train
        n_params = sum(p.numel() for p in self.engine.model.parameters())
        _say(
            self.rank,
            f"run dir {self.run_dir} | {self.world} rank(s) on {self.engine.device} | model {n_params / 1e6:.2f}M "
            "params | "
            f"{self.K} domains | global batch {self.global_batch} x {cfg.data.seq_len} tokens | "
            f"shard {self.sampler.shard_size} sequences = {cfg.data.steps_per_shard} steps | mixture "
            f"{cfg.mixture['name']}",
        )
        if cfg.data.subset != "all":
            _say(
                self.rank,
                f"data.subset={cfg.data.subset} (data.holdout_fraction={cfg.data.holdout_fraction}): drawing from "
                f"{int(self.sampler.sizes.sum())} of {int(self.data.train_samples.sum())} training samples",
            )
        if cfg.curriculum.name != "none":
            extra = (
                f"scores {self.scores_meta['dir']}"
                if self.scores_meta
                else f"online proxy {self.online.num_params / 1e6:.2f}M params, pool {cfg.curriculum.pool_factor}x"
            )
            _say(self.rank, f"curriculum {cfg.curriculum.name}: {extra}")
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
                _say(self.rank, f"stopping at step {self.step}: {e}")
                return False
        t0 = time.perf_counter()
        rec, stats = self._train_step(lr_at(self.step, t))
        rec["perf/tokens_per_sec"] = float(stats.tokens.sum() / (time.perf_counter() - t0))
        if self.online is not None:
            rec["curriculum/proxy_loss"] = self.online.train_step(self.step, lr_at)
        if self.controller.adaptive:
            before = self.controller.metrics()
            self.controller.observe(stats)  # controllers skip non-finite steps themselves
            metrics = self.controller.metrics()
            if metrics != before:  # logged on the step an update changes them, not repeated
                rec.update({f"mixture/{k}": float(v) for k, v in metrics.items()})
        if (self.step + 1) % t.log_every == 0 or self.step + 1 == t.steps:
            self.tracker.log(rec)
        self.step += 1
        # "step" in every record = optimizer updates applied to the parameters it measures:
        # a training loss of record n is taken before update n, an evaluation after it.
        if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
            self.tracker.log({"step": self.step, **self.evaluate()})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{rec['train/loss']:.3f}", tok_s=f"{rec['perf/tokens_per_sec'] or 0:.0f}", refresh=False
            )
        if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.steps:
            self._save()
        self._fault()
        return True

    def _finish(self) -> RunResult:
        final_eval, per_sequence = self.evaluate(per_sequence=True)
        self._save()  # before logging the evaluation: re-running a finished run logs it once, not twice
        if final_eval:
            self.tracker.log({"step": self.step, **final_eval})
        domains = self.data.domains
        final = np.asarray(self.controller.mixture)
        avg = self.controller.average_weights if self.controller.adaptive else final
        if self.history:
            self.history[-1]["end_step"] = self.step
        if self.rank == 0:
            write_weights(
                self.run_dir / "weights.json",
                domains,
                avg,
                final,
                self.cfg.mixture["name"],
                self.step,
                run_id=self.run_id,
            )
            self.tracker.log_artifact(self.run_dir / "weights.json", f"weights-{self.run_id}", "mixture")
            if per_sequence:  # the final evaluation, sequence by sequence (paired comparisons across runs)
                np.savez(self.run_dir / "eval_sequences.npz", **per_sequence)
            prefixes = [v.stream.prefix for v in self.data.train]
            (self.run_dir / "blend.txt").write_text(megatron_blend(domains, avg, prefixes) + "\n")
            (self.run_dir / "weights.yaml").write_text(
                yaml_text(dict(zip(domains, map(float, avg))), origin=str(self.run_dir), which="average")
            )
            self.tracker.log_weights(
                {
                    "step": self.step,
                    "end_step": self.step,
                    "final": True,
                    "weights": dict(zip(domains, map(float, final))),
                }
            )
            self.tracker.summary(final_eval)
            if self.cfg.run.plots:
                from .plots import plot_run

                plot_run(self.run_dir, domains)
        self.tracker.close()
        if self.rank == 0:
            self._print_summary(final, avg, final_eval)
        return RunResult(self.run_dir, self.step, domains, final, np.asarray(avg), final_eval)

    def _print_summary(self, final, avg, ev) -> None:
        """One screen: exported weights next to uniform and the last shard's, tokens, losses."""
        lines = [f"{'domain':<14}{'uniform':>9}{'exported':>10}{'final':>9}{'tokens':>12}{'val loss':>10}"]
        for i, d in enumerate(self.data.domains):
            vl = ev.get(f"eval/{d}/loss")
            lines.append(
                f"{d:<14}{1 / self.K:>9.3f}{avg[i]:>10.3f}{final[i]:>9.3f}{self.tokens_seen[i]:>12.0f}"
                f"{'' if vl is None else f'{vl:>10.3f}'}"
            )
        for k, v in ev.items():
            if k.startswith("target/"):
                lines.append(f"{k:<44}{v:>10.3f}")
        if "eval/loss" in ev:
            per = {d: ev[f"eval/{d}/loss"] for d in self.data.domains if f"eval/{d}/loss" in ev}
            lines.append(
                f"eval/loss {ev['eval/loss']:.3f} | macro {ev['eval/macro_loss']:.3f} | best {min(per, key=per.get)} "
                f"| worst {max(per, key=per.get)}"
            )
        if self.steers_on_eval:
            lines.append(
                "NOTE: this mixture steered on data that evaluation reports, so its evaluation is optimistic: "
                + "; ".join(self.steers_on_eval)
            )
        lines.append(
            f"weights: {self.run_dir / 'weights.json'} (exported = "
            f"{self.controller.exported if self.controller.adaptive else 'fixed'}); "
            f"reuse with: mixtrain train mixture=static mixture.weights_from={self.run_dir}"
        )
        _say(0, f"done: {self.step} steps | run dir {self.run_dir}\n" + "\n".join(lines))


def run(cfg: Config) -> RunResult:
    loop = Loop(cfg)
    try:
        return loop.train()
    finally:
        loop.close()
