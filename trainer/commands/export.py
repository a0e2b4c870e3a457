"""``mixtrain export RUN``: a run's domain weights in the forms other tools take.

RUN is a run directory (its ``weights.json`` plus the ``config.yaml`` saved next to it) or a weights
file (mixtrain/DoReMi JSON, RegMix YAML, DoGE JSON, a plain ``{domain: weight}`` map). Formats:

``megatron``
    The ``--data-path`` blend string ``w1 prefix1 w2 prefix2 ...`` for one split (``--split``,
    default train). Prefixes are the absolute ``.bin/.idx`` prefixes of the run's domains,
    resolved from its saved data config and the shard set's ``manifest.json``. Domains with weight
    0 are left out (Megatron cannot draw from them anyway). Save it as a file for Megatron's
    ``--data-args-path FILE``, or pass it inline: ``--data-path $(cat blend.txt)``.
``json``
    Megatron's per-split blend file for ``--per-split-data-args-path FILE.json``:
    ``{"train": ["w", "prefix", ...], "valid": [...], "test": null}``. Each list is what
    ``megatron.core.datasets.utils.get_blend_from_list`` parses; ``valid`` uses the same weights
    over each domain's valid prefix (domains without one are left out); mixtrain shard sets have
    no test split, so ``test`` is null unless the manifest has one. Use it *instead of*
    ``--split``: Megatron refuses ``split`` together with per-split blends.
``yaml``
    ``{domain: weight}`` for ``mixture=static mixture.weights_from=FILE`` (every domain of the
    weights file, zeros kept). Needs no data.

``--weights average`` (default) takes ``train_domain_weights``, the time average an adaptive
controller exports for a main run; ``final`` takes ``final_domain_weights``, the last shard's.
Megatron normalises relative weights itself and ignores dataset sizes (``1 A 1 B`` means half and
half, whatever the sizes).

Prefixes come from the run's ``config.yaml`` (``data.source`` = path / prefixes / demo); a
relative ``data.path`` is taken from the current directory, as the run took it. ``--data DIR``
points at a shard set instead (needed for a bare weights file with no ``config.yaml`` beside it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import yaml

from ..config import ConfigError, DataConfig
from ..weights_io import yaml_text

FORMATS = ("megatron", "json", "yaml")
SPLITS = ("train", "valid")
WEIGHTS = {"average": "train_domain_weights", "final": "final_domain_weights"}


class ExportError(ValueError):
    """Bad input for ``mixtrain export``; the message names the argument (RUN, --data, --split, --weights)."""


# ---- weights --------------------------------------------------------------------------------


def _weights_file(run: Path) -> Path:
    if run.is_dir():
        path = run / "weights.json"
        if not path.is_file():
            raise ExportError(
                f"RUN={str(run)!r} holds no weights.json: a run writes it when training finishes "
                "(an interrupted run can be finished with the same command, train.resume=auto)"
            )
        return path
    if not run.is_file():
        raise ExportError(f"RUN={str(run)!r}: no such run directory or weights file")
    return run


def load_weights(run: str | os.PathLike, which: str = "average") -> dict[str, float]:
    """Domain -> weight from a run directory or a weights file; ``which`` is ``average`` or ``final``."""
    from ..weights_io import read_weights

    if which not in WEIGHTS:
        raise ExportError(f"--weights={which!r}; allowed: {', '.join(WEIGHTS)}")
    path = _weights_file(Path(run))
    if which == "final":
        obj = None
        if path.suffix not in (".yaml", ".yml"):
            try:
                obj = json.loads(path.read_text())
            except json.JSONDecodeError:
                obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get(WEIGHTS["final"]), dict):
            raise ExportError(
                f"--weights=final: {path} has no {WEIGHTS['final']!r} (only mixtrain's weights.json "
                "records the final weights); use --weights=average"
            )
        weights = {str(k): v for k, v in obj[WEIGHTS["final"]].items()}
    else:
        try:
            weights = read_weights(path)
        except ConfigError as e:  # read_weights names the training knob; here the knob is RUN
            raise ExportError(str(e).replace("mixture.weights_from=", "RUN=", 1)) from None
    bad = {d: w for d, w in weights.items() if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0}
    if bad:
        raise ExportError(f"RUN={str(run)!r}: weights must be finite and >= 0, got {bad}")
    if not weights or sum(weights.values()) <= 0:
        raise ExportError(f"RUN={str(run)!r}: every domain weight is 0; nothing to export")
    return {d: float(w) for d, w in weights.items()}


# ---- prefixes -------------------------------------------------------------------------------


def _data_config(run: Path) -> tuple[dict, Path]:
    cfg_path = (run if run.is_dir() else run.parent) / "config.yaml"
    if not cfg_path.is_file():
        raise ExportError(
            f"RUN={str(run)!r} has no config.yaml beside its weights, so the domains' prefixes are "
            "unknown: pass --data SHARDSET (a folder with manifest.json)"
        )
    values = yaml.safe_load(cfg_path.read_text()) or {}
    data = values.get("data")
    if not isinstance(data, dict):
        raise ExportError(f"{cfg_path} has no data section: pass --data SHARDSET")
    return data, cfg_path


def _check_pair(prefix: str, where: str) -> str:
    from ..data.indexed import exists

    if not exists(prefix):
        raise ExportError(
            f"{where}: prefix {prefix!r} is missing ({prefix}.bin and {prefix}.idx expected); "
            "was the data moved? pass --data SHARDSET to point at its new place"
        )
    if any(c.isspace() for c in prefix):
        raise ExportError(
            f"{where}: prefix {prefix!r} contains whitespace, which Megatron's blend lists "
            "cannot express (they are split on whitespace): move or link the data"
        )
    return prefix


def _shardset_prefixes(root: str | os.PathLike, where: str) -> dict[str, dict[str, str]]:
    from ..data.indexed import IndexedTokens
    from ..data.shardset import ShardSet

    root = Path(os.path.abspath(root))
    try:
        ss = ShardSet.load(root)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"{where}: {e}") from None
    out: dict[str, dict[str, str]] = {}
    for name, splits in ss.domains.items():
        out[name] = {}
        for split, sp in splits.items():
            prefix = _check_pair(os.path.abspath(sp.prefix), f"{where} (domain {name!r}, split {split!r})")
            # ingest may use only the front of an existing prefix for training (the tail was copied
            # into the valid split); Megatron would read the whole file, valid documents included.
            if sp.tokens and IndexedTokens(prefix).num_tokens > sp.tokens:
                print(
                    f"mixtrain export: warning: domain {name!r} {split} uses only the first {sp.tokens} tokens of "
                    f"{prefix}; Megatron reads the whole prefix, including the documents mixtrain held out "
                    "for validation",
                    file=sys.stderr,
                )
            out[name][split] = prefix
    return out


def resolve_prefixes(run: str | os.PathLike | None, data: str | os.PathLike | None = None) -> dict[str, dict[str, str]]:
    """Domain -> split -> absolute prefix, from ``data`` (a shard set) or the run's saved config."""
    if data is not None:
        return _shardset_prefixes(data, f"--data={str(data)!r}")
    run = Path(run)
    values, cfg_path = _data_config(run)
    names = {f.name for f in dataclasses.fields(DataConfig)}
    cfg = DataConfig(**{k: v for k, v in values.items() if k in names})
    src = f"{cfg_path}"
    if cfg.source == "prefixes":
        out = {}
        for name, spec in (cfg.prefixes or {}).items():
            splits = {"train": spec} if isinstance(spec, str) else dict(spec)
            out[name] = {
                s: _check_pair(os.path.abspath(p), f"data.prefixes.{name}.{s} in {src}") for s, p in splits.items()
            }
        return out
    if cfg.source == "path":
        if not cfg.path or not Path(cfg.path).exists():
            raise ExportError(
                f"data.path={cfg.path!r} in {src} does not exist (a relative path is taken from the current "
                "directory: run export where the run was launched, or pass --data SHARDSET)"
            )
        return _shardset_prefixes(cfg.path, f"data.path={cfg.path!r} in {src}")
    if cfg.source == "demo":
        # Finds the cached demo corpus the run used (it builds it only if the cache was removed).
        from ..data.domains import _shardset

        return _shardset_prefixes(_shardset(cfg, quiet=True).root, f"demo corpus of {src}")
    raise ExportError(f"data.source={cfg.source!r} in {src}; expected demo, path or prefixes")


