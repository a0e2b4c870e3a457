"""``mixtrain export``: a finished run's weights become a Megatron blend that megatron-core builds
(and draws from in the exported proportions), a per-split blend JSON, and a static-mixture YAML."""

import json
import shutil
import warnings

import numpy as np
import pytest
import yaml
from helpers import make_shardset, tiny_config

from mixtures import build_controller
from trainer.commands.export import ExportError, export, main
from trainer.loop import Loop
from trainer.weights_io import read_weights, write_weights

# The bytes tokenizer has pad == eod: megatron warns about it; harmless for these checks.
pytestmark = pytest.mark.filterwarnings("ignore:The pad token id in the tokenizer collides")

WEIGHTS = {"counting": 0.5, "abc": 0.3, "words": 0.2, "noise": 0.0}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real (3-step) static-mixture run: weights.json, config.yaml, shard set with train/valid."""
    root = tmp_path_factory.mktemp("export")
    data = make_shardset(root / "data")
    cfg = tiny_config(data, root / "run", **{"train.steps": 3, "mixture": {"name": "static", "weights": WEIGHTS}})
    Loop(cfg).train()
    return root / "run"


def _megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
        from megatron.core.datasets.utils import get_blend_from_list
    return BlendedMegatronDatasetBuilder, GPTDataset, GPTDatasetConfig, get_blend_from_list


def _gpt_config(**blend):
    from trainer.data.tokenizer import get_tokenizer

    _, _, GPTDatasetConfig, _ = _megatron()
    return GPTDatasetConfig(
        random_seed=1,
        sequence_length=16,
        tokenizer=get_tokenizer("bytes"),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=None,
        **blend,
    )


def _realised(dataset) -> np.ndarray:
    ids = np.array([int(dataset[i]["dataset_id"]) for i in range(len(dataset))])
    return np.bincount(ids, minlength=len(dataset.datasets)) / len(ids)


def _expected(blend) -> np.ndarray:
    w = np.array(blend[1])
    return w / w.sum()


def test_megatron_blend_string_builds_in_megatron(run_dir, tmp_path):
    out = tmp_path / "blend.txt"
    assert main([str(run_dir), "--format", "megatron", "--out", str(out)]) == 0
    text = out.read_text()
    data = run_dir.parent / "data"
    # zero-weight domains are left out; prefixes are absolute; order is the run's domain order
    assert text.split() == ["0.3", f"{data}/abc/train", "0.5", f"{data}/counting/train", "0.2", f"{data}/words/train"]
    Builder, GPTDataset, _, get_blend_from_list = _megatron()
    blend = get_blend_from_list(text.split())
    train, _, _ = Builder(GPTDataset, [400, 0, 0], lambda: True, _gpt_config(blend=blend, split="100,0,0")).build()
    assert len(train) == 400
    assert [ds.dataset_path for ds in train.datasets] == blend[0]
    assert np.allclose(_realised(train), [0.3, 0.5, 0.2], atol=0.01)


def test_per_split_json_builds_in_megatron(run_dir, tmp_path):
    out = tmp_path / "blend.json"
    assert main([str(run_dir), "--format", "json", "--out", str(out)]) == 0
    obj = json.loads(out.read_text())
    assert set(obj) == {"train", "valid", "test"} and obj["test"] is None
    assert all(p.endswith("/valid") for p in obj["valid"][1::2])
    Builder, GPTDataset, _, get_blend_from_list = _megatron()
    # what megatron training does with --per-split-data-args-path
    per_split = [
        get_blend_from_list(obj[s].split() if isinstance(obj[s], str) else obj[s]) for s in ("train", "valid", "test")
    ]
    train, valid, test = Builder(
        GPTDataset, [300, 120, 0], lambda: True, _gpt_config(blend_per_split=per_split)
    ).build()
    assert test is None and len(train) == 300 and len(valid) == 120
    assert np.allclose(_realised(train), _expected(per_split[0]), atol=0.01)
    assert np.allclose(_realised(valid), _expected(per_split[1]), atol=0.02)
    assert np.allclose(_expected(per_split[0]), [0.3, 0.5, 0.2])


def test_yaml_round_trips_into_a_static_mixture(run_dir, tmp_path):
    out = tmp_path / "weights.yaml"
    main([str(run_dir), "--format", "yaml", "--out", str(out)])
    assert yaml.safe_load(out.read_text()) == read_weights(run_dir)
    w = read_weights(out)
    assert w == {"abc": 0.3, "counting": 0.5, "noise": 0.0, "words": 0.2}  # zeros kept: static needs every domain
    c = build_controller("static", list(w), {"weights": w})
    assert np.allclose(c.weights, [0.3, 0.5, 0.0, 0.2])


def test_final_weights_and_valid_split(run_dir, tmp_path):
    other = tmp_path / "adaptive"
    other.mkdir()
    shutil.copy(run_dir / "config.yaml", other / "config.yaml")
    write_weights(
        other / "weights.json",
        ["counting", "abc", "words", "noise"],
        [0.4, 0.3, 0.2, 0.1],
        [0.7, 0.1, 0.1, 0.1],
        "doge",
        9,
    )
    avg = export(other, "megatron").split()
    final = export(other / "weights.json", "megatron", which="final", split="valid").split()
    assert avg[0::2] == ["0.4", "0.3", "0.2", "0.1"] and final[0::2] == ["0.7", "0.1", "0.1", "0.1"]
    assert all(p.endswith("/train") for p in avg[1::2]) and all(p.endswith("/valid") for p in final[1::2])


def test_bare_weights_file_takes_prefixes_from_data(run_dir, tmp_path):
    doremi = tmp_path / "doremi.json"
    doremi.write_text(json.dumps({"train_domain_weights": {"words": 1, "abc": 3}, "eval_domain_weights": {}}))
    with pytest.raises(ExportError, match="--data SHARDSET"):
        export(doremi, "megatron")
    with pytest.raises(ExportError, match="--weights=final"):
        export(doremi, "megatron", which="final")
    moved = tmp_path / "moved"
    shutil.copytree(run_dir.parent / "data", moved)
    assert export(doremi, "megatron", data=moved).split() == ["1", f"{moved}/words/train", "3", f"{moved}/abc/train"]
    assert export(doremi, "yaml").endswith("words: 1.0\nabc: 3.0\n")  # yaml needs no data


def test_errors_name_the_argument(run_dir, tmp_path):
    empty = tmp_path / "unfinished"
    empty.mkdir()
    shutil.copy(run_dir / "config.yaml", empty / "config.yaml")
    with pytest.raises(ExportError, match=r"RUN=.*unfinished.* holds no weights\.json"):
        export(empty, "megatron")
    with pytest.raises(ExportError, match="no such run directory"):
        export(tmp_path / "nope", "json")
    with pytest.raises(ExportError, match="--format='csv'"):
        export(run_dir, "csv")

    moved = tmp_path / "data"
    shutil.copytree(run_dir.parent / "data", moved)
    (moved / "abc" / "train.bin").unlink()
    with pytest.raises(ExportError, match=r"--data=.*domain 'abc', split 'train'.*abc/train' is missing"):
        export(run_dir, "megatron", data=moved)

    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"counting": 0.5, "python": 0.5}))
    with pytest.raises(ExportError, match=r"domains \['python'\] that the data does not have"):
        export(odd, "megatron", data=run_dir.parent / "data")
    odd.write_text(json.dumps({"counting": 0.0, "abc": 0.0}))
    with pytest.raises(ExportError, match="every domain weight is 0"):
        export(odd, "megatron", data=run_dir.parent / "data")

    with pytest.raises(SystemExit, match="mixtrain export: RUN="):
        main([str(empty), "--format", "yaml"])


def test_relative_data_path_is_taken_from_the_launch_directory(run_dir, tmp_path, monkeypatch):
    rel = tmp_path / "rel"
    rel.mkdir()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["data"]["path"] = "data"
    (rel / "config.yaml").write_text(yaml.safe_dump(cfg))
    shutil.copy(run_dir / "weights.json", rel / "weights.json")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExportError, match=r"data\.path='data' in .* does not exist"):
        export(rel, "megatron")
    monkeypatch.chdir(run_dir.parent)
    assert export(rel, "megatron").split()[1] == str(run_dir.parent / "data" / "abc" / "train")


def test_warns_when_megatron_would_read_held_out_documents(run_dir, tmp_path, capsys):
    """ingest --megatron can train on the front of a prefix whose tail it copied into valid."""
    data = tmp_path / "data"
    shutil.copytree(run_dir.parent / "data", data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["domains"]["abc"]["splits"]["train"]["tokens"] -= 100
    (data / "manifest.json").write_text(json.dumps(manifest))
    export(run_dir, "megatron", data=data)
    err = capsys.readouterr().err
    assert "'abc' train uses only the first" in err and "held out" in err
