"""``mixtrain`` command line.

    mixtrain                         the main job: DoGE proxy weight search on the demo corpus
    mixtrain search mixture=NAME …   proxy weight search with any controller; writes weights.json
    mixtrain train [overrides] [-m]  a Hydra app: model=… data=… mixture=… engine=… key=value
    mixtrain data demo               build the 8-domain demo corpus and its target sets
    mixtrain data planted [--vocab N] [--noise-tokens N] [--force] [--cache DIR]
                                     the quality study's set: demo re-tokenized with a small BPE,
                                     plus a duplicate domain and noise domains (planted structure)
    mixtrain data ingest …           turn jsonl/parquet/HF datasets/Megatron prefixes into a shard set
    mixtrain score PROXY_RUN [--early STEP|FRACTION] [--late …] [--batch N] [--out DIR]
                                     per-sample learnability for the irreducible curriculum
    mixtrain export RUN --format F   a run's weights as a Megatron --data-path blend (megatron), a
                                     per-split blend JSON (json) or a static-mixture YAML (yaml)
    mixtrain export-model RUN [--step N] --out DIR
                                     a checkpoint (any engine) as a Hugging Face transformers model
                                     folder: config, safetensors weights, tokenizer files
    mixtrain eval RUN --tasks T1,T2 [--step N] [--limit N] [--batch-size B] [--include-path DIR] [--out FILE]
                                     downstream evaluation with EleutherAI's lm-eval on the exported model
    mixtrain compare RUN [RUN …] [--out DIR] [--labels L …]
                                     runs or Hydra multirun dirs side by side: final losses per domain,
                                     worst domain, targets, tokens, weights, time, seed mean ± sd; PNGs
    mixtrain study [--out DIR] [--conditions …] [--seeds 1,2] [overrides …]
                                     the quality study: proxies, one Hydra multirun of the main model
                                     per condition and seed, ranking and plots (README "Quality study")

Irreducible curriculum (within-domain order; composes with any mixture):
    mixtrain train +experiment=curriculum_proxy [data=… data.seq_len=…]    small proxy on a 10% holdout
    mixtrain score runs/curriculum-proxy-<stamp>                            writes <run>/scores/<key>/
    mixtrain train curriculum=irreducible curriculum.scores=runs/curriculum-proxy-<stamp> mixture=<any>
    mixtrain train curriculum=irreducible_online mixture=<any>             proxy trained alongside
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent / "conf"  # package data: installed with the package

USAGE = __doc__


def _train_app(overrides: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from . import dist, schema
    from .config import ConfigError, RunConfig, load_config
    from .loop import run
    from .refusal import refusals, refuse

    try:  # before Hydra makes runs/<run.name>-<time>: a refused knob leaves nothing behind
        overrides = schema.normalise(overrides)
        for o in overrides:
            if o.startswith("run.name=") and "${" not in o:
                RunConfig(name=o.split("=", 1)[1]).validate()
    except ConfigError as e:
        refuse(e)
    schema.register()
    rank, world, _ = dist.env_world()
    if world > 1 and not any(o.startswith("hydra.run.dir=") for o in overrides):
        # Every rank runs Hydra; rank 0 picks the timestamp so all ranks agree on one run directory.
        import time

        from .config import EngineConfig

        backend = next((o.split("=", 1)[1] for o in overrides if o.startswith("engine.backend=")), EngineConfig.backend)
        dist.init(backend)
        stamp = dist.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
        overrides = [*overrides, f"hydra.run.dir=runs/${{run.name}}-{stamp}"]

    # ${ceil_div:a,b} = ceil(a / b): e.g. the curriculum proxy checkpoints every ceil(train.steps / 10) steps
    OmegaConf.register_new_resolver("ceil_div", lambda a, b: -(-int(a) // int(b)), replace=True)

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def app(cfg) -> None:
        output_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            values = OmegaConf.to_container(cfg, resolve=True)
            if not values.get("run", {}).get("dir"):
                values.setdefault("run", {})["dir"] = str(output_dir)
            run(load_config(values))
        except refusals() as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            _forget_launch(output_dir)
            refuse(e)

    sys.argv = ["mixtrain train", *overrides]
    app()


def _forget_launch(output_dir: Path) -> None:
    """A refused launch leaves nothing: Hydra's fresh output folder (only ``.hydra``) is removed."""
    import shutil

    from . import rundir

    if output_dir.is_dir() and {p.name for p in output_dir.iterdir()} <= {".hydra", rundir.LOCK_NAME}:
        shutil.rmtree(output_dir, ignore_errors=True)
        parent = output_dir.parent
        if parent.name == "runs" and parent.is_dir() and not any(parent.iterdir()):
            # every refusing rank of a torchrun job gets here: another may have removed it first
            with contextlib.suppress(FileNotFoundError, OSError):
                parent.rmdir()


def _data_parser() -> argparse.ArgumentParser:
    from .commands import ingest, planted
    from .data import demo

    parser = argparse.ArgumentParser(
        prog="mixtrain data", description="Build or ingest token shards (Megatron .bin/.idx)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(sub)
    planted.add_parser(sub)
    ingest.add_parser(sub)
    return parser


def _main_job(args: list[str]) -> None:
    print(
        "[mixtrain] main job: DoGE proxy weight search on the demo corpus (built on first use); "
        "trainer/conf/experiment/search.yaml, mixture.mu=0.04. `mixtrain --help` lists the commands.",
        flush=True,
    )
    # DoGE's log-weight step is lr/mu; the search's peak lr is 4x the paper's 5e-4, so mu is 4x
    # its 0.01 to keep the paper's step (with 0.01 the tiny proxy collapses onto two domains).
    _train_app(["+experiment=search", "mixture=doge", "mixture.mu=0.04", *args])


def _data(args: list[str]) -> None:
    parsed = _data_parser().parse_args(args)
    parsed.func(parsed)


def _score(args: list[str]) -> None:
    from .curriculum.scores import main as score_main

    score_main(args)


def _offline(module: str):
    """A command of trainer.commands whose ``main(argv)`` returns the exit status."""

    def run(args: list[str]) -> None:
        import importlib

        raise SystemExit(importlib.import_module(f".commands.{module}", __package__).main(args))

    return run


COMMANDS = {
    "train": _train_app,
    "search": lambda args: _train_app(["+experiment=search", *args]),
    "data": _data,
    "score": _score,
    "export": _offline("export"),
    "export-model": _offline("export_model"),
    "eval": _offline("evaluate"),
    "compare": _offline("compare"),
    "study": _offline("study"),
}
"""Every ``mixtrain`` subcommand (the module docstring is their help), given the arguments after
its name; each parses its own (Hydra for train and search, argparse for the others)."""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = argparse.ArgumentParser(
        prog="mixtrain",
        description=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
        epilog="Without a command: the main job (DoGE proxy weight search on the demo corpus).",
    )
    parser.add_argument("-h", "--help", action="store_true", help="this help")
    parser.add_argument("command", nargs="?", choices=[*COMMANDS, "help"], metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments (COMMAND --help)")
    parsed = parser.parse_args(argv[:1])
    if parsed.help or parsed.command == "help":
        print(USAGE)
        return
    if parsed.command is None:
        _main_job([])
        return
    COMMANDS[parsed.command](argv[1:])


if __name__ == "__main__":
    main()
