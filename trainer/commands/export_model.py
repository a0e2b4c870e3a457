"""``mixtrain export-model RUN [--step N] --out DIR``: a checkpoint as a Hugging Face model folder.

RUN is a run directory (its latest complete checkpoint, or step N's with ``--step``) or one
checkpoint directory (``<run>/checkpoints/step_XXXXXXXX``), of any engine: torch and FSDP2 (full
weights), DeepSpeed (ZeRO partitions merged by zero_to_fp32), megatron (tensor-parallel shards
merged). DIR receives:

- ``config.json``: ``GPT2LMHeadModel`` for model.name=gpt, ``LlamaForCausalLM`` for llama, and
  ``generation_config.json`` (EOD as bos and eos);
- ``model.safetensors``: the fp32 weights under transformers' names (``trainer.models.hf``), the
  vocabulary with the checkpoint's padded rows (model.vocab_size, or megatron's padding);
- ``tokenizer.json`` and ``tokenizer_config.json`` where the run's tokenizer can be written for
  Hugging Face (``trainer.data.tokenizer_export``: gpt2, bytes, a tokenizers JSON found beside the
  run's data); otherwise a note says why, and the model is written without;
- ``mixtrain.json``: the checkpoint it came from (path, step, run id, engine).

``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads it, and its fp32 logits equal
mixtrain's to 1e-4 (tests/test_export_model.py). An existing DIR is replaced only if it holds an
earlier export. Needs the ``hf`` extra: ``pip install 'mixtrain[hf]'``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from .. import checkpoint
from ..config import ConfigError, ModelConfig

PROVENANCE = "mixtrain.json"
WEIGHTS = "model.safetensors"


class ExportModelError(ValueError):
    """Bad input for ``mixtrain export-model`` or ``mixtrain eval``; the message names the argument."""


def require(extra: str, *modules: str) -> None:
    """Refuse (naming the extra to install) when a module of an optional extra is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportModelError(f"{', '.join(missing)} not installed: pip install 'mixtrain[{extra}]'")


def resolve_checkpoint(run: str | os.PathLike, step: int | None = None) -> Path:
    """The checkpoint directory RUN names: itself, or a run's latest complete one (``step``: that step's)."""
    run = Path(run)
    if (run / "meta.json").is_file():
        if step is not None and checkpoint.load_meta(run).get("step") != step:
            raise ExportModelError(f"--step {step}: RUN={str(run)!r} is the checkpoint of another step")
        return run
    done = checkpoint.complete_checkpoints(run / "checkpoints")
    if not done:
        raise ExportModelError(
            f"RUN={str(run)!r} is neither a checkpoint directory (meta.json) nor a run directory with a complete "
            "checkpoint under checkpoints/"
        )
    if step is None:
        return done[-1]
    by_step = {int(p.name.split("_")[1]): p for p in done}
    if step not in by_step:
        raise ExportModelError(f"--step {step}: no complete checkpoint at that step (available: {sorted(by_step)})")
    return by_step[step]


def provenance(ckpt: Path, meta: dict) -> dict:
    """What identifies the checkpoint an export came from (its meta.json's write time included, so a
    checkpoint rewritten at the same step is another one)."""
    return {
        "checkpoint": str(Path(ckpt).resolve()),
        "step": meta.get("step"),
        "run_id": meta.get("run_id"),
        "written": meta.get("time"),
        "engine": meta.get("engine") or {"name": "torch"},
    }


def _search_dirs(fingerprint: dict, ckpt: Path) -> list[Path]:
    """Where a tokenizer's files may lie: the run's shard set, a tokenizer path, the run directory."""
    data = fingerprint.get("data") or {}
    out = [Path(data["path"])] if data.get("path") else []
    tok = Path(str(data.get("tokenizer") or ""))
    if str(tok) not in ("", ".") and tok.exists():
        out.append(tok if tok.is_dir() else tok.parent)
    out.append(ckpt.resolve().parent.parent)
    return [p for p in out if p.is_dir()]


