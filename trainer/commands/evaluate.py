"""``mixtrain eval RUN --tasks T1,T2 [--step N] [--limit N] [--batch-size B] [--out FILE]``:
downstream evaluation of a checkpoint with EleutherAI's LM Evaluation Harness (``lm-eval``).

The checkpoint (RUN as for ``mixtrain export-model``: a run directory's latest complete
checkpoint, ``--step N``'s, or a checkpoint directory) is exported as a Hugging Face model folder
(into a temporary folder, or into ``--model-dir DIR``, where an export of the same checkpoint is
reused) and evaluated by ``lm_eval.simple_evaluate`` through its ``HFLM`` model (fp32, on
``--device``, cpu by default). The run's tokenizer must be one the export writes (gpt2, bytes, a
tokenizers JSON beside the run's data).

Tasks are lm-eval's names (hellaswag, arc_easy, arc_challenge, piqa, winogrande, lambada_openai,
...) or tasks of the YAML files under ``--include-path DIR`` (lm-eval's own task format; a local
JSONL file is ``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``). When every task
named is found under the include path, lm-eval's ~15k built-in task files are not indexed.

Nothing is fetched: ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1`` unless set otherwise, so
the standard tasks read the Hugging Face datasets cache of a machine that has their data (set
``HF_DATASETS_OFFLINE=0`` where downloading is allowed). Prints lm-eval's result table and writes
the results as JSON to ``--out`` (default ``<run>/eval/<checkpoint>_<tasks>[_limit<N>].json``).
Needs the ``eval`` extra: ``pip install 'mixtrain[eval]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .. import checkpoint
from .export_model import ExportModelError, checkpoint_arguments, exported, refused, require, resolve_checkpoint

OFFLINE = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def _tasks(spec: str) -> list[str]:
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise ExportModelError(f"--tasks {spec!r}: name at least one task (e.g. --tasks hellaswag,arc_easy)")
    return tasks


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager that knows every task named: the include path's tasks alone when they
    cover them (indexing the built-in tasks takes ~15 s), else with the built-in ones."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ExportModelError(f"--include-path {include_path!r} is not a folder of task YAML files")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or under --include-path {include_path}" if include_path else ""
        raise ExportModelError(f"--tasks: unknown task(s) {unknown}: not among lm-eval's tasks{where}")
    return manager


def default_out(ckpt: Path, tasks: list[str], limit: float | None) -> Path:
    """``<run>/eval/<checkpoint>_<tasks>[_limit<N>].json`` (a limited evaluation never takes the name
    of the full one); a checkpoint outside a run directory keeps it beside itself."""
    ckpt = ckpt.resolve()
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    suffix = f"_limit{limit:g}" if limit is not None else ""
    return run / "eval" / f"{ckpt.name}_{'+'.join(tasks)}{suffix}.json"


def evaluate(
    ckpt: str | os.PathLike,
    tasks: list[str],
    *,
    limit: float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    device: str = "cpu",
    include_path: str | None = None,
    model_dir: str | os.PathLike | None = None,
) -> dict:
    """lm-eval's results (``simple_evaluate``'s dict without per-sample records) for checkpoint ``ckpt``."""
    for var in OFFLINE:  # before datasets and huggingface_hub are imported: they read them once
        os.environ.setdefault(var, "1")
    require("eval", "lm_eval", "accelerate")
    if batch_size <= 0:
        raise ExportModelError(f"--batch-size {batch_size} must be positive")
    if limit is not None and limit <= 0:
        raise ExportModelError(f"--limit {limit:g} must be positive (a count, or a fraction below 1)")
    if num_fewshot is not None and num_fewshot < 0:
        raise ExportModelError(f"--num-fewshot {num_fewshot} must be >= 0")
    manager = task_manager(tasks, include_path)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory(prefix="mixtrain-eval-") as tmp:
        folder = exported(ckpt, model_dir if model_dir is not None else Path(tmp) / "model")
        if not (folder / "tokenizer.json").is_file():
            raise ExportModelError(
                "RUN: the run's tokenizer could not be written for Hugging Face (the note above says why), and "
                "lm-eval needs one"
            )
        lm = HFLM(pretrained=str(folder), device=device, batch_size=batch_size, dtype="float32")
        results = simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=int(limit) if limit is not None and limit >= 1 else limit,  # lm-eval: below 1 is a fraction
            task_manager=manager,
            log_samples=False,
        )
    results.pop("samples", None)
    return results


def run(args: argparse.Namespace) -> int:
    from ..refusal import refuse

    try:
        tasks = _tasks(args.tasks)
        ckpt = resolve_checkpoint(args.run, args.step)
        results = evaluate(
            ckpt,
            tasks,
            limit=args.limit,
            batch_size=args.batch_size,
            num_fewshot=args.num_fewshot,
            device=args.device,
            include_path=args.include_path,
            model_dir=args.model_dir,
        )
    except refused() as e:
        refuse(e)
    from lm_eval.utils import make_table

    print(make_table(results))
    out = Path(args.out) if args.out else default_out(ckpt, tasks, args.limit)
    meta = checkpoint.load_meta(ckpt)
    record = {"checkpoint": str(ckpt.resolve()), "step": meta.get("step"), "run_id": meta.get("run_id"), **results}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")  # str: lm-eval's dtypes and paths
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on an argparse subparsers object; its ``func`` is :func:`run`."""
    p = subparsers.add_parser(
        "eval",
        help="downstream evaluation of a checkpoint with lm-eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    checkpoint_arguments(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy,piqa")
    p.add_argument(
        "--limit", type=float, default=None, help="at most N documents per task (a fraction below 1: that share)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default: 8)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--device", default="cpu", help="torch device of the evaluation (default: cpu)")
    p.add_argument("--include-path", default=None, metavar="DIR", help="folder of extra lm-eval task YAML files")
    p.add_argument(
        "--model-dir", default=None, metavar="DIR", help="keep the exported model here (reused for the same checkpoint)"
    )
    p.add_argument("--out", default=None, metavar="FILE", help="results JSON (default: <run>/eval/...json)")
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    from . import standalone

    return standalone(add_parser, "eval", argv)


if __name__ == "__main__":
    raise SystemExit(main())