# ---- formats --------------------------------------------------------------------------------


def _fmt(w: float) -> str:
    return format(w, ".10g")


def blend_list(
    weights: dict[str, float], prefixes: dict[str, dict[str, str]], split: str, *, required: bool = True
) -> list[str] | None:
    """``["w1", "prefix1", ...]`` over the domains with weight > 0; ``None`` if no domain has ``split``
    (an error instead when ``required``)."""
    unknown = [d for d in weights if d not in prefixes]
    if unknown:
        raise ExportError(
            f"RUN weights name domains {unknown} that the data does not have; "
            f"domains there: {sorted(prefixes)} (pass --data to use another shard set)"
        )
    out: list[str] = []
    absent = []
    for d, w in weights.items():
        if w <= 0:
            continue
        prefix = prefixes[d].get(split)
        if prefix is None:
            absent.append(d)
            continue
        out += [_fmt(w), prefix]
    if absent and required:
        raise ExportError(f"--split={split}: domains {absent} have no {split!r} prefix")
    if absent:
        print(f"mixtrain export: warning: {split} blend leaves out {absent} (no {split!r} prefix)", file=sys.stderr)
    if not out:
        if required:
            raise ExportError(f"--split={split}: no weighted domain has a {split!r} prefix")
        return None
    return out