def _write(ckpt: Path, meta: dict, dest: Path) -> list[str]:
    """Write the folder into ``dest``; returns the notes to print."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    from ..data import tokenizer_export
    from ..engines import format_of, read_checkpoint
    from ..models import hf

    fingerprint = meta.get("fingerprint") or {}
    if not isinstance(fingerprint.get("model"), dict):
        raise ExportModelError(f"RUN: {ckpt}/meta.json records no model configuration (fingerprint.model)")
    cfg = ModelConfig(**fingerprint["model"])
    identity = fingerprint.get("tokenizer") or {}
    names = format_of(meta).weight_names
    with torch.no_grad():
        weights = hf.to_hf(cfg, read_checkpoint(ckpt)[0]["engine"]["model"], names)
    embedding = "transformer.wte.weight" if cfg.name == "gpt" else "model.embed_tokens.weight"
    kwargs = hf.hf_config(cfg, weights[embedding].shape[0], identity.get("eod"), names=names)
    config = AutoConfig.for_model(**kwargs)
    config.save_pretrained(dest)
    if identity.get("eod") is not None:
        GenerationConfig.from_model_config(config).save_pretrained(dest)
    save_file(weights, str(dest / WEIGHTS), metadata={"format": "pt"})
    notes = []
    try:
        tokenizer_export.write(identity, dest, cfg.max_seq_len, _search_dirs(fingerprint, ckpt))
    except tokenizer_export.NoHFTokenizer as e:
        notes.append(f"no Hugging Face tokenizer written: {e}")
    (dest / PROVENANCE).write_text(json.dumps(provenance(ckpt, meta), indent=2) + "\n")
    return notes


def export_model(ckpt: str | os.PathLike, out: str | os.PathLike, *, quiet: bool = False) -> Path:
    """Write checkpoint ``ckpt``'s model as a Hugging Face folder ``out`` (assembled beside it, then
    renamed into place); returns ``out``."""
    require("hf", "transformers", "safetensors")
    ckpt, out = Path(ckpt), Path(out)
    meta = checkpoint.load_meta(ckpt)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / PROVENANCE).is_file())):
        raise ExportModelError(f"--out {str(out)!r} exists and holds no earlier export: give a new or empty folder")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        notes = _write(ckpt, meta, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    if not quiet:
        for note in notes:
            print(f"mixtrain export-model: note: {note}", file=sys.stderr)
        print(f"wrote {out} (from {ckpt})", file=sys.stderr)
    return out


def exported(ckpt: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """``folder`` holding checkpoint ``ckpt``'s export: reused when its mixtrain.json names this very
    checkpoint, written otherwise."""
    folder = Path(folder)
    want = provenance(Path(ckpt), checkpoint.load_meta(ckpt))
    try:
        if json.loads((folder / PROVENANCE).read_text()) == want and (folder / WEIGHTS).is_file():
            return folder
    except (OSError, ValueError):
        pass
    return export_model(ckpt, folder)


def refused() -> tuple[type[Exception], ...]:
    """The errors ``export-model`` and ``eval`` print as one line (bad input, not a bug)."""
    from ..models.hf import UnmappedWeights
    from ..safe_load import UnsafeCheckpoint

    return ExportModelError, ConfigError, UnmappedWeights, checkpoint.DamagedCheckpoint, UnsafeCheckpoint


# ---- command line ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from ..refusal import refuse

    try:
        export_model(resolve_checkpoint(args.run, args.step), args.out)
    except refused() as e:
        refuse(e)
    return 0


def checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """RUN and --step, as :func:`resolve_checkpoint` takes them."""
    p.add_argument("run", metavar="RUN", help="a run directory (its latest complete checkpoint) or a checkpoint")
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the latest)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``export-model`` on an argparse subparsers object; its ``func`` is :func:`run`."""
    p = subparsers.add_parser(
        "export-model",
        help="write a checkpoint as a Hugging Face transformers model folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    checkpoint_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR", help="the model folder to write")
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    from . import standalone

    return standalone(add_parser, "export-model", argv)


if __name__ == "__main__":
    raise SystemExit(main())
