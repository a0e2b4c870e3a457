"""Run artifacts on rank 0: metrics.jsonl, weights.jsonl, wandb (offline by default).

Keys follow DESIGN.md: ``train/loss/<d>``, ``eval/<d>/loss``, ``mixture/weight/<d>`` ... wandb
panels group by the first path segment.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from .callbacks import Callback


def _truncate(path: Path, size: int) -> None:
    """Cut a log back to what it held at the checkpoint: a resumed run rewrites what came after."""
    if path.is_file() and path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Tracker(Callback):
    """The run's logs as a callback: the step records on the ``train.log_every`` cadence, every
    evaluation, one weights.jsonl row per shard; stateful (``"tracker"``: the logs' byte sizes at
    the checkpoint, which a resume cuts them back to)."""

    name = "tracker"

    def __init__(
        self,
        run_dir: Path,
        cfg_dict: dict,
        *,
        enabled: bool,
        wandb,
        run_id: str | None = None,
        log_every: int = 1,
        total_steps: int | None = None,
    ):
        """``wandb``: the run config's wandb knobs (RunConfig); each unset one is left to wandb,
        which reads its environment variables (WANDB_PROJECT, WANDB_ENTITY, …). Nothing is opened
        before :meth:`open` (after a resume has handed over the logs' positions)."""
        self.enabled = enabled
        self.run_id = run_id  # in every metrics record: a log never mixes two runs unnoticed
        self.run_dir = Path(run_dir)
        self.cfg_dict, self.knobs = cfg_dict, wandb
        self.log_every, self.total_steps = log_every, total_steps
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.weights_path = self.run_dir / "weights.jsonl"
        self._wandb = None
        self._resume_positions = None

    def open(self) -> None:
        """Start the logs: afresh, or cut back to the checkpoint's positions after a resume."""
        if not self.enabled:
            return
        if self._resume_positions is None:
            for p in (self.metrics_path, self.weights_path):
                p.unlink(missing_ok=True)
        else:
            _truncate(self.metrics_path, self._resume_positions["metrics"])
            _truncate(self.weights_path, self._resume_positions["weights"])
        self._metrics = open(self.metrics_path, "a")
        self._weights = open(self.weights_path, "a")
        if self.knobs.wandb_mode != "disabled":
            self._init_wandb(self.cfg_dict, self.knobs)

    def state_dict(self) -> dict:
        return self.positions()

    def load_state_dict(self, state: dict) -> None:
        self._resume_positions = dict(state)

    # ---- the loop's hooks ---------------------------------------------------------------------
    def on_shard(self, loop, plan, record: dict) -> None:
        if "curriculum" in record:
            self.log({"step": record["step"], **record["curriculum"]})
        self.log_weights(record)

    def on_step(self, loop, record: dict, stats) -> None:
        step = record["step"]
        if (step + 1) % self.log_every == 0 or step + 1 == self.total_steps:
            self.log(record)

    def on_eval(self, loop, results: dict) -> None:
        self.log(results)

    def on_end(self, loop, result) -> None:
        """The final evaluation (logged after the final checkpoint: re-running a finished run logs it
        once, not twice), weights.json as an artifact, the final weights row, the summary; closes."""
        if result.eval:
            self.log({"step": result.step, **result.eval})
        self.log_artifact(result.run_dir / "weights.json", f"weights-{self.run_id}", "mixture")
        final = dict(zip(result.domains, map(float, result.final_weights)))
        self.log_weights({"step": result.step, "end_step": result.step, "final": True, "weights": final})
        self.summary(result.eval)
        self.close()

    def _init_wandb(self, cfg_dict: dict, knobs) -> None:
        import wandb

        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        # silent: wandb's own banner and history table would bury the run summary; close() says
        # where the run is and how to upload it.
        self._wandb = wandb.init(
            project=knobs.wandb_project or os.environ.get("WANDB_PROJECT") or "mixtrain",
            entity=knobs.wandb_entity,
            group=knobs.wandb_group,
            tags=knobs.wandb_tags,
            id=run_id,
            resume="allow",
            mode=knobs.wandb_mode,
            dir=str(self.run_dir),
            config=cfg_dict,
            name=self.run_dir.name,
            settings=wandb.Settings(silent=True),
        )
        self._wandb.define_metric("trainer/global_step")
        self._wandb.define_metric("*", step_metric="trainer/global_step")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps({**record, "run_id": self.run_id} if self.run_id else record) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            self._wandb.log({"trainer/global_step": record["step"], **{k: v for k, v in record.items() if k != "step"}})

    def positions(self) -> dict:
        """Byte sizes of the logs, saved with each checkpoint so a resume can cut them back."""
        if not self.enabled:
            return {"metrics": 0, "weights": 0}
        return {"metrics": self._metrics.tell(), "weights": self._weights.tell()}

    def log_weights(self, record: dict) -> None:
        if not self.enabled:
            return
        self._weights.write(json.dumps(record) + "\n")
        self._weights.flush()

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        """A file of the run (weights.json) as a wandb artifact: versioned, and reusable by name."""
        if self._wandb is None:
            return
        import wandb

        artifact = wandb.Artifact(name, type=kind)
        artifact.add_file(str(path))
        self._wandb.log_artifact(artifact)

    def summary(self, values: dict) -> None:
        if self._wandb is not None:
            for k, v in values.items():
                self._wandb.summary[k] = v

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        self._weights.close()
        if self._wandb is not None:
            offline = self._wandb.settings.mode == "offline"
            where = self._wandb.dir
            self._wandb.finish()
            if offline:
                print(
                    f"[mixtrain] wandb offline run in {Path(where).parent} (upload: wandb sync {Path(where).parent})",
                    flush=True,
                )
