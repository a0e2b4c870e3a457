"""``mixtrain eval``: lm-eval on the exported model, offline.

A small multiple-choice task the test writes itself (a task YAML over a local JSONL file, passed
with --include-path): lm-eval's accuracy is the share of documents whose target choice has the
highest log-likelihood under mixtrain's own model, computed here independently; the result table
names the task and metric, the JSON holds them. Refusals: one line naming the option.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FAR_TRAINED, cli_status, make_shardset, tiny_config

from trainer import checkpoint, engines
from trainer.config import ModelConfig
from trainer.loop import Loop

pytest.importorskip("lm_eval")

TASK = "mixtrain_toy"
DOCS = [  # the synthetic domains' patterns (tests/helpers.py): mostly learnable after FAR_TRAINED
    {"context": "abcdefghabcdefghabc", "choices": ["defgh", "xqzjw"], "label": 0},
    {"context": "abcdefghabcdefgha", "choices": ["zzzz", "bcde"], "label": 1},
    {"context": "the cat sat on the", "choices": ["mat", "qqq"], "label": 0},
    {"context": "dog ran far and the", "choices": ["}}{", "cat"], "label": 1},
    {"context": "10 11 12 13 14", "choices": ["15", "x!"], "label": 0},
    {"context": "41 42 43 44", "choices": ["~~", "45"], "label": 1},
    # targets on the unlikely choice: lm-eval must count these wrong where mixtrain's model does
    {"context": "abcdefghabcdefghab", "choices": ["cdefgh", "qwerty"], "label": 1},
    {"context": "20 21 22 23", "choices": ["24", "zz"], "label": 1},
]
YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    Loop(tiny_config(make_shardset(root / "data"), root / "run", **FAR_TRAINED)).train()
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "toy.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "toy.yaml").write_text(YAML.format(task=TASK, data=tasks / "toy.jsonl"))
    return {"run": root / "run", "tasks": tasks}


def _predicted_accuracy(run) -> float:
    """lm-eval's multiple-choice rule with mixtrain's model: the choice (after the task's " "
    delimiter) with the largest summed log-probability given the context (bytes tokenizer: the
    context's ids are a prefix of the joined text's)."""
    ckpt = checkpoint.latest(run / "checkpoints")
    model = engines.load_frozen(ModelConfig(**checkpoint.load_meta(ckpt)["fingerprint"]["model"]), ckpt, "cpu")
    right = 0
    for doc in DOCS:
        ctx = list(doc["context"].encode())
        scores = []
        for choice in doc["choices"]:
            ids = torch.tensor([ctx + list((" " + choice).encode())])
            with torch.no_grad():
                logp = model(ids[:, :-1]).log_softmax(-1)[0]
            scores.append(sum(float(logp[t - 1, ids[0, t]]) for t in range(len(ctx), ids.shape[1])))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return right / len(DOCS)


def test_local_task_accuracy_is_the_models(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    out = tmp_path / "results.json"
    argv = ["eval", str(trained["run"]), "--tasks", TASK, "--include-path", str(trained["tasks"]), "--out", str(out)]
    assert cli_status([*argv, "--batch-size", "4"]) == 0
    table = capsys.readouterr().out
    assert TASK in table and "acc" in table
    record = json.loads(out.read_text())
    acc = record["results"][TASK]["acc,none"]
    expected = _predicted_accuracy(trained["run"])
    print(f"lm-eval acc {acc:.3f}, predicted from mixtrain's model {expected:.3f}")
    assert 0.0 <= acc <= 1.0 and acc == pytest.approx(expected, abs=1e-12)
    assert record["step"] == 30 and record["checkpoint"].endswith("step_00000030")


def test_refusals_name_the_option(trained, capsys):
    base = ["eval", str(trained["run"]), "--include-path", str(trained["tasks"])]
    for extra, message in (
        (["--tasks", " , "], "--tasks"),
        (["--tasks", TASK, "--batch-size", "0"], "--batch-size"),
        (["--tasks", TASK, "--step", "7"], "--step 7"),
    ):
        assert cli_status([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mixtrain: error: ") and message in err[0], err


@pytest.mark.slow  # indexes lm-eval's ~15k built-in task files to be sure
def test_unknown_task_is_refused(trained, capsys):
    argv = ["eval", str(trained["run"]), "--tasks", "no_such_task", "--include-path", str(trained["tasks"])]
    assert cli_status(argv) == 2
    assert "--tasks: unknown task(s) ['no_such_task']" in capsys.readouterr().err