def megatron_string(weights, prefixes, split: str = "train") -> str:
    return " ".join(blend_list(weights, prefixes, split))


def per_split_json(weights, prefixes) -> dict:
    """Megatron's ``--per-split-data-args-path`` content: train required, valid/test where present."""
    return {
        "train": blend_list(weights, prefixes, "train"),
        "valid": blend_list(weights, prefixes, "valid", required=False),
        "test": blend_list(weights, prefixes, "test", required=False)
        if any("test" in s for s in prefixes.values())
        else None,
    }


def export(
    run: str | os.PathLike,
    fmt: str,
    *,
    split: str = "train",
    which: str = "average",
    data: str | os.PathLike | None = None,
) -> str:
    """The text ``mixtrain export`` writes for one format."""
    if fmt not in FORMATS:
        raise ExportError(f"--format={fmt!r}; allowed: {', '.join(FORMATS)}")
    if split not in SPLITS:
        raise ExportError(f"--split={split!r}; allowed: {', '.join(SPLITS)}")
    weights = load_weights(run, which)
    if fmt == "yaml":
        return yaml_text(weights, origin=str(run), which=which)
    prefixes = resolve_prefixes(run, data)
    if fmt == "megatron":
        return megatron_string(weights, prefixes, split) + "\n"
    return json.dumps(per_split_json(weights, prefixes), indent=2) + "\n"


# ---- command line ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    try:
        text = export(args.run, args.format, split=args.split, which=args.weights, data=args.data)
    except ExportError as e:
        raise SystemExit(f"mixtrain export: {e}") from None
    if args.out in (None, "-"):
        sys.stdout.write(text)
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
        print(f"wrote {out}", file=sys.stderr)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``export`` on an argparse subparsers object; its ``func`` is :func:`run`."""
    p = subparsers.add_parser(
        "export",
        help="write a run's weights as a Megatron blend, per-split JSON or static-mixture YAML",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="run directory (weights.json + config.yaml) or a weights file")
    p.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="megatron: --data-path string; json: --per-split-data-args-path file; yaml: mixture.weights_from file",
    )
    p.add_argument("--out", default=None, help="output file (default: stdout)")
    p.add_argument(
        "--split",
        default="train",
        choices=SPLITS,
        help="prefixes of this split in the megatron string (default: train)",
    )
    p.add_argument(
        "--weights",
        default="average",
        choices=tuple(WEIGHTS),
        help="average = train_domain_weights (default), final = the last shard's weights",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="SHARDSET",
        help="shard set folder to take prefixes from instead of the run's config.yaml",
    )
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    from . import standalone

    return standalone(add_parser, "export", argv)


if __name__ == "__main__":
    raise SystemExit(main())
