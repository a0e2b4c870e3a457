"""Weight files in and out: mixtrain's ``weights.json`` and the formats users bring from peers.

Read: a run directory (its ``weights.json``), mixtrain/DoReMi JSON (``train_domain_weights``), a
plain ``{domain: weight}`` JSON or YAML, RegMix YAML (``train: {domain: weight}``), DoGE JSON
(``train_domains`` CSV + ``train_dw`` list). Written: ``weights.json`` and the Megatron
``--data-path`` blend string.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from .config import ConfigError


def _weights(pairs, source: str) -> dict[str, float]:
    """{domain: weight}, each weight a finite number >= 0 (a boolean is not a weight)."""
    out = {}
    for k, v in pairs:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(
                f"mixture.weights_from={source!r}: the weight of {k!r} is {v!r}; "
                "each weight must be a finite number >= 0"
            )
        out[str(k)] = float(v)
    return out


def _from_mapping(obj, source: str) -> dict[str, float]:
    if isinstance(obj, dict):
        for key in ("train_domain_weights", "train"):
            if isinstance(obj.get(key), dict):
                return _weights(obj[key].items(), source)
        if "train_domains" in obj and "train_dw" in obj:  # DoGE
            names = [s.strip() for s in str(obj["train_domains"]).split(",") if s.strip()]
            if not isinstance(obj["train_dw"], list) or len(names) != len(obj["train_dw"]):
                raise ConfigError(f"mixture.weights_from={source!r}: train_domains and train_dw differ in length")
            return _weights(zip(names, obj["train_dw"]), source)
        if obj and all(isinstance(v, (int, float)) for v in obj.values()):
            return _weights(obj.items(), source)
    raise ConfigError(
        f"mixture.weights_from={source!r}: no domain weights found (expected weights.json, "
        "a {domain: weight} map, train_domain_weights, RegMix 'train:' or DoGE train_domains/train_dw)"
    )


def read_weights(path: str | Path) -> dict[str, float]:
    p = Path(path)
    if p.is_dir():
        p = p / "weights.json"
    if not p.is_file():
        raise ConfigError(f"mixture.weights_from={str(path)!r}: no such file (or run directory without weights.json)")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        obj = yaml.safe_load(text)
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"mixture.weights_from={str(path)!r} is not valid JSON: {e}") from None
    return _from_mapping(obj, str(path))


def write_weights(
    path: Path, domains: list[str], average, final, controller: str, steps: int, run_id: str | None = None
) -> None:
    """DoReMi-compatible: ``train_domain_weights`` is what a main run should use (the average)."""
    obj = {
        "train_domain_weights": {d: float(w) for d, w in zip(domains, average)},
        "final_domain_weights": {d: float(w) for d, w in zip(domains, final)},
        "controller": controller,
        "steps": steps,
        **({"run_id": run_id} if run_id else {}),
    }
    path.write_text(json.dumps(obj, indent=2) + "\n")


def megatron_blend(domains: list[str], weights, prefixes: list[str]) -> str:
    """``--data-path w1 p1 w2 p2 ...`` (Megatron normalises relative weights itself)."""
    return " ".join(f"{float(w):.6f} {p}" for d, w, p in zip(domains, weights, prefixes) if w > 0)


def yaml_text(weights: dict[str, float], *, origin: str, which: str) -> str:
    head = (
        f"# Domain weights of {origin} ({which}).\n#   mixtrain train mixture=static mixture.weights_from=THIS_FILE\n"
    )
    return head + yaml.safe_dump(weights, sort_keys=False, default_flow_style=False)
