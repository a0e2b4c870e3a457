"""``mixtrain compare``: a real 2×2 Hydra sweep (mixture=uniform,temperature × train.seed=0,1) and a
DoGE run side by side: every run in the table with its final losses, seed-group rows, the PNGs,
and errors that name the argument."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from helpers import REPO, make_shardset, tiny_config

from trainer.commands.compare import CompareError, compare, main
from trainer.loop import Loop
from trainer.tracking import read_jsonl

TINY = [
    "data=shards",
    "data.tokenizer=bytes",
    "data.seq_len=32",
    "data.steps_per_shard=3",
    "data.eval_sequences=4",
    "model.d_model=32",
    "model.max_seq_len=64",
    "train.steps=6",
    "train.micro_batch=4",
    "train.warmup_steps=1",
    "train.eval_every=3",
    "engine.threads=1",
    "run.progress=false",
    "run.wandb=disabled",
    "run.plots=false",
]
LABELS = [
    "mixture=uniform train.seed=0",
    "mixture=uniform train.seed=1",
    "mixture=temperature train.seed=0",
    "mixture=temperature train.seed=1",
]
DOMAINS = ["abc", "counting", "noise", "words"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    data = make_shardset(root / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.cli",
            "train",
            "-m",
            *TINY,
            f"data.path={data}",
            "mixture=uniform,temperature",
            "train.seed=0,1",
            "hydra.sweep.dir=sweep",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    Loop(tiny_config(data, root / "doge", **{"train.steps": 6, "mixture": {"name": "doge", "mu": 0.05}})).train()
    return root


def _table(text: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    split = [[c.strip() for c in line.strip("| ").split(" | ")] for line in lines]
    header = split[0]
    return header, {row[0]: dict(zip(header, row)) for row in split[1:]}


def _last_eval(run_dir) -> dict:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval/loss" in r][-1]


def test_table_plots_and_seed_groups(runs, tmp_path, capsys):
    sweep, doge = runs / "sweep", runs / "doge"
    out = tmp_path / "out"
    assert main([str(sweep), str(doge), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "compare.md").read_text() == printed
    header, rows = _table(printed)
    order = "/".join(DOMAINS)
    assert header == [
        "run",
        "step",
        *DOMAINS,
        "avg",
        "eval/loss",
        "worst",
        "target/wordy",
        f"tokens ({order})",
        f"weights ({order})",
        "train s",
        "wall s",
    ]
    groups = ["mean ± sd: mixture=uniform (seeds 0, 1)", "mean ± sd: mixture=temperature (seeds 0, 1)"]
    assert list(rows) == [*LABELS, "doge", *groups]  # every run, then the seed groups (doge has no partner)

    jobs = dict(zip(LABELS, (sweep / str(i) for i in range(4))))
    jobs["doge"] = doge
    for label, job in jobs.items():
        row, ev = rows[label], _last_eval(job)
        losses = [ev[f"eval/{d}/loss"] for d in DOMAINS]
        assert [row[d] for d in DOMAINS] == [f"{v:.3f}" for v in losses]
        assert row["step"] == "6"
        assert row["avg"] == f"{np.mean(losses):.3f}" and row["eval/loss"] == f"{ev['eval/loss']:.3f}"
        assert row["worst"] == f"{DOMAINS[int(np.argmax(losses))]} {max(losses):.3f}"
        assert row["target/wordy"] == f"{ev['target/wordy/loss']:.3f}"
        last = [r for r in read_jsonl(job / "metrics.jsonl") if "mixture/tokens/abc" in r][-1]
        assert row[f"tokens ({order})"] == "/".join(f"{last[f'mixture/tokens/{d}']:.0f}" for d in DOMAINS)
        weights = json.loads((job / "weights.json").read_text())["train_domain_weights"]
        assert row[f"weights ({order})"] == "/".join(f"{weights[d]:.3f}" for d in DOMAINS)
        train_s, wall_s = float(row["train s"]), float(row["wall s"])
        assert 0 < train_s <= wall_s + 0.01
    assert rows[LABELS[0]][f"weights ({order})"] == "0.250/0.250/0.250/0.250"
    assert rows[LABELS[2]][f"weights ({order})"] != "0.250/0.250/0.250/0.250"  # temperature: ∝ domain tokens

    for group, (a, b) in zip(groups, ((0, 1), (2, 3))):
        ea, eb = _last_eval(sweep / str(a)), _last_eval(sweep / str(b))
        for d in DOMAINS:
            pair = [ea[f"eval/{d}/loss"], eb[f"eval/{d}/loss"]]
            assert rows[group][d] == f"{np.mean(pair):.3f} ± {np.std(pair, ddof=1):.3f}"
        pair = [ea["target/wordy/loss"], eb["target/wordy/loss"]]
        assert rows[group]["target/wordy"] == f"{np.mean(pair):.3f} ± {np.std(pair, ddof=1):.3f}"
    assert "sample standard deviation" in printed and f"`{doge}`" in printed

    for name in ("compare_weights.png", "compare_valid.png", "compare_losses.png"):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000, name


def test_default_out_labels_and_unfinished_runs(runs, tmp_path):
    sweep = runs / "sweep"
    result = compare([sweep], labels=["u0", "u1", "t0", "t1"], plots=False)
    assert result.out == sweep and (sweep / "compare.md").read_text() == result.table
    assert [r.label for r in result.runs] == ["u0", "u1", "t0", "t1"]
    # labels without a common stem: the group is named by the overrides that set it apart
    assert [g.label for g in result.groups] == ["mixture=uniform (seeds 0, 1)", "mixture=temperature (seeds 0, 1)"]
    with pytest.raises(CompareError, match=r"--labels: 2 label\(s\) for 4 run\(s\)"):
        compare([sweep], labels=["a", "b"], plots=False)

    # copies of two jobs as plain run directories (labelled by name); a third differs in train.lr,
    # a fourth never finished (no weights.json)
    for name, job in (("seed0", 0), ("seed1", 1), ("lr", 1), ("cut", 0)):
        shutil.copytree(sweep / str(job), tmp_path / name)
    cfg = yaml.safe_load((tmp_path / "lr" / "config.yaml").read_text())
    cfg["train"]["lr"] = 0.1
    (tmp_path / "lr" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "cut" / "weights.json").unlink()
    result = compare([tmp_path / n for n in ("seed0", "seed1", "lr", "cut")], out=tmp_path / "out", plots=False)
    assert [g.label for g in result.groups] == ["seed0, seed1 (seeds 0, 1)"]  # lr differs; cut is unfinished
    _, rows = _table(result.table)
    assert list(rows) == ["seed0", "seed1", "lr", "cut (unfinished)", "mean ± sd: seed0, seed1 (seeds 0, 1)"]
    assert rows["cut (unfinished)"]["weights (abc/counting/noise/words)"] == "–"


def test_errors_name_the_argument(runs, tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(CompareError, match=r"RUN='.*empty' is not a run directory .*nor a multirun directory"):
        compare([runs / "sweep", empty], out=tmp_path / "o", plots=False)
    with pytest.raises(CompareError, match=r"RUN='.*nope': no such directory"):
        compare([tmp_path / "nope"], plots=False)
    with pytest.raises(CompareError, match=r"RUN='.*weights\.json' is a file"):
        compare([runs / "doge" / "weights.json"], plots=False)
    with pytest.raises(SystemExit, match=r"mixtrain compare: RUN='.*empty'"):
        main([str(empty)])
    assert not (tmp_path / "o").exists()  # nothing written on bad input
