"""The README's main job: `mixtrain` with no arguments builds the demo corpus and runs the DoGE proxy search."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_main_job_end_to_end(tmp_path):
    env = {**os.environ, "MIXTRAIN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=880
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    weights = json.loads((run_dir / "weights.json").read_text())["train_domain_weights"]
    assert set(weights) == {"code", "math", "encyclopedic", "dictionary", "books", "drama", "techdocs", "legal"}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["eval/loss"] < metrics[0]["train/loss"]  # it learned something
    assert {"target/humaneval/loss", "target/champ/loss", "target/news/loss"} <= set(metrics[-1])
    assert sum(weights.values()) == pytest.approx(1.0) and max(weights.values()) < 0.6  # learned, not collapsed
    assert len(set(round(w, 3) for w in weights.values())) > 1  # moved away from uniform
    assert "done: 200 steps" in proc.stdout and "uniform" in proc.stdout and "exported" in proc.stdout
    assert (run_dir / "weights.png").is_file() and (run_dir / "blend.txt").is_file()
